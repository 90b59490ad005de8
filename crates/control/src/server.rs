//! The control plane's REST API: create or replace, get, list and delete resources, each checked
//! exactly as `sluice validate` checks files, against everything already stored.
//!
//! `PUT /api/v1/{kind}/{mesh}/{name}` with the resource as YAML or JSON; `If-Match: VERSION` makes
//! the write conditional (409 when stale). `GET` the same path for one resource (its version in
//! the `resource-version` header), `GET /api/v1/{kind}[?mesh=M]` for a list, `DELETE` to remove.
//! Every request needs `Authorization: Bearer TOKEN`; the read-only token may only read.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sluice_api::{parse_documents, Parsed, Severity};
use sluice_store::{Key, Outcome, Store, StoreError};

use crate::catalog::Catalog;
use crate::config_server::{inspect, ConfigServer};

/// Where the store keeps a resource of `kind` at `key`.
fn store_key(kind: &str, key: &sluice_api::model::ResourceKey) -> Key {
    Key {
        kind: kind.to_string(),
        mesh: key.mesh.clone(),
        name: key.name.clone(),
    }
}

/// Why a write was not done.
#[derive(Debug)]
pub enum Refused {
    /// Every problem, one line each, as `sluice validate` says them.
    Invalid(Vec<String>),
    Store(StoreError),
}

/// Request bodies larger than this get 413: no resource is anywhere near it.
pub const MAX_BODY: usize = 1024 * 1024;

/// The kinds the API stores: Kuma's, and Istio's mesh-wide settings (an IstioOperator or the
/// istio ConfigMap), which are read for the outbound traffic policy.
pub const KINDS: &[&str] = &[
    "MeshExternalService",
    "Dataplane",
    "Secret",
    "Mesh",
    "IstioOperator",
    "ConfigMap",
];

pub struct Api {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    pub config: Arc<ConfigServer>,
    pub admin_token: String,
    pub read_token: Option<String>,
    /// Proxies present it to open the config stream; it reads nothing else.
    pub proxy_token: Option<String>,
}

impl Api {
    /// The API over `store`, with its catalog loaded and followed.
    pub async fn start(
        store: Store,
        admin_token: String,
        read_token: Option<String>,
        proxy_token: Option<String>,
    ) -> Result<Arc<Api>, StoreError> {
        let store = Arc::new(store);
        let catalog = Arc::new(Catalog::load(&store).await?);
        tokio::spawn(catalog.clone().follow(store.clone()));
        let config = Arc::new(ConfigServer {
            catalog: catalog.clone(),
            proxies: Arc::default(),
        });
        Ok(Arc::new(Api {
            store,
            catalog,
            config,
            admin_token,
            read_token,
            proxy_token,
        }))
    }

    /// Writes every resource `docs` declare and deletes `remove`, after checking them together
    /// with everything else stored: all of them, or (on any error) none.
    pub async fn write_documents(
        &self,
        docs: Vec<sluice_api::Document>,
        remove: &[Key],
    ) -> Result<Vec<(Outcome, sluice_store::Stored)>, Refused> {
        let parsed: Vec<Parsed> = docs.iter().map(sluice_api::parse).collect();
        // Unreadable documents get their errors from the full check below.
        let items: Vec<(Key, String)> = docs
            .iter()
            .zip(&parsed)
            .filter_map(|(doc, p)| {
                let (kind, key) = p.identity()?;
                Some((store_key(kind, key), doc.value.to_string()))
            })
            .collect();
        let replaced: Vec<&Key> = items.iter().map(|(k, _)| k).chain(remove).collect();
        let checked = check_all(self, &replaced, parsed)
            .await
            .map_err(Refused::Invalid)?;
        let done = self.store.put_all(&items).await.map_err(Refused::Store)?;
        for key in remove {
            self.store.delete(key).await.map_err(Refused::Store)?;
        }
        let written: Vec<(Key, Option<&str>)> = items
            .iter()
            .map(|(k, body)| (k.clone(), Some(body.as_str())))
            .chain(remove.iter().map(|k| (k.clone(), None)))
            .collect();
        self.commit(checked, &written).await;
        Ok(done)
    }

