//! The running proxy: listeners bound from the current `ProxyConfig`, swapped live.
//!
//! A listener's route is read once per accepted connection, so a connection keeps the route it
//! started with while new connections follow a new config at once. Upstreams (and their pools)
//! are kept across reloads for every service whose settings did not change.

use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sluice_api::model::{Endpoint, Protocol};
use sluice_control::{service_label, ProxyConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::coalesce;
use crate::dns;
use crate::forward;
use crate::hello::HelloError;
use crate::http::{HttpTimeouts, RequestContext};
use crate::metrics::{Metrics, ResultLabels};
use crate::policy::{Mode, Table};
use crate::tcp;
use crate::transparent::{self, RealIp};
use crate::upstream::Timeouts;
use crate::upstreams::{Factory, Lazy, Upstream};

/// Bounds on how long a DNS answer about an endpoint is reused.
pub const DNS_MIN_TTL: Duration = Duration::from_secs(1);
pub const DNS_MAX_TTL: Duration = Duration::from_secs(60);
pub const DNS_NEGATIVE_MAX_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a removed listener's connections may go on before they are closed.
    pub drain_timeout: Duration,
    pub upstream: Timeouts,
    pub http: HttpTimeouts,
    /// An app connection must send a complete request head within this time.
    pub header_read_timeout: Duration,
    /// Client connections open at once, over all listeners.
    pub max_connections: usize,
    /// A TCP connection with no bytes moving either way for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The outbound traffic policy for the forward proxy until changed live.
    pub outbound_traffic_policy: Mode,
    /// A DNS server to ask instead of the system's resolver configuration.
    pub dns_server: Option<SocketAddr>,
    /// The directory certificate and key files named by resources must be in (Istio's
    /// `caCertificates`, `clientCertificate`, `privateKey`); without it no file is read.
    pub tls_file_dir: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            upstream: Timeouts::default(),
            http: HttpTimeouts::default(),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            tcp_idle_timeout: Duration::from_secs(3600),
            outbound_traffic_policy: Mode::Allowed,
            dns_server: None,
            tls_file_dir: None,
        }
    }
}

/// What a problem with applying a config was about, for one clear line each.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("external service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error("listener {name} on {address}: cannot listen: {reason}; free the port or change the outbound's port")]
    Bind {
        name: String,
        address: SocketAddr,
        reason: String,
    },
}

struct Route {
    listener: Arc<str>,
    upstream: Arc<Upstream>,
    /// `sluice_active_connections` of the route's service, resolved once.
    open: Gauge,
}

/// Counts a connection as open for as long as it lives.
struct Open(Gauge);

impl Open {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct ListenerHandle {
    route: watch::Sender<Arc<Route>>,
    life: Lifecycle,
}

/// How a listener ends: it stops accepting, its connections get until the drain deadline to
/// finish, and whatever is still open then is closed.
#[derive(Clone)]
struct Lifecycle {
    stop: CancellationToken,
    tracker: TaskTracker,
    kill: CancellationToken,
}

impl Default for Lifecycle {
    fn default() -> Self {
        // `stop` is `kill`'s child, so killing stops too: a connection that waits to be stopped
        // needs no second wait to be killed until it is stopping.
        let kill = CancellationToken::new();
        Self {
            stop: kill.child_token(),
            tracker: TaskTracker::new(),
            kill,
        }
    }
}

impl Lifecycle {
    async fn drain(self, deadline: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tracker.len(),
                "drain deadline reached; closing remaining connections"
            );
        }
        self.kill.cancel();
        // What was cut off records itself on the way out.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
    }
}

struct Shared {
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    settings: Settings,
    connections: Arc<Semaphore>,
}

