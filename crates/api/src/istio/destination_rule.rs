//! `DestinationRule.spec`: how the proxy talks to a host: load balancing and the TLS it
//! originates, for the whole host or per port.

use crate::diag::Diagnostics;
use crate::model::LoadBalancer;
use crate::names::{is_dns_name, parse_ip};
use crate::node::{At, Obj};

#[derive(Debug, Clone)]
pub struct DestinationRuleResource {
    pub meta: crate::resource::Meta,
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default)]
pub struct DestinationRuleSpec {
    /// A name or `*.suffix`; `None` when missing or invalid (an error was reported).
    pub host: Option<String>,
    /// `trafficPolicy`, for ports without settings of their own.
    pub default: PortPolicy,
    /// `trafficPolicy.portLevelSettings`: each replaces the whole default for its port, as in
    /// Istio (omitted fields take their defaults, not the rule's).
    pub ports: Vec<(u16, PortPolicy)>,
}

impl DestinationRuleSpec {
    pub fn policy(&self, port: u16) -> &PortPolicy {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(&self.default, |(_, policy)| policy)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PortPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
}

/// `tls`: the TLS the proxy originates. Certificates and keys are files on the proxy's host
/// (as in Istio's sidecar), or a Secret named by `credentialName`.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// `...tls`, for errors found when resolving it.
    pub path: String,
    pub mode: TlsMode,
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub credential_name: Option<String>,
    pub sni: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> Option<DestinationRuleSpec> {
    let mut s = spec.obj(d)?;
    let mut out = DestinationRuleSpec {
        host: s
            .required("host", d)
            .and_then(|h| super::host_pattern(&h, d)),
        ..DestinationRuleSpec::default()
    };
    if let Some(tp) = s.get("trafficPolicy") {
        if let Some(mut tp) = tp.obj(d) {
            out.default = port_policy(&mut tp, d);
            if let Some(list) = tp.get("portLevelSettings") {
                for item in list.list(d) {
                    let Some(mut p) = item.obj(d) else { continue };
                    let number = p.required("port", d).and_then(|port| {
                        let mut port = port.obj(d)?;
                        let n = port.required("number", d).and_then(|n| n.port(d));
                        port.finish(d);
                        n
                    });
                    let policy = port_policy(&mut p, d);
                    p.finish(d);
                    let Some(number) = number else { continue };
                    if out.ports.iter().any(|(n, _)| *n == number) {
                        d.error(
                            &format!("{}.port.number", item.path()),
                            format!("port {number} already has settings; give each port once"),
                        );
                    } else {
                        out.ports.push((number, policy));
                    }
                }
            }
            tp.finish(d);
        }
    }
    s.refuse(
        "subsets",
        "Sluice has no subsets: endpoints are not told apart by label; remove them and route to the host itself",
        d,
    );
    for key in ["exportTo", "workloadSelector"] {
        if let Some(v) = s.get(key) {
            d.warn(
                v.path(),
                "has no effect: the rule applies to every proxy that serves its namespace; remove it to silence this",
            );
        }
    }
    s.finish(d);
    Some(out)
}

fn port_policy(p: &mut Obj<'_>, d: &mut Diagnostics) -> PortPolicy {
    let load_balancer = p.get("loadBalancer").and_then(|lb| load_balancer(&lb, d));
    let tls = p
        .get("tls")
        .and_then(|t| client_tls(&t, TlsMode::Disable, d));
    for key in ["connectionPool", "outlierDetection"] {
        if let Some(v) = p.get(key) {
            d.warn(
                v.path(),
                "is not applied: Sluice has its own connection limits and timeouts (see sluice run --help); remove it to silence this",
            );
        }
    }
    for key in ["tunnel", "proxyProtocol", "retryBudget"] {
        p.refuse(key, "is not supported by Sluice; remove it", d);
    }
    PortPolicy { load_balancer, tls }
}

fn load_balancer(at: &At<'_>, d: &mut Diagnostics) -> Option<LoadBalancer> {
    let mut lb = at.obj(d)?;
    let chosen = lb.get("simple").and_then(|s| {
        let text = s.text(d)?;
        match text {
            "ROUND_ROBIN" | "UNSPECIFIED" => Some(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Some(LoadBalancer::LeastRequest),
            "RANDOM" => Some(LoadBalancer::Random),
            "PASSTHROUGH" => {
                d.error(
                    s.path(),
                    "PASSTHROUGH would send traffic to the address the app chose; Sluice only dials what it checked: use ROUND_ROBIN, LEAST_REQUEST or RANDOM",
                );
                None
            }
            other => {
                d.error(
                    s.path(),
                    format!("must be ROUND_ROBIN, LEAST_REQUEST, RANDOM or UNSPECIFIED; found {other:?}"),
                );
                None
            }
        }
    });
    lb.refuse(
        "consistentHash",
        "is not supported: Sluice balances by ROUND_ROBIN, LEAST_REQUEST or RANDOM; use simple instead",
        d,
    );
    for key in ["localityLbSetting", "warmupDurationSecs", "warmup"] {
        if let Some(v) = lb.get(key) {
            d.warn(
                v.path(),
                "has no effect: Sluice does not weigh endpoints by locality or warm-up; remove it to silence this",
            );
        }
    }
    lb.finish(d);
    chosen
}

/// `tls` of a DestinationRule (mode `DISABLE` when unset) or `clientsideTls` of a Gloo
/// ExternalService port (`SIMPLE` when unset).
pub(crate) fn client_tls(at: &At<'_>, default: TlsMode, d: &mut Diagnostics) -> Option<ClientTls> {
    let mut t = at.obj(d)?;
    let mode = match t.get("mode") {
        None => Some(default),
        Some(m) => match m.text(d) {
            Some("DISABLE") => Some(TlsMode::Disable),
            Some("SIMPLE") => Some(TlsMode::Simple),
            Some("MUTUAL") => Some(TlsMode::Mutual),
            Some("ISTIO_MUTUAL") => {
                d.error(
                    m.path(),
                    "ISTIO_MUTUAL is Istio's own mesh identity, which Sluice does not have; use MUTUAL with clientCertificate and privateKey, or credentialName",
                );
                None
            }
            Some(other) => {
                d.error(
                    m.path(),
                    format!("must be DISABLE, SIMPLE or MUTUAL; found {other:?}"),
                );
                None
            }
            None => None,
        },
    };
    let file = |key: &'static str, t: &mut Obj<'_>, d: &mut Diagnostics| {
        t.get(key).and_then(|f| {
            let text = f.text(d)?;
            if text.starts_with('/') {
                Some(text.to_string())
            } else {
                d.error(
                    f.path(),
                    format!("{text:?} must be an absolute path to a PEM file on the proxy's host"),
                );
                None
            }
        })
    };
    let ca_certificates = file("caCertificates", &mut t, d);
    let client_certificate = file("clientCertificate", &mut t, d);
    let private_key = file("privateKey", &mut t, d);
    let credential_name = t
        .get("credentialName")
        .and_then(|c| crate::kuma::name(&c, d));
    let sni = t.get("sni").and_then(|s| {
        let name = s.text(d)?;
        if parse_ip(name).is_some() || is_dns_name(name) {
            Some(name.trim_end_matches('.').to_ascii_lowercase())
        } else {
            d.error(
                s.path(),
                format!("{name:?} is not a DNS name or IP address"),
            );
            None
        }
    });
    let subject_alt_names: Vec<String> = t
        .get("subjectAltNames")
        .map(|l| {
            l.list(d)
                .iter()
                .filter_map(|i| i.text(d).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let insecure_skip_verify = t
        .get("insecureSkipVerify")
        .and_then(|i| i.bool(d))
        .unwrap_or(false);
    if let Some(c) = t.get("caCrl") {
        c.text(d);
        d.error(
            c.path(),
            "is not supported: Sluice does not read CRLs; remove it, and rotate the endpoint's certificate rather than revoke it",
        );
    }
    let path = at.path().to_string();
    let tls = ClientTls {
        path: path.clone(),
        mode: mode?,
        ca_certificates,
        client_certificate,
        private_key,
        credential_name,
        sni,
        subject_alt_names,
        insecure_skip_verify,
    };
    let files = tls.ca_certificates.is_some()
        || tls.client_certificate.is_some()
        || tls.private_key.is_some();
    match tls.mode {
        TlsMode::Disable => {
            if files
                || tls.credential_name.is_some()
                || tls.sni.is_some()
                || !tls.subject_alt_names.is_empty()
                || tls.insecure_skip_verify
            {
                d.warn(
                    &path,
                    "mode is DISABLE, so no TLS is originated and its other settings have no effect; set mode SIMPLE or MUTUAL to use them",
                );
            }
        }
        TlsMode::Simple | TlsMode::Mutual => {
            if tls.credential_name.is_some() && files {
                d.error(
                    &path,
                    "sets credentialName with caCertificates, clientCertificate or privateKey; take the certificates from one place",
                );
            }
            if tls.mode == TlsMode::Mutual && tls.credential_name.is_none() {
                for (value, key) in [
                    (&tls.client_certificate, "clientCertificate"),
                    (&tls.private_key, "privateKey"),
                ] {
                    if value.is_none() {
                        d.error(
                            &format!("{path}.{key}"),
                            "is required with mode MUTUAL (or give credentialName)",
                        );
                    }
                }
            }
            if tls.mode == TlsMode::Simple
                && (tls.client_certificate.is_some() || tls.private_key.is_some())
            {
                d.warn(
                    &path,
                    "mode is SIMPLE, so clientCertificate and privateKey are not sent; use mode MUTUAL to present them",
                );
            }
            if tls.insecure_skip_verify {
                let simple_credential =
                    tls.mode == TlsMode::Simple && tls.credential_name.is_some();
                if tls.ca_certificates.is_some()
                    || !tls.subject_alt_names.is_empty()
                    || simple_credential
                {
                    d.error(
                        &format!("{path}.insecureSkipVerify"),
                        "is set with caCertificates, credentialName or subjectAltNames, whose checks it turns off; remove one or the other",
                    );
                } else {
                    d.warn(
                        &format!("{path}.insecureSkipVerify"),
                        "checks neither the certificate chain nor its names: anyone on the network path can impersonate the endpoint; use it only for testing",
                    );
                }
            }
        }
    }
    t.finish(d);
    Some(tls)
}
