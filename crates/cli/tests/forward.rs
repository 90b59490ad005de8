//! The forward proxy and its outbound traffic policy, attacked the ways egress controls are
//! known to be bypassed. Every row runs against a real proxy process on loopback; origins are
//! declared explicitly, since loopback is refused unless an external service names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TLS origin reachable by name (`localhost`) and by its IP, and a plain origin, registered;
/// the second plain origin is registered under no service.
struct World {
    tls: Origin,
    plain: Origin,
    unregistered: Origin,
    sluice: Sluice,
}

fn registry(tls: &Origin, plain: &Origin) -> String {
    let ca: String = pki()
        .ca_pem()
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    format!(
        "type: MeshExternalService
name: tls-origin
spec:
  match: {{port: {tp}, protocol: tcp}}
  endpoints:
    - {{address: localhost, port: {tp}}}
    - {{address: 127.0.0.1, port: {tp}}}
---
type: MeshExternalService
name: plain-origin
spec:
  match: {{port: {pp}, protocol: http}}
  endpoints:
    - {{address: localhost, port: {pp}}}
    - {{address: 127.0.0.1, port: {pp}}}
---
type: MeshExternalService
name: originate
spec:
  match: {{port: 80, protocol: http}}
  endpoints:
    - {{address: localhost, port: {tp}}}
    - {{address: 127.0.0.1, port: {tp}}}
  tls:
    enabled: true
    verification:
      serverName: origin.test
      caCert:
        inlineString: |
{ca}",
        tp = tls.port(),
        pp = plain.port(),
    )
}

async fn world(mode: &str) -> World {
    let tls = start_tls_origin("tls").await;
    let plain = start_plain_origin("plain").await;
    let unregistered = start_plain_origin("unregistered").await;
    let sluice = Sluice::start_with_args(
        &registry(&tls, &plain),
        &["--outbound-traffic-policy", mode],
    )
    .await;
    World {
        tls,
        plain,
        unregistered,
        sluice,
    }
}

/// A raw request line sent to the proxy; returns status and body.
async fn raw(proxy: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_response_head(&mut s).await
}

/// TLS through an open tunnel; `sni` is a DNS name or an IP (no SNI).
async fn tls_through(
    stream: TcpStream,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let config = ClientTls::default().build();
    tokio::time::timeout(
        DEFAULT_TIMEOUT,
        TlsConnector::from(config).connect(name, stream),
    )
    .await
    .unwrap()
}