struct State {
    listeners: HashMap<SocketAddr, ListenerHandle>,
    upstreams: HashMap<String, Arc<Lazy>>,
    /// For services without endpoints (Istio's resolution NONE), one upstream per name a VIP
    /// stands for, going to that name: keyed by service label and name.
    named: HashMap<(String, String), Arc<Lazy>>,
    mode: Mode,
    /// Addresses this process listens on besides the outbounds (admin, forward proxy).
    own: Vec<SocketAddr>,
    /// The forward proxy's lifecycle, once started.
    forward: Option<Lifecycle>,
    /// Transparent listeners and DNS servers, one per address (IPv4 and IPv6 loopback, say).
    transparent: Vec<Lifecycle>,
    dns: Vec<CancellationToken>,
}

pub struct Proxy {
    shared: Arc<Shared>,
    /// Set once the forward proxy and transparent mode's listeners are open: `/ready` waits
    /// for it as well as for a config.
    started: std::sync::atomic::AtomicBool,
    /// Builds each service's upstream when it is first needed.
    factory: Arc<Factory>,
    state: Mutex<State>,
    config: watch::Sender<Option<Arc<ProxyConfig>>>,
    forward: watch::Sender<Arc<forward::State>>,
    /// What the transparent listener routes VIPs by, and what the DNS server answers.
    vips: watch::Sender<Arc<VipRoutes>>,
    zone: watch::Sender<Arc<dns::Zone>>,
}

/// Each VIP's names and, per port, the route to its service; every service's route by label,
/// for real addresses a service opens.
#[derive(Default)]
struct VipRoutes {
    by_ip: HashMap<std::net::IpAddr, Vip>,
    by_label: HashMap<Arc<str>, Arc<Lazy>>,
}

struct Vip {
    names: Arc<[String]>,
    ports: HashMap<u16, Arc<Lazy>>,
}

