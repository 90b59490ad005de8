//! ServiceEntries, VirtualServices and DestinationRules of one namespace, together, as internal
//! services.
//!
//! Each port of a ServiceEntry is followed for each of its hosts: the VirtualService route that
//! takes that host and port (if any) picks the destination host and port, the ServiceEntry of
//! the destination gives the endpoints, and the DestinationRule of the destination host gives
//! the TLS to originate and the load balancing. Hosts of one port that end up going to the same
//! place are one internal service, named `ENTRY_PORT`; when they go to different places (DNS
//! resolution without endpoints, or routes for some hosts only) each is its own, named
//! `ENTRY_PORT_HOST`.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::diag::{Diagnostic, Diagnostics, DocRef};
use crate::model::{
    ClientIdentity, Endpoint, ExternalService, LoadBalancer, Material, Protocol, ResourceKey,
    SanMatch, TlsOrigination, VerificationMode,
};
use crate::resource::{Pem, SecretResource};

use super::destination_rule::{ClientTls, DestinationRuleResource, TlsMode};
use super::host_covers;
use super::service_entry::{EndpointAddress, Resolution, SePort, ServiceEntryResource};
use super::virtual_service::{Route, RouteKind, VirtualServiceResource};

/// The Istio resources of every namespace, each with its document; only valid ones.
#[derive(Default)]
pub struct Inputs<'a> {
    pub entries: Vec<(&'a DocRef, &'a ServiceEntryResource)>,
    pub rules: Vec<(&'a DocRef, &'a DestinationRuleResource)>,
    pub virtual_services: Vec<(&'a DocRef, &'a VirtualServiceResource)>,
}

/// Resources by the hosts they name, per namespace: exact names by lookup, wildcards in order.
struct Hosts<'a> {
    exact: HashMap<(&'a str, &'a str), Vec<usize>>,
    wild: HashMap<&'a str, Vec<(&'a str, usize)>>,
}

impl<'a> Hosts<'a> {
    fn new(items: impl Iterator<Item = (&'a str, &'a str, usize)>) -> Self {
        let mut hosts = Hosts {
            exact: HashMap::new(),
            wild: HashMap::new(),
        };
        for (mesh, host, i) in items {
            if host.starts_with('*') {
                hosts.wild.entry(mesh).or_default().push((host, i));
            } else {
                hosts.exact.entry((mesh, host)).or_default().push(i);
            }
        }
        hosts
    }

    /// What names `host` exactly, in order, then the wildcards that cover it, in order, each
    /// with the pattern it matched by.
    fn matching<'s>(
        &'s self,
        mesh: &'s str,
        host: &'s str,
    ) -> impl Iterator<Item = (&'s str, usize)> + 's {
        let exact = self
            .exact
            .get_key_value(&(mesh, host))
            .into_iter()
            .flat_map(|((_, h), list)| list.iter().map(move |i| (*h, *i)));
        let wild = self
            .wild
            .get(mesh)
            .into_iter()
            .flatten()
            .filter(move |(p, _)| host_covers(p, host))
            .copied();
        exact.chain(wild)
    }

    /// Whether anything names a host that `pattern` covers or that covers it.
    fn touches(&self, mesh: &str, pattern: &str) -> bool {
        let wild = self.wild.get(mesh).into_iter().flatten();
        if pattern.starts_with('*') {
            wild.clone()
                .any(|(p, _)| host_covers(p, pattern) || host_covers(pattern, p))
                || self
                    .exact
                    .keys()
                    .any(|(m, h)| *m == mesh && host_covers(pattern, h))
        } else {
            self.exact.contains_key(&(mesh, pattern))
                || wild.clone().any(|(p, _)| host_covers(p, pattern))
        }
    }
}

/// The inputs indexed by host, built once.
struct Indexed<'a> {
    entries: Hosts<'a>,
    virtual_services: Hosts<'a>,
    rules: Hosts<'a>,
}

