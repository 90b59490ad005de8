//! `MeshExternalService.spec`: match, endpoints, tls, extension.

use std::path::PathBuf;

use crate::diag::Diagnostics;
use crate::model::{Endpoint, Protocol, SanMatch, TlsVersion, VerificationMode};
use crate::names::{is_dns_name, parse_ip};
use crate::node::At;
use crate::resource::{Meta, Pem};

#[derive(Debug, Clone)]
pub struct MeshExternalServiceResource {
    pub meta: Meta,
    pub spec: MesSpec,
}

/// What could be read of a spec; when its document has errors, some parts may be missing.
#[derive(Debug, Clone)]
pub struct MesSpec {
    /// `match.port`; `None` only when it is missing or invalid (an error was reported).
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<TlsSpec>,
}

impl Default for MesSpec {
    fn default() -> Self {
        Self {
            port: None,
            protocol: Protocol::Tcp,
            endpoints: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsSpec {
    pub min: Option<TlsVersion>,
    pub max: Option<TlsVersion>,
    pub allow_renegotiation: bool,
    pub mode: VerificationMode,
    pub server_name: Option<String>,
    pub subject_alt_names: Vec<SanMatch>,
    pub ca_cert: Option<Sourced>,
    pub client_cert: Option<Sourced>,
    pub client_key: Option<Sourced>,
}

/// Verified against the system roots, any version, no client certificate.
impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            min: None,
            max: None,
            allow_renegotiation: false,
            mode: VerificationMode::Secured,
            server_name: None,
            subject_alt_names: Vec::new(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// A data source and the path of the field that gave it (`...caCert.secret`), for errors
/// found when resolving it.
#[derive(Debug, Clone)]
pub struct Sourced {
    pub path: String,
    pub source: DataSource,
    /// What it must hold: inline material is checked when read, a Secret when resolved.
    pub want: Pem,
}

#[derive(Clone)]
pub enum DataSource {
    Inline(Vec<u8>),
    InlineString(String),
    Secret(String),
}

impl std::fmt::Debug for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::Inline(b) => write!(f, "Inline(<{} bytes>)", b.len()),
            DataSource::InlineString(s) => write!(f, "InlineString(<{} bytes>)", s.len()),
            DataSource::Secret(name) => write!(f, "Secret({name})"),
        }
    }
}

/// The longest path a unix socket address can hold (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> MesSpec {
    let mut out = MesSpec::default();
    let Some(mut spec) = spec.obj(d) else {
        return out;
    };
    if let Some(m) = spec.required("match", d) {
        (out.port, out.protocol) = parse_match(&m, d);
    }
    let extension = spec.get("extension");
    if let Some(ext) = &extension {
        parse_extension(ext, d);
    }
    match spec.get("endpoints") {
        Some(list) => {
            // With an extension the one error about it says what to do instead.
            if list.value.as_array().is_some_and(Vec::is_empty) && extension.is_none() {
                d.error(
                    list.path(),
                    "must list at least one endpoint (address and port)",
                );
            }
            out.endpoints = list
                .list(d)
                .iter()
                .filter_map(|e| parse_endpoint(e, d))
                .collect();
        }
        None if extension.is_none() => d.error(
            &spec.child_path("endpoints"),
            "is required: list at least one endpoint (address and port)",
        ),
        None => {}
    }
    out.tls = spec.get("tls").and_then(|t| parse_tls(&t, d));
    if let Some(tls) = &out.tls {
        // The proxy sends the endpoint's host as SNI and checks the certificate against it;
        // a socket has none.
        if tls.server_name.is_none() && out.endpoints.iter().any(|e| e.host().is_none()) {
            d.error(
                &format!("{}.verification.serverName", spec.child_path("tls")),
                "is required when TLS is originated to a unix socket endpoint: a socket has no host name to send as SNI and to verify; set the name the server's certificate carries",
            );
        }
    }
    spec.finish(d);
    out
}