impl Proxy {
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
    ) -> Result<Self, String> {
        let mut builder = match settings.dns_server {
            // One name server, UDP then TCP, instead of the system's configuration.
            Some(addr) => {
                use hickory_resolver::config::{
                    ConnectionConfig, NameServerConfig, ResolverConfig,
                };
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), vec![server]),
                    hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?,
        };
        let opts = builder.options_mut();
        // Answers are reused for their TTL, within bounds: a zero TTL does not mean a lookup per
        // connection, and a day-long TTL does not pin an endpoint that has moved.
        opts.positive_min_ttl = Some(DNS_MIN_TTL);
        opts.positive_max_ttl = Some(DNS_MAX_TTL);
        opts.negative_min_ttl = Some(DNS_MIN_TTL);
        opts.negative_max_ttl = Some(DNS_NEGATIVE_MAX_TTL);
        // Both families, IPv4 first: every address a name has is checked and tried in turn.
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot start the DNS resolver: {e}"))?;
        crate::pins::announce();
        let settings_mode = settings.outbound_traffic_policy;
        let factory = Arc::new(Factory {
            resolver: Arc::new(resolver),
            timeouts: settings.upstream,
            http: settings.http,
            metrics: metrics.clone(),
            checks: Arc::default(),
            tls_file_dir: settings.tls_file_dir.clone(),
        });
        Ok(Self {
            started: std::sync::atomic::AtomicBool::new(false),
            factory,
            shared: Arc::new(Shared {
                connections: Arc::new(Semaphore::new(settings.max_connections)),
                metrics,
                access_log,
                settings,
            }),
            state: Mutex::new(State {
                listeners: HashMap::new(),
                upstreams: HashMap::new(),
                named: HashMap::new(),
                mode: settings_mode,
                own: Vec::new(),
                forward: None,
                transparent: Vec::new(),
                dns: Vec::new(),
            }),
            config: watch::Sender::new(None),
            vips: watch::Sender::new(Arc::default()),
            zone: watch::Sender::new(Arc::default()),
            forward: watch::Sender::new(Arc::new(forward::State {
                mode: settings_mode,
                table: Table::default(),
                services: HashMap::new(),
            })),
        })
    }

    /// Marks every listener the proxy was asked for as open.
    pub fn mark_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether every listener the proxy was asked for is open.
    pub fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The config last applied, if any.
    pub fn current(&self) -> Option<Arc<ProxyConfig>> {
        self.config.borrow().clone()
    }

    /// Applies a new config. Service errors reject it whole and change nothing; a listener that
    /// cannot bind is reported while everything else is applied.
    pub async fn apply(&self, mut config: ProxyConfig) -> Result<Vec<ApplyError>, Vec<ApplyError>> {
        let mut state = self.state.lock().await;

        let mut upstreams = HashMap::new();
        let mut errors = Vec::new();
        for (label, service) in config.services.iter_mut() {
            match state.upstreams.get(label) {
                Some(old) if *old.service == **service => {
                    // The new copy goes: one model per service, not one per apply kept.
                    *service = old.service.clone();
                    upstreams.insert(label.clone(), old.clone());
                }
                _ => match Lazy::new(label.clone(), service.clone(), self.factory.clone()) {
                    Ok(u) => {
                        upstreams.insert(label.clone(), Arc::new(u));
                    }
                    Err(reason) => errors.push(ApplyError::Service {
                        service: label.clone(),
                        reason,
                    }),
                },
            }
        }
        if !errors.is_empty() {
            self.count_reload("rejected");
            return Err(errors);
        }
        for l in config.listeners.iter_mut() {
            if let Some(shared) = config.services.get(&service_label(&l.service.key)) {
                l.service = shared.clone();
            }
        }

        let mut bind_errors = Vec::new();
        let mut keep = HashMap::new();
        for l in &config.listeners {
            let label = service_label(&l.service.key);
            // A listener's service is built now: it is there to be called.
            let Some(lazy) = upstreams.get(&label) else {
                continue;
            };
            let upstream = match lazy.try_get() {
                Ok(u) => u,
                Err(reason) => {
                    bind_errors.push(ApplyError::Service {
                        service: label.clone(),
                        reason,
                    });
                    continue;
                }
            };
            let route = Arc::new(Route {
                listener: Arc::from(l.name.as_str()),
                upstream: upstream.clone(),
                open: self
                    .shared
                    .metrics
                    .active_connections
                    .get_or_create(&Metrics::service(&label))
                    .clone(),
            });
            if let Some(existing) = state.listeners.remove(&l.address) {
                let unchanged = Arc::ptr_eq(&existing.route.borrow().upstream, &upstream)
                    && *existing.route.borrow().listener == *l.name;
                if !unchanged {
                    existing.route.send_replace(route);
                }
                keep.insert(l.address, existing);
                continue;
            }
            match listen(l.address).await {
                Ok(listener) => {
                    tracing::info!(listener = %l.name, address = %l.address, service = %label, "listening");
                    keep.insert(l.address, self.spawn_listener(listener, route));
                }
                Err(e) => bind_errors.push(ApplyError::Bind {
                    name: l.name.clone(),
                    address: l.address,
                    reason: e.to_string(),
                }),
            }
        }
        for (address, removed) in state.listeners.drain() {
            tracing::info!(%address, drain = ?self.shared.settings.drain_timeout, "listener removed; draining");
            tokio::spawn(removed.life.drain(self.shared.settings.drain_timeout));
        }
        state.listeners = keep;
        state.upstreams = upstreams;
        if let Some(mode) = config.outbound_traffic_policy {
            state.mode = mode;
        }
        let config = Arc::new(config);
        self.publish_forward_state(&state, &config);
        self.publish_vips(&mut state, &config);
        // Last: /ready and the config stream's ACK follow this, and what they announce must
        // already be enforced (the forward table of 100,000 services takes a while to build).
        self.config.send_replace(Some(config));
        self.count_reload("applied");
        Ok(bind_errors)
    }

    /// What the forward proxy enforces, rebuilt from the applied config and the current mode.
    fn publish_forward_state(&self, state: &State, config: &ProxyConfig) {
        let own = state
            .listeners
            .keys()
            .copied()
            .chain(state.own.iter().copied());
        let services = state
            .upstreams
            .values()
            .map(|u| (u.label.clone(), u.clone()))
            .collect();
        self.forward.send_replace(Arc::new(forward::State {
            mode: state.mode,
            table: Table::new(config, own),
            services,
        }));
    }

    /// What the transparent listener and the DNS server serve, from the applied config.
    fn publish_vips(&self, state: &mut State, config: &ProxyConfig) {
        let mut routes = VipRoutes {
            by_ip: HashMap::new(),
            by_label: state
                .upstreams
                .values()
                .map(|u| (u.label.clone(), u.clone()))
                .collect(),
        };
        let mut named = HashMap::new();
        for v in config.virtual_ips.iter() {
            let mut ports = HashMap::new();
            for (port, label) in &v.ports {
                let Some(upstream) = state.upstreams.get(label) else {
                    continue;
                };
                let service = &upstream.service;
                let Some(name) = v.names.first().filter(|_| service.endpoints.is_empty()) else {
                    ports.insert(*port, upstream.clone());
                    continue;
                };
                // Called by one of its hosts, it goes to that host, as the forward proxy
                // sends it to the host the app named.
                let mut own = (**service).clone();
                own.endpoints = vec![Endpoint::Dns {
                    host: name.clone(),
                    port: *port,
                }];
                let key = (label.clone(), name.clone());
                let by_name = match state.named.remove(&key) {
                    Some(old) if *old.service == own => old,
                    _ => match Lazy::new(label.clone(), Arc::new(own), self.factory.clone()) {
                        Ok(u) => Arc::new(u),
                        Err(e) => {
                            tracing::warn!(service = %label, %name, error = %e, "no route for this name");
                            continue;
                        }
                    },
                };
                ports.insert(*port, by_name.clone());
                named.insert(key, by_name);
            }
            let mut all: Vec<String> = v.names.clone();
            all.push(v.ip.to_string());
            routes.by_ip.insert(
                v.ip,
                Vip {
                    names: Arc::from(all),
                    ports,
                },
            );
        }
        state.named = named;
        let names = config
            .virtual_ips
            .iter()
            .flat_map(|v| v.names.iter().map(|n| (n.clone(), v.ip)));
        self.vips.send_replace(Arc::new(routes));
        self.zone
            .send_replace(Arc::new(dns::Zone::new(names, config.vip_ranges.clone())));
    }

    /// Starts the transparent listener on `addr`: connections redirected to it by the kernel
    /// go where the app sent them, through the service a VIP stands for or, for a real
    /// address, as the outbound traffic policy says.
    pub async fn start_transparent(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = listen(addr).await?;
        let bound = listener.local_addr()?;
        self.add_own_address(bound).await;
        let life = Lifecycle::default();
        let shared = self.shared.clone();
        let vips = self.vips.subscribe();
        let forward = self.forward.subscribe();
        let Lifecycle {
            stop,
            tracker,
            kill,
        } = life.clone();
        tokio::spawn(async move {
            accept_each(listener, &stop, &shared.clone(), |stream, peer, permit| {
                let shared = shared.clone();
                let (stop, kill) = (stop.clone(), kill.clone());
                let vips = vips.borrow().clone();
                let forward = forward.borrow().clone();
                spawn_connection(&tracker, async move {
                    let _permit = permit;
                    serve_redirected(stream, peer, bound, &vips, &forward, shared, stop, kill)
                        .await;
                });
            })
            .await;
        });
        self.state.lock().await.transparent.push(life);
        tracing::info!(address = %bound, "transparent listener listening");
        Ok(bound)
    }

    /// Starts the DNS server on `addr` (UDP and TCP), forwarding what it does not answer to
    /// `upstreams`; the error is one line saying what to change.
    pub async fn start_dns(
        &self,
        addr: SocketAddr,
        upstreams: Vec<SocketAddr>,
    ) -> Result<SocketAddr, String> {
        let cannot =
            |e: std::io::Error| format!("{addr}: cannot listen: {e}; choose another with --dns");
        let udp = tokio::net::UdpSocket::bind(addr).await.map_err(cannot)?;
        let bound = udp.local_addr().map_err(cannot)?;
        let tcp = TcpListener::bind(bound).await.map_err(cannot)?;
        let upstreams = dns::forwarding_targets(upstreams, bound)?;
        self.add_own_address(bound).await;
        let stop = CancellationToken::new();
        let settings = dns::DnsSettings {
            upstreams,
            ..dns::DnsSettings::default()
        };
        tokio::spawn(dns::serve(
            udp,
            tcp,
            self.zone.subscribe(),
            settings,
            self.shared.metrics.clone(),
            stop.clone(),
        ));
        self.state.lock().await.dns.push(stop);
        tracing::info!(address = %bound, "DNS server listening");
        Ok(bound)
    }

    /// Changes the outbound traffic policy live: open tunnels go on, the next request or tunnel
    /// follows the new mode.
    pub async fn set_outbound_traffic_policy(&self, mode: Mode) {
        let mut state = self.state.lock().await;
        state.mode = mode;
        let config = self.current().unwrap_or_default();
        self.publish_forward_state(&state, &config);
    }

    pub async fn outbound_traffic_policy(&self) -> Mode {
        self.state.lock().await.mode
    }

    /// Marks an address this process listens on, so no request is sent back into it.
    pub async fn add_own_address(&self, addr: SocketAddr) {
        let mut state = self.state.lock().await;
        state.own.push(addr);
        let config = self.current().unwrap_or_default();
        self.publish_forward_state(&state, &config);
    }

    /// Starts the forward proxy (`HTTP_PROXY`/`HTTPS_PROXY`) on `addr`.
    pub async fn start_forward_proxy(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = listen(addr).await?;
        let bound = listener.local_addr()?;
        self.add_own_address(bound).await;
        let life = Lifecycle::default();
        let shared = Arc::new(forward::Shared {
            tunnels: life.tracker.clone(),
            kill: life.kill.clone(),
            state: self.forward.subscribe(),
            resolver: self.factory.resolver.clone(),
            metrics: self.shared.metrics.clone(),
            access_log: self.shared.access_log.clone(),
            connect_timeout: self.shared.settings.upstream.connect,
            hello_timeout: self.shared.settings.header_read_timeout,
            idle_timeout: self.shared.settings.tcp_idle_timeout,
            response_timeout: self.shared.settings.http.response,
            listener: Arc::from("forward-proxy"),
        });
        let limits = self.shared.clone();
        let Lifecycle {
            stop,
            tracker,
            kill,
        } = life.clone();
        tokio::spawn(async move {
            accept_each(listener, &stop, &limits, |stream, peer, permit| {
                let shared = shared.clone();
                let header_timeout = limits.settings.header_read_timeout;
                let (stop, kill) = (stop.clone(), kill.clone());
                spawn_connection(&tracker, async move {
                    let slot: forward::Slot = Arc::new(permit);
                    match forward::first_head(&stream, header_timeout).await {
                        forward::FirstHead::Fine => {}
                        forward::FirstHead::Ambiguous(why) => {
                            forward::refuse_framing(stream, peer, &shared, why).await;
                            return;
                        }
                        forward::FirstHead::TimedOut => return,
                    }
                    let service = service_fn(move |req| {
                        forward::handle(req, peer, shared.clone(), slot.clone())
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let stopped = stop.cancelled();
                    tokio::pin!(conn, stopped);
                    let closed = until_closed(conn, |c| c.graceful_shutdown(), stopped, &kill);
                    let Some(result) = closed.await else { return };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "forward proxy connection ended with an error");
                    }
                });
            })
            .await;
        });
        self.state.lock().await.forward = Some(life);
        tracing::info!(address = %bound, "forward proxy listening");
        Ok(bound)
    }

    /// Stops accepting everywhere and waits (up to the drain timeout) for open connections.
    pub async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        let deadline = self.shared.settings.drain_timeout;
        let mut draining = tokio::task::JoinSet::new();
        for (_, l) in state.listeners.drain() {
            draining.spawn(l.life.drain(deadline));
        }
        if let Some(forward) = state.forward.take() {
            draining.spawn(forward.drain(deadline));
        }
        for transparent in state.transparent.drain(..) {
            draining.spawn(transparent.drain(deadline));
        }
        for dns in state.dns.drain(..) {
            dns.cancel();
        }
        while draining.join_next().await.is_some() {}
        self.shared.access_log.flush().await;
    }

    fn count_reload(&self, result: &'static str) {
        self.shared
            .metrics
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn spawn_listener(&self, listener: TcpListener, route: Arc<Route>) -> ListenerHandle {
        let (tx, rx) = watch::channel(route);
        let life = Lifecycle::default();
        tokio::spawn(accept_loop(listener, rx, self.shared.clone(), life.clone()));
        ListenerHandle { route: tx, life }
    }
}