impl<'a> Indexed<'a> {
    fn new(inputs: &'a Inputs<'a>) -> Self {
        Indexed {
            entries: Hosts::new(inputs.entries.iter().enumerate().flat_map(|(i, (_, e))| {
                e.spec
                    .hosts
                    .iter()
                    .map(move |h| (e.meta.key.mesh.as_str(), h.as_str(), i))
            })),
            virtual_services: Hosts::new(inputs.virtual_services.iter().enumerate().flat_map(
                |(i, (_, vs))| {
                    vs.spec
                        .hosts
                        .iter()
                        .map(move |h| (vs.meta.key.mesh.as_str(), h.as_str(), i))
                },
            )),
            rules: Hosts::new(inputs.rules.iter().enumerate().filter_map(|(i, (_, r))| {
                Some((r.meta.key.mesh.as_str(), r.spec.host.as_deref()?, i))
            })),
        }
    }
}

/// Finds the Secret `credentialName` names for a rule in `mesh` (its namespace).
pub type Credentials<'a> = dyn Fn(&str, &str) -> Result<Option<&'a SecretResource>, String> + 'a;

/// Where the traffic of one host on one port goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    protocol: Protocol,
    endpoints: Vec<Endpoint>,
    tls: Option<TlsOrigination>,
    load_balancer: LoadBalancer,
    endpoint_weights: Vec<u32>,
}

