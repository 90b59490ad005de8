//! Reaching an external service: endpoint choice (round robin, next endpoint on connect failure),
//! DNS resolution within TTL bounds, TCP or unix socket, then TLS origination when configured.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use sluice_api::model::{Endpoint, ExternalService};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::metrics::{Metrics, ReasonLabels};
use crate::tls::{self, TlsSetupError};

/// A byte stream to an endpoint, plain or TLS, over TCP or a unix socket.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect to one endpoint address.
    pub connect: Duration,
    /// TLS handshake after the TCP connection is up.
    pub handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
        }
    }
}

/// What is known about an upstream connection; attached to every response it carries.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub address: Arc<str>,
    pub tls_version: Option<&'static str>,
    pub h2: bool,
}

pub struct Upstream {
    pub io: Box<dyn Io>,
    pub info: ConnInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No endpoint accepted a connection (refused, unreachable, name not resolved).
    Unreachable,
    Timeout,
    Tls,
}

/// Why no upstream connection could be made; `Display` is the one line the app sees.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    pub kind: FailureKind,
    pub message: String,
}

struct Target {
    endpoint: Endpoint,
    /// SNI and name to verify: `serverName` when set, else the endpoint's own host.
    server_name: Option<ServerName<'static>>,
}

/// Connection logic for one external service; shared by every listener that routes to it.
pub struct Connector {
    pub service: Arc<ExternalService>,
    pub label: String,
    /// The same, shared by every access-log line.
    pub log_label: Arc<str>,
    targets: Vec<Target>,
    tls: Option<TlsConnector>,
    next: AtomicUsize,
    resolver: Arc<TokioResolver>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    opened: Counter,
}

