//! `ServiceEntry.spec`: the hosts and addresses an app may call, on which ports and protocols,
//! and where the traffic goes (resolution and endpoints).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::diag::Diagnostics;
use crate::model::{Cidr, Protocol};
use crate::names::{is_dns_name, parse_ip};
use crate::node::{child_path, At};

#[derive(Debug, Clone)]
pub struct ServiceEntryResource {
    pub meta: crate::resource::Meta,
    pub spec: ServiceEntrySpec,
}

/// What could be read of a spec; when its document has errors, some parts may be missing.
#[derive(Debug, Clone, Default)]
pub struct ServiceEntrySpec {
    /// Names or `*.suffix` patterns, folded to lower case.
    pub hosts: Vec<String>,
    pub addresses: Vec<Cidr>,
    pub ports: Vec<SePort>,
    pub resolution: Resolution,
    pub endpoints: Vec<SeEndpoint>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SePort {
    pub number: u16,
    pub name: String,
    pub protocol: Protocol,
    /// Where the endpoints listen, unless an endpoint's own `ports` says otherwise.
    pub target_port: Option<u16>,
}

/// How the proxy finds where a connection goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resolution {
    /// To the host the app named (resolved and checked by the proxy), never to an address the
    /// app chose. Istio's default.
    #[default]
    None,
    /// To the endpoints' IP addresses.
    Static,
    /// To the endpoints' names (or, without endpoints, each host's own name) as DNS resolves them.
    Dns,
}

#[derive(Debug, Clone)]
pub struct SeEndpoint {
    pub path: String,
    pub address: EndpointAddress,
    /// Port name of the entry -> the port this endpoint listens on for it.
    pub ports: HashMap<String, u16>,
    /// Its share of the traffic, against the other endpoints' weights.
    pub weight: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Dns(String),
    Unix(std::path::PathBuf),
}

/// Weights are shares: beyond this they say nothing finer.
pub const MAX_WEIGHT: u32 = 10_000;

