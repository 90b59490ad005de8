//! The upstream connections of one external service: idle HTTP/1.1 connections kept for reuse
//! and at most one shared HTTP/2 connection.
//!
//! One pool serves one service, and every connection it opens goes to that service's endpoints
//! with the same TLS settings, so any idle connection fits any request: no key to hash. A
//! connection goes back to the pool when its response body has been read to the end, straight
//! from the request path.
//!
//! While a service speaks HTTP/2, or may (TLS whose ALPN has not answered yet), new connections
//! are opened one at a time: a burst of first requests shares the one connection, and when that
//! connection fails, the requests that waited for it share the failure instead of each trying
//! again in turn.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::coalesce;
use crate::h2_upstream::{self, H2Body, KeepOpen, Ping};
use crate::upstream::{ConnInfo, ConnectError, Connector};

/// Idle HTTP/1.1 connections kept per service; beyond this, a returning one is closed.
pub const MAX_IDLE: usize = 1024;

/// What the service's connections speak, as far as the pool knows.
const SPEAKS_H1: u8 = 0;
const SPEAKS_UNKNOWN: u8 = 1;
const SPEAKS_H2: u8 = 2;

pub struct Settings {
    /// How long an unused connection is kept.
    pub idle_timeout: Duration,
    /// Speak HTTP/2 whatever ALPN says (gRPC, h2c).
    pub h2_only: bool,
    /// The most an HTTP/1.1 connection buffers of a response before the app reads it.
    pub read_buffer: usize,
    /// How often an HTTP/2 connection is pinged, and how long an answer may take.
    pub ping: Ping,
}

pub struct Pool<B> {
    connector: Arc<Connector>,
    settings: Settings,
    idle: Mutex<Vec<Idle<B>>>,
    h2: Mutex<Option<Shared>>,
    /// Held while a connection that may be HTTP/2 is opened; holds why the last such attempt
    /// failed, for the requests that waited on it.
    h2_connecting: tokio::sync::Mutex<Option<ConnectError>>,
    /// Attempts made under `h2_connecting`: a waiter that sees it move knows one ran for it.
    h2_attempts: AtomicU64,
    speaks: AtomicU8,
    reaper: std::sync::Once,
}

struct Shared {
    sender: h2_upstream::Sender,
    info: ConnInfo,
    used: Instant,
    /// Dropped with the entry: the connection then closes once its streams have ended.
    _keep_open: KeepOpen,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    info: ConnInfo,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Connect(ConnectError),
    Http(hyper::Error),
    Http2(h2::Error),
}

/// An HTTP/1.1 connection carrying one exchange; [`Lease::release`] once its response body has
/// ended puts it back. Dropped instead, the connection closes once idle.
pub struct Lease<B> {
    pool: Weak<Pool<B>>,
    sender: http1::SendRequest<B>,
    info: ConnInfo,
}

impl<B> Lease<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn release(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.sender, self.info);
        }
    }
}

/// What a request came back with: the response, the connection's facts and, on HTTP/1.1, the
/// lease that returns the connection.
pub struct Sent<B> {
    pub response: Response<UpstreamBody>,
    pub info: ConnInfo,
    pub lease: Option<Lease<B>>,
}

