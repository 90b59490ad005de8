//! Kuma kinds: `MeshExternalService`, `Dataplane` (universal outbounds) and `Secret`, in both the
//! universal form (`type`/`name`/`mesh` at top level) and the `apiVersion`/`kind`/`metadata` form.

mod dataplane;
mod external_service;
mod hostname_generator;
mod mesh;
mod mesh_external_service;

use base64::Engine;

use crate::diag::Diagnostics;
use crate::model::{OutboundTrafficPolicy, ResourceKey};
use crate::names::is_resource_name;
use crate::node::{kind_of, At, Obj};
use crate::resource::{MeshResource, Meta, Resource, SecretResource};

pub use dataplane::{Backend, BackendRef, DataplaneResource, OutboundSpec};
pub use external_service::{ExternalServiceResource, SERVICE_TAG};
pub use hostname_generator::{HostnameGeneratorResource, DEFAULT_NAME, DEFAULT_TEMPLATE};
pub use mesh_external_service::{
    DataSource, MesSpec, MeshExternalServiceResource, Sourced, TlsSpec,
};

pub const API_VERSION: &str = "kuma.io/v1alpha1";
pub const MESH_LABEL: &str = "kuma.io/mesh";
pub const DEFAULT_MESH: &str = "default";

/// The kinds this module reads; anything else is an unknown kind.
pub const KINDS: &[&str] = &[
    "MeshExternalService",
    "ExternalService",
    "Dataplane",
    "Secret",
    "Mesh",
    "HostnameGenerator",
];

/// Every kind a document may be, for messages about kinds.
fn supported_kinds() -> String {
    KINDS.join(", ")
        + ", Istio's ServiceEntry, DestinationRule, VirtualService, IstioOperator and the istio mesh ConfigMap, Gloo's ExternalService, ExternalEndpoint and Workspace"
}

/// Reads one document, reporting every problem in `d`.
///
/// Returns the resource whenever its kind, name and mesh can be read, even if other fields
/// have errors: the caller then knows it only partly (see [`crate::resource::Located`]), but
/// references to it are not reported as missing, and the references it makes are still
/// checked, so all errors of the document are reported at once.
pub fn parse(root: &At<'_>, d: &mut Diagnostics) -> Option<Resource> {
    if !root.value.is_object() {
        d.error(
            "",
            format!(
                "a resource must be a mapping with `kind:` or universal `type:`, found {}",
                kind_of(root.value)
            ),
        );
        return None;
    }
    let mut top = root.obj(d)?;
    let form = if top.has("kind") {
        Form::Metadata
    } else if top.has("type") {
        Form::Universal
    } else {
        d.error(
            "",
            format!(
                "missing kind: give `kind:` (with apiVersion and metadata) or universal `type:`; supported kinds are {}",
                supported_kinds()
            ),
        );
        return None;
    };
    let kind_field = match form {
        Form::Metadata => "kind",
        Form::Universal => "type",
    };
    let kind_at = top.get(kind_field)?;
    let kind = kind_at.text(d)?;
    if !KINDS.contains(&kind) {
        d.error(
            kind_at.path(),
            format!(
                "unknown kind {kind:?}; supported kinds are {}",
                supported_kinds()
            ),
        );
        return None;
    }
    let meta = match form {
        Form::Metadata => metadata_form(&mut top, kind, d),
        Form::Universal => universal_form(&mut top, d),
    };
    let resource = match kind {
        "MeshExternalService" => {
            let spec = top
                .required("spec", d)
                .map(|s| mesh_external_service::parse(&s, d))
                .unwrap_or_default();
            if let Some(status) = top.get("status") {
                d.warn(
                    status.path(),
                    "is written by the control plane and ignored here; remove it",
                );
            }
            meta.map(|meta| {
                Resource::MeshExternalService(Box::new(MeshExternalServiceResource { meta, spec }))
            })
        }
        "ExternalService" => {
            let (service, spec) = match form {
                Form::Universal => external_service::parse(&mut top, d),
                Form::Metadata => top
                    .required("spec", d)
                    .and_then(|spec| {
                        let mut spec = spec.obj(d)?;
                        let parsed = external_service::parse(&mut spec, d);
                        spec.finish(d);
                        Some(parsed)
                    })
                    .unwrap_or_default(),
            };
            meta.map(|meta| {
                Resource::ExternalService(Box::new(ExternalServiceResource {
                    meta,
                    service,
                    spec,
                }))
            })
        }
        "Dataplane" => {
            let networking = match form {
                Form::Universal => top.required("networking", d),
                Form::Metadata => top.required("spec", d).and_then(|spec| {
                    let mut spec = spec.obj(d)?;
                    let n = spec.required("networking", d);
                    spec.finish(d);
                    n
                }),
            };
            let outbounds = networking
                .and_then(|n| dataplane::parse(&n, d))
                .unwrap_or_default();
            meta.map(|meta| Resource::Dataplane(DataplaneResource { meta, outbounds }))
        }
        "HostnameGenerator" => {
            let (match_labels, template) = top
                .required("spec", d)
                .and_then(|spec| {
                    let mut spec = spec.obj(d)?;
                    let parsed = hostname_generator::parse(&mut spec, d);
                    spec.finish(d);
                    Some(parsed)
                })
                .unwrap_or_default();
            meta.map(|meta| {
                Resource::HostnameGenerator(Box::new(HostnameGeneratorResource {
                    meta,
                    match_labels,
                    template,
                }))
            })
        }
        "Mesh" => {
            let passthrough = match form {
                Form::Universal => mesh::parse(&mut top, d),
                Form::Metadata => top.get("spec").and_then(|spec| {
                    let mut spec = spec.obj(d)?;
                    let p = mesh::parse(&mut spec, d);
                    spec.finish(d);
                    p
                }),
            };
            meta.map(|meta| {
                Resource::Mesh(MeshResource {
                    meta,
                    kind: "Mesh",
                    outbound_traffic_policy: passthrough.map(|p| {
                        if p {
                            OutboundTrafficPolicy::Allowed
                        } else {
                            OutboundTrafficPolicy::Restricted
                        }
                    }),
                })
            })
        }
        _ => {
            let data = secret(&mut top, form, d).unwrap_or_default();
            meta.map(|mut meta| {
                // A Kubernetes Secret of named entries (what Istio's credentialName reads) belongs
                // to its namespace, as in Kubernetes, unless a Kuma mesh label says otherwise.
                let labelled = meta.labels.iter().any(|(k, _)| k == MESH_LABEL);
                if let (false, false, Some(ns)) =
                    (data.entries.is_empty(), labelled, meta.namespace.clone())
                {
                    meta.key.mesh = ns;
                }
                Resource::Secret(SecretResource::new(meta, data.value).with_entries(data.entries))
            })
        }
    };
    top.finish(d);
    resource
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Universal,
    Metadata,
}