const RESOLUTIONS: &str = "NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS";

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> ServiceEntrySpec {
    let mut out = ServiceEntrySpec::default();
    let Some(mut s) = spec.obj(d) else {
        return out;
    };
    if let Some(list) = s.required("hosts", d) {
        if list.value.as_array().is_some_and(Vec::is_empty) {
            d.error(
                list.path(),
                "must list at least one host: the name apps call the service by",
            );
        }
        out.hosts = super::host_list(&list, d);
    }
    let resolution_at = s.get("resolution");
    out.resolution = match resolution_at
        .as_ref()
        .and_then(|r| r.text(d).map(|t| (r, t)))
    {
        None => Resolution::None,
        Some((_, "NONE" | "DYNAMIC_DNS")) => Resolution::None,
        Some((_, "STATIC")) => Resolution::Static,
        Some((_, "DNS" | "DNS_ROUND_ROBIN")) => Resolution::Dns,
        Some((at, other)) => {
            d.error(at.path(), format!("must be {RESOLUTIONS}, found {other:?}"));
            Resolution::None
        }
    };
    let round_robin = resolution_at
        .as_ref()
        .is_some_and(|r| r.value.as_str() == Some("DNS_ROUND_ROBIN"));
    if let Some(list) = s.get("addresses") {
        for item in list.list(d) {
            let Some(text) = item.text(d) else { continue };
            match Cidr::parse(text) {
                Ok(c) if !c.is_single() && out.resolution == Resolution::Dns => d.error(
                    item.path(),
                    format!("{text}: a CIDR range needs resolution NONE or STATIC; with DNS each address is one service address"),
                ),
                Ok(c) if c.prefix == 0 => d.error(
                    item.path(),
                    format!("{text} would open every address; list the ranges that hold the service"),
                ),
                Ok(c) => out.addresses.push(c),
                Err(e) => d.error(item.path(), e),
            }
        }
    }
    if let Some(list) = s.required("ports", d) {
        let items = list.list(d);
        if items.is_empty() && list.value.is_array() {
            d.error(list.path(), "must list at least one port");
        }
        for item in items {
            if let Some(p) = parse_port(&item, out.resolution, d) {
                let known = out.ports.iter().map(|q| (q.number, q.name.as_str()));
                if crate::istio::new_port(known, p.number, &p.name, item.path(), d) {
                    out.ports.push(p);
                }
            }
        }
    }
    if let Some(l) = s.get("location") {
        match l.text(d) {
            Some("MESH_EXTERNAL") | None => {}
            Some("MESH_INTERNAL") => d.warn(
                l.path(),
                "is read as MESH_EXTERNAL: Sluice speaks no Istio mTLS to the endpoints; originate TLS with a DestinationRule if they need it",
            ),
            Some(other) => d.error(
                l.path(),
                format!("must be MESH_EXTERNAL or MESH_INTERNAL, found {other:?}"),
            ),
        }
    }
    if let Some(list) = s.get("endpoints") {
        let items = list.list(d);
        if out.resolution == Resolution::None && !items.is_empty() {
            d.error(
                list.path(),
                "must be empty with resolution NONE, which sends traffic to the host the app named; remove the endpoints or set resolution STATIC or DNS",
            );
        }
        if round_robin && items.len() > 1 {
            d.error(
                list.path(),
                "resolution DNS_ROUND_ROBIN takes at most one endpoint; use DNS for several",
            );
        }
        for item in items {
            if let Some(e) = parse_endpoint(&item, &out, d) {
                out.endpoints.push(e);
            }
        }
    }
    if out.resolution == Resolution::Static && out.endpoints.is_empty() && !d.has_errors() {
        d.error(
            &s.child_path("endpoints"),
            "is required with resolution STATIC, which sends traffic to the endpoints' addresses; list them, or use resolution DNS or NONE",
        );
    }
    if out.resolution == Resolution::Dns && out.endpoints.is_empty() {
        for (i, h) in out.hosts.iter().enumerate() {
            if h.starts_with("*.") {
                d.error(
                    &format!("{}[{i}]", s.child_path("hosts")),
                    format!("{h:?}: resolution DNS without endpoints resolves each host, and a wildcard cannot be resolved; use resolution NONE, or list endpoints"),
                );
            }
        }
    }
    if out
        .endpoints
        .iter()
        .any(|e| matches!(e.address, EndpointAddress::Unix(_)))
        && out.ports.len() > 1
    {
        d.error(
            &s.child_path("ports"),
            "must list exactly one port when an endpoint is a unix socket",
        );
    }
    if let Some(sans) = s.get("subjectAltNames") {
        for item in sans.list(d) {
            if let Some(t) = item.text(d) {
                out.subject_alt_names.push(t.to_string());
            }
        }
    }
    if let Some(e) = s.get("exportTo") {
        for item in e.list(d) {
            item.text(d);
        }
        d.warn(
            e.path(),
            "has no effect: every proxy that serves this namespace sees the entry; remove it to silence this",
        );
    }
    s.refuse(
        "workloadSelector",
        "selects Kubernetes workloads, which Sluice does not have; list endpoints instead",
        d,
    );
    s.finish(d);
    out
}

fn parse_port(at: &At<'_>, resolution: Resolution, d: &mut Diagnostics) -> Option<SePort> {
    let mut p = at.obj(d)?;
    let number = p.required("number", d).and_then(|n| n.port(d));
    let name = p.required("name", d).and_then(|n| {
        let text = n.text(d)?;
        if is_port_name(text) {
            Some(text.to_string())
        } else {
            d.error(
                n.path(),
                format!("{text:?} is not a valid port name: use lower-case letters, digits and '-', at most 63, starting and ending with a letter or digit"),
            );
            None
        }
    });
    let protocol = match p.get("protocol") {
        None => {
            d.warn(
                &p.child_path("protocol"),
                "is not set, so the port is carried as TCP (Istio would sniff it); set HTTP, HTTPS, TLS or TCP to silence this",
            );
            Some(Protocol::Tcp)
        }
        Some(at) => super::protocol_name(&at, d).and_then(|name| protocol(&name, &at, d)),
    };
    let target_port = p.get("targetPort").and_then(|t| t.port(d));
    if let (Some(_), Resolution::None) = (target_port, resolution) {
        d.warn(
            &p.child_path("targetPort"),
            "has no effect with resolution NONE, which sends traffic to the port the app called; remove it, or use resolution DNS or STATIC",
        );
    }
    p.finish(d);
    Some(SePort {
        number: number?,
        name: name?,
        protocol: protocol?,
        target_port: target_port.filter(|_| resolution != Resolution::None),
    })
}

