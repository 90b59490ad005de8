//! Kuma's legacy `ExternalService`: `tags` (with the mandatory `kuma.io/service`) and
//! `networking.{address, tls}`. Translated into the same spec a `MeshExternalService` gives:
//! one endpoint, port 80 for the app (Kuma's `NAME.mesh:80`), TLS originated when
//! `tls.enabled`.

use crate::diag::Diagnostics;
use crate::model::{Endpoint, Protocol};
use crate::names::{is_dns_name, parse_ip};
use crate::node::{child_path, At};
use crate::resource::{Meta, Pem};

use super::mesh_external_service::{parse_data_source, server_name};
use super::{MesSpec, TlsSpec};

/// The tag Dataplane outbounds select an ExternalService by.
pub const SERVICE_TAG: &str = "kuma.io/service";
pub const PROTOCOL_TAG: &str = "kuma.io/protocol";
pub const ZONE_TAG: &str = "kuma.io/zone";

/// The port Kuma gives every ExternalService under its `.mesh` name.
pub const MESH_PORT: u16 = 80;

#[derive(Debug, Clone)]
pub struct ExternalServiceResource {
    pub meta: Meta,
    /// `tags["kuma.io/service"]`; `None` only when missing or invalid (an error was reported).
    pub service: Option<String>,
    pub spec: MesSpec,
}

/// Reads `tags` and `networking` from `top` (the universal document or the `spec` mapping).
pub fn parse(top: &mut crate::node::Obj<'_>, d: &mut Diagnostics) -> (Option<String>, MesSpec) {
    let mut spec = MesSpec {
        port: Some(MESH_PORT),
        ..MesSpec::default()
    };
    let service = top
        .required("tags", d)
        .and_then(|t| parse_tags(&t, &mut spec, d));
    if let Some(n) = top.required("networking", d) {
        parse_networking(&n, &mut spec, d);
    }
    (service, spec)
}

fn parse_tags(at: &At<'_>, spec: &mut MesSpec, d: &mut Diagnostics) -> Option<String> {
    if !at.value.is_object() {
        at.obj(d);
        return None;
    }
    let tags = at.string_map(d);
    let tag = |key: &str| tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let path = |key: &str| child_path(at.path(), key);
    if let Some(p) = tag(PROTOCOL_TAG) {
        spec.protocol = match p {
            "tcp" => Protocol::Tcp,
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "kafka" => {
                d.warn(
                    &path(PROTOCOL_TAG),
                    "kafka is carried as tcp: Sluice has no Kafka-specific metrics; use tcp to silence this",
                );
                Protocol::Tcp
            }
            other => {
                d.error(
                    &path(PROTOCOL_TAG),
                    format!("must be one of tcp, http, http2, grpc, kafka; found {other:?}"),
                );
                Protocol::Tcp
            }
        };
    }
    if tag(ZONE_TAG).is_some() {
        d.warn(
            &path(ZONE_TAG),
            "has no effect: Sluice runs one zone, and every proxy reaches the service directly; remove it to silence this",
        );
    }
    let Some(service) = tag(SERVICE_TAG) else {
        d.error(
            &path(SERVICE_TAG),
            "is required: it is the name Dataplane outbounds select this service by (tags: {kuma.io/service: NAME}); add it, for example derived from the address's host",
        );
        return None;
    };
    if !is_service_tag(service) {
        d.error(
            &path(SERVICE_TAG),
            format!("{service:?} is not a valid service name: use letters, digits, '-', '_', '.' and ':', starting and ending with a letter or digit"),
        );
        return None;
    }
    Some(service.to_string())
}

/// What Kuma accepts as a `kuma.io/service` value.
fn is_service_tag(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn parse_networking(at: &At<'_>, spec: &mut MesSpec, d: &mut Diagnostics) {
    let Some(mut n) = at.obj(d) else { return };
    if let Some(a) = n.required("address", d) {
        if let Some(text) = a.text(d) {
            match parse_address(text) {
                Ok(e) => spec.endpoints.push(e),
                Err(message) => d.error(a.path(), message),
            }
        }
    }
    if let Some(off) = n.get("disableHostDNSEntry") {
        if off.bool(d) == Some(true) {
            d.warn(
                off.path(),
                "has no effect yet: Sluice's forward proxy checks the address's own host and port whatever this says; remove it to silence this",
            );
        }
    }
    if let Some(t) = n.get("tls") {
        spec.tls = parse_tls(&t, d);
    }
    n.finish(d);
}

/// `host:port`, `ip:port` or `[ipv6]:port`.
pub fn parse_address(text: &str) -> Result<Endpoint, String> {
    let like = "like httpbin.org:443, 10.0.0.5:5432 or [2001:db8::5]:5432";
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} must be HOST:PORT, {like}"));
    };
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{text:?}: write an IPv6 address in brackets, like [2001:db8::5]:5432"
        ));
    }
    let port: u16 = match port.parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => p as u16,
        Ok(p) => {
            return Err(format!(
                "{text:?}: port {p} is out of range; it must be from 1 to 65535"
            ))
        }
        Err(_) => {
            return Err(format!(
                "{text:?}: the port {port:?} is not a number; give HOST:PORT, {like}"
            ))
        }
    };
    if let Some(ip) = parse_ip(host) {
        return Ok(Endpoint::Ip { ip, port });
    }
    if host.starts_with('[') {
        return Err(format!("{text:?}: {host} is not an IPv6 address"));
    }
    if is_dns_name(host) {
        return Ok(Endpoint::Dns {
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            port,
        });
    }
    Err(format!(
        "{text:?}: {host:?} is not a DNS name or IP address; give HOST:PORT, {like}"
    ))
}

