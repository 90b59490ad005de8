//! HTTP client helpers built on hyper's connection APIs (one connection per
//! client, so tests control pooling and keep-alive exactly).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use super::body::{empty, full, Body, BoxError};
use super::tls::tls_connect;
use super::DEFAULT_TIMEOUT;

/// A fully read response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Trailers, when the response carried any.
    pub trailers: Option<HeaderMap>,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (panics if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A trailer as text.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
    }
}

/// Reads a whole response, trailers included.
pub async fn collect_response(resp: Response<Incoming>) -> Result<HttpResponse, BoxError> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(HttpResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

async fn with_timeout<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("{what} timed out after {timeout:?}").into()),
    }
}

async fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn unix_connect(path: &Path) -> io::Result<UnixStream> {
    tokio::time::timeout(DEFAULT_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Aborts the connection driver task when the last client clone goes away.
#[derive(Debug)]
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 connection; requests are sent one after the other on it
/// (keep-alive).
#[derive(Debug)]
pub struct H1Client {
    sender: http1::SendRequest<Body>,
    /// Sent as the `Host` header by [`H1Client::request`].
    pub authority: String,
    /// Bound on each request (default 10 s).
    pub timeout: Duration,
    _conn: ConnTask,
}

impl H1Client {
    /// Connects over TCP; `Host` defaults to the address.
    pub async fn connect(addr: SocketAddr) -> Result<H1Client, BoxError> {
        let io = tcp_connect(addr).await?;
        H1Client::handshake(io, addr.to_string()).await
    }

    /// Connects over a unix socket; `Host` defaults to `localhost`.
    pub async fn connect_unix(path: &Path) -> Result<H1Client, BoxError> {
        let io = unix_connect(path).await?;
        H1Client::handshake(io, "localhost".to_owned()).await
    }

    /// Connects over TLS with `server_name` (SNI); `Host` defaults to `server_name:port`.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> Result<H1Client, BoxError> {
        let io = tls_connect(addr, server_name, config).await?;
        H1Client::handshake(io, format!("{server_name}:{}", addr.port())).await
    }

    /// Runs the HTTP/1.1 handshake on an established stream.
    pub async fn handshake<T>(io: T, authority: String) -> Result<H1Client, BoxError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H1Client {
            sender,
            authority,
            timeout: DEFAULT_TIMEOUT,
            _conn: ConnTask(task),
        })
    }

    /// A request builder with an origin-form target and the `Host` header set.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.authority.as_str())
    }

    /// Sends `req` and returns the response head (body still streaming).
    pub async fn send_streaming(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let sender = &mut self.sender;
        with_timeout(self.timeout, "HTTP/1.1 request", async move {
            sender.ready().await?;
            Ok(sender.send_request(req).await?)
        })
        .await
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&mut self, req: Request<Body>) -> Result<HttpResponse, BoxError> {
        let timeout = self.timeout;
        let sender = &mut self.sender;
        with_timeout(timeout, "HTTP/1.1 request", async move {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            collect_response(resp).await
        })
        .await
    }

    pub async fn get(&mut self, path: &str) -> Result<HttpResponse, BoxError> {
        let req = self.request(Method::GET, path).body(empty())?;
        self.send(req).await
    }

    pub async fn post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<HttpResponse, BoxError> {
        let req = self.request(Method::POST, path).body(full(body))?;
        self.send(req).await
    }

    /// Whether the connection has been closed (by either side).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One HTTP/2 connection (h2c prior knowledge, or TLS with ALPN h2).
/// Cheap to clone; clones share the connection and may send concurrently.
#[derive(Clone, Debug)]
pub struct H2Client {
    sender: http2::SendRequest<Body>,
    /// `http` or `https`, used in request URIs.
    pub scheme: String,
    /// Sent as `:authority` by [`H2Client::request`].
    pub authority: String,
    /// Bound on each request (default 10 s).
    pub timeout: Duration,
    _conn: Arc<ConnTask>,
}

impl H2Client {
    /// Connects over TCP with h2c prior knowledge; authority defaults to the address.
    pub async fn connect(addr: SocketAddr) -> Result<H2Client, BoxError> {
        let io = tcp_connect(addr).await?;
        H2Client::handshake(io, "http", addr.to_string()).await
    }

    /// Connects over a unix socket with h2c prior knowledge; authority `localhost`.
    pub async fn connect_unix(path: &Path) -> Result<H2Client, BoxError> {
        let io = unix_connect(path).await?;
        H2Client::handshake(io, "http", "localhost".to_owned()).await
    }

