//! The control plane's REST API: create or replace, get, list and delete resources, each checked
//! exactly as `sluice validate` checks files, against everything already stored.
//!
//! `PUT /api/v1/{kind}/{mesh}/{name}` with the resource as YAML or JSON; `If-Match: VERSION` makes
//! the write conditional (409 when stale). `GET` the same path for one resource (its version in
//! the `resource-version` header), `GET /api/v1/{kind}[?mesh=M]` for a list, `DELETE` to remove.
//! Every request needs `Authorization: Bearer TOKEN`; the read-only token may only read.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sluice_api::{parse_documents, Parsed, Severity};
use sluice_store::{Change, Key, Outcome, Store, StoreError, Written};

use crate::catalog::Catalog;
use crate::config_server::{inspect, ConfigServer};
use crate::naming::Status;

/// Where the store keeps a resource of `kind` at `key`.
fn store_key(kind: &str, key: &sluice_api::model::ResourceKey) -> Key {
    Key {
        kind: kind.to_string(),
        mesh: key.mesh.clone(),
        name: key.name.clone(),
    }
}

/// One document made ready to write: its parsed form, which the check reads, and the body the
/// store keeps (none when the document does not say what it is; the check reports why).
pub struct Prepared {
    parsed: Parsed,
    change: Option<Change>,
}

impl Prepared {
    pub fn new(doc: &sluice_api::Document) -> Self {
        let parsed = sluice_api::parse(doc);
        let change = parsed.identity().map(|(kind, key)| Change {
            key: store_key(kind, key),
            body: Some(doc.value.to_string()),
            expected_version: None,
        });
        Self { parsed, change }
    }

    /// Where the resource it declares is stored.
    pub fn key(&self) -> Option<&Key> {
        self.change.as_ref().map(|c| &c.key)
    }
}

/// Why a write was not done.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Every problem, one line each, as `sluice validate` says them.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(StoreError),
    /// Other writes kept coming between this one's check and its write.
    #[error("other writes kept changing the store while this one was checked; try again")]
    Busy,
}

/// How many times a write is checked again when another write came first.
const WRITE_ATTEMPTS: usize = 5;

/// Request bodies larger than this get 413: no resource is anywhere near it.
pub const MAX_BODY: usize = 1024 * 1024;

/// The kinds the API stores: every kind a resource may have.
pub use sluice_api::resource::KINDS;

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
        vip_range: sluice_api::model::Cidr,
    ) -> Result<Arc<Api>, StoreError> {
        let store = Arc::new(store);
        let catalog = Arc::new(Catalog::load_with(&store, vip_range).await?);
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
    ) -> Result<Vec<Written>, Refused> {
        let prepared = docs.iter().map(Prepared::new).collect();
        // The documents as parsed from YAML are several times the size of what is kept of them.
        drop(docs);
        self.write_prepared(prepared, remove).await
    }

    /// [`Api::write_documents`] for documents already prepared, which lets a large set be read
    /// one file at a time.
    pub async fn write_prepared(
        &self,
        docs: Vec<Prepared>,
        remove: &[Key],
    ) -> Result<Vec<Written>, Refused> {
        let (parsed, changes): (Vec<Parsed>, Vec<Option<Change>>) =
            docs.into_iter().map(|d| (d.parsed, d.change)).unzip();
        // Unreadable documents have no change; they get their errors from the check.
        let changes: Vec<Change> = changes
            .into_iter()
            .flatten()
            .chain(remove.iter().map(|key| Change {
                key: key.clone(),
                body: None,
                expected_version: None,
            }))
            .collect();
        self.check_and_write(parsed, changes).await
    }

    /// Checks `new` (the documents of `changes`) against the store as the catalog holds it,
    /// writes `changes` only if the store is still at the revision checked, and publishes them.
    /// When another write came first, the check is made again against what it wrote.
    async fn check_and_write(
        &self,
        new: Vec<Parsed>,
        changes: Vec<Change>,
    ) -> Result<Vec<Written>, Refused> {
        let replaced: HashSet<&Key> = changes.iter().map(|c| &c.key).collect();
        for _ in 0..WRITE_ATTEMPTS {
            let checked = check_all(self, &replaced, &new).await?;
            let held = self.catalog.hold().await;
            match self
                .store
                .write(&changes, Some(checked.before.revision))
                .await
            {
                Ok(written) => {
                    // Checked and written: the catalog parses the stored bodies for itself.
                    drop(new);
                    self.publish(held, checked, changes, &written).await;
                    return Ok(written);
                }
                Err(StoreError::Stale { .. }) => continue,
                Err(e) => return Err(Refused::Store(e)),
            }
        }
        Err(Refused::Busy)
    }

    /// Publishes a checked write at once, with the registry its check resolved. Takes the
    /// changes so that their bodies go as soon as the catalog has read them.
    async fn publish(
        &self,
        held: crate::catalog::Held<'_>,
        checked: Checked,
        changes: Vec<Change>,
        written: &[Written],
    ) {
        let written: Vec<_> = changes
            .into_iter()
            .zip(written)
            .filter_map(|(change, w)| Some((change.key, change.body, w.revision()?)))
            .collect();
        let published = match checked.registry {
            Some(registry) => {
                self.catalog
                    .commit(held, &self.store, &checked.before, written, registry)
                    .await
            }
            None => self.catalog.sync_held(held, &self.store).await,
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

/// Who a request's bearer token says it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Reader,
    Proxy,
}

fn role(api: &Api, headers: &HeaderMap) -> Option<Role> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())?;
    let is = |candidate: Option<&str>| candidate.is_some_and(|c| constant_time_eq(token, c));
    if is(Some(&api.admin_token)) {
        Some(Role::Admin)
    } else if is(api.read_token.as_deref()) {
        Some(Role::Reader)
    } else if is(api.proxy_token.as_deref()) {
        Some(Role::Proxy)
    } else {
        None
    }
}

