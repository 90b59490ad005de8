//! A control plane and `sluice proxy` processes over the config stream: each proxy gets what
//! its Dataplane uses, follows changes while open streams finish, refuses what it cannot run
//! (visible in `inspect`), keeps serving without the control plane, starts from its cache, and
//! resyncs when the control plane is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use http::{Method, StatusCode};
use support::*;

/// `api` in front of a TLS origin, verified against the test CA, with TLS version bounds.
fn tls_api(origin: &Origin, version: &str) -> String {
    mes(
        "api",
        "http",
        &[ep(origin.addr())],
        Some(&format!(
            "version: {version}\n{}",
            verification("Secured", Some("origin.test"), "")
        )),
    )
}

async fn proxy(cp: &ControlPlane, name: &str) -> Sluice {
    Sluice::builder()
        .proxy(&cp.url(), name, &cp.token("proxy"))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_get_what_they_use_and_follow_a_tls_change_while_a_stream_finishes() {
    let dir = TempDir::new("stream");
    let cp = ControlPlane::start(&dir.join("cp"), &[]).await;
    let secure = OriginBuilder::new("secure")
        .tls(TlsSettings::default())
        .start()
        .await;
    let plain = start_plain_origin("plain").await;
    let (web_port, batch_port) = (free_port(), free_port());
    cp.apply(
        &[
            tls_api(&secure, "{min: TLS13}"),
            mes("plain", "http", &[ep(plain.addr())], None),
            dataplane("web", &[(web_port, "api")]),
            dataplane("batch", &[(batch_port, "plain")]),
        ]
        .join("---\n"),
    )
    .await;
    let web = proxy(&cp, "web").await;
    let batch = proxy(&cp, "batch").await;

    assert!(serves(web_port, "origin:secure").await, "{}", web.stderr());
    assert!(secure.last_tls().unwrap().is_tls13());
    assert!(
        serves(batch_port, "origin:plain").await,
        "{}",
        batch.stderr()
    );

    // Each proxy holds its own Dataplane's services only, key material redacted.
    let status = cp.proxy_status("default", "web").await;
    let services: Vec<&String> = status["config"]["services"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(services, ["api"]);
    let ca = status["config"]["services"]["api"]["tls"]["caCert"]
        .as_str()
        .unwrap();
    assert!(ca.contains("redacted") && !ca.contains("BEGIN"), "{ca}");
    let batch_sent = cp.proxy_status("default", "batch").await["sentVersion"].clone();

    // A long response opened on the TLS 1.3 config.
    let mut long = H1Client::connect(([127, 0, 0, 1], web_port).into())
        .await
        .unwrap();
    let req = long
        .request(Method::GET, "/slow?ms=1200&chunks=12")
        .body(empty())
        .unwrap();
    let head = long.send_streaming(req).await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);

    let revision = cp.apply(&tls_api(&secure, "{max: TLS12}")).await;
    assert!(
        cp.wait_running("default", "web", revision).await,
        "web never ran revision {revision}: {}",
        web.stderr()
    );
    assert!(serves(web_port, "origin:secure").await);
    assert!(
        secure.last_tls().unwrap().is_tls12(),
        "a new connection follows the new TLS settings"
    );
    let text = collect_response(head).await.unwrap().text();
    assert_eq!(text.lines().count(), 12, "the open stream finishes: {text}");

    // batch uses nothing that changed: it was sent nothing new.
    assert_eq!(
        cp.proxy_status("default", "batch").await["sentVersion"],
        batch_sent
    );

    // The CLI shows the same, as a table and for one proxy.
    let out = cp.cli(&["inspect", "proxy", "web"]);
    let text = &out.stdout;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        text.contains(&format!("ackedVersion: {revision}")),
        "{text}"
    );
    assert!(text.contains("maxVersion: TLS12"), "{text}");
    assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
    let out = cp.cli(&["inspect", "proxy"]);
    let text = &out.stdout;
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().any(|l| l.contains(" batch ")), "{text}");

    // Once web runs a later change too, anything the first change could have sent batch has
    // been sent: still nothing.
    let later = cp.apply(&tls_api(&secure, "{min: TLS13}")).await;
    assert!(cp.wait_running("default", "web", later).await);
    assert_eq!(
        cp.proxy_status("default", "batch").await["sentVersion"],
        batch_sent
    );

    // Deleting the Dataplane takes its listener away.
    let r = cp
        .api(Method::DELETE, "/api/v1/Dataplane/default/batch", "")
        .await;
    assert_eq!(r.status, 200);
    let closed = stops_accepting(batch_port).await;
    assert!(closed, "{}", batch.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_serve_without_the_control_plane_start_from_cache_and_resync() {
    let dir = TempDir::new("resync");
    let mut cp = ControlPlane::start(&dir.join("cp"), &[]).await;
    let a = start_plain_origin("a").await;
    let b = start_plain_origin("b").await;
    let (port, later_port) = (free_port(), free_port());
    cp.apply(
        &[
            mes("a", "http", &[ep(a.addr())], None),
            mes("b", "http", &[ep(b.addr())], None),
            dataplane("web", &[(port, "a")]),
        ]
        .join("---\n"),
    )
    .await;
    let cache = dir.join("proxy-data");
    let token = cp.token("proxy");
    let mut web = Sluice::builder()
        .proxy(&cp.url(), "web", &token)
        .data_dir(&cache)
        .start()
        .await;
    assert!(serves(port, "origin:a").await);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cache.join("proxy-default-web.config"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the cache holds keys: owner only");

    cp.kill();
    assert!(serves(port, "origin:a").await, "keeps serving");
    let noticed = wait_until_async(DEFAULT_TIMEOUT, || async {
        web.admin_get("/metrics")
            .await
            .is_ok_and(|r| r.text().contains("sluice_config_stream_connected 0"))
    })
    .await;
    assert!(noticed, "{}", web.stderr());

    // A restart with no control plane serves the cached config.
    web.kill();
    let web = Sluice::builder()
        .proxy(&cp.url(), "web", &token)
        .data_dir(&cache)
        .start()
        .await;
    assert!(serves(port, "origin:a").await, "{}", web.stderr());
    assert!(web.stderr().contains("serving the cached config"));

    // The control plane comes back; a change made there reaches the proxy.
    cp.restart().await;
    let revision = cp
        .apply(&dataplane("web", &[(port, "a"), (later_port, "b")]))
        .await;
    assert!(
        cp.wait_running("default", "web", revision).await,
        "{}",
        web.stderr()
    );
    assert!(serves(later_port, "origin:b").await);
    assert!(serves(port, "origin:a").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_proxy_cannot_run_is_refused_and_shown_until_fixed() {
    let dir = TempDir::new("nack");
    let cp = ControlPlane::start(&dir.join("cp"), &[]).await;
    let a = start_plain_origin("a").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let revision = cp
        .apply(
            &[
                mes("a", "http", &[ep(a.addr())], None),
                dataplane("web", &[(taken_port, "a")]),
            ]
            .join("---\n"),
        )
        .await;
    let _web = proxy(&cp, "web").await;
    let refused = wait_until_async(DEFAULT_TIMEOUT, || async {
        cp.proxy_status("default", "web").await["nack"]["version"] == revision
    })
    .await;
    assert!(refused);
    let status = cp.proxy_status("default", "web").await;
    let reason = status["nack"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("127.0.0.1:{taken_port}")),
        "the reason names the address: {reason}"
    );

    let port = free_port();
    let fixed = cp.apply(&dataplane("web", &[(port, "a")])).await;
    assert!(cp.wait_running("default", "web", fixed).await);
    assert!(cp.proxy_status("default", "web").await["nack"].is_null());
    assert!(serves(port, "origin:a").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_proxy_token_gets_nothing() {
    let dir = TempDir::new("token");
    let reader = "reader-token-0123456789";
    std::fs::write(dir.join("read-token"), reader).unwrap();
    let read_file = dir.join("read-token");
    let cp = ControlPlane::start(
        &dir.join("cp"),
        &["--read-token-file", read_file.to_str().unwrap()],
    )
    .await;
    let a = start_plain_origin("a").await;
    let port = free_port();
    cp.apply(
        &[
            mes("a", "http", &[ep(a.addr())], None),
            dataplane("web", &[(port, "a")]),
        ]
        .join("---\n"),
    )
    .await;
    // A wrong token, and a read-only one: the stream carries keys, readers may not open it.
    for token in ["wrong-token-0123456789", reader] {
        let mut web = Sluice::builder().proxy(&cp.url(), "web", token).spawn();
        let told = wait_until(DEFAULT_TIMEOUT, || {
            web.stderr().contains("the control plane refused the token")
        })
        .await;
        assert!(told, "{}", web.stderr());
        assert_eq!(web.admin_get("/ready").await.unwrap().status, 503);
        assert!(cp.proxy_status("default", "web").await.is_null());
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err());
        web.kill();
    }
}

/// A fresh database on the test PostgreSQL server, or `None` (and a note) when there is none.
fn postgres_database(name: &str) -> Option<String> {
    let Ok(base) = std::env::var("SLUICE_TEST_POSTGRES_URL") else {
        eprintln!("skipped: no SLUICE_TEST_POSTGRES_URL (scripts/test starts a PostgreSQL server)");
        return None;
    };
    let db = format!("{name}_{}_{}", std::process::id(), free_port());
    let out = Command::new("psql")
        .arg(&base)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {db}"),
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (server, _) = base.rsplit_once('/').unwrap();
    Some(format!("{server}/{db}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_a_write_on_one_reaches_proxies_on_the_other() {
    let Some(url) = postgres_database("replicas") else {
        return;
    };
    let dir = TempDir::new("replicas");
    // Both replicas share the store and the tokens (given as files, as an operator would).
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    for (role, token) in [
        ("admin", "admin-token-0123456789"),
        ("proxy", "proxy-token-0123456789"),
    ] {
        std::fs::write(tokens.join(role), token).unwrap();
    }
    let args = [
        "--store",
        &url,
        "--auth-token-file",
        tokens.join("admin").to_str().unwrap(),
        "--proxy-token-file",
        tokens.join("proxy").to_str().unwrap(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a_dir = dir.join("a");
    let b_dir = dir.join("b");
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("admin-token"), "admin-token-0123456789").unwrap();
        std::fs::write(d.join("proxy-token"), "proxy-token-0123456789").unwrap();
    }
    let mut a = ControlPlane::start(&a_dir, &args).await;
    let b = ControlPlane::start(&b_dir, &args).await;
    let one = start_plain_origin("one").await;
    let two = start_plain_origin("two").await;
    let port = free_port();
    a.apply(
        &[
            mes("one", "http", &[ep(one.addr())], None),
            dataplane("web", &[(port, "one")]),
        ]
        .join("---\n"),
    )
    .await;
    // The proxy knows both replicas and starts on B.
    let web = Sluice::builder()
        .proxy(
            &format!("{},{}", b.url(), a.url()),
            "web",
            "proxy-token-0123456789",
        )
        .start()
        .await;
    // B follows the store on its own: the write on A reaches it within the deadline.
    assert!(
        wait_until_async(DEFAULT_TIMEOUT, || serves(port, "origin:one")).await,
        "{}",
        web.stderr()
    );

    // A write on A is enforced by the proxy on B.
    let revision = a.apply(&mes("one", "http", &[ep(two.addr())], None)).await;
    assert!(
        b.wait_running("default", "web", revision).await,
        "{}",
        web.stderr()
    );
    assert!(serves(port, "origin:two").await);

    // Losing B: the proxy moves to A, which has every write.
    drop(b);
    let moved = wait_until_async(DEFAULT_TIMEOUT, || async {
        a.proxy_status("default", "web").await["connected"] == true
    })
    .await;
    assert!(moved, "{}", web.stderr());
    let revision = a.apply(&mes("one", "http", &[ep(one.addr())], None)).await;
    assert!(a.wait_running("default", "web", revision).await);
    assert!(serves(port, "origin:one").await);
    a.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_traffic_policy_set_on_the_control_plane_reaches_every_proxy() {
    let dir = TempDir::new("policy");
    let cp = ControlPlane::start(&dir.join("cp"), &[]).await;
    let a = start_plain_origin("a").await;
    let unregistered = start_plain_origin("unregistered").await;
    cp.apply(
        &[
            mes("a", "http", &[ep(a.addr())], None),
            // Kept when the policy is changed: the command edits only passthrough.
            "type: Mesh\nname: default\nrouting:\n  zoneEgress: false\n".to_string(),
        ]
        .join("---\n"),
    )
    .await;
    let web = proxy(&cp, "web").await;
    let policy = || async {
        web.admin_get("/outbound-traffic-policy")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    };
    assert!(policy().await.contains("ALLOW_ANY"));
    let set = |mode: &str| cp.cli(&["outbound-traffic-policy", mode]);

    let out = set("restricted");
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "mesh wide outbound traffic policy is set to 'REGISTRY_ONLY'\n"
    );
    let followed = wait_until_async(DEFAULT_TIMEOUT, || async {
        policy().await.contains("REGISTRY_ONLY")
    })
    .await;
    assert!(followed, "{}", web.stderr());
    let up = unregistered.port();
    let mut s = tokio::net::TcpStream::connect(web.http_proxy_addr())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: localhost:{up}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (answer, _) = read_until_closed(&mut s).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("restricted"), "{answer}");

    let out = set("allowed");
    assert!(out.ok, "{}", out.stderr);
    let followed = wait_until_async(DEFAULT_TIMEOUT, || async {
        policy().await.contains("ALLOW_ANY")
    })
    .await;
    assert!(followed);
    let stored = cp
        .api(Method::GET, "/api/v1/Mesh/default/default", "")
        .await;
    assert_eq!(stored.status, 200);
    let mesh = stored.json();
    assert_eq!(mesh["networking"]["outbound"]["passthrough"], true);
    assert_eq!(mesh["routing"]["zoneEgress"], false, "the rest is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_run_files_and_its_api_write_the_same_store() {
    let a = start_plain_origin("a").await;
    let b = start_plain_origin("b").await;
    let (port, moved_port, api_port) = (free_port(), free_port(), free_port());
    let services = [
        mes("a", "http", &[ep(a.addr())], None),
        mes("b", "http", &[ep(b.addr())], None),
    ]
    .join("---\n");
    let sluice = Sluice::builder()
        .config(&format!(
            "{services}---\n{}",
            dataplane("web", &[(port, "a")])
        ))
        .with_api()
        .start()
        .await;
    assert!(serves(port, "origin:a").await);

    // Written through the API: served by the same process, checked against the files' resources.
    let r = sluice
        .api(
            Method::PUT,
            "/api/v1/Dataplane/default/extra",
            &dataplane("extra", &[(api_port, "b")]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        wait_until_async(DEFAULT_TIMEOUT, || serves(api_port, "origin:b")).await,
        "{}",
        sluice.stderr()
    );
    let r = sluice
        .api(
            Method::PUT,
            "/api/v1/Dataplane/default/broken",
            &dataplane("broken", &[(free_port(), "nowhere")]),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r
        .text()
        .contains("no MeshExternalService named \"nowhere\""));

    // The files change: b is no longer declared (the API's Dataplane still uses it, so that is
    // refused), then the file's Dataplane moves and b stays.
    sluice.rewrite_config(&format!(
        "{}---\n{}",
        mes("a", "http", &[ep(a.addr())], None),
        dataplane("web", &[(port, "a")])
    ));
    let refused = wait_until_async(DEFAULT_TIMEOUT, || async {
        sluice.admin_get("/metrics").await.is_ok_and(|r| {
            r.text()
                .contains("sluice_config_reloads_total{result=\"rejected\"} 1")
        })
    })
    .await;
    assert!(refused, "{}", sluice.stderr());
    assert!(sluice
        .stderr()
        .contains("no MeshExternalService named \"b\""));
    sluice.rewrite_config(&format!(
        "{services}---\n{}",
        dataplane("web", &[(moved_port, "a")])
    ));
    assert!(wait_until_async(DEFAULT_TIMEOUT, || serves(moved_port, "origin:a")).await);
    assert!(
        serves(api_port, "origin:b").await,
        "the API's resources stay"
    );
    let closed = stops_accepting(port).await;
    assert!(closed);

    // A resource dropped from the files is dropped from the store.
    let r = sluice
        .api(Method::DELETE, "/api/v1/Dataplane/default/extra", "")
        .await;
    assert_eq!(r.status, 200);
    sluice.rewrite_config(&format!(
        "{}---\n{}",
        mes("a", "http", &[ep(a.addr())], None),
        dataplane("web", &[(moved_port, "a")])
    ));
    let gone = service_gone(&sluice, "b").await;
    assert!(gone, "{}", sluice.stderr());
}

/// SIGHUP writes the files again even when they did not change, so it restores what they
/// declare after an API write removed it; the file watch (an hour here) plays no part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_writes_unchanged_files_again() {
    let a = start_plain_origin("a").await;
    let port = free_port();
    let sluice = Sluice::builder()
        .config(
            &[
                mes("a", "http", &[ep(a.addr())], None),
                dataplane("web", &[(port, "a")]),
            ]
            .join("---\n"),
        )
        .args(["--watch-interval", "1h"])
        .with_api()
        .start()
        .await;
    assert!(serves(port, "origin:a").await);
    let r = sluice
        .api(Method::DELETE, "/api/v1/Dataplane/default/web", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(stops_accepting(port).await, "{}", sluice.stderr());
    sluice.sighup();
    assert!(
        wait_until_async(DEFAULT_TIMEOUT, || serves(port, "origin:a")).await,
        "{}",
        sluice.stderr()
    );
}

/// When the record of what the files declared cannot be written (here the path is a
/// directory), it is kept in memory: a resource dropped from the files is still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_followed_when_their_record_cannot_be_written() {
    let a = start_plain_origin("a").await;
    let b = start_plain_origin("b").await;
    let data = TempDir::new("unrecorded");
    std::fs::create_dir_all(data.join("run-files.json")).unwrap();
    let sluice = Sluice::builder()
        .config(
            &[
                mes("a", "http", &[ep(a.addr())], None),
                mes("b", "http", &[ep(b.addr())], None),
            ]
            .join("---\n"),
        )
        .data_dir(data.path())
        .with_api()
        .start()
        .await;
    let r = sluice
        .api(Method::GET, "/api/v1/MeshExternalService/default/b", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(sluice
        .stderr()
        .contains("cannot record which resources the files declare"));
    sluice.rewrite_config(&mes("a", "http", &[ep(a.addr())], None));
    let gone = service_gone(&sluice, "b").await;
    assert!(gone, "{}", sluice.stderr());
    let r = sluice
        .api(Method::GET, "/api/v1/MeshExternalService/default/a", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Whether the API stops finding the MeshExternalService `name` within the default timeout.
async fn service_gone(sluice: &Sluice, name: &str) -> bool {
    let path = format!("/api/v1/MeshExternalService/default/{name}");
    wait_until_async(DEFAULT_TIMEOUT, || async {
        sluice.api(Method::GET, &path, "").await.status == 404
    })
    .await
}
