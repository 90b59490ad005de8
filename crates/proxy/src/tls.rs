//! TLS origination: one rustls client configuration per external service, with the four Kuma
//! verification modes and `subjectAltNames` narrowing on top of the chain check.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sluice_api::model::{Material, SanMatch, TlsOrigination, TlsVersion, VerificationMode};
use x509_parser::extensions::GeneralName;

/// A TLS setting that cannot be turned into a working client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("caCert ({origin}): no usable CA certificate: {reason}")]
    Ca { origin: String, reason: String },
    #[error("clientCert/clientKey: {0}")]
    ClientIdentity(String),
    #[error(
        "no system CA certificates were found and caCert is not set; set tls.verification.caCert"
    )]
    NoSystemRoots,
    #[error("TLS setup: {0}")]
    Other(String),
    #[error("{origin}: {reason}")]
    File { origin: String, reason: String },
}

/// PEM files on the proxy's host are no larger than this.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// The bytes of `m`: inline, or read now (when the service is applied) from its file, which
/// must be under `files`, the one directory the proxy reads key material from.
fn pem_of<'m>(m: &'m Material, files: Option<&Path>) -> Result<Cow<'m, [u8]>, TlsSetupError> {
    let Some(path) = &m.file else {
        return Ok(Cow::Borrowed(&m.pem));
    };
    let failed = |reason: String| TlsSetupError::File {
        origin: m.origin.clone(),
        reason,
    };
    let Some(dir) = files else {
        return Err(failed(
            "the proxy reads no certificate or key files unless told where: start it with --tls-file-dir DIR to read files under DIR".into(),
        ));
    };
    // Both resolved, so neither `..` nor a symbolic link leads out of the directory.
    let real = std::fs::canonicalize(path).map_err(|e| failed(format!("cannot be read: {e}")))?;
    let root = std::fs::canonicalize(dir)
        .map_err(|e| failed(format!("--tls-file-dir {}: {e}", dir.display())))?;
    if !real.starts_with(&root) {
        return Err(failed(format!(
            "is outside --tls-file-dir {}; move it there, or point --tls-file-dir at its directory",
            dir.display()
        )));
    }
    let file = std::fs::File::open(&real).map_err(|e| failed(format!("cannot be read: {e}")))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PEM_FILE + 1), &mut bytes)
        .map_err(|e| failed(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(failed(format!(
            "is larger than {MAX_PEM_FILE} bytes, too large for PEM certificates or a key"
        )));
    }
    Ok(Cow::Owned(bytes))
}

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The operating system's roots, read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "while reading system CA certificates");
            }
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates loaded");
            Arc::new(store)
        })
        .clone()
}

/// Builds the client configuration for one external service.
pub fn client_config(
    tls: &TlsOrigination,
    alpn: &[&[u8]],
    files: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let roots = match &tls.ca_cert {
        Some(ca) => {
            let mut store = RootCertStore::empty();
            let pem = pem_of(ca, files)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsSetupError::Ca {
                    origin: ca.origin.clone(),
                    reason: e.to_string(),
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsSetupError::Ca {
                    origin: ca.origin.clone(),
                    reason: "no certificate in it can be used as a trust anchor".into(),
                });
            }
            Arc::new(store)
        }
        None => system_roots(),
    };
    let webpki = if tls.mode.checks_chain() {
        if roots.is_empty() {
            return Err(TlsSetupError::NoSystemRoots);
        }
        Some(
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsSetupError::Other(e.to_string()))?,
        )
    } else {
        None
    };
    let verifier = Arc::new(Verifier {
        mode: tls.mode,
        webpki,
        subject_alt_names: tls.subject_alt_names.clone(),
        provider: provider.clone(),
    });
    let versions = versions(tls.min_version, tls.max_version);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| TlsSetupError::Other(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let (cert, key) = (
                pem_of(&identity.cert, files)?,
                pem_of(&identity.key, files)?,
            );
            let certs = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    TlsSetupError::ClientIdentity(format!("{}: {e}", identity.cert.origin))
                })?;
            if certs.is_empty() {
                return Err(TlsSetupError::ClientIdentity(format!(
                    "{}: no PEM certificate in it",
                    identity.cert.origin
                )));
            }
            let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                TlsSetupError::ClientIdentity(format!("{}: {e}", identity.key.origin))
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsSetupError::ClientIdentity(e.to_string()))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // One service speaks to few server names: rustls's default cache holds 256 of them per
    // config, allocated up front, which a registry of 10,000 services pays 10,000 times. Not
    // shared between services, since a session carries its verification and client identity.
    config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_NAMES);
    Ok(Arc::new(config))
}

/// Server names whose TLS sessions each service keeps for resumption.
const SESSION_CACHE_NAMES: usize = 16;

fn versions(
    min: Option<TlsVersion>,
    max: Option<TlsVersion>,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let lo = min.unwrap_or(TlsVersion::Tls12);
    let hi = max.unwrap_or(TlsVersion::Tls13);
    let mut out = Vec::new();
    if lo <= TlsVersion::Tls13 && TlsVersion::Tls13 <= hi {
        out.push(&rustls::version::TLS13);
    }
    if lo <= TlsVersion::Tls12 && TlsVersion::Tls12 <= hi {
        out.push(&rustls::version::TLS12);
    }
    out
}

