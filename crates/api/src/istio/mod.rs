//! Istio kinds as users already write them: `ServiceEntry`, `DestinationRule` and
//! `VirtualService` (networking.istio.io), and the mesh-wide outbound traffic policy in an
//! `IstioOperator` or the `istio` ConfigMap. Each is read on its own here; [`translate`] turns
//! them together into internal services.

mod destination_rule;
mod mesh_config;
mod service_entry;
pub mod translate;
mod virtual_service;

use serde_json::Value;

use crate::diag::Diagnostics;
use crate::model::ResourceKey;
use crate::names::is_dns_name;
use crate::node::{At, Obj};
use crate::resource::{Meta, Resource};

pub(crate) use destination_rule::client_tls;
pub use destination_rule::{ClientTls, DestinationRuleResource, PortPolicy, TlsMode};
pub use service_entry::{Resolution, SeEndpoint, SePort, ServiceEntryResource, ServiceEntrySpec};
pub use virtual_service::{Destination, Route, VirtualServiceResource};

/// The API group of the traffic kinds; every version Istio has served is read alike.
const NETWORKING: &str = "networking.istio.io/";
const NETWORKING_VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];

/// The namespace Istio resources without one are in, as kubectl would apply them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Whether a document belongs to this module (by apiVersion and kind).
pub fn claims(value: &Value) -> bool {
    let api = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    api.starts_with("install.istio.io/")
        || api.starts_with(NETWORKING)
        || (api == "v1" && kind == "ConfigMap")
}

pub fn parse(root: &At<'_>, d: &mut Diagnostics) -> Option<Resource> {
    // Istio reads its resources as protobuf JSON, where `sni_hosts` and `sniHosts` are one field.
    let spec = root.value.get("spec").filter(|s| has_snake_case_key(s));
    let normalized;
    let root = match spec {
        Some(spec) => {
            let mut value = root.value.clone();
            let mut clashes = Vec::new();
            value["spec"] = camel_case_keys(spec.clone(), &mut clashes);
            for (a, b) in clashes {
                d.error(
                    "spec",
                    format!("sets both {a} and {b}, which Istio reads as one field; keep one"),
                );
            }
            normalized = value;
            At::root(&normalized)
        }
        None => At::root(root.value),
    };
    let mut top = root.obj(d)?;
    let api = top.required("apiVersion", d).and_then(|a| a.text(d));
    let kind_at = top.required("kind", d)?;
    let kind = kind_at.text(d)?;
    if let Some(version) = api.and_then(|a| a.strip_prefix(NETWORKING)) {
        if !NETWORKING_VERSIONS.contains(&version) {
            d.error(
                "apiVersion",
                format!(
                    "networking.istio.io/{version} is not a version Istio serves; use networking.istio.io/v1 (v1beta1 and v1alpha3 are read the same)"
                ),
            );
        }
        let resource = match kind {
            "ServiceEntry" => {
                let meta = metadata(&mut top, DEFAULT_NAMESPACE, d);
                let spec = top
                    .required("spec", d)
                    .map(|s| service_entry::parse(&s, d))
                    .unwrap_or_default();
                meta.map(|meta| {
                    Resource::ServiceEntry(Box::new(ServiceEntryResource { meta, spec }))
                })
            }
            "DestinationRule" => {
                let meta = metadata(&mut top, DEFAULT_NAMESPACE, d);
                let rule = top
                    .required("spec", d)
                    .and_then(|s| destination_rule::parse(&s, d));
                meta.map(|meta| {
                    Resource::DestinationRule(Box::new(DestinationRuleResource {
                        meta,
                        spec: rule.unwrap_or_default(),
                    }))
                })
            }
            "VirtualService" => {
                let meta = metadata(&mut top, DEFAULT_NAMESPACE, d);
                let spec = top
                    .required("spec", d)
                    .and_then(|s| virtual_service::parse(&s, d));
                meta.map(|meta| {
                    Resource::VirtualService(Box::new(VirtualServiceResource {
                        meta,
                        spec: spec.unwrap_or_default(),
                    }))
                })
            }
            other => {
                d.error(
                    kind_at.path(),
                    format!("{other} is not a kind Sluice reads from networking.istio.io; it reads ServiceEntry, DestinationRule and VirtualService"),
                );
                return None;
            }
        };
        ignore_status(&mut top, d);
        top.finish(d);
        return resource;
    }
    mesh_config::parse(top, kind, d)
}

