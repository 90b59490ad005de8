//! Checks the integration-test harness itself: every origin is driven
//! directly by the client helpers (no proxy in between).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode, Version};
use rustls::ProtocolVersion;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SHORT: Duration = Duration::from_secs(5);

#[test]
fn pki_material_is_consistent() {
    let p = pki();
    for ck in [
        &p.ca,
        &p.origin,
        &p.uri_only,
        &p.client,
        &p.other_ca,
        &p.other_origin,
        &p.other_client,
    ] {
        assert!(ck.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ck.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(p.identify(&ck.cert_der), Some(ck.name));
    }
    assert_eq!(p.ca_pem(), p.ca.cert_pem);
    assert_ne!(p.ca.cert_der, p.other_ca.cert_der);
    // The same process-wide PKI every time.
    assert!(std::ptr::eq(pki(), p));
}

#[tokio::test]
async fn tls_origin_http1_keep_alive_and_routes() {
    let origin = start_tls_origin("alpha").await;
    let cfg = client_tls_config(&["http/1.1"]);
    let mut c = H1Client::connect_tls(origin.addr(), "origin.test", cfg)
        .await
        .unwrap();

    let r = c.get("/").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "origin:alpha");
    assert_eq!(r.header("x-origin"), Some("alpha"));
    assert_eq!(r.version, Version::HTTP_11);

    let r = c.post("/echo", "hello body").await.unwrap();
    assert_eq!(r.text(), "hello body");

    let req = c
        .request(Method::GET, "/headers")
        .header("x-test", "one")
        .body(empty())
        .unwrap();
    let r = c.send(req).await.unwrap();
    let json = r.json();
    assert_eq!(json["x-test"], "one");
    assert_eq!(json["host"], format!("origin.test:{}", origin.port()));

    let r = c.get("/status/418").await.unwrap();
    assert_eq!(r.status.as_u16(), 418);
    assert!(r.body.is_empty());

    // All on one connection, one handshake.
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.handshakes(), 1);
    let reqs = origin.requests();
    assert_eq!(reqs.len(), 4);
    assert!(reqs.iter().all(|r| r.conn_id == reqs[0].conn_id));
    assert_eq!(origin.request_connections(), 1);
    assert_eq!(reqs[1].method, Method::POST);
    assert_eq!(reqs[1].path, "/echo");
    assert_eq!(reqs[0].version, Version::HTTP_11);
    assert_eq!(
        reqs[0].host.as_deref(),
        Some(format!("origin.test:{}", origin.port()).as_str())
    );
    assert_eq!(reqs[0].authority, None);

    let tls = origin.last_tls().unwrap();
    assert_eq!(tls.sni.as_deref(), Some("origin.test"));
    assert_eq!(tls.alpn.as_deref(), Some("http/1.1"));
    assert!(tls.is_tls13());
    assert!(!tls.client_cert_presented());
}

