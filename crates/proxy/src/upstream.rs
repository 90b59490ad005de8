//! Reaching an external service: endpoint choice (round robin, random or least request; the next
//! endpoints in turn on a connect failure), DNS resolution within TTL bounds, TCP or unix socket,
//! then TLS origination when configured.

use std::any::Any;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hickory_resolver::TokioResolver;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use sluice_api::model::{Endpoint, ExternalService, LoadBalancer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::metrics::{Metrics, ReasonLabels};
use crate::tls::{self, TlsSetupError};

/// A byte stream to an endpoint, plain or TLS, over TCP or a unix socket.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + Any {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + Any> Io for T {}

/// The TCP socket a stream is, when it is a plain one (no TLS, not a unix socket): what a
/// relay can wait on without holding a buffer.
pub fn plain_socket(io: &dyn Io) -> Option<&TcpStream> {
    let io: &dyn Any = io;
    if let Some(socket) = io.downcast_ref::<TcpStream>() {
        return Some(socket);
    }
    if let Some(boxed) = io.downcast_ref::<Box<dyn Io>>() {
        return plain_socket(&**boxed);
    }
    let socket = io
        .downcast_ref::<Socket>()
        .or_else(|| io.downcast_ref::<Counted<Socket>>().map(|c| &c.inner));
    match socket {
        Some(Either::Left(tcp)) => Some(tcp),
        _ => None,
    }
}

/// A connected socket, before TLS; boxed once, when the connection is handed out.
type Socket = Either<TcpStream, UnixStream>;

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
    /// Connections to this endpoint handed out and not yet dropped (counted for least request).
    open: Arc<AtomicUsize>,
    /// Its share of new connections (1 unless the service weighs its endpoints).
    weight: u64,
}

