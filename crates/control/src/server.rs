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
use sluice_api::{identify, parse_documents, Severity};
use sluice_store::{Key, Outcome, Store, StoreError};

/// Request bodies larger than this get 413: no resource is anywhere near it.
pub const MAX_BODY: usize = 1024 * 1024;

/// The kinds the API stores.
pub const KINDS: &[&str] = &["MeshExternalService", "Dataplane", "Secret", "Mesh"];

pub struct Api {
    pub store: Store,
    pub admin_token: String,
    pub read_token: Option<String>,
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
    if let Err(problems) = check(&api.store, &key, body).await {
        return text(StatusCode::UNPROCESSABLE_ENTITY, problems.join("\n") + "\n");
    }
    match api.store.put(&key, body, expected).await {
        Ok((outcome, stored)) => json(
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
            }),
        ),
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
    match api.store.delete(&key).await {
        Ok(true) => text(StatusCode::OK, "deleted\n"),
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
    let mut items = Vec::with_capacity(docs.len());
    for doc in &docs {
        match identify(doc) {
            Some((kind, key)) if KINDS.contains(&kind) => items.push((
                Key {
                    kind: kind.to_string(),
                    mesh: key.mesh,
                    name: key.name,
                },
                doc.value.to_string(),
            )),
            // Unreadable documents get their errors from the full check below.
            _ => {}
        }
    }
    let keys: Vec<&Key> = items.iter().map(|(k, _)| k).collect();
    match check_all(&api.store, &keys, docs).await {
        Ok(()) => {}
        Err(problems) => return text(StatusCode::UNPROCESSABLE_ENTITY, problems.join("\n") + "\n"),
    }
    match api.store.put_all(&items).await {
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
            }),
        ),
        Err(e) => store_error(e),
    }
}

/// Checks `docs` (sources `request[N]`) together with every stored resource they do not replace.
async fn check_all(
    store: &Store,
    replaced: &[&Key],
    mut docs: Vec<sluice_api::Document>,
) -> Result<(), Vec<String>> {
    let sources: std::collections::HashSet<String> =
        docs.iter().map(|d| d.doc.source.to_string()).collect();
    for kind in KINDS {
        let stored = store
            .list(kind, None)
            .await
            .map_err(|e| vec![e.to_string()])?;
        for s in stored.iter().filter(|s| !replaced.contains(&&s.key)) {
            let name = format!("{}/{}/{}", s.key.kind, s.key.mesh, s.key.name);
            if let Ok(more) = parse_documents(&name, &s.body) {
                docs.extend(more);
            }
        }
    }
    let loaded = sluice_api::load(&docs);
    let problems: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| {
            d.severity == Severity::Error
                && d.doc.as_ref().is_some_and(|r| sources.contains(&*r.source))
        })
        .map(|d| d.to_string())
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Checks `body` as the resource at `key`, together with everything else stored: the same
/// rules and messages as `sluice validate`, for this document only.
async fn check(store: &Store, key: &Key, body: &str) -> Result<(), Vec<String>> {
    let source = format!("{}/{}/{}", key.kind, key.mesh, key.name);
    let docs = parse_documents(&source, body).map_err(|e| vec![e.to_string()])?;
    if docs.len() != 1 {
        return Err(vec![format!(
            "{source}: the body must hold exactly one resource, found {}",
            docs.len()
        )]);
    }
    match identify(&docs[0]) {
        Some((kind, declared))
            if kind != key.kind || declared.mesh != key.mesh || declared.name != key.name =>
        {
            return Err(vec![format!(
                "{source}: the body declares {kind} {}/{}; send it to /api/v1/{kind}/{}/{}",
                declared.mesh, declared.name, declared.mesh, declared.name
            )])
        }
        _ => {}
    }
    check_all(store, &[key], docs).await
}
