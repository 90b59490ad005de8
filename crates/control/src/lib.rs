#![forbid(unsafe_code)]
//! Compiles a checked registry into the configuration one proxy runs, and serves the registry's
//! REST API.

pub mod catalog;
pub mod config_server;
pub mod naming;
pub mod server;
pub mod vip;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use sluice_api::model::{Cidr, ExternalService, OutboundTrafficPolicy, ResourceKey};
use sluice_api::Registry;

/// Everything a proxy enforces, as one immutable snapshot. `Serialize` is the `/config_dump`
/// view: key material is shown only by origin and length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    pub services: BTreeMap<String, Arc<ExternalService>>,
    /// Set when a resource (a Kuma Mesh) decides it; otherwise the proxy keeps its own setting.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// What the built-in DNS answers and the transparent listener accepts, by address. Shared
    /// by the configs of one view: at 10,000 services a copy is several MiB.
    pub virtual_ips: Arc<Vec<VirtualIp>>,
    /// Where VIPs come from: an answer from outside that points in here is dropped.
    pub vip_ranges: Vec<Cidr>,
}

/// One VIP: the names that resolve to it, and the service behind each port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualIp {
    pub ip: std::net::IpAddr,
    pub names: Vec<String>,
    /// Port the app calls to the label of the service (a key of [`ProxyConfig::services`]),
    /// in port order, each port once. A list, not a map: most VIPs have one port, and a map
    /// takes a node of eleven slots for it, 3 MiB at 10,000 services.
    #[serde(serialize_with = "ports_as_map")]
    pub ports: Vec<(u16, String)>,
}

/// `/config_dump` shows a VIP's ports as an object, port to service.
fn ports_as_map<S: serde::Serializer>(ports: &[(u16, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(ports.iter().map(|(port, service)| (port, service)))
}

/// A plaintext listener for the app, bound to one external service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    /// `DATAPLANE/outbound/PORT`, stable across reloads so logs and metrics can follow it.
    pub name: String,
    /// The Dataplane that declared it.
    #[serde(skip)]
    pub dataplane: ResourceKey,
    pub address: SocketAddr,
    #[serde(serialize_with = "serialize_label")]
    pub service: Arc<ExternalService>,
}

fn serialize_label<S: serde::Serializer>(
    service: &Arc<ExternalService>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&service_label(&service.key))
}

/// Key of a service in [`ProxyConfig::services`] and in logs and metrics: `NAME` in the
/// default mesh, `MESH/NAME` elsewhere.
pub fn service_label(key: &ResourceKey) -> String {
    if key.mesh == "default" {
        key.name.clone()
    } else {
        format!("{}/{}", key.mesh, key.name)
    }
}

/// Every outbound of every Dataplane becomes a listener; every service is in the config, since
/// the forward proxy may reach any registered service without an outbound.
pub fn compile(registry: &Registry) -> ProxyConfig {
    let services: BTreeMap<String, Arc<ExternalService>> = registry
        .services
        .values()
        .map(|s| (service_label(&s.key), s.clone()))
        .collect();
    let mut listeners = Vec::with_capacity(registry.outbounds.len());
    for outbound in &registry.outbounds {
        let Some(service) = services.get(&service_label(&outbound.service)).cloned() else {
            continue;
        };
        listeners.push(ListenerConfig {
            name: format!(
                "{}/outbound/{}",
                service_label(&outbound.dataplane),
                outbound.port
            ),
            dataplane: outbound.dataplane.clone(),
            address: SocketAddr::new(outbound.address, outbound.port),
            service,
        });
    }
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    ProxyConfig {
        listeners,
        services,
        outbound_traffic_policy: registry.outbound_traffic_policy,
        virtual_ips: Arc::default(),
        vip_ranges: Vec::new(),
    }
}

/// What one proxy gets out of the whole configuration, by the name it connects with. A proxy
/// whose name is a Dataplane's gets that Dataplane's listeners and only the services they
/// reference, so its config grows with what it uses, not with the registry. A proxy without a
/// Dataplane (a forward proxy, say) gets every service of its mesh and no listeners.
pub fn scope(
    full: &ProxyConfig,
    dataplanes: &BTreeSet<ResourceKey>,
    proxy: &ResourceKey,
) -> ProxyConfig {
    scope_indexed(full, &VipIndex::new(full), dataplanes, proxy)
}

