//! End to end through `sluice run`: an app speaks plaintext to a local outbound and Sluice carries
//! the traffic to real origins on loopback, originating TLS where configured. Every assertion is
//! about what crossed the wire: bodies, statuses, the Host and SNI the origin saw, how many
//! upstream connections served how many requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ep_host(host: &str, port: u16) -> String {
    format!("    - address: {host}\n      port: {port}\n")
}

/// One service in front of `origin`, verified as origin.test against the test CA.
fn secured(name: &str, protocol: &str, origin: &Origin) -> String {
    mes(
        name,
        protocol,
        &[ep(origin.addr())],
        Some(&verification("Secured", Some("origin.test"), "")),
    )
}

/// Runs sluice with `services` and one outbound to `name`; returns it and the outbound port.
async fn serve_one(services: &[String], name: &str, args: &[&str]) -> (Sluice, u16) {
    let port = free_port();
    let sluice = Sluice::start_with_args(&config(services, &[(port, name)]), args).await;
    (sluice, port)
}

fn config(services: &[String], outbounds: &[(u16, &str)]) -> String {
    let mut docs: Vec<String> = services.to_vec();
    docs.push(dataplane("app", outbounds));
    docs.join("---\n")
}

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

async fn metric(sluice: &Sluice, name: &str, service: &str) -> f64 {
    let text = sluice.admin_get("/metrics").await.unwrap().text();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("service=\"{service}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A TCP echo origin behind one `tcp` outbound, with extra `sluice run` arguments.
async fn echo_behind_sluice(args: &[&str]) -> (Origin, Sluice, u16) {
    let echo = start_tcp_echo().await;
    let port = free_port();
    let yaml = config(
        &[mes("echo", "tcp", &[ep(echo.addr())], None)],
        &[(port, "echo")],
    );
    let sluice = Sluice::start_with_args(&yaml, args).await;
    (echo, sluice, port)
}

/// Reads until the proxy closes the connection; fails if it stays open or sends anything.
async fn assert_closed_by_proxy(stream: &mut tokio::net::TcpStream) {
    let (rest, _) = read_until_closed(stream).await;
    assert!(
        rest.is_empty(),
        "connection still delivering data: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origination_rewrites_host_sends_sni_and_reuses_one_connection() {
    let origin = start_tls_origin("tls").await;
    let port = free_port();
    let svc = mes(
        "secure",
        "http",
        &[ep_host("localhost", origin.port())],
        Some(&verification("Secured", Some("origin.test"), "")),
    );
    let sluice = Sluice::start(&config(&[svc], &[(port, "secure")])).await;

    // Three app connections, four requests each: one upstream TLS handshake serves them all.
    for _ in 0..3 {
        let mut app = H1Client::connect(local(port)).await.unwrap();
        for i in 0..4 {
            let body = format!("hello {i}");
            let r = app.post("/echo", body.clone()).await.unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), body);
        }
    }
    assert_eq!(origin.request_count(), 12);
    assert_eq!(
        origin.handshakes(),
        1,
        "upstream connections must be reused"
    );
    assert_eq!(origin.request_connections(), 1);
    let tls = origin.last_tls().unwrap();
    assert_eq!(tls.sni.as_deref(), Some("origin.test"));
    assert_eq!(
        tls.alpn.as_deref(),
        Some("h2"),
        "ALPN should pick h2 for protocol http"
    );
    let req = origin.last_request().unwrap();
    assert_eq!(
        req.effective_authority(),
        Some(&*format!("origin.test:{}", origin.port()))
    );
    // On HTTP/2 the name is `:authority` alone: a Host beside it is a duplicate nginx refuses.
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.host, None, "{:?}", req.headers);
    assert_eq!(
        metric(&sluice, "sluice_upstream_connections_total", "secure").await,
        1.0
    );

    let log = sluice.wait_for_log(12).await;
    let line = &log[0];
    assert_eq!(line["kind"], "http");
    assert_eq!(line["service"], "secure");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/echo");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], 7);
    assert_eq!(line["bytes_out"], 7);
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["upstream"], format!("127.0.0.1:{}", origin.port()));
    assert!(line["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(line["error"].is_null());
}

/// Many streams at once on one app connection and one upstream connection, small bodies and
/// bodies of many frames: the proxy batches the frames of ready streams into shared writes on
/// both sides, and every body must still arrive whole, in order, on its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http2_streams_arrive_whole_over_one_connection_each_side() {
    let origin = start_tls_origin("tls").await;
    let svc = mes(
        "secure",
        "http",
        &[ep_host("localhost", origin.port())],
        Some(&verification("Secured", Some("origin.test"), "")),
    );
    let (_sluice, port) = serve_one(&[svc], "secure", &[]).await;
    let app = H2Client::connect(local(port)).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64usize {
        let app = app.clone();
        let size = [1, 700, 1024, 5_000, 70_000, 300_000][i % 6] + i;
        calls.spawn(async move {
            let mut body = big_body(size);
            body[0] = i as u8;
            let r = app.post("/echo", body.clone()).await.unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                r.body[..] == body[..],
                "stream {i}: {size} bytes sent, {} back",
                r.body.len()
            );
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    assert_eq!(origin.request_count(), 64);
    assert_eq!(origin.handshakes(), 1, "one upstream HTTP/2 connection");
    assert_eq!(
        origin.last_request().unwrap().version,
        http::Version::HTTP_2
    );
}

/// A request body and its echo several times larger than the upstream connection's
/// flow-control windows (1 MiB a stream, 4 MiB the connection): the body goes out as the origin
/// grants room, and the response keeps coming as the app reads it, over HTTP/2 on both sides
/// and with an HTTP/1.1 app alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_http2_windows_cross_whole_both_ways() {
    let origin = start_tls_origin("tls").await;
    let (_sluice, port) = serve_one(&[secured("secure", "http", &origin)], "secure", &[]).await;
    let mut body = big_body(9 * 1024 * 1024 + 7);
    body[0] = 42;
    let app = H2Client::connect(local(port)).await.unwrap();
    let r = app.post("/echo", body.clone()).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body[..] == body[..], "{} bytes back", r.body.len());
    let mut app = H1Client::connect(local(port)).await.unwrap();
    let req = app
        .request(Method::POST, "/echo")
        .body(full(body.clone()))
        .unwrap();
    let r = app.send(req).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body[..] == body[..], "{} bytes back", r.body.len());
    assert_eq!(origin.handshakes(), 1, "one upstream HTTP/2 connection");
    assert_eq!(
        origin.last_request().unwrap().version,
        http::Version::HTTP_2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_origin_gets_http11_and_app_h2c_works() {
    let origin = OriginBuilder::new("h1")
        .tls(TlsSettings::default().alpn(&["http/1.1"]))
        .http1_only()
        .start()
        .await;
    let (_sluice, port) = serve_one(&[secured("h1", "http", &origin)], "h1", &[]).await;
    let app = H2Client::connect(local(port)).await.unwrap();
    let r = app.get("/headers").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let req = origin.last_request().unwrap();
    assert_eq!(req.version, http::Version::HTTP_11);
    assert_eq!(
        req.host.as_deref(),
        Some(&*format!("origin.test:{}", origin.port()))
    );
    assert_eq!(origin.last_tls().unwrap().alpn.as_deref(), Some("http/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_origin_gets_rewritten_host_and_hop_headers_are_dropped() {
    let origin = start_plain_origin("plain").await;
    let port = free_port();
    let svc = mes(
        "plain",
        "http",
        &[ep_host("localhost", origin.port())],
        None,
    );
    let _sluice = Sluice::start(&config(&[svc], &[(port, "plain")])).await;
    let mut app = H1Client::connect(local(port)).await.unwrap();
    let req = app
        .request(Method::GET, "/headers?x=1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("x-app", "kept")
        .body(empty())
        .unwrap();
    let r = app.send(req).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let seen = origin.last_request().unwrap();
    assert_eq!(
        seen.host.as_deref(),
        Some(&*format!("localhost:{}", origin.port()))
    );
    assert_eq!(seen.query.as_deref(), Some("x=1"));
    assert_eq!(seen.header("x-app"), Some("kept"));
    assert_eq!(seen.header("x-hop"), None);
    assert_eq!(seen.version, http::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_cross_end_to_end_over_h2() {
    let origin = start_grpc_origin().await;
    let (_sluice, port) = serve_one(&[secured("grpc", "grpc", &origin)], "grpc", &[]).await;
    let app = H2Client::connect(local(port)).await.unwrap();
    let payload = b"\x00\x00\x00\x00\x05hello".to_vec();
    for _ in 0..3 {
        let r = app.grpc("/echo.Echo/Say", payload.clone()).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], &payload[..]);
        assert_eq!(r.trailer("grpc-status"), Some("0"));
        assert_eq!(r.trailer("grpc-message"), Some("ok"));
    }
    assert_eq!(origin.trailers_sent(), 3);
    assert_eq!(origin.handshakes(), 1);
    let req = origin.last_request().unwrap();
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.header("te"), Some("trailers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_protocol_speaks_h2c_to_a_plaintext_endpoint() {
    let origin = start_h2c_grpc_origin().await;
    let (_sluice, port) = serve_one(
        &[mes("h2c", "http2", &[ep(origin.addr())], None)],
        "h2c",
        &[],
    )
    .await;
    let mut app = H1Client::connect(local(port)).await.unwrap();
    let r = app.get("/anything").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "origin:grpc");
    assert_eq!(
        origin.last_request().unwrap().version,
        http::Version::HTTP_2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_with_tls_origination_echoes_and_respects_half_close() {
    let origin = start_tls_echo().await;
    let (sluice, port) = serve_one(&[secured("echo", "tcp", &origin)], "echo", &[]).await;
    let data = big_body(300_000);
    let mut app = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    let back = tokio::time::timeout(DEFAULT_TIMEOUT, half_close_roundtrip(&mut app, &data))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data);
    assert_eq!(
        origin.last_tls().unwrap().sni.as_deref(),
        Some("origin.test")
    );
    // The origin records a connection once it has closed it, just after the app's EOF.
    let half_closed = wait_until(DEFAULT_TIMEOUT, || {
        origin.echoes().iter().any(|e| e.saw_eof)
    })
    .await;
    assert!(half_closed, "origin must see the app's half-close");
    let log = sluice.wait_for_log(1).await;
    assert_eq!(log[0]["kind"], "tcp");
    assert_eq!(log[0]["bytes_in"], 300_000);
    assert_eq!(log[0]["bytes_out"], 300_000);
    assert_eq!(log[0]["tls_version"], "TLSv1.3");
    // TLS on one side: the relay held its buffers for its life.
    let metrics = sluice.admin_get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("sluice_relays_total{mode=\"held\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_relays_total{mode=\"pooled\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_and_unix_socket_endpoints() {
    let echo = start_tcp_echo().await;
    let unix = start_unix_origin("unix").await;
    let (tcp_port, unix_port) = (free_port(), free_port());
    let tcp_svc = mes("echo", "tcp", &[ep(echo.addr())], None);
    let unix_svc = mes(
        "unix",
        "http",
        &[format!(
            "    - address: unix://{}\n",
            unix.unix_path().display()
        )],
        None,
    );
    let _sluice = Sluice::start(&config(
        &[tcp_svc, unix_svc],
        &[(tcp_port, "echo"), (unix_port, "unix")],
    ))
    .await;
    let mut app = tokio::net::TcpStream::connect(local(tcp_port))
        .await
        .unwrap();
    let back = half_close_roundtrip(&mut app, b"ping over tcp")
        .await
        .unwrap();
    assert_eq!(back, b"ping over tcp");

    let mut app = H1Client::connect(local(unix_port)).await.unwrap();
    let r = app.get("/whatever").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "origin:unix");
    // No serverName and a socket: the app's Host is kept.
    assert_eq!(
        unix.last_request().unwrap().host.as_deref(),
        Some(&*format!("127.0.0.1:{unix_port}"))
    );

    // Nor a Host to keep: refused here, and nothing reaches the origin.
    let mut app = tokio::net::TcpStream::connect(local(unix_port))
        .await
        .unwrap();
    app.write_all(b"GET /no-host HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.read_to_end(&mut answer),
    )
    .await
    .expect("the proxy answers and closes")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 400 "), "{answer}");
    assert!(answer.contains("request has no Host header"), "{answer}");
    assert_eq!(unix.requests().len(), 1, "{:?}", unix.requests());
}

/// One row per verification case: origin certificate, mode, serverName, extra verification
/// lines, and whether the request must get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_modes_table() {
    let p = pki();
    let exact = "  subjectAltNames:\n    - type: Exact\n      value: origin.test\n";
    let spiffe =
        "  subjectAltNames:\n    - type: Prefix\n      value: spiffe://example.com/ns/production\n";
    let staging =
        "  subjectAltNames:\n    - type: Prefix\n      value: spiffe://example.com/ns/staging\n";
    type Case<'a> = (
        &'a str,
        &'a CertKey,
        &'a str,
        Option<&'a str>,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        // name, certificate, mode, serverName, extra, expected failure reason (None = passes)
        (
            "secured ok",
            &p.origin,
            "Secured",
            Some("origin.test"),
            "",
            None,
        ),
        ("secured by IP SAN", &p.origin, "Secured", None, "", None),
        (
            "secured unknown CA",
            &p.other_origin,
            "Secured",
            Some("origin.test"),
            "",
            Some("unknown_ca"),
        ),
        (
            "secured wrong name",
            &p.origin,
            "Secured",
            Some("wrong.test"),
            "",
            Some("name_mismatch"),
        ),
        (
            "secured exact SAN",
            &p.origin,
            "Secured",
            Some("origin.test"),
            exact,
            None,
        ),
        (
            "secured spiffe prefix",
            &p.origin,
            "Secured",
            Some("origin.test"),
            spiffe,
            None,
        ),
        (
            "secured SAN narrows",
            &p.origin,
            "Secured",
            Some("origin.test"),
            staging,
            Some("san_mismatch"),
        ),
        (
            "skipSAN wrong name",
            &p.origin,
            "SkipSAN",
            Some("wrong.test"),
            staging,
            None,
        ),
        (
            "skipSAN unknown CA",
            &p.other_origin,
            "SkipSAN",
            Some("origin.test"),
            "",
            Some("unknown_ca"),
        ),
        (
            "skipCA unknown CA",
            &p.other_origin,
            "SkipCA",
            Some("origin.test"),
            "",
            None,
        ),
        (
            "skipCA wrong name",
            &p.other_origin,
            "SkipCA",
            Some("wrong.test"),
            "",
            Some("name_mismatch"),
        ),
        (
            "skipCA SAN narrows",
            &p.other_origin,
            "SkipCA",
            Some("origin.test"),
            staging,
            Some("san_mismatch"),
        ),
        (
            "skipAll anything",
            &p.other_origin,
            "SkipAll",
            Some("wrong.test"),
            staging,
            None,
        ),
    ];
    let mut origins = Vec::new();
    let mut services = Vec::new();
    let mut outbounds = Vec::new();
    for (i, (_, cert, mode, name, extra, _)) in cases.iter().enumerate() {
        let origin = OriginBuilder::new(&format!("o{i}"))
            .tls(TlsSettings::default().cert(cert))
            .start()
            .await;
        services.push(mes(
            &format!("case{i}"),
            "http",
            &[ep(origin.addr())],
            Some(&verification(mode, *name, extra)),
        ));
        outbounds.push((free_port(), format!("case{i}")));
        origins.push(origin);
    }
    // SkipAll still needs a TLS server: a plaintext origin fails the handshake.
    let plain = start_plain_origin("plain").await;
    services.push(mes(
        "skipall-plain",
        "http",
        &[ep(plain.addr())],
        Some("verification:\n  mode: SkipAll\n"),
    ));
    let plain_port = free_port();
    outbounds.push((plain_port, "skipall-plain".into()));
    let outbound_refs: Vec<(u16, &str)> = outbounds.iter().map(|(p, s)| (*p, s.as_str())).collect();
    let sluice = Sluice::start(&config(&services, &outbound_refs)).await;

    for (i, (label, _, _, _, _, failure)) in cases.iter().enumerate() {
        let mut app = H1Client::connect(local(outbounds[i].0)).await.unwrap();
        let r = app.get("/").await.unwrap();
        match failure {
            None => {
                assert_eq!(r.status, StatusCode::OK, "{label}: {}", r.text());
                assert_eq!(r.text(), format!("origin:o{i}"), "{label}");
            }
            Some(reason) => {
                assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{label}: {}", r.text());
                assert!(
                    r.text().starts_with("sluice: TLS handshake with"),
                    "{label}: {}",
                    r.text()
                );
                assert_eq!(
                    origins[i].request_count(),
                    0,
                    "{label}: nothing may reach the origin"
                );
                let failures = metric(&sluice, &format!("sluice_upstream_tls_failures_total{{service=\"case{i}\",reason=\"{reason}\"}}"), &format!("case{i}")).await;
                assert_eq!(failures, 1.0, "{label}: expected reason {reason}");
            }
        }
    }
    let mut app = H1Client::connect(local(plain_port)).await.unwrap();
    let r = app.get("/").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(plain.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_version_bounds_both_ways() {
    let only12 = OriginBuilder::new("only12")
        .tls(TlsSettings::default().versions(TlsVersions::Tls12))
        .start()
        .await;
    let only13 = OriginBuilder::new("only13")
        .tls(TlsSettings::default().versions(TlsVersions::Tls13))
        .start()
        .await;
    let v = |min: &str, max: &str| {
        format!(
            "version:\n  min: {min}\n  max: {max}\n{}",
            verification("Secured", Some("origin.test"), "")
        )
    };
    // (service, origin, min, max, passes, negotiated)
    let cases = [
        ("auto12", &only12, "TLSAuto", "TLSAuto", true, "TLSv1.2"),
        ("auto13", &only13, "TLSAuto", "TLSAuto", true, "TLSv1.3"),
        ("max12-vs-13", &only13, "TLSAuto", "TLS12", false, ""),
        ("min13-vs-12", &only12, "TLS13", "TLSAuto", false, ""),
        ("exact12", &only12, "TLS12", "TLS12", true, "TLSv1.2"),
        ("exact13", &only13, "TLS13", "TLS13", true, "TLSv1.3"),
    ];
    let services: Vec<String> = cases
        .iter()
        .map(|(name, origin, min, max, _, _)| {
            mes(name, "http", &[ep(origin.addr())], Some(&v(min, max)))
        })
        .collect();
    let ports: Vec<u16> = cases.iter().map(|_| free_port()).collect();
    let outbounds: Vec<(u16, &str)> = cases.iter().zip(&ports).map(|(c, p)| (*p, c.0)).collect();
    let sluice = Sluice::start(&config(&services, &outbounds)).await;
    for ((name, _, _, _, passes, _), port) in cases.iter().zip(&ports) {
        let mut app = H1Client::connect(local(*port)).await.unwrap();
        let r = app.get("/").await.unwrap();
        if *passes {
            assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
        } else {
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{name}: {}", r.text());
            let n = metric(&sluice, &format!("sluice_upstream_tls_failures_total{{service=\"{name}\",reason=\"version_mismatch\"}}"), name).await;
            assert_eq!(
                n,
                1.0,
                "{name}: {}",
                sluice.admin_get("/metrics").await.unwrap().text()
            );
        }
    }
    let log = sluice.wait_for_log(cases.len()).await;
    for (name, _, _, _, passes, negotiated) in &cases {
        let line = log.iter().find(|l| l["service"] == *name).unwrap();
        if *passes {
            assert_eq!(line["tls_version"], *negotiated, "{name}");
        } else {
            assert!(
                line["error"].as_str().unwrap().contains("TLS handshake"),
                "{name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_presents_the_client_certificate_and_is_refused_without_it() {
    let origin = OriginBuilder::new("mtls")
        .tls(TlsSettings::default().client_auth(ClientAuth::Required))
        .start()
        .await;
    let p = pki();
    let with_cert = format!(
        "{}{}{}",
        verification("Secured", Some("origin.test"), ""),
        pem_source("clientCert", &p.client.cert_pem),
        pem_source("clientKey", &p.client.key_pem),
    );
    let secret_docs = format!(
        "type: Secret\nname: client-key\nmesh: default\ndata: {}\n",
        base64_of(&p.client.key_pem)
    );
    let with_secret = format!(
        "{}  clientCert:\n    inline: {}\n  clientKey:\n    secret: client-key\n",
        verification("Secured", Some("origin.test"), ""),
        base64_of(&p.client.cert_pem),
    );
    let without = verification("Secured", Some("origin.test"), "");
    let (a, b, c) = (free_port(), free_port(), free_port());
    let sluice = Sluice::start(&config(
        &[
            mes("with-cert", "http", &[ep(origin.addr())], Some(&with_cert)),
            mes(
                "with-secret",
                "http",
                &[ep(origin.addr())],
                Some(&with_secret),
            ),
            mes("without", "http", &[ep(origin.addr())], Some(&without)),
            secret_docs,
        ],
        &[(a, "with-cert"), (b, "with-secret"), (c, "without")],
    ))
    .await;
    for port in [a, b] {
        let r = H1Client::connect(local(port))
            .await
            .unwrap()
            .get("/")
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let tls = origin.last_tls().unwrap();
        assert_eq!(tls.client_cert_name(), Some("client"));
    }
    let r = H1Client::connect(local(c))
        .await
        .unwrap()
        .get("/")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(origin.request_count(), 2);

    // The key never shows in the config dump.
    let dump = sluice.admin_get("/config_dump").await.unwrap().text();
    let key_body: String = p.client.key_pem.lines().nth(1).unwrap().to_string();
    assert!(
        !dump.contains(&key_body),
        "private key leaked into /config_dump"
    );
    assert!(
        !dump.contains("PRIVATE KEY"),
        "private key leaked into /config_dump"
    );
    assert!(dump.contains("redacted"));
    assert!(!sluice.stderr().contains(&key_body));
}

fn base64_of(text: &str) -> String {
    // Tests build base64 by hand to keep the dev-dependency list short.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = text.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_round_robin_across_endpoints() {
    let a = start_plain_origin("a").await;
    let b = start_plain_origin("b").await;
    // Nothing listens on 127.0.0.2 (everything here binds 127.0.0.1): connections are refused.
    let dead: SocketAddr = ([127, 0, 0, 2], free_port()).into();
    let (rr, fo) = (free_port(), free_port());
    let services = [
        mes("rr", "http", &[ep(a.addr()), ep(b.addr())], None),
        mes("fo", "http", &[ep(dead), ep(b.addr())], None),
    ];
    let sluice = Sluice::start(&config(&services, &[(rr, "rr"), (fo, "fo")])).await;

    // Two concurrent app requests need two upstream connections: one to each endpoint.
    let app = H2Client::connect(local(rr)).await.unwrap();
    let (r1, r2) = tokio::join!(
        app.get("/slow?ms=300&chunks=2"),
        app.get("/slow?ms=300&chunks=2")
    );
    assert_eq!(r1.unwrap().status, StatusCode::OK);
    assert_eq!(r2.unwrap().status, StatusCode::OK);
    assert_eq!(a.request_count(), 1);
    assert_eq!(b.request_count(), 1);

    // The first endpoint refuses: every request is served by the second.
    for _ in 0..3 {
        let mut app = H1Client::connect(local(fo)).await.unwrap();
        let r = app.get("/").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "origin:b");
    }
    assert!(metric(&sluice, "sluice_upstream_connect_failures_total", "fo").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_answered_never_hung() {
    // Nothing listens on 127.0.0.2 (everything here binds 127.0.0.1): connections are refused.
    let refused: SocketAddr = ([127, 0, 0, 2], free_port()).into();
    // Accepts TCP and never answers: the response timeout must end the wait.
    let (silent_addr, hold) = silent_listener().await;
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let sluice = Sluice::start_with_args(
        &config(
            &[
                mes("refused", "http", &[ep(refused)], None),
                mes("silent", "http", &[ep(silent_addr)], None),
                mes("refused-tcp", "tcp", &[ep(refused)], None),
            ],
            &[(p1, "refused"), (p2, "silent"), (p3, "refused-tcp")],
        ),
        &["--response-timeout", "300ms"],
    )
    .await;
    let r = H1Client::connect(local(p1))
        .await
        .unwrap()
        .get("/")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.text()
            .starts_with("sluice: no endpoint of refused could be reached"),
        "{}",
        r.text()
    );
    assert!(r.text().contains(&refused.to_string()));

    let r = H1Client::connect(local(p2))
        .await
        .unwrap()
        .get("/")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(r.text().contains("no response from silent"), "{}", r.text());

    let mut app = tokio::net::TcpStream::connect(local(p3)).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEFAULT_TIMEOUT, app.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "tcp app must see its connection closed"
    );
    let log = sluice.wait_for_log(3).await;
    let tcp = log.iter().find(|l| l["kind"] == "tcp").unwrap();
    assert!(tcp["error"].as_str().unwrap().contains("could be reached"));
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_mid_request_finishes_unharmed_and_new_connections_follow() {
    let a = start_plain_origin("a").await;
    let b = start_plain_origin("b").await;
    let port = free_port();
    let removed_port = free_port();
    let first = config(
        &[
            mes("a", "http", &[ep(a.addr())], None),
            mes("b", "http", &[ep(b.addr())], None),
        ],
        &[(port, "a"), (removed_port, "b")],
    );
    let sluice = Sluice::start(&first).await;

    // A long streaming request on the first config.
    let mut long = H1Client::connect(local(port)).await.unwrap();
    let req = long
        .request(Method::GET, "/slow?ms=1500&chunks=15")
        .body(empty())
        .unwrap();
    let head = long.send_streaming(req).await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    // An HTTP app connection is counted as open while it lives.
    assert_eq!(metric(&sluice, "sluice_active_connections", "a").await, 1.0);

    // Outbound `port` now goes to b; `removed_port` is gone.
    let second = config(
        &[
            mes("a", "http", &[ep(a.addr())], None),
            mes("b", "http", &[ep(b.addr())], None),
        ],
        &[(port, "b")],
    );
    sluice.rewrite_config(&second);
    let switched = wait_until_async(DEFAULT_TIMEOUT, || serves(port, "origin:b")).await;
    assert!(
        switched,
        "new connections must follow the new config: {}",
        sluice.stderr()
    );
    let closed = stops_accepting(removed_port).await;
    assert!(closed, "a removed outbound must stop accepting");

    let body = collect_response(head).await.unwrap();
    let text = body.text();
    assert_eq!(
        text.lines().count(),
        15,
        "the long request must finish whole: {text}"
    );
    assert!(text.starts_with("slow-chunk-0\n") && text.ends_with("slow-chunk-14\n"));
    drop(long);
    let closed = wait_until_async(DEFAULT_TIMEOUT, || async {
        metric(&sluice, "sluice_active_connections", "a").await == 0.0
    })
    .await;
    assert!(closed, "a closed connection is no longer counted");

    // An invalid change is refused and the current config keeps serving.
    sluice.rewrite_config("type: MeshExternalService\nname: broken\nspec: {match: {port: 0}}\n");
    let rejected = wait_until_async(DEFAULT_TIMEOUT, || async {
        sluice
            .admin_get("/metrics")
            .await
            .map(|r| {
                r.text()
                    .contains("sluice_config_reloads_total{result=\"rejected\"} 1")
            })
            .unwrap_or(false)
    })
    .await;
    assert!(rejected, "{}", sluice.stderr());
    let r = H1Client::connect(local(port))
        .await
        .unwrap()
        .get("/")
        .await
        .unwrap();
    assert_eq!(r.text(), "origin:b");
    assert!(sluice
        .stderr()
        .contains("spec.match.port: must be between 1 and 65535"));

    // Back to the first config.
    sluice.rewrite_config(&first);
    let back = wait_until_async(DEFAULT_TIMEOUT, || serves(removed_port, "origin:b")).await;
    assert!(back, "{}", sluice.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tcp_tunnel_survives_a_reload_that_changes_its_service() {
    let echo = start_tcp_echo().await;
    let other = start_tcp_echo().await;
    let port = free_port();
    let sluice = Sluice::start(&config(
        &[mes("echo", "tcp", &[ep(echo.addr())], None)],
        &[(port, "echo")],
    ))
    .await;
    let mut app = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    app.write_all(b"before ").await.unwrap();
    let mut buf = [0u8; 7];
    read_exact_in_time(&mut app, &mut buf).await;
    sluice.rewrite_config(&config(
        &[mes("echo", "tcp", &[ep(other.addr())], None)],
        &[(port, "echo")],
    ));
    let moved = wait_until_async(DEFAULT_TIMEOUT, || async {
        let Ok(mut s) = tokio::net::TcpStream::connect(local(port)).await else {
            return false;
        };
        let _ = half_close_roundtrip(&mut s, b"x").await;
        other.accepted() > 0
    })
    .await;
    assert!(moved, "{}", sluice.stderr());
    // The tunnel opened before the reload still reaches the old endpoint.
    let before = other.accepted();
    let back = half_close_roundtrip(&mut app, b"after").await.unwrap();
    assert_eq!(back, b"after");
    let recorded = wait_until(DEFAULT_TIMEOUT, || {
        echo.echoes().iter().any(|e| e.bytes == 12 && e.saw_eof)
    })
    .await;
    assert!(recorded, "{:?}", echo.echoes());
    assert_eq!(other.accepted(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let origin = start_plain_origin("o").await;
    let port = free_port();
    let mut sluice = Sluice::start(&config(
        &[mes("o", "http", &[ep(origin.addr())], None)],
        &[(port, "o")],
    ))
    .await;
    let mut long = H1Client::connect(local(port)).await.unwrap();
    let req = long
        .request(Method::GET, "/slow?ms=800&chunks=8")
        .body(empty())
        .unwrap();
    let head = long.send_streaming(req).await.unwrap();
    sluice.sigterm();
    let refused = stops_accepting(port).await;
    assert!(refused, "a draining proxy must stop accepting");
    let body = collect_response(head).await.unwrap().text();
    assert_eq!(body.lines().count(), 8, "{body}");
    let exit = sluice
        .wait_exit(DEFAULT_TIMEOUT)
        .await
        .expect("must exit after draining");
    assert!(exit.success(), "{exit:?}: {}", sluice.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_connections_beyond_it() {
    let (echo, _sluice, port) = echo_behind_sluice(&["--max-connections", "1"]).await;
    let mut first = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    read_exact_in_time(&mut first, &mut buf).await;
    let mut second = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    assert_closed_by_proxy(&mut second).await;
    // The one over the limit never reached the origin.
    assert_eq!(echo.accepted(), 1);
    let back = half_close_roundtrip(&mut first, b"still here")
        .await
        .unwrap();
    assert_eq!(back, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_before_the_response_is_still_logged_and_counted() {
    let (silent_addr, hold) = silent_listener().await;
    let port = free_port();
    let sluice = Sluice::start(&config(
        &[mes("silent", "http", &[ep(silent_addr)], None)],
        &[(port, "silent")],
    ))
    .await;
    let mut app = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    app.write_all(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let arrived = wait_until_async(DEFAULT_TIMEOUT, || async {
        metric(&sluice, "sluice_upstream_connections_total", "silent").await >= 1.0
    })
    .await;
    assert!(arrived);
    drop(app);
    let log = sluice.wait_for_log(1).await;
    assert_eq!(log[0]["path"], "/stall");
    assert!(log[0]["status"].is_null());
    assert_eq!(
        log[0]["error"],
        "downstream closed before the response started"
    );
    assert_eq!(
        metric(
            &sluice,
            "sluice_http_requests_total{service=\"silent\",code=\"0\"}",
            "silent"
        )
        .await,
        1.0
    );
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_is_closed_and_a_busy_one_is_not() {
    let (_echo, sluice, port) = echo_behind_sluice(&["--tcp-idle-timeout", "400ms"]).await;
    let mut idle = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    let mut busy = tokio::net::TcpStream::connect(local(port)).await.unwrap();
    idle.write_all(b"hi").await.unwrap();
    let mut two = [0u8; 2];
    read_exact_in_time(&mut idle, &mut two).await;
    // Keep one connection talking well past the idle timeout.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(900) {
        busy.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        read_exact_in_time(&mut busy, &mut one).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_closed_by_proxy(&mut idle).await;
    let back = half_close_roundtrip(&mut busy, b"still open")
        .await
        .unwrap();
    assert_eq!(back, b"still open");
    let log = sluice.wait_for_log(2).await;
    let closed = log
        .iter()
        .find(|l| l["error"] == "closed after 400ms without traffic")
        .unwrap_or_else(|| panic!("{log:?}"));
    // What it carried before the timeout is still counted.
    assert_eq!(
        (closed["bytes_in"].as_u64(), closed["bytes_out"].as_u64()),
        (Some(2), Some(2))
    );
    let busy_line = log
        .iter()
        .find(|l| l["error"].is_null())
        .unwrap_or_else(|| panic!("{log:?}"));
    let sent = busy_line["bytes_in"].as_u64().unwrap();
    assert!(sent > "still open".len() as u64, "{busy_line}");
    assert_eq!(busy_line["bytes_out"].as_u64(), Some(sent));
    // Plain sockets both sides: both relays borrowed buffers only while bytes moved, and the idle
    // timeout still held.
    let metrics = sluice.admin_get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("sluice_relays_total{mode=\"pooled\"} 2\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kuma_legacy_external_service_by_its_tag_and_by_its_address() {
    let origin = start_tls_origin("legacy").await;
    let port = free_port();
    let ca: String = pki()
        .ca_pem()
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let yaml = format!(
        "type: ExternalService
mesh: default
name: legacy-api
tags:
  kuma.io/service: legacy-api
  kuma.io/protocol: http
networking:
  address: localhost:{op}
  tls:
    enabled: true
    serverName: origin.test
    caCert:
      inlineString: |
{ca}---
type: Dataplane
mesh: default
name: app
networking:
  address: 127.0.0.1
  outbound:
    - port: {port}
      tags:
        kuma.io/service: legacy-api
",
        op = origin.port()
    );
    let sluice = Sluice::start(&yaml).await;

    // The universal outbound selects the service by its tag; TLS is originated and verified.
    let mut app = H1Client::connect(local(port)).await.unwrap();
    let r = app.get("/by-tag").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/by-tag");
    let authority = format!("origin.test:{}", origin.port());
    assert_eq!(seen.effective_authority(), Some(authority.as_str()));
    assert_eq!(
        origin.last_tls().unwrap().sni.as_deref(),
        Some("origin.test")
    );

    // Through the forward proxy by its real address: plain HTTP to the TLS port is originated,
    // never sent in clear.
    let (_, text) = proxy_get(
        sluice.http_proxy_addr(),
        &format!("http://localhost:{}/by-address", origin.port()),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(origin.last_request().unwrap().path, "/by-address");
    assert_eq!(
        origin.handshakes(),
        1,
        "one pooled TLS connection carries both"
    );
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice
            .access_log_lines()
            .iter()
            .filter(|l| l["service"] == "legacy-api" && l["status"] == 200)
            .count()
            == 2
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());
}