impl Connector {
    pub fn new(
        service: Arc<ExternalService>,
        label: String,
        alpn: &[&[u8]],
        resolver: Arc<TokioResolver>,
        timeouts: Timeouts,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsSetupError> {
        let tls_config: Option<Arc<ClientConfig>> = match &service.tls {
            Some(t) => Some(tls::client_config(t, alpn)?),
            None => None,
        };
        let override_name = service.tls.as_ref().and_then(|t| t.server_name.clone());
        let targets = service
            .endpoints
            .iter()
            .map(|endpoint| {
                let name = override_name.clone().or_else(|| endpoint.host());
                if name.is_none() && service.tls.is_some() {
                    return Err(TlsSetupError::Other(format!(
                        "{endpoint}: TLS to a unix socket needs tls.verification.serverName to know which name to verify"
                    )));
                }
                Ok(Target {
                    endpoint: endpoint.clone(),
                    server_name: match name {
                        Some(n) => Some(ServerName::try_from(n).map_err(|e| {
                            TlsSetupError::Other(format!("serverName: {e}"))
                        })?),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>, TlsSetupError>>()?;
        let opened = metrics
            .upstream_connections
            .get_or_create(&Metrics::service(&label))
            .clone();
        Ok(Self {
            tls: tls_config.map(TlsConnector::from),
            service,
            log_label: Arc::from(label.as_str()),
            label,
            targets,
            next: AtomicUsize::new(0),
            resolver,
            timeouts,
            metrics,
            opened,
        })
    }

    /// Opens a connection to the next endpoint in turn; on a connect failure tries the others.
    pub async fn connect(&self) -> Result<Upstream, ConnectError> {
        let n = self.targets.len();
        if n == 0 {
            return Err(ConnectError {
                kind: FailureKind::Unreachable,
                message: format!("external service {} has no endpoints", self.label),
            });
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut failures = Vec::new();
        let mut timed_out = false;
        for i in 0..n {
            let target = &self.targets[(start + i) % n];
            match self.open(&target.endpoint).await {
                Ok((io, address)) => return self.handshake(target, io, address).await,
                Err((e, timeout)) => {
                    timed_out |= timeout;
                    self.metrics
                        .upstream_connect_failures
                        .get_or_create(&ReasonLabels {
                            service: self.label.clone(),
                            reason: if timeout { "timeout" } else { "unreachable" },
                        })
                        .inc();
                    failures.push(e);
                }
            }
        }
        Err(ConnectError {
            kind: if timed_out && failures.len() == 1 {
                FailureKind::Timeout
            } else {
                FailureKind::Unreachable
            },
            message: format!(
                "no endpoint of {} could be reached: {}",
                self.label,
                failures.join("; ")
            ),
        })
    }

    /// TCP or unix connection to one endpoint; the error says which address failed and how.
    async fn open(&self, endpoint: &Endpoint) -> Result<(Box<dyn Io>, String), (String, bool)> {
        let addrs: Vec<SocketAddr> = match endpoint {
            Endpoint::Unix { path } => {
                let shown = format!("unix://{}", path.display());
                return match tokio::time::timeout(self.timeouts.connect, UnixStream::connect(path))
                    .await
                {
                    Ok(Ok(s)) => Ok((Box::new(s), shown)),
                    Ok(Err(e)) => Err((format!("{shown}: {e}"), false)),
                    Err(_) => Err((format!("{shown}: connect timed out"), true)),
                };
            }
            Endpoint::Ip { ip, port } => vec![SocketAddr::new(*ip, *port)],
            Endpoint::Dns { host, port } => match self.resolve(host).await {
                Ok(ips) => ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, *port))
                    .collect(),
                Err(e) => return Err((format!("{host}: {e}"), false)),
            },
        };
        let mut last = (format!("{endpoint}: no address"), false);
        for addr in addrs {
            match tokio::time::timeout(self.timeouts.connect, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((Box::new(s), addr.to_string()));
                }
                Ok(Err(e)) => last = (format!("{addr}: {e}"), false),
                Err(_) => {
                    last = (
                        format!(
                            "{addr}: connect timed out after {:?}",
                            self.timeouts.connect
                        ),
                        true,
                    )
                }
            }
        }
        Err(last)
    }

    /// Answers come from the resolver's cache while their TTL lasts.
    async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{host}.");
        match tokio::time::timeout(self.timeouts.connect, self.resolver.lookup_ip(fqdn)).await {
            Ok(Ok(lookup)) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err("name has no addresses".into())
                } else {
                    Ok(ips)
                }
            }
            Ok(Err(e)) => Err(format!("name not resolved: {e}")),
            Err(_) => Err("name resolution timed out".into()),
        }
    }

    async fn handshake(
        &self,
        target: &Target,
        io: Box<dyn Io>,
        address: String,
    ) -> Result<Upstream, ConnectError> {
        let Some(tls) = &self.tls else {
            self.opened.inc();
            return Ok(Upstream {
                io,
                info: ConnInfo {
                    address: Arc::from(address),
                    tls_version: None,
                    h2: false,
                },
            });
        };
        let Some(server_name) = target.server_name.clone() else {
            return Err(ConnectError {
                kind: FailureKind::Tls,
                message: format!("{}: no server name to verify", target.endpoint),
            });
        };
        let result =
            tokio::time::timeout(self.timeouts.handshake, tls.connect(server_name, io)).await;
        let stream = match result {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .map(tls::failure_reason)
                    .unwrap_or("handshake_error");
                self.tls_failed(reason);
                return Err(ConnectError {
                    kind: FailureKind::Tls,
                    message: format!(
                        "TLS handshake with {} ({address}) failed: {e}",
                        target.endpoint
                    ),
                });
            }
            Err(_) => {
                self.tls_failed("timeout");
                return Err(ConnectError {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "TLS handshake with {} ({address}) timed out after {:?}",
                        target.endpoint, self.timeouts.handshake
                    ),
                });
            }
        };
        let (_, conn) = stream.get_ref();
        let info = ConnInfo {
            address: Arc::from(address),
            tls_version: conn.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "other",
            }),
            h2: conn.alpn_protocol() == Some(b"h2"),
        };
        self.opened.inc();
        Ok(Upstream {
            io: Box::new(stream),
            info,
        })
    }

    fn tls_failed(&self, reason: &'static str) {
        self.metrics
            .upstream_tls_failures
            .get_or_create(&ReasonLabels {
                service: self.label.clone(),
                reason,
            })
            .inc();
    }
}

/// The connector hyper's pooled client calls for a new connection.
#[derive(Clone)]
pub struct HttpConnector(pub Arc<Connector>);

impl tower_service::Service<http::Uri> for HttpConnector {
    type Response = PooledIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let connector = self.0.clone();
        Box::pin(async move {
            let upstream = connector.connect().await?;
            Ok(PooledIo {
                io: TokioIo::new(upstream.io),
                info: upstream.info,
            })
        })
    }
}

/// An upstream connection as hyper's client sees it.
pub struct PooledIo {
    io: TokioIo<Box<dyn Io>>,
    info: ConnInfo,
}

impl Connection for PooledIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(self.info.clone());
        if self.info.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