/// Where each service's VIPs are in a config's `virtual_ips`, so that scoping a proxy with a
/// few services looks at their VIPs only, not at every VIP of the registry.
#[derive(Debug, Default)]
pub struct VipIndex(std::collections::HashMap<String, Vec<usize>>);

impl VipIndex {
    pub fn new(full: &ProxyConfig) -> Self {
        let mut index: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (i, v) in full.virtual_ips.iter().enumerate() {
            for (_, label) in &v.ports {
                let at = index.entry(label.clone()).or_default();
                if at.last() != Some(&i) {
                    at.push(i);
                }
            }
        }
        Self(index)
    }
}

/// [`scope`], with `index` made from `full` once for every proxy.
pub fn scope_indexed(
    full: &ProxyConfig,
    index: &VipIndex,
    dataplanes: &BTreeSet<ResourceKey>,
    proxy: &ResourceKey,
) -> ProxyConfig {
    let (listeners, services): (Vec<ListenerConfig>, BTreeMap<String, Arc<ExternalService>>) =
        if dataplanes.contains(proxy) {
            let listeners: Vec<ListenerConfig> = full
                .listeners
                .iter()
                .filter(|l| l.dataplane == *proxy)
                .cloned()
                .collect();
            let services = listeners
                .iter()
                .map(|l| (service_label(&l.service.key), l.service.clone()))
                .collect();
            (listeners, services)
        } else {
            let services = full
                .services
                .iter()
                .filter(|(_, s)| s.key.mesh == proxy.mesh)
                .map(|(label, s)| (label.clone(), s.clone()))
                .collect();
            (Vec::new(), services)
        };
    // A VIP is kept for the ports whose services the proxy has.
    let mut candidates: Vec<usize> = services
        .keys()
        .filter_map(|label| index.0.get(label))
        .flatten()
        .copied()
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let virtual_ips = candidates
        .into_iter()
        .filter_map(|i| full.virtual_ips.get(i))
        .filter_map(|v| {
            let ports: Vec<(u16, String)> = v
                .ports
                .iter()
                .filter(|(_, label)| services.contains_key(label))
                .cloned()
                .collect();
            (!ports.is_empty()).then(|| VirtualIp {
                ip: v.ip,
                names: v.names.clone(),
                ports,
            })
        })
        .collect::<Vec<_>>();
    ProxyConfig {
        listeners,
        services,
        outbound_traffic_policy: full.outbound_traffic_policy,
        virtual_ips: Arc::new(virtual_ips),
        vip_ranges: full.vip_ranges.clone(),
    }
}