/// Fields whose mappings hold data (label names, port names, header names), not field names.
const DATA_MAPS: &[&str] = &[
    "labels",
    "sourceLabels",
    "headers",
    "withoutHeaders",
    "queryParams",
    "ports",
    "selector",
];

fn has_snake_case_key(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| {
            k.contains('_')
                || (!(DATA_MAPS.contains(&k.as_str()) && v.is_object()) && has_snake_case_key(v))
        }),
        Value::Array(items) => items.iter().any(has_snake_case_key),
        _ => false,
    }
}

/// `port_level_settings` -> `portLevelSettings`, at every depth except inside data mappings.
fn camel_case_keys(value: Value, clashes: &mut Vec<(String, String)>) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            let mut given: Vec<(String, String)> = Vec::new();
            for (k, v) in map {
                let data = DATA_MAPS.contains(&k.as_str()) && v.is_object();
                let mut key = String::with_capacity(k.len());
                let mut upper = false;
                for c in k.chars() {
                    match (c, upper) {
                        ('_', _) if !key.is_empty() => upper = true,
                        (c, true) => {
                            key.push(c.to_ascii_uppercase());
                            upper = false;
                        }
                        (c, false) => key.push(c),
                    }
                }
                let v = if data { v } else { camel_case_keys(v, clashes) };
                if let Some((_, first)) = given.iter().find(|(camel, _)| *camel == key) {
                    clashes.push((first.clone(), k.clone()));
                }
                given.push((key.clone(), k));
                out.insert(key, v);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| camel_case_keys(v, clashes))
                .collect(),
        ),
        other => other,
    }
}

/// Kubernetes writes `status`; it says nothing about what to do.
fn ignore_status(top: &mut Obj<'_>, d: &mut Diagnostics) {
    if let Some(status) = top.get("status") {
        d.warn(
            status.path(),
            "is written by Kubernetes and ignored here; remove it",
        );
    }
}

/// `metadata`: the namespace is the resource's mesh in Sluice, so that names are unique per
/// namespace as in Kubernetes.
pub(crate) fn metadata(
    top: &mut Obj<'_>,
    default_namespace: &str,
    d: &mut Diagnostics,
) -> Option<Meta> {
    let mut m = top.required("metadata", d)?.obj(d)?;
    // Both become the resource's key, so both follow the rules for names.
    let name = m.required("name", d).and_then(|n| crate::kuma::name(&n, d));
    let namespace = m.get("namespace").and_then(|n| crate::kuma::name(&n, d));
    let labels = m.get("labels").map(|l| l.string_map(d)).unwrap_or_default();
    if let Some(a) = m.get("annotations") {
        a.string_map(d);
    }
    for key in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
    ] {
        m.allow(key);
    }
    m.finish(d);
    Some(Meta {
        key: ResourceKey {
            mesh: namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string()),
            name: name?,
        },
        namespace,
        labels,
    })
}

