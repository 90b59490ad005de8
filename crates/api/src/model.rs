//! The internal model every dialect translates into. The proxy only ever sees these types.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Serialize, Serializer};

/// Resources are identified by mesh and name, as in Kuma.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ResourceKey {
    pub mesh: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.mesh, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    /// The app speaks TLS itself: passed through, and a tunnel must open with a ClientHello
    /// naming the destination (Istio's HTTPS and TLS ports).
    Tls,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp | Protocol::Tls)
    }

    /// `http2` and `grpc` always speak HTTP/2 to the endpoint.
    pub fn requires_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

/// An external service: where it is and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ExternalService {
    pub key: ResourceKey,
    pub port: u16,
    pub protocol: Protocol,
    /// Where traffic goes. Empty only for a service addressed by `hosts` or `addresses` whose
    /// traffic goes to the name or address the app gave, once checked (Istio's resolution NONE).
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<TlsOrigination>,
    /// Names the app may address the service by at `port`, besides its endpoints: DNS names or
    /// `*.suffix` wildcards (Istio's and Gloo's `hosts`).
    pub hosts: Vec<String>,
    /// Addresses and ranges the app may address the service by at `port` (Istio's and Gloo's
    /// `addresses`).
    pub addresses: Vec<Cidr>,
    pub load_balancer: LoadBalancer,
    /// How much traffic each endpoint takes, one weight per endpoint in order (Istio's
    /// `endpoints[].weight`); empty when they all take the same.
    pub endpoint_weights: Vec<u32>,
}

/// How a connection picks one of several endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections of two picked at random.
    LeastRequest,
    Random,
}

/// An IP network: an address and how many leading bits of it are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `a.b.c.d`, `a.b.c.d/n`, an IPv6 address or `v6/n`. Host bits must be zero, as Istio and
    /// Kubernetes require, so a range is written one way only.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "{text:?}: the prefix length must be a number from 0 to {max}"
                    ))
                }
            },
        };
        let cidr = Cidr { ip, prefix };
        if cidr.network() != ip {
            return Err(format!(
                "{text:?} has bits set past its /{prefix} prefix; write it as {}/{prefix}",
                cidr.network()
            ));
        }
        // An IPv4 range written in IPv6's mapped form is that IPv4 range: connections are
        // checked by their IPv4 address.
        if let (IpAddr::V6(v6), true) = (ip, prefix >= 96) {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Ok(Cidr {
                    ip: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(cidr)
    }

    fn bits(ip: IpAddr) -> (u128, u8) {
        match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    fn mask(width: u8, prefix: u8) -> u128 {
        let all = if width == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if prefix == 0 {
            0
        } else {
            all & !((1u128 << (width - prefix.min(width))) - 1)
        }
    }

    /// The range's first address.
    pub fn network(&self) -> IpAddr {
        let (value, width) = Self::bits(self.ip);
        let net = value & Self::mask(width, self.prefix);
        match self.ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(net as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(net)),
        }
    }

    /// Whether `ip` is in the range; an IPv4 address is never in an IPv6 range or the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (value, width) = Self::bits(ip);
        let (net, net_width) = Self::bits(self.ip);
        if width != net_width {
            return false;
        }
        let mask = Self::mask(width, self.prefix);
        value & mask == net & mask
    }

    /// Whether the range is one address.
    pub fn is_single(&self) -> bool {
        self.prefix == Self::bits(self.ip).1
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.ip) || other.contains(self.ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.ip)
        } else {
            write!(f, "{}/{}", self.ip, self.prefix)
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Endpoint {
    Ip { ip: IpAddr, port: u16 },
    Dns { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl Endpoint {
    /// The name used for Host rewriting and as default SNI: a DNS name or IP; none for unix sockets.
    pub fn host(&self) -> Option<String> {
        match self {
            Endpoint::Ip { ip, .. } => Some(ip.to_string()),
            Endpoint::Dns { host, .. } => Some(host.clone()),
            Endpoint::Unix { .. } => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ip {
                ip: IpAddr::V6(ip),
                port,
            } => write!(f, "[{ip}]:{port}"),
            Endpoint::Ip { ip, port } => write!(f, "{ip}:{port}"),
            Endpoint::Dns { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum VerificationMode {
    Secured,
    SkipSAN,
    SkipCA,
    SkipAll,
}

impl VerificationMode {
    pub fn checks_chain(self) -> bool {
        matches!(self, VerificationMode::Secured | VerificationMode::SkipSAN)
    }

    pub fn checks_names(self) -> bool {
        matches!(self, VerificationMode::Secured | VerificationMode::SkipCA)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum SanMatch {
    Exact(String),
    Prefix(String),
}

impl SanMatch {
    pub fn matches(&self, san: &str) -> bool {
        match self {
            SanMatch::Exact(v) => v.eq_ignore_ascii_case(san) || v == san,
            SanMatch::Prefix(p) => san.starts_with(p.as_str()),
        }
    }
}

/// TLS the proxy originates towards the endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsOrigination {
    /// Inclusive bounds; `None` means no bound (TLSAuto).
    pub min_version: Option<TlsVersion>,
    pub max_version: Option<TlsVersion>,
    pub allow_renegotiation: bool,
    pub mode: VerificationMode,
    /// SNI and the name the certificate must carry; defaults to the endpoint's host.
    pub server_name: Option<String>,
    pub subject_alt_names: Vec<SanMatch>,
    /// PEM; system roots when absent.
    pub ca_cert: Option<Material>,
    pub client_cert: Option<ClientIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ClientIdentity {
    pub cert: Material,
    pub key: Material,
}

/// Certificate or key bytes with where they came from. Never printed: `Debug` and `Serialize`
/// show only the origin and the length, so keys cannot leak into logs or config dumps.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Material {
    pub origin: String,
    pub pem: Vec<u8>,
    /// A PEM file on the proxy's host, read by the proxy when it applies the service (Istio's
    /// `caCertificates`, `clientCertificate` and `privateKey`); `pem` is then empty.
    pub file: Option<PathBuf>,
}

impl Material {
    pub fn inline(origin: impl Into<String>, pem: Vec<u8>) -> Self {
        Self {
            origin: origin.into(),
            pem,
            file: None,
        }
    }

    pub fn file(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            origin: format!("file {}", path.display()),
            pem: Vec::new(),
            file: Some(path),
        }
    }
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Material({}, {} bytes redacted)",
            self.origin,
            self.pem.len()
        )
    }
}

impl Serialize for Material {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "<{}: {} bytes, redacted>",
            self.origin,
            self.pem.len()
        ))
    }
}

/// A listener of the local proxy that sends everything it accepts to one external service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Outbound {
    /// The Dataplane that declared it.
    pub dataplane: ResourceKey,
    pub address: IpAddr,
    pub port: u16,
    pub service: ResourceKey,
}

/// Mesh-wide: `Allowed` passes unregistered destinations through (logged and counted) so users
/// can see what to register; `Restricted` passes only what the registry opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTrafficPolicy {
    Allowed,
    Restricted,
}