#[tokio::test]
async fn tls_origin_h2_by_alpn_records_authority() {
    let origin = start_tls_origin("beta").await;
    let c = H2Client::connect_tls(origin.addr(), "origin.test", client_tls_config(&["h2"]))
        .await
        .unwrap();
    let (a, b) = tokio::join!(c.get("/"), c.post("/echo", "abc"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.version, Version::HTTP_2);
    assert_eq!(a.text(), "origin:beta");
    assert_eq!(b.text(), "abc");

    let tls = origin.last_tls().unwrap();
    assert_eq!(tls.alpn.as_deref(), Some("h2"));
    assert_eq!(origin.accepted(), 1);
    let req = origin.last_request().unwrap();
    assert_eq!(req.version, Version::HTTP_2);
    let authority = format!("origin.test:{}", origin.port());
    assert_eq!(req.authority.as_deref(), Some(authority.as_str()));
    assert_eq!(req.effective_authority(), Some(authority.as_str()));
}

#[tokio::test]
async fn tls_origin_without_client_alpn_still_serves_both_versions() {
    let origin = start_tls_origin("noalpn").await;
    let cfg = client_tls_config(&[]);
    let mut h1 = H1Client::connect_tls(origin.addr(), "localhost", cfg.clone())
        .await
        .unwrap();
    assert_eq!(h1.get("/").await.unwrap().text(), "origin:noalpn");
    let h2 = H2Client::connect_tls(origin.addr(), "localhost", cfg)
        .await
        .unwrap();
    assert_eq!(h2.get("/").await.unwrap().version, Version::HTTP_2);
    let tls = origin.tls_connections();
    assert_eq!(tls.len(), 2);
    assert!(tls.iter().all(|t| t.alpn.is_none()));
    assert!(tls.iter().all(|t| t.sni.as_deref() == Some("localhost")));
}

#[tokio::test]
async fn ip_san_verifies_and_sends_no_sni() {
    let origin = start_tls_origin("ip").await;
    let mut c = H1Client::connect_tls(origin.addr(), "127.0.0.1", client_tls_config(&[]))
        .await
        .unwrap();
    assert_eq!(c.get("/").await.unwrap().status, StatusCode::OK);
    assert_eq!(origin.last_tls().unwrap().sni, None);
}

#[tokio::test]
async fn tls_versions_are_honoured() {
    let tls12 = OriginBuilder::new("v12")
        .tls(TlsSettings::default().versions(TlsVersions::Tls12))
        .start()
        .await;
    let cfg = client_tls_config(&["http/1.1"]);
    let mut c = H1Client::connect_tls(tls12.addr(), "origin.test", cfg)
        .await
        .unwrap();
    assert_eq!(c.get("/").await.unwrap().text(), "origin:v12");
    let rec = tls12.last_tls().unwrap();
    assert!(rec.is_tls12());
    assert_eq!(rec.version, Some(ProtocolVersion::TLSv1_2));

    let only13 = ClientTls::default().versions(TlsVersions::Tls13).build();
    let err = tls_connect(tls12.addr(), "origin.test", only13)
        .await
        .expect_err("a TLS 1.3-only client must fail against a TLS 1.2-only origin");
    eprintln!("expected version failure: {err}");
    assert!(wait_until(SHORT, || !tls12.handshake_errors().is_empty()).await);
    assert_eq!(tls12.handshakes(), 1);

    let tls13 = OriginBuilder::new("v13")
        .tls(TlsSettings::default().versions(TlsVersions::Tls13))
        .start()
        .await;
    let only12 = ClientTls::default().versions(TlsVersions::Tls12).build();
    assert!(tls_connect(tls13.addr(), "origin.test", only12)
        .await
        .is_err());
    let both = ClientTls::default().build();
    tls_connect(tls13.addr(), "origin.test", both)
        .await
        .unwrap();
    assert!(wait_until(SHORT, || tls13.handshakes() == 1).await);
    assert!(tls13.last_tls().unwrap().is_tls13());
}

async fn h1_get_over_tls(
    origin: &Origin,
    client: ClientTls,
    path: &str,
) -> Result<HttpResponse, BoxError> {
    let mut c = H1Client::connect_tls(origin.addr(), "origin.test", client.build()).await?;
    c.get(path).await
}

#[tokio::test]
async fn mtls_origin_requires_a_client_certificate() {
    for versions in [TlsVersions::Tls12, TlsVersions::Tls13] {
        let origin = OriginBuilder::new("mtls")
            .tls(
                TlsSettings::default()
                    .versions(versions)
                    .client_auth(ClientAuth::Required),
            )
            .start()
            .await;

        let with_cert = ClientTls::default().client_cert(&pki().client);
        let r = h1_get_over_tls(&origin, with_cert, "/").await.unwrap();
        assert_eq!(r.text(), "origin:mtls");
        let tls = origin.last_tls().unwrap();
        assert!(tls.client_cert_presented());
        assert_eq!(tls.client_cert_name(), Some("client"));
        assert_eq!(
            tls.client_cert_subject().as_deref(),
            Some("sluice-test-client")
        );

        let without = ClientTls::default();
        let err = h1_get_over_tls(&origin, without, "/").await.unwrap_err();
        eprintln!("expected mTLS refusal ({versions:?}): {err}");

        let wrong_ca = ClientTls::default().client_cert(&pki().other_client);
        assert!(h1_get_over_tls(&origin, wrong_ca, "/").await.is_err());

        assert!(wait_until(SHORT, || origin.handshake_errors().len() == 2).await);
        let errors = origin.handshake_errors();
        eprintln!("origin-side mTLS errors ({versions:?}): {errors:?}");
        assert!(errors[0].contains("no certificates"), "{errors:?}");
        assert!(errors[1].contains("UnknownIssuer"), "{errors:?}");
        assert_eq!(origin.handshakes(), 1);
        assert_eq!(origin.request_count(), 1);
    }
}

#[tokio::test]
async fn optional_client_auth_accepts_both() {
    let origin = OriginBuilder::new("opt")
        .tls(TlsSettings::default().client_auth(ClientAuth::Optional))
        .start()
        .await;
    h1_get_over_tls(&origin, ClientTls::default(), "/")
        .await
        .unwrap();
    h1_get_over_tls(
        &origin,
        ClientTls::default().client_cert(&pki().client),
        "/",
    )
    .await
    .unwrap();
    let presented: Vec<bool> = origin
        .tls_connections()
        .iter()
        .map(|t| t.client_cert_presented())
        .collect();
    assert_eq!(presented, [false, true]);
}

#[tokio::test]
async fn untrusted_and_uri_only_certificates_fail_default_verification() {
    let bad_ca = OriginBuilder::new("bad")
        .tls(TlsSettings::default().cert(&pki().other_origin))
        .start()
        .await;
    let err = tls_connect(bad_ca.addr(), "origin.test", client_tls_config(&[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // Trusting the other CA makes it work, so the certificate itself is fine.
    let other = ClientTls::default().roots(pki().other_roots()).build();
    tls_connect(bad_ca.addr(), "origin.test", other)
        .await
        .unwrap();

    let uri_only = OriginBuilder::new("uri")
        .tls(TlsSettings::default().cert(&pki().uri_only))
        .start()
        .await;
    let err = tls_connect(uri_only.addr(), "origin.test", client_tls_config(&[]))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not valid for name") || msg.contains("NotValidForName"),
        "{msg}"
    );
}

#[tokio::test]
async fn origin_alpn_list_is_configurable() {
    let origin = OriginBuilder::new("h1only")
        .tls(TlsSettings::default().alpn(&["http/1.1"]))
        .start()
        .await;
    let mut c = H1Client::connect_tls(
        origin.addr(),
        "origin.test",
        client_tls_config(&["h2", "http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(c.get("/").await.unwrap().version, Version::HTTP_11);
    assert_eq!(origin.last_tls().unwrap().alpn.as_deref(), Some("http/1.1"));
    // A client offering only h2 finds no common protocol.
    assert!(
        tls_connect(origin.addr(), "origin.test", client_tls_config(&["h2"]))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn grpc_origin_over_tls_sends_trailers() {
    let origin = start_grpc_origin().await;
    let c = H2Client::connect_tls(origin.addr(), "origin.test", client_tls_config(&["h2"]))
        .await
        .unwrap();
    let r = c
        .grpc("/echo.Echo/Unary", &b"\x00\x00\x00\x00\x03abc"[..])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    assert_eq!(&r.body[..], b"\x00\x00\x00\x00\x03abc");
    assert_eq!(r.trailer("grpc-status"), Some("0"));
    assert_eq!(r.trailer("grpc-message"), Some("ok"));
    assert_eq!(origin.trailers_sent(), 1);
    assert_eq!(origin.last_tls().unwrap().alpn.as_deref(), Some("h2"));

    // ALPN offers only h2.
    assert!(tls_connect(
        origin.addr(),
        "origin.test",
        client_tls_config(&["http/1.1"])
    )
    .await
    .is_err());
}

#[tokio::test]
async fn grpc_origin_over_h2c_with_streamed_request() {
    let origin = start_h2c_grpc_origin().await;
    let c = H2Client::connect(origin.addr()).await.unwrap();
    let (tx, body) = body_channel();
    let req = c
        .request(Method::POST, "/echo.Echo/Stream")
        .header("content-type", "application/grpc+proto")
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        assert!(tx.send_data("part1-").await);
        assert!(tx.send_data("part2").await);
    });
    let r = c.send(req).await.unwrap();
    feeder.await.unwrap();
    assert_eq!(r.text(), "part1-part2");
    assert_eq!(r.trailer("grpc-status"), Some("0"));
    assert_eq!(origin.trailers_sent(), 1);
    assert_eq!(origin.handshakes(), 0);

    // HTTP/1.1 is refused by an h2-only origin.
    assert!(http1_get(origin.addr(), "/").await.is_err());
}

#[tokio::test]
async fn plain_origin_speaks_http1_and_h2c() {
    let origin = start_plain_origin("plain").await;
    let mut c = H1Client::connect(origin.addr()).await.unwrap();
    for i in 0..3 {
        let r = c.post("/echo", format!("req{i}")).await.unwrap();
        assert_eq!(r.text(), format!("req{i}"));
    }
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.request_connections(), 1);

    let r = http2_get(origin.addr(), "/headers").await.unwrap();
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(origin.accepted(), 2);
    let req = origin.last_request().unwrap();
    assert_eq!(req.version, Version::HTTP_2);
    assert_eq!(req.authority, Some(origin.addr().to_string()));
    assert!(origin.tls_connections().is_empty());
    assert_eq!(
        http1_get(origin.addr(), "/").await.unwrap().text(),
        "origin:plain"
    );
}

#[tokio::test]
async fn unix_socket_origin_works() {
    let origin = start_unix_origin("sock").await;
    let path = origin.unix_path().to_path_buf();
    assert!(path.exists());
    let mut c = H1Client::connect_unix(&path).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().text(), "origin:sock");
    assert_eq!(c.post("/echo", "x").await.unwrap().text(), "x");
    let h2 = H2Client::connect_unix(&path).await.unwrap();
    assert_eq!(h2.get("/").await.unwrap().version, Version::HTTP_2);
    assert_eq!(origin.accepted(), 2);
    assert_eq!(origin.requests()[0].host.as_deref(), Some("localhost"));
    drop(c);
    drop(h2);
    origin.shutdown().await;
    assert!(
        wait_until(SHORT, || !path.exists()).await,
        "socket dir removed"
    );
}

#[tokio::test]
async fn slow_and_big_routes_stream() {
    let origin = start_plain_origin("s").await;
    let c = H2Client::connect(origin.addr()).await.unwrap();

    let started = Instant::now();
    let mut resp = c
        .send_streaming(
            c.request(Method::GET, "/slow?ms=300&chunks=4")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "headers came at once"
    );
    let mut body = Vec::new();
    let mut frames = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(resp.body_mut()).await {
        if let Ok(data) = frame.unwrap().into_data() {
            body.extend_from_slice(&data);
            frames += 1;
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(frames, 4);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "slow-chunk-0\nslow-chunk-1\nslow-chunk-2\nslow-chunk-3\n"
    );

    let r = c.get("/big?bytes=300000").await.unwrap();
    assert_eq!(r.body.len(), 300_000);
    assert_eq!(&r.body[..], &big_body(300_000)[..]);

    let mut h1 = H1Client::connect(origin.addr()).await.unwrap();
    let r = h1.get("/big?bytes=70000").await.unwrap();
    assert_eq!(r.header("content-length"), Some("70000"));
    assert_eq!(&r.body[..], &big_body(70_000)[..]);
}

#[tokio::test]
async fn tcp_echo_honours_half_close() {
    let origin = start_tcp_echo().await;
    let mut s = TcpStream::connect(origin.addr()).await.unwrap();
    let payload = big_body(1_000_000);
    let back = half_close_roundtrip(&mut s, &payload).await.unwrap();
    assert_eq!(back, payload);
    assert!(wait_until(SHORT, || origin.echoes().len() == 1).await);
    let rec = &origin.echoes()[0];
    assert!(rec.saw_eof);
    assert_eq!(rec.bytes, 1_000_000);
    assert_eq!(rec.error, None);

    // Interactive use: echoes before the client half-closes.
    let mut s = TcpStream::connect(origin.addr()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(SHORT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn tls_echo_records_sni_and_honours_half_close() {
    let origin = start_tls_echo().await;
    let mut s = tls_connect(origin.addr(), "origin.test", client_tls_config(&[]))
        .await
        .unwrap();
    let back = half_close_roundtrip(&mut s, b"over tls").await.unwrap();
    assert_eq!(back, b"over tls");
    assert!(wait_until(SHORT, || origin.echoes().len() == 1).await);
    assert!(origin.echoes()[0].saw_eof);
    let tls = origin.last_tls().unwrap();
    assert_eq!(tls.sni.as_deref(), Some("origin.test"));
    assert_eq!(tls.alpn, None);
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.handshakes(), 1);

    let mtls = start_tls_echo_with(
        TlsSettings::default()
            .alpn(&[])
            .client_auth(ClientAuth::Required),
    )
    .await;
    let cfg = ClientTls::default().client_cert(&pki().client).build();
    let mut s = tls_connect(mtls.addr(), "origin.test", cfg).await.unwrap();
    assert_eq!(half_close_roundtrip(&mut s, b"m").await.unwrap(), b"m");
    assert_eq!(mtls.last_tls().unwrap().client_cert_name(), Some("client"));
}

#[tokio::test]
async fn origin_connections_can_be_closed_and_origin_stopped() {
    let origin = start_plain_origin("stop").await;
    let addr = origin.addr();
    let mut c = H1Client::connect(addr).await.unwrap();
    c.get("/").await.unwrap();
    assert!(wait_until(SHORT, || origin.open_connections() == 1).await);

    origin.close_connections().await;
    assert!(wait_until(SHORT, || c.is_closed()).await);
    assert_eq!(origin.open_connections(), 0);
    // Still listening.
    assert_eq!(http1_get(addr, "/").await.unwrap().text(), "origin:stop");

    origin.shutdown().await;
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn dropping_an_origin_stops_it() {
    let origin = start_tls_origin("gone").await;
    let addr = origin.addr();
    drop(origin);
    assert!(
        support::wait_until_async(
            SHORT,
            || async move { TcpStream::connect(addr).await.is_err() }
        )
        .await
    );
}

#[tokio::test]
async fn wait_helpers_time_out() {
    let start = Instant::now();
    assert!(!wait_until(Duration::from_millis(50), || false).await);
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(wait_until(Duration::from_millis(50), || true).await);
    assert!(
        !support::wait_until_async(Duration::from_millis(50), std::future::pending::<bool>).await
    );
}

#[test]
fn temp_dir_is_unique_and_removed() {
    let a = support::TempDir::new("selftest");
    let b = support::TempDir::new("selftest");
    assert_ne!(a.path(), b.path());
    std::fs::write(a.join("f"), "x").unwrap();
    let path = a.path().to_path_buf();
    drop(a);
    assert!(!path.exists());
    assert_ne!(free_port(), 0);
}

/// The process helper against whatever the binary currently is: a config
/// that is not even YAML must never reach readiness, and the helper must
/// say so (with the process's stderr) within its deadline.
#[tokio::test]
async fn sluice_helper_reports_failed_start() {
    let started = Instant::now();
    let result = SluiceBuilder::new()
        .config("this: is: [not yaml")
        .ready_timeout(Duration::from_secs(10))
        .try_start()
        .await;
    let err = result.expect_err("an invalid config must not become ready");
    // It exited (not merely timed out), and its own reason is in the message.
    assert!(err.contains("exited"), "{err}");
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));

    let mut s = Sluice::builder().config("{}").spawn();
    assert!(s.config_dir().join(support::CONFIG_FILE).exists());
    s.rewrite_config("# replaced\n");
    assert_eq!(
        std::fs::read_to_string(s.config_dir().join(support::CONFIG_FILE)).unwrap(),
        "# replaced\n"
    );
    s.kill();
    assert!(s.exit_status().is_some());
    // Complete lines are parsed; an unfinished last line is left out.
    std::fs::write(
        s.access_log_path(),
        "{\"status\":200}\n\n{\"status\":503}\n{\"stat",
    )
    .unwrap();
    let lines = s.access_log_lines();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["status"], 503);
}