/// Connection logic for one external service; shared by every listener that routes to it.
pub struct Connector {
    pub service: Arc<ExternalService>,
    pub label: String,
    /// The same, shared by every access-log line.
    pub log_label: Arc<str>,
    targets: Vec<Target>,
    /// With weighted endpoints, target indices in the order round robin takes them (each as
    /// often as its weight, spread out); empty when every endpoint weighs the same.
    schedule: Vec<usize>,
    tls: Option<TlsConnector>,
    /// Round robin's turn.
    next: AtomicUsize,
    /// splitmix64 state, for random and least request picks.
    rng: AtomicU64,
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
        tls_file_dir: Option<&std::path::Path>,
    ) -> Result<Self, TlsSetupError> {
        let tls_config: Option<Arc<ClientConfig>> = match &service.tls {
            Some(t) => Some(tls::client_config(t, alpn, tls_file_dir)?),
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
                    open: Arc::default(),
                    weight: 1,
                })
            })
            .collect::<Result<Vec<_>, TlsSetupError>>()?;
        let mut targets = targets;
        let weights = &service.endpoint_weights;
        if weights.len() == targets.len() {
            for (t, w) in targets.iter_mut().zip(weights) {
                t.weight = u64::from((*w).max(1));
            }
        }
        let schedule = schedule(&targets.iter().map(|t| t.weight).collect::<Vec<_>>());
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
            schedule,
            next: AtomicUsize::new(0),
            rng: AtomicU64::new(seed()),
            resolver,
            timeouts,
            metrics,
            opened,
        })
    }

    /// Opens a connection to the endpoint the service's load balancer picks; on a connect failure
    /// tries the others in turn.
    pub async fn connect(&self) -> Result<Upstream, ConnectError> {
        let n = self.targets.len();
        if n == 0 {
            return Err(ConnectError {
                kind: FailureKind::Unreachable,
                message: format!("external service {} has no endpoints", self.label),
            });
        }
        let start = self.first(n);
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

    /// The endpoint to try first, of `n` (at least one).
    fn first(&self, n: usize) -> usize {
        let schedule = &self.schedule;
        match self.service.load_balancer {
            LoadBalancer::RoundRobin if schedule.is_empty() => {
                self.next.fetch_add(1, Ordering::Relaxed) % n
            }
            LoadBalancer::RoundRobin => {
                schedule[self.next.fetch_add(1, Ordering::Relaxed) % schedule.len()]
            }
            LoadBalancer::Random if schedule.is_empty() => below((self.random() >> 32) as u32, n),
            LoadBalancer::Random => schedule[below((self.random() >> 32) as u32, schedule.len())],
            LoadBalancer::LeastRequest if n == 1 => 0,
            // Power of two choices: of two endpoints drawn alike, the less loaded (open
            // connections per unit of weight), the first on a tie.
            LoadBalancer::LeastRequest => {
                let (a, b) = two_distinct(self.random(), n);
                let load = |i: usize| self.targets[i].open.load(Ordering::Relaxed) as u64;
                let weight = |i: usize| self.targets[i].weight;
                if load(b) * weight(a) < load(a) * weight(b) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// splitmix64 over a shared state: one atomic add, no lock.
    fn random(&self) -> u64 {
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut z = self
            .rng
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Open connections per endpoint, in endpoint order (counted under least request only).
    #[cfg(test)]
    fn open_counts(&self) -> Vec<usize> {
        self.targets
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    /// TCP or unix connection to one endpoint; the error says which address failed and how.
    async fn open(&self, endpoint: &Endpoint) -> Result<(Socket, String), (String, bool)> {
        let addrs: Vec<SocketAddr> = match endpoint {
            Endpoint::Unix { path } => {
                let shown = format!("unix://{}", path.display());
                return match tokio::time::timeout(self.timeouts.connect, UnixStream::connect(path))
                    .await
                {
                    Ok(Ok(s)) => Ok((Either::Right(s), shown)),
                    Ok(Err(e)) => Err((format!("{shown}: {e}"), false)),
                    Err(_) => Err((format!("{shown}: connect timed out"), true)),
                };
            }
            Endpoint::Ip { ip, port } => vec![SocketAddr::new(*ip, *port)],
            Endpoint::Dns { host, port } => match crate::pins::pinned(host, *port) {
                Some(pinned) => vec![pinned],
                None => match self.resolve(host).await {
                    Ok(ips) => self
                        .allowed(host, ips)?
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, *port))
                        .collect(),
                    Err(e) => return Err((format!("{host}: {e}"), false)),
                },
            },
        };
        let mut last = (format!("{endpoint}: no address"), false);
        for addr in addrs {
            match tokio::time::timeout(self.timeouts.connect, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((Either::Left(s), addr.to_string()));
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

    /// The addresses of `host` the connector may dial. A name the app calls the service by
    /// (one of its `hosts`, resolved because the entry lists no endpoints) is checked as the
    /// forward proxy checks names: private, loopback, link-local and other refused addresses
    /// only where the service's `addresses` name them, so a changed DNS record cannot point the
    /// service at the inside. Endpoints the registry lists by name are dialled as declared.
    fn allowed(&self, host: &str, ips: Vec<IpAddr>) -> Result<Vec<IpAddr>, (String, bool)> {
        if !self.service.hosts.iter().any(|h| h == host) {
            return Ok(ips);
        }
        let named = |ip: IpAddr| self.service.addresses.iter().any(|c| c.contains(ip));
        let (ok, refused): (Vec<IpAddr>, Vec<IpAddr>) = ips
            .into_iter()
            .partition(|ip| crate::guard::refused(*ip).is_none() || named(*ip));
        match (ok.is_empty(), refused.first()) {
            (true, Some(ip)) => Err((
                format!(
                    "{host} resolves only to refused addresses ({ip} is {}); name the address in the entry's addresses or endpoints to allow it",
                    crate::guard::refused(*ip).map_or("refused", |c| c.as_str())
                ),
                false,
            )),
            _ => Ok(ok),
        }
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
        io: Socket,
        address: String,
    ) -> Result<Upstream, ConnectError> {
        let Some(tls) = &self.tls else {
            let info = ConnInfo {
                address: Arc::from(address),
                tls_version: None,
                h2: false,
            };
            return Ok(self.hand_out(target, io, info));
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
        Ok(self.hand_out(target, stream, info))
    }

    /// Boxes a connection for its user; under least request it counts as open to its endpoint
    /// until dropped.
    fn hand_out<T: Io>(&self, target: &Target, io: T, info: ConnInfo) -> Upstream {
        self.opened.inc();
        let io: Box<dyn Io> = match self.service.load_balancer {
            LoadBalancer::LeastRequest => Box::new(Counted::new(io, &target.open)),
            LoadBalancer::RoundRobin | LoadBalancer::Random => Box::new(io),
        };
        Upstream { io, info }
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

/// A seed for a connector's picks: std's per-process random hash keys (distinct for every
/// `RandomState`) over the time.
fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    if let Ok(since) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(since.as_nanos());
    }
    hasher.finish()
}

/// The longest weighted schedule: finer weights are scaled down to it.
const MAX_SCHEDULE: u64 = 1000;

/// Target indices in smooth weighted round-robin order: each index as often as its weight
/// (scaled so the whole stays within [`MAX_SCHEDULE`]), the heavy ones spread between the
/// light ones rather than in a run. Empty when all weights are equal.
fn schedule(weights: &[u64]) -> Vec<usize> {
    if weights.windows(2).all(|w| w[0] == w[1]) {
        return Vec::new();
    }
    let total: u64 = weights.iter().sum();
    let scaled: Vec<i64> = weights
        .iter()
        .map(|w| {
            let w = if total > MAX_SCHEDULE {
                (w * MAX_SCHEDULE / total).max(1)
            } else {
                *w
            };
            w as i64
        })
        .collect();
    let sum: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        for (c, w) in current.iter_mut().zip(&scaled) {
            *c += w;
        }
        let (pick, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        current[pick] -= sum;
        out.push(pick);
    }
    out
}

/// `x` scaled to `0..n`: the high half of `x * n`, with a bias below `n / 2^32`.
fn below(x: u32, n: usize) -> usize {
    ((u64::from(x) * n as u64) >> 32) as usize
}

/// Two different indexes in `0..n`, `n` at least 2, from one random draw.
fn two_distinct(x: u64, n: usize) -> (usize, usize) {
    let a = below(x as u32, n);
    let b = below((x >> 32) as u32, n - 1);
    (a, if b >= a { b + 1 } else { b })
}

/// A connection counted in its endpoint's open connections while it lives.
struct Counted<T> {
    inner: T,
    open: Arc<AtomicUsize>,
}

impl<T> Counted<T> {
    fn new(inner: T, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            open: open.clone(),
        }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::config::ResolverConfig;
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use sluice_api::model::{Protocol, ResourceKey};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::sync::watch;

    /// The bound on every wait.
    const WAIT: Duration = Duration::from_secs(10);
    const LABEL: &str = "default/s";

    /// Loopback endpoints: listeners that accept and keep every connection, counting accepts per
    /// endpoint, and refusing ones (a bound socket that does not listen, so its port stays taken).
    struct Endpoints {
        addrs: Vec<SocketAddr>,
        accepted: watch::Receiver<Vec<usize>>,
        _refusing: Vec<TcpSocket>,
    }

    impl Endpoints {
        async fn start(live: &[bool]) -> Self {
            let (tx, accepted) = watch::channel(vec![0; live.len()]);
            let tx = Arc::new(tx);
            let mut addrs = Vec::new();
            let mut refusing = Vec::new();
            for (i, &live) in live.iter().enumerate() {
                if live {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addrs.push(listener.local_addr().unwrap());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut kept = Vec::new();
                        while let Ok((stream, _)) = listener.accept().await {
                            kept.push(stream);
                            tx.send_modify(|a| a[i] += 1);
                        }
                    });
                } else {
                    let socket = TcpSocket::new_v4().unwrap();
                    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
                    addrs.push(socket.local_addr().unwrap());
                    refusing.push(socket);
                }
            }
            Self {
                addrs,
                accepted,
                _refusing: refusing,
            }
        }

        fn connector(&self, load_balancer: LoadBalancer) -> Connector {
            self.weighted(load_balancer, Vec::new())
        }

        fn weighted(&self, load_balancer: LoadBalancer, endpoint_weights: Vec<u32>) -> Connector {
            let service = ExternalService {
                key: ResourceKey {
                    mesh: "default".into(),
                    name: "s".into(),
                },
                port: 80,
                protocol: Protocol::Tcp,
                endpoints: self
                    .addrs
                    .iter()
                    .map(|a| Endpoint::Ip {
                        ip: a.ip(),
                        port: a.port(),
                    })
                    .collect(),
                tls: None,
                hosts: vec![],
                addresses: vec![],
                load_balancer,
                endpoint_weights,
            };
            let resolver = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                TokioRuntimeProvider::default(),
            )
            .build()
            .unwrap();
            Connector::new(
                Arc::new(service),
                LABEL.into(),
                &[],
                Arc::new(resolver),
                Timeouts {
                    connect: WAIT,
                    handshake: WAIT,
                },
                Arc::new(Metrics::default()),
                None,
            )
            .unwrap()
        }

        /// Accepts per endpoint, once `total` connections have been accepted in all.
        async fn accepted(&mut self, total: usize) -> Vec<usize> {
            let counts = tokio::time::timeout(
                WAIT,
                self.accepted.wait_for(|a| a.iter().sum::<usize>() >= total),
            )
            .await
            .expect("accepted in time")
            .expect("listeners running")
            .clone();
            assert_eq!(counts.iter().sum::<usize>(), total, "{counts:?}");
            counts
        }

        /// Which endpoint a connection went to.
        fn index(&self, up: &Upstream) -> usize {
            self.addrs
                .iter()
                .position(|a| a.to_string() == *up.info.address)
                .unwrap()
        }

        /// Connects, and says which endpoint the connection went to.
        async fn connect(&self, c: &Connector) -> (usize, Upstream) {
            let up = tokio::time::timeout(WAIT, c.connect())
                .await
                .expect("connected in time")
                .expect("connected");
            (self.index(&up), up)
        }
    }

    fn tally(n: usize, picks: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut counts = vec![0; n];
        for i in picks {
            counts[i] += 1;
        }
        counts
    }

    fn connect_failures(c: &Connector) -> u64 {
        c.metrics
            .upstream_connect_failures
            .get_or_create(&ReasonLabels {
                service: LABEL.into(),
                reason: "unreachable",
            })
            .get()
    }

    #[tokio::test]
    async fn round_robin_takes_turns() {
        let mut eps = Endpoints::start(&[true; 3]).await;
        let c = eps.connector(LoadBalancer::RoundRobin);
        let mut held = Vec::new();
        for _ in 0..9 {
            held.push(eps.connect(&c).await);
        }
        let order: Vec<usize> = held.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(eps.accepted(9).await, [3, 3, 3]);
        // Only least request counts open connections.
        assert_eq!(c.open_counts(), [0, 0, 0]);
    }

    #[tokio::test]
    async fn random_spreads_over_every_endpoint() {
        let mut eps = Endpoints::start(&[true; 3]).await;
        let c = eps.connector(LoadBalancer::Random);
        let mut order = Vec::new();
        for _ in 0..300 {
            order.push(eps.connect(&c).await.0);
        }
        let accepted = eps.accepted(300).await;
        assert_eq!(accepted, tally(3, order.iter().copied()));
        // 100 expected each, standard deviation 8: 50 is six deviations off.
        assert!(accepted.iter().all(|&n| n >= 50), "{accepted:?}");
        // Not a turn in disguise: about a third of picks repeat the one before (99.7 expected,
        // deviation 8); round robin never does.
        let repeats = order.windows(2).filter(|w| w[0] == w[1]).count();
        assert!(repeats >= 40, "{repeats} repeats in {order:?}");
        // Every connector has its own seed: 30 equal picks in a row have chance 3^-30.
        let other = eps.connector(LoadBalancer::Random);
        let mut other_order = Vec::new();
        for _ in 0..30 {
            other_order.push(eps.connect(&other).await.0);
        }
        assert_ne!(other_order, order[..30]);
        eps.accepted(330).await;
        assert_eq!(c.open_counts(), [0, 0, 0]);
    }

    #[tokio::test]
    async fn least_request_picks_the_less_loaded() {
        let mut eps = Endpoints::start(&[true; 3]).await;
        let c = eps.connector(LoadBalancer::LeastRequest);
        // Of two distinct endpoints of three, the less loaded is taken: an endpoint with more
        // open connections than both others is never picked.
        let mut held = Vec::new();
        for _ in 0..30 {
            let before = c.open_counts();
            let (i, up) = eps.connect(&c).await;
            let others = (0..3).filter(|&j| j != i);
            assert!(
                others.clone().any(|j| before[j] >= before[i]),
                "picked {i} with open connections {before:?}"
            );
            held.push((i, up));
        }
        let counts = tally(3, held.iter().map(|(i, _)| *i));
        assert_eq!(c.open_counts(), counts);
        assert_eq!(eps.accepted(30).await, counts);

        // Dropping connections lowers the counts: only the busiest endpoint keeps its own (at
        // least 10), and it gets none of the next ones until another has as many.
        let busiest = (0..3).max_by_key(|&i| counts[i]).unwrap();
        let kept = counts[busiest];
        held.retain(|(i, _)| *i == busiest);
        let mut expected = vec![0; 3];
        expected[busiest] = kept;
        assert_eq!(c.open_counts(), expected);
        for _ in 0..kept {
            let (i, up) = eps.connect(&c).await;
            assert_ne!(i, busiest, "open connections {:?}", c.open_counts());
            held.push((i, up));
        }
        let now = c.open_counts();
        assert_eq!(now[busiest], kept);
        assert_eq!(now.iter().sum::<usize>(), 2 * kept);
        eps.accepted(30 + kept).await;

        drop(held);
        assert_eq!(c.open_counts(), [0, 0, 0]);
    }

    #[tokio::test]
    async fn every_balancer_fails_over() {
        for lb in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
        ] {
            let mut eps = Endpoints::start(&[true, false, true]).await;
            let c = eps.connector(lb);
            let mut held = Vec::new();
            for _ in 0..9 {
                held.push(eps.connect(&c).await);
            }
            let accepted = eps.accepted(9).await;
            assert_eq!(accepted[1], 0, "{lb:?}");
            assert_eq!(accepted, tally(3, held.iter().map(|(i, _)| *i)), "{lb:?}");
            if lb == LoadBalancer::RoundRobin {
                // The refusing endpoint's turns go to the one after it.
                assert_eq!(accepted, [3, 0, 6]);
                assert_eq!(connect_failures(&c), 3);
            }
            if lb == LoadBalancer::LeastRequest {
                assert_eq!(c.open_counts(), accepted);
            }

            let dead = Endpoints::start(&[false; 3]).await;
            let c = dead.connector(lb);
            let e = match tokio::time::timeout(WAIT, c.connect()).await {
                Ok(Err(e)) => e,
                Ok(Ok(up)) => panic!("{lb:?}: connected to {}", up.info.address),
                Err(_) => panic!("{lb:?}: connect timed out"),
            };
            assert_eq!(e.kind, FailureKind::Unreachable, "{lb:?}");
            let prefix = format!("no endpoint of {LABEL} could be reached: ");
            assert!(e.message.starts_with(&prefix), "{}", e.message);
            assert_eq!(e.message.matches("; ").count(), 2, "{}", e.message);
            assert_eq!(connect_failures(&c), 3);
        }
    }

    #[test]
    fn picks_stay_in_range() {
        assert_eq!(below(0, 3), 0);
        assert_eq!(below(u32::MAX, 3), 2);
        assert_eq!(below(u32::MAX, 1), 0);
        let mut x: u64 = 1;
        for n in 2..=5 {
            let mut seen = vec![vec![0u32; n]; n];
            for _ in 0..20_000 {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let (a, b) = two_distinct(x ^ (x >> 29), n);
                assert!(a < n && b < n && a != b, "{a} {b} of {n}");
                seen[a][b] += 1;
            }
            // Every ordered pair comes up.
            for (a, row) in seen.iter().enumerate() {
                for (b, &k) in row.iter().enumerate() {
                    assert_eq!(k > 0, a != b, "{a} {b} of {n}: {seen:?}");
                }
            }
        }
    }

    #[test]
    fn weighted_schedules_spread_the_heavy_between_the_light() {
        assert_eq!(schedule(&[1, 1, 1]), Vec::<usize>::new());
        assert_eq!(schedule(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(schedule(&[1, 2, 1]), [1, 0, 2, 1]);
        let long = schedule(&[5000, 1]);
        assert!(long.len() <= MAX_SCHEDULE as usize, "{}", long.len());
        assert_eq!(long.iter().filter(|i| **i == 1).count(), 1);
    }

    #[tokio::test]
    async fn weights_share_new_connections() {
        let mut eps = Endpoints::start(&[true, true]).await;
        let c = eps.weighted(LoadBalancer::RoundRobin, vec![3, 1]);
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(eps.connect(&c).await);
        }
        assert_eq!(eps.accepted(8).await, [6, 2]);

        // Least request weighs load by weight: with every connection held, the heavy endpoint
        // ends up with three times as many, give or take the one the tie rule hands out.
        let mut eps = Endpoints::start(&[true, true]).await;
        let c = eps.weighted(LoadBalancer::LeastRequest, vec![3, 1]);
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(eps.connect(&c).await);
        }
        let counts = eps.accepted(40).await;
        assert!((29..=31).contains(&counts[0]), "{counts:?}");
    }

    #[tokio::test]
    async fn a_name_the_app_calls_is_dialled_only_where_it_may_go() {
        let eps = Endpoints::start(&[true]).await;
        let port = eps.addrs[0].port();
        let service = |addresses: Vec<sluice_api::model::Cidr>| {
            let mut c = eps.connector(LoadBalancer::RoundRobin);
            let mut s = (*c.service).clone();
            s.endpoints = vec![Endpoint::Dns {
                host: "localhost".into(),
                port,
            }];
            s.hosts = vec!["localhost".into()];
            s.addresses = addresses;
            c = Connector::new(
                Arc::new(s),
                LABEL.into(),
                &[],
                c.resolver.clone(),
                c.timeouts,
                Arc::new(Metrics::default()),
                None,
            )
            .unwrap();
            c
        };
        let refused = tokio::time::timeout(WAIT, service(Vec::new()).connect())
            .await
            .unwrap()
            .err()
            .expect("loopback refused");
        assert!(
            refused
                .message
                .contains("localhost resolves only to refused addresses (")
                && refused.message.contains(" is loopback); name the address"),
            "{}",
            refused.message
        );
        let named = sluice_api::model::Cidr::parse("127.0.0.1").unwrap();
        let up = tokio::time::timeout(WAIT, service(vec![named]).connect())
            .await
            .unwrap();
        assert!(up.is_ok(), "{:?}", up.err());
    }

    #[tokio::test]
    async fn only_plain_tcp_is_a_socket_to_relay_bufferless_however_it_is_wrapped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Each TCP row's own stream, named by its local port, so a row finds the socket it wraps.
        let mut streams = Vec::new();
        for _ in 0..4 {
            let stream = TcpStream::connect(addr).await.unwrap();
            let port = stream.local_addr().unwrap().port();
            streams.push((stream, port));
        }
        let [(bare, p1), (left, p2), (counted, p3), (twice, p4)]: [_; 4] =
            streams.try_into().unwrap();
        let (unix, _peer) = UnixStream::pair().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let rows: Vec<(&str, Box<dyn Io>, Option<u16>)> = vec![
            ("bare TcpStream", Box::new(bare), Some(p1)),
            ("Socket::Left", Box::new(Socket::Left(left)), Some(p2)),
            (
                "counted Socket::Left",
                Box::new(Counted::new(Socket::Left(counted), &open)),
                Some(p3),
            ),
            (
                "boxed twice",
                Box::new(Box::new(twice) as Box<dyn Io>),
                Some(p4),
            ),
            ("unix socket", Box::new(Socket::Right(unix)), None),
            ("another stream", Box::new(tokio::io::duplex(64).0), None),
        ];
        for (name, io, expected) in &rows {
            let found = plain_socket(&**io).map(|tcp| tcp.local_addr().unwrap().port());
            assert_eq!(found, *expected, "{name}");
        }
    }
}
