//! HTTP outbounds: HTTP/1.1 and h2c from the app, HTTP/1.1 or HTTP/2 to the endpoint over a
//! pooled client, Host rewritten to the external service's name, one access-log line per request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use sluice_api::model::Endpoint;

use crate::access_log::{AccessLog, Entry};
use crate::metrics::{BytesLabels, Metrics, RequestLabels};
use crate::pool::{Lease, Pool, SendError, Sent};
use crate::upstream::{Connector, FailureKind};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// From request sent to response headers received.
    pub response: Duration,
    /// How long an unused upstream connection stays in the pool.
    pub pool_idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            response: Duration::from_secs(60),
            pool_idle: Duration::from_secs(90),
        }
    }
}

/// The pooled client for one external service and how requests to it are rewritten.
pub struct HttpUpstream {
    pool: Arc<Pool<CountedBody>>,
    /// The one the pool opens connections with; tunnels to the service use it too.
    pub connector: Arc<Connector>,
    scheme: Scheme,
    /// What Host and `:authority` become; `None` keeps the app's (unix socket without serverName).
    authority: Option<Authority>,
    timeouts: HttpTimeouts,
    metrics: Arc<ServiceMetrics>,
}

/// Metric handles resolved once per service rather than per request.
struct ServiceMetrics {
    label: String,
    log_label: Arc<str>,
    duration: Histogram,
    bytes_up: Counter,
    bytes_down: Counter,
    /// Request counters by status, found by a short scan instead of hashing a label set.
    by_status: Arc<std::sync::Mutex<Vec<(u16, Counter)>>>,
    all: Arc<Metrics>,
}

impl ServiceMetrics {
    fn count_request(&self, status: u16) {
        let Ok(mut known) = self.by_status.lock() else {
            return;
        };
        if let Some((_, c)) = known.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let counter = self
            .all
            .http_requests
            .get_or_create(&RequestLabels {
                service: self.label.clone(),
                code: status,
            })
            .clone();
        counter.inc();
        known.push((status, counter));
    }
}

impl HttpUpstream {
    pub fn new(connector: Arc<Connector>, timeouts: HttpTimeouts, metrics: Arc<Metrics>) -> Self {
        let service = &connector.service;
        let tls = service.tls.is_some();
        let settings = crate::pool::Settings {
            idle_timeout: timeouts.pool_idle,
            h2_only: service.protocol.requires_h2(),
            // hyper's default lets a response's read buffer grow to about 400 KiB on every
            // pooled connection; 64 KiB reads keep large bodies as fast.
            read_buffer: UPSTREAM_READ_BUFFER,
            ping: crate::h2_upstream::Ping::default(),
        };
        let authority = rewritten_authority(service, tls);
        let label = connector.label.clone();
        let duration = metrics
            .http_request_duration
            .get_or_create(&Metrics::service(&label))
            .clone();
        let bytes = |direction| {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    service: label.clone(),
                    direction,
                })
                .clone()
        };
        let (bytes_up, bytes_down) = (bytes("upstream"), bytes("downstream"));
        let metrics = Arc::new(ServiceMetrics {
            log_label: connector.log_label.clone(),
            by_status: Arc::default(),
            duration,
            bytes_up,
            bytes_down,
            label,
            all: metrics,
        });
        Self {
            pool: Arc::new(Pool::new(connector.clone(), settings)),
            connector,
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
            authority,
            timeouts,
            metrics,
        }
    }
}

/// The most an HTTP/1.1 upstream connection buffers of a response before the app reads it.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// `serverName` when set, else the first endpoint's host; the port is shown unless it is the
/// scheme's default. A service the app calls by one of its `hosts` keeps the app's Host, as
/// Istio and Gloo do.
fn rewritten_authority(
    service: &sluice_api::model::ExternalService,
    tls: bool,
) -> Option<Authority> {
    if !service.hosts.is_empty() || !service.addresses.is_empty() {
        return None;
    }
    let server_name = service.tls.as_ref().and_then(|t| t.server_name.clone());
    let first = service.endpoints.first()?;
    let (host, port) = match first {
        Endpoint::Ip { ip, port } => (
            server_name.unwrap_or_else(|| match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            }),
            Some(*port),
        ),
        Endpoint::Dns { host, port } => (server_name.unwrap_or_else(|| host.clone()), Some(*port)),
        Endpoint::Unix { .. } => (server_name?, None),
    };
    let default_port = if tls { 443 } else { 80 };
    let text = match port {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host,
    };
    text.parse().ok()
}

/// Per-connection facts every request on it shares.
pub struct RequestContext {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub upstream: Arc<HttpUpstream>,
    pub access_log: AccessLog,
    /// Reached through a VIP: the Host must be one of the names resolving to it (or the VIP
    /// itself), so a request cannot name one service and ride another's address.
    pub hosts: Option<Arc<[String]>>,
}

