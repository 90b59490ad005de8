//! Gloo's `ExternalEndpoint.spec`: one address behind an ExternalService, with its ports.

use crate::diag::Diagnostics;
use crate::names::{is_dns_name, parse_ip};
use crate::node::At;

#[derive(Debug, Clone)]
pub struct ExternalEndpointResource {
    pub meta: crate::resource::Meta,
    pub spec: ExternalEndpointSpec,
}

#[derive(Debug, Clone, Default)]
pub struct ExternalEndpointSpec {
    /// `None` when missing or invalid (an error was reported).
    pub address: Option<Address>,
    /// (name, number); a name may be empty when the endpoint has one port.
    pub ports: Vec<(String, u16)>,
}

#[derive(Debug, Clone)]
pub enum Address {
    Ip(std::net::IpAddr),
    Dns(String),
    Unix(std::path::PathBuf),
}

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> Option<ExternalEndpointSpec> {
    let mut s = spec.obj(d)?;
    let mut out = ExternalEndpointSpec {
        address: s.required("address", d).and_then(|a| {
            let text = a.text(d)?;
            if let Some(rest) = text.strip_prefix("unix://") {
                if rest.starts_with('/') && rest.len() > 1 {
                    return Some(Address::Unix(rest.into()));
                }
                d.error(
                    a.path(),
                    format!("{text:?} must be unix:// followed by an absolute socket path"),
                );
                return None;
            }
            if let Some(ip) = parse_ip(text) {
                return Some(Address::Ip(ip));
            }
            if is_dns_name(text) {
                return Some(Address::Dns(text.trim_end_matches('.').to_ascii_lowercase()));
            }
            d.error(
                a.path(),
                format!("{text:?} is not an IP address, a DNS name (without wildcards) or unix:///path; give it without a port"),
            );
            None
        }),
        ..ExternalEndpointSpec::default()
    };
    if let Some(list) = s.get("ports") {
        let items = list.list(d);
        let several = items.len() > 1;
        for item in items {
            let Some(mut p) = item.obj(d) else { continue };
            let name = p.get("name").and_then(|n| n.text(d).map(str::to_string));
            let number = p.required("number", d).and_then(|n| n.port(d));
            p.finish(d);
            if name.is_none() && several {
                d.error(
                    &format!("{}.name", item.path()),
                    "is required when the endpoint has more than one port",
                );
            }
            let name = name.unwrap_or_default();
            if out
                .ports
                .iter()
                .any(|(n, _)| !name.is_empty() && *n == name)
            {
                d.error(
                    &format!("{}.name", item.path()),
                    format!("port name {name:?} is already defined; give each port its own name"),
                );
                continue;
            }
            if let Some(number) = number {
                out.ports.push((name, number));
            }
        }
    }
    if matches!(out.address, Some(Address::Unix(_))) && !out.ports.is_empty() {
        d.error(
            &s.child_path("ports"),
            "must not be set for a unix socket address; remove it",
        );
    }
    if let Some(l) = s.get("locality") {
        if let Some(mut l) = l.obj(d) {
            for key in ["region", "zone", "subZone"] {
                if let Some(v) = l.get(key) {
                    v.text(d);
                }
            }
            let path = l.path().to_string();
            l.finish(d);
            d.warn(
                &path,
                "has no effect: Sluice does not prefer endpoints by locality, it balances over all of them; remove it to silence this",
            );
        }
    }
    s.finish(d);
    Some(out)
}
