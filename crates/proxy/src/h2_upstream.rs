//! HTTP/2 to an upstream, on the h2 crate directly: a request is sent from the app's own task
//! and its response read there, with no task or channel between them. (hyper's client wraps
//! each request in a channel to a dispatch task and a task of its own that waits for the
//! response; on a kept-alive connection that was a tenth of the proxy's instructions per
//! request.)
//!
//! What hyper's client did besides, done here: connection-level keep-alive pings, request bodies
//! sent under the peer's flow control, and flow-control capacity handed back as the app reads.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::client::{ResponseFuture, SendRequest};
use h2::{PingPong, RecvStream, SendStream};
use http::Request;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

/// What a response's body may hold of unread data on one stream, and on the whole connection.
/// The origin sends no more until the app reads; reads hand the capacity back.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// The most a response head may carry, as for the app's own HTTP/2 connections.
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// A connection is pinged every `interval` (idle or not), and closed when a ping goes unanswered
/// for `timeout`: an upstream gone without a FIN or RST (a NAT or firewall dropped the flow) is
/// found in seconds, not after the kernel's retransmissions (~15 min).
#[derive(Debug, Clone, Copy)]
pub struct Ping {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Ping {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A connection's sending half, cloned for each request that uses it.
#[derive(Clone)]
pub struct Sender {
    pub send: SendRequest<Bytes>,
    /// Set when the connection has ended.
    pub closed: Arc<AtomicBool>,
}

impl Sender {
    /// Whether `other` is a handle on the same connection.
    pub fn same_connection(&self, other: &Sender) -> bool {
        Arc::ptr_eq(&self.closed, &other.closed)
    }
}

/// Dropped, the connection closes once the streams it carries have ended.
pub struct KeepOpen {
    _release: oneshot::Sender<()>,
}

/// Opens HTTP/2 over `io`: the sending half, what keeps the connection open, and the connection
/// itself, to be polled until it ends.
pub async fn handshake<T>(io: T, ping: Ping) -> Result<(Sender, KeepOpen, Connection<T>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        // Streams opened before the peer's SETTINGS say how many it takes.
        .initial_max_send_streams(100)
        .max_send_buffer_size(1024 * 1024)
        // Nothing here would take a pushed response.
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await?;
    let pong = conn.ping_pong();
    let closed = Arc::new(AtomicBool::new(false));
    let (release, released) = oneshot::channel();
    let connection = Connection {
        conn,
        pong,
        awaiting_pong: false,
        timer: Box::pin(tokio::time::sleep(ping.interval)),
        ping,
        released: Some(released),
        closed: closed.clone(),
    };
    let keep = KeepOpen { _release: release };
    Ok((Sender { send, closed }, keep, connection))
}

/// The connection: reads and writes frames, pings the peer every interval and ends when a ping
/// goes unanswered, and closes once the pool has let it go and its last stream has ended.
pub struct Connection<T> {
    conn: h2::client::Connection<T, Bytes>,
    pong: Option<PingPong>,
    awaiting_pong: bool,
    timer: Pin<Box<Sleep>>,
    ping: Ping,
    released: Option<oneshot::Receiver<()>>,
    closed: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("keep-alive ping not answered within {0:?}")]
    PingTimeout(Duration),
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Connection<T> {
    type Output = Result<(), ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // Once the pool lets go, the connection ends when its last stream has; polled now so
        // that it sees it has no users (h2 does not wake it for that).
        if let Some(released) = &mut this.released {
            if Pin::new(released).poll(cx).is_ready() {
                this.released = None;
            }
        }
        if let Poll::Ready(result) = Pin::new(&mut this.conn).poll(cx) {
            this.closed.store(true, Ordering::Release);
            return Poll::Ready(result.map_err(Into::into));
        }
        if let Err(e) = this.poll_ping(cx) {
            this.closed.store(true, Ordering::Release);
            return Poll::Ready(Err(e));
        }
        Poll::Pending
    }
}

impl<T> Connection<T> {
    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Result<(), ConnectionError> {
        let Some(pong) = &mut self.pong else {
            return Ok(());
        };
        loop {
            if self.awaiting_pong {
                match pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        let next = Instant::now() + self.ping.interval;
                        self.timer.as_mut().reset(next);
                    }
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if self.awaiting_pong {
                return Err(ConnectionError::PingTimeout(self.ping.timeout));
            }
            pong.send_ping(h2::Ping::opaque())?;
            self.awaiting_pong = true;
            let deadline = Instant::now() + self.ping.timeout;
            self.timer.as_mut().reset(deadline);
        }
    }
}

/// Sends `req` on a stream of `sender`, which must be ready. A body that is not empty goes out
/// from a task of its own, under the peer's flow control, while the response is awaited.
pub fn send<B>(
    sender: &mut SendRequest<Bytes>,
    req: Request<B>,
) -> Result<(ResponseFuture, Option<AbortOnDrop>), h2::Error>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let end = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end)?;
    let pipe = (!end).then(|| AbortOnDrop(tokio::spawn(send_body(body, stream))));
    Ok((response, pipe))
}

/// Ends the task sending a request body when the exchange is over or abandoned.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send_body<B>(mut body: B, mut stream: SendStream<Bytes>)
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        // The peer may answer and reset the stream before the body is done: stop reading then.
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reason.ok()));
            }
            Pin::new(&mut body)
                .poll_frame(cx)
                .map(|f| Ok(f.map(|r| r.map_err(Into::into))))
        })
        .await;
        let frame = match frame {
            Err(_) => return,
            Ok(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; stream reset");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let mut data = data.copy_to_bytes(data.remaining());
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    let n = match granted {
                        Some(Ok(n)) if n > 0 => n.min(data.len()),
                        Some(Ok(_)) => continue,
                        _ => return,
                    };
                    if stream.send_data(data.split_to(n), false).is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// A response body read from its stream, with the trailers after the data; capacity goes back
/// to the peer as the app reads. Holds the task sending the request body, if any.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    _request_body: Option<AbortOnDrop>,
}

impl H2Body {
    pub fn new(recv: RecvStream, request_body: Option<AbortOnDrop>) -> Self {
        Self {
            recv,
            data_done: false,
            _request_body: request_body,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
