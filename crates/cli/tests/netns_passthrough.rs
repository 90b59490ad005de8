//! Passthrough to a destination that is neither loopback nor private, which only exists here
//! as a test host in a network namespace the test creates (root only; skipped, with a message,
//! elsewhere). `allowed` passes it through, logged and counted by host and port; `restricted`
//! refuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};

use support::*;

/// A network namespace joined to this one by a veth pair: 198.51.100.1 here, 198.51.100.2 there.
struct TestHost {
    ns: String,
    veth: String,
    server: Option<Child>,
}

const HOST_IP: &str = "198.51.100.2";

impl TestHost {
    fn create() -> Option<TestHost> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !is_root || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipped: creating a network namespace needs root and iproute2");
            return None;
        }
        let id = std::process::id() % 100_000;
        let host = TestHost {
            ns: format!("sluice-t{id}"),
            veth: format!("slt{id}a"),
            server: None,
        };
        let peer = format!("slt{id}b");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &host.ns],
            vec![
                "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
            ],
            vec!["link", "set", &peer, "netns", &host.ns],
            vec!["addr", "add", "198.51.100.1/24", "dev", &host.veth],
            vec!["link", "set", &host.veth, "up"],
            vec![
                "netns",
                "exec",
                &host.ns,
                "ip",
                "addr",
                "add",
                "198.51.100.2/24",
                "dev",
                &peer,
            ],
            vec!["netns", "exec", &host.ns, "ip", "link", "set", &peer, "up"],
            vec!["netns", "exec", &host.ns, "ip", "link", "set", "lo", "up"],
        ];
        for step in steps {
            let out = Command::new("ip").args(&step).output().unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                step.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(host)
    }

    /// Python's http.server inside the namespace, serving a directory with one file.
    fn serve(&mut self, dir: &std::path::Path, port: u16) {
        std::fs::write(dir.join("hello.txt"), "hello from the test host").unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "python3",
                "-m",
                "http.server",
                &port.to_string(),
            ])
            .args(["--bind", HOST_IP, "--directory", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(child);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_in_allowed_mode_is_logged_and_counted_and_refused_when_restricted() {
    let Some(mut host) = TestHost::create() else {
        return;
    };
    let dir = TempDir::new("testhost");
    host.serve(dir.path(), 8080);
    let url = format!("http://{HOST_IP}:8080/hello.txt");
    // An unrelated registered service, so the registry is not empty.
    let yaml = "type: MeshExternalService\nname: other\nspec:\n  match: {port: 443}\n  endpoints: [{address: example.com, port: 443}]\n";
    let sluice = Sluice::start_with_args(yaml, &["--outbound-traffic-policy", "allowed"]).await;
    let proxy = sluice.http_proxy_addr();
    let up = wait_until_async(DEFAULT_TIMEOUT, || async {
        proxy_get(proxy, &url).await.0 == 200
    })
    .await;
    assert!(
        up,
        "the test host's server never answered through the proxy: {}",
        sluice.stderr()
    );
    let (status, text) = proxy_get(proxy, &url).await;
    assert_eq!(status, 200);
    assert!(text.ends_with("hello from the test host"), "{text}");
    let metrics = sluice.admin_get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains(&format!(
            "sluice_passthrough_total{{host=\"{HOST_IP}\",port=\"8080\"}}"
        )),
        "{metrics}"
    );
    let logged = wait_until(DEFAULT_TIMEOUT, || {
        sluice.access_log_lines().iter().any(|l| {
            l["service"] == "passthrough"
                && l["status"] == 200
                && l["upstream"] == format!("{HOST_IP}:8080")
        })
    })
    .await;
    assert!(logged, "{:?}", sluice.access_log_lines());

    let admin = sluice.admin_addr().to_string();
    let switched = sluice_cli(
        &["outbound-traffic-policy", "restricted", "--admin", &admin],
        &[("SLUICE_TOKEN", &sluice.admin_token())],
    );
    assert!(switched.ok, "{}", switched.stderr);
    let (status, text) = proxy_get(proxy, &url).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains(&format!(
            "{HOST_IP}:8080 is not a registered external service"
        )),
        "{text}"
    );
}