fn authorize(api: &Api, headers: &HeaderMap, access: Access) -> Option<Response> {
    match (role(api, headers), access) {
        (Some(Role::Admin), _) | (Some(Role::Reader), Access::Read) => None,
        (Some(Role::Reader), Access::Write) => Some(text(
            StatusCode::FORBIDDEN,
            "this token may only read; use an admin token to change resources\n",
        )),
        // The proxy token opens the config stream and nothing else.
        (Some(Role::Proxy) | None, _) => Some(text(
            StatusCode::UNAUTHORIZED,
            "a valid token is required: Authorization: Bearer TOKEN\n",
        )),
    }
}

/// Token comparison that takes the same time wherever the first difference is.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
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

/// The answer to a refused write; `invalid` is the status for problems with it.
fn refused(r: Refused, invalid: StatusCode, preface: &str) -> Response {
    match r {
        Refused::Invalid(problems) => text(invalid, format!("{preface}{}\n", problems.join("\n"))),
        Refused::Store(e) => store_error(e),
        busy @ Refused::Busy => text(StatusCode::SERVICE_UNAVAILABLE, format!("{busy}\n")),
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
    let reader = role(&api, &headers) == Some(Role::Reader);
    match api.store.get(&key).await {
        Ok(Some(s)) => {
            let body = if reader {
                without_keys(&s.body)
            } else {
                s.body
            };
            let status = api.catalog.view().status.get(&key).map(Status::to_json);
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/yaml".to_string()),
                    (
                        header::HeaderName::from_static("resource-version"),
                        s.version.to_string(),
                    ),
                ],
                match status {
                    Some(status) => with_status(&body, status),
                    None => body,
                },
            )
                .into_response()
        }
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("no {} {}/{}\n", key.kind, key.mesh, key.name),
        ),
        Err(e) => store_error(e),
    }
}

/// A stored body with the `status` the control plane keeps for it: the body as written with
/// one `status:` line after it (JSON is YAML too), or, where that would not be one mapping
/// (a flow-style body, or one carrying its own `status`), the whole document as JSON.
fn with_status(body: &str, status: serde_json::Value) -> String {
    let Ok(Some(mut doc)) = parse_documents("stored", body).map(|mut docs| docs.pop()) else {
        return body.to_string();
    };
    let Some(map) = doc.value.as_object_mut() else {
        return body.to_string();
    };
    let block = !body.trim_start().starts_with('{') && !map.contains_key("status");
    if block {
        let mut out = body.to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("status: {status}\n"));
        return out;
    }
    map.insert("status".to_string(), status);
    doc.value.to_string() + "\n"
}

/// Fields that hold private keys: a Secret's data, a client key's source.
const KEY_FIELDS: &[&str] = &["data", "clientKey"];