/// Raised when the certificate matches none of the listed `subjectAltNames`.
#[derive(Debug, thiserror::Error)]
#[error("certificate SANs [{found}] match none of subjectAltNames")]
pub struct SanMismatch {
    found: String,
}

#[derive(Debug)]
struct Verifier {
    mode: VerificationMode,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    subject_alt_names: Vec<SanMatch>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match (self.mode, &self.webpki) {
            (VerificationMode::Secured, Some(webpki)) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
                self.check_listed_sans(end_entity)?;
            }
            (VerificationMode::SkipSAN, Some(webpki)) => {
                // The chain is checked before the name, so a name error means the chain held.
                match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                    Ok(_)
                    | Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. },
                    )) => {}
                    Err(e) => return Err(e),
                }
            }
            (VerificationMode::SkipCA, _) => {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                verify_server_name(&parsed, server_name)?;
                self.check_listed_sans(end_entity)?;
            }
            (VerificationMode::SkipAll, _) => {}
            (_, None) => {
                return Err(rustls::Error::General(
                    "verifier has no trust anchors".into(),
                ))
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Verifier {
    /// Listed SANs narrow what the name check accepted: one of them must match too.
    fn check_listed_sans(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.subject_alt_names.is_empty() {
            return Ok(());
        }
        let sans = certificate_sans(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let matched = sans
            .iter()
            .any(|san| self.subject_alt_names.iter().any(|m| san_matches(m, san)));
        if matched {
            return Ok(());
        }
        let found = sans
            .iter()
            .map(|s| match s {
                San::Dns(v) | San::Uri(v) | San::Ip(v) => v.as_str(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(SanMismatch { found })),
        )))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum San {
    Dns(String),
    Uri(String),
    Ip(String),
}

fn certificate_sans(
    der: &CertificateDer<'_>,
) -> Result<Vec<San>, x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())?;
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => out.push(San::Dns(n.to_string())),
                GeneralName::URI(u) => out.push(San::Uri(u.to_string())),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.push(San::Ip(ip.to_string()));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// DNS names compare without regard to case; URIs and IPs exactly.
fn san_matches(m: &SanMatch, san: &San) -> bool {
    match (m, san) {
        (SanMatch::Exact(v), San::Dns(s)) => v.eq_ignore_ascii_case(s),
        (SanMatch::Prefix(p), San::Dns(s)) => {
            s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
        }
        (SanMatch::Exact(v), San::Uri(s) | San::Ip(s)) => v == s,
        (SanMatch::Prefix(p), San::Uri(s) | San::Ip(s)) => s.starts_with(p.as_str()),
    }
}

/// A short, stable reason for metrics and logs.
pub fn failure_reason(e: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name_mismatch"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Other(o) if o.0.downcast_ref::<SanMismatch>().is_some() => {
                "san_mismatch"
            }
            _ => "bad_certificate",
        },
        rustls::Error::AlertReceived(A::ProtocolVersion) | rustls::Error::PeerIncompatible(_) => {
            "version_mismatch"
        }
        rustls::Error::AlertReceived(
            A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateUnknown,
        ) => "peer_rejected_certificate",
        rustls::Error::AlertReceived(A::HandshakeFailure) => "handshake_failure",
        rustls::Error::NoApplicationProtocol
        | rustls::Error::AlertReceived(A::NoApplicationProtocol) => "alpn_mismatch",
        _ => "handshake_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_bounds() {
        let v = |min, max| {
            versions(min, max)
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>()
        };
        use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
        use TlsVersion::{Tls12, Tls13};
        let cases = [
            (None, None, vec![TLSv1_3, TLSv1_2]),
            (Some(Tls12), None, vec![TLSv1_3, TLSv1_2]),
            (Some(Tls13), None, vec![TLSv1_3]),
            (None, Some(Tls12), vec![TLSv1_2]),
            (Some(Tls12), Some(Tls12), vec![TLSv1_2]),
            (Some(Tls13), Some(Tls13), vec![TLSv1_3]),
        ];
        for (min, max, want) in cases {
            assert_eq!(v(min, max), want, "min {min:?} max {max:?}");
        }
    }

    #[test]
    fn san_matching() {
        let dns = |s: &str| San::Dns(s.into());
        let uri = |s: &str| San::Uri(s.into());
        let exact = |s: &str| SanMatch::Exact(s.into());
        let prefix = |s: &str| SanMatch::Prefix(s.into());
        let cases = [
            (exact("api.example.com"), dns("API.example.com"), true),
            (exact("api.example.com"), dns("api.example.org"), false),
            (
                prefix("spiffe://example.com/ns/production"),
                uri("spiffe://example.com/ns/production/sa/x"),
                true,
            ),
            (
                prefix("spiffe://example.com/ns/production"),
                uri("spiffe://example.com/ns/staging/sa/x"),
                false,
            ),
            (
                exact("spiffe://example.com/ns/a"),
                uri("spiffe://example.com/ns/A"),
                false,
            ),
            (
                exact("spiffe://example.com/ns/a"),
                dns("spiffe://example.com/ns/a"),
                true,
            ),
            (prefix("api."), dns("Api.example.com"), true),
            (exact("127.0.0.1"), San::Ip("127.0.0.1".into()), true),
        ];
        for (m, san, want) in cases {
            assert_eq!(san_matches(&m, &san), want, "{m:?} vs {san:?}");
        }
    }
}