fn parse_match(m: &At<'_>, d: &mut Diagnostics) -> (Option<u16>, Protocol) {
    let Some(mut m) = m.obj(d) else {
        return (None, Protocol::Tcp);
    };
    if let Some(t) = m.get("type") {
        if let Some(v) = t.text(d) {
            if v != "HostnameGenerator" {
                d.error(
                    t.path(),
                    format!("must be \"HostnameGenerator\" (the only match type), found {v:?}"),
                );
            }
        }
    }
    let port = m.required("port", d).and_then(|p| p.port(d));
    let protocol = m
        .get("protocol")
        .and_then(|p| {
            let v = p.text(d)?;
            let parsed = match v {
                "tcp" => Protocol::Tcp,
                "http" => Protocol::Http,
                "http2" => Protocol::Http2,
                "grpc" => Protocol::Grpc,
                _ => {
                    d.error(
                        p.path(),
                        format!("must be one of tcp, http, http2, grpc; found {v:?}"),
                    );
                    return None;
                }
            };
            Some(parsed)
        })
        .unwrap_or(Protocol::Tcp);
    m.finish(d);
    (port, protocol)
}

/// Sluice runs no extension, so any `extension` is one error, whatever it holds.
fn parse_extension(ext: &At<'_>, d: &mut Diagnostics) {
    let Some(mut e) = ext.obj(d) else { return };
    let ty = e.get("type").and_then(|t| t.text(d));
    e.allow("config");
    e.finish(d);
    let what = match ty {
        Some(ty) => format!("extension type {ty:?} is not supported"),
        None => "extensions are not supported".to_string(),
    };
    d.error(
        ext.path(),
        format!("{what}: Sluice runs no extension; remove spec.extension and list spec.endpoints instead"),
    );
}

fn parse_endpoint(e: &At<'_>, d: &mut Diagnostics) -> Option<Endpoint> {
    let mut e = e.obj(d)?;
    let address_at = e.required("address", d);
    let port_at = e.get("port");
    let address = address_at.as_ref().and_then(|a| a.text(d));
    let endpoint = match (address_at.as_ref(), address) {
        (Some(at), Some(address)) if address.starts_with("unix:") => {
            if let Some(p) = &port_at {
                d.error(
                    p.path(),
                    "must not be set for a unix socket address; remove it",
                );
            }
            let path = unix_path(address, at.path(), d);
            path.filter(|_| port_at.is_none())
                .map(|path| Endpoint::Unix { path })
        }
        (address_at, address) => {
            let host = address_at.zip(address).and_then(|(at, address)| {
                if let Some(ip) = parse_ip(address) {
                    Some(Host::Ip(ip))
                } else if is_dns_name(address) {
                    Some(Host::Dns(
                        address.trim_end_matches('.').to_ascii_lowercase(),
                    ))
                } else {
                    d.error(
                        at.path(),
                        format!("{address:?} is not an IP address, a DNS name or unix:///path"),
                    );
                    None
                }
            });
            let port = match &port_at {
                Some(p) => p.port(d),
                None => {
                    // Without an address it might have been meant as a socket.
                    if address.is_some() {
                        d.error(
                            &e.child_path("port"),
                            "is required for an IP or DNS address",
                        );
                    }
                    None
                }
            };
            match (host?, port?) {
                (Host::Ip(ip), port) => Some(Endpoint::Ip { ip, port }),
                (Host::Dns(host), port) => Some(Endpoint::Dns { host, port }),
            }
        }
    };
    e.finish(d);
    endpoint
}

enum Host {
    Ip(std::net::IpAddr),
    Dns(String),
}

/// `unix:///absolute/path` -> `/absolute/path`.
fn unix_path(address: &str, path: &str, d: &mut Diagnostics) -> Option<PathBuf> {
    let socket = address
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/') && p.len() > 1 && !p.contains('\0'));
    let Some(socket) = socket else {
        d.error(
            path,
            format!("{address:?} must be unix:// followed by an absolute socket path, like unix:///var/run/service.sock"),
        );
        return None;
    };
    if socket.len() > MAX_UNIX_PATH {
        d.error(
            path,
            format!(
                "socket path is {} bytes, more than the {MAX_UNIX_PATH} a unix socket address holds; use a shorter path",
                socket.len()
            ),
        );
        return None;
    }
    Some(PathBuf::from(socket))
}