/// A response body as the upstream connection delivers it.
pub enum UpstreamBody {
    Http1(Incoming),
    Http2(H2Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            UpstreamBody::Http2(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

enum Conn<B> {
    H1(http1::SendRequest<B>, ConnInfo, bool),
    H2(h2_upstream::Sender, ConnInfo, bool),
}

impl<B> Pool<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(connector: Arc<Connector>, settings: Settings) -> Self {
        // TLS offers `h2` by ALPN to every HTTP service: its first connection may turn out HTTP/2.
        let speaks = if settings.h2_only {
            SPEAKS_H2
        } else if connector.service.tls.is_some() {
            SPEAKS_UNKNOWN
        } else {
            SPEAKS_H1
        };
        Self {
            connector,
            settings,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(None),
            h2_attempts: AtomicU64::new(0),
            speaks: AtomicU8::new(speaks),
            reaper: std::sync::Once::new(),
        }
    }

    /// Sends `req` over an idle connection or a new one. A reused HTTP/1.1 connection that the
    /// server closed before taking the request (the usual keep-alive race) is dropped and the
    /// request goes out again on the next.
    pub async fn send(self: &Arc<Self>, mut req: Request<B>) -> Result<Sent<B>, SendError> {
        loop {
            let (result, reused, undo) = match self.checkout().await? {
                Conn::H2(mut conn, info, reused) => {
                    match std::future::poll_fn(|cx| conn.send.poll_ready(cx)).await {
                        Ok(()) => {}
                        // Gone before the request left: it may go out on another.
                        Err(_) if reused => {
                            self.forget_h2(&conn);
                            continue;
                        }
                        Err(e) => return Err(SendError::Http2(e)),
                    }
                    let (response, request_body) =
                        h2_upstream::send(&mut conn.send, req).map_err(SendError::Http2)?;
                    let response = response.await.map_err(SendError::Http2)?;
                    let (parts, recv) = response.into_parts();
                    return Ok(Sent {
                        response: Response::from_parts(
                            parts,
                            UpstreamBody::Http2(H2Body::new(recv, request_body)),
                        ),
                        info,
                        lease: None,
                    });
                }
                Conn::H1(mut sender, info, reused) => {
                    let undo = origin_form(&mut req);
                    let result = match sender.try_send_request(req).await {
                        Ok(response) => Ok(Sent {
                            response: response.map(UpstreamBody::Http1),
                            info: info.clone(),
                            lease: Some(Lease {
                                pool: Arc::downgrade(self),
                                sender,
                                info,
                            }),
                        }),
                        Err(e) => Err(e),
                    };
                    (result, reused, Some(undo))
                }
            };
            match result {
                Ok(sent) => return Ok(sent),
                Err(mut e) => match e.take_message() {
                    Some(mut unsent) if reused => {
                        // The next connection may speak HTTP/2, which wants the whole URI.
                        if let Some((uri, host_added)) = undo {
                            *unsent.uri_mut() = uri;
                            if host_added {
                                unsent.headers_mut().remove(HOST);
                            }
                        }
                        req = unsent;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    async fn checkout(self: &Arc<Self>) -> Result<Conn<B>, SendError> {
        if let Some(conn) = self.reusable() {
            return Ok(conn);
        }
        if self.speaks.load(Ordering::Relaxed) == SPEAKS_H1 {
            return self.connect().await;
        }
        let seen = self.h2_attempts.load(Ordering::Acquire);
        let mut last_failure = self.h2_connecting.lock().await;
        if let Some(conn) = self.reusable() {
            return Ok(conn);
        }
        if self.speaks.load(Ordering::Relaxed) == SPEAKS_H1 {
            // The connection opened meanwhile spoke HTTP/1.1: one each, side by side.
            drop(last_failure);
            return self.connect().await;
        }
        if self.h2_attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = last_failure.as_ref() {
                return Err(SendError::Connect(e.clone()));
            }
        }
        let result = self.connect().await;
        *last_failure = match &result {
            Err(SendError::Connect(e)) => Some(e.clone()),
            _ => None,
        };
        self.h2_attempts.fetch_add(1, Ordering::Release);
        result
    }

    /// The shared HTTP/2 connection, or else an idle HTTP/1.1 one.
    fn reusable(&self) -> Option<Conn<B>> {
        self.shared_h2().or_else(|| {
            self.take_idle()
                .map(|(sender, info)| Conn::H1(sender, info, true))
        })
    }

    fn shared_h2(&self) -> Option<Conn<B>> {
        let mut slot = self.h2.lock().ok()?;
        match slot.as_mut() {
            Some(shared) if !shared.sender.closed.load(Ordering::Acquire) => {
                shared.used = Instant::now();
                Some(Conn::H2(shared.sender.clone(), shared.info.clone(), true))
            }
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    /// The most recently used idle connection that is still open and ready, if any. One that
    /// is open but still finishing its last exchange is left in the pool.
    fn take_idle(&self) -> Option<(http1::SendRequest<B>, ConnInfo)> {
        let mut idle = self.idle.lock().ok()?;
        let now = Instant::now();
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut entry) = idle.pop() {
            if entry.sender.is_closed()
                || now.duration_since(entry.since) >= self.settings.idle_timeout
            {
                continue;
            }
            match poll_once(|cx| entry.sender.poll_ready(cx)) {
                Poll::Ready(Ok(())) => {
                    found = Some((entry.sender, entry.info));
                    break;
                }
                Poll::Ready(Err(_)) => continue,
                Poll::Pending => busy.push(entry),
            }
        }
        idle.extend(busy.into_iter().rev());
        found
    }

    async fn connect(self: &Arc<Self>) -> Result<Conn<B>, SendError> {
        let upstream = self.connector.connect().await.map_err(SendError::Connect)?;
        let info = upstream.info;
        if !self.settings.h2_only {
            let speaks = if info.h2 { SPEAKS_H2 } else { SPEAKS_H1 };
            self.speaks.store(speaks, Ordering::Relaxed);
        }
        if self.settings.h2_only || info.h2 {
            let (io, driver) = coalesce::h2(upstream.io);
            let (sender, keep_open, conn) = h2_upstream::handshake(io, self.settings.ping)
                .await
                .map_err(SendError::Http2)?;
            let conn = driver.drive(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            if let Ok(mut slot) = self.h2.lock() {
                *slot = Some(Shared {
                    sender: sender.clone(),
                    info: info.clone(),
                    used: Instant::now(),
                    _keep_open: keep_open,
                });
            }
            self.reaper.call_once(|| self.start_reaper());
            return Ok(Conn::H2(sender, info, false));
        }
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(self.settings.read_buffer)
            .handshake(TokioIo::new(upstream.io))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Conn::H1(sender, info, false))
    }

    fn put(self: &Arc<Self>, sender: http1::SendRequest<B>, info: ConnInfo) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            sender,
            info,
            since: Instant::now(),
        });
        drop(idle);
        self.reaper.call_once(|| self.start_reaper());
    }

    /// Closes connections idle past the timeout even when no request comes to find them; ends
    /// with the pool. An HTTP/2 connection closes once the pool lets go of it and its last
    /// stream has ended.
    fn start_reaper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let every = (self.settings.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.reap();
            }
        });
    }

    fn reap(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|e| !e.sender.is_closed() && now.duration_since(e.since) < timeout);
        }
        if let Ok(mut slot) = self.h2.lock() {
            if slot.as_ref().is_some_and(|s| {
                s.sender.closed.load(Ordering::Acquire) || now.duration_since(s.used) >= timeout
            }) {
                *slot = None;
            }
        }
    }

    /// Lets go of the shared HTTP/2 connection a request found closed, unless another has
    /// taken its place.
    fn forget_h2(&self, conn: &h2_upstream::Sender) {
        conn.closed.store(true, Ordering::Release);
        if let Ok(mut slot) = self.h2.lock() {
            if slot
                .as_ref()
                .is_some_and(|s| s.sender.same_connection(conn))
            {
                *slot = None;
            }
        }
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// An HTTP/1.1 request goes out in origin form with the authority as Host (unless the request
/// has its own Host), written as it is in the URI. Returns the URI it had and whether Host was
/// added.
fn origin_form<B>(req: &mut Request<B>) -> (Uri, bool) {
    let mut host_added = false;
    if !req.headers().contains_key(HOST) {
        if let Some(value) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(HOST, value);
            host_added = true;
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    (
        std::mem::replace(req.uri_mut(), Uri::from(path)),
        host_added,
    )
}

/// Polls once with a waker that does nothing: the answer now, without waiting for one.
fn poll_once<T>(f: impl FnOnce(&mut std::task::Context<'_>) -> Poll<T>) -> Poll<T> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f(&mut cx)
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => e.fmt(f),
            SendError::Http(e) => e.fmt(f),
            SendError::Http2(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
            SendError::Http2(e) => Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use bytes::Bytes;
    use hickory_resolver::config::ResolverConfig;
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::TokioResolver;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioExecutor;
    use sluice_api::model::{
        Endpoint, ExternalService, LoadBalancer, Material, Protocol, ResourceKey, TlsOrigination,
        VerificationMode,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use crate::metrics::Metrics;
    use crate::upstream::Timeouts;

    const WAIT: Duration = Duration::from_secs(10);

    /// What the test origin has seen: connections accepted and closed by the other side.
    #[derive(Default, Clone, Debug, PartialEq)]
    struct Seen {
        accepted: usize,
        closed: usize,
        requests: usize,
    }

    /// A plain HTTP/1.1 origin answering `ok` to every request; with `close_after`, it closes
    /// each connection after its response without saying so (the keep-alive race).
    async fn origin(close_after: bool) -> (SocketAddr, watch::Receiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Seen::default());
        let tx = Arc::new(tx);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tx.send_modify(|s| s.accepted += 1);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            tx.send_modify(|s| s.requests += 1);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                        if close_after && buf.is_empty() {
                            break;
                        }
                    }
                    tx.send_modify(|s| s.closed += 1);
                });
            }
        });
        (addr, rx)
    }

    fn pool(addr: SocketAddr, idle_timeout: Duration, h2_only: bool) -> Arc<Pool<Empty<Bytes>>> {
        pool_of(service(addr, h2_only, None), idle_timeout, WAIT)
    }

    fn service(addr: SocketAddr, h2_only: bool, tls: Option<TlsOrigination>) -> ExternalService {
        ExternalService {
            key: ResourceKey {
                mesh: "default".into(),
                name: "s".into(),
            },
            port: 80,
            protocol: if h2_only {
                Protocol::Http2
            } else {
                Protocol::Http
            },
            endpoints: vec![Endpoint::Ip {
                ip: addr.ip(),
                port: addr.port(),
            }],
            tls,
            hosts: vec![],
            addresses: vec![],
            load_balancer: LoadBalancer::RoundRobin,
            endpoint_weights: vec![],
        }
    }

    /// A pool as HttpUpstream builds one for `service`, with `handshake` as the TLS deadline.
    fn pool_of(
        service: ExternalService,
        idle_timeout: Duration,
        handshake: Duration,
    ) -> Arc<Pool<Empty<Bytes>>> {
        let settings = Settings {
            idle_timeout,
            h2_only: service.protocol.requires_h2(),
            read_buffer: 64 * 1024,
            ping: Ping::default(),
        };
        pool_with(service, handshake, settings)
    }

    fn pool_with(
        service: ExternalService,
        handshake: Duration,
        settings: Settings,
    ) -> Arc<Pool<Empty<Bytes>>> {
        let alpn = crate::upstreams::alpn(&service);
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
            TokioRuntimeProvider::default(),
        )
        .build()
        .unwrap();
        let connector = Connector::new(
            Arc::new(service),
            "s".into(),
            alpn,
            Arc::new(resolver),
            Timeouts {
                connect: WAIT,
                handshake,
            },
            Arc::new(Metrics::default()),
            None,
        )
        .unwrap();
        Arc::new(Pool::new(Arc::new(connector), settings))
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::get("http://s/")
            .header(http::header::HOST, "s")
            .body(Empty::new())
            .unwrap()
    }

    /// Sends one request and reads its body; the lease goes back when `release`.
    async fn exchange(pool: &Arc<Pool<Empty<Bytes>>>, release: bool) -> Bytes {
        let sent = tokio::time::timeout(WAIT, pool.send(get()))
            .await
            .expect("answered in time")
            .expect("answered");
        let body = sent
            .response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        if let (true, Some(lease)) = (release, sent.lease) {
            lease.release();
        }
        body
    }

    async fn seen_until(rx: &mut watch::Receiver<Seen>, what: impl Fn(&Seen) -> bool) -> Seen {
        tokio::time::timeout(WAIT, rx.wait_for(|s| what(s)))
            .await
            .expect("the origin saw it in time")
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn a_released_connection_carries_the_next_request() {
        let (addr, mut seen) = origin(false).await;
        let pool = pool(addr, WAIT, false);
        for _ in 0..5 {
            assert_eq!(exchange(&pool, true).await, "ok");
        }
        let s = seen_until(&mut seen, |s| s.requests == 5).await;
        assert_eq!(s.accepted, 1, "{s:?}");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_not_released_is_not_reused() {
        let (addr, mut seen) = origin(false).await;
        let pool = pool(addr, WAIT, false);
        for _ in 0..3 {
            assert_eq!(exchange(&pool, false).await, "ok");
        }
        let s = seen_until(&mut seen, |s| s.requests == 3).await;
        assert_eq!(s.accepted, 3, "{s:?}");
        assert_eq!(pool.idle_count(), 0);
        // Dropped leases close their connections.
        seen_until(&mut seen, |s| s.closed == 3).await;
    }

    #[tokio::test]
    async fn a_request_meeting_a_connection_the_origin_closed_goes_out_on_a_new_one() {
        let (addr, mut seen) = origin(true).await;
        let pool = pool(addr, WAIT, false);
        assert_eq!(exchange(&pool, true).await, "ok");
        // The pooled connection is closed by the origin; the next request must not fail.
        seen_until(&mut seen, |s| s.closed == 1).await;
        assert_eq!(exchange(&pool, true).await, "ok");
        let s = seen_until(&mut seen, |s| s.requests == 2).await;
        assert_eq!(s.accepted, 2, "{s:?}");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed() {
        let (addr, mut seen) = origin(false).await;
        let pool = pool(addr, Duration::from_millis(200), false);
        assert_eq!(exchange(&pool, true).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        // No request comes to find it: the reaper closes it.
        seen_until(&mut seen, |s| s.closed == 1).await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(exchange(&pool, true).await, "ok");
        assert_eq!(seen_until(&mut seen, |s| s.requests == 2).await.accepted, 2);
    }

    /// An HTTP/2 origin in clear text answering `h2` to every request; with `close_after_one`,
    /// it closes each connection (GOAWAY, then the close) once it has answered a request.
    async fn h2c_origin(close_after_one: bool) -> (SocketAddr, watch::Receiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = watch::channel(Seen::default());
        let tx = Arc::new(tx);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tx.send_modify(|s| s.accepted += 1);
                let counter = tx.clone();
                let service = hyper::service::service_fn(move |_req| {
                    counter.send_modify(|s| s.requests += 1);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"h2"),
                        )))
                    }
                });
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    let mut answered = tx.subscribe();
                    let before = answered.borrow().requests;
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = answered.wait_for(|s| close_after_one && s.requests > before) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                    tx.send_modify(|s| s.closed += 1);
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, mut seen) = h2c_origin(false).await;
        let pool = pool(addr, WAIT, true);
        let bodies = burst(&pool, 8).await;
        assert!(bodies.iter().all(|b| b == "h2"), "{bodies:?}");
        let s = seen_until(&mut seen, |s| s.requests == 8).await;
        assert_eq!(s.accepted, 1, "{s:?}");
    }

    /// An HTTP/2 origin that closes each connection after answering one request (a deploy
    /// draining it, say): the next request goes out on a new connection and is answered.
    #[tokio::test]
    async fn a_request_after_the_origin_closed_its_http2_connection_goes_out_on_a_new_one() {
        let (addr, mut seen) = h2c_origin(true).await;
        let pool = pool(addr, WAIT, true);
        assert_eq!(exchange(&pool, true).await, "h2");
        seen_until(&mut seen, |s| s.closed == 1).await;
        assert_eq!(exchange(&pool, true).await, "h2");
        let s = seen_until(&mut seen, |s| s.requests == 2).await;
        assert_eq!(s.accepted, 2, "{s:?}");
    }

    /// TLS to `origin.test`, trusting the origin's self-signed certificate.
    fn tls_to(cert_pem: &str) -> TlsOrigination {
        TlsOrigination {
            min_version: None,
            max_version: None,
            allow_renegotiation: false,
            mode: VerificationMode::Secured,
            server_name: Some("origin.test".into()),
            subject_alt_names: vec![],
            ca_cert: Some(Material::inline("test", cert_pem.as_bytes().to_vec())),
            client_cert: None,
        }
    }

    /// A TLS origin for `origin.test` offering `alpn`, serving HTTP/2 or HTTP/1.1 as ALPN
    /// settles. Each response waits until `together` requests have arrived, so requests that
    /// must be in flight side by side prove it. Returns its certificate (PEM).
    async fn tls_origin(
        alpn: &[&[u8]],
        together: usize,
    ) -> (SocketAddr, watch::Receiver<Seen>, String) {
        let key = rcgen::generate_simple_self_signed(vec!["origin.test".to_string()]).unwrap();
        let cert_pem = key.cert.pem();
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![key.cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Seen::default());
        let tx = Arc::new(tx);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tx.send_modify(|s| s.accepted += 1);
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let counted = tx.clone();
                    let service = hyper::service::service_fn(move |_req| {
                        counted.send_modify(|s| s.requests += 1);
                        let mut seen = counted.subscribe();
                        async move {
                            let _ = seen.wait_for(|s| s.requests >= together).await;
                            let body = if h2 { "h2" } else { "h1" };
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(Bytes::from_static(body.as_bytes())),
                            ))
                        }
                    });
                    let io = TokioIo::new(tls);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    };
                    tx.send_modify(|s| s.closed += 1);
                });
            }
        });
        (addr, rx, cert_pem)
    }

    async fn burst(pool: &Arc<Pool<Empty<Bytes>>>, n: usize) -> Vec<Bytes> {
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..n {
            let pool = pool.clone();
            all.spawn(async move { exchange(&pool, true).await });
        }
        let mut bodies = Vec::new();
        while let Some(body) = all.join_next().await {
            bodies.push(body.unwrap());
        }
        bodies
    }

    #[tokio::test]
    async fn a_burst_of_first_requests_shares_the_http2_connection_alpn_chose() {
        let (addr, mut seen, cert) = tls_origin(&[b"h2", b"http/1.1"], 0).await;
        let pool = pool_of(service(addr, false, Some(tls_to(&cert))), WAIT, WAIT);
        let bodies = burst(&pool, 8).await;
        assert!(bodies.iter().all(|b| b == "h2"), "{bodies:?}");
        let s = seen_until(&mut seen, |s| s.requests == 8).await;
        assert_eq!(s.accepted, 1, "{s:?}");
    }

    #[tokio::test]
    async fn a_burst_to_a_tls_origin_that_speaks_http1_opens_connections_side_by_side() {
        // Every response waits for all 8 requests: they must be on 8 connections at once.
        let (addr, mut seen, cert) = tls_origin(&[b"http/1.1"], 8).await;
        let pool = pool_of(service(addr, false, Some(tls_to(&cert))), WAIT, WAIT);
        let bodies = burst(&pool, 8).await;
        assert!(bodies.iter().all(|b| b == "h1"), "{bodies:?}");
        assert_eq!(seen_until(&mut seen, |s| s.requests == 8).await.accepted, 8);
    }

    #[tokio::test]
    async fn requests_waiting_on_a_failing_connection_share_its_failure() {
        // Accepts and never answers the ClientHello: each attempt ends at the handshake
        // deadline. The burst must not make one attempt after another.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut seen) = watch::channel(Seen::default());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                tx.send_modify(|s| s.accepted += 1);
                held.push(stream);
            }
        });
        let unused = rcgen::generate_simple_self_signed(vec!["origin.test".to_string()]).unwrap();
        let mut grpc = service(addr, true, Some(tls_to(&unused.cert.pem())));
        grpc.protocol = Protocol::Grpc;
        let handshake = Duration::from_millis(500);
        let pool = pool_of(grpc, WAIT, handshake);
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let pool = pool.clone();
            all.spawn(async move { pool.send(get()).await.err().map(|e| e.to_string()) });
        }
        while let Some(failed) = all.join_next().await {
            let reason = failed.unwrap().expect("no answer without a handshake");
            assert!(
                reason.contains("handshake") || reason.contains("timed out"),
                "{reason}"
            );
        }
        assert_eq!(seen_until(&mut seen, |s| s.accepted >= 1).await.accepted, 1);
        // A request after the failure tries again.
        assert!(pool.send(get()).await.is_err());
        assert_eq!(seen_until(&mut seen, |s| s.accepted >= 2).await.accepted, 2);
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
        let (addr, mut seen, cert) = tls_origin(&[b"h2"], 0).await;
        let pool = pool_of(
            service(addr, false, Some(tls_to(&cert))),
            Duration::from_millis(200),
            WAIT,
        );
        assert_eq!(exchange(&pool, true).await, "h2");
        seen_until(&mut seen, |s| s.closed == 1).await;
        assert_eq!(exchange(&pool, true).await, "h2");
        assert_eq!(seen_until(&mut seen, |s| s.requests == 2).await.accepted, 2);
    }

    /// An HTTP/2 upstream that stops answering without closing (a NAT or firewall dropped the
    /// flow) is found by the keep-alive ping: the request waiting on it fails once a ping goes
    /// unanswered, not at the response timeout, and the next request opens a new connection.
    #[tokio::test]
    async fn an_http2_upstream_that_stops_answering_is_closed_by_the_ping() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut seen) = watch::channel(Seen::default());
        let origin = tokio::spawn(async move {
            // Held open, never read and never answered.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                tx.send_modify(|s| s.accepted += 1);
                held.push(stream);
            }
        });
        let settings = Settings {
            idle_timeout: WAIT,
            h2_only: true,
            read_buffer: 64 * 1024,
            ping: Ping {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(200),
            },
        };
        let pool = pool_with(service(addr, true, None), WAIT, settings);
        for attempt in 1..=2 {
            let sent = tokio::time::timeout(WAIT, pool.send(get()))
                .await
                .expect("the unanswered ping ends the wait");
            assert!(sent.is_err(), "attempt {attempt}: nothing can answer");
            assert_eq!(
                seen_until(&mut seen, |s| s.accepted >= attempt)
                    .await
                    .accepted,
                attempt
            );
        }
        origin.abort();
    }
}
