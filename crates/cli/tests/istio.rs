//! Istio's own resources, unchanged, through the forward proxy: the two scenarios of Istio's
//! "Consuming External Web Services" and Backyards' httpbin entry, with local origins standing
//! in for www.googleapis.com and httpbin.org (the test build pins those names to them; the
//! proxy still checks every SNI, certificate and policy as it would for the real hosts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

use support::*;

const PASSTHROUGH: &str =
    include_str!("../../api/tests/cases/seed-istio-egress-https-passthrough.yaml");
const ORIGINATION: &str =
    include_str!("../../api/tests/cases/seed-istio-egress-https-origination.yaml");
const BACKYARDS: &str = include_str!("../../api/tests/cases/seed-istio-backyards-httpbin.yaml");

const BOOKS: &str = "/books/v1/volumes?q=isbn:0486424618";

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A TLS origin with the certificate of the public names, signed by the test CA.
async fn public_tls_origin(name: &str) -> Origin {
    OriginBuilder::new(name)
        .tls(TlsSettings::default().cert(&pki().public))
        .start()
        .await
}

/// Sluice in restricted mode over `yaml`, with `pins` (`NAME:PORT=ADDR,...`) standing local
/// origins in for public names.
fn restricted(yaml: &str, pins: &str) -> SluiceBuilder {
    Sluice::builder()
        .config(yaml)
        .args(["--outbound-traffic-policy", "restricted"])
        .env("SLUICE_TEST_CONNECT_TO", pins)
}

/// A directory holding the test CA as `ca.pem`, and that file's path.
fn ca_file(name: &str) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(name);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki().ca_pem()).unwrap();
    (dir, ca)
}

/// curl through the proxy; stdout ends with the status code on a line of its own.
async fn curl(proxy: std::net::SocketAddr, ca: &std::path::Path, url: &str) -> Output {
    let args = [
        "-sS".to_string(),
        "--max-time".into(),
        "10".into(),
        "--proxy".into(),
        format!("http://{proxy}"),
        "--cacert".into(),
        ca.display().to_string(),
        "-w".into(),
        "\n%{http_code}".into(),
        url.to_string(),
    ];
    tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output().unwrap())
        .await
        .unwrap()
}

fn status_of(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit('\n').next().unwrap_or("").to_string()
}