pub async fn handle(
    req: Request<Incoming>,
    ctx: Arc<RequestContext>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let up = &ctx.upstream;
    // Borrowed from the request: only the log line and a refusal keep a copy.
    let app_authority = req.uri().authority().map(Authority::as_str).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let method = req.method().clone();
    let protocol = match req.version() {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let bytes_in = Arc::new(AtomicU64::new(0));
    // Only the access-log line carries these copies.
    let logged = ctx.access_log.is_on();
    // Logged however the exchange ends, including when the app goes away before any response.
    let mut log = LogOnDrop(Some(Box::new(Pending {
        entry: Entry {
            method: Some(method),
            authority: app_authority.filter(|_| logged).map(str::to_string),
            path: logged.then(|| path.as_str().to_string()),
            protocol: Some(protocol),
            ..Entry::new(
                "http",
                ctx.listener.clone(),
                ctx.peer,
                up.metrics.log_label.clone(),
            )
        },
        started,
        bytes_in: bytes_in.clone(),
        metrics: up.metrics.clone(),
        access_log: ctx.access_log.clone(),
        lease: None,
    })));

    if let Some(hosts) = &ctx.hosts {
        let host = app_authority
            .map(host_of)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !hosts.contains(&host) {
            let msg = format!(
                "Host {:?} is not a name of the address this request was sent to ({}); call the service by one of those names",
                app_authority.unwrap_or(""),
                hosts.join(", ")
            );
            return Ok(log.respond_error(StatusCode::MISDIRECTED_REQUEST, msg));
        }
    }
    let target = up
        .authority
        .clone()
        .or_else(|| app_authority.and_then(|a| a.parse().ok()));
    let Some(authority) = target else {
        let msg = "request has no Host header".to_string();
        return Ok(log.respond_error(StatusCode::BAD_REQUEST, msg));
    };
    let outbound = match rewrite_request(req, up, authority, path, bytes_in) {
        Ok(r) => r,
        Err(msg) => return Ok(log.respond_error(StatusCode::BAD_REQUEST, msg)),
    };
    let sent = tokio::time::timeout(up.timeouts.response, up.pool.send(outbound)).await;
    let Sent {
        response,
        info,
        lease,
    } = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => {
            let (status, msg) = classify(&e);
            return Ok(log.respond_error(status, msg));
        }
        Err(_) => {
            let msg = format!(
                "no response from {} within {:?}",
                up.metrics.label, up.timeouts.response
            );
            return Ok(log.respond_error(StatusCode::GATEWAY_TIMEOUT, msg));
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let Some(mut pending) = log.0.take() else {
        return Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ));
    };
    pending.entry.status = Some(parts.status.as_u16());
    pending.entry.upstream = Some(info.address);
    pending.entry.tls_version = info.tls_version;
    pending.lease = lease;
    let body = LogBody::new(body, pending);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The host of an authority, without port or IPv6 brackets or a trailing dot.
fn host_of(authority: &str) -> &str {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn rewrite_request(
    req: Request<Incoming>,
    up: &HttpUpstream,
    authority: Authority,
    path: PathAndQuery,
    bytes_in: Arc<AtomicU64>,
) -> Result<Request<CountedBody>, String> {
    let (mut parts, body) = req.into_parts();
    let mut target = http::uri::Parts::default();
    target.scheme = Some(up.scheme.clone());
    target.authority = Some(authority);
    target.path_and_query = Some(path);
    parts.uri =
        Uri::from_parts(target).map_err(|e| format!("request target cannot be forwarded: {e}"))?;
    strip_hop_by_hop(&mut parts.headers);
    // The authority travels in the URI only: the client writes it as Host on HTTP/1.1 and as
    // `:authority` on HTTP/2, where a Host beside it is a duplicate some servers refuse (nginx
    // answers 400).
    parts.headers.remove(header::HOST);
    parts.version = Version::HTTP_11;
    let body = CountedBody {
        inner: body,
        counter: bytes_in,
        metric: up.metrics.bytes_up.clone(),
    };
    Ok(Request::from_parts(parts, body))
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1). `te: trailers` stays:
/// gRPC needs it end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass comparing names finds which are present; only those are removed (a hashed
    // lookup each). Most messages carry none, and most of the rest only `Connection`.
    let mut found = 0u8;
    for name in headers.keys() {
        found |= hop_bit(name);
    }
    if found == 0 {
        return;
    }
    if found & HOP_CONNECTION != 0 {
        // Read in place, as bytes (`entry` would first make room for an insert, growing a full
        // map), and only the tokens that name a header kept: the usual `close` or `keep-alive`
        // costs nothing to hold.
        let mut named = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
        {
            // `close` and `keep-alive` name no header to drop beyond those handled below; `te`
            // is handled below.
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"te")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                named.push(name);
            }
        }
        headers.remove(header::CONNECTION);
        for name in named {
            headers.remove(name);
        }
    }
    for (bit, name) in [
        (HOP_KEEP_ALIVE, "keep-alive"),
        (HOP_PROXY_CONNECTION, "proxy-connection"),
        (HOP_TRANSFER_ENCODING, "transfer-encoding"),
        (HOP_UPGRADE, "upgrade"),
        (HOP_PROXY_AUTHORIZATION, "proxy-authorization"),
    ] {
        if found & bit != 0 {
            headers.remove(name);
        }
    }
    if found & HOP_TE != 0 {
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_KEEP_ALIVE: u8 = 1 << 1;
const HOP_PROXY_CONNECTION: u8 = 1 << 2;
const HOP_TRANSFER_ENCODING: u8 = 1 << 3;
const HOP_UPGRADE: u8 = 1 << 4;
const HOP_PROXY_AUTHORIZATION: u8 = 1 << 5;
const HOP_TE: u8 = 1 << 6;

fn hop_bit(name: &HeaderName) -> u8 {
    // Standard names compare as an enum tag; the two non-standard ones by length first.
    if name == header::CONNECTION {
        HOP_CONNECTION
    } else if name == header::TE {
        HOP_TE
    } else if name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        HOP_UPGRADE
    } else if name == header::PROXY_AUTHORIZATION {
        HOP_PROXY_AUTHORIZATION
    } else {
        match name.as_str() {
            "keep-alive" => HOP_KEEP_ALIVE,
            "proxy-connection" => HOP_PROXY_CONNECTION,
            _ => 0,
        }
    }
}