/// The internal services, each with the document of the entry that made it.
pub fn services(
    inputs: &Inputs<'_>,
    credentials: &Credentials<'_>,
    out: &mut Vec<Diagnostic>,
) -> Vec<(DocRef, ExternalService)> {
    let mut report = Report::default();
    let index = Indexed::new(inputs);
    let mut used_routes: HashSet<(usize, usize)> = HashSet::new();
    let mut used_tls: HashSet<(usize, u16)> = HashSet::new();
    let mut made = Vec::new();
    // Which entry first opened a host (or address) on a port, per namespace.
    let mut opened: HashMap<(&str, String, u16), (&str, &DocRef)> = HashMap::new();

    for (doc, entry) in &inputs.entries {
        let mesh = entry.meta.key.mesh.as_str();
        let spec = &entry.spec;
        for (pi, port) in spec.ports.iter().enumerate() {
            let opens = spec
                .hosts
                .iter()
                .cloned()
                .chain(spec.addresses.iter().map(ToString::to_string));
            let mut taken = false;
            for (hi, host) in opens.enumerate() {
                let key = (mesh, host.clone(), port.number);
                match opened.get(&key) {
                    Some((first, at)) => {
                        let what = if hi < spec.hosts.len() {
                            format!("spec.hosts[{hi}]")
                        } else {
                            format!("spec.addresses[{}]", hi - spec.hosts.len())
                        };
                        report.at(doc).error(
                            &what,
                            format!("{host} port {} is already opened by ServiceEntry {first:?} at {at}; list each host and port in one entry of the namespace", port.number),
                        );
                        taken = true;
                    }
                    None => {
                        opened.insert(key, (entry.meta.key.name.as_str(), doc));
                    }
                }
            }
            if taken {
                continue;
            }
            let mut groups: Vec<(Target, Vec<String>)> = Vec::new();
            let mut failed = false;
            for host in &spec.hosts {
                let target = follow(
                    inputs,
                    &index,
                    (doc, entry),
                    port,
                    host,
                    credentials,
                    &mut used_routes,
                    &mut used_tls,
                    &mut report,
                );
                let Some(target) = target else {
                    failed = true;
                    continue;
                };
                match groups.iter_mut().find(|(t, _)| *t == target) {
                    Some((_, hosts)) => hosts.push(host.clone()),
                    None => groups.push((target, vec![host.clone()])),
                }
            }
            if failed {
                continue;
            }
            if groups.len() > 1 && !spec.addresses.is_empty() {
                report.at(doc).error(
                    &format!("spec.ports[{pi}]"),
                    format!(
                        "the hosts of port {} go to different places, so the entry's addresses cannot stand for one of them; give the addresses their own entry",
                        port.number
                    ),
                );
                continue;
            }
            let single = groups.len() == 1;
            for (target, hosts) in groups {
                let name = if single {
                    format!("{}_{}", entry.meta.key.name, port.number)
                } else {
                    format!("{}_{}_{}", entry.meta.key.name, port.number, hosts[0])
                };
                made.push((
                    (*doc).clone(),
                    ExternalService {
                        key: ResourceKey {
                            mesh: mesh.to_string(),
                            name,
                        },
                        port: port.number,
                        protocol: target.protocol,
                        endpoints: target.endpoints,
                        tls: target.tls,
                        hosts,
                        addresses: spec.addresses.clone(),
                        load_balancer: target.load_balancer,
                        endpoint_weights: target.endpoint_weights,
                    },
                ));
            }
        }
    }

    for (vi, (doc, vs)) in inputs.virtual_services.iter().enumerate() {
        let mesh = vs.meta.key.mesh.as_str();
        for host in &vs.spec.hosts {
            if !index.entries.touches(mesh, host) {
                report.at(doc).warn(
                    "spec.hosts",
                    format!("no ServiceEntry in namespace {mesh:?} has host {host:?}, so its routes have no effect; add a ServiceEntry for it"),
                );
            }
        }
        for (ri, route) in vs.spec.routes.iter().enumerate() {
            if !used_routes.contains(&(vi, ri)) {
                report.at(doc).warn(
                    &route.path,
                    format!(
                        "takes no traffic: no port of a ServiceEntry for these hosts{} matches it; fix the match or add the port",
                        if route.kind == RouteKind::Http { " speaks HTTP and" } else { "" }
                    ),
                );
            }
        }
    }
    for (ri, (doc, rule)) in inputs.rules.iter().enumerate() {
        let spec = &rule.spec;
        let Some(host) = &spec.host else { continue };
        let mesh = rule.meta.key.mesh.as_str();
        if !index.entries.touches(mesh, host) {
            report.at(doc).warn(
                "spec.host",
                format!("no ServiceEntry in namespace {mesh:?} has host {host:?}, so the rule has no effect; add a ServiceEntry for it"),
            );
            continue;
        }
        let tls_ports = std::iter::once((0u16, &spec.default))
            .chain(spec.ports.iter().map(|(p, policy)| (*p, policy)));
        for (port, policy) in tls_ports {
            let Some(tls) = policy.tls.as_ref().filter(|t| t.mode != TlsMode::Disable) else {
                continue;
            };
            let used = if port == 0 {
                used_tls
                    .iter()
                    .any(|(r, p)| *r == ri && !spec.ports.iter().any(|(q, _)| q == p))
            } else {
                used_tls.contains(&(ri, port))
            };
            if !used {
                report.at(doc).warn(
                    &tls.path,
                    "originates no TLS: no plain-text (HTTP or TCP) port is sent to this host and port; apps that speak TLS themselves are passed through as they are",
                );
            }
        }
    }
    report.into(out);
    made
}

/// Diagnostics by document, since problems found here belong to several.
#[derive(Default)]
struct Report(BTreeMap<DocRef, Diagnostics>);

impl Report {
    fn at(&mut self, doc: &DocRef) -> &mut Diagnostics {
        self.0
            .entry(doc.clone())
            .or_insert_with(|| Diagnostics::for_doc(doc.clone()))
    }

    /// The diagnostics, each once: a route taken by several ports reports its problem once.
    fn into(self, out: &mut Vec<Diagnostic>) {
        for (_, d) in self.0 {
            let mut seen: Vec<Diagnostic> = Vec::new();
            for item in d.into_vec() {
                if !seen.contains(&item) {
                    seen.push(item);
                }
            }
            out.extend(seen);
        }
    }
}