fn show(out: &Output) -> String {
    format!(
        "stdout: {} stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_passthrough_is_routed_by_sni_and_follows_the_service_entry_live() {
    if !have("curl") {
        return;
    }
    let origin = public_tls_origin("googleapis").await;
    let (_dir, ca) = ca_file("istio-passthrough");
    let pin = format!("www.googleapis.com:443={}", origin.addr());
    let sluice = restricted(PASSTHROUGH, &pin).start().await;
    let proxy = sluice.http_proxy_addr();
    let url = format!("https://www.googleapis.com{BOOKS}");

    let out = curl(proxy, &ca, &url).await;
    assert_eq!(status_of(&out), "200", "{}", show(&out));
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/books/v1/volumes");
    assert_eq!(seen.query.as_deref(), Some("q=isbn:0486424618"));
    // End to end: the app's own TLS reached the origin, with its SNI.
    assert_eq!(
        origin.last_tls().unwrap().sni.as_deref(),
        Some("www.googleapis.com")
    );
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice.access_log_lines().iter().any(|l| {
            l["kind"] == "tunnel"
                && l["service"] == "googleapis_443"
                && l["authority"] == "www.googleapis.com:443"
                && l["path"] == "sni:www.googleapis.com"
        })
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());

    // Another port of the host is not opened, nor plain HTTP to the TLS port.
    let out = curl(proxy, &ca, "https://www.googleapis.com:8443/").await;
    assert_ne!(status_of(&out), "200", "{}", show(&out));
    let out = curl(proxy, &ca, "http://www.googleapis.com:443/").await;
    assert_eq!(status_of(&out), "403", "{}", show(&out));

    // `kubectl delete serviceentry googleapis`: the next call fails, without a restart.
    let vs_only = PASSTHROUGH
        .split("\n---\n")
        .find(|d| d.contains("kind: VirtualService"))
        .unwrap();
    sluice.rewrite_config(vs_only);
    let blocked = wait_until_async(DEFAULT_TIMEOUT, || async {
        status_of(&curl(proxy, &ca, &url).await) == "000"
    })
    .await;
    assert!(blocked, "still allowed after the ServiceEntry was deleted");
    let before = origin.request_count();
    let out = curl(proxy, &ca, &url).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        show(&out)
    );
    assert_eq!(origin.request_count(), before);

    // Applied again, it works again.
    sluice.rewrite_config(PASSTHROUGH);
    let open = wait_until_async(DEFAULT_TIMEOUT, || async {
        status_of(&curl(proxy, &ca, &url).await) == "200"
    })
    .await;
    assert!(open, "not allowed again after the ServiceEntry came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_port_80_is_sent_as_verified_https_to_443_with_the_path_logged() {
    if !have("curl") {
        return;
    }
    let origin = public_tls_origin("googleapis").await;
    let (dir, ca) = ca_file("istio-origination");
    let pin = format!("www.googleapis.com:443={}", origin.addr());
    // The DestinationRule names no CA: the system's roots decide, here the test CA.
    let sluice = restricted(ORIGINATION, &pin)
        .env("SSL_CERT_FILE", ca.to_str().unwrap())
        .start()
        .await;
    let proxy = sluice.http_proxy_addr();

    for _ in 0..3 {
        let out = curl(proxy, &ca, &format!("http://www.googleapis.com{BOOKS}")).await;
        assert_eq!(status_of(&out), "200", "{}", show(&out));
    }
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/books/v1/volumes");
    assert_eq!(seen.effective_authority(), Some("www.googleapis.com"));
    let tls = origin.last_tls().unwrap();
    assert_eq!(tls.sni.as_deref(), Some("www.googleapis.com"));
    // One upstream handshake carried all three requests.
    assert_eq!(origin.handshakes(), 1);
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice
            .access_log_lines()
            .iter()
            .filter(|l| {
                l["service"] == "googleapis_80"
                    && l["method"] == "GET"
                    && l["path"] == BOOKS
                    && l["status"] == 200
                    && l["tls_version"] == "TLSv1.3"
            })
            .count()
            == 3
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());

    // The app's own HTTPS to 443 is passed through as it is, not wrapped again.
    let before = origin.handshakes();
    let out = curl(proxy, &ca, &format!("https://www.googleapis.com{BOOKS}")).await;
    assert_eq!(status_of(&out), "200", "{}", show(&out));
    assert_eq!(origin.handshakes(), before + 1);

    // Verification is on: without the test CA among the roots the origin is refused.
    let unverified = restricted(ORIGINATION, &pin)
        .env(
            "SSL_CERT_FILE",
            dir.join("no-such-roots.pem").to_str().unwrap(),
        )
        .start()
        .await;
    let requests = origin.request_count();
    let out = curl(
        unverified.http_proxy_addr(),
        &ca,
        &format!("http://www.googleapis.com{BOOKS}"),
    )
    .await;
    assert_ne!(status_of(&out), "200", "{}", show(&out));
    assert_eq!(origin.request_count(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backyards_httpbin_entry_opens_both_hosts_on_port_80_only() {
    if !have("python3") {
        return;
    }
    let apex = start_plain_origin("httpbin").await;
    let www = start_plain_origin("www-httpbin").await;
    let pins = format!(
        "httpbin.org:80={},www.httpbin.org:80={}",
        apex.addr(),
        www.addr()
    );
    let sluice = restricted(BACKYARDS, &pins).start().await;
    let proxy = format!("http://{}", sluice.http_proxy_addr());
    let get = |url: &'static str| {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || {
            let script = format!(
                "import urllib.request,urllib.error\n\
                 o=urllib.request.build_opener(urllib.request.ProxyHandler({{'http':'{proxy}'}}))\n\
                 try:\n  r=o.open('{url}',timeout=10); print(r.status, r.read().decode())\n\
                 except urllib.error.HTTPError as e: print(e.code)\n"
            );
            let out = Command::new("python3")
                .args(["-c", &script])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    assert_eq!(
        get("http://httpbin.org/get").await.unwrap(),
        "200 origin:httpbin"
    );
    assert_eq!(
        get("http://www.httpbin.org/get").await.unwrap(),
        "200 origin:www-httpbin"
    );
    assert_eq!(apex.last_request().unwrap().path, "/get");
    assert_eq!(
        apex.last_request().unwrap().effective_authority(),
        Some("httpbin.org")
    );
    // An HTTP port takes requests the proxy can read, not tunnels.
    let (status, body, _) = proxy_connect(sluice.http_proxy_addr(), "httpbin.org:80").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("is an HTTP port of external service"),
        "{body}"
    );
    // Port 80 only, and only the entry's hosts.
    assert_eq!(get("http://httpbin.org:8080/get").await.unwrap(), "403");
    assert_eq!(get("http://eu.httpbin.org/get").await.unwrap(), "403");
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice.access_log_lines().iter().any(|l| {
            l["service"] == "backyards-demo/httpbin.org_80_www.httpbin.org"
                && l["path"] == "/get"
                && l["status"] == 200
        })
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_none_dials_the_name_it_checked_never_an_address_the_app_chose() {
    let origin = public_tls_origin("googleapis").await;
    let entry = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: google
spec:
  hosts: [\"*.googleapis.com\"]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  resolution: NONE
";
    let pin = format!("www.googleapis.com:443={}", origin.addr());
    let sluice = restricted(entry, &pin).start().await;
    let proxy = sluice.http_proxy_addr();
    let config = ClientTls::default().build();

    // A name under the wildcard: resolved by the proxy, and the hello must name it.
    let (status, _, tunnel) = proxy_connect(proxy, "www.googleapis.com:443").await;
    assert_eq!(status, 200);
    let name = rustls::pki_types::ServerName::try_from("www.googleapis.com").unwrap();
    let tls = tokio::time::timeout(
        DEFAULT_TIMEOUT,
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tunnel),
    )
    .await
    .unwrap();
    assert!(tls.is_ok(), "{tls:?}");
    assert!(wait_until(DEFAULT_TIMEOUT, || origin.handshakes() == 1).await);
    assert_eq!(
        origin.last_tls().unwrap().sni.as_deref(),
        Some("www.googleapis.com")
    );
    let handshakes = origin.handshakes();

    // Istio's hole: the address of the origin with an allowed SNI. Not an address the entry
    // names, so refused before any byte moves.
    let (status, _, _) = proxy_connect(proxy, &origin.addr().to_string()).await;
    assert_eq!(status, 403);
    // A hello that names another host under the same wildcard than the tunnel's.
    let (status, _, tunnel) = proxy_connect(proxy, "www.googleapis.com:443").await;
    assert_eq!(status, 200);
    let other = rustls::pki_types::ServerName::try_from("storage.googleapis.com").unwrap();
    let refused = tokio::time::timeout(
        DEFAULT_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(other, tunnel),
    )
    .await
    .unwrap();
    assert!(refused.is_err());
    // Names outside the wildcard, and the bare domain.
    for target in ["googleapis.com:443", "www.googleapis.com.evil.example:443"] {
        let (status, _, _) = proxy_connect(proxy, target).await;
        assert_eq!(status, 403, "{target}");
    }
    assert_eq!(origin.handshakes(), handshakes);
}