    /// Publishes a checked write at once, with the registry its check resolved.
    async fn commit(&self, checked: Checked, written: &[(Key, Option<&str>)]) {
        let published = match checked.registry {
            Some(registry) => {
                self.catalog
                    .commit(&self.store, &checked.before, written, registry)
                    .await
            }
            None => self.catalog.sync(&self.store).await,
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, "cannot read the change back from the store");
        }
    }
}

/// The API described for clients and tools; a test holds it to what the server does.
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/api/v1/apply", axum::routing::post(apply))
        .route("/api/v1/proxies", get(list_proxies))
        .route("/api/v1/proxies/{mesh}/{name}", get(inspect_proxy))
        .route(crate::wire::STREAM_PATH, axum::routing::post(config_stream))
        .route("/api/v1/{kind}", get(list))
        .route(
            "/api/v1/{kind}/{mesh}/{name}",
            get(read).put(write).delete(remove),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string() + "\n",
    )
        .into_response()
}

enum Access {
    Read,
    Write,
}

/// 401 without a valid token (and nothing about the registry); 403 for a read-only token writing.
/// The refusal for a request that may not go on, if any: authentication first, so nothing about
/// the registry (not even which kinds exist) is told to a caller without a valid token.
fn gate(api: &Api, headers: &HeaderMap, access: Access, kind: &str) -> Option<Response> {
    authorize(api, headers, access).or_else(|| unknown_kind(kind))
}

fn authorize(api: &Api, headers: &HeaderMap, access: Access) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let is_admin = !token.is_empty() && constant_time_eq(token, &api.admin_token);
    let is_reader = !token.is_empty()
        && api
            .read_token
            .as_deref()
            .is_some_and(|t| constant_time_eq(token, t));
    match access {
        _ if is_admin => None,
        Access::Read if is_reader => None,
        Access::Write if is_reader => Some(text(
            StatusCode::FORBIDDEN,
            "this token may only read; use an admin token to change resources\n",
        )),
        _ => Some(text(
            StatusCode::UNAUTHORIZED,
            "a valid token is required: Authorization: Bearer TOKEN\n",
        )),
    }
}

/// Token comparison that takes the same time wherever the first difference is.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn unknown_kind(kind: &str) -> Option<Response> {
    if KINDS.contains(&kind) {
        None
    } else {
        Some(text(
            StatusCode::NOT_FOUND,
            format!("unknown kind {kind:?}; kinds are {}\n", KINDS.join(", ")),
        ))
    }
}

fn store_error(e: StoreError) -> Response {
    match e {
        conflict @ StoreError::Conflict { .. } => {
            text(StatusCode::CONFLICT, format!("{conflict}\n"))
        }
        other => {
            tracing::error!(error = %other, "store failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store is not available; try again\n",
            )
        }
    }
}

#[derive(serde::Deserialize)]
struct ListQuery {
    mesh: Option<String>,
}