fn parse_tls(at: &At<'_>, d: &mut Diagnostics) -> Option<TlsSpec> {
    let mut t = at.obj(d)?;
    // `None`: not given; `Some(None)`: given but invalid (already reported).
    let enabled = t.get("enabled").map(|e| e.bool(d));
    let (min, max) = match t.get("version") {
        Some(v) => parse_versions(&v, d),
        None => (None, None),
    };
    let renegotiation = t.get("allowRenegotiation");
    let allow_renegotiation = renegotiation
        .as_ref()
        .and_then(|a| a.bool(d))
        .unwrap_or(false);
    let verification = t.get("verification");
    let mut spec = TlsSpec {
        min,
        max,
        allow_renegotiation,
        ..TlsSpec::default()
    };
    if let Some(v) = &verification {
        parse_verification(v, &mut spec, d);
    }
    let settings = ["version", "verification", "allowRenegotiation"]
        .into_iter()
        .any(|k| t.has(k));
    match enabled {
        Some(Some(true)) => {
            if let Some(r) = renegotiation.filter(|_| allow_renegotiation) {
                d.warn(
                    r.path(),
                    "has no effect: Sluice never renegotiates TLS and declines a server's request to; remove it",
                );
            }
            let v = t.child_path("verification");
            ignored_checks(&spec, &v, verification.as_ref(), d);
        }
        Some(Some(false)) if settings => d.warn(
            t.path(),
            "enabled is false, so no TLS is originated and version, verification and allowRenegotiation have no effect; set enabled: true to use them",
        ),
        None if settings => d.warn(
            t.path(),
            "enabled is not set (it defaults to false), so no TLS is originated and version, verification and allowRenegotiation have no effect; set enabled: true to use them",
        ),
        _ => {}
    }
    t.finish(d);
    (enabled == Some(Some(true))).then_some(spec)
}

/// Warns about checks that the verification mode turns off, and about the modes that leave
/// the endpoint unauthenticated.
fn ignored_checks(spec: &TlsSpec, path: &str, v: Option<&At<'_>>, d: &mut Diagnostics) {
    let mode = spec.mode;
    let mode_name = format!("{mode:?}");
    if !spec.subject_alt_names.is_empty() && !mode.checks_names() {
        d.warn(
            &format!("{path}.subjectAltNames"),
            format!("has no effect with mode {mode_name}, which does not check names; remove it or use mode Secured"),
        );
    }
    if spec.ca_cert.is_some() && !mode.checks_chain() {
        d.warn(
            &format!("{path}.caCert"),
            format!("has no effect with mode {mode_name}, which does not check the certificate chain; remove it or use mode Secured"),
        );
    }
    let unauthenticated = match mode {
        VerificationMode::SkipAll => "checks neither the certificate chain nor its names",
        VerificationMode::SkipCA => {
            "does not check the certificate chain, so a self-signed certificate with the right name is accepted"
        }
        VerificationMode::Secured | VerificationMode::SkipSAN => return,
    };
    if let Some(v) = v {
        d.warn(
            &format!("{}.mode", v.path()),
            format!("{mode_name} {unauthenticated}: anyone on the network path can impersonate the endpoint; use it only for testing"),
        );
    }
}

