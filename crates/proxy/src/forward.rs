//! The forward proxy (`HTTP_PROXY`/`HTTPS_PROXY`): `CONNECT host:port` tunnels whose TLS
//! ClientHello must name the host that was checked, and absolute-form HTTP requests, each one
//! checked against the outbound traffic policy. A name is resolved once and the proxy dials the
//! address it checked.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, Entry};
use crate::hello::{fold, read_client_hello, Hello, HelloError};
use crate::http::{BoxError, ProxyBody, RequestContext};
use crate::metrics::Metrics;
use crate::policy::{self, Decision, Denied, Host, Mode, Opening, Table};
use sluice_api::model::Protocol;

/// What the forward proxy enforces, swapped whole when the config or the mode changes.
pub struct State {
    pub mode: Mode,
    pub table: Table,
    /// Every service's upstream, by service label, built when first needed: HTTP services'
    /// pools, and the connectors tunnels to a service called by its name go through.
    pub services: std::collections::HashMap<Arc<str>, Arc<crate::upstreams::Lazy>>,
}

/// Shared by every forward-proxy connection.
pub struct Shared {
    pub state: tokio::sync::watch::Receiver<Arc<State>>,
    pub resolver: Arc<TokioResolver>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub connect_timeout: Duration,
    pub hello_timeout: Duration,
    /// A tunnel with nothing moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// From request sent to response headers, on the plain HTTP path.
    pub response_timeout: Duration,
    pub listener: Arc<str>,
    /// Tunnels outlive the connection that opened them: they drain with the forward proxy
    /// and are closed at its drain deadline.
    pub tunnels: tokio_util::task::TaskTracker,
    pub kill: CancellationToken,
}

/// The connection's place under `--max-connections`; a tunnel keeps it until it ends.
pub type Slot = Arc<tokio::sync::OwnedSemaphorePermit>;

pub async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Slot,
) -> Result<Response<ProxyBody>, Infallible> {
    let state = shared.state.borrow().clone();
    let response = if req.method() == Method::CONNECT {
        connect(req, peer, &shared, &state, slot).await
    } else {
        absolute(req, peer, &shared, &state).await
    };
    Ok(response.unwrap_or_else(|refusal| refusal.respond(&shared, peer)))
}

