//! Istio's mesh-wide outbound traffic policy, as users already write it: in an `IstioOperator`
//! (`spec.meshConfig.outboundTrafficPolicy.mode`) or in the `istio` ConfigMap's `mesh` document.
//! Istio's other install and mesh settings configure Istio itself and are accepted with a warning.

use serde_json::Value;

use crate::diag::Diagnostics;
use crate::model::OutboundTrafficPolicy;
use crate::node::{At, Obj};
use crate::resource::{MeshResource, Resource};

const ISTIO_ONLY: &str = "configures Istio itself and has no effect in Sluice";

/// The namespace Istio's own settings live in.
const ISTIO_NAMESPACE: &str = "istio-system";

pub fn parse(mut top: Obj<'_>, kind: &str, d: &mut Diagnostics) -> Option<Resource> {
    let meta = super::metadata(&mut top, ISTIO_NAMESPACE, d);
    let policy = match kind {
        "IstioOperator" => {
            let policy = top.required("spec", d).and_then(|spec| {
                let mut spec = spec.obj(d)?;
                let policy = spec.get("meshConfig").and_then(|m| {
                    let mut m = m.obj(d)?;
                    let p = m.get("outboundTrafficPolicy").and_then(|o| mode(&o, d));
                    m.warn_rest(ISTIO_ONLY, d);
                    p
                });
                spec.warn_rest(ISTIO_ONLY, d);
                policy
            });
            top.finish(d);
            policy
        }
        "ConfigMap" => {
            let policy = top.required("data", d).and_then(|data| {
                let mut data = data.obj(d)?;
                let mesh = data.required("mesh", d)?;
                let text = mesh.str(d)?;
                let path = mesh.path().to_string();
                data.finish(d);
                mesh_document(text, &path, d)
            });
            top.finish(d);
            policy
        }
        other => {
            d.error(
                "kind",
                format!("unknown kind {other:?} for this apiVersion; Sluice reads IstioOperator and the istio mesh ConfigMap"),
            );
            return None;
        }
    };
    Some(Resource::Mesh(MeshResource {
        meta: meta?,
        kind: if kind == "IstioOperator" {
            "IstioOperator"
        } else {
            "ConfigMap"
        },
        outbound_traffic_policy: policy,
    }))
}

/// `outboundTrafficPolicy: {mode: ALLOW_ANY | REGISTRY_ONLY}`.
fn mode(at: &At<'_>, d: &mut Diagnostics) -> Option<OutboundTrafficPolicy> {
    let mut o = at.obj(d)?;
    let mode = o.get("mode").and_then(|m| {
        let text = m.text(d)?;
        match text {
            "ALLOW_ANY" => Some(OutboundTrafficPolicy::Allowed),
            "REGISTRY_ONLY" => Some(OutboundTrafficPolicy::Restricted),
            other => {
                d.error(
                    m.path(),
                    format!("must be ALLOW_ANY or REGISTRY_ONLY, found {other:?}"),
                );
                None
            }
        }
    });
    if let Some(egress) = o.get("egressProxy") {
        d.warn(
            egress.path(),
            "is not used by Sluice: send traffic to an egress gateway with a ServiceEntry instead",
        );
    }
    o.finish(d);
    mode
}

/// The `mesh` key of the istio ConfigMap holds a YAML document of its own.
fn mesh_document(text: &str, path: &str, d: &mut Diagnostics) -> Option<OutboundTrafficPolicy> {
    let value: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            d.error(path, format!("is {}", crate::document::yaml_error(&e)));
            return None;
        }
    };
    let Value::Object(map) = &value else {
        d.error(path, "must hold a YAML mapping of mesh settings");
        return None;
    };
    let policy = map.get("outboundTrafficPolicy").and_then(|v| {
        mode(
            &At {
                value: v,
                path: format!("{path}.outboundTrafficPolicy"),
            },
            d,
        )
    });
    if map.keys().any(|k| k != "outboundTrafficPolicy") {
        d.warn(
            path,
            "mesh settings other than outboundTrafficPolicy configure Istio itself and have no effect in Sluice",
        );
    }
    policy
}