/// Where the traffic of `host` on `port` of `entry` goes; `None` after an error.
#[allow(clippy::too_many_arguments)]
fn follow<'a>(
    inputs: &Inputs<'a>,
    index: &Indexed<'_>,
    (doc, entry): (&DocRef, &ServiceEntryResource),
    port: &SePort,
    host: &str,
    credentials: &Credentials<'_>,
    used_routes: &mut HashSet<(usize, usize)>,
    used_tls: &mut HashSet<(usize, u16)>,
    report: &mut Report,
) -> Option<Target> {
    let mesh = entry.meta.key.mesh.as_str();
    let route = find_route(inputs, index, mesh, host, port);
    let (dest_host, dest_port, dest_entry, route_at) = match route {
        None => (host.to_string(), port, entry, None),
        Some((vi, ri, route)) => {
            used_routes.insert((vi, ri));
            let vs_doc = inputs.virtual_services[vi].0;
            let dest = &route.destination;
            // Without a port, a destination with one port is sent to that one, as Istio does;
            // otherwise to the port the app called.
            let only = index
                .entries
                .matching(mesh, &dest.host)
                .next()
                .map(|(_, i)| &inputs.entries[i].1.spec.ports)
                .filter(|ports| ports.len() == 1)
                .map(|ports| ports[0].number);
            let number = dest.port.or(only).unwrap_or(port.number);
            let found = index.entries.matching(mesh, &dest.host).find_map(|(_, i)| {
                let e = inputs.entries[i].1;
                e.spec
                    .ports
                    .iter()
                    .find(|p| p.number == number)
                    .map(|p| (e, p))
            });
            let Some((dest_entry, dest_port)) = found else {
                report.at(vs_doc).error(
                    &dest.path,
                    format!("no ServiceEntry in namespace {mesh:?} has host {:?} with port {number}; add the port to the entry for that host, or route to one that has it", dest.host),
                );
                return None;
            };
            let elsewhere = dest.host != host || dest_port.number != port.number;
            if elsewhere && dest_entry.spec.resolution == Resolution::None {
                report.at(vs_doc).error(
                    &dest.path,
                    format!(
                        "routes to {}:{number}, whose ServiceEntry has resolution NONE: that sends traffic to the host and port the app called, not to the route's; give the entry for {:?} resolution DNS or STATIC",
                        dest.host, dest.host
                    ),
                );
                return None;
            }
            (
                dest.host.clone(),
                dest_port,
                dest_entry,
                Some((vs_doc, dest)),
            )
        }
    };
    let endpoints = endpoints(dest_entry, dest_port, &dest_host);
    let endpoint_weights = weights(dest_entry, &endpoints);
    let rule = find_rule(inputs, index, mesh, &dest_host);
    let policy = rule.map(|(_, _, r)| r.spec.policy(dest_port.number));
    let load_balancer = policy.and_then(|p| p.load_balancer).unwrap_or_default();
    let mut tls = None;
    let client_tls = policy
        .and_then(|p| p.tls.as_ref())
        .filter(|t| t.mode != TlsMode::Disable);
    // The app's own TLS is passed through as it is, never wrapped again.
    if let (Some(t), Some((ri, rule_doc, _))) = (client_tls, rule) {
        if port.protocol != Protocol::Tls {
            used_tls.insert((ri, dest_port.number));
            if endpoints.is_empty() {
                report.at(rule_doc).error(
                    &t.path,
                    format!("cannot originate TLS to {dest_host:?}: with resolution NONE there is no endpoint to originate it to; use resolution DNS (or STATIC with endpoints) in its ServiceEntry"),
                );
                return None;
            }
            tls = Some(origination(
                t,
                // A wildcard names no one server: each endpoint's own name is sent instead.
                Some(dest_host.clone()).filter(|h| !h.starts_with('*')),
                &dest_entry.spec.subject_alt_names,
                mesh,
                credentials,
                report.at(rule_doc),
            )?);
        }
    }
    if tls.is_none() && port.protocol.is_http() && dest_port.protocol == Protocol::Tls {
        let (at_doc, at_path) = match route_at {
            Some((vs_doc, dest)) => (vs_doc, dest.path.clone()),
            None => (doc, format!("spec.ports[{}]", port_index(entry, port))),
        };
        report.at(at_doc).error(
            &at_path,
            format!(
                "sends plain HTTP to {dest_host}:{}, which speaks TLS ({}), and no DestinationRule originates TLS there; add one for host {dest_host:?} with tls.mode SIMPLE on port {}",
                dest_port.number,
                "HTTPS",
                dest_port.number
            ),
        );
        return None;
    }
    Some(Target {
        protocol: port.protocol,
        endpoints,
        tls,
        load_balancer,
        endpoint_weights,
    })
}

