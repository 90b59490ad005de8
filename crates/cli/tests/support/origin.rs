//! Origins (upstream servers) the proxy forwards to.
//!
//! Each origin listens on `127.0.0.1:0` (or a unix socket in a temp dir),
//! runs in background tokio tasks and records what crossed the wire in a
//! [`Recorder`] the test reads through the [`Origin`] handle (which derefs
//! to it). Dropping the handle stops the origin; [`Origin::shutdown`] does
//! the same and waits until the listener is closed.
//!
//! HTTP routes (every HTTP origin, any protocol):
//! * `POST` with `content-type: application/grpc*`: echoes the request body
//!   with `content-type: application/grpc` and trailers `grpc-status: 0`,
//!   `grpc-message: ok` (counted in [`Recorder::trailers_sent`]).
//! * `/echo`: echoes the request body.
//! * `/headers`: the request headers as a JSON object `{name: value}`
//!   (repeated headers joined with `", "`).
//! * `/status/NNN`: answers with status NNN and an empty body.
//! * `/slow?ms=N[&chunks=K]`: K (default 10) chunks `slow-chunk-<i>\n`, the
//!   first at once, the last about N ms (default 1000) later.
//! * `/big?bytes=N`: N bytes of [`super::big_body`] content.
//! * `/redirect-to-metadata`: 302 to the cloud metadata address.
//! * anything else: `origin:<name>`.
//!
//! Every response carries `x-origin: <name>`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::CertificateDer;
use rustls::ProtocolVersion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::body::{full, Body, FramesBody, PatternBody, SlowBody};
use super::pki::pki;
use super::tls::TlsSettings;
use super::{TempDir, DEFAULT_TIMEOUT};

// ---------------------------------------------------------------------------
// Records

/// One HTTP request as the origin received it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Id of the connection (see [`TlsRecord::conn_id`]); equal ids mean the
    /// requests shared one downstream connection.
    pub conn_id: u64,
    pub method: Method,
    /// The request target as received (origin-form for HTTP/1.1, absolute
    /// for HTTP/2).
    pub uri: Uri,
    pub path: String,
    pub query: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
    /// The URI authority (`:authority` for HTTP/2).
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
}

impl RequestRecord {
    /// A request header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `authority` if present, else `host`: what the client asked for.
    pub fn effective_authority(&self) -> Option<&str> {
        self.authority.as_deref().or(self.host.as_deref())
    }
}

/// One completed TLS handshake.
#[derive(Clone, Debug)]
pub struct TlsRecord {
    pub conn_id: u64,
    /// The SNI the client sent (none when it connected by IP address).
    pub sni: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<String>,
    pub version: Option<ProtocolVersion>,
    /// The client's certificate chain (empty when it presented none).
    pub client_certs: Vec<CertificateDer<'static>>,
}

impl TlsRecord {
    pub fn client_cert_presented(&self) -> bool {
        !self.client_certs.is_empty()
    }

    /// The [`super::CertKey::name`] of the presented client certificate
    /// when it is one of the test PKI's.
    pub fn client_cert_name(&self) -> Option<&'static str> {
        self.client_certs.first().and_then(|c| pki().identify(c))
    }

    /// Common name of the presented client certificate's subject, when it
    /// is one of the test PKI's.
    pub fn client_cert_subject(&self) -> Option<String> {
        let der = self.client_certs.first()?;
        let p = pki();
        [
            &p.client,
            &p.other_client,
            &p.origin,
            &p.other_origin,
            &p.uri_only,
        ]
        .into_iter()
        .find(|ck| ck.cert_der.as_ref() == der.as_ref())
        .map(|ck| ck.common_name.clone())
    }

    pub fn is_tls13(&self) -> bool {
        self.version == Some(ProtocolVersion::TLSv1_3)
    }

    pub fn is_tls12(&self) -> bool {
        self.version == Some(ProtocolVersion::TLSv1_2)
    }
}

/// One finished TCP echo connection.
#[derive(Clone, Debug)]
pub struct EchoRecord {
    pub conn_id: u64,
    /// Bytes echoed back.
    pub bytes: u64,
    /// The client closed its sending side (EOF seen) before the origin closed.
    pub saw_eof: bool,
    /// Read/write error that ended the connection, if any.
    pub error: Option<String>,
}

