//! The REST API over real HTTP on loopback, with a real SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sluice_control::server::{router, Api, MAX_BODY};
use sluice_store::Store;

struct Server {
    addr: SocketAddr,
    dir: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start() -> Server {
    let dir = std::env::temp_dir().join(format!(
        "sluice-api-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.join("db").display()))
        .await
        .unwrap();
    let api = Api::start(
        store,
        "admin-secret".into(),
        Some("reader-secret".into()),
        Some("proxy-secret".into()),
        sluice_api::model::Cidr::parse(sluice_control::vip::DEFAULT_RANGE).unwrap(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router(api)).await.unwrap();
    });
    Server { addr, dir, task }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

async fn send(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    send_bytes(server, method, path, token, body.as_bytes().to_vec(), &[]).await
}

async fn send_bytes(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> Answer {
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "control-plane");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

const API: &str = "type: MeshExternalService
name: api
mesh: default
spec:
  match: {port: 443, protocol: http}
  endpoints: [{address: api.example.com, port: 443}]
";

const ADMIN: Option<&str> = Some("admin-secret");

#[tokio::test]
async fn writes_report_created_configured_unchanged_and_reads_return_the_version() {
    let s = start().await;
    let path = "/api/v1/MeshExternalService/default/api";
    let a = send(&s, "PUT", path, ADMIN, API).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            201,
            "{\"resourceVersion\":1,\"result\":\"created\",\"revision\":1}\n"
        )
    );
    let a = send(&s, "PUT", path, ADMIN, API).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            200,
            "{\"resourceVersion\":1,\"result\":\"unchanged\",\"revision\":1}\n"
        )
    );
    let changed = API.replace("port: 443}]", "port: 8443}]");
    let a = send(&s, "PUT", path, ADMIN, &changed).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            200,
            "{\"resourceVersion\":2,\"result\":\"configured\",\"revision\":2}\n"
        )
    );
    let a = send(&s, "GET", path, ADMIN, "").await;
    assert_eq!(a.status, 200);
    // The body as written, then the status the control plane keeps: its name and VIP.
    let (body, status) = a.body.split_at(changed.len());
    assert_eq!(body, changed);
    let status: serde_json::Value =
        serde_json::from_str(status.strip_prefix("status: ").unwrap()).unwrap();
    assert_eq!(status["vip"]["ip"], "242.0.0.1");
    assert_eq!(status["addresses"][0]["hostname"], "api.extsvc.mesh.local");
    assert_eq!(a.headers["resource-version"], "2");
    let a = send(&s, "GET", "/api/v1/MeshExternalService", ADMIN, "").await;
    assert_eq!(
        a.body,
        "{\"items\":[{\"mesh\":\"default\",\"name\":\"api\",\"resourceVersion\":2}],\"kind\":\"MeshExternalService\"}\n"
    );
    let a = send(&s, "DELETE", path, ADMIN, "").await;
    assert_eq!(a.status, 200);
    let a = send(&s, "DELETE", path, ADMIN, "").await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn invalid_resources_get_422_with_the_validate_messages_and_nothing_is_stored() {
    let s = start().await;
    let bad = API.replace("port: 443}]", "port: 70000}]");
    let a = send(
        &s,
        "PUT",
        "/api/v1/MeshExternalService/default/api",
        ADMIN,
        &bad,
    )
    .await;
    assert_eq!(a.status, 422);
    assert_eq!(
        a.body,
        "MeshExternalService/default/api[0] spec.endpoints[0].port: must be between 1 and 65535\n"
    );
    let dp = "type: Dataplane
name: app
networking:
  outbound:
    - port: 10080
      backendRef: {kind: MeshExternalService, name: api}
";
    let a = send(&s, "PUT", "/api/v1/Dataplane/default/app", ADMIN, dp).await;
    assert_eq!(a.status, 422);
    assert!(
        a.body.contains("no MeshExternalService named \"api\""),
        "{}",
        a.body
    );
    assert_eq!(
        send(&s, "GET", "/api/v1/Dataplane/default/app", ADMIN, "")
            .await
            .status,
        404
    );
    // Checked against what is stored: once the service exists, the Dataplane is accepted.
    assert_eq!(
        send(
            &s,
            "PUT",
            "/api/v1/MeshExternalService/default/api",
            ADMIN,
            API
        )
        .await
        .status,
        201
    );
    assert_eq!(
        send(&s, "PUT", "/api/v1/Dataplane/default/app", ADMIN, dp)
            .await
            .status,
        201
    );
    // The path and the body must name the same resource.
    let a = send(
        &s,
        "PUT",
        "/api/v1/MeshExternalService/default/other",
        ADMIN,
        API,
    )
    .await;
    assert_eq!(a.status, 422);
    assert!(
        a.body
            .contains("send it to /api/v1/MeshExternalService/default/api"),
        "{}",
        a.body
    );
    // Nor may a write break what is stored: the Dataplane still uses the service.
    let a = send(
        &s,
        "DELETE",
        "/api/v1/MeshExternalService/default/api",
        ADMIN,
        "",
    )
    .await;
    assert_eq!(a.status, 409);
    assert_eq!(
        a.body,
        "MeshExternalService default/api is still needed:\nDataplane/default/app[0] networking.outbound[0].backendRef.name: no MeshExternalService named \"api\" in mesh \"default\"; define it or fix the name (stored; this change would break it)\n"
    );
    let renamed = API.replace("name: api", "name: api2");
    let a = send(
        &s,
        "POST",
        "/api/v1/apply",
        ADMIN,
        &format!("{renamed}---\ntype: Dataplane\nname: app\nnetworking:\n  outbound:\n    - port: 10080\n      backendRef: {{kind: MeshExternalService, name: api2}}\n"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        send(
            &s,
            "DELETE",
            "/api/v1/MeshExternalService/default/api",
            ADMIN,
            ""
        )
        .await
        .status,
        200,
        "once nothing uses it"
    );
}

#[tokio::test]
async fn stale_writes_oversized_bodies_and_unknown_kinds() {
    let s = start().await;
    let path = "/api/v1/MeshExternalService/default/api";
    assert_eq!(send(&s, "PUT", path, ADMIN, API).await.status, 201);
    let changed = API.replace("port: 443}]", "port: 8443}]");
    let a = send_bytes(
        &s,
        "PUT",
        path,
        ADMIN,
        changed.clone().into_bytes(),
        &[("if-match", "7")],
    )
    .await;
    assert_eq!(a.status, 409);
    assert!(a.body.contains("is at version 1, not 7"), "{}", a.body);
    let a = send_bytes(
        &s,
        "PUT",
        path,
        ADMIN,
        changed.into_bytes(),
        &[("if-match", "1")],
    )
    .await;
    assert_eq!(a.status, 200);

    let huge = vec![b'#'; MAX_BODY + 1];
    let a = send_bytes(&s, "PUT", path, ADMIN, huge, &[]).await;
    assert_eq!(a.status, 413);

    let a = send(&s, "GET", "/api/v1/NoSuchKind", ADMIN, "").await;
    assert_eq!(a.status, 404);
    assert_eq!(
        a.body,
        format!(
            "unknown kind \"NoSuchKind\"; kinds are {}\n",
            sluice_api::resource::KINDS.join(", ")
        )
    );
    assert!(a
        .body
        .contains("MeshExternalService, ExternalService, Dataplane"));
}

#[tokio::test]
async fn tokens_decide_who_may_read_and_write() {
    let s = start().await;
    let path = "/api/v1/MeshExternalService/default/api";
    assert_eq!(send(&s, "PUT", path, ADMIN, API).await.status, 201);
    for token in [None, Some("wrong"), Some("")] {
        let a = send(&s, "GET", path, token, "").await;
        assert_eq!(a.status, 401, "{token:?}");
        assert!(!a.body.contains("api.example.com"));
        let a = send(&s, "GET", "/api/v1/ServiceEntry", token, "").await;
        assert_eq!(a.status, 401, "unknown kinds are not revealed either");
    }
    let reader = Some("reader-secret");
    assert_eq!(send(&s, "GET", path, reader, "").await.status, 200);
    assert_eq!(
        send(&s, "GET", "/api/v1/MeshExternalService", reader, "")
            .await
            .status,
        200
    );
    assert_eq!(send(&s, "PUT", path, reader, API).await.status, 403);
    assert_eq!(send(&s, "DELETE", path, reader, "").await.status, 403);
    assert_eq!(send(&s, "GET", path, ADMIN, "").await.status, 200);
    // The proxy token opens the config stream only.
    assert_eq!(
        send(&s, "GET", path, Some("proxy-secret"), "").await.status,
        401
    );

    // Private keys are not for the read-only token: a Secret's data and a client key.
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJsMjwdxFvtuoam5BwGhJ8QqbUDqAZm91ZOUVCT7HDLM\n-----END PRIVATE KEY-----\n";
    let secret = format!("type: Secret\nname: key\ndata: {}\n", base64_of(pem));
    assert_eq!(
        send(&s, "PUT", "/api/v1/Secret/default/key", ADMIN, &secret)
            .await
            .status,
        201
    );
    let a = send(&s, "GET", "/api/v1/Secret/default/key", reader, "").await;
    assert_eq!(a.status, 200);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["data"], "<redacted>");
    assert_eq!(v["name"], "key");
    let a = send(&s, "GET", "/api/v1/Secret/default/key", ADMIN, "").await;
    assert_eq!(a.body, secret, "the admin reads it as written");
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Every path and method the document describes is served, every status the server gave in
/// these tests is documented for its operation, and the document itself is served.
#[tokio::test]
async fn the_openapi_document_matches_the_server() {
    let s = start().await;
    let used = format!(
        "{}---\ntype: Dataplane\nname: user\nnetworking:\n  outbound:\n    - port: 10090\n      backendRef: {{kind: MeshExternalService, name: used}}\n",
        API.replace("name: api", "name: used")
    );
    assert_eq!(
        send(&s, "POST", "/api/v1/apply", ADMIN, &used).await.status,
        200
    );
    let a = send(&s, "GET", "/openapi.json", None, "").await;
    assert_eq!(a.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut described = Vec::new();
    for (path, item) in paths {
        for method in ["get", "put", "delete", "post", "patch"] {
            if item.get(method).is_some() {
                described.push((path.clone(), method.to_uppercase()));
            }
        }
    }
    described.sort();
    assert_eq!(
        described,
        [
            ("/api/v1/apply".to_string(), "POST".to_string()),
            ("/api/v1/proxies".to_string(), "GET".to_string()),
            (
                "/api/v1/proxies/{mesh}/{name}".to_string(),
                "GET".to_string()
            ),
            ("/api/v1/{kind}".to_string(), "GET".to_string()),
            (
                "/api/v1/{kind}/{mesh}/{name}".to_string(),
                "DELETE".to_string()
            ),
            (
                "/api/v1/{kind}/{mesh}/{name}".to_string(),
                "GET".to_string()
            ),
            (
                "/api/v1/{kind}/{mesh}/{name}".to_string(),
                "PUT".to_string()
            ),
        ]
    );
    let documented = |path: &str, method: &str, status: u16| {
        paths[path][method]["responses"]
            .get(status.to_string())
            .is_some()
    };
    let one = "/api/v1/{kind}/{mesh}/{name}";
    let p = "/api/v1/MeshExternalService/default/api";
    let used = "/api/v1/MeshExternalService/default/used";
    // (documented path, method, request path, token, body, the status it must get)
    type Row<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, &'a str, u16);
    let cases: &[Row] = &[
        (one, "PUT", p, ADMIN, API, 201),
        (one, "PUT", p, ADMIN, API, 200),
        (one, "PUT", p, ADMIN, "not: [valid", 422),
        (one, "PUT", p, Some("reader-secret"), API, 403),
        (one, "PUT", p, None, API, 401),
        (one, "GET", p, ADMIN, "", 200),
        (one, "GET", "/api/v1/Mesh/default/none", ADMIN, "", 404),
        ("/api/v1/{kind}", "GET", "/api/v1/Secret", ADMIN, "", 200),
        ("/api/v1/{kind}", "GET", "/api/v1/Nope", ADMIN, "", 404),
        (one, "DELETE", p, ADMIN, "", 200),
        (one, "DELETE", p, ADMIN, "", 404),
        (one, "DELETE", used, ADMIN, "", 409),
        ("/api/v1/apply", "POST", "/api/v1/apply", ADMIN, API, 200),
        (
            "/api/v1/apply",
            "POST",
            "/api/v1/apply",
            ADMIN,
            "kind: Nope",
            422,
        ),
        ("/api/v1/apply", "POST", "/api/v1/apply", None, API, 401),
        ("/api/v1/proxies", "GET", "/api/v1/proxies", ADMIN, "", 200),
        ("/api/v1/proxies", "GET", "/api/v1/proxies", None, "", 401),
        (
            "/api/v1/proxies/{mesh}/{name}",
            "GET",
            "/api/v1/proxies/default/none",
            ADMIN,
            "",
            404,
        ),
    ];
    for (path, method, request, token, body, want) in cases {
        let got = send(&s, method, request, *token, body).await.status;
        assert_eq!(got, *want, "{method} {request}");
        assert!(
            documented(path, &method.to_lowercase(), got),
            "{method} {path} answered {got}, which is not documented"
        );
    }
}
