//! rustls configuration helpers for the origins (server side) and the
//! self-test clients.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki::{pki, CertKey};
use super::{init_crypto, DEFAULT_TIMEOUT};

/// Which TLS versions an endpoint accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsVersions {
    /// TLS 1.2 only.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
    /// TLS 1.2 and 1.3.
    #[default]
    Both,
}

impl TlsVersions {
    pub fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static V12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        static V13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsVersions::Tls12 => &V12,
            TlsVersions::Tls13 => &V13,
            TlsVersions::Both => &BOTH,
        }
    }
}

/// Whether a TLS origin asks for a client certificate.
#[derive(Clone, Debug, Default)]
pub enum ClientAuth {
    /// No client certificate requested.
    #[default]
    None,
    /// A client certificate signed by the test CA is required.
    Required,
    /// A client certificate signed by the test CA is requested but optional.
    Optional,
    /// A client certificate signed by one of these roots is required.
    RequiredBy(RootCertStore),
}

/// Server-side TLS settings of an origin.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Certificate and key presented (default: [`super::Pki::origin`]).
    pub cert: CertKey,
    /// ALPN protocols offered, in preference order (default: `h2`, `http/1.1`).
    /// Empty means no ALPN.
    pub alpn: Vec<String>,
    /// Accepted TLS versions (default: both).
    pub versions: TlsVersions,
    /// Client certificate requirement (default: none).
    pub client_auth: ClientAuth,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert: pki().origin.clone(),
            alpn: vec!["h2".into(), "http/1.1".into()],
            versions: TlsVersions::Both,
            client_auth: ClientAuth::None,
        }
    }
}

impl TlsSettings {
    pub fn cert(mut self, cert: &CertKey) -> Self {
        self.cert = cert.clone();
        self
    }

    pub fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    pub fn versions(mut self, versions: TlsVersions) -> Self {
        self.versions = versions;
        self
    }

    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// The rustls server configuration these settings describe.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        init_crypto();
        let builder = ServerConfig::builder_with_protocol_versions(self.versions.versions());
        let roots = match &self.client_auth {
            ClientAuth::None => None,
            ClientAuth::Required | ClientAuth::Optional => Some(pki().roots()),
            ClientAuth::RequiredBy(roots) => Some(roots.clone()),
        };
        let builder = match roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
                let verifier = if matches!(self.client_auth, ClientAuth::Optional) {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier.build().expect("build client certificate verifier"),
                )
            }
        };
        let mut config = builder
            .with_single_cert(self.cert.chain(), self.cert.key_der())
            .expect("server certificate and key match");
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server_config())
    }
}

/// Client-side TLS settings for the self-test clients.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// Trusted roots (default: the test CA only).
    pub roots: RootCertStore,
    /// ALPN protocols offered (default: none).
    pub alpn: Vec<String>,
    /// TLS versions offered (default: both).
    pub versions: TlsVersions,
    /// Client certificate presented, if any.
    pub client_cert: Option<CertKey>,
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            roots: pki().roots(),
            alpn: Vec::new(),
            versions: TlsVersions::Both,
            client_cert: None,
        }
    }
}

impl ClientTls {
    pub fn roots(mut self, roots: RootCertStore) -> Self {
        self.roots = roots;
        self
    }

    pub fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    pub fn versions(mut self, versions: TlsVersions) -> Self {
        self.versions = versions;
        self
    }

    pub fn client_cert(mut self, cert: &CertKey) -> Self {
        self.client_cert = Some(cert.clone());
        self
    }

    pub fn build(&self) -> Arc<ClientConfig> {
        init_crypto();
        let builder = ClientConfig::builder_with_protocol_versions(self.versions.versions())
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some(ck) => builder
                .with_client_auth_cert(ck.chain(), ck.key_der())
                .expect("client certificate and key match"),
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// A client config trusting the test CA, offering `alpn` (may be empty).
pub fn client_tls_config(alpn: &[&str]) -> Arc<ClientConfig> {
    ClientTls::default().alpn(alpn).build()
}

/// Opens a TCP connection to `addr` and runs a TLS handshake with
/// `server_name` (a DNS name, or an IP address which sends no SNI), bounded
/// by [`DEFAULT_TIMEOUT`].
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(DEFAULT_TIMEOUT, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))?
}