impl OutboundTrafficPolicy {
    /// The names Istio users know the modes by.
    pub fn istio_name(self) -> &'static str {
        match self {
            OutboundTrafficPolicy::Allowed => "ALLOW_ANY",
            OutboundTrafficPolicy::Restricted => "REGISTRY_ONLY",
        }
    }

    /// The names Sluice's own flags and commands use.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundTrafficPolicy::Allowed => "allowed",
            OutboundTrafficPolicy::Restricted => "restricted",
        }
    }
}

/// Either name: `allowed`/`ALLOW_ANY` or `restricted`/`REGISTRY_ONLY`.
impl std::str::FromStr for OutboundTrafficPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allowed" | "ALLOW_ANY" => Ok(OutboundTrafficPolicy::Allowed),
            "restricted" | "REGISTRY_ONLY" => Ok(OutboundTrafficPolicy::Restricted),
            _ => Err(format!(
                "\"{s}\" is not a policy; use allowed or restricted"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (text, inside, outside) in [
            ("10.0.0.0/8", "10.255.1.2", "11.0.0.1"),
            ("192.168.1.7", "192.168.1.7", "192.168.1.8"),
            ("0.0.0.0/0", "8.8.8.8", "::1"),
            ("2001:db8::/32", "2001:db8:ffff::1", "2001:db9::1"),
            ("fd00::1", "fd00::1", "10.0.0.1"),
            ("::ffff:10.0.0.0/104", "10.1.2.3", "11.0.0.1"),
        ] {
            let c = Cidr::parse(text).unwrap();
            assert!(c.contains(ip(inside)), "{text} holds {inside}");
            assert!(!c.contains(ip(outside)), "{text} lacks {outside}");
            if !text.starts_with("::ffff:") {
                assert_eq!(c.to_string(), text);
            }
        }
        for (text, error) in [
            (
                "10.0.0.1/8",
                "\"10.0.0.1/8\" has bits set past its /8 prefix; write it as 10.0.0.0/8",
            ),
            (
                "10.0.0.0/33",
                "\"10.0.0.0/33\": the prefix length must be a number from 0 to 32",
            ),
            (
                "10.0.0.0/+8",
                "\"10.0.0.0/+8\": the prefix length must be a number from 0 to 32",
            ),
            (
                "db.example.com",
                "\"db.example.com\" is not an IP address or CIDR range",
            ),
        ] {
            assert_eq!(Cidr::parse(text), Err(error.to_string()), "{text}");
        }
        let a = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(a.overlaps(&Cidr::parse("10.1.0.0/16").unwrap()));
        assert!(!a.overlaps(&Cidr::parse("11.0.0.0/8").unwrap()));
    }

    #[test]
    fn policies_read_by_either_name() {
        for mode in [
            OutboundTrafficPolicy::Allowed,
            OutboundTrafficPolicy::Restricted,
        ] {
            assert_eq!(mode.as_str().parse(), Ok(mode));
            assert_eq!(mode.istio_name().parse(), Ok(mode));
        }
        assert_eq!(
            "open".parse::<OutboundTrafficPolicy>(),
            Err("\"open\" is not a policy; use allowed or restricted".to_string())
        );
    }
}