/// The registry `yaml` makes, for tests; panics on any problem.
#[cfg(test)]
pub(crate) fn load(yaml: &str) -> Registry {
    let docs = sluice_api::parse_documents("t.yaml", yaml).unwrap();
    let loaded = sluice_api::load(&docs);
    assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
    loaded.registry.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Dataplane's proxy gets the VIPs of its own services, and only the ports of theirs; a
    /// proxy without a Dataplane gets every VIP of its mesh.
    #[test]
    fn scopes_keep_the_vips_of_their_services() {
        let registry = load(
            r#"
type: MeshExternalService
name: a
spec:
  match: {port: 80}
  endpoints: [{address: a.example, port: 80}]
---
type: MeshExternalService
name: b
spec:
  match: {port: 80}
  endpoints: [{address: b.example, port: 80}]
---
type: Dataplane
name: web
networking:
  outbound:
    - port: 10080
      backendRef: {kind: MeshExternalService, name: a}
"#,
        );
        let mut full = compile(&registry);
        let label = |name: &str| {
            full.services
                .keys()
                .find(|l| l.starts_with(name))
                .cloned()
                .unwrap()
        };
        let (a, b) = (label("a"), label("b"));
        let vip = |ip: &str, ports: &[(u16, &String)]| VirtualIp {
            ip: ip.parse().unwrap(),
            names: vec![format!("{ip}.names")],
            ports: ports.iter().map(|(p, l)| (*p, (*l).clone())).collect(),
        };
        full.virtual_ips = Arc::new(vec![
            vip("242.0.0.1", &[(80, &a)]),
            vip("242.0.0.2", &[(80, &b)]),
            vip("242.0.0.3", &[(80, &b), (443, &a)]),
        ]);
        let ips = |c: &ProxyConfig| {
            c.virtual_ips
                .iter()
                .map(|v| {
                    format!(
                        "{} {:?}",
                        v.ip,
                        v.ports.iter().map(|(p, _)| p).collect::<Vec<_>>()
                    )
                })
                .collect::<Vec<_>>()
        };
        let web = ResourceKey {
            mesh: "default".into(),
            name: "web".into(),
        };
        let other = ResourceKey {
            mesh: "default".into(),
            name: "forward".into(),
        };
        let scoped = scope(&full, &registry.dataplanes, &web);
        assert_eq!(ips(&scoped), ["242.0.0.1 [80]", "242.0.0.3 [443]"]);
        let whole = scope(&full, &registry.dataplanes, &other);
        assert_eq!(
            ips(&whole),
            ["242.0.0.1 [80]", "242.0.0.2 [80]", "242.0.0.3 [80, 443]"]
        );
    }

    #[test]
    fn outbounds_become_listeners_and_every_service_is_kept() {
        let registry = load(
            r#"
type: MeshExternalService
name: httpbin
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: httpbin.org, port: 80}]
---
type: MeshExternalService
name: unused
spec:
  match: {port: 80}
  endpoints: [{address: example.com, port: 80}]
---
type: Dataplane
name: backend
networking:
  outbound:
    - port: 10080
      backendRef: {kind: MeshExternalService, name: httpbin}
    - port: 10081
      address: 127.0.0.2
      backendRef: {kind: MeshExternalService, name: httpbin}
"#,
        );
        let config = compile(&registry);
        let names: Vec<_> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["backend/outbound/10080", "backend/outbound/10081"]);
        assert_eq!(
            config.listeners[1].address,
            "127.0.0.2:10081".parse().unwrap()
        );
        assert_eq!(
            config.services.keys().collect::<Vec<_>>(),
            ["httpbin", "unused"]
        );
        assert!(Arc::ptr_eq(
            &config.listeners[0].service,
            &config.listeners[1].service
        ));
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    fn registry() -> Registry {
        load(
            r#"
type: MeshExternalService
name: a
spec: {match: {port: 80}, endpoints: [{address: a.example, port: 80}]}
---
type: MeshExternalService
name: b
spec: {match: {port: 80}, endpoints: [{address: b.example, port: 80}]}
---
type: MeshExternalService
name: c
mesh: other
spec: {match: {port: 80}, endpoints: [{address: c.example, port: 80}]}
---
type: Dataplane
name: web
networking:
  outbound: [{port: 10001, backendRef: {kind: MeshExternalService, name: a}}]
---
type: Dataplane
name: idle
networking: {outbound: []}
---
type: Dataplane
name: batch
mesh: other
networking:
  outbound: [{port: 10002, backendRef: {kind: MeshExternalService, name: c}}]
"#,
        )
    }

    #[test]
    fn each_proxy_gets_what_it_uses() {
        let registry = registry();
        let full = compile(&registry);
        let key = |mesh: &str, name: &str| ResourceKey {
            mesh: mesh.into(),
            name: name.into(),
        };
        // (proxy, listeners, services)
        let cases: &[(ResourceKey, &[&str], &[&str])] = &[
            (key("default", "web"), &["web/outbound/10001"], &["a"]),
            (key("default", "idle"), &[], &[]),
            (
                key("other", "batch"),
                &["other/batch/outbound/10002"],
                &["other/c"],
            ),
            (key("default", "no-dataplane"), &[], &["a", "b"]),
            (key("other", "no-dataplane"), &[], &["other/c"]),
            (key("empty", "no-dataplane"), &[], &[]),
        ];
        for (proxy, listeners, services) in cases {
            let config = scope(&full, &registry.dataplanes, proxy);
            let got: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(got, *listeners, "{proxy}");
            let got: Vec<&str> = config.services.keys().map(String::as_str).collect();
            assert_eq!(got, *services, "{proxy}");
        }
    }
}