fn port_index(entry: &ServiceEntryResource, port: &SePort) -> usize {
    entry
        .spec
        .ports
        .iter()
        .position(|p| p.number == port.number)
        .unwrap_or(0)
}

/// The first route that takes `host` on `port`: from the VirtualService whose hosts name it
/// exactly, else from the first whose wildcard covers it.
fn find_route<'a>(
    inputs: &'a Inputs<'a>,
    index: &Indexed<'_>,
    mesh: &str,
    host: &str,
    port: &SePort,
) -> Option<(usize, usize, &'a Route)> {
    let kinds: &[RouteKind] = match port.protocol {
        p if p.is_http() => &[RouteKind::Http],
        Protocol::Tls => &[RouteKind::Tls, RouteKind::Tcp],
        _ => &[RouteKind::Tcp],
    };
    // The VirtualService naming the host exactly, else the one with the narrowest wildcard.
    let exact = index
        .virtual_services
        .matching(mesh, host)
        .find(|(p, _)| !p.starts_with('*'));
    let (_, vi) = exact.or_else(|| {
        index
            .virtual_services
            .matching(mesh, host)
            .max_by_key(|(p, i)| (p.len(), std::cmp::Reverse(*i)))
    })?;
    let vs = inputs.virtual_services[vi].1;
    for kind in kinds {
        for (ri, route) in vs.spec.routes.iter().enumerate() {
            if route.kind != *kind {
                continue;
            }
            let takes = route.matches.is_empty()
                || route.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == port.number)
                        && (route.kind != RouteKind::Tls
                            || m.sni_hosts.iter().any(|s| host_covers(s, host)))
                });
            if takes {
                return Some((vi, ri, route));
            }
        }
    }
    None
}

/// The rule for `host`: the one naming it exactly, else the most specific wildcard.
fn find_rule<'a>(
    inputs: &'a Inputs<'a>,
    index: &Indexed<'_>,
    mesh: &str,
    host: &str,
) -> Option<(usize, &'a DocRef, &'a DestinationRuleResource)> {
    let exact = index
        .rules
        .matching(mesh, host)
        .find(|(p, _)| !p.starts_with('*'));
    let (_, i) = exact.or_else(|| {
        index
            .rules
            .matching(mesh, host)
            .max_by_key(|(p, i)| (p.len(), std::cmp::Reverse(*i)))
    })?;
    let (doc, rule) = inputs.rules[i];
    Some((i, doc, rule))
}

/// The entry's endpoint weights when they differ (an endpoint without one weighs 1); empty when
/// all weigh the same, or the endpoints are not the entry's own.
fn weights(entry: &ServiceEntryResource, endpoints: &[Endpoint]) -> Vec<u32> {
    let listed = &entry.spec.endpoints;
    if listed.len() != endpoints.len() {
        return Vec::new();
    }
    let weights: Vec<u32> = listed.iter().map(|e| e.weight.unwrap_or(1)).collect();
    if weights.windows(2).all(|w| w[0] == w[1]) {
        Vec::new()
    } else {
        weights
    }
}

fn endpoints(entry: &ServiceEntryResource, port: &SePort, host: &str) -> Vec<Endpoint> {
    let spec = &entry.spec;
    let target = port.target_port.unwrap_or(port.number);
    match spec.resolution {
        Resolution::None => Vec::new(),
        Resolution::Dns if spec.endpoints.is_empty() => vec![Endpoint::Dns {
            host: host.to_string(),
            port: target,
        }],
        Resolution::Dns | Resolution::Static => spec
            .endpoints
            .iter()
            .map(|e| {
                let port = e.ports.get(&port.name).copied().unwrap_or(target);
                match &e.address {
                    EndpointAddress::Ip(ip) => Endpoint::Ip { ip: *ip, port },
                    EndpointAddress::Dns(h) => Endpoint::Dns {
                        host: h.clone(),
                        port,
                    },
                    EndpointAddress::Unix(path) => Endpoint::Unix { path: path.clone() },
                }
            })
            .collect(),
    }
}

