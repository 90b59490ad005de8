//! TCP outbounds: bytes both ways, each direction closed on its own (half-close respected),
//! closed when neither side has sent anything for the idle timeout.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, Entry};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{BytesLabels, Metrics, RelayLabels};
use crate::socket_relay;
use crate::upstream::{plain_socket, Connector, Io};

/// A tcp outbound's service: how to reach it, and its metrics resolved once rather than per
/// connection.
pub struct TcpUpstream {
    pub connector: Arc<Connector>,
    connections: Counter,
    bytes_up: Counter,
    bytes_down: Counter,
    relays_pooled: Counter,
    relays_held: Counter,
}

impl TcpUpstream {
    pub fn new(connector: Arc<Connector>, metrics: &Metrics) -> Self {
        let bytes = |direction| {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    service: connector.label.clone(),
                    direction,
                })
                .clone()
        };
        let relays = |mode| metrics.relays.get_or_create(&RelayLabels { mode }).clone();
        Self {
            connections: metrics
                .tcp_connections
                .get_or_create(&Metrics::service(&connector.label))
                .clone(),
            bytes_up: bytes("upstream"),
            bytes_down: bytes("downstream"),
            relays_pooled: relays("pooled"),
            relays_held: relays("held"),
            connector,
        }
    }
}

/// Where a TCP connection came in and where its record goes.
pub struct ConnContext<'a> {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    pub access_log: &'a AccessLog,
    pub idle_timeout: Duration,
    /// What the app already sent (a ClientHello that was checked): sent on first.
    pub first: Vec<u8>,
    /// The server name that ClientHello carried, for the log.
    pub sni: Option<String>,
}

pub async fn serve(
    mut client: TcpStream,
    upstream: &TcpUpstream,
    ctx: ConnContext<'_>,
    kill: CancellationToken,
) {
    let ConnContext {
        peer,
        listener,
        access_log,
        idle_timeout,
        first,
        sni,
    } = ctx;
    let connector = &upstream.connector;
    let started = Instant::now();
    let mut entry = Entry::new("tcp", listener, peer, connector.log_label.clone());
    entry.path = sni.map(|s| format!("sni:{s}"));
    upstream.connections.inc();
    let connected = tokio::select! {
        c = connector.connect() => Some(c),
        _ = kill.cancelled() => None,
    };
    match connected {
        None => entry.error = Some(DRAINED.to_string()),
        Some(Err(e)) => {
            tracing::debug!(service = %connector.label, error = %e, "tcp upstream failed");
            entry.error = Some(e.to_string());
        }
        Some(Ok(mut connection)) => {
            entry.upstream = Some(connection.info.address.clone());
            entry.tls_version = connection.info.tls_version;
            match connection.io.write_all(&first).await {
                Ok(()) => {
                    let relayed =
                        relay(&mut client, &mut *connection.io, idle_timeout, &kill).await;
                    if relayed.pooled {
                        upstream.relays_pooled.inc();
                    } else {
                        upstream.relays_held.inc();
                    }
                    entry.bytes_in = relayed.up + first.len() as u64;
                    entry.bytes_out = relayed.down;
                    entry.error = relayed.ended;
                }
                Err(e) => entry.error = Some(format!("upstream write failed: {e}")),
            }
        }
    }
    upstream.bytes_up.inc_by(entry.bytes_in);
    upstream.bytes_down.inc_by(entry.bytes_out);
    entry.duration = started.elapsed();
    access_log.log(entry);
}

/// Per direction, for the relay's life, where an end is not a plain socket: large enough that a
/// bulk transfer moves in few system calls.
const RELAY_BUFFER: usize = 64 * 1024;

const DRAINED: &str = "closed at the end of the drain deadline";

/// What a relay carried, however it ended.
pub struct Relayed {
    /// Bytes written to `b` (from `a`), and to `a` (from `b`).
    pub up: u64,
    pub down: u64,
    /// Why it stopped before both sides were done, if it did.
    pub ended: Option<String>,
    /// Whether both ends were plain sockets, so that buffers were held only while bytes moved.
    pub pooled: bool,
}

/// Bytes both ways until both sides are done, nothing moves for `idle_timeout`, or `kill`
/// fires. Between two plain TCP sockets a direction holds a buffer only while bytes move;
/// otherwise (TLS or a unix socket at an end) each holds one for the relay's life.
pub async fn relay(
    a: &mut dyn Io,
    b: &mut dyn Io,
    idle_timeout: Duration,
    kill: &CancellationToken,
) -> Relayed {
    let activity = Activity::new();
    let (to_a, to_b) = (AtomicU64::new(0), AtomicU64::new(0));
    let pooled = plain_socket(a).is_some() && plain_socket(b).is_some();
    let carried = async {
        if let (Some(sa), Some(sb)) = (plain_socket(a), plain_socket(b)) {
            let moved = || activity.touch();
            return socket_relay::relay(sa, sb, &moved, &to_a, &to_b).await;
        }
        let mut a = Tracked {
            inner: a,
            activity: &activity,
            written: &to_a,
        };
        let mut b = Tracked {
            inner: b,
            activity: &activity,
            written: &to_b,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER)
            .await
            .map(|_| ())
    };
    let ended = tokio::select! {
        r = carried => r.err().map(|e| format!("connection ended with an error: {e}")),
        _ = kill.cancelled() => Some(DRAINED.to_string()),
        idle = activity.idle_for(idle_timeout) => Some(format!("closed after {idle:?} without traffic")),
    };
    Relayed {
        up: to_b.load(Ordering::Relaxed),
        down: to_a.load(Ordering::Relaxed),
        ended,
        pooled,
    }
}

/// When bytes last moved in either direction, as milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`; returns how long that was.
    async fn idle_for(&self, limit: Duration) -> Duration {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return limit;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A stream that records activity on every read and counts what is written to it.
struct Tracked<'a, S: ?Sized> {
    inner: &'a mut S,
    activity: &'a Activity,
    written: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
