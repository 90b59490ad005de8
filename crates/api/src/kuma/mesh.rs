//! Kuma `Mesh`: Sluice reads `networking.outbound.passthrough`, the mesh-wide outbound traffic
//! policy. The mesh's other sections configure Kuma's own data plane and are accepted with a
//! warning that they have no effect here.

use crate::diag::Diagnostics;
use crate::node::Obj;

/// Sections of a Kuma Mesh that Sluice does not use.
const NOT_USED: &[&str] = &[
    "mtls",
    "logging",
    "tracing",
    "metrics",
    "constraints",
    "meshServices",
    "skipCreatingInitialPolicies",
];

/// Reads the Mesh body (top level in universal form, `spec` otherwise); returns `passthrough`.
pub fn parse(body: &mut Obj<'_>, d: &mut Diagnostics) -> Option<bool> {
    let mut passthrough = None;
    if let Some(networking) = body.get("networking") {
        if let Some(mut n) = networking.obj(d) {
            if let Some(outbound) = n.get("outbound") {
                if let Some(mut o) = outbound.obj(d) {
                    passthrough = o.get("passthrough").and_then(|p| p.bool(d));
                    o.finish(d);
                }
            }
            n.finish(d);
        }
    }
    if let Some(routing) = body.get("routing") {
        if let Some(mut r) = routing.obj(d) {
            for key in [
                "localityAwareLoadBalancing",
                "zoneEgress",
                "defaultForbidMeshExternalServiceAccess",
            ] {
                if let Some(at) = r.get(key) {
                    at.bool(d);
                }
            }
            r.finish(d);
        }
    }
    for key in NOT_USED {
        if body.has(key) {
            d.warn(
                &child(body.path(), key),
                "configures Kuma's own data plane and has no effect in Sluice",
            );
        }
    }
    for key in NOT_USED {
        body.allow(key);
    }
    passthrough
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