/// A listener whose connections come with Nagle's algorithm off: Linux copies `TCP_NODELAY`
/// from a listener to each connection it accepts, which spares a system call per connection.
async fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    Ok(listener)
}

/// Runs one app connection in a task of its own, boxed: tokio copies a task's future into the
/// task and over it as it ends, several times in all, and a connection's is kilobytes.
fn spawn_connection(tracker: &TaskTracker, connection: impl Future<Output = ()> + Send + 'static) {
    tracker.spawn(Box::pin(connection));
}

/// Accepts until `stop`, each connection within `--max-connections` handed to `each` (beyond
/// it, closed at once); accept errors back off instead of spinning.
async fn accept_each(
    listener: TcpListener,
    stop: &CancellationToken,
    limits: &Shared,
    mut each: impl FnMut(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit),
) {
    // One wait on the token for the listener's life, and accepts polled in place: accept() and
    // a new wait per connection would each take a lock twice.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped.as_mut() => break,
            a = std::future::poll_fn(|cx| listener.poll_accept(cx)) => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.settings.max_connections, "connection limit reached; closing new connection");
            continue;
        };
        each(stream, peer, permit);
    }
}

async fn accept_loop(
    listener: TcpListener,
    route: watch::Receiver<Arc<Route>>,
    shared: Arc<Shared>,
    life: Lifecycle,
) {
    let Lifecycle {
        stop,
        tracker,
        kill,
    } = life;
    accept_each(listener, &stop, &shared.clone(), |stream, peer, permit| {
        let route = route.borrow().clone();
        let shared = shared.clone();
        let (stop, kill) = (stop.clone(), kill.clone());
        spawn_connection(&tracker, async move {
            let _permit = permit;
            serve_connection(stream, peer, route, shared, stop, kill, Checked::default()).await;
        });
    })
    .await;
}