/// The proxy's own answer: the status and a one-line `sluice: ...` body.
fn answer(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut r = Response::new(full(format!("sluice: {message}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A request the proxy answers itself, logged and counted.
struct Refusal {
    status: StatusCode,
    message: String,
    reason: &'static str,
    method: Method,
    target: String,
}

impl Refusal {
    fn bad(req: &Request<Incoming>, message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            reason: "bad_request",
            method: req.method().clone(),
            target: req.uri().to_string(),
        }
    }

    fn denied(req: &Request<Incoming>, denied: &Denied) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!("blocked by the outbound traffic policy: {denied}"),
            reason: denied.reason(),
            method: req.method().clone(),
            target: req.uri().to_string(),
        }
    }

    fn upstream(req: &Request<Incoming>, status: StatusCode, message: String) -> Self {
        Refusal {
            status,
            message,
            reason: "upstream_failed",
            method: req.method().clone(),
            target: req.uri().to_string(),
        }
    }

    fn respond(self, shared: &Shared, peer: SocketAddr) -> Response<ProxyBody> {
        if self.status == StatusCode::FORBIDDEN {
            count(shared, "denied", self.reason);
        }
        tracing::info!(%peer, target = %self.target, status = %self.status, reason = %self.message, "forward proxy refused a request");
        let mut entry = Entry::new("forward", shared.listener.clone(), peer, Arc::from("-"));
        entry.method = Some(self.method);
        entry.authority = Some(self.target);
        entry.status = Some(self.status.as_u16());
        entry.error = Some(self.message.clone());
        shared.access_log.log(entry);
        let mut r = answer(self.status, &self.message);
        if self.status == StatusCode::BAD_REQUEST {
            // The framing of what follows cannot be trusted.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .boxed()
}

fn count_passthrough(shared: &Shared, host: &Host, port: u16) {
    shared.metrics.count_passthrough(host.to_string(), port);
}

fn count(shared: &Shared, decision: &'static str, reason: &'static str) {
    shared.metrics.count_decision(decision, reason);
}

/// Refuses request framing that two parsers could read differently (request smuggling).
fn check_framing(req: &Request<Incoming>) -> Result<(), String> {
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err("both Transfer-Encoding and Content-Length are set".into());
    }
    if h.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Err("Content-Length is given more than once".into());
    }
    Ok(())
}

/// Host and port of a request target, with userinfo refused.
fn target_of(uri: &Uri, default_port: Option<u16>) -> Result<(Host, u16), String> {
    let authority = uri
        .authority()
        .ok_or_else(|| "the request target has no host".to_string())?;
    if authority.as_str().contains('@') {
        return Err("userinfo in the request target is refused".into());
    }
    let host = policy::parse_host(authority.host())?;
    // `http::uri::Authority` reads a port it cannot parse as no port at all.
    let text = authority.as_str();
    let after_host = text.rfind(']').map_or(text, |b| &text[b..]);
    if after_host.contains(':') && authority.port_u16().is_none_or(|p| p == 0) {
        return Err(format!(
            "{authority}: the port is not a number from 1 to 65535"
        ));
    }
    let port = authority
        .port_u16()
        .or(default_port)
        .ok_or_else(|| "the request target has no port".to_string())?;
    Ok((host, port))
}

/// Resolves once and returns the first address the policy lets bytes go to.
async fn checked_address(
    shared: &Shared,
    state: &State,
    host: &Host,
    port: u16,
) -> Result<SocketAddr, Result<Denied, String>> {
    if let Some(pinned) = match host {
        Host::Name(name) => crate::pins::pinned(name, port),
        Host::Ip(_) => None,
    } {
        return Ok(pinned);
    }
    let ips: Vec<IpAddr> = match host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            let lookup = tokio::time::timeout(
                shared.connect_timeout,
                shared.resolver.lookup_ip(format!("{name}.")),
            )
            .await;
            match lookup {
                Ok(Ok(l)) => l.iter().collect(),
                Ok(Err(e)) => return Err(Err(format!("{name}: name not resolved: {e}"))),
                Err(_) => return Err(Err(format!("{name}: name resolution timed out"))),
            }
        }
    };
    let mut first_denial = None;
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        let checked = state.table.check_address(addr).and_then(|()| {
            // Bound to every address: any address of this host on that port is the proxy. An
            // address is this host's when a socket can be bound to it.
            if state.table.listens_everywhere_on(port)
                && (ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
            {
                Err(Denied::Proxy { addr })
            } else {
                Ok(())
            }
        });
        match checked {
            Ok(()) => return Ok(addr),
            Err(d) => {
                first_denial.get_or_insert(d);
            }
        }
    }
    Err(first_denial
        .map(Ok)
        .unwrap_or_else(|| Err(format!("{host}: no address"))))
}

async fn dial(shared: &Shared, addr: SocketAddr) -> Result<TcpStream, (StatusCode, String)> {
    match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("{addr}: {e}"))),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{addr}: connect timed out after {:?}",
                shared.connect_timeout
            ),
        )),
    }
}

/// The address `host:port` resolves to that the policy lets bytes go to.
async fn checked(
    shared: &Shared,
    state: &State,
    host: &Host,
    port: u16,
    req: &Request<Incoming>,
) -> Result<SocketAddr, Refusal> {
    match checked_address(shared, state, host, port).await {
        Ok(a) => Ok(a),
        Err(Ok(denied)) => Err(Refusal::denied(req, &denied)),
        Err(Err(msg)) => Err(Refusal::upstream(req, StatusCode::BAD_GATEWAY, msg)),
    }
}

/// A connection upstream and its address as logged.
type Stream = (Box<dyn crate::upstream::Io>, Arc<str>);

