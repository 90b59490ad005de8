//! The proxy's side of the config stream: connect to a control plane, apply every snapshot it
//! sends, answer ACK or NACK, and keep the last good snapshot on disk so that a restart while
//! the control plane is away still serves. Control planes are tried in turn with backoff; the
//! proxy keeps serving what it has the whole time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use sluice_control::wire::{
    self, proxy_message::Message, Ack, Hello, Nack, ProxyMessage, Snapshot,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::runtime::Proxy;

/// Snapshots larger than this are refused; 10,000 services with TLS fit in a few MiB.
const MAX_SNAPSHOT: usize = 256 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Subscription {
    /// Base URLs (`http://HOST:PORT`), tried in order; the next one after a failure.
    pub control_planes: Vec<String>,
    pub mesh: String,
    pub name: String,
    pub token: String,
    /// Where the last good snapshot is kept (readable by its owner only: it holds keys).
    pub cache: PathBuf,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("control_planes", &self.control_planes)
            .field("mesh", &self.mesh)
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("cache", &self.cache)
            .finish()
    }
}

/// Starts from the cache if there is one, then follows the control planes until the process
/// ends.
pub async fn follow(subscription: Subscription, proxy: Arc<Proxy>) {
    let mut running = start_from_cache(&subscription, &proxy).await;
    if subscription.control_planes.is_empty() {
        tracing::error!("no control plane to follow; serving the cached config only");
        return;
    }
    let mut backoff = BACKOFF_MIN;
    let mut next = 0;
    loop {
        let url = &subscription.control_planes[next % subscription.control_planes.len()];
        let Err(Failure { reason, received }) =
            session(url, &subscription, &proxy, &mut running).await;
        if received {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(control_plane = %url, error = %reason, retry_in = ?backoff, "config stream lost; serving the last config applied");
        proxy.metrics().config_stream_connected.set(0);
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        next += 1;
    }
}

async fn start_from_cache(subscription: &Subscription, proxy: &Proxy) -> u64 {
    let bytes = match tokio::fs::read(&subscription.cache).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(cache = %subscription.cache.display(), error = %e, "cannot read the config cache");
            return 0;
        }
    };
    let snapshot = match Snapshot::decode(bytes.as_slice()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cache = %subscription.cache.display(), error = %e, "config cache is unreadable; ignored");
            return 0;
        }
    };
    let version = snapshot.version;
    let applied = apply(proxy, snapshot).await;
    if let Some(reason) = &applied.problems {
        tracing::warn!(cache = %subscription.cache.display(), %reason, "cached config: not all of it could be applied");
    }
    if !applied.in_force {
        return 0;
    }
    proxy.metrics().config_version.set(version as i64);
    tracing::info!(version, cache = %subscription.cache.display(), "serving the cached config until the control plane answers");
    version
}

struct Failure {
    reason: String,
    /// Whether this session got as far as a snapshot: then the next retry starts quickly.
    received: bool,
}