/// What an origin saw. Read it through the [`Origin`] handle.
#[derive(Debug, Default)]
pub struct Recorder {
    next_conn: AtomicU64,
    accepted: AtomicUsize,
    open: AtomicUsize,
    handshakes: AtomicUsize,
    trailers_sent: Arc<AtomicUsize>,
    handshake_errors: Mutex<Vec<String>>,
    tls: Mutex<Vec<TlsRecord>>,
    requests: Mutex<Vec<RequestRecord>>,
    echoes: Mutex<Vec<EchoRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Recorder {
    /// TCP (or unix) connections accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed successfully.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Errors of failed TLS handshakes, in order.
    pub fn handshake_errors(&self) -> Vec<String> {
        lock(&self.handshake_errors).clone()
    }

    /// Completed TLS handshakes, in order.
    pub fn tls_connections(&self) -> Vec<TlsRecord> {
        lock(&self.tls).clone()
    }

    pub fn last_tls(&self) -> Option<TlsRecord> {
        lock(&self.tls).last().cloned()
    }

    /// HTTP requests received, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.requests).len()
    }

    pub fn last_request(&self) -> Option<RequestRecord> {
        lock(&self.requests).last().cloned()
    }

    /// Number of distinct connections the recorded requests arrived on.
    pub fn request_connections(&self) -> usize {
        let mut ids: Vec<u64> = lock(&self.requests).iter().map(|r| r.conn_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Responses whose trailers were handed to the connection.
    pub fn trailers_sent(&self) -> usize {
        self.trailers_sent.load(Ordering::SeqCst)
    }

    /// Finished TCP echo connections.
    pub fn echoes(&self) -> Vec<EchoRecord> {
        lock(&self.echoes).clone()
    }
}

// ---------------------------------------------------------------------------
// Listener, accept loop and handle

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;
type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type ConnHandler = Arc<dyn Fn(BoxIo, u64) -> ConnFuture + Send + Sync>;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<BoxIo> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Box::new(s))
            }
        }
    }
}

enum Ctl {
    CloseConnections(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Decrements the open-connection count when a connection task ends
/// (normally or by being aborted).
struct OpenGuard(Arc<Recorder>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: Listener,
    rec: Arc<Recorder>,
    handler: ConnHandler,
    mut ctl: mpsc::Receiver<Ctl>,
) {
    let mut conns = JoinSet::new();
    let done = loop {
        tokio::select! {
            msg = ctl.recv() => match msg {
                Some(Ctl::CloseConnections(done)) => {
                    conns.shutdown().await;
                    let _ = done.send(());
                }
                Some(Ctl::Shutdown(done)) => break Some(done),
                None => break None,
            },
            accepted = listener.accept() => match accepted {
                Ok(io) => {
                    rec.accepted.fetch_add(1, Ordering::SeqCst);
                    rec.open.fetch_add(1, Ordering::SeqCst);
                    let conn_id = rec.next_conn.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard(rec.clone());
                    let fut = handler(io, conn_id);
                    conns.spawn(async move {
                        let _guard = guard;
                        fut.await;
                    });
                }
                Err(_) => tokio::task::yield_now().await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    conns.shutdown().await;
    drop(listener);
    if let Some(done) = done {
        let _ = done.send(());
    }
}

/// A running origin. Derefs to its [`Recorder`]. Stopped on drop.
pub struct Origin {
    name: String,
    addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    rec: Arc<Recorder>,
    ctl: mpsc::Sender<Ctl>,
    task: Option<JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("unix_path", &self.unix_path)
            .finish()
    }
}

impl Origin {
    fn spawn(
        name: String,
        listener: Listener,
        handler: ConnHandler,
        rec: Arc<Recorder>,
        dir: Option<TempDir>,
    ) -> Origin {
        let (addr, unix_path) = match &listener {
            Listener::Tcp(l) => (Some(l.local_addr().expect("local addr")), None),
            Listener::Unix(l) => (
                None,
                l.local_addr()
                    .expect("local addr")
                    .as_pathname()
                    .map(Path::to_path_buf),
            ),
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let task = tokio::spawn(accept_loop(listener, rec.clone(), handler, ctl_rx));
        Origin {
            name,
            addr,
            unix_path,
            rec,
            ctl: ctl_tx,
            task: Some(task),
            _dir: dir,
        }
    }

    /// The bound TCP address. Panics for a unix-socket origin.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("not a TCP origin")
    }

    /// The bound TCP port. Panics for a unix-socket origin.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// The socket path. Panics for a TCP origin.
    pub fn unix_path(&self) -> &Path {
        self.unix_path.as_deref().expect("not a unix-socket origin")
    }

    /// Closes every open connection (keeps listening); returns once they are gone.
    pub async fn close_connections(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::CloseConnections(tx)).await.is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, rx).await;
        }
    }

    /// Stops the origin and waits until its listener and connections are closed.
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, rx).await;
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, task).await;
        }
    }
}

