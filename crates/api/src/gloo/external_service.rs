//! Gloo's `ExternalService.spec`: hosts or addresses, ports with their client-side TLS, and the
//! ExternalEndpoints it selects.

use crate::diag::Diagnostics;
use crate::istio::{client_tls, ClientTls, TlsMode};
use crate::model::{Cidr, Protocol};
use crate::node::At;

#[derive(Debug, Clone)]
pub struct GlooExternalServiceResource {
    pub meta: crate::resource::Meta,
    pub spec: GlooExternalServiceSpec,
}

#[derive(Debug, Clone, Default)]
pub struct GlooExternalServiceSpec {
    /// Names or `*.suffix` patterns, folded to lower case.
    pub hosts: Vec<String>,
    pub addresses: Vec<Cidr>,
    pub ports: Vec<GlooPort>,
    /// Labels every selected ExternalEndpoint carries; `None` when not set. An empty selector
    /// selects nothing, as in Gloo.
    pub selector: Option<Vec<(String, String)>>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct GlooPort {
    pub path: String,
    pub number: u16,
    pub name: String,
    /// What the app speaks to the port: with `clientsideTls` on an HTTPS port that is plain
    /// HTTP, which the proxy sends on as HTTPS.
    pub protocol: Protocol,
    pub target: Option<TargetPort>,
    pub tls: Option<ClientTls>,
}

/// The ExternalEndpoints' port for this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

const PROTOCOLS: &str = "HTTP, HTTPS, HTTP2, GRPC, TLS, TCP or MONGO";

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> GlooExternalServiceSpec {
    let mut out = GlooExternalServiceSpec::default();
    let Some(mut s) = spec.obj(d) else {
        return out;
    };
    let hosts = s.get("hosts");
    let addresses = s.get("addresses");
    if let Some(list) = &hosts {
        out.hosts = crate::istio::host_list(list, d);
    }
    if let Some(list) = &addresses {
        for item in list.list(d) {
            let Some(text) = item.text(d) else { continue };
            match Cidr::parse(text) {
                Ok(c) if c.prefix == 0 => d.error(
                    item.path(),
                    format!(
                        "{text} would open every address; list the ranges that hold the service"
                    ),
                ),
                Ok(c) => out.addresses.push(c),
                Err(e) => d.error(item.path(), e),
            }
        }
    }
    let given = |a: &Option<At<'_>>| {
        a.as_ref()
            .is_some_and(|a| a.value.as_array().is_some_and(|l| !l.is_empty()))
    };
    match (given(&hosts), given(&addresses)) {
        (true, true) => d.error(
            spec.path(),
            "sets both hosts and addresses; Gloo takes one or the other: give the addresses an ExternalService of their own",
        ),
        (false, false) => d.error(
            spec.path(),
            "must list hosts or addresses: the names or IPs apps call the service by",
        ),
        _ => {}
    }
    if let Some(list) = s.required("ports", d) {
        let items = list.list(d);
        if items.is_empty() && list.value.is_array() {
            d.error(list.path(), "must list at least one port");
        }
        for item in items {
            let Some(p) = parse_port(&item, d) else {
                continue;
            };
            let known = out.ports.iter().map(|q| (q.number, q.name.as_str()));
            if crate::istio::new_port(known, p.number, &p.name, item.path(), d) {
                out.ports.push(p);
            }
        }
    }
    if let Some(sel) = s.get("selector") {
        out.selector = Some(sel.string_map(d));
    }
    if let Some(sans) = s.get("subjectAltNames") {
        for item in sans.list(d) {
            if let Some(t) = item.text(d) {
                out.subject_alt_names.push(t.to_string());
            }
        }
    }
    s.finish(d);
    out
}

fn parse_port(at: &At<'_>, d: &mut Diagnostics) -> Option<GlooPort> {
    let mut p = at.obj(d)?;
    let number = p.required("number", d).and_then(|n| n.port(d));
    let name = p.get("name").and_then(|n| n.text(d).map(str::to_string));
    let tls = p
        .get("clientsideTls")
        .and_then(|t| client_tls(&t, TlsMode::Simple, d))
        .filter(|t| t.mode != TlsMode::Disable);
    let protocol = match p.get("protocol") {
        None => {
            d.warn(
                &p.child_path("protocol"),
                "is not set, so the port is carried as TCP; set HTTP, HTTPS, TLS or TCP to silence this",
            );
            Some(Protocol::Tcp)
        }
        Some(at) => crate::istio::protocol_name(&at, d).and_then(|name| match name.as_str() {
            "HTTP" => Some(Protocol::Http),
            "HTTP2" => Some(Protocol::Http2),
            "GRPC" => Some(Protocol::Grpc),
            // With client-side TLS the app speaks plain text and the proxy adds the TLS.
            "HTTPS" if tls.is_some() => Some(Protocol::Http),
            "TLS" if tls.is_some() => Some(Protocol::Tcp),
            "HTTPS" | "TLS" => Some(Protocol::Tls),
            "TCP" => Some(Protocol::Tcp),
            "MONGO" => {
                d.warn(
                    at.path(),
                    "MONGO is carried as TCP: Sluice has no MongoDB-specific handling; use TCP to silence this",
                );
                Some(Protocol::Tcp)
            }
            other => {
                d.error(at.path(), format!("must be {PROTOCOLS}; found {other:?}"));
                None
            }
        }),
    };
    let target = p.get("targetPort").and_then(|t| {
        let mut t = t.obj(d)?;
        let number = t.get("number").and_then(|n| n.port(d));
        let name = t.get("name").and_then(|n| n.text(d).map(str::to_string));
        let path = t.path().to_string();
        t.finish(d);
        match (number, name) {
            (Some(n), None) => Some(TargetPort::Number(n)),
            (None, Some(n)) => Some(TargetPort::Name(n)),
            (Some(_), Some(_)) => {
                d.error(&path, "sets number and name; give one of them");
                None
            }
            (None, None) => {
                d.error(&path, "must give number or name");
                None
            }
        }
    });
    p.refuse(
        "egressGatewayRoutes",
        "Sluice has no egress gateways: its proxy is the egress point; remove egressGatewayRoutes",
        d,
    );
    let path = at.path().to_string();
    p.finish(d);
    let number = number?;
    Some(GlooPort {
        path,
        // Gloo names are optional; the number stands in, so names stay unique.
        name: name.unwrap_or_else(|| number.to_string()),
        number,
        protocol: protocol?,
        target,
        tls,
    })
}
