//! Transparent mode end to end, in a network namespace the test creates (root only; skipped,
//! with the reason, elsewhere): `sluice run` with its transparent listener and DNS server, the
//! nat rules of `sluice iptables install` for uid 65534, an origin on a test address, and curl
//! and dig run as uid 65534 with no proxy setting at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};
use support::command::{self, nat_rules, Ran, AS_NOBODY, TIMEOUT};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const ORIGIN: &str = "198.51.100.2";

fn run(program: &str, args: &[&str]) -> Ran {
    command::run(program, args, None)
}

/// The namespace, its resolv.conf, and every process started in it; all removed on drop.
struct Sandbox {
    ns: String,
    dir: std::path::PathBuf,
    children: Vec<Child>,
}

impl Sandbox {
    fn create() -> Option<Sandbox> {
        let tools = [
            "ip",
            "iptables-restore",
            "curl",
            "dig",
            "python3",
            "setpriv",
        ];
        if let Some(reason) = command::missing(&tools) {
            eprintln!("skipped: transparent mode's namespace test: {reason}");
            return None;
        }
        let id = std::process::id() % 100_000;
        let ns = format!("sluice-tp{id}");
        let dir = std::env::temp_dir().join(format!("sluice-transparent-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sandbox = Sandbox {
            ns,
            dir,
            children: Vec::new(),
        };
        assert!(run("ip", &["netns", "add", &sandbox.ns]).ok);
        // Apps resolve through whatever resolv.conf names: port 53 is redirected anyway.
        let etc = format!("/etc/netns/{}", sandbox.ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        // Both ends of a veth pair inside: the origin gets an address that is neither loopback
        // nor private, and the namespace a route off loopback.
        for step in [
            "ip link set lo up",
            "ip link add sla type veth peer name slb",
            "ip addr add 198.51.100.1/24 dev sla",
            "ip addr add 198.51.100.2/24 dev slb",
            "ip link set sla up",
            "ip link set slb up",
            "ip route add default via 198.51.100.1",
        ] {
            sandbox.must(&step.split(' ').collect::<Vec<_>>());
        }
        Some(sandbox)
    }

    fn exec(&self, command: &[&str]) -> Ran {
        let mut args = vec!["netns", "exec", &self.ns];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    fn must(&self, command: &[&str]) -> Ran {
        let ran = self.exec(command);
        assert!(ran.ok, "{command:?}: {}{}", ran.stdout, ran.stderr);
        ran
    }

    fn as_nobody(&self, command: &[&str]) -> Ran {
        let mut args: Vec<&str> = AS_NOBODY.to_vec();
        args.extend_from_slice(command);
        self.exec(&args)
    }

    fn spawn(&mut self, command: &[&str], log: &str) {
        let out = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(command)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn nat(&self) -> String {
        nat_rules(&self.must(&["iptables-save", "-t", "nat"]).stdout)
    }

    /// Runs `check` until it returns something, for at most [`TIMEOUT`].
    fn poll<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(t) = check() {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {TIMEOUT:?}; proxy said:\n{}",
                self.log("sluice.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.ns));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An origin answering every GET with the Host it was sent and the path.
const ORIGIN_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("host=%s path=%s\n" % (self.headers.get("Host"), self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

const CONFIG: &str = r#"
type: ExternalService
name: httpbin
tags: {kuma.io/service: httpbin, kuma.io/protocol: http}
networking: {address: "198.51.100.2:80"}
---
type: MeshExternalService
name: web
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: 198.51.100.2, port: 80}]
"#;

#[test]
fn apps_call_generated_names_with_no_proxy_setting() {
    let Some(mut sb) = Sandbox::create() else {
        return;
    };
    let config = sb.dir.join("config.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let server = sb.dir.join("origin.py");
    std::fs::write(&server, ORIGIN_SERVER).unwrap();
    let server = server.to_str().unwrap().to_string();
    sb.spawn(&["python3", &server, ORIGIN, "80"], "origin.log");
    sb.poll("the origin listening", || {
        sb.exec(&["curl", "-s", "--max-time", "1", "http://198.51.100.2/"])
            .ok
            .then_some(())
    });
    let data = sb.dir.join("data");
    let (config, data) = (
        config.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    );
    let access_log = sb.dir.join("access.log").to_str().unwrap().to_string();
    sb.spawn(
        &[
            SLUICE,
            "run",
            "-f",
            &config,
            "--data-dir",
            &data,
            "--listen",
            "off",
            "--admin",
            "off",
            "--http-proxy",
            "off",
            "--outbound-traffic-policy",
            "restricted",
            "--transparent",
            "--dns",
            "--dns-upstream",
            "198.51.100.1:53",
            "--access-log",
            &access_log,
        ],
        "sluice.log",
    );
    let before = sb.nat();
    sb.must(&[
        SLUICE,
        "iptables",
        "install",
        "--proxy-uid",
        "0",
        "--uid",
        "65534",
    ]);

    // The built-in DNS answers generated names with VIPs, 30 s TTL.
    let answer = sb.poll("httpbin.mesh resolved to a VIP", || {
        let dig = sb.as_nobody(&[
            "dig",
            "+noall",
            "+answer",
            "+time=1",
            "+tries=1",
            "httpbin.mesh",
            "A",
        ]);
        dig.stdout.contains("242.").then_some(dig.stdout)
    });
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields[1], "30", "{answer}");
    assert!(fields[4].starts_with("242."), "{answer}");
    let web = sb.as_nobody(&["dig", "+short", "web.extsvc.mesh.local", "A"]);
    assert!(web.stdout.trim().starts_with("242."), "{}", web.stdout);
    assert_ne!(web.stdout.trim(), fields[4]);
    // A name nobody registered gets no VIP: forwarded, and the dead upstream fails.
    let unknown = sb.as_nobody(&["dig", "+time=4", "+tries=1", "unknown.example", "A"]);
    assert!(unknown.stdout.contains("SERVFAIL"), "{}", unknown.stdout);

    // curl with no proxy setting reaches the origin through the VIP, the service's endpoint.
    let got = sb.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://httpbin.mesh/get?a=1",
    ]);
    assert!(got.ok, "{}", got.stderr);
    assert_eq!(got.stdout, "host=198.51.100.2 path=/get?a=1\n");
    let got = sb.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://web.extsvc.mesh.local/x",
    ]);
    assert_eq!(got.stdout, "host=198.51.100.2 path=/x\n", "{}", got.stderr);

    // A Host that is not the VIP's is refused: one service's address cannot carry another.
    let got = sb.as_nobody(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "-H",
        "Host: other.example",
        "http://httpbin.mesh/",
    ]);
    assert_eq!(got.stdout, "421");

    // Restricted: an address no service opens is refused; the endpoint itself is not.
    let refused = sb.as_nobody(&["curl", "-sS", "--max-time", "5", "http://198.51.100.2:81/"]);
    assert!(!refused.ok, "{}", refused.stdout);
    let direct = sb.as_nobody(&["curl", "-sS", "--max-time", "5", "http://198.51.100.2/d"]);
    assert_eq!(
        direct.stdout, "host=198.51.100.2 path=/d\n",
        "{}",
        direct.stderr
    );
    // Root is the proxy's uid here: never redirected.
    let root = sb.exec(&["curl", "-sS", "--max-time", "2", "http://httpbin.mesh/"]);
    assert!(!root.ok, "root resolved httpbin.mesh: {}", root.stdout);

    let log = sb.poll("the refusal logged", || {
        let log = std::fs::read_to_string(&access_log).unwrap_or_default();
        log.contains("198.51.100.2:81").then_some(log)
    });
    assert!(log.contains("not a registered external service"), "{log}");
    assert!(log.contains("\"listener\":\"transparent\""), "{log}");

    sb.must(&[SLUICE, "iptables", "uninstall"]);
    assert_eq!(sb.nat(), before, "uninstall leaves the table as it was");
}
