//! Transparent mode end to end, in a network namespace the test creates (root only; skipped,
//! with the reason, elsewhere): `sluice run` with its transparent listener and DNS server, the
//! nat rules of `sluice iptables install` for uid 65534, origins on a test address (plain HTTP,
//! and HTTPS for real public names), dnsmasq as the namespace's resolver, and curl and dig run
//! as uid 65534 with no proxy setting at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};
use support::command::{self, nat_rules, Ran, AS_NOBODY, TIMEOUT};
use support::pki::pki;
use support::resources::{ep, mes, verification};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const ORIGIN: &str = "198.51.100.2";
/// The namespace's own resolver (dnsmasq), on the other end of the veth pair.
const RESOLVER: &str = "198.51.100.1";

fn run(program: &str, args: &[&str]) -> Ran {
    command::run(program, args, None)
}

/// The namespace, its resolv.conf, and every process started in it; all removed on drop.
struct Sandbox {
    ns: String,
    /// Whether the namespace has IPv6 addresses and an IPv6 nat table, so IPv6 is redirected too.
    ipv6: bool,
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
            "dnsmasq",
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
        let mut sandbox = Sandbox {
            ns,
            ipv6: false,
            dir,
            children: Vec::new(),
        };
        assert!(run("ip", &["netns", "add", &sandbox.ns]).ok);
        // The namespace's resolver is the test's dnsmasq: the proxy resolves endpoints with it
        // and forwards to it; apps' queries to it are redirected to the proxy's DNS server.
        let etc = format!("/etc/netns/{}", sandbox.ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {RESOLVER}\n"),
        )
        .unwrap();
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
        sandbox.ipv6 = sandbox.exec(&["ip6tables-save", "-t", "nat"]).ok
            && ["2001:db8::1/64 dev sla", "2001:db8::2/64 dev slb"]
                .iter()
                .all(|a| {
                    let mut step = vec!["ip", "addr", "add"];
                    step.extend(a.split(' '));
                    step.push("nodad");
                    sandbox.exec(&step).ok
                });
        if !sandbox.ipv6 {
            eprintln!("skipped: transparent mode's IPv6 checks: no IPv6 nat table or addresses in a new namespace");
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

    /// The nat rules of both families (IPv6 only where it is redirected).
    fn nat(&self) -> String {
        let mut rules = nat_rules(&self.must(&["iptables-save", "-t", "nat"]).stdout);
        if self.ipv6 {
            rules.push_str(&nat_rules(
                &self.must(&["ip6tables-save", "-t", "nat"]).stdout,
            ));
        }
        rules
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

/// An origin answering every GET with the Host it was sent and the path; given a certificate
/// and key, over TLS, with the server name the client sent first.
const ORIGIN_SERVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        tls = "tls sni=%s " % getattr(self.connection, "sni", None) if isinstance(self.connection, ssl.SSLSocket) else ""
        body = ("%shost=%s path=%s\n" % (tls, self.headers.get("Host"), self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
if len(sys.argv) > 3:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    def named(sock, name, _ctx):
        sock.sni = name
    ctx.sni_callback = named
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Kuma's generated names, Istio's real public names (passed through by SNI, resolved by the
/// proxy: httpbin.org by DNS, www.httpbin.org as the name the app called), and a service the
/// proxy originates TLS for.
fn config() -> String {
    let kuma = r#"
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
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-org, namespace: default}
spec:
  hosts: [httpbin.org]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: www-httpbin-org, namespace: default}
spec:
  hosts: [www.httpbin.org]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  location: MESH_EXTERNAL
  resolution: NONE
---
"#;
    // Plain HTTP from the app on port 80, verified HTTPS to the origin.
    let originated = mes(
        "secure",
        "http",
        &[ep(format!("{ORIGIN}:8443").parse().unwrap())],
        Some(&verification("Secured", Some("origin.test"), "")),
    )
    .replace("    port: 443\n", "    port: 80\n");
    format!("{kuma}{originated}")
}

#[test]
fn apps_call_generated_and_real_names_with_no_proxy_setting() {
    let Some(mut sb) = Sandbox::create() else {
        return;
    };
    let file = |name: &str, text: &str| -> String {
        let path = sb.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let config = file("config.yaml", &config());
    let server = file("origin.py", ORIGIN_SERVER);
    let ca = file("ca.pem", pki().ca_pem());
    let public = (
        file("public.pem", &pki().public.cert_pem),
        file("public.key", &pki().public.key_pem),
    );
    let origin = (
        file("origin.pem", &pki().origin.cert_pem),
        file("origin.key", &pki().origin.key_pem),
    );
    let pid_file = sb.dir.join("dnsmasq.pid").to_str().unwrap().to_string();
    sb.spawn(&["python3", &server, ORIGIN, "80"], "origin.log");
    // httpbin.org and www.httpbin.org stand in here, with a certificate for those names.
    sb.spawn(
        &["python3", &server, ORIGIN, "443", &public.0, &public.1],
        "origin-443.log",
    );
    sb.spawn(
        &["python3", &server, ORIGIN, "8443", &origin.0, &origin.1],
        "origin-8443.log",
    );
    // The test's DNS: the public names point at the local origin, one name into the VIP range
    // (which the proxy must drop), one name does not exist, nothing is forwarded further.
    sb.spawn(
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            &format!("--pid-file={pid_file}"),
            &format!("--listen-address={RESOLVER}"),
            "--bind-interfaces",
            "--log-facility=-",
            &format!("--address=/httpbin.org/{ORIGIN}"),
            &format!("--address=/plain.example.test/{ORIGIN}"),
            "--address=/trap.example.test/242.0.0.99",
            "--address=/nx.example.test/",
        ],
        "dnsmasq.log",
    );
    sb.poll("the origins listening", || {
        let plain = sb.exec(&["curl", "-s", "--max-time", "1", "http://198.51.100.2/"]);
        let tls = sb.exec(&[
            "curl",
            "-s",
            "--max-time",
            "1",
            "--cacert",
            &ca,
            "--resolve",
            "origin.test:8443:198.51.100.2",
            "https://origin.test:8443/",
        ]);
        let dns = sb.exec(&["dig", "+short", "+time=1", "+tries=1", "plain.example.test"]);
        (plain.ok && tls.ok && dns.stdout.trim() == ORIGIN).then_some(())
    });
    let data = sb.dir.join("data").to_str().unwrap().to_string();
    let access_log = sb.dir.join("access.log").to_str().unwrap().to_string();
    // No --dns-upstream: the proxy forwards to the resolver of /etc/resolv.conf.
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
            "--access-log",
            &access_log,
        ],
        "sluice.log",
    );
    let before = sb.nat();
    let family: &[&str] = if sb.ipv6 { &["--ipv6"] } else { &[] };
    let mut install = vec![
        SLUICE,
        "iptables",
        "install",
        "--proxy-uid",
        "0",
        "--uid",
        "65534",
    ];
    install.extend_from_slice(family);
    sb.must(&install);
    let dig = |args: &[&str]| {
        let mut all = vec!["dig", "+time=2", "+tries=1"];
        all.extend_from_slice(args);
        sb.as_nobody(&all).stdout
    };

    // The built-in DNS answers generated names with VIPs, 30 s TTL.
    let answer = sb.poll("httpbin.mesh resolved to a VIP", || {
        let answer = dig(&["+noall", "+answer", "httpbin.mesh", "A"]);
        answer.contains("242.").then_some(answer)
    });
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields[1], "30", "{answer}");
    assert!(fields[4].starts_with("242."), "{answer}");
    let web = dig(&["+short", "web.extsvc.mesh.local", "A"]);
    assert!(web.trim().starts_with("242."), "{web}");
    assert_ne!(web.trim(), fields[4]);
    // A registered real name gets a VIP too; every other name is the resolver's answer.
    let real = dig(&["+short", "httpbin.org", "A"]);
    let real_vip = real.trim().to_string();
    assert!(real_vip.starts_with("242."), "{real}");
    assert_eq!(dig(&["+short", "plain.example.test", "A"]).trim(), ORIGIN);
    let nx = dig(&["nx.example.test", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // An upstream answer pointing into the VIP range is dropped, never handed to the app.
    let trap = dig(&["trap.example.test", "A"]);
    assert!(trap.contains("ANSWER: 0"), "{trap}");
    assert!(!trap.contains("242.0.0.99"), "{trap}");

    let curl = |args: &[&str]| {
        let mut all = vec!["curl", "-sS", "--max-time", "5"];
        all.extend_from_slice(args);
        sb.as_nobody(&all)
    };
    // curl with no proxy setting reaches the origin through the VIP, the service's endpoint.
    let got = curl(&["http://httpbin.mesh/get?a=1"]);
    assert!(got.ok, "{}", got.stderr);
    assert_eq!(got.stdout, "host=198.51.100.2 path=/get?a=1\n");
    let got = curl(&["http://web.extsvc.mesh.local/x"]);
    assert_eq!(got.stdout, "host=198.51.100.2 path=/x\n", "{}", got.stderr);
    // TLS origination: plain HTTP from the app, verified HTTPS to the origin.
    let got = curl(&["http://secure.extsvc.mesh.local/o"]);
    assert!(
        got.stdout.starts_with("tls sni=origin.test host="),
        "{} {}",
        got.stdout,
        got.stderr
    );
    assert!(got.stdout.ends_with(" path=/o\n"), "{}", got.stdout);

    // The real name over HTTPS: the app's own TLS passed through to the name's address, the
    // certificate the app verifies the origin's.
    let got = curl(&["--cacert", &ca, "https://httpbin.org/status"]);
    assert_eq!(
        got.stdout, "tls sni=httpbin.org host=httpbin.org path=/status\n",
        "{}",
        got.stderr
    );
    // Resolution NONE: the connection goes to the name the app called, resolved by the proxy.
    let got = curl(&["--cacert", &ca, "https://www.httpbin.org/none"]);
    assert_eq!(
        got.stdout, "tls sni=www.httpbin.org host=www.httpbin.org path=/none\n",
        "{}",
        got.stderr
    );
    // Another name's ClientHello sent to httpbin.org's VIP is refused before anything is sent.
    let resolve = format!("www.googleapis.com:443:{real_vip}");
    let got = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "https://www.googleapis.com/",
    ]);
    assert!(!got.ok, "{}", got.stdout);

    // A Host that is not the VIP's is refused: one service's address cannot carry another.
    let got = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: other.example",
        "http://httpbin.mesh/",
    ]);
    assert_eq!(got.stdout, "421");

    // Restricted: an address no service opens is refused; the endpoint itself is not.
    let refused = curl(&["http://198.51.100.2:81/"]);
    assert!(!refused.ok, "{}", refused.stdout);
    let direct = curl(&["http://198.51.100.2/d"]);
    assert_eq!(
        direct.stdout, "host=198.51.100.2 path=/d\n",
        "{}",
        direct.stderr
    );
    // Root is the proxy's uid here: never redirected.
    let root = sb.exec(&["curl", "-sS", "--max-time", "2", "http://httpbin.mesh/"]);
    assert!(!root.ok, "root resolved httpbin.mesh: {}", root.stdout);

    let log = sb.poll("the refusals logged", || {
        let log = std::fs::read_to_string(&access_log).unwrap_or_default();
        (log.contains("198.51.100.2:81") && log.contains("www.googleapis.com")).then_some(log)
    });
    assert!(log.contains("not a registered external service"), "{log}");
    assert!(log.contains("\"listener\":\"transparent\""), "{log}");
    assert!(
        log.contains("the ClientHello names www.googleapis.com, but this address is httpbin.org's"),
        "{log}"
    );
    assert!(log.contains("\"path\":\"sni:httpbin.org\""), "{log}");

    // IPv6, redirected to the listeners on [::1]: DNS answered, an unregistered address refused.
    if sb.ipv6 {
        let vip = dig(&["+short", "@2001:db8::1", "httpbin.mesh", "A"]);
        assert_eq!(vip.trim(), fields[4], "{vip}");
        let refused = curl(&["http://[2001:db8::2]:81/"]);
        assert!(!refused.ok, "{}", refused.stdout);
        sb.poll("the IPv6 refusal logged", || {
            let log = std::fs::read_to_string(&access_log).unwrap_or_default();
            log.contains("[2001:db8::2]:81").then_some(())
        });
    }

    let mut uninstall = vec![SLUICE, "iptables", "uninstall"];
    uninstall.extend_from_slice(family);
    sb.must(&uninstall);
    assert_eq!(sb.nat(), before, "uninstall leaves the table as it was");
}