/// What the app sees when no upstream connection could be made.
pub fn status_for(kind: FailureKind) -> StatusCode {
    match kind {
        FailureKind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
        FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::Tls => StatusCode::BAD_GATEWAY,
    }
}

/// Maps a client error to the status the app sees and a one-line reason.
fn classify(e: &SendError) -> (StatusCode, String) {
    let e: &dyn std::error::Error = match e {
        SendError::Connect(c) => return (status_for(c.kind), c.message.clone()),
        SendError::Http(e) => e,
        SendError::Http2(e) => e,
    };
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        detail.push_str(": ");
        detail.push_str(&err.to_string());
        source = err.source();
    }
    (
        StatusCode::BAD_GATEWAY,
        format!("upstream failed before a full response: {detail}"),
    )
}

/// The access-log line of one request, written when its response ends.
struct Pending {
    entry: Entry,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    metrics: Arc<ServiceMetrics>,
    access_log: AccessLog,
    /// The upstream connection, returned to its pool when the response has fully arrived.
    lease: Option<Lease<CountedBody>>,
}

impl Pending {
    fn respond_error(
        mut self: Box<Self>,
        status: StatusCode,
        message: String,
    ) -> Response<ProxyBody> {
        tracing::debug!(service = %self.metrics.label, %status, %message, "request failed");
        self.entry.status = Some(status.as_u16());
        self.entry.error = Some(message.clone());
        let body = Bytes::from(format!("sluice: {message}\n"));
        let len = body.len();
        let mut response = Response::new(
            LogBody::new(
                Full::new(body).map_err(|never: Infallible| -> BoxError { match never {} }),
                self,
            )
            .boxed(),
        );
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        response
    }

    fn finish(mut self, error: Option<String>) {
        let elapsed = self.started.elapsed();
        if let (Some(lease), None) = (self.lease.take(), &error) {
            lease.release();
        }
        self.entry.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.entry.duration = elapsed;
        if self.entry.error.is_none() {
            self.entry.error = error;
        }
        let m = &self.metrics;
        m.duration.observe(elapsed.as_secs_f64());
        m.count_request(self.entry.status.unwrap_or(0));
        self.access_log.log(self.entry);
    }
}

/// Boxed: the line's state is a few hundred bytes, moved several times on its way from the
/// request to the response body.
struct LogOnDrop(Option<Box<Pending>>);

impl LogOnDrop {
    fn respond_error(&mut self, status: StatusCode, message: String) -> Response<ProxyBody> {
        match self.0.take() {
            Some(p) => p.respond_error(status, message),
            None => {
                let mut r = Response::new(
                    Full::new(Bytes::from(message))
                        .map_err(|never: Infallible| -> BoxError { match never {} })
                        .boxed(),
                );
                *r.status_mut() = status;
                r
            }
        }
    }
}

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let when = if p.entry.status.is_some() {
                "before the response ended"
            } else {
                "before the response started"
            };
            p.finish(Some(format!("downstream closed {when}")));
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts response bytes and logs the request when the body ends.
    struct LogBody<B> {
        #[pin]
        inner: B,
        log: LogOnDrop,
    }
}

