//! `VirtualService.spec`: where traffic to a host goes, by port (HTTP and TCP) or by port and
//! SNI (TLS). Sluice reads the routes that choose a destination; routes that change requests
//! (rewrites, retries, faults, mirrors) are refused by name.

use crate::diag::Diagnostics;
use crate::node::At;

#[derive(Debug, Clone)]
pub struct VirtualServiceResource {
    pub meta: crate::resource::Meta,
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    /// In order, as Istio tries them: the first that matches decides.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Tls,
    Tcp,
}

impl RouteKind {
    pub fn field(self) -> &'static str {
        match self {
            RouteKind::Http => "http",
            RouteKind::Tls => "tls",
            RouteKind::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// `spec.http[0]`, for errors found when resolving it.
    pub path: String,
    pub kind: RouteKind,
    /// Any of these; none matches every port.
    pub matches: Vec<Match>,
    pub destination: Destination,
}

#[derive(Debug, Clone, Default)]
pub struct Match {
    pub port: Option<u16>,
    /// TLS routes: the SNI names (or `*.suffix`) this match takes.
    pub sni_hosts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub path: String,
    pub host: String,
    pub port: Option<u16>,
}

const HTTP_UNSUPPORTED: &[&str] = &[
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirror_percent",
    "mirrorPercent",
    "corsPolicy",
    "headers",
];

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> Option<VirtualServiceSpec> {
    let mut s = spec.obj(d)?;
    let mut out = VirtualServiceSpec::default();
    if let Some(list) = s.required("hosts", d) {
        out.hosts = super::host_list(&list, d);
    }
    if let Some(g) = s.get("gateways") {
        for item in g.list(d) {
            match item.text(d) {
                Some("mesh") | None => {}
                Some(other) => d.error(
                    item.path(),
                    format!("{other:?}: Sluice has no Istio gateways, its proxy is the egress point; remove it (keep only mesh) and route to the external host directly"),
                ),
            }
        }
    }
    if let Some(e) = s.get("exportTo") {
        d.warn(
            e.path(),
            "has no effect: every proxy that serves this namespace follows the routes; remove it to silence this",
        );
    }
    let mut any = false;
    for kind in [RouteKind::Http, RouteKind::Tls, RouteKind::Tcp] {
        let Some(list) = s.get(kind.field()) else {
            continue;
        };
        any = true;
        for item in list.list(d) {
            if let Some(r) = route(&item, kind, &out.hosts, d) {
                out.routes.push(r);
            }
        }
    }
    if !any {
        d.error(
            "spec",
            "must have http, tls or tcp routes; a VirtualService without routes changes nothing",
        );
    }
    s.finish(d);
    Some(out)
}

fn route(at: &At<'_>, kind: RouteKind, hosts: &[String], d: &mut Diagnostics) -> Option<Route> {
    let mut r = at.obj(d)?;
    r.allow("name");
    let mut matches = Vec::new();
    match r.get("match") {
        Some(list) => {
            for m in list.list(d) {
                if let Some(m) = route_match(&m, kind, hosts, d) {
                    matches.push(m);
                }
            }
        }
        None if kind == RouteKind::Tls => d.error(
            &r.child_path("match"),
            "is required for a TLS route: give the sniHosts it takes",
        ),
        None => {}
    }
    let destinations: Vec<Destination> = match r.required("route", d) {
        Some(list) => {
            let items = list.list(d);
            if items.len() > 1 {
                d.error(
                    list.path(),
                    "lists several destinations: Sluice sends a route to one destination; keep one, or split the hosts into routes of their own",
                );
            }
            items.iter().filter_map(|i| destination(i, d)).collect()
        }
        None => Vec::new(),
    };
    if kind == RouteKind::Http {
        for key in HTTP_UNSUPPORTED {
            r.refuse(
                key,
                "is not supported: Sluice's routes choose a destination and do not change requests; remove it",
                d,
            );
        }
        for key in ["retries", "timeout"] {
            if let Some(v) = r.get(key) {
                d.warn(
                    v.path(),
                    "is not applied: Sluice uses its --connect-timeout and --response-timeout; remove it to silence this",
                );
            }
        }
    }
    r.finish(d);
    let destination = destinations.into_iter().next()?;
    Some(Route {
        path: at.path().to_string(),
        kind,
        matches,
        destination,
    })
}

fn route_match(
    at: &At<'_>,
    kind: RouteKind,
    hosts: &[String],
    d: &mut Diagnostics,
) -> Option<Match> {
    let mut m = at.obj(d)?;
    m.allow("name");
    let mut out = Match {
        port: m.get("port").and_then(|p| p.port(d)),
        ..Match::default()
    };
    if kind == RouteKind::Tls {
        match m.required("sniHosts", d) {
            Some(list) => {
                for item in list.list(d) {
                    let Some(h) = super::host_pattern(&item, d) else {
                        continue;
                    };
                    if !hosts.is_empty() && !hosts.iter().any(|v| super::host_covers(v, &h)) {
                        d.error(
                            item.path(),
                            format!(
                                "{h:?} is not one of the VirtualService's hosts ({}); every SNI host must be one of them",
                                hosts.join(", ")
                            ),
                        );
                        continue;
                    }
                    out.sni_hosts.push(h);
                }
            }
            None => return None,
        }
    }
    let others: &[&str] = match kind {
        RouteKind::Http => &[
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "queryParams",
            "ignoreUriCase",
            "withoutHeaders",
            "sourceLabels",
            "sourceNamespace",
            "gateways",
            "statPrefix",
        ],
        RouteKind::Tls | RouteKind::Tcp => &[
            "destinationSubnets",
            "sourceLabels",
            "sourceNamespace",
            "gateways",
        ],
    };
    for key in others {
        m.refuse(
            key,
            match kind {
                RouteKind::Tls => {
                    "is not supported: Sluice matches TLS routes by port and sniHosts; remove it"
                }
                _ => "is not supported: Sluice matches routes by port; remove it",
            },
            d,
        );
    }
    m.finish(d);
    Some(out)
}

fn destination(at: &At<'_>, d: &mut Diagnostics) -> Option<Destination> {
    let mut r = at.obj(d)?;
    if let Some(w) = r.get("weight") {
        match w.value.as_u64() {
            Some(0..=100) => {}
            _ => d.error(w.path(), "must be a whole number from 0 to 100"),
        }
    }
    r.refuse(
        "headers",
        "is not supported: Sluice's routes do not change requests; remove it",
        d,
    );
    let dest = r.required("destination", d).and_then(|dest| {
        let mut dest_obj = dest.obj(d)?;
        let host = dest_obj
            .required("host", d)
            .and_then(|h| super::host_pattern(&h, d));
        let port = dest_obj.get("port").and_then(|p| {
            let mut p = p.obj(d)?;
            let n = p.required("number", d).and_then(|n| n.port(d));
            p.finish(d);
            n
        });
        dest_obj.refuse(
            "subset",
            "Sluice has no subsets: endpoints are not told apart by label; remove it",
            d,
        );
        dest_obj.finish(d);
        let host = host?;
        if host.starts_with("*.") {
            d.error(
                &format!("{}.host", dest.path()),
                format!("{host:?}: a destination must be one host, not a wildcard"),
            );
            return None;
        }
        Some(Destination {
            path: dest.path().to_string(),
            host,
            port,
        })
    });
    r.finish(d);
    dest
}