/// A connection to an address that was checked.
async fn dial_checked(
    shared: &Shared,
    addr: SocketAddr,
    req: &Request<Incoming>,
) -> Result<Stream, Refusal> {
    let stream = dial(shared, addr)
        .await
        .map_err(|(s, m)| Refusal::upstream(req, s, m))?;
    Ok((Box::new(stream), Arc::from(addr.to_string())))
}

/// A connection to one of `service`'s endpoints, picked by its load balancer.
async fn to_endpoints_of(
    state: &State,
    service: &Arc<str>,
    req: &Request<Incoming>,
) -> Result<Stream, Refusal> {
    let Some(connector) = state.services.get(service).and_then(|s| s.connector()) else {
        return Err(Refusal::upstream(
            req,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("external service {service} is not ready"),
        ));
    };
    match connector.connect().await {
        Ok(u) => Ok((u.io, u.info.address)),
        Err(e) => Err(Refusal::upstream(
            req,
            crate::http::status_for(e.kind),
            e.message,
        )),
    }
}

async fn connect(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    state: &State,
    slot: Slot,
) -> Result<Response<ProxyBody>, Refusal> {
    let (host, port) = target_of(req.uri(), None).map_err(|e| Refusal::bad(&req, e))?;
    let decision = policy::decide(state.mode, &state.table, &host, port);
    // Whether the app may send other than a TLS ClientHello, and whether the tunnel goes to
    // the service's endpoints rather than to the host the app named.
    let (service, raw_tcp, to_endpoints) = match &decision {
        Decision::Deny(d) => return Err(Refusal::denied(&req, d)),
        Decision::Registered(Opening::Endpoint {
            service, raw_tcp, ..
        }) => (service.clone(), *raw_tcp, false),
        // That port is opened for plain HTTP that the proxy sends on as HTTPS; a tunnel there
        // would reach a port of the host that no service opens.
        Decision::Registered(Opening::Originate { service }) => {
            return Err(Refusal::denied(
                &req,
                &Denied::BadTarget(format!(
                    "{host}:{port} is the plain-HTTP port of external service {service}, which originates TLS itself: send http:// requests there, or CONNECT to one of its endpoints"
                )),
            ))
        }
        // An HTTP port takes requests the proxy reads (absolute form), whose Host it checks; a
        // tunnel would carry requests it cannot see.
        Decision::Registered(Opening::Service {
            service,
            protocol: Protocol::Http | Protocol::Http2 | Protocol::Grpc,
            ..
        }) => {
            return Err(Refusal::denied(
                &req,
                &Denied::BadTarget(format!(
                    "{host}:{port} is an HTTP port of external service {service}: send http:// requests there through the proxy, not CONNECT"
                )),
            ))
        }
        Decision::Registered(Opening::Service {
            service,
            protocol,
            endpoints,
            ..
        }) => (service.clone(), *protocol == Protocol::Tcp, *endpoints),
        Decision::Passthrough => (Arc::from("passthrough"), true, false),
    };
    let (upstream, upstream_address) = if to_endpoints {
        to_endpoints_of(state, &service, &req).await?
    } else {
        let addr = checked(shared, state, &host, port, &req).await?;
        dial_checked(shared, addr, &req).await?
    };
    let passthrough = matches!(decision, Decision::Passthrough);
    let shared = shared.clone();
    let authority = format!("{host}:{port}");
    let tunnels = shared.tunnels.clone();
    tunnels.spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let mut entry = Entry::new("tunnel", shared.listener.clone(), peer, service);
        entry.method = Some(Method::CONNECT);
        entry.authority = Some(authority);
        entry.upstream = Some(upstream_address);
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => Some(u),
            Err(e) => {
                entry.error = Some(format!("upgrade failed: {e}"));
                None
            }
        };
        if let Some(upgraded) = upgraded {
            let checked =
                tokio::time::timeout(shared.hello_timeout, check_hello(upgraded, &host, raw_tcp))
                    .await
                    .unwrap_or_else(|_| {
                        Err(TunnelError::refused(
                            "hello_timeout",
                            "no TLS ClientHello within the deadline",
                        ))
                    });
            match checked {
                Ok((mut app, first, sni)) => {
                    // Counted once the tunnel is known to carry what was checked.
                    if passthrough {
                        count_passthrough(&shared, &host, port);
                    }
                    count(
                        &shared,
                        if passthrough {
                            "passthrough"
                        } else {
                            "allowed"
                        },
                        "tunnel",
                    );
                    entry.path = sni.map(|s| format!("sni:{s}"));
                    let mut upstream = upstream;
                    match upstream.write_all(&first).await {
                        Ok(()) => {
                            let relayed = crate::tcp::relay(
                                &mut *app,
                                &mut *upstream,
                                shared.idle_timeout,
                                &shared.kill,
                            )
                            .await;
                            shared.metrics.count_relay(relayed.pooled);
                            entry.bytes_in = relayed.up + first.len() as u64;
                            entry.bytes_out = relayed.down;
                            entry.error = relayed.ended;
                        }
                        Err(e) => entry.error = Some(format!("upstream write failed: {e}")),
                    }
                }
                Err(e) => {
                    tracing::info!(%peer, host = %host, error = %e.message, "tunnel closed");
                    if let Some(reason) = e.refusal {
                        count(&shared, "denied", reason);
                    }
                    entry.error = Some(e.message);
                }
            }
        }
        entry.duration = started.elapsed();
        shared.access_log.log(entry);
    });
    let mut ok = Response::new(full(Bytes::new()));
    *ok.status_mut() = StatusCode::OK;
    Ok(ok)
}

