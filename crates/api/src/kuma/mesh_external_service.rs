//! `MeshExternalService.spec`: match, endpoints, tls, extension.

use std::path::PathBuf;

use crate::diag::Diagnostics;
use crate::model::{Endpoint, Protocol, SanMatch, TlsVersion, VerificationMode};
use crate::names::{is_dns_name, parse_ip};
use crate::node::At;
use crate::resource::Meta;

#[derive(Debug, Clone)]
pub struct MeshExternalServiceResource {
    pub meta: Meta,
    pub spec: MesSpec,
}

#[derive(Debug, Clone)]
pub struct MesSpec {
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<TlsSpec>,
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

/// A data source and the path it was written at, for errors found when resolving it.
#[derive(Debug, Clone)]
pub struct Sourced {
    pub path: String,
    pub source: DataSource,
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

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> Option<MesSpec> {
    let mut spec = spec.obj(d)?;
    let (port, protocol) = match spec.required("match", d) {
        Some(m) => parse_match(&m, d),
        None => (None, Protocol::Tcp),
    };
    let extension = spec.get("extension");
    if let Some(ext) = &extension {
        parse_extension(ext, d);
    }
    let endpoints = match spec.get("endpoints") {
        Some(list) => {
            let items = list.list(d);
            if items.is_empty() && extension.is_none() {
                d.error(list.path(), "must list at least one endpoint");
            }
            items.iter().filter_map(|e| parse_endpoint(e, d)).collect()
        }
        None => {
            if extension.is_none() {
                d.error(
                    &format!("{}.endpoints", spec.path()),
                    "is required: list at least one endpoint (address and port)",
                );
            }
            Vec::new()
        }
    };
    let tls = spec.get("tls").and_then(|t| parse_tls(&t, d));
    spec.finish(d);
    Some(MesSpec {
        port: port?,
        protocol,
        endpoints,
        tls,
    })
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
                    format!("must be \"HostnameGenerator\" (the only match type), found \"{v}\""),
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
                        format!("must be one of tcp, http, http2, grpc; found \"{v}\""),
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

fn parse_extension(ext: &At<'_>, d: &mut Diagnostics) {
    let Some(mut e) = ext.obj(d) else { return };
    let ty = e.required("type", d).and_then(|t| t.text(d));
    e.allow("config");
    e.finish(d);
    if let Some(ty) = ty {
        d.error(
            ext.path(),
            format!("extension type \"{ty}\" is not supported by Sluice; remove spec.extension and list spec.endpoints instead"),
        );
    }
}

fn parse_endpoint(e: &At<'_>, d: &mut Diagnostics) -> Option<Endpoint> {
    let mut e = e.obj(d)?;
    let address_at = e.required("address", d);
    let port_at = e.get("port");
    let port = port_at.as_ref().and_then(|p| p.port(d));
    e.finish(d);
    let address_at = address_at?;
    let address = address_at.text(d)?;
    if let Some(rest) = address.strip_prefix("unix://") {
        if let Some(p) = &port_at {
            d.error(p.path(), "must not be set for a unix socket address");
            return None;
        }
        if !rest.starts_with('/') || rest.len() < 2 {
            d.error(
                address_at.path(),
                format!("\"{address}\" must name an absolute socket path, like unix:///var/run/service.sock"),
            );
            return None;
        }
        return Some(Endpoint::Unix {
            path: PathBuf::from(rest),
        });
    }
    let host = if let Some(ip) = parse_ip(address) {
        Some(Endpoint::Ip { ip, port: 0 })
    } else if is_dns_name(address) {
        Some(Endpoint::Dns {
            host: address.trim_end_matches('.').to_ascii_lowercase(),
            port: 0,
        })
    } else {
        d.error(
            address_at.path(),
            format!("\"{address}\" is not an IP address, a DNS name or unix:///path"),
        );
        None
    };
    if port_at.is_none() {
        d.error(
            &format!("{}.port", e_path(address_at.path())),
            "is required for an IP or DNS address",
        );
        return None;
    }
    let port = port?;
    match host? {
        Endpoint::Ip { ip, .. } => Some(Endpoint::Ip { ip, port }),
        Endpoint::Dns { host, .. } => Some(Endpoint::Dns { host, port }),
        unix => Some(unix),
    }
}

/// `spec.endpoints[0].address` -> `spec.endpoints[0]`.
fn e_path(address_path: &str) -> &str {
    address_path
        .strip_suffix(".address")
        .unwrap_or(address_path)
}

fn parse_tls(t: &At<'_>, d: &mut Diagnostics) -> Option<TlsSpec> {
    let mut t = t.obj(d)?;
    let enabled = t.get("enabled").and_then(|e| e.bool(d)).unwrap_or(false);
    let (min, max) = match t.get("version") {
        Some(v) => parse_versions(&v, d),
        None => (None, None),
    };
    let allow_renegotiation = t
        .get("allowRenegotiation")
        .and_then(|a| a.bool(d))
        .unwrap_or(false);
    let verification = t.get("verification");
    let mut spec = TlsSpec {
        min,
        max,
        allow_renegotiation,
        mode: VerificationMode::Secured,
        server_name: None,
        subject_alt_names: Vec::new(),
        ca_cert: None,
        client_cert: None,
        client_key: None,
    };
    if let Some(v) = &verification {
        parse_verification(v, &mut spec, d);
    }
    if !enabled && (verification.is_some() || t.has("version")) {
        d.warn(
            t.path(),
            "tls.enabled is false, so no TLS is originated and these settings have no effect; set enabled: true to use them",
        );
    }
    t.finish(d);
    enabled.then_some(spec)
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
                    format!("must be one of TLSAuto, TLS12, TLS13; found \"{other}\""),
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
                "min is above max: no TLS version is left; lower min or raise max",
            );
        }
    }
    v.finish(d);
    (min, max)
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
                            "must be one of Secured, SkipSAN, SkipCA, SkipAll; found \"{other}\""
                        ),
                    );
                    VerificationMode::Secured
                }
            };
        }
    }
    if let Some(s) = v.get("serverName") {
        if let Some(name) = s.text(d) {
            if is_dns_name(name) {
                spec.server_name = Some(name.trim_end_matches('.').to_ascii_lowercase());
            } else if let Some(ip) = parse_ip(name) {
                spec.server_name = Some(ip.to_string());
            } else {
                d.error(
                    s.path(),
                    format!("\"{name}\" is not a valid DNS name or IP address"),
                );
            }
        }
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
                            format!("must be Exact or Prefix, found \"{other}\""),
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
    spec.ca_cert = v.get("caCert").and_then(|s| parse_data_source(&s, d));
    let cert = v.get("clientCert");
    let key = v.get("clientKey");
    match (&cert, &key) {
        (Some(_), None) => d.error(
            &format!("{}.clientKey", v.path()),
            "is required when clientCert is set: mTLS needs both the certificate and its key",
        ),
        (None, Some(_)) => d.error(
            &format!("{}.clientCert", v.path()),
            "is required when clientKey is set: mTLS needs both the certificate and its key",
        ),
        _ => {}
    }
    spec.client_cert = cert.and_then(|s| parse_data_source(&s, d));
    spec.client_key = key.and_then(|s| parse_data_source(&s, d));
    v.finish(d);
}

