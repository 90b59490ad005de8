//! Gloo ExternalServices, with the ExternalEndpoints they select and the Workspaces their
//! namespaces belong to, as internal services.
//!
//! Each port of an ExternalService becomes one internal service, named `NAME_PORT`, load
//! balanced over the selected ExternalEndpoints: the internal hostname of Gloo's docs. Without
//! selected endpoints the traffic goes to the hosts (or addresses) themselves, each on its own,
//! named `NAME_PORT_HOST` when there are several.

use std::collections::HashMap;

use crate::diag::{Diagnostic, Diagnostics, DocRef};
use crate::istio::translate::{origination, Credentials};
use crate::model::{Cidr, Endpoint, ExternalService, LoadBalancer, ResourceKey};

use super::external_endpoint::Address;
use super::{
    ExternalEndpointResource, GlooExternalServiceResource, GlooPort, TargetPort, WorkspaceResource,
};

/// The Gloo resources of every namespace; only valid ones.
#[derive(Default)]
pub struct Inputs<'a> {
    pub services: Vec<(&'a DocRef, &'a GlooExternalServiceResource)>,
    pub endpoints: Vec<&'a ExternalEndpointResource>,
    pub workspaces: Vec<&'a WorkspaceResource>,
}

/// The workspace a namespace is in: the first Workspace that selects it, else its own.
fn workspace_of<'a>(inputs: &'a Inputs<'_>, namespace: &'a str) -> Workspace<'a> {
    inputs
        .workspaces
        .iter()
        .find(|w| w.spec.selects(namespace))
        .map_or(Workspace::Own(namespace), |w| {
            Workspace::Named(&w.meta.key.name)
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Workspace<'a> {
    Named(&'a str),
    /// A namespace no Workspace selects works on its own.
    Own(&'a str),
}

impl std::fmt::Display for Workspace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workspace::Named(w) => write!(f, "workspace {w:?}"),
            Workspace::Own(ns) => write!(
                f,
                "the workspace of namespace {ns:?} (no Workspace selects it)"
            ),
        }
    }
}

/// Which ExternalService claimed a host or address first in a workspace.
struct Claim<'a> {
    name: &'a str,
    namespace: &'a str,
    doc: &'a DocRef,
}