/// A host as Istio writes it in `hosts`: a DNS name, or `*.suffix` for every name under
/// `suffix`. Folded to lower case without a trailing dot. A bare `*` matches everything and is
/// refused: it would register the whole internet.
pub(crate) fn host_pattern(at: &At<'_>, d: &mut Diagnostics) -> Option<String> {
    let text = at.text(d)?;
    let folded = text.trim_end_matches('.').to_ascii_lowercase();
    if folded == "*" {
        d.error(
            at.path(),
            "\"*\" would match every host; name the hosts, or a domain as *.example.com",
        );
        return None;
    }
    let name = folded.strip_prefix("*.").unwrap_or(&folded);
    if name.contains('*') {
        d.error(
            at.path(),
            format!("{text:?}: a wildcard must be the whole first label, as in *.example.com"),
        );
        return None;
    }
    if !is_dns_name(name) {
        d.error(
            at.path(),
            format!("{text:?} is not a DNS name (or *.domain wildcard)"),
        );
        return None;
    }
    Some(folded)
}

/// A list of hosts (`hosts`, `sniHosts`), each once.
pub(crate) fn host_list(list: &At<'_>, d: &mut Diagnostics) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    for item in list.list(d) {
        if let Some(h) = host_pattern(&item, d) {
            if hosts.contains(&h) {
                d.error(item.path(), format!("{h:?} is listed twice; keep one"));
            } else {
                hosts.push(h);
            }
        }
    }
    hosts
}

/// Whether a port (`number`, `name`) at `path` is new among `known`; reports it otherwise.
pub(crate) fn new_port<'a>(
    mut known: impl Iterator<Item = (u16, &'a str)> + Clone,
    number: u16,
    name: &str,
    path: &str,
    d: &mut Diagnostics,
) -> bool {
    if known.clone().any(|(n, _)| n == number) {
        d.error(
            &format!("{path}.number"),
            format!("port {number} is already defined; give each port once"),
        );
        false
    } else if known.any(|(_, n)| n == name) {
        d.error(
            &format!("{path}.name"),
            format!("port name {name:?} is already defined; give each port its own name"),
        );
        false
    } else {
        true
    }
}

/// Whether `host` (a name) is matched by `pattern` (a name or `*.suffix`): a wildcard matches
/// names under its suffix at any depth, not the suffix itself.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Whether every name `inner` matches is matched by `outer` too.
pub(crate) fn host_covers(outer: &str, inner: &str) -> bool {
    match (outer.strip_prefix('*'), inner.strip_prefix('*')) {
        (Some(o), Some(i)) => i.ends_with(o),
        (_, None) => host_matches(outer, inner),
        (None, Some(_)) => false,
    }
}

/// Protocol names are read as Istio reads them, in any case.
pub(crate) fn protocol_name(at: &At<'_>, d: &mut Diagnostics) -> Option<String> {
    at.text(d).map(str::to_ascii_uppercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_fields_read_as_istio_reads_them() {
        let value: Value = serde_json::json!({
            "port_level_settings": [{"tls": {"client_certificate": "/a"}}],
            "sniHosts": ["a"],
            "labels": {"app_name": "x"},
            "ports": {"http_alt": 8080},
        });
        assert!(has_snake_case_key(&value));
        let mut clashes = Vec::new();
        assert_eq!(
            camel_case_keys(value, &mut clashes),
            serde_json::json!({
                "portLevelSettings": [{"tls": {"clientCertificate": "/a"}}],
                "sniHosts": ["a"],
                "labels": {"app_name": "x"},
                "ports": {"http_alt": 8080},
            })
        );
        assert!(!has_snake_case_key(
            &serde_json::json!({"labels": {"a_b": "c"}})
        ));
    }

    #[test]
    fn wildcard_hosts() {
        for (pattern, host, want) in [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "x.api.example.com", false),
        ] {
            assert_eq!(host_matches(pattern, host), want, "{pattern} {host}");
        }
        for (outer, inner, want) in [
            ("*.example.com", "*.api.example.com", true),
            ("*.api.example.com", "*.example.com", false),
            ("*.example.com", "a.example.com", true),
            ("a.example.com", "*.example.com", false),
            ("a.example.com", "a.example.com", true),
        ] {
            assert_eq!(host_covers(outer, inner), want, "{outer} {inner}");
        }
    }
}
