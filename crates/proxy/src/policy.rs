//! The outbound traffic policy for traffic whose destination the app chooses (forward proxy):
//! which `(host, port)` pairs the registry opens, and which addresses bytes may go to. Pure
//! functions over a table built from the config, so each rule has a row in a table test.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_api::model::{Cidr, Endpoint, ExternalService, Protocol};
use sluice_api::names::is_dns_name;
use sluice_control::{service_label, ProxyConfig};

use crate::guard;

pub use sluice_api::model::OutboundTrafficPolicy as Mode;

/// A destination the app asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Reads the host of a request target. Names are folded to lower case without a trailing dot;
/// numeric spellings other than a dotted quad or a bracketed IPv6 literal (`2130706433`,
/// `0x7f.1`, `0177.0.0.1`, `127.1`) are refused rather than guessed at.
pub fn parse_host(text: &str) -> Result<Host, String> {
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("\"{text}\" is not an IPv6 address"));
    }
    if let Ok(v4) = text.parse::<std::net::Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if is_dns_name(name) {
        return Ok(Host::Name(name.to_ascii_lowercase()));
    }
    Err(format!(
        "\"{text}\" is not a host name or IP address (numeric spellings other than a.b.c.d are refused)"
    ))
}

/// How the registry opens a `(host, port)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// The endpoint itself: tunnel (CONNECT) or plain HTTP straight to it. `raw_tcp` when the
    /// service says its traffic is not TLS, so a tunnel need not start with a ClientHello.
    /// `originates` when the service originates TLS for HTTP: plain HTTP sent to the endpoint's
    /// own port then goes through the service's pool as HTTPS, never in clear to a TLS port.
    Endpoint {
        service: Arc<str>,
        raw_tcp: bool,
        originates: bool,
    },
    /// The service's own port with TLS origination: plain HTTP from the app, HTTPS to the
    /// service's endpoints through its pool.
    Originate { service: Arc<str> },
    /// A service called by one of its names or addresses (Istio's and Gloo's `hosts` and
    /// `addresses`): traffic goes to its endpoints through its pool or connector, or, when it
    /// has none (resolution NONE), to the host the app named, resolved and checked here.
    Service {
        service: Arc<str>,
        protocol: Protocol,
        endpoints: bool,
    },
}

impl Opening {
    pub fn service(&self) -> &Arc<str> {
        match self {
            Opening::Endpoint { service, .. }
            | Opening::Originate { service }
            | Opening::Service { service, .. } => service,
        }
    }
}

/// Why a destination is refused; `Display` is the reason the app and the log see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    NotRegistered { host: String, port: u16 },
    Address { ip: IpAddr, class: guard::Refused },
    Proxy { addr: SocketAddr },
    BadTarget(String),
}

impl Denied {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::NotRegistered { .. } => "not_registered",
            Denied::Address { .. } => "address_refused",
            Denied::Proxy { .. } => "proxy_itself",
            Denied::BadTarget(_) => "bad_target",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::NotRegistered { host, port } => write!(
                f,
                "{host}:{port} is not a registered external service and the outbound traffic policy is restricted; register it with a MeshExternalService whose endpoints include {host}:{port}, or a ServiceEntry with that host and port"
            ),
            Denied::Address { ip, class } => write!(
                f,
                "{ip} is a {} address, which is refused unless an external service names that address and port as an endpoint",
                class.as_str()
            ),
            Denied::Proxy { addr } => write!(f, "{addr} is this proxy itself"),
            Denied::BadTarget(why) => f.write_str(why),
        }
    }
}

/// What the registry opens, built once per config.
#[derive(Debug, Default)]
pub struct Table {
    names: HashMap<(String, u16), Opening>,
    ips: HashMap<(IpAddr, u16), Opening>,
    /// `*.suffix` hosts by port: (`.suffix`, opening), longest suffix first.
    wildcards: HashMap<u16, Vec<(String, Opening)>>,
    /// Address ranges by port, narrowest first.
    ranges: HashMap<u16, Vec<(Cidr, Opening)>>,
    /// Addresses the proxy listens on: never a destination.
    own: HashSet<SocketAddr>,
}

impl Table {
    pub fn new(config: &ProxyConfig, own: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut table = Table {
            own: own.into_iter().collect(),
            ..Table::default()
        };
        // A service's own names come first: an endpoint of one service is not a way around the
        // names of another.
        for service in config.services.values() {
            table.add_names(service);
        }
        for service in config.services.values() {
            if service.hosts.is_empty() && service.addresses.is_empty() {
                table.add(service);
            }
        }
        for list in table.wildcards.values_mut() {
            list.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        }
        for list in table.ranges.values_mut() {
            list.sort_by_key(|(cidr, _)| std::cmp::Reverse(cidr.prefix));
        }
        table
    }