fn parse_versions(v: &At<'_>, d: &mut Diagnostics) -> (Option<TlsVersion>, Option<TlsVersion>) {
    let Some(mut v) = v.obj(d) else {
        return (None, None);
    };
    let mut one = |key: &'static str, d: &mut Diagnostics| -> (Option<TlsVersion>, bool) {
        let Some(at) = v.get(key) else {
            return (None, true);
        };
        let Some(text) = at.text(d) else {
            return (None, false);
        };
        match text {
            "TLSAuto" => (None, true),
            "TLS12" => (Some(TlsVersion::Tls12), true),
            "TLS13" => (Some(TlsVersion::Tls13), true),
            "TLS10" | "TLS11" => {
                d.error(
                    at.path(),
                    format!("{text} is not supported: Sluice speaks only TLS 1.2 and 1.3; use TLS12, TLS13 or TLSAuto"),
                );
                (None, false)
            }
            other => {
                d.error(
                    at.path(),
                    format!("must be one of TLSAuto, TLS12, TLS13; found {other:?}"),
                );
                (None, false)
            }
        }
    };
    let (min, min_ok) = one("min", d);
    let (max, max_ok) = one("max", d);
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi && min_ok && max_ok {
            d.error(
                v.path(),
                format!(
                    "min {} is above max {}, which leaves no TLS version; lower min or raise max",
                    version_name(lo),
                    version_name(hi)
                ),
            );
        }
    }
    v.finish(d);
    (min, max)
}

fn version_name(v: TlsVersion) -> &'static str {
    match v {
        TlsVersion::Tls12 => "TLS12",
        TlsVersion::Tls13 => "TLS13",
    }
}

fn parse_verification(v: &At<'_>, spec: &mut TlsSpec, d: &mut Diagnostics) {
    let Some(mut v) = v.obj(d) else { return };
    if let Some(m) = v.get("mode") {
        if let Some(text) = m.text(d) {
            spec.mode = match text {
                "Secured" => VerificationMode::Secured,
                "SkipSAN" => VerificationMode::SkipSAN,
                "SkipCA" => VerificationMode::SkipCA,
                "SkipAll" => VerificationMode::SkipAll,
                other => {
                    d.error(
                        m.path(),
                        format!(
                            "must be one of Secured, SkipSAN, SkipCA, SkipAll; found {other:?}"
                        ),
                    );
                    VerificationMode::Secured
                }
            };
        }
    }
    if let Some(s) = v.get("serverName") {
        spec.server_name = server_name(&s, d);
    }
    if let Some(list) = v.get("subjectAltNames") {
        for item in list.list(d) {
            let Some(mut san) = item.obj(d) else { continue };
            let exact = match san.get("type") {
                None => Some(true),
                Some(t) => match t.text(d) {
                    Some("Exact") => Some(true),
                    Some("Prefix") => Some(false),
                    Some(other) => {
                        d.error(
                            t.path(),
                            format!("must be Exact or Prefix, found {other:?}"),
                        );
                        None
                    }
                    None => None,
                },
            };
            let value = san
                .required("value", d)
                .and_then(|v| v.text(d).map(str::to_string));
            san.finish(d);
            if let (Some(exact), Some(value)) = (exact, value) {
                spec.subject_alt_names.push(if exact {
                    SanMatch::Exact(value)
                } else {
                    SanMatch::Prefix(value)
                });
            }
        }
    }
    spec.ca_cert = v
        .get("caCert")
        .and_then(|s| parse_data_source(&s, Pem::Certificates, d));
    let cert = v.get("clientCert");
    let key = v.get("clientKey");
    match (&cert, &key) {
        (Some(_), None) => d.error(
            &v.child_path("clientKey"),
            "is required when clientCert is set: mTLS needs both the certificate and its key",
        ),
        (None, Some(_)) => d.error(
            &v.child_path("clientCert"),
            "is required when clientKey is set: mTLS needs both the certificate and its key",
        ),
        _ => {}
    }
    spec.client_cert = cert.and_then(|s| parse_data_source(&s, Pem::Certificates, d));
    spec.client_key = key.and_then(|s| parse_data_source(&s, Pem::PrivateKey, d));
    v.finish(d);
}