fn metadata_form(top: &mut Obj<'_>, kind: &str, d: &mut Diagnostics) -> Option<Meta> {
    let api_version = top.required("apiVersion", d).and_then(|a| {
        let v = a.text(d)?;
        let ok = v == API_VERSION || (kind == "Secret" && v == "v1");
        if !ok {
            let expected = if kind == "Secret" {
                format!("\"v1\" or \"{API_VERSION}\"")
            } else {
                format!("\"{API_VERSION}\"")
            };
            d.error(
                a.path(),
                format!("must be {expected} for kind {kind}, found {v:?}"),
            );
            return None;
        }
        Some(())
    });
    // Kuma writes a Kubernetes Dataplane's and ExternalService's mesh at the top level, not as
    // a label.
    let top_mesh = if kind == "Dataplane" || kind == "ExternalService" {
        top.get("mesh").map(|m| (name(&m, d), m.path().to_string()))
    } else {
        None
    };
    let mut metadata = top.required("metadata", d)?.obj(d)?;
    let name = metadata.required("name", d).and_then(|n| name(&n, d));
    let namespace = metadata
        .get("namespace")
        .and_then(|n| n.text(d).map(str::to_string));
    let labels = metadata
        .get("labels")
        .map(|l| l.string_map(d))
        .unwrap_or_default();
    if let Some(a) = metadata.get("annotations") {
        a.string_map(d);
    }
    let label_mesh = labels.iter().find(|(k, _)| k == MESH_LABEL).map(|(_, v)| {
        let path = crate::node::child_path(&format!("{}.labels", metadata.path()), MESH_LABEL);
        (mesh_label(v, &path, d), path)
    });
    metadata.finish(d);
    let mesh = match (top_mesh, label_mesh) {
        (Some((Some(top), top_path)), Some((Some(label), label_path))) if top != label => {
            d.error(
                &top_path,
                format!("{top:?} disagrees with {label_path} {label:?}; give the mesh once"),
            );
            None
        }
        (Some((mesh, _)), _) | (None, Some((mesh, _))) => mesh,
        (None, None) => Some(DEFAULT_MESH.to_string()),
    };
    api_version?;
    Some(Meta {
        key: ResourceKey {
            mesh: mesh?,
            name: name?,
        },
        namespace,
        labels,
    })
}