/// A stored body as the read-only token may see it: every private key replaced by
/// `<redacted>` (the body as JSON, which is YAML too).
fn without_keys(body: &str) -> String {
    fn redact(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (field, v) in map.iter_mut() {
                    if KEY_FIELDS.contains(&field.as_str()) {
                        *v = serde_json::Value::String("<redacted>".into());
                    } else {
                        redact(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
            _ => {}
        }
    }
    match parse_documents("stored", body).map(|mut docs| docs.pop()) {
        Ok(Some(mut doc)) => {
            redact(&mut doc.value);
            doc.value.to_string() + "\n"
        }
        // Everything stored was read before; nothing is shown if it cannot be read now.
        _ => "<redacted>\n".to_string(),
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
    let parsed = match check_body(&key, body) {
        Ok(p) => p,
        Err(problem) => return text(StatusCode::UNPROCESSABLE_ENTITY, problem + "\n"),
    };
    let change = Change {
        key,
        body: Some(body.to_string()),
        expected_version: expected,
    };
    match api.check_and_write(vec![parsed], vec![change]).await {
        Ok(written) => match written.as_slice() {
            [Written::Put(outcome, stored)] => json(
                if *outcome == Outcome::Created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                serde_json::json!({
                    "result": outcome.as_str(),
                    "resourceVersion": stored.version,
                    "revision": stored.revision,
                }),
            ),
            _ => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the store answered a put with no put\n",
            ),
        },
        Err(r) => refused(r, StatusCode::UNPROCESSABLE_ENTITY, ""),
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
    let change = Change {
        key: key.clone(),
        body: None,
        expected_version: None,
    };
    match api.check_and_write(Vec::new(), vec![change]).await {
        Ok(written) if matches!(written.as_slice(), [Written::Deleted { .. }]) => {
            text(StatusCode::OK, "deleted\n")
        }
        Ok(_) => text(StatusCode::NOT_FOUND, format!("no {key}\n")),
        Err(r) => refused(
            r,
            StatusCode::CONFLICT,
            &format!("{key} is still needed:\n"),
        ),
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
        Ok(written) => json(
            StatusCode::OK,
            serde_json::json!({
                "results": written.iter().filter_map(|w| match w {
                    Written::Put(outcome, s) => Some(serde_json::json!({
                        "kind": s.key.kind,
                        "mesh": s.key.mesh,
                        "name": s.key.name,
                        "result": outcome.as_str(),
                        "resourceVersion": s.version,
                    })),
                    _ => None,
                }).collect::<Vec<_>>(),
                "revision": written.iter().filter_map(Written::revision).max().unwrap_or(0),
            }),
        ),
        Err(r) => refused(r, StatusCode::UNPROCESSABLE_ENTITY, ""),
    }
}

/// Checks `docs` (sources `request[N]`) together with every stored resource they do not replace,
/// as the catalog holds them at the store's latest revision. Problems in the documents are
/// reported, and so are new problems in stored resources: a write never breaks what is stored.
async fn check_all(
    api: &Api,
    replaced: &HashSet<&Key>,
    new: &[Parsed],
) -> Result<Checked, Refused> {
    let sources: std::collections::HashSet<String> =
        new.iter().map(|p| p.doc.source.to_string()).collect();
    let view = api.catalog.sync(&api.store).await.map_err(Refused::Store)?;
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
        Err(Refused::Invalid(problems))
    }
}

/// A write that passed its check: the view it was checked against and the registry it makes.
struct Checked {
    before: Arc<crate::catalog::View>,
    registry: Option<sluice_api::Registry>,
}

/// `body` read as the one resource at `key`; the problem if it is not that.
fn check_body(key: &Key, body: &str) -> Result<Parsed, String> {
    let source = format!("{}/{}/{}", key.kind, key.mesh, key.name);
    let docs = parse_documents(&source, body).map_err(|e| e.to_string())?;
    let [doc] = docs.as_slice() else {
        return Err(format!(
            "{source}: the body must hold exactly one resource, found {}",
            docs.len()
        ));
    };
    let parsed = sluice_api::parse(doc);
    if let Some((kind, declared)) = parsed.identity() {
        if store_key(kind, declared) != *key {
            return Err(format!(
                "{source}: the body declares {kind} {declared}; send it to /api/v1/{kind}/{declared}"
            ));
        }
    }
    Ok(parsed)
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
    let allowed = matches!(
        role(&api, request.headers()),
        Some(Role::Admin | Role::Proxy)
    );
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
