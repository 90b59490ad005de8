#![forbid(unsafe_code)]
//! Compiles a checked registry into the configuration one proxy runs, and serves the registry's
//! REST API.

pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use sluice_api::model::{ExternalService, OutboundTrafficPolicy, ResourceKey};
use sluice_api::Registry;

/// Everything a proxy enforces, as one immutable snapshot. `Serialize` is the `/config_dump`
/// view: key material is shown only by origin and length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    pub services: BTreeMap<String, Arc<ExternalService>>,
    /// Set when a resource (a Kuma Mesh) decides it; otherwise the proxy keeps its own setting.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

/// A plaintext listener for the app, bound to one external service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    /// `DATAPLANE/outbound/PORT`, stable across reloads so logs and metrics can follow it.
    pub name: String,
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
        .map(|s| (service_label(&s.key), Arc::new(s.clone())))
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
            address: SocketAddr::new(outbound.address, outbound.port),
            service,
        });
    }
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    ProxyConfig {
        listeners,
        services,
        outbound_traffic_policy: registry.outbound_traffic_policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Registry {
        let docs = sluice_api::parse_documents("t.yaml", yaml).unwrap();
        let loaded = sluice_api::load(&docs);
        assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
        loaded.registry.unwrap()
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