pub fn services(
    inputs: &Inputs<'_>,
    credentials: &Credentials<'_>,
    out: &mut Vec<Diagnostic>,
) -> Vec<(DocRef, ExternalService)> {
    let mut made = Vec::new();
    let mut hosts: HashMap<(Workspace<'_>, &str), Claim<'_>> = HashMap::new();
    let mut ranges: Vec<(Workspace<'_>, Cidr, Claim<'_>)> = Vec::new();
    // Endpoints are selected within their namespace, by label: indexed by each label they carry.
    let mut endpoints: Labelled<'_> = HashMap::new();
    for e in &inputs.endpoints {
        for (k, v) in &e.meta.labels {
            endpoints
                .entry((e.meta.key.mesh.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(e);
        }
    }
    for (doc, es) in &inputs.services {
        let mut d = Diagnostics::for_doc((*doc).clone());
        let namespace = es.meta.key.mesh.as_str();
        let workspace = workspace_of(inputs, namespace);
        let spec = &es.spec;
        let mut claimed = false;
        let taken = |first: &Claim<'_>, what: String| {
            format!(
                "{what} is already claimed by ExternalService {:?} in namespace {:?} at {}, in {workspace}; an address or host belongs to one ExternalService of a workspace: remove it here, or keep the two in different workspaces",
                first.name, first.namespace, first.doc
            )
        };
        for (i, host) in spec.hosts.iter().enumerate() {
            let path = format!("spec.hosts[{i}]");
            match hosts.get(&(workspace, host.as_str())) {
                Some(first) => {
                    d.error(&path, taken(first, format!("host {host:?}")));
                    claimed = true;
                }
                None => {
                    hosts.insert(
                        (workspace, host.as_str()),
                        Claim {
                            name: &es.meta.key.name,
                            namespace,
                            doc,
                        },
                    );
                }
            }
        }
        for (i, cidr) in spec.addresses.iter().enumerate() {
            let path = format!("spec.addresses[{i}]");
            match ranges
                .iter()
                .find(|(w, other, _)| *w == workspace && other.overlaps(cidr))
            {
                Some((_, other, first)) => {
                    let what = if other == cidr {
                        format!("address {cidr}")
                    } else {
                        format!("address {cidr} (which overlaps {other})")
                    };
                    d.error(&path, taken(first, what));
                    claimed = true;
                }
                None => ranges.push((
                    workspace,
                    *cidr,
                    Claim {
                        name: &es.meta.key.name,
                        namespace,
                        doc,
                    },
                )),
            }
        }
        if !claimed {
            made.extend(
                translate(&endpoints, es, credentials, &mut d)
                    .into_iter()
                    .map(|s| ((*doc).clone(), s)),
            );
        }
        out.extend(d.into_vec());
    }
    made
}

/// Where one group of an ExternalService's hosts or addresses goes.
struct Group {
    endpoints: Vec<Endpoint>,
    hosts: Vec<String>,
    addresses: Vec<Cidr>,
    /// The group's name suffix when the service splits into several.
    label: String,
}

/// ExternalEndpoints by (namespace, label name, label value), in document order.
type Labelled<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<&'a ExternalEndpointResource>>;

fn translate(
    endpoints: &Labelled<'_>,
    es: &GlooExternalServiceResource,
    credentials: &Credentials<'_>,
    d: &mut Diagnostics,
) -> Vec<ExternalService> {
    let namespace = es.meta.key.mesh.as_str();
    let spec = &es.spec;
    let selected: Vec<&ExternalEndpointResource> = match &spec.selector {
        None => Vec::new(),
        Some(labels) if labels.is_empty() => Vec::new(),
        Some(labels) => {
            let (k, v) = &labels[0];
            endpoints
                .get(&(namespace, k.as_str(), v.as_str()))
                .into_iter()
                .flatten()
                .filter(|e| {
                    labels[1..]
                        .iter()
                        .all(|(k, v)| e.meta.labels.iter().any(|(l, w)| l == k && w == v))
                })
                .copied()
                .collect()
        }
    };
    if let Some(labels) = spec.selector.as_ref().filter(|l| !l.is_empty()) {
        if selected.is_empty() {
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            d.warn(
                "spec.selector",
                format!(
                    "selects no ExternalEndpoint in namespace {namespace:?} (labels {}), so traffic goes to the hosts themselves; label the endpoints or fix the selector",
                    shown.join(", ")
                ),
            );
        }
    }
    let mut services = Vec::new();
    for port in &spec.ports {
        let Some(groups) = groups(spec, port, &selected, d) else {
            continue;
        };
        let single = groups.len() == 1;
        for group in groups {
            let name = if single {
                format!("{}_{}", es.meta.key.name, port.number)
            } else {
                format!("{}_{}_{}", es.meta.key.name, port.number, group.label)
            };
            let tls = match &port.tls {
                None => None,
                Some(_) if group.endpoints.is_empty() => {
                    d.error(
                        &format!("{}.clientsideTls", port.path),
                        "cannot originate TLS without endpoints: a wildcard host or an address range goes to what the app named; select ExternalEndpoints, or list exact hosts",
                    );
                    continue;
                }
                Some(t) => {
                    let server_name = match group.hosts.as_slice() {
                        [one] if !one.starts_with('*') => Some(one.clone()),
                        _ => None,
                    };
                    match origination(
                        t,
                        server_name,
                        &spec.subject_alt_names,
                        namespace,
                        credentials,
                        d,
                    ) {
                        Some(tls) => Some(tls),
                        None => continue,
                    }
                }
            };
            services.push(ExternalService {
                key: ResourceKey {
                    mesh: namespace.to_string(),
                    name,
                },
                port: port.number,
                protocol: port.protocol,
                endpoints: group.endpoints,
                tls,
                hosts: group.hosts,
                addresses: group.addresses,
                load_balancer: LoadBalancer::RoundRobin,
                endpoint_weights: Vec::new(),
            });
        }
    }
    services
}

/// The groups one port of `spec` makes; `None` after an error.
fn groups(
    spec: &super::GlooExternalServiceSpec,
    port: &GlooPort,
    selected: &[&ExternalEndpointResource],
    d: &mut Diagnostics,
) -> Option<Vec<Group>> {
    if !selected.is_empty() {
        let mut endpoints = Vec::new();
        let mut failed = false;
        for ee in selected {
            let Some(address) = &ee.spec.address else {
                continue;
            };
            let number = match endpoint_port(ee, port) {
                Ok(n) => n,
                Err(message) => {
                    d.error(&port.path, message);
                    failed = true;
                    continue;
                }
            };
            endpoints.push(match address {
                Address::Ip(ip) => Endpoint::Ip {
                    ip: *ip,
                    port: number,
                },
                Address::Dns(host) => Endpoint::Dns {
                    host: host.clone(),
                    port: number,
                },
                Address::Unix(path) => Endpoint::Unix { path: path.clone() },
            });
        }
        if failed {
            return None;
        }
        return Some(vec![Group {
            endpoints,
            hosts: spec.hosts.clone(),
            addresses: spec.addresses.clone(),
            label: String::new(),
        }]);
    }
    let number = match &port.target {
        None => port.number,
        Some(TargetPort::Number(n)) => *n,
        Some(TargetPort::Name(n)) => {
            d.error(
                &format!("{}.targetPort.name", port.path),
                format!("{n:?} names a port of the ExternalEndpoints, and this service selects none; give targetPort.number, or select ExternalEndpoints"),
            );
            return None;
        }
    };
    let mut groups = Vec::new();
    let (wildcards, exact): (Vec<&String>, Vec<&String>) =
        spec.hosts.iter().partition(|h| h.starts_with('*'));
    for host in exact {
        groups.push(Group {
            endpoints: vec![Endpoint::Dns {
                host: host.clone(),
                port: number,
            }],
            hosts: vec![host.clone()],
            addresses: Vec::new(),
            label: host.clone(),
        });
    }
    if !wildcards.is_empty() {
        groups.push(Group {
            endpoints: Vec::new(),
            hosts: wildcards.iter().map(|h| (*h).clone()).collect(),
            addresses: Vec::new(),
            label: wildcards[0].to_string(),
        });
    }
    let (ranges, single): (Vec<&Cidr>, Vec<&Cidr>) =
        spec.addresses.iter().partition(|c| !c.is_single());
    for cidr in single {
        groups.push(Group {
            endpoints: vec![Endpoint::Ip {
                ip: cidr.ip,
                port: number,
            }],
            hosts: Vec::new(),
            addresses: vec![*cidr],
            label: cidr.ip.to_string().replace(':', "-"),
        });
    }
    if !ranges.is_empty() {
        groups.push(Group {
            endpoints: Vec::new(),
            hosts: Vec::new(),
            addresses: ranges.iter().map(|c| **c).collect(),
            label: ranges[0].to_string().replace([':', '/'], "-"),
        });
    }
    Some(groups)
}

/// The port of `ee` that the service port goes to: `targetPort` by name or number, else the
/// endpoint's port of the same name, of the same number, or its only port.
fn endpoint_port(ee: &ExternalEndpointResource, port: &GlooPort) -> Result<u16, String> {
    let ports = &ee.spec.ports;
    if matches!(ee.spec.address, Some(Address::Unix(_))) {
        return Ok(0);
    }
    let found = match &port.target {
        Some(TargetPort::Name(n)) => ports.iter().find(|(name, _)| name == n).map(|(_, p)| *p),
        Some(TargetPort::Number(n)) if ports.is_empty() => Some(*n),
        Some(TargetPort::Number(n)) => ports.iter().find(|(_, p)| p == n).map(|(_, p)| *p),
        None if ports.is_empty() => Some(port.number),
        None => ports
            .iter()
            .find(|(name, _)| *name == port.name)
            .or_else(|| ports.iter().find(|(_, p)| *p == port.number))
            .or(if ports.len() == 1 {
                ports.first()
            } else {
                None
            })
            .map(|(_, p)| *p),
    };
    found.ok_or_else(|| {
        let listed: Vec<String> = ports
            .iter()
            .map(|(n, p)| if n.is_empty() { p.to_string() } else { format!("{n} ({p})") })
            .collect();
        let wanted = match &port.target {
            Some(TargetPort::Name(n)) => format!("port named {n:?}"),
            Some(TargetPort::Number(n)) => format!("port {n}"),
            None => format!("port named {:?} or numbered {}", port.name, port.number),
        };
        format!(
            "ExternalEndpoint {:?} has no {wanted} (its ports are {}); every selected endpoint must have the port: add it, or set targetPort",
            ee.meta.key.name,
            listed.join(", ")
        )
    })
}