/// Why a tunnel closed before carrying anything.
#[derive(Debug)]
struct TunnelError {
    /// The metric reason when the proxy refused what the app sent; `None` when the app went
    /// away.
    refusal: Option<&'static str>,
    message: String,
}

impl TunnelError {
    fn refused(reason: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            refusal: Some(reason),
            message: format!("refused: {message}"),
        }
    }
}

impl From<HelloError> for TunnelError {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::Refused(reason, message) => TunnelError::refused(reason, message),
            HelloError::Ended(message) => TunnelError {
                refusal: None,
                message,
            },
        }
    }
}

/// Reads the app's first bytes: a TLS ClientHello must name `host`. Returns the app's
/// connection, the bytes read (to send on first) and the name the hello carried.
async fn check_hello(
    upgraded: hyper::upgrade::Upgraded,
    host: &Host,
    raw_allowed: bool,
) -> Result<(Box<dyn crate::upstream::Io>, Vec<u8>, Option<String>), TunnelError> {
    // The app's own socket when hyper hands it back, so the relay moves bytes between two
    // sockets without hyper's upgrade layer in between; bytes hyper already read come first.
    let (mut app, mut buf): (Box<dyn crate::upstream::Io>, Vec<u8>) =
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Box::new(parts.io.into_inner()), parts.read_buf.to_vec()),
            Err(upgraded) => (Box::new(TokioIo::new(upgraded)), Vec::new()),
        };
    let hello = read_client_hello(&mut app, &mut buf).await?;
    let mismatch = |s: &str| {
        TunnelError::refused(
            "sni_mismatch",
            format!("the ClientHello names {s} but the tunnel was opened to {host}"),
        )
    };
    let sni = match (hello, host) {
        (Hello::Hidden, _) => {
            return Err(TunnelError::refused(
                "ech",
                "the ClientHello is encrypted (ECH), so its server name cannot be checked",
            ))
        }
        (Hello::NotTls, _) if raw_allowed => None,
        (Hello::NotTls, _) => {
            return Err(TunnelError::refused(
                "not_tls",
                "the app sent non-TLS bytes to a TLS destination",
            ))
        }
        (Hello::Tls(None), Host::Ip(_)) => None,
        (Hello::Tls(None), Host::Name(n)) => {
            return Err(TunnelError::refused(
                "sni_mismatch",
                format!("the ClientHello has no SNI; it must be {n}"),
            ))
        }
        (Hello::Tls(Some(s)), Host::Name(n)) if fold(&s) == *n => Some(s),
        (Hello::Tls(Some(s)), _) => return Err(mismatch(&s)),
    };
    Ok((app, buf, sni))
}