/// Istio's key names for a Secret named by `credentialName`: an Opaque Secret's first, then
/// a `kubernetes.io/tls` Secret's.
const CERT_KEYS: &[&str] = &["cert", "tls.crt"];
const KEY_KEYS: &[&str] = &["key", "tls.key"];
const CA_KEYS: &[&str] = &["cacert", "ca.crt"];

/// The TLS `t` asks for: `server_name` unless `t.sni` says otherwise (`None`: each endpoint's
/// own name), `default_sans` unless `t` lists its own; `None` after an error, reported in `d`.
pub(crate) fn origination(
    t: &ClientTls,
    server_name: Option<String>,
    default_sans: &[String],
    mesh: &str,
    credentials: &Credentials<'_>,
    d: &mut Diagnostics,
) -> Option<TlsOrigination> {
    let sans = if t.subject_alt_names.is_empty() {
        default_sans
    } else {
        &t.subject_alt_names
    };
    let mut ca_cert = t.ca_certificates.as_ref().map(Material::file);
    let mut client_cert = match (&t.client_certificate, &t.private_key, t.mode) {
        (Some(cert), Some(key), TlsMode::Mutual) => Some(ClientIdentity {
            cert: Material::file(cert),
            key: Material::file(key),
        }),
        _ => None,
    };
    if let Some(name) = &t.credential_name {
        let path = format!("{}.credentialName", t.path);
        let secret = match credentials(mesh, name) {
            Ok(Some(s)) => s,
            // The Secret's own errors are reported at its document.
            Ok(None) => return None,
            Err(message) => {
                d.error(&path, message);
                return None;
            }
        };
        let read = |keys: &[&str], want: Pem, d: &mut Diagnostics| -> Option<Option<Material>> {
            match secret.entry(keys) {
                None => Some(None),
                Some((key, bytes)) if want.found_in(bytes) => Some(Some(Material::inline(
                    format!("secret {name} {key}"),
                    bytes.to_vec(),
                ))),
                Some((key, _)) => {
                    d.error(
                        &path,
                        format!("Secret {name:?} key {key:?} holds {}", want.missing()),
                    );
                    None
                }
            }
        };
        ca_cert = read(CA_KEYS, Pem::Certificates, d)?;
        if ca_cert.is_none() {
            if let Ok(Some(ca)) = credentials(mesh, &format!("{name}-cacert")) {
                ca_cert = match ca.entry(CA_KEYS) {
                    Some((key, bytes)) if Pem::Certificates.found_in(bytes) => Some(
                        Material::inline(format!("secret {name}-cacert {key}"), bytes.to_vec()),
                    ),
                    _ => None,
                };
            }
        }
        if t.mode == TlsMode::Mutual {
            let cert = read(CERT_KEYS, Pem::Certificates, d)?;
            let key = read(KEY_KEYS, Pem::PrivateKey, d)?;
            match cert.zip(key) {
                Some((cert, key)) => client_cert = Some(ClientIdentity { cert, key }),
                None => {
                    d.error(
                        &path,
                        format!("Secret {name:?} has no client certificate and key for mode MUTUAL: give it tls.crt and tls.key (or cert and key)"),
                    );
                    return None;
                }
            }
        }
    }
    Some(TlsOrigination {
        min_version: None,
        max_version: None,
        allow_renegotiation: false,
        mode: if t.insecure_skip_verify {
            VerificationMode::SkipAll
        } else {
            VerificationMode::Secured
        },
        server_name: t.sni.clone().or(server_name),
        subject_alt_names: sans.iter().cloned().map(SanMatch::Exact).collect(),
        ca_cert,
        client_cert,
    })
}
