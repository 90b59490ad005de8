//! `sluice control-plane` as a process: the generated admin token, the API behind it, and the
//! store surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;

use support::*;

async fn start(data_dir: &std::path::Path) -> ControlPlane {
    ControlPlane::start(data_dir, &[]).await
}

async fn request(
    cp: &ControlPlane,
    method: http::Method,
    path: &str,
    token: &str,
    body: &str,
) -> HttpResponse {
    api_request(cp.addr, token, method, path, body).await
}

const API: &str = "type: MeshExternalService\nname: api\nspec:\n  match: {port: 443}\n  endpoints: [{address: api.example.com, port: 443}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_generated_once_and_guards_the_api() {
    let dir = TempDir::new("control-plane");
    let data = dir.join("data");
    let token_path = data.join("admin-token");
    let path = "/api/v1/MeshExternalService/default/api";
    {
        let cp = start(&data).await;
        let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is its owner's alone");
        let token = std::fs::read_to_string(&token_path)
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(token.len(), 64);
        let r = request(&cp, http::Method::PUT, path, "not-the-token", API).await;
        assert_eq!(r.status, 401);
        let r = request(&cp, http::Method::PUT, path, &token, API).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // A restart keeps the token and the stored resource.
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    let cp = start(&data).await;
    let r = request(&cp, http::Method::GET, path, &token, "").await;
    assert_eq!(r.status, 200);
    // The body as applied, then its status: the VIP it had before the restart.
    let text = r.text();
    let status = text.strip_prefix(API).unwrap_or_else(|| panic!("{text}"));
    assert!(
        status.starts_with("status: ") && status.contains("\"vip\":{\"ip\":\"242.0.0.1\"}"),
        "{status}"
    );
    assert_eq!(std::fs::read_to_string(&token_path).unwrap().trim(), token);
}

fn run_cli(args: &[&str], cp: &ControlPlane, token: &str) -> (bool, String, String) {
    let out = cp.cli_as(token, args);
    (out.ok, out.stdout, out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_from_the_command_line() {
    let dir = TempDir::new("cli");
    let cp = start(&dir.join("data")).await;
    let token = std::fs::read_to_string(dir.join("data").join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let file = dir.join("app.yaml");
    std::fs::write(
        &file,
        format!("{API}---\ntype: Dataplane\nname: app\nnetworking:\n  outbound:\n    - port: 10080\n      backendRef: {{kind: MeshExternalService, name: api}}\n"),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = run_cli(&["apply", "-f", f], &cp, &token);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "meshexternalservice/api created\ndataplane/app created\n"
    );
    let (ok, out, _) = run_cli(&["apply", "-f", f], &cp, &token);
    assert!(ok);
    assert_eq!(
        out,
        "meshexternalservice/api unchanged\ndataplane/app unchanged\n"
    );

    // An invalid document: nothing is sent.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        API.replace("name: api", "name: other")
            .replace("port: 443}", "port: 0}"),
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["apply", "-f", bad.to_str().unwrap()], &cp, &token);
    assert!(!ok);
    assert!(out.is_empty());
    assert!(
        err.contains(&format!(
            "{}[0] spec.match.port: must be between 1 and 65535",
            bad.display()
        )),
        "the file is named again in the control plane's answer: {err}"
    );
    assert!(err.contains("nothing was applied"), "{err}");

    // A valid service and a Dataplane naming a service that exists nowhere: neither is written.
    let mixed = dir.join("mixed.yaml");
    std::fs::write(
        &mixed,
        format!(
            "{}---\ntype: Dataplane\nname: app2\nnetworking:\n  outbound:\n    - port: 10081\n      backendRef: {{kind: MeshExternalService, name: missing}}\n",
            API.replace("name: api", "name: api2")
        ),
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["apply", "-f", mixed.to_str().unwrap()], &cp, &token);
    assert!(!ok);
    assert!(
        err.contains("no MeshExternalService named \"missing\""),
        "{err}"
    );
    let (_, _, err) = run_cli(&["get", "MeshExternalService", "api2"], &cp, &token);
    assert!(err.contains("answered 404"), "all or nothing: {err}");

    // A Dataplane alone, naming a service the control plane already has: accepted.
    let alone = dir.join("alone.yaml");
    std::fs::write(
        &alone,
        "type: Dataplane\nname: app3\nnetworking:\n  outbound:\n    - port: 10082\n      backendRef: {kind: MeshExternalService, name: api}\n",
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["apply", "-f", alone.to_str().unwrap()], &cp, &token);
    assert!(ok, "{err}");
    assert_eq!(out, "dataplane/app3 created\n");

    let (ok, out, _) = run_cli(&["get", "MeshExternalService"], &cp, &token);
    assert!(ok);
    assert!(out.lines().nth(1).unwrap().starts_with("default"), "{out}");
    assert!(out.contains(" api "), "{out}");
    let (ok, _, _) = run_cli(&["delete", "Dataplane", "app3"], &cp, &token);
    assert!(ok);
    let (ok, out, _) = run_cli(&["get", "Dataplane", "app"], &cp, &token);
    assert!(ok);
    assert!(out.contains("\"backendRef\""), "{out}");
    let (ok, out, _) = run_cli(&["delete", "Dataplane", "app"], &cp, &token);
    assert!(ok);
    assert_eq!(out, "dataplane/app deleted\n");
    let (ok, _, err) = run_cli(&["get", "Dataplane", "app"], &cp, &token);
    assert!(!ok);
    assert!(err.contains("answered 404"), "{err}");
    let (ok, _, err) = run_cli(&["get", "Dataplane"], &cp, "wrong-token-xxxx");
    assert!(!ok);
    assert!(err.contains("answered 401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("slow");
    let cp = ControlPlane::start(&dir.join("data"), &["--header-read-timeout", "300ms"]).await;
    let mut s = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
    s.write_all(b"GET /api/v1/Mesh HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut s).await;
    assert_cut_off_at(took, 300);
}