async fn absolute(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    state: &State,
) -> Result<Response<ProxyBody>, Refusal> {
    check_framing(&req).map_err(|e| Refusal::bad(&req, e))?;
    match req.uri().scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(Refusal::bad(
                &req,
                format!("{other}:// targets go through CONNECT; this proxy forwards http:// requests"),
            ))
        }
        None => {
            return Err(Refusal::bad(
                &req,
                "this is a forward proxy: send absolute-form requests (GET http://host/path) or CONNECT",
            ))
        }
    }
    let (host, port) = target_of(req.uri(), Some(80)).map_err(|e| Refusal::bad(&req, e))?;
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return Err(Refusal::bad(
            &req,
            "the Host header is given more than once",
        ));
    }
    if let Some(h) = req.headers().get(header::HOST) {
        let agrees = h
            .to_str()
            .ok()
            .and_then(|h| {
                let uri: Uri = format!("http://{h}/").parse().ok()?;
                target_of(&uri, Some(80)).ok()
            })
            .is_some_and(|(h_host, h_port)| h_host == host && h_port == port);
        if !agrees {
            return Err(Refusal::bad(
                &req,
                format!("the Host header does not agree with the request target {host}:{port}"),
            ));
        }
    }
    match policy::decide(state.mode, &state.table, &host, port) {
        Decision::Deny(d) => Err(Refusal::denied(&req, &d)),
        Decision::Registered(Opening::Service {
            service,
            protocol: Protocol::Tls,
            ..
        }) => Err(Refusal::denied(
            &req,
            &Denied::BadTarget(format!(
                "{host}:{port} is a TLS port of external service {service}: the app must speak TLS to it, through CONNECT (an https:// URL)"
            )),
        )),
        // Plain HTTP to a port the registry says speaks TLS is sent as HTTPS, never in clear;
        // an HTTP service called by its name goes to its endpoints through its pool.
        Decision::Registered(
            Opening::Originate { service }
            | Opening::Endpoint {
                service,
                originates: true,
                ..
            }
            | Opening::Service {
                service,
                protocol: Protocol::Http | Protocol::Http2 | Protocol::Grpc,
                endpoints: true,
                ..
            },
        ) => {
            let Some(upstream) = state.services.get(&service).and_then(|s| s.http()) else {
                return Err(Refusal::upstream(
                    &req,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("external service {service} is not ready"),
                ));
            };
            count(shared, "allowed", "originate");
            let ctx = Arc::new(RequestContext {
                listener: shared.listener.clone(),
                peer,
                upstream,
                access_log: shared.access_log.clone(),
                hosts: None,
            });
            Ok(crate::http::handle(req, ctx)
                .await
                .unwrap_or_else(|n| match n {}))
        }
        decision => {
            let (service, label): (Arc<str>, &'static str) = match &decision {
                Decision::Registered(o) => (o.service().clone(), "allowed"),
                _ => (Arc::from("passthrough"), "passthrough"),
            };
            // A TCP service with endpoints carries the request to them; anything else goes to
            // the host the app named, resolved and checked here.
            let (stream, address) = match &decision {
                Decision::Registered(Opening::Service {
                    endpoints: true, ..
                }) => {
                    count(shared, label, "http");
                    to_endpoints_of(state, &service, &req).await?
                }
                _ => {
                    let addr = checked(shared, state, &host, port, &req).await?;
                    count(shared, label, "http");
                    if matches!(decision, Decision::Passthrough) {
                        count_passthrough(shared, &host, port);
                    }
                    dial_checked(shared, addr, &req).await?
                }
            };
            let started = Instant::now();
            let mut entry = Entry::new("forward", shared.listener.clone(), peer, service);
            entry.method = Some(req.method().clone());
            if shared.access_log.is_on() {
                entry.authority = Some(format!("{host}:{port}"));
                entry.path = req.uri().path_and_query().map(|p| p.to_string());
            }
            entry.upstream = Some(address);
            // Origin-form to the server, as a direct client would send.
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            *req.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
            crate::http::strip_hop_by_hop(req.headers_mut());
            // The server sees the host that was checked, whatever the app wrote.
            let checked = if port == 80 {
                host.to_string()
            } else {
                format!("{host}:{port}")
            };
            if let Ok(v) = HeaderValue::from_str(&checked) {
                req.headers_mut().insert(header::HOST, v);
            }
            let result =
                match tokio::time::timeout(shared.response_timeout, send_once(stream, req)).await {
                    Ok(r) => r.map_err(|e| (StatusCode::BAD_GATEWAY, e)),
                    Err(_) => Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "no response from {host}:{port} within {:?}",
                            shared.response_timeout
                        ),
                    )),
                };
            entry.duration = started.elapsed();
            // One access-log line either way: this one, with the service and upstream.
            match result {
                Ok(mut response) => {
                    entry.status = Some(response.status().as_u16());
                    shared.access_log.log(entry);
                    crate::http::strip_hop_by_hop(response.headers_mut());
                    Ok(response.map(|b| b.map_err(Into::into).boxed()))
                }
                Err((status, e)) => {
                    tracing::info!(%peer, target = %format!("{host}:{port}"), %status, reason = %e, "forward request failed upstream");
                    entry.status = Some(status.as_u16());
                    entry.error = Some(e.clone());
                    shared.access_log.log(entry);
                    Ok(answer(status, &e))
                }
            }
        }
    }
}