/// A name to send as SNI and to verify: a DNS name (folded to lower case) or an IP address.
pub(crate) fn server_name(at: &At<'_>, d: &mut Diagnostics) -> Option<String> {
    let name = at.text(d)?;
    if let Some(ip) = parse_ip(name) {
        Some(ip.to_string())
    } else if is_dns_name(name) {
        Some(name.trim_end_matches('.').to_ascii_lowercase())
    } else {
        d.error(
            at.path(),
            format!("{name:?} is not a valid DNS name or IP address; give the name the server's certificate carries"),
        );
        None
    }
}

const HOST_SOURCE: &str = "is not a supported data source: Sluice reads certificates and keys only from resources; put the PEM in a Secret and reference it with secret: NAME, or use inlineString";

/// Exactly one of `inline` (base64), `inlineString` (text) or `secret` (a Secret's name). Inline
/// material must hold `want` (checked here, once per document); a Secret's is checked where it
/// is referenced.
pub(crate) fn parse_data_source(at: &At<'_>, want: Pem, d: &mut Diagnostics) -> Option<Sourced> {
    let mut o = at.obj(d)?;
    let mut refused = false;
    for key in ["file", "env", "envVar"] {
        refused |= o.refuse(key, HOST_SOURCE, d);
    }
    let given: Vec<(&str, At<'_>)> = ["inline", "inlineString", "secret"]
        .into_iter()
        .filter_map(|k| o.get(k).map(|at| (k, at)))
        .collect();
    o.finish(d);
    let [(key, one)] = given.as_slice() else {
        if given.len() > 1 {
            let names: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
            d.error(
                at.path(),
                format!(
                    "sets {}; set only one of inline, inlineString or secret",
                    names.join(" and ")
                ),
            );
        } else if !refused {
            d.error(at.path(), "must set one of inline, inlineString or secret");
        }
        return None;
    };
    let source = match *key {
        "inlineString" => DataSource::InlineString(one.text(d)?.to_string()),
        "inline" => {
            let text = one.text(d)?;
            let invalid = if text.trim_start().starts_with("-----BEGIN") {
                "holds PEM text, not base64; move it to inlineString, or base64-encode it"
            } else {
                "is not valid base64; give PEM text with inlineString, or base64-encode it"
            };
            DataSource::Inline(super::decode_base64(text, one.path(), invalid, d)?)
        }
        _ => DataSource::Secret(super::name(one, d)?),
    };
    let inline = match &source {
        DataSource::Inline(bytes) => Some(("decodes to", bytes.as_slice())),
        DataSource::InlineString(text) => Some(("holds", text.as_bytes())),
        DataSource::Secret(_) => None,
    };
    if let Some((holder, _)) = inline.filter(|(_, bytes)| !want.found_in(bytes)) {
        d.error(one.path(), format!("{holder} {}", want.missing()));
    }
    Some(Sourced {
        path: one.path().to_string(),
        source,
        want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_paths() {
        let longest = format!("/{}", "s".repeat(MAX_UNIX_PATH - 1));
        let too_long = format!("/{}", "s".repeat(MAX_UNIX_PATH));
        for (address, want) in [
            (
                "unix:///var/run/service.sock",
                Some("/var/run/service.sock"),
            ),
            ("unix:///a", Some("/a")),
            (&format!("unix://{longest}"), Some(longest.as_str())),
            (&format!("unix://{too_long}"), None),
            ("unix://", None),
            ("unix:///", None),
            ("unix://var/run/service.sock", None),
            ("unix:/var/run/service.sock", None),
            ("unix:///var/run/\0.sock", None),
        ] {
            let mut d = Diagnostics::default();
            let got = unix_path(address, "a", &mut d);
            assert_eq!(got, want.map(PathBuf::from), "{address:?}");
            assert_eq!(d.has_errors(), want.is_none(), "{address:?}");
        }
    }

    fn parse_yaml(yaml: &str) -> (MesSpec, Vec<String>) {
        let value: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
        let mut d = Diagnostics::default();
        let at = At {
            value: &value,
            path: "spec".into(),
        };
        let spec = parse(&at, &mut d);
        let messages = d.into_vec().iter().map(ToString::to_string).collect();
        (spec, messages)
    }

    #[test]
    fn endpoints() {
        for (address, port, want) in [
            ("httpbin.org", Some(80), Ok("httpbin.org:80")),
            ("HTTPBIN.org.", Some(80), Ok("httpbin.org:80")),
            ("203.0.113.10", Some(443), Ok("203.0.113.10:443")),
            ("[2001:db8::1]", Some(443), Ok("[2001:db8::1]:443")),
            ("2001:db8::1", Some(443), Ok("[2001:db8::1]:443")),
            ("unix:///run/s.sock", None, Ok("unix:///run/s.sock")),
            ("unix:///run/s.sock", Some(80), Err("spec.endpoints[0].port: must not be set for a unix socket address; remove it")),
            ("httpbin.org", None, Err("spec.endpoints[0].port: is required for an IP or DNS address")),
            ("127.1", Some(80), Err("spec.endpoints[0].address: \"127.1\" is not an IP address, a DNS name or unix:///path")),
            ("[127.0.0.1]", Some(80), Err("spec.endpoints[0].address: \"[127.0.0.1]\" is not an IP address, a DNS name or unix:///path")),
            ("a\nb", Some(80), Err("spec.endpoints[0].address: \"a\\nb\" is not an IP address, a DNS name or unix:///path")),
        ] {
            let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
            let yaml = format!(
                "{{match: {{port: 80}}, endpoints: [{{address: {}{port}}}]}}",
                serde_json::Value::String(address.into())
            );
            let (spec, messages) = parse_yaml(&yaml);
            match want {
                Ok(endpoint) => {
                    assert_eq!(messages, Vec::<String>::new(), "{address:?}");
                    assert_eq!(spec.endpoints.len(), 1, "{address:?}");
                    assert_eq!(spec.endpoints[0].to_string(), endpoint, "{address:?}");
                }
                Err(message) => {
                    assert_eq!(messages, vec![message.to_string()], "{address:?}");
                    assert!(spec.endpoints.is_empty(), "{address:?}");
                }
            }
        }
    }

    #[test]
    fn tls_versions() {
        for (min, max, want) in [
            ("TLSAuto", "TLSAuto", Ok((None, None))),
            ("TLS12", "TLS13", Ok((Some(TlsVersion::Tls12), Some(TlsVersion::Tls13)))),
            ("TLS13", "TLS13", Ok((Some(TlsVersion::Tls13), Some(TlsVersion::Tls13)))),
            ("TLSAuto", "TLS12", Ok((None, Some(TlsVersion::Tls12)))),
            ("TLS13", "TLS12", Err("spec.tls.version: min TLS13 is above max TLS12, which leaves no TLS version; lower min or raise max")),
            ("TLS10", "TLS12", Err("spec.tls.version.min: TLS10 is not supported: Sluice speaks only TLS 1.2 and 1.3; use TLS12, TLS13 or TLSAuto")),
            ("TLS12", "TLS11", Err("spec.tls.version.max: TLS11 is not supported: Sluice speaks only TLS 1.2 and 1.3; use TLS12, TLS13 or TLSAuto")),
            ("SSLv3", "TLS13", Err("spec.tls.version.min: must be one of TLSAuto, TLS12, TLS13; found \"SSLv3\"")),
        ] {
            let yaml = format!(
                "{{match: {{port: 443}}, endpoints: [{{address: a.example, port: 443}}], tls: {{enabled: true, version: {{min: {min}, max: {max}}}}}}}"
            );
            let (spec, messages) = parse_yaml(&yaml);
            match want {
                Ok(bounds) => {
                    assert_eq!(messages, Vec::<String>::new(), "{min} {max}");
                    let tls = spec.tls.unwrap();
                    assert_eq!((tls.min, tls.max), bounds, "{min} {max}");
                }
                Err(message) => assert_eq!(messages, vec![message.to_string()], "{min} {max}"),
            }
        }
    }
}