    /// Opens a service's `hosts` and `addresses` at its port.
    fn add_names(&mut self, service: &ExternalService) {
        let opening = || Opening::Service {
            service: Arc::from(service_label(&service.key)),
            protocol: service.protocol,
            endpoints: !service.endpoints.is_empty(),
        };
        let port = service.port;
        for host in &service.hosts {
            match host.strip_prefix('*') {
                Some(suffix) => {
                    let list = self.wildcards.entry(port).or_default();
                    if !list.iter().any(|(s, _)| s == suffix) {
                        list.push((suffix.to_string(), opening()));
                    }
                }
                None => match self.names.entry((host.clone(), port)) {
                    std::collections::hash_map::Entry::Occupied(first) => {
                        tracing::warn!(
                            host = %host,
                            port,
                            first = %first.get().service(),
                            shadowed = %service_label(&service.key),
                            "two external services open one host and port; the first takes the traffic"
                        );
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(opening());
                    }
                },
            }
        }
        for cidr in &service.addresses {
            if cidr.is_single() {
                self.ips
                    .entry((canonical(cidr.ip), port))
                    .or_insert_with(opening);
            } else {
                self.ranges
                    .entry(port)
                    .or_default()
                    .push((*cidr, opening()));
            }
        }
    }

    fn add(&mut self, service: &ExternalService) {
        let label: Arc<str> = Arc::from(service_label(&service.key));
        let raw_tcp = service.protocol == Protocol::Tcp && service.tls.is_none();
        let originates = service.tls.is_some() && service.protocol.is_http();
        let endpoint = || Opening::Endpoint {
            service: label.clone(),
            raw_tcp,
            originates,
        };
        let mut names = Vec::new();
        for e in &service.endpoints {
            match e {
                Endpoint::Dns { host, port } => {
                    self.names
                        .entry((host.clone(), *port))
                        .or_insert_with(endpoint);
                    names.push(host.clone());
                }
                Endpoint::Ip { ip, port } => {
                    self.ips
                        .entry((canonical(*ip), *port))
                        .or_insert_with(endpoint);
                }
                Endpoint::Unix { .. } => {}
            }
        }
        if let Some(tls) = &service.tls {
            if service.protocol.is_http() {
                let originate = || Opening::Originate {
                    service: label.clone(),
                };
                // The endpoint's own port stays a tunnel; the service's port originates TLS.
                match tls.server_name.as_deref().map(|n| n.parse::<IpAddr>()) {
                    Some(Ok(ip)) => {
                        self.ips
                            .entry((canonical(ip), service.port))
                            .or_insert_with(originate);
                    }
                    Some(Err(_)) => names.extend(tls.server_name.clone()),
                    None => {}
                }
                for host in names {
                    self.names
                        .entry((host, service.port))
                        .or_insert_with(originate);
                }
            }
        }
    }

    /// The registry's answer for a destination, before any address is known.
    pub fn lookup(&self, host: &Host, port: u16) -> Option<&Opening> {
        match host {
            Host::Name(n) => self.names.get(&(n.clone(), port)).or_else(|| {
                self.wildcards.get(&port)?.iter().find_map(|(suffix, o)| {
                    (n.len() > suffix.len() && n.ends_with(suffix.as_str())).then_some(o)
                })
            }),
            Host::Ip(ip) => {
                let ip = canonical(*ip);
                self.ips
                    .get(&(ip, port))
                    .or_else(|| self.in_range(ip, port))
            }
        }
    }

    fn in_range(&self, ip: IpAddr, port: u16) -> Option<&Opening> {
        self.ranges
            .get(&port)?
            .iter()
            .find_map(|(cidr, o)| cidr.contains(ip).then_some(o))
    }

    /// Whether the proxy listens on every address for this port (0.0.0.0 or [::]): then any local
    /// address with that port is the proxy itself, which only the caller can find out.
    pub fn listens_everywhere_on(&self, port: u16) -> bool {
        self.own
            .iter()
            .any(|a| a.port() == port && a.ip().is_unspecified())
    }