/// One request on a fresh connection to the address that was checked.
async fn send_once(
    stream: Box<dyn crate::upstream::Io>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("upstream handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("upstream failed before a full response: {e}"))
}

/// What the first request head of a connection showed.
pub enum FirstHead {
    /// Nothing wrong found: the HTTP parser reads it.
    Fine,
    /// Framing two parsers could read two ways.
    Ambiguous(String),
    /// No complete head within the header read timeout.
    TimedOut,
}

/// Looks at the first request head on a new connection before the HTTP parser does, and finds
/// framing two parsers could read two ways: both `Content-Length` and `Transfer-Encoding`
/// (the parser would keep one silently). Later requests on the connection are left to the
/// parser, which closes the connection after such a request.
pub async fn first_head(stream: &TcpStream, deadline: Duration) -> FirstHead {
    // As much as the parser accepts; a longer head is the parser's to refuse.
    let mut buf = vec![0u8; 64 * 1024];
    match crate::peek::until(stream, &mut buf, deadline, head_end).await {
        Ok(Some(end)) => check_head(&buf[..end]),
        Ok(None) => FirstHead::Fine,
        Err(_) => FirstHead::TimedOut,
    }
}

/// Where a request head ends: after an empty line, with or without carriage returns.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn check_head(head: &[u8]) -> FirstHead {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let fields: Vec<&str> = text
        .split('\n')
        .skip(1)
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    let has = |name: &str| fields.iter().any(|l| l.starts_with(name));
    if has("content-length:") && has("transfer-encoding:") {
        FirstHead::Ambiguous("both Transfer-Encoding and Content-Length are set".into())
    } else {
        FirstHead::Fine
    }
}

/// Answers a request whose framing is ambiguous with 400 and closes the connection, without
/// reading its body.
pub async fn refuse_framing(mut stream: TcpStream, peer: SocketAddr, shared: &Shared, why: String) {
    count(shared, "denied", "ambiguous_framing");
    let mut entry = Entry::new("forward", shared.listener.clone(), peer, Arc::from("-"));
    entry.status = Some(400);
    entry.error = Some(why.clone());
    shared.access_log.log(entry);
    let body = format!("sluice: request refused: {why}\n");
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}