async fn list(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = gate(&api, &headers, Access::Read, &kind) {
        return r;
    }
    match api.store.list(&kind, q.mesh.as_deref()).await {
        Ok(items) => json(
            StatusCode::OK,
            serde_json::json!({
                "kind": kind,
                "items": items.iter().map(|s| serde_json::json!({
                    "mesh": s.key.mesh,
                    "name": s.key.name,
                    "resourceVersion": s.version,
                })).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => store_error(e),
    }
}

async fn read(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((kind, mesh, name)): Path<(String, String, String)>,
) -> Response {
    if let Some(r) = gate(&api, &headers, Access::Read, &kind) {
        return r;
    }
    let key = Key { kind, mesh, name };
    match api.store.get(&key).await {
        Ok(Some(s)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/yaml".to_string()),
                (
                    header::HeaderName::from_static("resource-version"),
                    s.version.to_string(),
                ),
            ],
            s.body,
        )
            .into_response(),
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("no {} {}/{}\n", key.kind, key.mesh, key.name),
        ),
        Err(e) => store_error(e),
    }
}

async fn write(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((kind, mesh, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    if let Some(r) = gate(&api, &headers, Access::Write, &kind) {
        return r;
    }
    let key = Key { kind, mesh, name };
    let expected = match headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().map(str::parse::<i64>))
    {
        None => None,
        Some(Ok(Ok(v))) => Some(v),
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "If-Match must be a resource version (a number)\n",
            )
        }
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        return text(StatusCode::UNPROCESSABLE_ENTITY, "the body is not UTF-8\n");
    };
    let checked = match check(&api, &key, body).await {
        Ok(c) => c,
        Err(problems) => return text(StatusCode::UNPROCESSABLE_ENTITY, problems.join("\n") + "\n"),
    };
    match api.store.put(&key, body, expected).await {
        Ok((outcome, stored)) => {
            api.commit(checked, &[(key.clone(), Some(body))]).await;
            json(
                if outcome == Outcome::Created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                serde_json::json!({
                    "result": match outcome {
                        Outcome::Created => "created",
                        Outcome::Configured => "configured",
                        Outcome::Unchanged => "unchanged",
                    },
                    "resourceVersion": stored.version,
                    "revision": stored.revision,
                }),
            )
        }
        Err(e) => store_error(e),
    }
}

