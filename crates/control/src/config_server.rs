//! The config stream: each connected proxy gets its own config (scoped out of the catalog's
//! view) as a versioned snapshot now and again whenever it changes, and answers with ACK or
//! NACK. What every proxy runs, and what it refused and why, is kept for `sluice inspect`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_api::model::ResourceKey;
use sluice_api::names::is_resource_name;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::Catalog;
use crate::wire::{self, proxy_message::Message, ProxyMessage, Snapshot};
use crate::ProxyConfig;

/// Proxies remembered; beyond this, those no longer connected are forgotten.
const MAX_KNOWN_PROXIES: usize = 10_000;

/// A NACK's reason is kept and logged up to this many characters.
const MAX_REASON: usize = 4096;

/// Largest message a proxy may send (a NACK's reason is the biggest).
const MAX_PROXY_MESSAGE: usize = 64 * 1024;

/// A proxy's state as this control plane knows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub mesh: String,
    pub name: String,
    pub connected: bool,
    /// The peer address of its stream.
    pub address: String,
    /// Unix milliseconds.
    pub connected_at: u64,
    /// The version it said it was running when it connected (from its cache; 0 for none).
    pub started_from: u64,
    /// The last version sent, and the last one it confirmed running.
    pub sent_version: u64,
    pub acked_version: u64,
    /// Unix milliseconds of the last ACK.
    pub acked_at: u64,
    pub nack: Option<NackStatus>,
    /// What it runs: the config of `acked_version`; key material shown by origin and length.
    #[serde(skip)]
    pub config: Option<Arc<ProxyConfig>>,
    #[serde(skip)]
    connection: u64,
    #[serde(skip)]
    sent: Option<(u64, Arc<ProxyConfig>)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NackStatus {
    pub version: u64,
    pub reason: String,
}

#[derive(Default)]
pub struct Proxies {
    by_name: Mutex<BTreeMap<ResourceKey, ProxyStatus>>,
    next_connection: AtomicU64,
}

impl Proxies {
    pub fn list(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, key: &ResourceKey) -> Option<ProxyStatus> {
        self.lock().get(key).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ResourceKey, ProxyStatus>> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, key: &ResourceKey, connection: u64, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.lock().get_mut(key) {
            // A newer stream under the same name owns the entry.
            if status.connection == connection {
                change(status);
            }
        }
    }
}

pub struct ConfigServer {
    pub catalog: Arc<Catalog>,
    pub proxies: Arc<Proxies>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

impl ConfigServer {
    /// Serves one gRPC request for [`wire::STREAM_PATH`]; the caller has authorized it.
    pub async fn serve(
        self: Arc<Self>,
        request: http::Request<axum::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let codec = tonic_prost::ProstCodec::<Snapshot, ProxyMessage>::default();
        let mut grpc = tonic::server::Grpc::new(codec)
            .max_decoding_message_size(MAX_PROXY_MESSAGE)
            .max_encoding_message_size(usize::MAX);
        grpc.streaming(Method { server: self, peer }, request).await
    }