    /// Whether bytes may go to `addr`: never to the proxy itself; to a refused class only when an
    /// external service names exactly that address and port.
    pub fn check_address(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = canonical(addr.ip());
        if self.own.contains(&addr) || self.own.contains(&SocketAddr::new(ip, addr.port())) {
            return Err(Denied::Proxy { addr });
        }
        if let Some(class) = guard::refused(addr.ip()) {
            if !self.ips.contains_key(&(ip, addr.port()))
                && self.in_range(ip, addr.port()).is_none()
            {
                return Err(Denied::Address {
                    ip: addr.ip(),
                    class,
                });
            }
        }
        Ok(())
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The decision for a destination the app named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Registered(Opening),
    Passthrough,
    Deny(Denied),
}

pub fn decide(mode: Mode, table: &Table, host: &Host, port: u16) -> Decision {
    match (table.lookup(host, port), mode) {
        (Some(opening), _) => Decision::Registered(opening.clone()),
        (None, Mode::Allowed) => Decision::Passthrough,
        (None, Mode::Restricted) => Decision::Deny(Denied::NotRegistered {
            host: host.to_string(),
            port,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> Table {
        let docs = sluice_api::parse_documents("t.yaml", yaml).unwrap();
        let loaded = sluice_api::load(&docs);
        assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
        let config = sluice_control::compile(&loaded.registry.unwrap());
        Table::new(&config, ["127.0.0.1:3128".parse().unwrap()])
    }

    const REGISTRY: &str = r#"
type: MeshExternalService
name: httpbin-tls
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: httpbin.org, port: 443}]
  tls: {enabled: true, verification: {serverName: httpbin.org}}
---
type: MeshExternalService
name: db
spec:
  match: {port: 5432}
  endpoints: [{address: 10.1.2.3, port: 5432}]
---
type: MeshExternalService
name: api
spec:
  match: {port: 443, protocol: http}
  endpoints: [{address: API.example.com, port: 443}]
"#;

    #[test]
    fn host_parsing() {
        let ok = |t: &str, h: Host| assert_eq!(parse_host(t), Ok(h), "{t}");
        ok("HttpBin.org.", Host::Name("httpbin.org".into()));
        ok("10.1.2.3", Host::Ip("10.1.2.3".parse().unwrap()));
        ok("[::1]", Host::Ip("::1".parse().unwrap()));
        ok(
            "[::ffff:127.0.0.1]",
            Host::Ip("::ffff:127.0.0.1".parse().unwrap()),
        );
        for bad in [
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "127.1",
            "0x7f000001",
            "::1",
            "a b",
            "",
            "[1.2.3.4]",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decisions() {
        let t = table(REGISTRY);
        let name = |n: &str| Host::Name(n.into());
        let ip = |s: &str| Host::Ip(s.parse().unwrap());
        let endpoint = |s: &str, raw| {
            Decision::Registered(Opening::Endpoint {
                service: Arc::from(s),
                raw_tcp: raw,
                originates: s == "httpbin-tls",
            })
        };
        let cases: Vec<(Mode, Host, u16, Decision)> = vec![
            (
                Mode::Restricted,
                name("httpbin.org"),
                443,
                endpoint("httpbin-tls", false),
            ),
            (
                Mode::Restricted,
                name("httpbin.org"),
                80,
                Decision::Registered(Opening::Originate {
                    service: Arc::from("httpbin-tls"),
                }),
            ),
            // An allowed host is not open on every port.
            (
                Mode::Restricted,
                name("httpbin.org"),
                8443,
                Decision::Deny(Denied::NotRegistered {
                    host: "httpbin.org".into(),
                    port: 8443,
                }),
            ),
            (
                Mode::Allowed,
                name("httpbin.org"),
                8443,
                Decision::Passthrough,
            ),
            (
                Mode::Restricted,
                name("api.example.com"),
                443,
                endpoint("api", false),
            ),
            (Mode::Restricted, ip("10.1.2.3"), 5432, endpoint("db", true)),
            (
                Mode::Restricted,
                ip("::ffff:10.1.2.3"),
                5432,
                endpoint("db", true),
            ),
            (
                Mode::Restricted,
                ip("10.1.2.3"),
                22,
                Decision::Deny(Denied::NotRegistered {
                    host: "10.1.2.3".into(),
                    port: 22,
                }),
            ),
            (
                Mode::Allowed,
                name("example.net"),
                443,
                Decision::Passthrough,
            ),
        ];
        for (mode, host, port, want) in cases {
            assert_eq!(
                decide(mode, &t, &host, port),
                want,
                "{mode:?} {host}:{port}"
            );
        }
    }

    #[test]
    fn addresses() {
        let t = table(REGISTRY);
        let check = |a: &str| t.check_address(a.parse().unwrap()).map_err(|d| d.reason());
        let cases = [
            ("93.184.215.14:443", Ok(())),
            ("10.1.2.3:5432", Ok(())),
            ("[::ffff:10.1.2.3]:5432", Ok(())),
            ("10.1.2.3:22", Err("address_refused")),
            ("10.1.2.4:5432", Err("address_refused")),
            ("169.254.169.254:80", Err("address_refused")),
            ("[64:ff9b::a9fe:a9fe]:80", Err("address_refused")),
            ("127.0.0.1:3128", Err("proxy_itself")),
            ("[::ffff:127.0.0.1]:3128", Err("proxy_itself")),
            ("127.0.0.1:80", Err("address_refused")),
        ];
        for (addr, want) in cases {
            assert_eq!(check(addr), want, "{addr}");
        }
    }
}

#[cfg(test)]
mod istio_tests {
    use super::*;

    const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki}
spec:
  hosts: ["*.wikipedia.org", "*.en.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: special}
spec:
  hosts: [upload.en.wikipedia.org]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partners}
spec:
  hosts: [partners.example]
  addresses: [10.20.0.0/16, 10.20.30.0/24, 192.0.2.9]
  ports: [{number: 22, name: sftp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partners-web}
spec:
  hosts: [partners.example]
  addresses: [10.20.30.0/24]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.20.30.40}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
  endpoints: [{address: eu.api.example.com}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.example.com
  trafficPolicy:
    portLevelSettings: [{port: {number: 80}, tls: {mode: SIMPLE}}]
"#;

    fn table() -> Table {
        let docs = sluice_api::parse_documents("t.yaml", ENTRIES).unwrap();
        let loaded = sluice_api::load(&docs);
        assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
        let config = sluice_control::compile(&loaded.registry.unwrap());
        Table::new(&config, ["127.0.0.1:3128".parse().unwrap()])
    }

    fn service(name: &str, protocol: Protocol, endpoints: bool) -> Decision {
        Decision::Registered(Opening::Service {
            service: Arc::from(name),
            protocol,
            endpoints,
        })
    }

    #[test]
    fn names_wildcards_and_ranges() {
        let t = table();
        let name = |n: &str| Host::Name(n.into());
        let ip = |s: &str| Host::Ip(s.parse().unwrap());
        let not_registered = |host: &str, port| {
            Decision::Deny(Denied::NotRegistered {
                host: host.into(),
                port,
            })
        };
        let wiki = service("wiki_443", Protocol::Tls, false);
        let cases: Vec<(Host, u16, Decision)> = vec![
            (name("en.wikipedia.org"), 443, wiki.clone()),
            (name("a.b.en.wikipedia.org"), 443, wiki.clone()),
            // An exact name wins over a wildcard that covers it.
            (
                name("upload.en.wikipedia.org"),
                443,
                service("special_443", Protocol::Tls, true),
            ),
            (
                name("wikipedia.org"),
                443,
                not_registered("wikipedia.org", 443),
            ),
            (
                name("en.wikipedia.org"),
                80,
                not_registered("en.wikipedia.org", 80),
            ),
            (
                name("evilwikipedia.org"),
                443,
                not_registered("evilwikipedia.org", 443),
            ),
            // The narrowest range of a port decides.
            (
                ip("10.20.30.5"),
                80,
                service("partners-web_80", Protocol::Http, true),
            ),
            (
                ip("10.20.30.5"),
                22,
                service("partners_22", Protocol::Tcp, false),
            ),
            (
                ip("10.20.1.1"),
                22,
                service("partners_22", Protocol::Tcp, false),
            ),
            (
                ip("::ffff:10.20.1.1"),
                22,
                service("partners_22", Protocol::Tcp, false),
            ),
            (
                ip("192.0.2.9"),
                22,
                service("partners_22", Protocol::Tcp, false),
            ),
            (ip("10.21.0.1"), 22, not_registered("10.21.0.1", 22)),
            (ip("10.20.1.1"), 80, not_registered("10.20.1.1", 80)),
            // Endpoints of an entry are not names of it.
            (
                name("eu.api.example.com"),
                443,
                not_registered("eu.api.example.com", 443),
            ),
            (
                name("api.example.com"),
                80,
                service("api_80", Protocol::Http, true),
            ),
            (
                name("api.example.com"),
                443,
                service("api_443", Protocol::Tls, true),
            ),
        ];
        for (host, port, want) in cases {
            assert_eq!(
                decide(Mode::Restricted, &t, &host, port),
                want,
                "{host}:{port}"
            );
        }
    }

    #[test]
    fn ranges_an_entry_names_may_be_dialled() {
        let t = table();
        let check = |a: &str| t.check_address(a.parse().unwrap()).map_err(|d| d.reason());
        for (addr, want) in [
            ("10.20.7.7:22", Ok(())),
            ("10.20.30.40:80", Ok(())),
            ("10.20.7.7:80", Err("address_refused")),
            ("10.21.0.1:22", Err("address_refused")),
        ] {
            assert_eq!(check(addr), want, "{addr}");
        }
    }
}