/// A port's protocol as Istio names it; those Sluice carries as plain TCP say so.
pub(crate) fn protocol(name: &str, at: &At<'_>, d: &mut Diagnostics) -> Option<Protocol> {
    Some(match name {
        "HTTP" => Protocol::Http,
        "HTTP2" => Protocol::Http2,
        "GRPC" => Protocol::Grpc,
        "HTTPS" | "TLS" => Protocol::Tls,
        "TCP" => Protocol::Tcp,
        "MONGO" | "MYSQL" | "REDIS" => {
            d.warn(
                at.path(),
                format!("{name} is carried as TCP: Sluice has no {name}-specific handling; use TCP to silence this"),
            );
            Protocol::Tcp
        }
        "UDP" => {
            d.error(
                at.path(),
                "UDP is not carried: Sluice proxies TCP only; remove the port",
            );
            return None;
        }
        other => {
            d.error(
                at.path(),
                format!("must be one of HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, MYSQL, REDIS; found {other:?}"),
            );
            return None;
        }
    })
}

/// A DNS-1123 label, as Istio wants port names.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_endpoint(
    at: &At<'_>,
    entry: &ServiceEntrySpec,
    d: &mut Diagnostics,
) -> Option<SeEndpoint> {
    let mut e = at.obj(d)?;
    let address = e.required("address", d).and_then(|a| {
        let text = a.text(d)?;
        if let Some(rest) = text.strip_prefix("unix://") {
            if !rest.starts_with('/') || rest.len() < 2 {
                d.error(
                    a.path(),
                    format!("{text:?} must be unix:// followed by an absolute socket path"),
                );
                return None;
            }
            return Some(EndpointAddress::Unix(rest.into()));
        }
        if let Some(ip) = parse_ip(text) {
            return Some(EndpointAddress::Ip(ip));
        }
        if entry.resolution == Resolution::Static {
            d.error(
                a.path(),
                format!("{text:?} is not an IP address: resolution STATIC takes IP addresses (or unix:///path); use resolution DNS for names"),
            );
            return None;
        }
        if is_dns_name(text) {
            Some(EndpointAddress::Dns(text.trim_end_matches('.').to_ascii_lowercase()))
        } else {
            d.error(
                a.path(),
                format!("{text:?} is not an IP address or a DNS name (wildcards are not endpoints)"),
            );
            None
        }
    });
    let mut ports = HashMap::new();
    if let Some(map) = e.get("ports") {
        match map.value.as_object() {
            None => {
                map.obj(d);
            }
            Some(obj) => {
                for (key, value) in obj {
                    let value = At {
                        value,
                        path: child_path(map.path(), key),
                    };
                    let Some(port) = value.port(d) else { continue };
                    if entry.ports.iter().any(|p| &p.name == key) {
                        ports.insert(key.clone(), port);
                    } else {
                        let known: Vec<&str> =
                            entry.ports.iter().map(|p| p.name.as_str()).collect();
                        d.error(
                            value.path(),
                            format!("{key:?} is not the name of a port of this entry (they are {}); use one of those names", known.join(", ")),
                        );
                    }
                }
            }
        }
        if matches!(address, Some(EndpointAddress::Unix(_))) && !ports.is_empty() {
            d.error(
                map.path(),
                "must not be set for a unix socket endpoint; remove it",
            );
        }
    }
    let weight =
        e.get("weight").and_then(
            |w| match w.value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n @ 1..=MAX_WEIGHT) => Some(n),
                _ => {
                    d.error(
                        w.path(),
                        format!("must be a whole number from 1 to {MAX_WEIGHT}"),
                    );
                    None
                }
            },
        );
    if let Some(l) = e.get("labels") {
        l.string_map(d);
        d.warn(
            l.path(),
            "has no effect: Sluice has no subsets to select endpoints by label; remove it to silence this",
        );
    }
    if let Some(l) = e.get("locality") {
        l.text(d);
        d.warn(
            l.path(),
            "has no effect: Sluice does not prefer endpoints by locality; remove it to silence this",
        );
    }
    for (key, what) in [
        ("network", "networks"),
        ("serviceAccount", "service accounts"),
    ] {
        if let Some(v) = e.get(key) {
            v.text(d);
            d.warn(
                v.path(),
                format!("has no effect: Sluice has no Istio {what}; remove it to silence this"),
            );
        }
    }
    e.finish(d);
    Some(SeEndpoint {
        path: at.path().to_string(),
        address: address?,
        ports,
        weight,
    })
}
