//! `Dataplane.networking`: the explicit outbounds of Kuma's universal mode without transparent proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::diag::Diagnostics;
use crate::names::{is_dns_name, parse_ip};
use crate::node::At;
use crate::resource::Meta;

#[derive(Debug, Clone)]
pub struct DataplaneResource {
    pub meta: Meta,
    /// The outbounds that could be read; when the document has errors, some may be missing.
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
    pub kind: Backend,
    pub name: String,
    pub port: Option<u16>,
}

/// What an outbound sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `backendRef: {kind: MeshExternalService, name}`.
    MeshExternalService,
    /// `tags: {kuma.io/service: NAME}`: the Kuma ExternalService with that tag.
    ServiceTag,
}

/// Outbounds listen on loopback unless they say otherwise, as in Kuma universal mode.
pub const DEFAULT_OUTBOUND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn parse(networking: &At<'_>, d: &mut Diagnostics) -> Option<Vec<OutboundSpec>> {
    let mut n = networking.obj(d)?;
    for key in ["address", "advertisedAddress"] {
        let Some(a) = n.get(key) else { continue };
        if let Some(text) = a.text(d) {
            if parse_ip(text).is_none() && !is_dns_name(text) {
                d.error(
                    a.path(),
                    format!("{text:?} is not an IP address or DNS name"),
                );
            }
        }
    }
    // Kuma requires inbounds; Sluice carries outbound traffic only, so they are checked and
    // otherwise unused (a warning on every Dataplane would only be noise).
    if let Some(inbound) = n.get("inbound") {
        for item in &inbound.list(d) {
            parse_inbound(item, d);
        }
    }
    let mut outbounds: Vec<OutboundSpec> = Vec::new();
    if let Some(list) = n.get("outbound") {
        for item in list.list(d) {
            let Some(o) = parse_outbound(&item, d) else {
                continue;
            };
            if let Some(other) = outbounds.iter().find(|p| overlaps(p, &o)) {
                let here = SocketAddr::new(o.address, o.port);
                let there = SocketAddr::new(other.address, other.port);
                let message = if here == there {
                    format!(
                        "{here} is already used by {}; give each outbound its own port",
                        other.path
                    )
                } else {
                    format!(
                        "{here} overlaps {} on {there}: a wildcard address listens on every address; give each outbound its own port",
                        other.path
                    )
                };
                d.error(&format!("{}.port", o.path), message);
                continue;
            }
            outbounds.push(o);
        }
    }
    n.finish(d);
    Some(outbounds)
}

/// Two listeners of one proxy that cannot both bind: the same port on the same address, or
/// on a wildcard address that covers the other (`::` also covers IPv4, as on a dual-stack host).
fn overlaps(a: &OutboundSpec, b: &OutboundSpec) -> bool {
    let covers = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    a.port == b.port
        && (a.address == b.address || covers(a.address, b.address) || covers(b.address, a.address))
}

fn parse_inbound(item: &At<'_>, d: &mut Diagnostics) {
    let Some(mut i) = item.obj(d) else { return };
    i.required("port", d).and_then(|p| p.port(d));
    if let Some(p) = i.get("servicePort") {
        p.port(d);
    }
    for key in ["address", "serviceAddress", "name"] {
        if let Some(a) = i.get(key) {
            a.text(d);
        }
    }
    if let Some(t) = i.get("tags") {
        t.string_map(d);
    }
    i.finish(d);
}

fn parse_outbound(item: &At<'_>, d: &mut Diagnostics) -> Option<OutboundSpec> {
    let mut o = item.obj(d)?;
    let address = match o.get("address") {
        Some(a) => a.text(d).and_then(|text| {
            let ip = parse_ip(text);
            if ip.is_none() {
                d.error(
                    a.path(),
                    format!("{text:?} must be an IP address to listen on, like 127.0.0.1"),
                );
            }
            ip
        }),
        None => Some(DEFAULT_OUTBOUND_ADDRESS),
    };
    let port = o.required("port", d).and_then(|p| p.port(d));
    // The legacy universal form selects a Kuma ExternalService by its kuma.io/service tag.
    let backend = match (o.get("tags"), o.get("backendRef")) {
        (Some(tags), Some(b)) => {
            d.error(
                b.path(),
                format!("is set with {}; select the service one way: backendRef for a MeshExternalService, tags for an ExternalService", tags.path()),
            );
            None
        }
        (Some(tags), None) => parse_tags(&tags, d),
        (None, Some(b)) => parse_backend_ref(&b, d),
        (None, None) => {
            d.error(
                &o.child_path("backendRef"),
                "is required: give backendRef: {kind: MeshExternalService, name: NAME}, or tags: {kuma.io/service: NAME} for an ExternalService",
            );
            None
        }
    };
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
                format!("must be MeshExternalService, found {v:?}; Sluice routes outbounds to external services only"),
            );
            return None;
        }
        Some(())
    });
    let name = b.required("name", d).and_then(|n| super::name(&n, d));
    if let Some(ns) = b.get("namespace") {
        ns.text(d);
    }
    let port = b.get("port").and_then(|p| p.port(d));
    b.finish(d);
    kind_ok?;
    Some(BackendRef {
        kind: Backend::MeshExternalService,
        name: name?,
        port,
    })
}

/// `tags: {kuma.io/service: NAME}`; Sluice selects by that tag alone.
fn parse_tags(at: &At<'_>, d: &mut Diagnostics) -> Option<BackendRef> {
    if !at.value.is_object() {
        at.obj(d);
        return None;
    }
    let tags = at.string_map(d);
    let service_path = crate::node::child_path(at.path(), super::SERVICE_TAG);
    let mut service = None;
    for (key, value) in &tags {
        let path = crate::node::child_path(at.path(), key);
        if key == super::SERVICE_TAG {
            service = Some(value.clone());
        } else {
            d.error(
                &path,
                format!(
                    "Sluice selects an ExternalService by {} alone; remove this tag",
                    super::SERVICE_TAG
                ),
            );
        }
    }
    if service.is_none() {
        d.error(
            &service_path,
            "is required: the tag of the ExternalService to send to",
        );
    }
    Some(BackendRef {
        kind: Backend::ServiceTag,
        name: service?,
        port: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(address: &str, port: u16) -> OutboundSpec {
        OutboundSpec {
            path: String::new(),
            address: address.parse().unwrap(),
            port,
            backend: BackendRef {
                kind: Backend::MeshExternalService,
                name: "x".into(),
                port: None,
            },
        }
    }

    #[test]
    fn listener_overlaps() {
        for (a, b, want) in [
            (("127.0.0.1", 80), ("127.0.0.1", 80), true),
            (("127.0.0.1", 80), ("127.0.0.1", 81), false),
            (("127.0.0.1", 80), ("127.0.0.2", 80), false),
            (("0.0.0.0", 80), ("127.0.0.1", 80), true),
            (("127.0.0.1", 80), ("0.0.0.0", 80), true),
            (("0.0.0.0", 80), ("::1", 80), false),
            (("::", 80), ("127.0.0.1", 80), true),
            (("::1", 80), ("::", 80), true),
            (("::1", 80), ("127.0.0.1", 80), false),
            (("::", 80), ("::", 81), false),
        ] {
            assert_eq!(
                overlaps(&outbound(a.0, a.1), &outbound(b.0, b.1)),
                want,
                "{a:?} {b:?}"
            );
        }
    }
}
