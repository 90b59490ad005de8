//! Resources as read from documents, before references between them are resolved.

use crate::diag::DocRef;
use crate::gloo::{ExternalEndpointResource, GlooExternalServiceResource, WorkspaceResource};
use crate::istio::{DestinationRuleResource, ServiceEntryResource, VirtualServiceResource};
use crate::kuma::{
    DataplaneResource, ExternalServiceResource, HostnameGeneratorResource,
    MeshExternalServiceResource,
};
use crate::model::{OutboundTrafficPolicy, ResourceKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub key: ResourceKey,
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
}

/// Every kind a resource may have: what [`Resource::kind`] returns.
pub const KINDS: &[&str] = &[
    "MeshExternalService",
    "ExternalService",
    "Dataplane",
    "Secret",
    "Mesh",
    "IstioOperator",
    "ConfigMap",
    "ServiceEntry",
    "DestinationRule",
    "VirtualService",
    crate::gloo::EXTERNAL_SERVICE_KIND,
    "ExternalEndpoint",
    "Workspace",
    "HostnameGenerator",
];

#[derive(Debug, Clone)]
pub enum Resource {
    MeshExternalService(Box<MeshExternalServiceResource>),
    ExternalService(Box<ExternalServiceResource>),
    Dataplane(DataplaneResource),
    Secret(SecretResource),
    Mesh(MeshResource),
    ServiceEntry(Box<ServiceEntryResource>),
    DestinationRule(Box<DestinationRuleResource>),
    VirtualService(Box<VirtualServiceResource>),
    GlooExternalService(Box<GlooExternalServiceResource>),
    ExternalEndpoint(Box<ExternalEndpointResource>),
    Workspace(Box<WorkspaceResource>),
    HostnameGenerator(Box<HostnameGeneratorResource>),
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
            Resource::ExternalService(_) => "ExternalService",
            Resource::Dataplane(_) => "Dataplane",
            Resource::Secret(_) => "Secret",
            Resource::Mesh(m) => m.kind,
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::VirtualService(_) => "VirtualService",
            Resource::GlooExternalService(_) => crate::gloo::EXTERNAL_SERVICE_KIND,
            Resource::ExternalEndpoint(_) => "ExternalEndpoint",
            Resource::Workspace(_) => "Workspace",
            Resource::HostnameGenerator(_) => "HostnameGenerator",
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Resource::MeshExternalService(r) => &r.meta,
            Resource::ExternalService(r) => &r.meta,
            Resource::Dataplane(r) => &r.meta,
            Resource::Secret(r) => &r.meta,
            Resource::Mesh(r) => &r.meta,
            Resource::ServiceEntry(r) => &r.meta,
            Resource::DestinationRule(r) => &r.meta,
            Resource::VirtualService(r) => &r.meta,
            Resource::GlooExternalService(r) => &r.meta,
            Resource::ExternalEndpoint(r) => &r.meta,
            Resource::Workspace(r) => &r.meta,
            Resource::HostnameGenerator(r) => &r.meta,
        }
    }
}

/// What certificate or key material must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pem {
    Certificates,
    PrivateKey,
}

impl Pem {
    /// Whether `bytes` hold readable PEM of this sort (at least one certificate, or a key).
    pub fn found_in(self, bytes: &[u8]) -> bool {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        match self {
            Pem::Certificates => CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .is_ok_and(|certs| !certs.is_empty()),
            Pem::PrivateKey => PrivateKeyDer::from_pem_slice(bytes).is_ok(),
        }
    }

    /// The end of the message for material without it.
    pub fn missing(self) -> &'static str {
        match self {
            Pem::Certificates => {
                "no readable PEM certificate; it must hold -----BEGIN CERTIFICATE----- blocks"
            }
            Pem::PrivateKey => {
                "no readable PEM private key; it must hold a -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY) block"
            }
        }
    }
}

/// Secret bytes. `Debug` never shows them.
#[derive(Clone)]
pub struct SecretResource {
    pub meta: Meta,
    /// The one value of a Kuma Secret; empty for a Kubernetes Secret of named entries.
    pub data: Vec<u8>,
    /// A Kubernetes Secret's entries (`tls.crt`, `tls.key`, `ca.crt`, ...), decoded.
    pub entries: Vec<(String, Vec<u8>)>,
    /// Read once with the Secret, not at each reference to it: whether `data` holds
    /// certificates, and whether it holds a private key.
    pub certificates: bool,
    pub private_key: bool,
}

impl SecretResource {
    pub fn new(meta: Meta, data: Vec<u8>) -> Self {
        Self {
            certificates: Pem::Certificates.found_in(&data),
            private_key: Pem::PrivateKey.found_in(&data),
            meta,
            data,
            entries: Vec::new(),
        }
    }

    pub fn with_entries(mut self, entries: Vec<(String, Vec<u8>)>) -> Self {
        self.entries = entries;
        self
    }

    /// The first of `keys` this Secret has an entry for, with its bytes.
    pub fn entry<'a>(&'a self, keys: &[&'a str]) -> Option<(&'a str, &'a [u8])> {
        keys.iter().find_map(|k| {
            self.entries
                .iter()
                .find(|(name, _)| name == k)
                .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        })
    }

    pub fn holds(&self, pem: Pem) -> bool {
        match pem {
            Pem::Certificates => self.certificates,
            Pem::PrivateKey => self.private_key,
        }
    }
}

impl std::fmt::Debug for SecretResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretResource")
            .field("meta", &self.meta)
            .field(
                "data",
                &format_args!("<{} bytes redacted>", self.data.len()),
            )
            .field(
                "entries",
                &self
                    .entries
                    .iter()
                    .map(|(k, v)| format!("{k}: <{} bytes redacted>", v.len()))
                    .collect::<Vec<_>>(),
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