/// Exactly one of `inline` (base64), `inlineString` (text) or `secret` (a Secret's name).
fn parse_data_source(at: &At<'_>, d: &mut Diagnostics) -> Option<Sourced> {
    let mut o = at.obj(d)?;
    let mut found = Vec::new();
    if let Some(i) = o.get("inline") {
        if let Some(text) = i.text(d) {
            found.extend(super::decode_base64(text, i.path(), d).map(DataSource::Inline));
        }
    }
    if let Some(i) = o.get("inlineString") {
        found.extend(i.text(d).map(|s| DataSource::InlineString(s.to_string())));
    }
    if let Some(i) = o.get("secret") {
        found.extend(i.text(d).map(|s| DataSource::Secret(s.to_string())));
    }
    for refused in ["file", "env", "envVar"] {
        if o.has(refused) {
            d.error(
                &format!("{}.{refused}", at.path()),
                "is not a supported data source: Sluice reads certificates and keys only from resources; put the PEM in a Secret and reference it with secret: NAME, or use inlineString",
            );
        }
    }
    o.allow("file");
    o.allow("env");
    o.allow("envVar");
    let count = ["inline", "inlineString", "secret"]
        .iter()
        .filter(|k| o.has(k))
        .count();
    o.finish(d);
    if count == 0
        && !["file", "env", "envVar"]
            .iter()
            .any(|k| at.value.get(k).is_some())
    {
        d.error(at.path(), "must set one of inline, inlineString or secret");
        return None;
    }
    if count > 1 {
        d.error(
            at.path(),
            "must set only one of inline, inlineString or secret",
        );
        return None;
    }
    let source = found.pop()?;
    Some(Sourced {
        path: at.path().to_string(),
        source,
    })
}
