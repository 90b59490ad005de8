//! Resources as read from documents, before references between them are resolved.

use crate::diag::DocRef;
use crate::kuma::{DataplaneResource, MeshExternalServiceResource};
use crate::model::{OutboundTrafficPolicy, ResourceKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub key: ResourceKey,
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum Resource {
    MeshExternalService(Box<MeshExternalServiceResource>),
    Dataplane(DataplaneResource),
    Secret(SecretResource),
    Mesh(MeshResource),
}

/// Mesh-wide settings: a Kuma Mesh, an IstioOperator or the istio mesh ConfigMap.
#[derive(Debug, Clone)]
pub struct MeshResource {
    pub meta: Meta,
    pub kind: &'static str,
    /// Kuma's `networking.outbound.passthrough`, Istio's `outboundTrafficPolicy.mode`.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::MeshExternalService(_) => "MeshExternalService",
            Resource::Dataplane(_) => "Dataplane",
            Resource::Secret(_) => "Secret",
            Resource::Mesh(m) => m.kind,
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Resource::MeshExternalService(r) => &r.meta,
            Resource::Dataplane(r) => &r.meta,
            Resource::Secret(r) => &r.meta,
            Resource::Mesh(r) => &r.meta,
        }
    }
}

/// Secret bytes. `Debug` never shows them.
#[derive(Clone)]
pub struct SecretResource {
    pub meta: Meta,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for SecretResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretResource")
            .field("meta", &self.meta)
            .field(
                "data",
                &format_args!("<{} bytes redacted>", self.data.len()),
            )
            .finish()
    }
}

/// A resource and the document it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub doc: DocRef,
    pub resource: Resource,
    /// False when its document has errors: the resource holds only the parts that could be
    /// read. It still counts as defined, so references to it are not reported as missing.
    pub valid: bool,
}
