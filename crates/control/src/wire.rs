//! The config stream's messages (`proto/config.proto`, written out as prost types so that
//! building needs no protobuf compiler) and their translation to and from [`ProxyConfig`].
//!
//! The translation back is strict: a proxy refuses (NACKs) a snapshot with anything it cannot
//! read, naming the field, rather than running part of it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_api::model::{
    Cidr, ClientIdentity, Endpoint as ModelEndpoint, ExternalService,
    LoadBalancer as ModelLoadBalancer, Material as ModelMaterial, OutboundTrafficPolicy,
    Protocol as ModelProtocol, ResourceKey, SanMatch as ModelSan, TlsOrigination,
    TlsVersion as ModelTlsVersion, VerificationMode,
};

use crate::{service_label, ListenerConfig, ProxyConfig};

/// The gRPC method of the config stream.
pub const STREAM_PATH: &str = "/sluice.config.v1.ConfigDiscovery/Stream";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyMessage {
    #[prost(oneof = "proxy_message::Message", tags = "1, 2, 3")]
    pub message: Option<proxy_message::Message>,
}

pub mod proxy_message {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Message {
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        #[prost(message, tag = "2")]
        Ack(super::Ack),
        #[prost(message, tag = "3")]
        Nack(super::Nack),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(string, tag = "1")]
    pub mesh: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub version: u64,
    #[prost(string, tag = "4")]
    pub build: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(uint64, tag = "1")]
    pub version: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Nack {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(message, repeated, tag = "2")]
    pub listeners: Vec<Listener>,
    #[prost(message, repeated, tag = "3")]
    pub services: Vec<Service>,
    #[prost(enumeration = "Policy", tag = "4")]
    pub outbound_traffic_policy: i32,
    #[prost(message, repeated, tag = "5")]
    pub virtual_ips: Vec<VirtualIp>,
    #[prost(string, repeated, tag = "6")]
    pub vip_ranges: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VirtualIp {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(string, repeated, tag = "2")]
    pub names: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub ports: Vec<VipPort>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VipPort {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    #[prost(string, tag = "2")]
    pub service: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Policy {
    Unset = 0,
    Allowed = 1,
    Restricted = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Listener {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(string, tag = "3")]
    pub service_mesh: String,
    #[prost(string, tag = "4")]
    pub service_name: String,
    #[prost(string, tag = "5")]
    pub dataplane_mesh: String,
    #[prost(string, tag = "6")]
    pub dataplane_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Protocol {
    Tcp = 0,
    Http = 1,
    Http2 = 2,
    Grpc = 3,
    Tls = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LoadBalancer {
    RoundRobin = 0,
    LeastRequest = 1,
    Random = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub mesh: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint32, tag = "3")]
    pub port: u32,
    #[prost(enumeration = "Protocol", tag = "4")]
    pub protocol: i32,
    #[prost(message, repeated, tag = "5")]
    pub endpoints: Vec<Endpoint>,
    #[prost(message, optional, tag = "6")]
    pub tls: Option<Tls>,
    #[prost(string, repeated, tag = "7")]
    pub hosts: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    pub addresses: Vec<String>,
    #[prost(enumeration = "LoadBalancer", tag = "9")]
    pub load_balancer: i32,
    #[prost(uint32, repeated, tag = "10")]
    pub endpoint_weights: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Endpoint {
    #[prost(oneof = "endpoint::Kind", tags = "1, 2, 3")]
    pub kind: Option<endpoint::Kind>,
}

pub mod endpoint {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Ip(super::IpEndpoint),
        #[prost(message, tag = "2")]
        Dns(super::DnsEndpoint),
        #[prost(string, tag = "3")]
        UnixPath(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IpEndpoint {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DnsEndpoint {
    #[prost(string, tag = "1")]
    pub host: String,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TlsVersion {
    Unset = 0,
    Tls12 = 1,
    Tls13 = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Verification {
    Secured = 0,
    SkipSan = 1,
    SkipCa = 2,
    SkipAll = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tls {
    #[prost(enumeration = "TlsVersion", tag = "1")]
    pub min_version: i32,
    #[prost(enumeration = "TlsVersion", tag = "2")]
    pub max_version: i32,
    #[prost(bool, tag = "3")]
    pub allow_renegotiation: bool,
    #[prost(enumeration = "Verification", tag = "4")]
    pub mode: i32,
    #[prost(string, optional, tag = "5")]
    pub server_name: Option<String>,
    #[prost(message, repeated, tag = "6")]
    pub subject_alt_names: Vec<SanMatch>,
    #[prost(message, optional, tag = "7")]
    pub ca_cert: Option<Material>,
    #[prost(message, optional, tag = "8")]
    pub client_cert: Option<Material>,
    #[prost(message, optional, tag = "9")]
    pub client_key: Option<Material>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SanMatch {
    #[prost(oneof = "san_match::Match", tags = "1, 2")]
    pub r#match: Option<san_match::Match>,
}

pub mod san_match {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Match {
        #[prost(string, tag = "1")]
        Exact(String),
        #[prost(string, tag = "2")]
        Prefix(String),
    }
}

/// Key material; `Debug` shows the origin and length only.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Material {
    #[prost(string, tag = "1")]
    pub origin: String,
    #[prost(bytes = "vec", tag = "2")]
    pub pem: Vec<u8>,
    /// A file on the proxy's host to read instead; empty for none.
    #[prost(string, tag = "3")]
    pub file: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Material({}, {} bytes redacted)",
            self.origin,
            self.pem.len()
        )
    }
}

/// The snapshot of `config` at `version`.
pub fn to_wire(config: &ProxyConfig, version: u64) -> Snapshot {
    Snapshot {
        version,
        listeners: config
            .listeners
            .iter()
            .map(|l| Listener {
                name: l.name.clone(),
                address: l.address.to_string(),
                service_mesh: l.service.key.mesh.clone(),
                service_name: l.service.key.name.clone(),
                dataplane_mesh: l.dataplane.mesh.clone(),
                dataplane_name: l.dataplane.name.clone(),
            })
            .collect(),
        services: config.services.values().map(|s| service(s)).collect(),
        outbound_traffic_policy: match config.outbound_traffic_policy {
            None => Policy::Unset,
            Some(OutboundTrafficPolicy::Allowed) => Policy::Allowed,
            Some(OutboundTrafficPolicy::Restricted) => Policy::Restricted,
        } as i32,
        virtual_ips: config
            .virtual_ips
            .iter()
            .map(|v| VirtualIp {
                ip: v.ip.to_string(),
                names: v.names.clone(),
                ports: v
                    .ports
                    .iter()
                    .map(|(port, service)| VipPort {
                        port: u32::from(*port),
                        service: service.clone(),
                    })
                    .collect(),
            })
            .collect(),
        vip_ranges: config.vip_ranges.iter().map(ToString::to_string).collect(),
    }
}

fn service(s: &ExternalService) -> Service {
    Service {
        mesh: s.key.mesh.clone(),
        name: s.key.name.clone(),
        port: u32::from(s.port),
        protocol: match s.protocol {
            ModelProtocol::Tcp => Protocol::Tcp,
            ModelProtocol::Tls => Protocol::Tls,
            ModelProtocol::Http => Protocol::Http,
            ModelProtocol::Http2 => Protocol::Http2,
            ModelProtocol::Grpc => Protocol::Grpc,
        } as i32,
        endpoints: s
            .endpoints
            .iter()
            .map(|e| Endpoint {
                kind: Some(match e {
                    ModelEndpoint::Ip { ip, port } => endpoint::Kind::Ip(IpEndpoint {
                        ip: ip.to_string(),
                        port: u32::from(*port),
                    }),
                    ModelEndpoint::Dns { host, port } => endpoint::Kind::Dns(DnsEndpoint {
                        host: host.clone(),
                        port: u32::from(*port),
                    }),
                    ModelEndpoint::Unix { path } => {
                        endpoint::Kind::UnixPath(path.to_string_lossy().into_owned())
                    }
                }),
            })
            .collect(),
        tls: s.tls.as_ref().map(tls),
        hosts: s.hosts.clone(),
        addresses: s.addresses.iter().map(ToString::to_string).collect(),
        load_balancer: match s.load_balancer {
            ModelLoadBalancer::RoundRobin => LoadBalancer::RoundRobin,
            ModelLoadBalancer::LeastRequest => LoadBalancer::LeastRequest,
            ModelLoadBalancer::Random => LoadBalancer::Random,
        } as i32,
        endpoint_weights: s.endpoint_weights.clone(),
    }
}

fn tls(t: &TlsOrigination) -> Tls {
    let version = |v: Option<ModelTlsVersion>| {
        (match v {
            None => TlsVersion::Unset,
            Some(ModelTlsVersion::Tls12) => TlsVersion::Tls12,
            Some(ModelTlsVersion::Tls13) => TlsVersion::Tls13,
        }) as i32
    };
    let material = |m: &ModelMaterial| Material {
        origin: m.origin.clone(),
        pem: m.pem.clone(),
        file: m
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
    };
    Tls {
        min_version: version(t.min_version),
        max_version: version(t.max_version),
        allow_renegotiation: t.allow_renegotiation,
        mode: match t.mode {
            VerificationMode::Secured => Verification::Secured,
            VerificationMode::SkipSAN => Verification::SkipSan,
            VerificationMode::SkipCA => Verification::SkipCa,
            VerificationMode::SkipAll => Verification::SkipAll,
        } as i32,
        server_name: t.server_name.clone(),
        subject_alt_names: t
            .subject_alt_names
            .iter()
            .map(|m| SanMatch {
                r#match: Some(match m {
                    ModelSan::Exact(v) => san_match::Match::Exact(v.clone()),
                    ModelSan::Prefix(v) => san_match::Match::Prefix(v.clone()),
                }),
            })
            .collect(),
        ca_cert: t.ca_cert.as_ref().map(material),
        client_cert: t.client_cert.as_ref().map(|c| material(&c.cert)),
        client_key: t.client_cert.as_ref().map(|c| material(&c.key)),
    }
}

/// Reads a snapshot back; the error names the first field that cannot be used.
pub fn from_wire(snapshot: &Snapshot) -> Result<ProxyConfig, String> {
    let mut services = BTreeMap::new();
    for (i, s) in snapshot.services.iter().enumerate() {
        let service =
            read_service(s).map_err(|e| format!("services[{i}] ({}/{}): {e}", s.mesh, s.name))?;
        services.insert(service_label(&service.key), Arc::new(service));
    }
    let mut listeners = Vec::with_capacity(snapshot.listeners.len());
    for (i, l) in snapshot.listeners.iter().enumerate() {
        let at = |e: String| format!("listeners[{i}] ({}): {e}", l.name);
        let address: SocketAddr = l
            .address
            .parse()
            .map_err(|_| at(format!("address {:?} is not IP:PORT", l.address)))?;
        let key = ResourceKey {
            mesh: l.service_mesh.clone(),
            name: l.service_name.clone(),
        };
        let service = services
            .get(&service_label(&key))
            .cloned()
            .ok_or_else(|| at(format!("service {key} is not in the snapshot")))?;
        let dataplane = ResourceKey {
            mesh: l.dataplane_mesh.clone(),
            name: l.dataplane_name.clone(),
        };
        listeners.push(ListenerConfig {
            name: l.name.clone(),
            dataplane,
            address,
            service,
        });
    }
    let outbound_traffic_policy = match Policy::try_from(snapshot.outbound_traffic_policy) {
        Ok(Policy::Unset) => None,
        Ok(Policy::Allowed) => Some(OutboundTrafficPolicy::Allowed),
        Ok(Policy::Restricted) => Some(OutboundTrafficPolicy::Restricted),
        Err(_) => {
            return Err(format!(
                "outbound_traffic_policy: unknown value {}",
                snapshot.outbound_traffic_policy
            ))
        }
    };
    let mut virtual_ips = Vec::with_capacity(snapshot.virtual_ips.len());
    for (i, v) in snapshot.virtual_ips.iter().enumerate() {
        let at = |e: String| format!("virtual_ips[{i}] ({}): {e}", v.ip);
        let ip =
            v.ip.parse()
                .map_err(|_| at("not an IP address".to_string()))?;
        let mut ports = BTreeMap::new();
        for p in &v.ports {
            if !services.contains_key(&p.service) {
                return Err(at(format!("service {} is not in the snapshot", p.service)));
            }
            ports.insert(port(p.port, "port").map_err(at)?, p.service.clone());
        }
        virtual_ips.push(crate::VirtualIp {
            ip,
            names: v.names.clone(),
            ports: ports.into_iter().collect(),
        });
    }
    let vip_ranges = snapshot
        .vip_ranges
        .iter()
        .map(|r| Cidr::parse(r).map_err(|e| format!("vip_ranges: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProxyConfig {
        listeners,
        services,
        outbound_traffic_policy,
        virtual_ips: Arc::new(virtual_ips),
        vip_ranges,
    })
}

fn port(p: u32, field: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}: {p} is not a port"))
}

fn read_service(s: &Service) -> Result<ExternalService, String> {
    let protocol = match Protocol::try_from(s.protocol) {
        Ok(Protocol::Tcp) => ModelProtocol::Tcp,
        Ok(Protocol::Tls) => ModelProtocol::Tls,
        Ok(Protocol::Http) => ModelProtocol::Http,
        Ok(Protocol::Http2) => ModelProtocol::Http2,
        Ok(Protocol::Grpc) => ModelProtocol::Grpc,
        Err(_) => return Err(format!("protocol: unknown value {}", s.protocol)),
    };
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for (i, e) in s.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}]");
        endpoints.push(match &e.kind {
            Some(endpoint::Kind::Ip(ip)) => ModelEndpoint::Ip {
                ip: ip
                    .ip
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{field}.ip: {:?} is not an IP address", ip.ip))?,
                port: port(ip.port, &format!("{field}.port"))?,
            },
            Some(endpoint::Kind::Dns(d)) => ModelEndpoint::Dns {
                host: d.host.clone(),
                port: port(d.port, &format!("{field}.port"))?,
            },
            Some(endpoint::Kind::UnixPath(p)) => ModelEndpoint::Unix { path: p.into() },
            None => return Err(format!("{field}: no address")),
        });
    }
    let addresses = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| Cidr::parse(a).map_err(|e| format!("addresses[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() && s.hosts.is_empty() && addresses.is_empty() {
        return Err("endpoints: none, and no hosts or addresses to send to".to_string());
    }
    let load_balancer = match LoadBalancer::try_from(s.load_balancer) {
        Ok(LoadBalancer::RoundRobin) => ModelLoadBalancer::RoundRobin,
        Ok(LoadBalancer::LeastRequest) => ModelLoadBalancer::LeastRequest,
        Ok(LoadBalancer::Random) => ModelLoadBalancer::Random,
        Err(_) => return Err(format!("load_balancer: unknown value {}", s.load_balancer)),
    };
    let weights = &s.endpoint_weights;
    if !weights.is_empty() && weights.len() != endpoints.len() {
        return Err(format!(
            "endpoint_weights: {} weights for {} endpoints; give one per endpoint, or none",
            weights.len(),
            endpoints.len()
        ));
    }
    if weights.contains(&0) {
        return Err("endpoint_weights: a weight is 0; every endpoint weighs at least 1".into());
    }
    Ok(ExternalService {
        key: ResourceKey {
            mesh: s.mesh.clone(),
            name: s.name.clone(),
        },
        port: port(s.port, "port")?,
        protocol,
        endpoints,
        tls: s.tls.as_ref().map(read_tls).transpose()?,
        hosts: s.hosts.clone(),
        addresses,
        load_balancer,
        endpoint_weights: s.endpoint_weights.clone(),
    })
}

fn read_tls(t: &Tls) -> Result<TlsOrigination, String> {
    let version = |v: i32, field: &str| match TlsVersion::try_from(v) {
        Ok(TlsVersion::Unset) => Ok(None),
        Ok(TlsVersion::Tls12) => Ok(Some(ModelTlsVersion::Tls12)),
        Ok(TlsVersion::Tls13) => Ok(Some(ModelTlsVersion::Tls13)),
        Err(_) => Err(format!("tls.{field}: unknown value {v}")),
    };
    let material = |m: &Material| ModelMaterial {
        origin: m.origin.clone(),
        pem: m.pem.clone(),
        file: (!m.file.is_empty()).then(|| m.file.clone().into()),
    };
    let client_cert = match (&t.client_cert, &t.client_key) {
        (Some(cert), Some(key)) => Some(ClientIdentity {
            cert: material(cert),
            key: material(key),
        }),
        (None, None) => None,
        _ => {
            return Err("tls: a client certificate needs its key, and a key its certificate".into())
        }
    };
    let mut subject_alt_names = Vec::with_capacity(t.subject_alt_names.len());
    for (i, m) in t.subject_alt_names.iter().enumerate() {
        subject_alt_names.push(match &m.r#match {
            Some(san_match::Match::Exact(v)) => ModelSan::Exact(v.clone()),
            Some(san_match::Match::Prefix(v)) => ModelSan::Prefix(v.clone()),
            None => return Err(format!("tls.subject_alt_names[{i}]: no match")),
        });
    }
    Ok(TlsOrigination {
        min_version: version(t.min_version, "min_version")?,
        max_version: version(t.max_version, "max_version")?,
        allow_renegotiation: t.allow_renegotiation,
        mode: match Verification::try_from(t.mode) {
            Ok(Verification::Secured) => VerificationMode::Secured,
            Ok(Verification::SkipSan) => VerificationMode::SkipSAN,
            Ok(Verification::SkipCa) => VerificationMode::SkipCA,
            Ok(Verification::SkipAll) => VerificationMode::SkipAll,
            Err(_) => return Err(format!("tls.mode: unknown value {}", t.mode)),
        },
        server_name: t.server_name.clone(),
        subject_alt_names,
        ca_cert: t.ca_cert.as_ref().map(material),
        client_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn config() -> ProxyConfig {
        let registry = crate::load(
            r#"
type: Secret
name: key
data: LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1DNENBUUF3QlFZREsyVndCQ0lFSUpzTWp3ZHhGdnR1b2FtNUJ3R2hKOFFxYlVEcUFabTkxWk9VVkNUN0hETE0KLS0tLS1FTkQgUFJJVkFURSBLRVktLS0tLQo=
---
type: MeshExternalService
name: api
spec:
  match: {port: 443, protocol: http2}
  endpoints: [{address: api.example, port: 443}, {address: 192.0.2.7, port: 8443}]
  tls:
    enabled: true
    version: {min: TLS12, max: TLS13}
    verification:
      mode: SkipCA
      serverName: api.example
      subjectAltNames: [{type: Prefix, value: spiffe://x/}, {type: Exact, value: api.example}]
---
type: MeshExternalService
name: db
mesh: other
spec:
  match: {port: 5432}
  endpoints: [{address: unix:///run/db.sock}]
---
type: Dataplane
name: web
networking:
  outbound: [{port: 10001, address: 127.0.0.9, backendRef: {kind: MeshExternalService, name: api}}]
"#,
        );
        let mut config = crate::compile(&registry);
        config.outbound_traffic_policy = Some(OutboundTrafficPolicy::Restricted);
        // What only Istio and Gloo resources set.
        let db = config.services.get_mut("other/db").unwrap();
        let db = Arc::make_mut(db);
        db.protocol = ModelProtocol::Tls;
        db.hosts = vec!["db.example".into(), "*.db.example".into()];
        db.addresses = vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("2001:db8::5").unwrap(),
        ];
        db.load_balancer = ModelLoadBalancer::LeastRequest;
        let api = config.services.get_mut("api").unwrap();
        Arc::make_mut(api).endpoint_weights = vec![3, 1];
        config.listeners[0].service = api.clone();
        config.virtual_ips = Arc::new(vec![crate::VirtualIp {
            ip: "242.0.0.1".parse().unwrap(),
            names: vec!["api.extsvc.mesh.local".into()],
            ports: [(443, "api".to_string())].into(),
        }]);
        config.vip_ranges = vec![Cidr::parse("242.0.0.0/8").unwrap()];
        config
    }

    #[test]
    fn a_config_crosses_the_wire_unchanged() {
        let config = config();
        let bytes = to_wire(&config, 42).encode_to_vec();
        let snapshot = Snapshot::decode(bytes.as_slice()).unwrap();
        assert_eq!(snapshot.version, 42);
        assert_eq!(from_wire(&snapshot).unwrap(), config);
    }

    #[test]
    fn unusable_snapshots_are_refused_by_field() {
        let good = to_wire(&config(), 1);
        type Change = Box<dyn Fn(&mut Snapshot)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|s| s.listeners[0].address = "nowhere".into()),
                "listeners[0] (web/outbound/10001): address \"nowhere\" is not IP:PORT",
            ),
            (
                Box::new(|s| s.listeners[0].service_name = "gone".into()),
                "listeners[0] (web/outbound/10001): service default/gone is not in the snapshot",
            ),
            (
                Box::new(|s| s.services[0].port = 70000),
                "services[0] (default/api): port: 70000 is not a port",
            ),
            (
                Box::new(|s| s.services[0].protocol = 9),
                "services[0] (default/api): protocol: unknown value 9",
            ),
            (
                Box::new(|s| s.services[0].endpoints.clear()),
                "services[0] (default/api): endpoints: none, and no hosts or addresses to send to",
            ),
            (
                Box::new(|s| s.services[0].tls.as_mut().unwrap().mode = 7),
                "services[0] (default/api): tls.mode: unknown value 7",
            ),
            (
                Box::new(|s| s.services[0].endpoint_weights = vec![1]),
                "services[0] (default/api): endpoint_weights: 1 weights for 2 endpoints; give one per endpoint, or none",
            ),
            (
                Box::new(|s| s.services[0].endpoint_weights = vec![0, 1]),
                "services[0] (default/api): endpoint_weights: a weight is 0; every endpoint weighs at least 1",
            ),
            (
                Box::new(|s| s.outbound_traffic_policy = 5),
                "outbound_traffic_policy: unknown value 5",
            ),
        ];
        for (change, want) in cases {
            let mut s = good.clone();
            change(&mut s);
            assert_eq!(from_wire(&s).unwrap_err(), want);
        }
    }

    #[test]
    fn material_debug_is_redacted() {
        let m = Material {
            origin: "secret:key".into(),
            pem: b"-----BEGIN PRIVATE KEY-----".to_vec(),
            file: String::new(),
        };
        assert_eq!(format!("{m:?}"), "Material(secret:key, 27 bytes redacted)");
    }
}