fn parse_tls(at: &At<'_>, d: &mut Diagnostics) -> Option<TlsSpec> {
    let mut t = at.obj(d)?;
    let enabled = t.get("enabled").and_then(|e| e.bool(d)).unwrap_or(false);
    let mut tls = TlsSpec::default();
    if let Some(r) = t.get("allowRenegotiation") {
        if r.bool(d) == Some(true) && enabled {
            d.warn(
                r.path(),
                "has no effect: Sluice never renegotiates TLS and declines a server's request to; remove it",
            );
        }
    }
    // Kuma 1.x called it `sni`.
    match (t.get("serverName"), t.get("sni")) {
        (Some(_), Some(sni)) => d.error(
            sni.path(),
            "is the old name of serverName, which is also set; keep only serverName",
        ),
        (Some(s), None) | (None, Some(s)) => tls.server_name = server_name(&s, d),
        (None, None) => {}
    }
    tls.ca_cert = t
        .get("caCert")
        .and_then(|s| parse_data_source(&s, Pem::Certificates, d));
    let cert = t.get("clientCert");
    let key = t.get("clientKey");
    for (given, missing, name) in [(&cert, &key, "clientKey"), (&key, &cert, "clientCert")] {
        if given.is_some() && missing.is_none() {
            d.error(
                &t.child_path(name),
                "is required with the other: mTLS needs both the certificate and its key",
            );
        }
    }
    tls.client_cert = cert.and_then(|s| parse_data_source(&s, Pem::Certificates, d));
    tls.client_key = key.and_then(|s| parse_data_source(&s, Pem::PrivateKey, d));
    let settings = ["serverName", "sni", "caCert", "clientCert", "clientKey"]
        .into_iter()
        .any(|k| t.has(k));
    if !enabled && settings {
        d.warn(
            t.path(),
            "enabled is not true, so no TLS is originated and serverName, caCert, clientCert and clientKey have no effect; set enabled: true to use them",
        );
    }
    t.finish(d);
    enabled.then_some(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let dns = |h: &str, port| {
            Ok(Endpoint::Dns {
                host: h.into(),
                port,
            })
        };
        let ip = |s: &str, port| {
            Ok(Endpoint::Ip {
                ip: s.parse().unwrap(),
                port,
            })
        };
        let cases: Vec<(&str, Result<Endpoint, String>)> = vec![
            ("httpbin.org:443", dns("httpbin.org", 443)),
            ("HttpBin.org.:443", dns("httpbin.org", 443)),
            ("10.0.0.5:5432", ip("10.0.0.5", 5432)),
            ("[2001:db8::5]:5432", ip("2001:db8::5", 5432)),
            ("httpbin.org", Err("\"httpbin.org\" must be HOST:PORT, like httpbin.org:443, 10.0.0.5:5432 or [2001:db8::5]:5432".into())),
            ("httpbin.org:70000", Err("\"httpbin.org:70000\": port 70000 is out of range; it must be from 1 to 65535".into())),
            ("httpbin.org:0", Err("\"httpbin.org:0\": port 0 is out of range; it must be from 1 to 65535".into())),
            ("httpbin.org:https", Err("\"httpbin.org:https\": the port \"https\" is not a number; give HOST:PORT, like httpbin.org:443, 10.0.0.5:5432 or [2001:db8::5]:5432".into())),
            ("2001:db8::5:5432", Err("\"2001:db8::5:5432\": write an IPv6 address in brackets, like [2001:db8::5]:5432".into())),
            ("[nope]:80", Err("\"[nope]:80\": [nope] is not an IPv6 address".into())),
            ("bad_host:80", Err("\"bad_host:80\": \"bad_host\" is not a DNS name or IP address; give HOST:PORT, like httpbin.org:443, 10.0.0.5:5432 or [2001:db8::5]:5432".into())),
            (":80", Err("\":80\": \"\" is not a DNS name or IP address; give HOST:PORT, like httpbin.org:443, 10.0.0.5:5432 or [2001:db8::5]:5432".into())),
        ];
        for (text, want) in cases {
            assert_eq!(parse_address(text), want, "{text}");
        }
    }

    #[test]
    fn service_tags() {
        for (v, ok) in [
            ("httpbin", true),
            ("httpbin_default_svc_80", true),
            ("api.example.com:443", true),
            ("", false),
            ("-a", false),
            ("a b", false),
        ] {
            assert_eq!(is_service_tag(v), ok, "{v:?}");
        }
    }
}
