//! Gloo Mesh kinds as users already write them: `ExternalService` and `ExternalEndpoint`
//! (networking.gloo.solo.io/v2) and the `Workspace` (admin.gloo.solo.io/v2) that groups
//! namespaces. Each is read on its own here; [`translate`] turns them together into internal
//! services.

mod external_endpoint;
mod external_service;
pub mod translate;
mod workspace;

use serde_json::Value;

use crate::diag::Diagnostics;
use crate::node::At;
use crate::resource::Resource;

pub use external_endpoint::{ExternalEndpointResource, ExternalEndpointSpec};
pub use external_service::{
    GlooExternalServiceResource, GlooExternalServiceSpec, GlooPort, TargetPort,
};
pub use workspace::{WorkspaceResource, WorkspaceSpec};

/// Gloo's ExternalService shares its short name with Kuma's; Sluice keeps it under its full
/// Kubernetes name, as `kubectl get externalservices.networking.gloo.solo.io` does.
pub const EXTERNAL_SERVICE_KIND: &str = "ExternalService.networking.gloo.solo.io";

const NETWORKING: &str = "networking.gloo.solo.io/v2";
const ADMIN: &str = "admin.gloo.solo.io/v2";

/// Whether a document belongs to this module (by apiVersion).
pub fn claims(value: &Value) -> bool {
    value
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|a| {
            a.starts_with("networking.gloo.solo.io/") || a.starts_with("admin.gloo.solo.io/")
        })
}

pub fn parse(root: &At<'_>, d: &mut Diagnostics) -> Option<Resource> {
    let mut top = root.obj(d)?;
    let api_at = top.required("apiVersion", d)?;
    let api = api_at.text(d)?;
    let kind_at = top.required("kind", d)?;
    let kind = kind_at.text(d)?;
    let want = match kind {
        "ExternalService" | "ExternalEndpoint" => NETWORKING,
        "Workspace" => ADMIN,
        other => {
            d.error(
                kind_at.path(),
                format!("{other} is not a kind Sluice reads from Gloo; it reads ExternalService and ExternalEndpoint (networking.gloo.solo.io/v2) and Workspace (admin.gloo.solo.io/v2)"),
            );
            return None;
        }
    };
    if api != want {
        d.error(
            api_at.path(),
            format!("must be {want} for kind {kind}, found {api:?}"),
        );
    }
    let meta = crate::istio::metadata(&mut top, crate::istio::DEFAULT_NAMESPACE, d);
    let resource = match kind {
        "ExternalService" => {
            let spec = top
                .required("spec", d)
                .map(|s| external_service::parse(&s, d))
                .unwrap_or_default();
            meta.map(|meta| {
                Resource::GlooExternalService(Box::new(GlooExternalServiceResource { meta, spec }))
            })
        }
        "ExternalEndpoint" => {
            let spec = top
                .required("spec", d)
                .and_then(|s| external_endpoint::parse(&s, d));
            meta.map(|meta| {
                Resource::ExternalEndpoint(Box::new(ExternalEndpointResource {
                    meta,
                    spec: spec.unwrap_or_default(),
                }))
            })
        }
        _ => {
            let spec = top
                .required("spec", d)
                .and_then(|s| workspace::parse(&s, d));
            meta.map(|meta| {
                Resource::Workspace(Box::new(WorkspaceResource {
                    meta,
                    spec: spec.unwrap_or_default(),
                }))
            })
        }
    };
    if let Some(status) = top.get("status") {
        d.warn(
            status.path(),
            "is written by Gloo and ignored here; remove it",
        );
    }
    top.finish(d);
    resource
}