impl Deref for Origin {
    type Target = Recorder;

    fn deref(&self) -> &Recorder {
        &self.rec
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn bind_tcp() -> Listener {
    Listener::Tcp(
        TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0"),
    )
}

fn bind_unix(prefix: &str) -> (Listener, TempDir) {
    let dir = TempDir::new(prefix);
    let path = dir.join("origin.sock");
    let listener = UnixListener::bind(&path)
        .unwrap_or_else(|e| panic!("bind unix socket {}: {e}", path.display()));
    (Listener::Unix(listener), dir)
}

/// Runs the TLS handshake and records its outcome.
async fn tls_accept(
    io: BoxIo,
    acceptor: &TlsAcceptor,
    rec: &Recorder,
    conn_id: u64,
) -> Option<(BoxIo, Option<Vec<u8>>)> {
    match tokio::time::timeout(DEFAULT_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let record = TlsRecord {
                conn_id,
                sni: conn.server_name().map(str::to_owned),
                alpn: alpn
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                version: conn.protocol_version(),
                client_certs: conn
                    .peer_certificates()
                    .map(<[CertificateDer<'static>]>::to_vec)
                    .unwrap_or_default(),
            };
            lock(&rec.tls).push(record);
            rec.handshakes.fetch_add(1, Ordering::SeqCst);
            Some((Box::new(tls), alpn))
        }
        Ok(Err(e)) => {
            lock(&rec.handshake_errors).push(e.to_string());
            None
        }
        Err(_) => {
            lock(&rec.handshake_errors).push("handshake timed out".to_owned());
            None
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP origins

/// Which HTTP versions an HTTP origin speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 and HTTP/2 (chosen by ALPN under TLS, by the h2 preface otherwise).
    #[default]
    Auto,
    Http1Only,
    Http2Only,
}

/// Configures and starts an HTTP origin.
#[derive(Clone, Debug)]
pub struct OriginBuilder {
    name: String,
    tls: Option<TlsSettings>,
    protocols: Protocols,
}

impl OriginBuilder {
    /// A plaintext origin answering `origin:<name>` on its default route.
    pub fn new(name: &str) -> Self {
        OriginBuilder {
            name: name.to_owned(),
            tls: None,
            protocols: Protocols::Auto,
        }
    }

    /// Serve TLS with these settings.
    pub fn tls(mut self, settings: TlsSettings) -> Self {
        self.tls = Some(settings);
        self
    }

    pub fn protocols(mut self, protocols: Protocols) -> Self {
        self.protocols = protocols;
        self
    }

    pub fn http1_only(self) -> Self {
        self.protocols(Protocols::Http1Only)
    }

    pub fn http2_only(self) -> Self {
        self.protocols(Protocols::Http2Only)
    }

    /// Starts listening on `127.0.0.1:0`.
    pub async fn start(self) -> Origin {
        let listener = bind_tcp().await;
        self.spawn(listener, None)
    }

    /// Starts listening on a unix socket in a fresh temp dir.
    pub async fn start_unix(self) -> Origin {
        let (listener, dir) = bind_unix("sluice-origin");
        self.spawn(listener, Some(dir))
    }

    fn spawn(self, listener: Listener, dir: Option<TempDir>) -> Origin {
        let rec = Arc::new(Recorder::default());
        let ctx = Arc::new(HttpCtx {
            name: self.name.clone(),
            rec: rec.clone(),
        });
        let acceptor = self.tls.as_ref().map(TlsSettings::acceptor);
        let protocols = self.protocols;
        let handler: ConnHandler = Arc::new(move |io, conn_id| {
            let ctx = ctx.clone();
            let acceptor = acceptor.clone();
            Box::pin(async move {
                let (io, protocols) = match acceptor {
                    None => (io, protocols),
                    Some(acceptor) => {
                        let Some((io, alpn)) = tls_accept(io, &acceptor, &ctx.rec, conn_id).await
                        else {
                            return;
                        };
                        let protocols = match (protocols, alpn.as_deref()) {
                            (Protocols::Auto, Some(b"h2")) => Protocols::Http2Only,
                            (Protocols::Auto, Some(b"http/1.1")) => Protocols::Http1Only,
                            (p, _) => p,
                        };
                        (io, protocols)
                    }
                };
                serve_http(io, protocols, ctx, conn_id).await;
            })
        });
        Origin::spawn(self.name, listener, handler, rec, dir)
    }
}

/// TLS origin (test CA's `origin` certificate, ALPN h2 + http/1.1, TLS 1.2 and 1.3).
pub async fn start_tls_origin(name: &str) -> Origin {
    OriginBuilder::new(name)
        .tls(TlsSettings::default())
        .start()
        .await
}

/// Plaintext origin speaking HTTP/1.1 and h2c (prior knowledge).
pub async fn start_plain_origin(name: &str) -> Origin {
    OriginBuilder::new(name).start().await
}

/// Plaintext unix-socket origin speaking HTTP/1.1 and h2c (prior knowledge).
pub async fn start_unix_origin(name: &str) -> Origin {
    OriginBuilder::new(name).start_unix().await
}

/// gRPC-style origin over TLS: HTTP/2 only, ALPN `h2`, name `grpc`.
pub async fn start_grpc_origin() -> Origin {
    OriginBuilder::new("grpc")
        .tls(TlsSettings::default().alpn(&["h2"]))
        .http2_only()
        .start()
        .await
}

/// gRPC-style origin over h2c (prior knowledge), name `grpc`.
pub async fn start_h2c_grpc_origin() -> Origin {
    OriginBuilder::new("grpc").http2_only().start().await
}

struct HttpCtx {
    name: String,
    rec: Arc<Recorder>,
}

async fn serve_http(io: BoxIo, protocols: Protocols, ctx: Arc<HttpCtx>, conn_id: u64) {
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(route(req, &ctx, conn_id).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let builder = match protocols {
        Protocols::Auto => builder,
        Protocols::Http1Only => builder.http1_only(),
        Protocols::Http2Only => builder.http2_only(),
    };
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

fn query_num(query: &BTreeMap<String, String>, key: &str, default: u64) -> u64 {
    query
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn response(status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

async fn route(req: Request<Incoming>, ctx: &HttpCtx, conn_id: u64) -> Response<Body> {
    let record = RequestRecord {
        conn_id,
        method: req.method().clone(),
        uri: req.uri().clone(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        host: req
            .headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authority: req.uri().authority().map(|a| a.as_str().to_owned()),
        version: req.version(),
        headers: req.headers().clone(),
    };
    lock(&ctx.rec.requests).push(record);

    let mut resp = route_inner(req, ctx).await;
    if let Ok(name) = HeaderValue::from_str(&ctx.name) {
        resp.headers_mut().insert("x-origin", name);
    }
    resp
}

async fn route_inner(req: Request<Incoming>, ctx: &HttpCtx) -> Response<Body> {
    let is_grpc = req.method() == Method::POST
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        return grpc_echo(req, ctx).await;
    }

    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query());
    match path.as_str() {
        "/echo" => match req.into_body().collect().await {
            Ok(collected) => {
                let mut resp = response(StatusCode::OK, full(collected.to_bytes()));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                resp
            }
            Err(e) => response(StatusCode::BAD_REQUEST, full(format!("reading body: {e}"))),
        },
        "/headers" => {
            let mut map = serde_json::Map::new();
            for name in req.headers().keys() {
                let values: Vec<String> = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                map.insert(
                    name.as_str().to_owned(),
                    serde_json::Value::String(values.join(", ")),
                );
            }
            let _ = req.into_body().collect().await;
            let mut resp = response(
                StatusCode::OK,
                full(serde_json::Value::Object(map).to_string()),
            );
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        "/slow" => {
            let _ = req.into_body().collect().await;
            let ms = query_num(&query, "ms", 1000);
            let chunks = query_num(&query, "chunks", 10).max(1) as usize;
            let interval = Duration::from_millis(ms / (chunks as u64 - 1).max(1));
            response(
                StatusCode::OK,
                BodyExt::boxed(SlowBody::new(chunks, interval)),
            )
        }
        "/big" => {
            let _ = req.into_body().collect().await;
            let bytes = query_num(&query, "bytes", 1024 * 1024) as usize;
            response(StatusCode::OK, BodyExt::boxed(PatternBody::new(bytes)))
        }
        "/redirect-to-metadata" => {
            let _ = req.into_body().collect().await;
            let mut resp = response(StatusCode::FOUND, super::body::empty());
            resp.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_static("http://169.254.169.254/latest/meta-data/"),
            );
            resp
        }
        p if p.starts_with("/status/") => {
            let _ = req.into_body().collect().await;
            match p["/status/".len()..]
                .parse::<u16>()
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
            {
                Some(status) => response(status, super::body::empty()),
                None => response(StatusCode::BAD_REQUEST, full("bad status code")),
            }
        }
        _ => {
            let _ = req.into_body().collect().await;
            let mut resp = response(StatusCode::OK, full(format!("origin:{}", ctx.name)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
    }
}

async fn grpc_echo(req: Request<Incoming>, ctx: &HttpCtx) -> Response<Body> {
    let data = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return response(StatusCode::BAD_REQUEST, full(format!("reading body: {e}"))),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    let mut frames = Vec::new();
    if !data.is_empty() {
        frames.push(Frame::data(data));
    }
    frames.push(Frame::trailers(trailers));
    let body = FramesBody::new(frames, Some(ctx.rec.trailers_sent.clone()));
    let mut resp = response(StatusCode::OK, BodyExt::boxed(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

// ---------------------------------------------------------------------------
// TCP echo origins

async fn echo(mut io: BoxIo, rec: &Recorder, conn_id: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut bytes = 0u64;
    let mut saw_eof = false;
    let mut error = None;
    loop {
        match io.read(&mut buf).await {
            Ok(0) => {
                saw_eof = true;
                break;
            }
            Ok(n) => {
                if let Err(e) = io.write_all(&buf[..n]).await {
                    error = Some(e.to_string());
                    break;
                }
                bytes += n as u64;
            }
            // A TLS peer that closes without close_notify.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                saw_eof = true;
                error = Some(e.to_string());
                break;
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let _ = io.flush().await;
    let _ = io.shutdown().await;
    lock(&rec.echoes).push(EchoRecord {
        conn_id,
        bytes,
        saw_eof,
        error,
    });
}

fn echo_origin(name: &str, listener: Listener, tls: Option<TlsSettings>) -> Origin {
    let rec = Arc::new(Recorder::default());
    let acceptor = tls.as_ref().map(TlsSettings::acceptor);
    let rec2 = rec.clone();
    let handler: ConnHandler = Arc::new(move |io, conn_id| {
        let rec = rec2.clone();
        let acceptor = acceptor.clone();
        Box::pin(async move {
            let io = match acceptor {
                None => io,
                Some(acceptor) => match tls_accept(io, &acceptor, &rec, conn_id).await {
                    Some((io, _)) => io,
                    None => return,
                },
            };
            echo(io, &rec, conn_id).await;
        })
    });
    Origin::spawn(name.to_owned(), listener, handler, rec, None)
}

/// Plaintext TCP echo origin: echoes bytes; after the client's half-close it
/// finishes echoing, then closes.
pub async fn start_tcp_echo() -> Origin {
    echo_origin("tcp-echo", bind_tcp().await, None)
}

/// TLS TCP echo origin with the `origin` certificate and no ALPN.
pub async fn start_tls_echo() -> Origin {
    start_tls_echo_with(TlsSettings::default().alpn(&[])).await
}

/// TLS TCP echo origin with the given settings.
pub async fn start_tls_echo_with(settings: TlsSettings) -> Origin {
    echo_origin("tls-echo", bind_tcp().await, Some(settings))
}

/// A listener that accepts connections and never sends a byte, and the task holding them
/// (abort it to close them).
pub async fn silent_listener() -> (SocketAddr, JoinHandle<()>) {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("local addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    (addr, hold)
}

/// A listener that accepts connections and closes them at once.
pub async fn closing_listener() -> (SocketAddr, JoinHandle<()>) {
    let closer = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closer.local_addr().expect("local addr");
    let task = tokio::spawn(async move { while closer.accept().await.is_ok() {} });
    (addr, task)
}