fn mesh_label(value: &str, path: &str, d: &mut Diagnostics) -> Option<String> {
    if is_resource_name(value) {
        Some(value.to_string())
    } else {
        d.error(path, invalid_name(value));
        None
    }
}

fn universal_form(top: &mut Obj<'_>, d: &mut Diagnostics) -> Option<Meta> {
    let name = top.required("name", d).and_then(|n| name(&n, d));
    let mesh = match top.get("mesh") {
        Some(m) => self::name(&m, d),
        None => Some(DEFAULT_MESH.to_string()),
    };
    let labels = top
        .get("labels")
        .map(|l| l.string_map(d))
        .unwrap_or_default();
    Some(Meta {
        key: ResourceKey {
            mesh: mesh?,
            name: name?,
        },
        namespace: None,
        labels,
    })
}

/// A resource name (or a reference to one).
pub(crate) fn name(at: &At<'_>, d: &mut Diagnostics) -> Option<String> {
    let n = at.text(d)?;
    if !is_resource_name(n) {
        d.error(at.path(), invalid_name(n));
        return None;
    }
    Some(n.to_string())
}

fn invalid_name(n: &str) -> String {
    format!("{n:?} is not a valid name: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit")
}

/// What a Secret holds: one value (`data` as Kuma writes it, or `data: {value: ...}`), or the
/// named entries of a Kubernetes Secret (`data: {tls.crt: ..., tls.key: ...}`), as Istio's
/// `credentialName` reads them.
#[derive(Default)]
struct SecretData {
    value: Vec<u8>,
    entries: Vec<(String, Vec<u8>)>,
}

fn secret(top: &mut Obj<'_>, form: Form, d: &mut Diagnostics) -> Option<SecretData> {
    if form == Form::Metadata {
        if let Some(t) = top.get("type") {
            if let Some(v) = t.text(d) {
                if !matches!(
                    v,
                    "system.kuma.io/secret"
                        | "Opaque"
                        | "kubernetes.io/tls"
                        | "istio.io/key-and-cert"
                ) {
                    d.error(
                        t.path(),
                        format!("must be \"system.kuma.io/secret\", \"Opaque\" or \"kubernetes.io/tls\", found {v:?}"),
                    );
                }
            }
        }
    }
    let data = top.required("data", d)?;
    if let Some(map) = data.value.as_object().filter(|m| !m.contains_key("value")) {
        if map.is_empty() {
            d.error(data.path(), "must hold at least one key");
            return None;
        }
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let at = At {
                value,
                path: crate::node::child_path(data.path(), key),
            };
            let Some(text) = at.text(d) else { continue };
            let invalid =
                "is not valid base64: a Kubernetes Secret's data values are base64-encoded";
            if let Some(bytes) = decode_base64(text, at.path(), invalid, d) {
                entries.push((key.clone(), bytes));
            }
        }
        return Some(SecretData {
            value: Vec::new(),
            entries,
        });
    }
    let (text, path) = if data.value.is_object() {
        let mut map = data.obj(d)?;
        let value = map.required("value", d);
        map.finish(d);
        let value = value?;
        (value.text(d)?, value.path().to_string())
    } else {
        (data.text(d)?, data.path().to_string())
    };
    decode_pem_or_base64(text, &path, d).map(|value| SecretData {
        value,
        entries: Vec::new(),
    })
}

/// A Secret's data: PEM text as it is, or base64 (of PEM) as Kuma stores it.
fn decode_pem_or_base64(text: &str, path: &str, d: &mut Diagnostics) -> Option<Vec<u8>> {
    if text.trim_start().starts_with("-----BEGIN") {
        return Some(text.as_bytes().to_vec());
    }
    decode_base64(
        text,
        path,
        "is neither PEM text nor valid base64; give the PEM as it is, or base64-encode it",
        d,
    )
}

/// Base64 as Kubernetes and Kuma write bytes (standard alphabet, padded); line breaks and
/// spaces are ignored. `invalid` is the message when the text is not base64.
pub(crate) fn decode_base64(
    text: &str,
    path: &str,
    invalid: &str,
    d: &mut Diagnostics,
) -> Option<Vec<u8>> {
    let compact: String = text.split_ascii_whitespace().collect();
    match base64::engine::general_purpose::STANDARD.decode(compact) {
        Ok(bytes) if !bytes.is_empty() => Some(bytes),
        Ok(_) => {
            d.error(path, "must not be empty");
            None
        }
        Err(_) => {
            d.error(path, invalid);
            None
        }
    }
}
