//! A test PKI generated at run time with rcgen (ECDSA P-256 keys).
//!
//! [`pki()`] generates it once per test process and hands out a shared
//! reference.

use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

/// URI SAN of [`Pki::origin`] and the only SAN of [`Pki::uri_only`].
pub const ORIGIN_SPIFFE_ID: &str = "spiffe://example.com/ns/production/sa/origin";
/// URI SAN of [`Pki::client`].
pub const CLIENT_SPIFFE_ID: &str = "spiffe://example.com/ns/production/sa/client";
/// DNS name every test server certificate carries (except `uri_only`).
pub const ORIGIN_DNS: &str = "origin.test";
/// The public names of [`Pki::public`].
pub const PUBLIC_NAMES: &[&str] = &["www.googleapis.com", "httpbin.org", "www.httpbin.org"];

/// A certificate with its private key, in PEM and DER forms.
#[derive(Clone, Debug)]
pub struct CertKey {
    /// Short name of this certificate within [`Pki`] (`"ca"`, `"origin"`, ...).
    pub name: &'static str,
    /// Common name of the subject.
    pub common_name: String,
    /// PEM `CERTIFICATE` block.
    pub cert_pem: String,
    /// PEM `PRIVATE KEY` block (PKCS#8).
    pub key_pem: String,
    /// The certificate in DER.
    pub cert_der: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

impl CertKey {
    /// The private key in DER (PKCS#8).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The certificate chain to present: just the leaf (the CA is the trust anchor).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone()]
    }
}

/// Every certificate the tests use.
#[derive(Debug)]
pub struct Pki {
    /// The test CA (self-signed); trusted by clients and by mTLS origins.
    pub ca: CertKey,
    /// Server certificate signed by `ca`: DNS `origin.test` and `localhost`,
    /// IP `127.0.0.1`, URI [`ORIGIN_SPIFFE_ID`].
    pub origin: CertKey,
    /// Server certificate signed by `ca` whose only SAN is the URI [`ORIGIN_SPIFFE_ID`].
    pub uri_only: CertKey,
    /// Client certificate signed by `ca` (EKU clientAuth), URI [`CLIENT_SPIFFE_ID`].
    pub client: CertKey,
    /// Server certificate signed by `ca` for the public names the seeds call
    /// ([`PUBLIC_NAMES`]), served by local origins that stand in for them.
    pub public: CertKey,
    /// An unrelated CA.
    pub other_ca: CertKey,
    /// Server certificate for `origin.test`, `localhost`, `127.0.0.1` signed by `other_ca`.
    pub other_origin: CertKey,
    /// Client certificate signed by `other_ca`.
    pub other_client: CertKey,
}

/// The process-wide test PKI (generated on first use).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(Pki::generate)
}

struct Ca {
    cert: CertKey,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// Generates a fresh PKI. Prefer [`pki()`], which does this once.
    pub fn generate() -> Pki {
        let ca = make_ca("ca", "Sluice Test CA");
        let other_ca = make_ca("other_ca", "Unrelated Test CA");

        let server_sans = || {
            vec![
                dns(ORIGIN_DNS),
                dns("localhost"),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ]
        };

        let mut origin_sans = server_sans();
        origin_sans.push(uri(ORIGIN_SPIFFE_ID));
        let origin = make_leaf(
            &ca,
            "origin",
            ORIGIN_DNS,
            origin_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let uri_only = make_leaf(
            &ca,
            "uri_only",
            "uri-only origin",
            vec![uri(ORIGIN_SPIFFE_ID)],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = make_leaf(
            &ca,
            "client",
            "sluice-test-client",
            vec![uri(CLIENT_SPIFFE_ID)],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let public = make_leaf(
            &ca,
            "public",
            PUBLIC_NAMES[0],
            PUBLIC_NAMES.iter().map(|n| dns(n)).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let other_origin = make_leaf(
            &other_ca,
            "other_origin",
            ORIGIN_DNS,
            server_sans(),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let other_client = make_leaf(
            &other_ca,
            "other_client",
            "unrelated-client",
            vec![uri(CLIENT_SPIFFE_ID)],
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        Pki {
            ca: ca.cert,
            origin,
            uri_only,
            client,
            public,
            other_ca: other_ca.cert,
            other_origin,
            other_client,
        }
    }

    /// PEM of the test CA certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// A root store trusting only the test CA.
    pub fn roots(&self) -> RootCertStore {
        root_store(&self.ca)
    }

    /// A root store trusting only the unrelated CA.
    pub fn other_roots(&self) -> RootCertStore {
        root_store(&self.other_ca)
    }

    /// Which of this PKI's certificates `der` is (its [`CertKey::name`]).
    pub fn identify(&self, der: &CertificateDer<'_>) -> Option<&'static str> {
        [
            &self.ca,
            &self.origin,
            &self.uri_only,
            &self.client,
            &self.public,
            &self.other_ca,
            &self.other_origin,
            &self.other_client,
        ]
        .into_iter()
        .find(|ck| ck.cert_der.as_ref() == der.as_ref())
        .map(|ck| ck.name)
    }
}

fn root_store(ca: &CertKey) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der.clone())
        .expect("test CA is a valid trust anchor");
    roots
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("valid DNS SAN"))
}

fn uri(value: &str) -> SanType {
    SanType::URI(value.try_into().expect("valid URI SAN"))
}

fn make_ca(name: &'static str, common_name: &str) -> Ca {
    let key = KeyPair::generate().expect("generate CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sluice tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign CA");
    let cert = CertKey {
        name,
        common_name: common_name.to_owned(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_pkcs8: key.serialize_der(),
    };
    Ca {
        cert,
        issuer: Issuer::new(params, key),
    }
}

fn make_leaf(
    ca: &Ca,
    name: &'static str,
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
) -> CertKey {
    let key = KeyPair::generate().expect("generate leaf key");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer).expect("sign leaf");
    CertKey {
        name,
        common_name: common_name.to_owned(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_pkcs8: key.serialize_der(),
    }
}