    /// Connects over TLS (the config should offer ALPN `h2`); authority
    /// defaults to `server_name:port`.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> Result<H2Client, BoxError> {
        let io = tls_connect(addr, server_name, config).await?;
        H2Client::handshake(io, "https", format!("{server_name}:{}", addr.port())).await
    }

    /// Runs the HTTP/2 handshake on an established stream.
    pub async fn handshake<T>(io: T, scheme: &str, authority: String) -> Result<H2Client, BoxError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = http2::handshake(TokioExecutor::new(), TokioIo::new(io));
        let (sender, conn) = with_timeout(DEFAULT_TIMEOUT, "HTTP/2 handshake", async {
            Ok(handshake.await?)
        })
        .await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Client {
            sender,
            scheme: scheme.to_owned(),
            authority,
            timeout: DEFAULT_TIMEOUT,
            _conn: Arc::new(ConnTask(task)),
        })
    }

    /// A request builder with an absolute URI (`scheme://authority/path`).
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}://{}{}", self.scheme, self.authority, path))
    }

    /// Sends `req` (absolute URI required) and returns the response head.
    pub async fn send_streaming(&self, req: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        let mut sender = self.sender.clone();
        with_timeout(self.timeout, "HTTP/2 request", async move {
            sender.ready().await?;
            Ok(sender.send_request(req).await?)
        })
        .await
    }

    /// Sends `req` (absolute URI required) and reads the whole response, trailers included.
    pub async fn send(&self, req: Request<Body>) -> Result<HttpResponse, BoxError> {
        let mut sender = self.sender.clone();
        with_timeout(self.timeout, "HTTP/2 request", async move {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            collect_response(resp).await
        })
        .await
    }

    pub async fn get(&self, path: &str) -> Result<HttpResponse, BoxError> {
        let req = self.request(Method::GET, path).body(empty())?;
        self.send(req).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Result<HttpResponse, BoxError> {
        let req = self.request(Method::POST, path).body(full(body))?;
        self.send(req).await
    }

    /// A gRPC-style unary call: POST `path` with `content-type: application/grpc`.
    pub async fn grpc(&self, path: &str, body: impl Into<Bytes>) -> Result<HttpResponse, BoxError> {
        let req = self
            .request(Method::POST, path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(body))?;
        self.send(req).await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One HTTP/1.1 GET on a fresh connection.
pub async fn http1_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, BoxError> {
    H1Client::connect(addr).await?.get(path).await
}

/// One h2c (prior knowledge) GET on a fresh connection.
pub async fn http2_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, BoxError> {
    H2Client::connect(addr).await?.get(path).await
}

/// Writes `data` and half-closes (shutdown of the write side) while reading
/// until EOF; bounded by [`DEFAULT_TIMEOUT`]. Returns what was read.
pub async fn half_close_roundtrip<S>(stream: &mut S, data: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        wr.write_all(data).await?;
        wr.flush().await?;
        wr.shutdown().await
    };
    let read = async {
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await?;
        Ok::<_, io::Error>(out)
    };
    let work = async {
        let (w, r) = tokio::join!(write, read);
        w?;
        r
    };
    tokio::time::timeout(DEFAULT_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo round trip timed out"))?
}

/// Whether a new connection to the loopback outbound on `port` gets `body` from `GET /`.
pub async fn serves(port: u16, body: &str) -> bool {
    match H1Client::connect(([127, 0, 0, 1], port).into()).await {
        Ok(mut c) => c.get("/").await.is_ok_and(|r| r.text() == body),
        Err(_) => false,
    }
}

/// Whether the loopback port stops accepting connections within the default timeout.
pub async fn stops_accepting(port: u16) -> bool {
    super::wait_until_async(super::DEFAULT_TIMEOUT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await
}

/// Fills `buf` from `stream`, or panics after the default timeout.
pub async fn read_exact_in_time<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(super::DEFAULT_TIMEOUT, stream.read_exact(buf)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("reading {} bytes: {e}", buf.len()),
        Err(_) => panic!(
            "{} bytes did not arrive within {:?}",
            buf.len(),
            super::DEFAULT_TIMEOUT
        ),
    }
}

/// Sends `CONNECT target` to a forward proxy and returns the status code, the body of a
/// refusal, and the stream after the response head.
pub async fn proxy_connect(proxy: SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, body) = read_response_head(&mut s).await;
    (status, body, s)
}

/// Reads a response head (and, for non-2xx, the short body that follows) byte by byte.
pub async fn read_response_head(s: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEFAULT_TIMEOUT, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if len > 0 {
        read_exact_in_time(s, &mut body).await;
    }
    (status, String::from_utf8_lossy(&body).to_string())
}

/// `GET url` through a forward proxy on a connection of its own: the status and the whole
/// answer as text.
pub async fn proxy_get(proxy: SocketAddr, url: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    s.write_all(
        format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEFAULT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}
