//! `Dataplane.networking`: the explicit outbounds of Kuma's universal mode without transparent proxy.

use std::net::{IpAddr, Ipv4Addr};

use crate::diag::Diagnostics;
use crate::names::{is_dns_name, parse_ip};
use crate::node::At;
use crate::resource::Meta;

#[derive(Debug, Clone)]
pub struct DataplaneResource {
    pub meta: Meta,
    pub outbounds: Vec<OutboundSpec>,
}

#[derive(Debug, Clone)]
pub struct OutboundSpec {
    /// e.g. `networking.outbound[0]`, for errors found when resolving the reference.
    pub path: String,
    pub address: IpAddr,
    pub port: u16,
    pub backend: BackendRef,
}

#[derive(Debug, Clone)]
pub struct BackendRef {
    pub name: String,
    pub port: Option<u16>,
}

/// Outbounds listen on loopback unless they say otherwise, as in Kuma universal mode.
pub const DEFAULT_OUTBOUND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn parse(networking: &At<'_>, d: &mut Diagnostics) -> Option<Vec<OutboundSpec>> {
    let mut n = networking.obj(d)?;
    for key in ["address", "advertisedAddress"] {
        let at = if key == "address" {
            n.get("address")
        } else {
            n.get("advertisedAddress")
        };
        if let Some(a) = at {
            if let Some(text) = a.text(d) {
                if parse_ip(text).is_none() && !is_dns_name(text) {
                    d.error(
                        a.path(),
                        format!("\"{text}\" is not an IP address or DNS name"),
                    );
                }
            }
        }
    }
    if let Some(inbound) = n.get("inbound") {
        let items = inbound.list(d);
        for item in &items {
            parse_inbound(item, d);
        }
        if !items.is_empty() {
            d.warn(
                inbound.path(),
                "accepted for compatibility and not used: Sluice carries outbound traffic only",
            );
        }
    }
    let outbounds = n
        .get("outbound")
        .map(|o| {
            o.list(d)
                .iter()
                .filter_map(|item| parse_outbound(item, d))
                .collect()
        })
        .unwrap_or_default();
    n.finish(d);
    Some(outbounds)
}

fn parse_inbound(item: &At<'_>, d: &mut Diagnostics) {
    let Some(mut i) = item.obj(d) else { return };
    i.required("port", d).and_then(|p| p.port(d));
    if let Some(p) = i.get("servicePort") {
        p.port(d);
    }
    for key in ["address", "serviceAddress"] {
        let at = if key == "address" {
            i.get("address")
        } else {
            i.get("serviceAddress")
        };
        if let Some(a) = at {
            a.text(d);
        }
    }
    if let Some(t) = i.get("tags") {
        t.string_map(d);
    }
    if let Some(name) = i.get("name") {
        name.text(d);
    }
    i.finish(d);
}

fn parse_outbound(item: &At<'_>, d: &mut Diagnostics) -> Option<OutboundSpec> {
    let mut o = item.obj(d)?;
    let port = o.required("port", d).and_then(|p| p.port(d));
    let address = match o.get("address") {
        Some(a) => a.text(d).and_then(|text| {
            let ip = parse_ip(text);
            if ip.is_none() {
                d.error(
                    a.path(),
                    format!("\"{text}\" must be an IP address to listen on, like 127.0.0.1"),
                );
            }
            ip
        }),
        None => Some(DEFAULT_OUTBOUND_ADDRESS),
    };
    if let Some(tags) = o.get("tags") {
        tags.string_map(d);
        d.error(
            tags.path(),
            "selecting an external service by tags is not supported; use backendRef: {kind: MeshExternalService, name: NAME}",
        );
    }
    let backend = o
        .required("backendRef", d)
        .and_then(|b| parse_backend_ref(&b, d));
    o.finish(d);
    Some(OutboundSpec {
        path: item.path().to_string(),
        address: address?,
        port: port?,
        backend: backend?,
    })
}

fn parse_backend_ref(b: &At<'_>, d: &mut Diagnostics) -> Option<BackendRef> {
    let mut b = b.obj(d)?;
    let kind_ok = b.required("kind", d).and_then(|k| {
        let v = k.text(d)?;
        if v != "MeshExternalService" {
            d.error(
                k.path(),
                format!("must be MeshExternalService, found \"{v}\"; Sluice routes outbounds to external services only"),
            );
            return None;
        }
        Some(())
    });
    let name = b
        .required("name", d)
        .and_then(|n| n.text(d).map(str::to_string));
    if let Some(ns) = b.get("namespace") {
        ns.text(d);
    }
    let port = b.get("port").and_then(|p| p.port(d));
    b.finish(d);
    kind_ok?;
    Some(BackendRef { name: name?, port })
}