/// What the transparent listener learnt of a connection before handing it on.
#[derive(Default)]
struct Checked {
    /// The names an HTTP request's Host must be one of (a VIP's).
    hosts: Option<Arc<[String]>>,
    /// A ClientHello already read and checked, to send on first, and the name it carried.
    first: Vec<u8>,
    sni: Option<String>,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    kill: CancellationToken,
    checked: Checked,
) {
    let _open = Open::new(&route.open);
    match &*route.upstream {
        Upstream::Tcp(upstream) => {
            // Boxed, as HTTP/2 below: its state is twice an HTTP/1.1 connection's.
            Box::pin(tcp::serve(
                stream,
                upstream,
                tcp::ConnContext {
                    peer,
                    listener: route.listener.clone(),
                    access_log: &shared.access_log,
                    idle_timeout: shared.settings.tcp_idle_timeout,
                    first: checked.first,
                    sni: checked.sni,
                },
                kill,
            ))
            .await;
        }
        Upstream::Http(upstream) => {
            let ctx = Arc::new(RequestContext {
                listener: route.listener.clone(),
                peer,
                upstream: upstream.clone(),
                access_log: shared.access_log.clone(),
                hosts: checked.hosts,
            });
            // Waited on for the whole connection: each new wait on a token takes its lock twice.
            // Killing stops too.
            let stopped = stop.cancelled();
            tokio::pin!(stopped);
            // The opening decides the protocol: an HTTP/2 client gets its writes batched; an
            // HTTP/1.1 one, answered one response at a time, the socket as is.
            let (opening, stream) = tokio::select! {
                biased;
                o = coalesce::opening(stream, shared.settings.header_read_timeout) => o,
                // Nothing asked yet: nothing to finish.
                _ = stopped.as_mut() => return,
            };
            let service = service_fn(move |req| crate::http::handle(req, ctx.clone()));
            let result = match opening {
                coalesce::Opening::Gone => return,
                // Boxed: a connection's future is copied several times on its way into its task
                // and out of it, and HTTP/2's server state would make every connection's future
                // as large as its own.
                coalesce::Opening::H2 => Box::pin(serve_h2(stream, service, stopped, &kill)).await,
                coalesce::Opening::Other => {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(shared.settings.header_read_timeout)
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    until_closed(conn, |c| c.graceful_shutdown(), stopped, &kill).await
                }
            };
            let Some(result) = result else { return };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        }
    }
}

