//! Gloo Mesh's ExternalService and ExternalEndpoint, unchanged, through the forward proxy: one
//! internal hostname load balanced over the endpoints it selects, and client-side TLS with a CA
//! file on the proxy's host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::io::AsyncWriteExt;

fn endpoint(name: &str, labels: &str, port_name: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.gloo.solo.io/v2
kind: ExternalEndpoint
metadata:
  name: {name}
  namespace: data
  labels: {{{labels}}}
spec:
  address: {ip}
  ports:
  - name: {port_name}
    number: {port}
",
        ip = addr.ip(),
        port = addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_internal_hostname_is_balanced_over_the_selected_endpoints() {
    let eu = start_tcp_echo().await;
    let us = start_tcp_echo().await;
    let stray = start_tcp_echo().await;
    let yaml = [
        "apiVersion: networking.gloo.solo.io/v2
kind: ExternalService
metadata:
  name: orders-db
  namespace: data
spec:
  hosts:
  - orders-db.internal
  ports:
  - name: pg
    number: 5432
    protocol: TCP
  selector:
    app: orders-db
"
        .to_string(),
        endpoint(
            "orders-db-eu",
            "app: orders-db, region: eu",
            "pg",
            eu.addr(),
        ),
        endpoint(
            "orders-db-us",
            "app: orders-db, region: us",
            "pg",
            us.addr(),
        ),
        endpoint("unrelated", "app: billing", "pg", stray.addr()),
    ]
    .join("---\n");
    let sluice = Sluice::start_with_args(&yaml, &["--outbound-traffic-policy", "restricted"]).await;
    let proxy = sluice.http_proxy_addr();

    for i in 0..4 {
        let (status, _, mut tunnel) = proxy_connect(proxy, "orders-db.internal:5432").await;
        assert_eq!(status, 200);
        let ping = format!("ping {i}");
        tunnel.write_all(ping.as_bytes()).await.unwrap();
        let mut back = vec![0u8; ping.len()];
        read_exact_in_time(&mut tunnel, &mut back).await;
        assert_eq!(back, ping.as_bytes());
    }
    // Round robin over exactly the two selected endpoints.
    assert_eq!((eu.accepted(), us.accepted(), stray.accepted()), (2, 2, 0));
    // The endpoints' own addresses are not names of the service.
    let (status, _, _) = proxy_connect(proxy, &eu.addr().to_string()).await;
    assert_eq!(status, 403);
    let (status, _, _) = proxy_connect(proxy, "orders-db.internal:5433").await;
    assert_eq!(status, 403);
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice
            .access_log_lines()
            .iter()
            .filter(|l| l["kind"] == "tunnel" && l["service"] == "data/orders-db_5432")
            .count()
            == 4
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());
}

async fn reloads(sluice: &Sluice, result: &str) -> f64 {
    let text = sluice.admin_get("/metrics").await.unwrap().text();
    text.lines()
        .filter(|l| {
            l.starts_with("sluice_config_reloads_total") && l.contains(&format!("\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_tls_reads_its_ca_file_only_under_the_tls_file_dir() {
    let origin = start_tls_origin("api").await;
    let dir = TempDir::new("gloo-tls");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki().ca_pem()).unwrap();
    let service = |ca: &std::path::Path| {
        format!(
            "apiVersion: networking.gloo.solo.io/v2
kind: ExternalService
metadata:
  name: api
  namespace: data
spec:
  hosts: [api.internal]
  ports:
  - name: http
    number: 80
    protocol: HTTP
    targetPort: {{name: https}}
    clientsideTls:
      sni: origin.test
      caCertificates: {}
  selector: {{app: api}}
---
{}",
            ca.display(),
            endpoint("api-1", "app: api", "https", origin.addr())
        )
    };
    let sluice = Sluice::start_with_args(
        &service(&ca),
        &[
            "--outbound-traffic-policy",
            "restricted",
            "--tls-file-dir",
            dir.path().to_str().unwrap(),
        ],
    )
    .await;
    let proxy = sluice.http_proxy_addr();
    let get = || async { proxy_get(proxy, "http://api.internal/orders?id=7").await.1 };
    let answer = get().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/orders");
    assert_eq!(seen.effective_authority(), Some("api.internal"));
    assert_eq!(
        origin.last_tls().unwrap().sni.as_deref(),
        Some("origin.test")
    );

    // A CA file the proxy cannot read, or one outside --tls-file-dir: the change is refused and
    // the last config serves on.
    let elsewhere = TempDir::new("gloo-tls-elsewhere");
    let outside = elsewhere.join("ca.pem");
    std::fs::write(&outside, pki().ca_pem()).unwrap();
    for (file, why) in [
        (dir.join("missing-ca.pem"), "missing-ca.pem: cannot be read"),
        (outside, "ca.pem: is outside --tls-file-dir"),
    ] {
        let rejected = reloads(&sluice, "rejected").await;
        sluice.rewrite_config(&service(&file));
        let refused = wait_until_async(DEFAULT_TIMEOUT, || async {
            reloads(&sluice, "rejected").await > rejected
        })
        .await;
        assert!(refused, "{}", sluice.stderr());
        assert!(sluice.stderr().contains(why), "{why}: {}", sluice.stderr());
        let answer = get().await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
