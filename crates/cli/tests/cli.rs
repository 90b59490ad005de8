//! The `sluice` command line: `validate` over files, directories, multi-document YAML and stdin,
//! the shipped examples, and `run` refusing what it cannot serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::AsyncWriteExt;

fn sluice(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

const BAD: &str = "type: MeshExternalService
name: api
spec:
  match:
    port: 80
    protocol: http
  endpoints:
    - address: api1.example.com
      port: 443
    - address: api2.example.com
      port: 70000
";

#[test]
fn every_example_is_valid() {
    let out = sluice(&["validate", "-f", examples().to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("valid: "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn validate_reports_every_error_with_file_index_and_path() {
    let dir = TempDir::new("validate");
    let good = "type: MeshExternalService\nname: ok\nspec:\n  match: {port: 80}\n  endpoints: [{address: example.com, port: 80}]\n";
    std::fs::write(dir.join("a-good.yaml"), good).unwrap();
    std::fs::write(dir.join("b-bad.yaml"), format!("{good}---\n{BAD}")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let bad_path = dir.join("b-bad.yaml").display().to_string();
    let out = sluice(&["validate", "-f", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{bad_path}[1] spec.endpoints[1].port: must be between 1 and 65535"
        )),
        "{err}"
    );
    // The same name in two files is a duplicate, named with the first place.
    assert!(err.contains("already defined"), "{err}");
    assert!(err.lines().last().unwrap().contains("error(s)"), "{err}");
}

#[test]
fn validate_reads_stdin_and_counts_resources() {
    let out = sluice(&["validate", "-f", "-"], Some(BAD));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().next().unwrap(),
        "-[0] spec.endpoints[1].port: must be between 1 and 65535"
    );
    let fixed = BAD.replace("70000", "443");
    let out = sluice(&["validate", "-f", "-"], Some(&fixed));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "valid: 1 MeshExternalService\n");
}

#[test]
fn validate_names_unreadable_files_and_yaml_syntax() {
    let dir = TempDir::new("validate");
    std::fs::write(dir.join("broken.yaml"), "a: [1, 2\nb: }\n").unwrap();
    let missing = dir.join("missing.yaml");
    let out = sluice(
        &[
            "validate",
            "-f",
            dir.join("broken.yaml").to_str().unwrap(),
            missing.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("broken.yaml: not valid YAML"), "{err}");
    assert!(
        err.contains(&format!("{}: cannot read", missing.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_invalid_config_and_a_busy_port() {
    let mut bad = Sluice::builder().config(BAD).spawn();
    let status = bad.wait_exit(DEFAULT_TIMEOUT).await.expect("must exit");
    assert!(!status.success());
    assert!(bad
        .stderr()
        .contains("spec.endpoints[1].port: must be between 1 and 65535"));
    assert!(bad.stderr().contains("nothing started"), "{}", bad.stderr());

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let yaml = std::fs::read_to_string(examples().join("local/httpbin-local.yaml"))
        .unwrap()
        .replace("port: 10080", &format!("port: {port}"));
    let mut clash = Sluice::builder().config(&yaml).spawn();
    let status = clash.wait_exit(DEFAULT_TIMEOUT).await.expect("must exit");
    assert!(!status.success());
    assert!(
        clash
            .stderr()
            .contains(&format!("127.0.0.1:{port}: cannot listen")),
        "{}",
        clash.stderr()
    );
}

/// examples/local/httpbin-local.yaml with its origin and outbound ports replaced.
fn local_example(origin_port: u16, outbound_port: u16) -> String {
    std::fs::read_to_string(examples().join("local/httpbin-local.yaml"))
        .unwrap()
        .replace("port: 18080", &format!("port: {origin_port}"))
        .replace("port: 10080", &format!("port: {outbound_port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_example_runs_against_a_local_origin() {
    let origin = start_plain_origin("local").await;
    let port = free_port();
    let yaml = local_example(origin.port(), port);
    let sluice = Sluice::start(&yaml).await;
    let mut app = H1Client::connect(([127, 0, 0, 1], port).into())
        .await
        .unwrap();
    let r = app.get("/get").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "origin:local");
    assert_eq!(
        origin.last_request().unwrap().host.as_deref(),
        Some(&*format!("127.0.0.1:{}", origin.port()))
    );
    let ready = sluice.admin_get("/ready").await.unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    let dump = sluice.admin_get("/config_dump").await.unwrap().json();
    assert_eq!(dump["listeners"][0]["service"], "httpbin-local");
    assert_eq!(dump["listeners"][0]["address"], format!("127.0.0.1:{port}"));
}

/// The local example with `args`, in front of an origin answering `origin:NAME`, after three
/// GET /get on one connection, each answered by the origin.
async fn local_example_serves_three_gets(name: &str, args: &[&str]) -> (Origin, Sluice) {
    let origin = start_plain_origin(name).await;
    let port = free_port();
    let yaml = local_example(origin.port(), port);
    let sluice = Sluice::start_with_args(&yaml, args).await;
    let mut app = H1Client::connect(([127, 0, 0, 1], port).into())
        .await
        .unwrap();
    for _ in 0..3 {
        let r = app.get("/get").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), format!("origin:{name}"));
    }
    (origin, sluice)
}

/// `--workers 1` serves everything from one thread; `--workers 0` is refused, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_from_a_single_thread() {
    let (_origin, one) = local_example_serves_three_gets("one", &["--workers", "1"]).await;
    let said = one.stderr();
    assert!(
        said.contains("runtime started workers=1 flavor=CurrentThread"),
        "{said}"
    );

    let refused = sluice(&["run", "-f", "-", "--workers", "0"], Some(""));
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--workers"),
        "{}",
        text(&refused.stderr)
    );
}

/// `--access-log off` writes no line anywhere (no file named `off`, nothing on stdout) while
/// requests are still served and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_no_lines_and_still_counts_requests() {
    let (origin, quiet) = local_example_serves_three_gets("quiet", &["--access-log", "off"]).await;
    assert_eq!(origin.last_request().unwrap().path, "/get");
    let metrics = quiet.admin_get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("sluice_http_requests_total{service=\"httpbin-local\",code=\"200\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_access_log_lines_dropped_total 0\n"),
        "{metrics}"
    );
    assert!(!quiet.work_dir().join("off").exists());
    assert!(!quiet.stdout().contains("\"kind\""), "{}", quiet.stdout());
}

/// A client that trickles its request head is cut off at the header read timeout, and an
/// oversized head is refused; neither holds the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_request_heads_are_bounded() {
    let origin = start_plain_origin("o").await;
    let port = free_port();
    let yaml = local_example(origin.port(), port);
    let _sluice = Sluice::start_with_args(&yaml, &["--header-read-timeout", "300ms"]).await;

    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut slow).await;
    assert_cut_off_at(took, 300);

    let mut big = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let (buf, took) = read_until_closed(&mut big).await;
    assert!(
        took < Duration::from_secs(5),
        "an oversized head must be answered or closed"
    );
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(origin.request_count(), 0);
}

fn case(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../api/tests/cases")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn convert_prints_the_internal_model_and_kuma_resources_that_validate() {
    let seed = case("seed-istio-egress-https-origination.yaml");
    let out = sluice(&["convert", "-f", &seed], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let model: serde_json::Value = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    let services = model["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["googleapis_443", "googleapis_80"]);
    let http = &services[1];
    assert_eq!(http["port"], 80);
    assert_eq!(http["endpoints"][0], "www.googleapis.com:443");
    assert_eq!(http["tls"]["serverName"], "www.googleapis.com");
    assert_eq!(http["tls"]["verification"], "Secured");
    assert_eq!(http["tls"]["ca"], "the system's roots");
    assert_eq!(text(&out.stderr), "");

    // As Kuma resources: what fits is written, and reads back as valid Kuma YAML; the names
    // Kuma cannot carry are told.
    let out = sluice(&["convert", "--to", "kuma", "-f", &seed], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kuma = text(&out.stdout);
    assert!(
        kuma.starts_with("type: MeshExternalService\nname: googleapis_443\n"),
        "{kuma}"
    );
    assert!(
        text(&out.stderr).contains(
            "not converted: service default/googleapis_80: apps call it as www.googleapis.com"
        ),
        "{}",
        text(&out.stderr)
    );
    let back = sluice(&["validate", "-f", "-"], Some(&kuma));
    assert!(back.status.success(), "{}\n{kuma}", text(&back.stderr));
    assert_eq!(text(&back.stdout), "valid: 2 MeshExternalService\n");
    let again = sluice(&["convert", "-f", "-"], Some(&kuma));
    let again: serde_json::Value = serde_saphyr::from_str(&text(&again.stdout)).unwrap();
    assert_eq!(again["services"][1]["tls"], model["services"][1]["tls"]);
}

#[test]
fn convert_never_prints_keys_and_refuses_invalid_input() {
    let key = pki().client.key_pem.clone();
    let indented =
        |pem: &str| -> String { pem.lines().map(|l| format!("          {l}\n")).collect() };
    let yaml = format!(
        "type: MeshExternalService
name: mtls
spec:
  match: {{port: 443, protocol: http}}
  endpoints: [{{address: api.example.com, port: 443}}]
  tls:
    enabled: true
    verification:
      clientCert:
        inlineString: |
{}      clientKey:
        inlineString: |
{}",
        indented(&pki().client.cert_pem),
        indented(&key)
    );
    let key_body = key.lines().nth(1).unwrap();
    // A certificate bundle that carries its key too is kept out as well.
    let bundle = format!("{}{key}", pki().client.cert_pem);
    let yaml = yaml.replacen(&indented(&pki().client.cert_pem), &indented(&bundle), 1);
    for to in ["sluice", "kuma"] {
        let out = sluice(&["convert", "--to", to, "-f", "-"], Some(&yaml));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains(key_body), "{to}: the key was printed:\n{all}");
        assert!(!all.contains("PRIVATE KEY"), "{to}:\n{all}");
    }
    let out = sluice(&["convert", "--to", "kuma", "-f", "-"], Some(&yaml));
    assert!(
        text(&out.stdout).contains("clientKey:\n        secret: mtls-client-key"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("create Secret \"mtls-client-key\" holding it"),
        "{}",
        text(&out.stderr)
    );

    let out = sluice(&["convert", "-f", "-"], Some(BAD));
    assert!(!out.status.success());
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("-[0] spec.endpoints[1].port: must be between 1 and 65535"),
        "{}",
        text(&out.stderr)
    );
}

/// Started with a low soft limit on open files, a serving command raises it to the hard limit.
#[tokio::test]
async fn a_serving_command_raises_its_open_file_limit_to_the_hard_one() {
    let dir = TempDir::new("nofile");
    let config = dir.path().join("one.yaml");
    std::fs::write(
        &config,
        "type: MeshExternalService\nname: api\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: 127.0.0.1, port: 9}]\n",
    )
    .unwrap();
    let soft_then_hard = |pid: u32| -> Option<(String, String)> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut values = line["Max open files".len()..].split_whitespace();
        Some((values.next()?.to_string(), values.next()?.to_string()))
    };
    let (_, hard) = soft_then_hard(std::process::id()).unwrap();
    assert_ne!(hard, "256", "the test needs a hard limit above 256");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "-f", config.to_str().unwrap(), "--listen", "off"])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--admin", "off", "--http-proxy", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Until `exec`, the process is the shell, whose limits say nothing.
    let is_sluice =
        || std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sluice");
    let raised = wait_until(DEFAULT_TIMEOUT, || {
        is_sluice() && soft_then_hard(pid).is_some_and(|(soft, hard)| soft == hard)
    })
    .await;
    let seen = soft_then_hard(pid);
    let _ = child.kill();
    let _ = child.wait();
    assert!(raised, "soft and hard limits: {seen:?}");
}