async fn remove(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((kind, mesh, name)): Path<(String, String, String)>,
) -> Response {
    if let Some(r) = gate(&api, &headers, Access::Write, &kind) {
        return r;
    }
    let key = Key { kind, mesh, name };
    let checked = match check_all(&api, &[&key], Vec::new()).await {
        Ok(c) => c,
        Err(problems) => {
            return text(
                StatusCode::CONFLICT,
                format!(
                    "{} {}/{} is still needed:\n{}\n",
                    key.kind,
                    key.mesh,
                    key.name,
                    problems.join("\n")
                ),
            );
        }
    };
    match api.store.delete(&key).await {
        Ok(true) => {
            api.commit(checked, &[(key.clone(), None)]).await;
            text(StatusCode::OK, "deleted\n")
        }
        Ok(false) => text(
            StatusCode::NOT_FOUND,
            format!("no {} {}/{}\n", key.kind, key.mesh, key.name),
        ),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v1/apply`: every resource of a multi-document body, checked together with what is
/// stored and written in one transaction, or none of them.
async fn apply(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = authorize(&api, &headers, Access::Write) {
        return r;
    }
    let Ok(body) = std::str::from_utf8(&body) else {
        return text(StatusCode::UNPROCESSABLE_ENTITY, "the body is not UTF-8\n");
    };
    let docs = match parse_documents("request", body) {
        Ok(d) => d,
        Err(e) => return text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
    };
    match api.write_documents(docs, &[]).await {
        Ok(done) => json(
            StatusCode::OK,
            serde_json::json!({
                "results": done.iter().map(|(outcome, s)| serde_json::json!({
                    "kind": s.key.kind,
                    "mesh": s.key.mesh,
                    "name": s.key.name,
                    "result": match outcome {
                        Outcome::Created => "created",
                        Outcome::Configured => "configured",
                        Outcome::Unchanged => "unchanged",
                    },
                    "resourceVersion": s.version,
                })).collect::<Vec<_>>(),
                "revision": done.iter().map(|(_, s)| s.revision).max().unwrap_or(0),
            }),
        ),
        Err(Refused::Invalid(problems)) => {
            text(StatusCode::UNPROCESSABLE_ENTITY, problems.join("\n") + "\n")
        }
        Err(Refused::Store(e)) => store_error(e),
    }
}

/// Checks `docs` (sources `request[N]`) together with every stored resource they do not replace,
/// as the catalog holds them at the store's latest revision. Problems in the documents are
/// reported, and so are new problems in stored resources: a write never breaks what is stored.
async fn check_all(api: &Api, replaced: &[&Key], new: Vec<Parsed>) -> Result<Checked, Vec<String>> {
    let sources: std::collections::HashSet<String> =
        new.iter().map(|p| p.doc.source.to_string()).collect();
    let view = api
        .catalog
        .sync(&api.store)
        .await
        .map_err(|e| vec![e.to_string()])?;
    let stored = view
        .docs
        .iter()
        .filter(|(key, _)| !replaced.contains(key))
        .map(|(_, entry)| &entry.parsed);
    let loaded = sluice_api::resolve(new.iter().chain(stored));
    let mut problems = Vec::new();
    for d in &loaded.diagnostics {
        let ours = d.doc.as_ref().is_some_and(|r| sources.contains(&*r.source));
        match d.severity {
            Severity::Error if ours => problems.push(d.to_string()),
            // A stored resource this change would break (a reference to what is removed, say).
            Severity::Error => {
                let line = d.to_string();
                if !view.errors.contains(&line) {
                    problems.push(format!("{line} (stored; this change would break it)"));
                }
            }
            Severity::Warning if ours => tracing::warn!("{d}"),
            Severity::Warning => {}
        }
    }
    if problems.is_empty() {
        Ok(Checked {
            // With problems stored before (none, normally) the registry is left to a full sync.
            registry: loaded.registry,
            before: view,
        })
    } else {
        Err(problems)
    }
}

/// A write that passed its check: the view it was checked against and the registry it makes.
struct Checked {
    before: Arc<crate::catalog::View>,
    registry: Option<sluice_api::Registry>,
}

/// Checks `body` as the resource at `key`, together with everything else stored: the same
/// rules and messages as `sluice validate`, for this document only.
async fn check(api: &Api, key: &Key, body: &str) -> Result<Checked, Vec<String>> {
    let source = format!("{}/{}/{}", key.kind, key.mesh, key.name);
    let docs = parse_documents(&source, body).map_err(|e| vec![e.to_string()])?;
    if docs.len() != 1 {
        return Err(vec![format!(
            "{source}: the body must hold exactly one resource, found {}",
            docs.len()
        )]);
    }
    let parsed = sluice_api::parse(&docs[0]);
    if let Some((kind, declared)) = parsed.identity() {
        if store_key(kind, declared) != *key {
            return Err(vec![format!(
                "{source}: the body declares {kind} {declared}; send it to /api/v1/{kind}/{declared}"
            )]);
        }
    }
    check_all(api, &[key], vec![parsed]).await
}

async fn list_proxies(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Some(r) = authorize(&api, &headers, Access::Read) {
        return r;
    }
    json(
        StatusCode::OK,
        serde_json::json!({ "items": api.config.proxies.list() }),
    )
}

async fn inspect_proxy(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((mesh, name)): Path<(String, String)>,
) -> Response {
    if let Some(r) = authorize(&api, &headers, Access::Read) {
        return r;
    }
    let key = sluice_api::model::ResourceKey { mesh, name };
    match api.config.proxies.get(&key) {
        Some(status) => json(StatusCode::OK, inspect(&status)),
        None => text(
            StatusCode::NOT_FOUND,
            format!("no proxy {key} has connected to this control plane\n"),
        ),
    }
}

/// The config stream, for a proxy token or the admin token. Refusals are gRPC statuses.
async fn config_stream(State(api): State<Arc<Api>>, request: axum::extract::Request) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let allowed = !token.is_empty()
        && (constant_time_eq(token, &api.admin_token)
            || api
                .proxy_token
                .as_deref()
                .is_some_and(|t| constant_time_eq(token, t)));
    if !allowed {
        return tonic::Status::unauthenticated(
            "a proxy token is required: give sluice proxy --token or SLUICE_TOKEN",
        )
        .into_http::<axum::body::Body>()
        .into_response();
    }
    api.config.clone().serve(request).await.into_response()
}

/// Serves the API and the config stream on `listener` until `shutdown` resolves: HTTP/1.1 for
/// the REST API (a client must send its request head within `header_read_timeout`, so slow
/// clients cannot hold it) and HTTP/2 for gRPC, on the same port.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    header_read_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = router(api);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower_service::Service::call(&mut app.clone(), request.map(axum::body::Body::new))
            },
        );
        tokio::spawn(async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
                .keep_alive_timeout(std::time::Duration::from_secs(10));
            let served = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}