async fn session(
    url: &str,
    subscription: &Subscription,
    proxy: &Proxy,
    running: &mut u64,
) -> Result<std::convert::Infallible, Failure> {
    let fail = |reason: String| Failure {
        reason,
        received: false,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(format!("{url}: not a URL: {e}")))?
        .connect_timeout(subscription.connect_timeout)
        .tcp_nodelay(true)
        // A control plane that vanishes without closing (a partition) is noticed in ~20s.
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(format!("cannot connect: {}", source_chain(&e))))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_SNAPSHOT);
    grpc.ready()
        .await
        .map_err(|e| fail(format!("not ready: {e}")))?;
    let (tx, rx) = mpsc::channel::<ProxyMessage>(4);
    let hello = ProxyMessage {
        message: Some(Message::Hello(Hello {
            mesh: subscription.mesh.clone(),
            name: subscription.name.clone(),
            version: *running,
            build: env!("CARGO_PKG_VERSION").to_string(),
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| fail("stream closed".into()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let bearer = format!("Bearer {}", subscription.token)
        .parse()
        .map_err(|_| fail("the token holds characters a header cannot carry".into()))?;
    request.metadata_mut().insert("authorization", bearer);
    let codec = tonic_prost::ProstCodec::<ProxyMessage, Snapshot>::default();
    let path = http::uri::PathAndQuery::from_static(wire::STREAM_PATH);
    let mut inbound = grpc
        .streaming(request, path, codec)
        .await
        .map_err(|status| fail(refusal(&status)))?
        .into_inner();
    tracing::info!(control_plane = %url, "config stream open");
    proxy.metrics().config_stream_connected.set(1);
    let mut received = false;
    loop {
        let snapshot = match inbound.message().await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(Failure {
                    reason: "the control plane closed the stream".into(),
                    received,
                })
            }
            Err(status) => {
                return Err(Failure {
                    reason: refusal(&status),
                    received,
                })
            }
        };
        received = true;
        let version = snapshot.version;
        let (listeners, services) = (snapshot.listeners.len(), snapshot.services.len());
        let applied = apply(proxy, snapshot).await;
        if applied.in_force {
            *running = version;
            proxy.metrics().config_version.set(version as i64);
            tracing::info!(version, listeners, services, "config applied");
        }
        let answer = match &applied.problems {
            None => Message::Ack(Ack { version }),
            Some(reason) => {
                if applied.in_force {
                    tracing::error!(version, %reason, "config applied but for these problems");
                } else {
                    tracing::error!(version, %reason, "config refused; still serving the previous one");
                }
                Message::Nack(Nack {
                    version,
                    reason: reason.clone(),
                })
            }
        };
        if tx
            .send(ProxyMessage {
                message: Some(answer),
            })
            .await
            .is_err()
        {
            return Err(Failure {
                reason: "stream closed".into(),
                received,
            });
        }
        // After the answer: the cache is for the next start, not for this change.
        if let (true, Some(encoded)) = (applied.in_force, applied.encoded) {
            write_cache(&subscription.cache, encoded).await;
        }
    }
}

/// What applying a snapshot did.
struct Applied {
    /// Whether the snapshot is now what the proxy serves (perhaps without some listeners).
    in_force: bool,
    /// Every problem, one per line: the reason of the NACK.
    problems: Option<String>,
    /// The snapshot as it is cached on disk.
    encoded: Option<Vec<u8>>,
}

async fn apply(proxy: &Proxy, snapshot: Snapshot) -> Applied {
    let config = match wire::from_wire(&snapshot) {
        Ok(c) => c,
        Err(reason) => {
            return Applied {
                in_force: false,
                problems: Some(reason),
                encoded: None,
            }
        }
    };
    // Kept encoded (smaller) for the cache, and let go of before the proxy builds its new
    // state beside the old: the peak of an apply is what the allocator keeps afterwards.
    let encoded = snapshot.encode_to_vec();
    drop(snapshot);
    let (in_force, errors) = match proxy.apply(config).await {
        Ok(bind_errors) => (true, bind_errors),
        Err(errors) => (false, errors),
    };
    Applied {
        in_force,
        encoded: Some(encoded),
        problems: (!errors.is_empty()).then(|| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        }),
    }
}

/// The snapshot on disk, replaced whole, readable by its owner only.
async fn write_cache(path: &std::path::Path, bytes: Vec<u8>) {
    let path = path.to_path_buf();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        // Renamed whole: a reader sees the old snapshot or the new one, never part of one. A
        // cache lost to a power cut is only a slower start.
        std::fs::rename(&tmp, &path)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the config cache"),
        Err(e) => tracing::warn!(error = %e, "cannot write the config cache"),
    }
}

fn refusal(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated => {
            format!("the control plane refused the token: {}", status.message())
        }
        _ => format!("{:?}: {}", status.code(), status.message()),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Layers often repeat their source's words; say them once.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Up to a quarter more, so that proxies cut off together do not return together.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}