impl<B: Body> LogBody<B> {
    fn new(inner: B, pending: Box<Pending>) -> Self {
        // An empty body (204, HEAD) may never be polled at all.
        let log = if inner.is_end_stream() {
            pending.finish(None);
            LogOnDrop(None)
        } else {
            LogOnDrop(Some(pending))
        };
        Self { inner, log }
    }
}

impl<B> Body for LogBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(p)) = (frame.data_ref(), &mut this.log.0) {
                    p.entry.bytes_out += data.len() as u64;
                    p.metrics.bytes_down.inc_by(data.len() as u64);
                }
                // A sized body may never be polled to its end: it is done when this says so.
                if this.inner.is_end_stream() {
                    if let Some(p) = this.log.0.take() {
                        p.finish(None);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.log.0.take() {
                    p.finish(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(p) = this.log.0.take() {
                    p.finish(Some(format!("upstream body failed: {e}")));
                }
            }
            Poll::Pending => {}
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The app's request body on its way upstream, counted.
    pub struct CountedBody {
        #[pin]
        inner: Incoming,
        counter: Arc<AtomicU64>,
        metric: Counter,
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                this.metric.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::model::{
        ExternalService, Protocol, ResourceKey, TlsOrigination, VerificationMode,
    };

    fn service(endpoints: Vec<Endpoint>, server_name: Option<&str>, tls: bool) -> ExternalService {
        ExternalService {
            key: ResourceKey {
                mesh: "default".into(),
                name: "s".into(),
            },
            port: 80,
            protocol: Protocol::Http,
            endpoints,
            tls: tls.then(|| TlsOrigination {
                min_version: None,
                max_version: None,
                allow_renegotiation: false,
                mode: VerificationMode::Secured,
                server_name: server_name.map(str::to_string),
                subject_alt_names: vec![],
                ca_cert: None,
                client_cert: None,
            }),
            hosts: vec![],
            addresses: vec![],
            load_balancer: Default::default(),
            endpoint_weights: Vec::new(),
        }
    }

    #[test]
    fn authority_rewrite() {
        let dns = |h: &str, p| Endpoint::Dns {
            host: h.into(),
            port: p,
        };
        let ip = |s: &str, p| Endpoint::Ip {
            ip: s.parse().unwrap(),
            port: p,
        };
        let unix = Endpoint::Unix {
            path: "/s.sock".into(),
        };
        let cases: Vec<(ExternalService, Option<&str>)> = vec![
            (
                service(vec![dns("httpbin.org", 443)], None, true),
                Some("httpbin.org"),
            ),
            (
                service(vec![dns("httpbin.org", 80)], None, false),
                Some("httpbin.org"),
            ),
            (
                service(vec![dns("httpbin.org", 443)], None, false),
                Some("httpbin.org:443"),
            ),
            (
                service(vec![dns("a.example.com", 8443)], None, true),
                Some("a.example.com:8443"),
            ),
            (
                service(
                    vec![ip("203.0.113.10", 443), dns("b.example.com", 443)],
                    Some("api.example.com"),
                    true,
                ),
                Some("api.example.com"),
            ),
            (
                service(vec![ip("::1", 8080)], None, false),
                Some("[::1]:8080"),
            ),
            (service(vec![unix.clone()], None, false), None),
            (
                service(vec![unix], Some("local.example"), true),
                Some("local.example"),
            ),
        ];
        for (s, want) in cases {
            let tls = s.tls.is_some();
            assert_eq!(
                rewritten_authority(&s, tls)
                    .map(|a| a.to_string())
                    .as_deref(),
                want,
                "{:?}",
                s.endpoints
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn connection_tokens_name_headers_to_remove_in_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Hop , ,TE"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);

        let mut only_keep_alive = HeaderMap::new();
        only_keep_alive.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        only_keep_alive.insert(header::SERVER, HeaderValue::from_static("nginx"));
        strip_hop_by_hop(&mut only_keep_alive);
        assert_eq!(only_keep_alive.len(), 1);
        assert!(only_keep_alive.contains_key(header::SERVER));

        // A lone `close` or `keep-alive` names nothing; any other token names a header. The
        // `Keep-Alive` header goes whatever the value says.
        for (value, x_hop_kept) in [
            ("close", true),
            (" Close ", true),
            ("KEEP-ALIVE", true),
            ("closed", true),
            ("close, x-hop", false),
            ("x-hop", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(value));
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(header::SERVER, HeaderValue::from_static("origin"));
            strip_hop_by_hop(&mut h);
            let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            names.sort();
            let want = if x_hop_kept {
                vec!["server", "x-hop"]
            } else {
                vec!["server"]
            };
            assert_eq!(names, want, "Connection: {value:?}");
        }
    }
}