async fn get_over(mut tls: tokio_rustls::client::TlsStream<TcpStream>, host: &str) -> String {
    tls.write_all(
        format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEFAULT_TIMEOUT, tls.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_only_what_was_checked() {
    let w = world("restricted").await;
    let proxy = w.sluice.http_proxy_addr();
    let tp = w.tls.port();

    // Registered name, matching SNI: the app's own TLS goes through untouched.
    let (status, _, s) = proxy_connect(proxy, &format!("localhost:{tp}")).await;
    assert_eq!(status, 200);
    let answer = get_over(tls_through(s, "localhost").await.unwrap(), "localhost").await;
    assert!(answer.contains("origin:tls"), "{answer}");
    assert_eq!(w.tls.last_tls().unwrap().sni.as_deref(), Some("localhost"));

    // Domain fronting: the ClientHello names another host than the CONNECT target.
    let before = w.tls.accepted();
    let (status, _, s) = proxy_connect(proxy, &format!("localhost:{tp}")).await;
    assert_eq!(status, 200);
    assert!(
        tls_through(s, "origin.test").await.is_err(),
        "a fronted SNI must close the tunnel"
    );
    // No SNI at all.
    let (status, _, s) = proxy_connect(proxy, &format!("localhost:{tp}")).await;
    assert_eq!(status, 200);
    assert!(
        tls_through(s, "127.0.0.1").await.is_err(),
        "a missing SNI must close the tunnel"
    );
    // Plain bytes where TLS is expected.
    let (status, _, mut s) = proxy_connect(proxy, &format!("localhost:{}", w.plain.port())).await;
    assert_eq!(status, 200);
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEFAULT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        out.is_empty(),
        "non-TLS bytes to an http service must not pass: {}",
        String::from_utf8_lossy(&out)
    );
    // The refused tunnels never reached an origin with a handshake.
    assert_eq!(w.tls.handshakes(), 1, "before: {before}");
    assert_eq!(w.plain.request_count(), 0);

    // An IP the registry names, no SNI: allowed.
    let (status, _, s) = proxy_connect(proxy, &format!("127.0.0.1:{tp}")).await;
    assert_eq!(status, 200);
    assert!(
        get_over(tls_through(s, "127.0.0.1").await.unwrap(), "127.0.0.1")
            .await
            .contains("origin:tls")
    );

    // Each tunnel counted once: refused ones by why, the two that carried traffic as allowed.
    let text = w.sluice.admin_get("/metrics").await.unwrap().text();
    // The two tunnels that carried traffic joined two plain sockets (pooled buffers), once closed.
    let pooled = wait_until_async(DEFAULT_TIMEOUT, || async {
        let text = w.sluice.admin_get("/metrics").await.unwrap().text();
        text.contains("sluice_relays_total{mode=\"pooled\"} 2\n")
    })
    .await;
    assert!(pooled, "both tunnels must be counted as pooled");
    for line in [
        "sluice_forward_proxy_decisions_total{decision=\"denied\",reason=\"sni_mismatch\"} 2",
        "sluice_forward_proxy_decisions_total{decision=\"denied\",reason=\"not_tls\"} 1",
        "sluice_forward_proxy_decisions_total{decision=\"allowed\",reason=\"tunnel\"} 2",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_catalogue_is_refused() {
    let w = world("restricted").await;
    let proxy = w.sluice.http_proxy_addr();
    let tp = w.tls.port();
    let up = w.unregistered.port();
    // (what is tried, request, expected status, text the answer must contain)
    let rows: Vec<(&str, String, u16, &str)> = vec![
        ("allowed host, another port", format!("CONNECT localhost:{up} HTTP/1.1\r\nHost: x\r\n\r\n"), 403, "not a registered external service"),
        ("CONNECT to a port that originates TLS", "CONNECT localhost:80 HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 403, "plain-HTTP port"),
        ("IP literal not named", format!("CONNECT 127.0.0.2:{tp} HTTP/1.1\r\nHost: x\r\n\r\n"), 403, "not a registered"),
        ("decimal spelling", format!("CONNECT 2130706433:{tp} HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "numeric spellings"),
        ("hex spelling", format!("CONNECT 0x7f.1:{tp} HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "numeric spellings"),
        ("octal spelling", format!("CONNECT 0177.0.0.1:{tp} HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "numeric spellings"),
        ("short spelling", format!("CONNECT 127.1:{tp} HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "numeric spellings"),
        ("unregistered http", format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: localhost:{up}\r\n\r\n"), 403, "restricted"),
        ("Host disagrees with target", format!("GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost:{up}\r\n\r\n", w.plain.port()), 400, "does not agree"),
        ("two Host headers", format!("GET http://localhost:{p}/ HTTP/1.1\r\nHost: localhost:{p}\r\nHost: evil.example\r\n\r\n", p = w.plain.port()), 400, "more than once"),
        ("port above 65535", "GET http://localhost:70000/ HTTP/1.1\r\nHost: localhost:70000\r\n\r\n".to_string(), 400, "port is not a number"),
        ("userinfo", format!("GET http://user:pw@localhost:{}/ HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", w.plain.port(), w.plain.port()), 400, "userinfo"),
        ("origin-form to the proxy", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(), 400, "absolute-form"),
        ("CL and TE", format!("POST http://localhost:{p}/echo HTTP/1.1\r\nHost: localhost:{p}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", p = w.plain.port()), 400, "Transfer-Encoding and Content-Length"),
        ("duplicate CL", format!("POST http://localhost:{p}/echo HTTP/1.1\r\nHost: localhost:{p}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", p = w.plain.port()), 400, ""),
        ("obs-fold", format!("GET http://localhost:{p}/ HTTP/1.1\r\nHost: localhost:{p}\r\nX-A: a\r\n folded\r\n\r\n", p = w.plain.port()), 400, ""),
    ];
    for (what, request, status, text) in rows {
        let (got, body) = raw(proxy, &request).await;
        assert_eq!(got, status, "{what}: {body}");
        if text.is_empty() {
            // Refused by the HTTP parser before the proxy reads it: no body at all.
            assert_eq!(body, "", "{what}");
        } else {
            assert!(body.contains(text), "{what}: {body}");
        }
    }
    assert_eq!(w.unregistered.request_count(), 0);
    assert_eq!(w.plain.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_loopback_and_the_proxy_itself_are_refused_even_when_allowed() {
    let w = world("allowed").await;
    let proxy = w.sluice.http_proxy_addr();
    let up = w.unregistered.port();
    let rows = [
        format!("[::ffff:127.0.0.1]:{up}"),
        format!("[64:ff9b::7f00:1]:{up}"),
        format!("[2002:7f00:1::]:{up}"),
        format!("[2001:0:808:808:0:0:80ff:fffe]:{up}"),
        format!("localhost:{up}"),
        format!("127.0.0.1:{up}"),
    ];
    for target in rows {
        let (status, body, _) = proxy_connect(proxy, &target).await;
        assert_eq!(status, 403, "{target}: {body}");
        assert!(body.contains("loopback address"), "{target}: {body}");
    }
    let (status, body, _) = proxy_connect(proxy, &format!("localhost:{}", proxy.port())).await;
    assert_eq!(status, 403);
    assert!(body.contains("this proxy itself"), "{body}");
    assert_eq!(w.unregistered.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_connection_is_checked_and_tls_is_originated_for_plain_http() {
    let w = world("restricted").await;
    let proxy = w.sluice.http_proxy_addr();
    let pp = w.plain.port();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("GET http://localhost:{pp}/headers HTTP/1.1\r\nHost: localhost:{pp}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (status, body) = read_response_head(&mut s).await;
    assert_eq!(status, 200, "{body}");
    // Same connection, another authority.
    let up = w.unregistered.port();
    s.write_all(
        format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: localhost:{up}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (status, body) = read_response_head(&mut s).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(w.unregistered.request_count(), 0);

    // A redirect to the metadata address is handed back, never followed.
    let (status, _) = raw(
        proxy,
        &format!("GET http://localhost:{pp}/redirect-to-metadata HTTP/1.1\r\nHost: localhost:{pp}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 302);
    let served = w
        .plain
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect::<Vec<_>>();
    assert_eq!(served, ["/headers", "/redirect-to-metadata"]);

    // The blog's pattern: plain http://...:80 from the app, HTTPS to the service's endpoint.
    let (status, body) = raw(
        proxy,
        "GET http://localhost/headers?q=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = w.tls.last_request().unwrap();
    assert_eq!(seen.path, "/headers");
    assert_eq!(
        w.tls.last_tls().unwrap().sni.as_deref(),
        Some("origin.test")
    );
    let log = w.sluice.access_log_lines();
    let _ = log;
    let found = wait_until(DEFAULT_TIMEOUT, || {
        w.sluice.access_log_lines().iter().any(|l| {
            l["path"] == "/headers?q=1" && l["status"] == 200 && l["tls_version"] == "TLSv1.3"
        })
    })
    .await;
    assert!(found, "{:?}", w.sluice.access_log_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_keeps_open_tunnels_and_applies_to_the_next() {
    let w = world("allowed").await;
    let proxy = w.sluice.http_proxy_addr();
    let tp = w.tls.port();
    let (status, _, s) = proxy_connect(proxy, &format!("localhost:{tp}")).await;
    assert_eq!(status, 200);
    let open = tls_through(s, "localhost").await.unwrap();

    let token = w.sluice.admin_token();
    let admin = w.sluice.admin_addr().to_string();
    let set = |mode: &str, token: &str| {
        sluice_cli(
            &["outbound-traffic-policy", mode, "--admin", &admin],
            &[("SLUICE_TOKEN", token)],
        )
    };
    // Another process on loopback (the app itself, say) cannot lift the policy.
    for wrong in ["", "not-the-admin-token"] {
        let out = set("restricted", wrong);
        assert!(!out.ok);
        assert!(
            out.stderr.contains("changing the policy needs the token"),
            "{}",
            out.stderr
        );
    }
    assert!(w
        .sluice
        .admin_get("/outbound-traffic-policy")
        .await
        .unwrap()
        .text()
        .contains("ALLOW_ANY"));

    let out = set("restricted", &token);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "mesh wide outbound traffic policy is set to 'REGISTRY_ONLY'\n"
    );
    // The open tunnel is not cut.
    let answer = get_over(open, "localhost").await;
    assert!(answer.contains("origin:tls"), "{answer}");
    // The next one follows the new mode.
    let (status, body, _) =
        proxy_connect(proxy, &format!("localhost:{}", w.unregistered.port())).await;
    assert_eq!(status, 403);
    assert!(body.contains("restricted"), "{body}");

    let out = set("allowed", &token);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "mesh wide outbound traffic policy is set to 'ALLOW_ANY'\n"
    );
}

/// curl and Python's standard library pointed at the proxy as users do. curl never uses the
/// proxy environment variables for `localhost`, so it is given the same proxy with `--proxy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_through_the_proxy() {
    for tool in ["curl", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let w = world("restricted").await;
    let proxy = format!("http://{}", w.sluice.http_proxy_addr());
    let dir = TempDir::new("clients");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki().ca_pem()).unwrap();
    let tp = w.tls.port();
    let pp = w.plain.port();
    let up = w.unregistered.port();
    let curl = |url: String| {
        let proxy = proxy.clone();
        let ca = ca.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new("curl")
                    .args([
                        "-sS",
                        "--max-time",
                        "10",
                        "--proxy",
                        &proxy,
                        "--cacert",
                        ca.to_str().unwrap(),
                        "-w",
                        "\n%{http_code}",
                        &url,
                    ])
                    .env("HTTPS_PROXY", &proxy)
                    .env("HTTP_PROXY", &proxy)
                    .env("NO_PROXY", "")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = curl(format!("https://localhost:{tp}/x")).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("origin:tls") && text.ends_with("200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(format!("http://localhost:{pp}/x")).await;
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("200"));
    let out = curl(format!("http://localhost:{up}/x")).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("403"),
        "{text} {} {:?}",
        String::from_utf8_lossy(&out.stderr),
        w.sluice.access_log_lines()
    );
    let out = curl(format!("https://localhost:{up}/x")).await;
    assert!(
        !out.status.success(),
        "a refused CONNECT must fail the request"
    );

    let script = format!(
        "import ssl, urllib.request, urllib.error\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         print(urllib.request.urlopen('https://localhost:{tp}/x', context=ctx, timeout=10).read().decode())\n\
         print(urllib.request.urlopen('http://localhost:{pp}/x', timeout=10).read().decode())\n\
         try:\n    urllib.request.urlopen('http://localhost:{up}/x', timeout=10)\nexcept urllib.error.HTTPError as e:\n    print(e.code)\n",
        ca = ca.to_str().unwrap(),
    );
    let proxy2 = proxy.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", &script])
            .env("HTTPS_PROXY", &proxy2)
            .env("HTTP_PROXY", &proxy2)
            .env("https_proxy", &proxy2)
            .env("http_proxy", &proxy2)
            .env("NO_PROXY", "")
            .env("no_proxy", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "origin:tls\norigin:plain\n403\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every one of those went through the proxy.
    let seen = wait_until(DEFAULT_TIMEOUT, || {
        let log = w.sluice.access_log_lines();
        log.iter().filter(|l| l["kind"] == "tunnel").count() >= 2
            && log.iter().filter(|l| l["status"] == 403).count() >= 3
    })
    .await;
    assert!(seen, "{:?}", w.sluice.access_log_lines());
}

/// A Kuma Mesh with `passthrough: false` restricts outbound traffic whatever the flag says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_without_passthrough_restricts() {
    let tls = start_tls_origin("tls").await;
    let plain = start_plain_origin("plain").await;
    let unregistered = start_plain_origin("unregistered").await;
    let yaml = format!(
        "{}---\ntype: Mesh\nname: default\nnetworking:\n  outbound:\n    passthrough: false\n",
        registry(&tls, &plain)
    );
    let sluice = Sluice::start_with_args(&yaml, &["--outbound-traffic-policy", "allowed"]).await;
    let policy = sluice
        .admin_get("/outbound-traffic-policy")
        .await
        .unwrap()
        .text();
    assert_eq!(
        policy,
        "mesh wide outbound traffic policy is set to 'REGISTRY_ONLY'\n"
    );
    let up = unregistered.port();
    let (status, body) = raw(
        sluice.http_proxy_addr(),
        &format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: localhost:{up}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("policy is restricted"), "{body}");
}

/// A DNS server for one test: A queries for any name get `first` the first time and `later`
/// after that; AAAA queries get no answer. Counts the A queries it answered.
async fn rebinding_dns(
    first: std::net::Ipv4Addr,
    later: std::net::Ipv4Addr,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let q = &buf[..n];
            // Header (12 bytes), then one question: labels, a zero byte, type and class.
            let Some(end) = q[12..].iter().position(|b| *b == 0).map(|p| 12 + p + 5) else {
                continue;
            };
            if end > n {
                continue;
            }
            let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
            let mut answer = Vec::with_capacity(end + 16);
            answer.extend_from_slice(&q[..2]);
            answer.extend_from_slice(&[0x81, 0x80, 0, 1]);
            let is_a = qtype == 1;
            answer.extend_from_slice(&[0, u8::from(is_a), 0, 0, 0, 0]);
            answer.extend_from_slice(&q[12..end]);
            if is_a {
                let ip = if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    first
                } else {
                    later
                };
                answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
                answer.extend_from_slice(&ip.octets());
            }
            let _ = socket.send_to(&answer, from).await;
        }
    });
    (addr, count, task)
}

/// The proxy resolves once and dials the address it checked: a name that answers an allowed
/// address first and a refused one next never reaches the refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_name_reaches_only_the_address_that_was_checked() {
    let plain = start_plain_origin("plain").await;
    let pp = plain.port();
    // Something listening where the second answer points, to see whether anything arrives.
    let trap = tokio::net::TcpListener::bind(("127.0.0.3", pp))
        .await
        .unwrap();
    let (dns, queries, dns_task) =
        rebinding_dns([127, 0, 0, 1].into(), [127, 0, 0, 3].into()).await;
    let yaml = format!(
        "type: MeshExternalService\nname: rebind\nspec:\n  match: {{port: {pp}, protocol: http}}\n  endpoints:\n    - {{address: rebind.test, port: {pp}}}\n    - {{address: 127.0.0.1, port: {pp}}}\n"
    );
    let sluice = Sluice::start_with_args(
        &yaml,
        &[
            "--outbound-traffic-policy",
            "restricted",
            "--dns-server",
            &dns.to_string(),
        ],
    )
    .await;
    let (status, body) = raw(
        sluice.http_proxy_addr(),
        &format!("GET http://rebind.test:{pp}/x HTTP/1.1\r\nHost: rebind.test:{pp}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "origin:plain");
    assert_eq!(queries.load(Ordering::SeqCst), 1, "one lookup per request");
    assert_eq!(
        plain.last_request().unwrap().host.as_deref(),
        Some(&*format!("rebind.test:{pp}"))
    );
    let nothing = tokio::time::timeout(std::time::Duration::from_millis(200), trap.accept()).await;
    assert!(nothing.is_err(), "nothing may reach the rebound address");
    dns_task.abort();
}

/// Runs a program and returns its stdout, or `None` (with a message) when the tool is missing.
async fn run_client(
    program: &str,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> Option<String> {
    let name = program.to_string();
    let out =
        tokio::task::spawn_blocking(move || Command::new(&name).args(&args).envs(env).output())
            .await
            .unwrap();
    match out {
        Err(_) => {
            eprintln!("skipped: {program} is not installed");
            None
        }
        Ok(out) => {
            assert!(
                out.status.success() || !out.stdout.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).to_string())
        }
    }
}

/// Node and Java, each taking the proxy from HTTPS_PROXY the way their proxy agents do:
/// Node by a CONNECT request and TLS over the tunnel, Java through its proxy properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_java_through_the_proxy() {
    let w = world("restricted").await;
    let proxy = format!("http://{}", w.sluice.http_proxy_addr());
    let dir = TempDir::new("clients");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki().ca_pem()).unwrap();
    let tp = w.tls.port();
    let up = w.unregistered.port();

    let node = format!(
        r#"
const http = require('http'), tls = require('tls'), fs = require('fs');
const proxy = new URL(process.env.HTTPS_PROXY);
function get(port) {{
  return new Promise((resolve) => {{
    const req = http.request({{host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: `localhost:${{port}}`}});
    req.on('connect', (res, socket) => {{
      if (res.statusCode !== 200) {{ resolve(String(res.statusCode)); socket.destroy(); return; }}
      const s = tls.connect({{socket, servername: 'localhost', ca: fs.readFileSync({ca:?})}}, () => {{
        s.write('GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
      }});
      let body = '';
      s.on('data', (d) => body += d);
      s.on('end', () => resolve(body.split('\r\n\r\n')[1]));
      s.on('error', (e) => resolve('error ' + e.message));
    }});
    req.end();
  }});
}}
(async () => {{ console.log(await get({tp})); console.log(await get({up})); }})();
"#,
        ca = ca.to_str().unwrap()
    );
    let env = vec![("HTTPS_PROXY".to_string(), proxy.clone())];
    if let Some(out) = run_client("node", vec!["-e".into(), node], env.clone()).await {
        assert_eq!(out, "origin:tls\n403\n");
    }

    let store = dir.join("trust.p12");
    let imported = Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "test-ca",
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
        ])
        .args([
            "-file",
            ca.to_str().unwrap(),
            "-keystore",
            store.to_str().unwrap(),
        ])
        .output();
    if imported.is_err() {
        eprintln!("skipped: keytool is not installed");
        return;
    }
    let java = dir.join("Get.java");
    std::fs::write(
        &java,
        r#"
import java.net.*; import java.net.http.*;
public class Get {
  public static void main(String[] a) throws Exception {
    URI p = URI.create(System.getenv("HTTPS_PROXY"));
    HttpClient c = HttpClient.newBuilder()
        .proxy(ProxySelector.of(new InetSocketAddress(p.getHost(), p.getPort()))).build();
    for (String url : a) {
      try {
        HttpResponse<String> r = c.send(HttpRequest.newBuilder(URI.create(url)).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println(r.statusCode() + " " + r.body());
      } catch (java.io.IOException e) {
        System.out.println("refused " + e.getMessage());
      }
    }
  }
}
"#,
    )
    .unwrap();
    let args = vec![
        format!("-Djavax.net.ssl.trustStore={}", store.display()),
        "-Djavax.net.ssl.trustStorePassword=changeit".into(),
        "-Djdk.internal.httpclient.disableHostnameVerification=false".into(),
        java.to_str().unwrap().to_string(),
        format!("https://localhost:{tp}/x"),
        format!("http://localhost:{}/x", w.plain.port()),
        format!("http://localhost:{up}/x"),
    ];
    if let Some(out) = run_client("java", args, env).await {
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0], "200 origin:tls");
        assert_eq!(lines[1], "200 origin:plain");
        assert!(lines[2].starts_with("403 "), "{out}");
    }
}

/// Go's net/http with the proxy from HTTPS_PROXY. Go never proxies loopback names on its own,
/// so the transport is given the same URL explicitly, as users do for tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_through_the_proxy() {
    let w = world("restricted").await;
    let proxy = format!("http://{}", w.sluice.http_proxy_addr());
    let dir = TempDir::new("go-client");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki().ca_pem()).unwrap();
    let program = dir.join("main.go");
    std::fs::write(
        &program,
        r#"package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
)

func main() {
	proxy, _ := url.Parse(os.Getenv("HTTPS_PROXY"))
	pem, _ := os.ReadFile(os.Args[1])
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	client := &http.Client{Transport: &http.Transport{
		Proxy:           http.ProxyURL(proxy),
		TLSClientConfig: &tls.Config{RootCAs: roots},
	}}
	for _, u := range os.Args[2:] {
		r, err := client.Get(u)
		if err != nil {
			fmt.Println("refused")
			continue
		}
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		fmt.Printf("%d %s\n", r.StatusCode, body)
	}
}
"#,
    )
    .unwrap();
    let cache = dir.join("cache");
    let env = vec![
        ("HTTPS_PROXY".to_string(), proxy),
        ("GOCACHE".to_string(), cache.to_str().unwrap().to_string()),
        ("HOME".to_string(), dir.path().to_str().unwrap().to_string()),
        ("GO111MODULE".to_string(), "off".to_string()),
    ];
    let args = vec![
        "run".to_string(),
        program.to_str().unwrap().to_string(),
        ca.to_str().unwrap().to_string(),
        format!("https://localhost:{}/x", w.tls.port()),
        format!("http://localhost:{}/x", w.plain.port()),
        format!("http://localhost:{}/x", w.unregistered.port()),
        format!("https://localhost:{}/x", w.unregistered.port()),
    ];
    if let Some(out) = run_client("go", args, env).await {
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], "200 origin:tls");
        assert_eq!(lines[1], "200 origin:plain");
        assert!(lines[2].starts_with("403 "), "{out}");
        assert_eq!(lines[3], "refused");
    }
}

/// Open tunnels hold their place under --max-connections until they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_connection_limit() {
    let tls = start_tls_origin("tls").await;
    let plain = start_plain_origin("plain").await;
    let sluice = Sluice::start_with_args(
        &registry(&tls, &plain),
        &[
            "--outbound-traffic-policy",
            "restricted",
            "--max-connections",
            "2",
        ],
    )
    .await;
    let proxy = sluice.http_proxy_addr();
    let target = format!("localhost:{}", tls.port());
    let (s1, _, t1) = proxy_connect(proxy, &target).await;
    let (s2, _, t2) = proxy_connect(proxy, &target).await;
    assert_eq!((s1, s2), (200, 200));
    let _open = (
        tls_through(t1, "localhost").await.unwrap(),
        tls_through(t2, "localhost").await.unwrap(),
    );
    // A third connection is over the limit while both tunnels are open.
    let mut third = TcpStream::connect(proxy).await.unwrap();
    third
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (out, _) = read_until_closed(&mut third).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert_eq!(tls.accepted(), 2, "the third never reached the origin");
    // When a tunnel ends, its slot is free again.
    drop(_open);
    let reopened = wait_until_async(DEFAULT_TIMEOUT, || async {
        let Ok(mut s) = TcpStream::connect(proxy).await else {
            return false;
        };
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut head = [0u8; 12];
        s.write_all(request.as_bytes()).await.is_ok()
            && tokio::time::timeout(DEFAULT_TIMEOUT, s.read_exact(&mut head))
                .await
                .is_ok_and(|r| r.is_ok())
            && &head == b"HTTP/1.1 200"
    })
    .await;
    assert!(reopened, "{}", sluice.stderr());
}

/// A request head that never completes is dropped at the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_head_is_dropped_at_the_header_timeout() {
    let tls = start_tls_origin("tls").await;
    let plain = start_plain_origin("plain").await;
    let sluice =
        Sluice::start_with_args(&registry(&tls, &plain), &["--header-read-timeout", "300ms"]).await;
    let mut s = TcpStream::connect(sluice.http_proxy_addr()).await.unwrap();
    s.write_all(b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut s).await;
    assert_cut_off_at(took, 300);
    assert_eq!(plain.request_count(), 0);
}

/// Bound to every address, the proxy is still never its own destination, even where a service
/// names that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_bound_everywhere_refuses_itself() {
    let port = free_port();
    let yaml = format!(
        "type: MeshExternalService\nname: itself\nspec:\n  match: {{port: {port}, protocol: tcp}}\n  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n"
    );
    let sluice = Sluice::start_with_args(
        &yaml,
        &[
            "--http-proxy",
            &format!("0.0.0.0:{port}"),
            "--outbound-traffic-policy",
            "restricted",
        ],
    )
    .await;
    let (status, body, _) =
        proxy_connect(([127, 0, 0, 1], port).into(), &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("this proxy itself"), "{body}");
    drop(sluice);
}

/// A plain-HTTP request whose server fails: 502 when it closes, 504 when it never answers; one
/// access-log line each, with the method, the service and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_gets_one_log_line_and_the_right_status() {
    let (closing, _closer) = closing_listener().await;
    let (silent, _holder) = silent_listener().await;
    let service = |name: &str, addr: SocketAddr| {
        format!(
            "type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {p}, protocol: http}}\n  endpoints: [{{address: 127.0.0.1, port: {p}}}]\n",
            p = addr.port()
        )
    };
    let sluice = Sluice::start_with_args(
        &[service("closing", closing), service("silent", silent)].join("---\n"),
        &[
            "--outbound-traffic-policy",
            "restricted",
            "--response-timeout",
            "300ms",
        ],
    )
    .await;
    let proxy = sluice.http_proxy_addr();
    for (addr, status) in [(closing, 502), (silent, 504)] {
        let (got, body) = raw(
            proxy,
            &format!(
                "POST http://127.0.0.1:{p}/submit HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Length: 2\r\n\r\nhi",
                p = addr.port()
            ),
        )
        .await;
        assert_eq!(got, status, "{body}");
        assert!(body.starts_with("sluice: "), "{body}");
    }
    let log = sluice.wait_for_log(2).await;
    let forward: Vec<_> = log.iter().filter(|l| l["kind"] == "forward").collect();
    assert_eq!(forward.len(), 2, "{log:?}");
    for (line, (service, status)) in forward.iter().zip([("closing", 502), ("silent", 504)]) {
        assert_eq!(line["method"], "POST", "{line}");
        assert_eq!(line["service"], service, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert!(line["error"].is_string(), "{line}");
    }
}

/// SIGTERM drains the forward proxy too: it stops accepting, an open tunnel is closed at the
/// drain deadline, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_open_tunnels_at_the_drain_deadline() {
    let tls = start_tls_origin("tls").await;
    let plain = start_plain_origin("plain").await;
    let mut sluice = Sluice::start_with_args(
        &registry(&tls, &plain),
        &[
            "--outbound-traffic-policy",
            "restricted",
            "--drain-timeout",
            "500ms",
        ],
    )
    .await;
    let proxy = sluice.http_proxy_addr();
    let (status, _, s) = proxy_connect(proxy, &format!("localhost:{}", tls.port())).await;
    assert_eq!(status, 200);
    let mut open = tls_through(s, "localhost").await.unwrap();
    let started = std::time::Instant::now();
    sluice.sigterm();
    assert!(stops_accepting(proxy.port()).await, "{}", sluice.stderr());
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEFAULT_TIMEOUT, open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the tunnel must be closed at the deadline");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    let exit = sluice.wait_exit(DEFAULT_TIMEOUT).await.expect("must exit");
    assert!(exit.success(), "{exit:?}: {}", sluice.stderr());
    let log = sluice.access_log_lines();
    let tunnel = log
        .iter()
        .find(|l| l["kind"] == "tunnel")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(tunnel["error"], "closed at the end of the drain deadline");
}
