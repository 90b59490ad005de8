//! The admin endpoint: `/ready`, `/metrics` and `/config_dump`, on loopback by default, and
//! `/outbound-traffic-policy`, which may be changed only with the token it was given: loopback is
//! shared with the apps the policy restricts.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::policy::Mode;
use crate::runtime::Proxy;

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, token: Option<String>) {
    let token: Arc<Option<String>> = Arc::new(token);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: back off rather than spin.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                let token = token.clone();
                async move { Ok::<_, Infallible>(route(req, &proxy, token.as_deref()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(
    req: Request<Incoming>,
    proxy: &Proxy,
    token: Option<&str>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/outbound-traffic-policy" {
        return outbound_traffic_policy(req, proxy, token).await;
    }
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/ready" => match proxy.current() {
            Some(_) if proxy.started() => text(StatusCode::OK, "ready\n".into()),
            Some(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "listeners not open yet\n".into(),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration applied yet\n".into(),
            ),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, proxy.metrics().encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/config_dump" => {
            let body = serde_json::to_string_pretty(&proxy.current())
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
            let mut r = text(StatusCode::OK, body + "\n");
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /metrics or /config_dump\n".into(),
        ),
    }
}

/// GET shows the mode; PUT with `allowed` or `restricted` (or Istio's names) changes it live.
async fn outbound_traffic_policy(
    req: Request<Incoming>,
    proxy: &Proxy,
    token: Option<&str>,
) -> Response<Full<Bytes>> {
    let answer = |mode: Mode| {
        text(
            StatusCode::OK,
            format!(
                "mesh wide outbound traffic policy is set to '{}'\n",
                mode.istio_name()
            ),
        )
    };
    match *req.method() {
        Method::GET => answer(proxy.outbound_traffic_policy().await),
        Method::PUT => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let allowed = matches!((given, token), (Some(g), Some(t)) if sluice_control::server::constant_time_eq(g, t));
            if !allowed {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "changing the policy needs the token: Authorization: Bearer TOKEN (sluice run's admin token, or sluice proxy's --token)\n".into(),
                );
            }
            let body = match http_body_util::Limited::new(req.into_body(), 64)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n".into()),
            };
            let mode: Mode = match String::from_utf8_lossy(&body).trim().parse() {
                Ok(m) => m,
                Err(problem) => {
                    return text(StatusCode::UNPROCESSABLE_ENTITY, format!("{problem}\n"))
                }
            };
            proxy.set_outbound_traffic_policy(mode).await;
            tracing::info!(mode = mode.istio_name(), "outbound traffic policy changed");
            answer(mode)
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