    async fn stream(
        self: Arc<Self>,
        mut inbound: Streaming<ProxyMessage>,
        peer: String,
    ) -> Result<SnapshotStream, Status> {
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                message: Some(Message::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
            Ok(_) => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if !is_resource_name(&hello.name) || !is_resource_name(&hello.mesh) {
            return Err(Status::invalid_argument(
                "Hello needs a mesh and a name that are resource names (letters, digits, '-', '_' and '.')",
            ));
        }
        let build: String = hello.build.chars().take(64).collect();
        let key = ResourceKey {
            mesh: hello.mesh.clone(),
            name: hello.name.clone(),
        };
        let connection = self.proxies.next_connection.fetch_add(1, Ordering::Relaxed);
        tracing::info!(proxy = %key, %peer, running = hello.version, %build, "proxy connected");
        let mut known = self.proxies.lock();
        if known.len() >= MAX_KNOWN_PROXIES {
            known.retain(|_, s| s.connected);
        }
        known.insert(
            key.clone(),
            ProxyStatus {
                mesh: key.mesh.clone(),
                name: key.name.clone(),
                connected: true,
                address: peer,
                connected_at: now_ms(),
                started_from: hello.version,
                sent_version: 0,
                acked_version: 0,
                acked_at: 0,
                nack: None,
                config: None,
                connection,
                sent: None,
            },
        );
        drop(known);
        let (tx, rx) = mpsc::channel(4);
        let server = self.clone();
        let sender_key = key.clone();
        let sending = tokio::spawn(async move {
            server.send_changes(&sender_key, connection, tx).await;
        });
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => server.answer(&key, connection, message),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(proxy = %key, error = %e, "stream ended with an error");
                        break;
                    }
                }
            }
            sending.abort();
            server
                .proxies
                .update(&key, connection, |s| s.connected = false);
            tracing::info!(proxy = %key, "proxy disconnected");
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Sends the proxy's config now and after every change that alters it.
    async fn send_changes(
        &self,
        key: &ResourceKey,
        connection: u64,
        tx: mpsc::Sender<Result<Snapshot, Status>>,
    ) {
        let mut views = self.catalog.subscribe();
        let mut last: Option<Arc<ProxyConfig>> = None;
        loop {
            let view = views.borrow_and_update().clone();
            let config = view.config_for(key);
            let unchanged = last
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(l, &config) || **l == *config);
            if !unchanged {
                let version = view.revision as u64;
                let snapshot = wire::to_wire(&config, version);
                tracing::debug!(proxy = %key, version, listeners = config.listeners.len(), services = config.services.len(), "sending config");
                self.proxies.update(key, connection, |s| {
                    s.sent_version = version;
                    s.sent = Some((version, config.clone()));
                });
                if tx.send(Ok(snapshot)).await.is_err() {
                    return;
                }
                last = Some(config);
            }
            // Not held while waiting: the catalog frees old views, not the last stream to move.
            drop(view);
            if views.changed().await.is_err() {
                return;
            }
        }
    }

    fn answer(&self, key: &ResourceKey, connection: u64, message: ProxyMessage) {
        match message.message {
            Some(Message::Ack(ack)) => self.proxies.update(key, connection, |s| {
                s.acked_version = ack.version;
                s.acked_at = now_ms();
                if let Some((version, config)) = &s.sent {
                    if *version == ack.version {
                        s.config = Some(config.clone());
                    }
                }
                if s.nack.as_ref().is_some_and(|n| n.version <= ack.version) {
                    s.nack = None;
                }
            }),
            Some(Message::Nack(nack)) => {
                let reason: String = nack.reason.chars().take(MAX_REASON).collect();
                tracing::warn!(proxy = %key, version = nack.version, %reason, "proxy refused its config");
                self.proxies.update(key, connection, |s| {
                    s.nack = Some(NackStatus {
                        version: nack.version,
                        reason,
                    })
                });
            }
            Some(Message::Hello(_)) | None => {
                tracing::debug!(proxy = %key, "ignoring an unexpected message");
            }
        }
    }
}

struct Method {
    server: Arc<ConfigServer>,
    peer: String,
}

impl tonic::server::StreamingService<ProxyMessage> for Method {
    type Response = Snapshot;
    type ResponseStream = SnapshotStream;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<SnapshotStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<ProxyMessage>>) -> Self::Future {
        let server = self.server.clone();
        let peer = self.peer.clone();
        Box::pin(async move {
            let stream = server.stream(request.into_inner(), peer).await?;
            Ok(Response::new(stream))
        })
    }
}

/// The `inspect` view of one proxy: its status and the config it runs, redacted.
pub fn inspect(status: &ProxyStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "config".into(),
            status
                .config
                .as_deref()
                .map(|c| serde_json::to_value(c).unwrap_or_default())
                .unwrap_or(serde_json::Value::Null),
        );
    }
    value
}
