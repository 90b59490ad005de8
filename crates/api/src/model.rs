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
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// `http2` and `grpc` always speak HTTP/2 to the endpoint.
    pub fn requires_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
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
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<TlsOrigination>,
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