/// An app connection that opened with the HTTP/2 preface, served with its writes batched.
async fn serve_h2<S>(
    stream: coalesce::First<TcpStream>,
    service: S,
    stopped: Pin<&mut WaitForCancellationFuture<'_>>,
    kill: &CancellationToken,
) -> Option<Result<(), hyper::Error>>
where
    S: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (io, driver) = coalesce::h2(stream);
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    let conn = driver.drive(conn);
    tokio::pin!(conn);
    until_closed(conn, |c| c.conn().graceful_shutdown(), stopped, kill).await
}

/// Runs a client connection to its end; once `stopped` lets the requests in flight finish
/// first. `None` when `kill` cut it short (a kill stops as well).
async fn until_closed<C, E>(
    mut conn: Pin<&mut C>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    stopped: Pin<&mut WaitForCancellationFuture<'_>>,
    kill: &CancellationToken,
) -> Option<Result<(), E>>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::select! {
        biased;
        r = conn.as_mut() => return Some(r),
        _ = stopped => {}
    }
    if kill.is_cancelled() {
        return None;
    }
    graceful_shutdown(conn.as_mut());
    tokio::select! {
        biased;
        r = conn.as_mut() => Some(r),
        _ = kill.cancelled() => None,
    }
}

/// One connection the kernel redirected: to the service behind a VIP and port, or to a real
/// address as the policy allows.
#[allow(clippy::too_many_arguments)]
async fn serve_redirected(
    mut stream: TcpStream,
    peer: SocketAddr,
    bound: SocketAddr,
    vips: &VipRoutes,
    forward: &forward::State,
    shared: Arc<Shared>,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let ctx = transparent::Context {
        listener: Arc::from("transparent"),
        access_log: &shared.access_log,
        metrics: &shared.metrics,
        connect_timeout: shared.settings.upstream.connect,
        idle_timeout: shared.settings.tcp_idle_timeout,
    };
    let dest = match transparent::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "transparent listener: no original destination");
            return;
        }
    };
    // Sent to the listener itself, not redirected: nothing says where it was going.
    if dest == bound {
        let why = "this connection was not redirected here; the transparent listener only takes connections iptables redirects";
        ctx.refuse(peer, dest, "not_redirected", why);
        return;
    }
    let mut checked = Checked::default();
    let upstream = if let Some(vip) = vips.by_ip.get(&dest.ip()) {
        let Some(upstream) = vip.ports.get(&dest.port()) else {
            let mut ports: Vec<u16> = vip.ports.keys().copied().collect();
            ports.sort_unstable();
            let why = format!(
                "{} ({}) has no port {}; its services listen on {ports:?}",
                dest.ip(),
                vip.names.first().map_or("", String::as_str),
                dest.port(),
            );
            ctx.refuse(peer, dest, "vip_port", &why);
            return;
        };
        // An app speaking TLS itself: the name in its ClientHello must be the VIP's.
        if upstream.service.protocol == Protocol::Tls {
            let timeout = shared.settings.header_read_timeout;
            match transparent::read_vip_hello(&mut stream, &vip.names, timeout).await {
                Ok((first, sni)) => {
                    checked.first = first;
                    checked.sni = Some(sni);
                }
                Err(HelloError::Refused(reason, why)) => {
                    return ctx.refuse(peer, dest, reason, &why);
                }
                Err(HelloError::Ended(why)) => {
                    tracing::debug!(%peer, destination = %dest, "transparent connection ended: {why}");
                    return;
                }
            }
        }
        checked.hosts = Some(vip.names.clone());
        upstream
    } else {
        match transparent::decide_real(forward.mode, &forward.table, dest) {
            RealIp::Denied(d) => return ctx.refuse(peer, dest, d.reason(), &d.to_string()),
            RealIp::Direct {
                service,
                passthrough,
            } => {
                return ctx
                    .relay_direct(stream, peer, dest, service, passthrough, &kill)
                    .await
            }
            RealIp::Service(label) => match vips.by_label.get(&label) {
                Some(upstream) => upstream,
                None => {
                    let why = format!("external service {label} is not ready");
                    return ctx.refuse(peer, dest, "not_ready", &why);
                }
            },
        }
    };
    let Some(built) = upstream.get() else {
        let why = format!("external service {} is not ready", upstream.label);
        return ctx.refuse(peer, dest, "not_ready", &why);
    };
    let route = Arc::new(Route {
        listener: ctx.listener.clone(),
        upstream: built,
        open: upstream.open(),
    });
    drop(ctx);
    serve_connection(stream, peer, route, shared, stop, kill, checked).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::model::{Endpoint, ExternalService, LoadBalancer, Protocol, ResourceKey};
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
        // The client side is not the listener's: the option is the listener's doing.
        assert!(!client.nodelay().unwrap());
    }

    fn service(name: &str, port: u16) -> Arc<ExternalService> {
        Arc::new(ExternalService {
            key: ResourceKey {
                mesh: "default".into(),
                name: name.into(),
            },
            port: 80,
            protocol: Protocol::Http,
            endpoints: vec![Endpoint::Dns {
                host: format!("{name}.example.com"),
                port,
            }],
            tls: None,
            hosts: vec![],
            addresses: vec![],
            load_balancer: LoadBalancer::RoundRobin,
            endpoint_weights: vec![],
        })
    }

    fn config(services: &[Arc<ExternalService>]) -> ProxyConfig {
        ProxyConfig {
            listeners: vec![],
            services: services
                .iter()
                .map(|s| (service_label(&s.key), s.clone()))
                .collect::<BTreeMap<_, _>>(),
            outbound_traffic_policy: None,
            virtual_ips: Default::default(),
            vip_ranges: vec![],
        }
    }

    #[tokio::test]
    async fn an_unchanged_service_keeps_one_model_across_applies() {
        let log = AccessLog::start(crate::access_log::Target::Off, Default::default()).unwrap();
        let proxy = Proxy::new(Settings::default(), Arc::new(Metrics::default()), log).unwrap();
        let (a, b) = (service("a", 443), service("b", 443));
        proxy.apply(config(&[a.clone(), b.clone()])).await.unwrap();
        // The next snapshot decodes fresh copies: equal models, new allocations.
        let (a2, b2) = (service("a", 443), service("b", 8443));
        proxy
            .apply(config(&[a2.clone(), b2.clone()]))
            .await
            .unwrap();
        let current = proxy.current().unwrap();
        let kept = &current.services[&service_label(&a.key)];
        assert!(
            Arc::ptr_eq(kept, &a),
            "the unchanged service's first model is kept"
        );
        let changed = &current.services[&service_label(&b.key)];
        assert!(
            Arc::ptr_eq(changed, &b2),
            "a changed service takes the new model"
        );
        assert_eq!(
            Arc::strong_count(&a2),
            1,
            "the fresh copy of the unchanged one is let go"
        );
    }
}
