//! `sluice iptables install|uninstall` against real nat tables, in network namespaces the tests
//! create so that the host's tables are never touched (root only; skipped, with the reason,
//! elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::command::{has, is_root, missing, nat_rules, run, Ran, AS_NOBODY, TIMEOUT};

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
/// A network namespace of the test's own, with loopback up; deleted on drop.
struct Netns {
    name: String,
    listener: Option<(Child, ChildStdin)>,
}

impl Netns {
    fn create(purpose: &str, tools: &[&str]) -> Option<Netns> {
        if let Some(reason) = missing(tools) {
            eprintln!("skipped: {reason}");
            return None;
        }
        let ns = Netns {
            name: format!("sluice-ipt-{purpose}-{}", std::process::id() % 100_000),
            listener: None,
        };
        let added = run("ip", &["netns", "add", &ns.name], None);
        assert!(added.ok, "ip netns add {}: {}", ns.name, added.stderr);
        ns.must(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    fn exec(&self, command: &[&str]) -> Ran {
        self.exec_with_input(command, None)
    }

    fn exec_with_input(&self, command: &[&str], input: Option<&str>) -> Ran {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        run("ip", &args, input)
    }

    fn must(&self, command: &[&str]) -> Ran {
        let ran = self.exec(command);
        assert!(ran.ok, "{command:?}: {}{}", ran.stdout, ran.stderr);
        ran
    }

    fn sluice(&self, args: &[&str]) -> Ran {
        let mut command = vec![SLUICE, "iptables"];
        command.extend_from_slice(args);
        self.exec(&command)
    }

    /// The nat table as `save` prints it, without its dated comments and packet counters.
    fn nat(&self, save: &str) -> String {
        nat_rules(&self.must(&[save, "-t", "nat"]).stdout)
    }

    /// Starts a Python program in the namespace and waits for its first line, `ready`. It
    /// exits when its stdin closes, so it ends with the test even if the kill misses it.
    fn start_listener(&mut self, program: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-u", "-c", program])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        self.listener = Some((child, stdin));
        let (lines, first) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = lines.send(line);
        });
        let line = first.recv_timeout(TIMEOUT).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "the listener did not start");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.listener.take() {
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run("ip", &["netns", "del", &self.name], None);
    }
}

/// Lines of the saved table that are sluice's, in order.
fn sluice_lines(nat: &str) -> Vec<&str> {
    nat.lines().filter(|l| l.contains("SLUICE_")).collect()
}

/// Someone else's rules, which every step must leave as they are, in their order.
const OTHER_RULES_V4: &str = "*nat
:KEEP_ME - [0:0]
-A KEEP_ME -d 192.0.2.7/32 -j RETURN
-A OUTPUT -d 192.0.2.8/32 -j RETURN
-A OUTPUT -j KEEP_ME
COMMIT
";
const OTHER_RULES_V6: &str = "*nat
:KEEP_ME - [0:0]
-A OUTPUT -d 2001:db8::8/128 -j RETURN
COMMIT
";

#[test]
fn install_twice_is_install_once_and_uninstall_leaves_the_table_as_it_was() {
    let tools = [
        "ip",
        "iptables-save",
        "ip6tables-save",
        "iptables-restore",
        "ip6tables-restore",
    ];
    let Some(ns) = Netns::create("rules", &tools) else {
        return;
    };
    if !ns.exec(&["ip6tables-save", "-t", "nat"]).ok {
        eprintln!("skipped: this kernel has no IPv6 nat table");
        return;
    }
    for (restore, rules) in [
        ("iptables-restore", OTHER_RULES_V4),
        ("ip6tables-restore", OTHER_RULES_V6),
    ] {
        let ran = ns.exec_with_input(&[restore, "--noflush"], Some(rules));
        assert!(ran.ok, "{restore}: {}", ran.stderr);
    }
    let before = ns.nat("iptables-save");
    let before_v6 = ns.nat("ip6tables-save");
    assert!(before.contains("-A OUTPUT -j KEEP_ME"), "{before}");

    let dry = ns.sluice(&["install", "--proxy-uid", "1234", "--dry-run"]);
    assert!(dry.ok, "{}", dry.stderr);
    assert!(dry
        .stdout
        .starts_with("# iptables-restore --noflush\n*nat\n"));
    for rule in [
        "-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN",
        "-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A OUTPUT -j SLUICE_OUTPUT",
    ] {
        assert!(dry.stdout.contains(rule), "{rule} in {}", dry.stdout);
    }
    assert_eq!(
        ns.nat("iptables-save"),
        before,
        "a dry run changed the table"
    );

    let installed = ns.sluice(&["install", "--proxy-uid", "1234", "--ipv6"]);
    assert!(installed.ok, "{}", installed.stderr);
    assert!(
        installed
            .stdout
            .contains("installed (IPv4): TCP of every uid but 1234 to 127.0.0.1:15001"),
        "{}",
        installed.stdout
    );
    let once = ns.nat("iptables-save");
    let once_v6 = ns.nat("ip6tables-save");
    assert_eq!(
        sluice_lines(&once),
        [
            ":SLUICE_DNS -",
            ":SLUICE_OUTPUT -",
            ":SLUICE_REDIRECT -",
            "-A OUTPUT -j SLUICE_OUTPUT",
            "-A SLUICE_DNS -p udp -j REDIRECT --to-ports 15053",
            "-A SLUICE_DNS -p tcp -j REDIRECT --to-ports 15053",
            "-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN",
            "-A SLUICE_OUTPUT -p udp -m udp --dport 53 -j SLUICE_DNS",
            "-A SLUICE_OUTPUT -p tcp -m tcp --dport 53 -j SLUICE_DNS",
            "-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT",
            "-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
        "{once}"
    );
    // The jump comes after the rules already in OUTPUT, which stay.
    let output_rules: Vec<&str> = once
        .lines()
        .filter(|l| l.starts_with("-A OUTPUT"))
        .collect();
    assert_eq!(
        output_rules,
        [
            "-A OUTPUT -d 192.0.2.8/32 -j RETURN",
            "-A OUTPUT -j KEEP_ME",
            "-A OUTPUT -j SLUICE_OUTPUT"
        ]
    );
    assert!(once.contains("-A KEEP_ME -d 192.0.2.7/32 -j RETURN"));
    assert!(
        once_v6.contains("-A SLUICE_OUTPUT -d ::1/128 -j RETURN"),
        "{once_v6}"
    );
    assert!(once_v6.contains("-A OUTPUT -j SLUICE_OUTPUT"), "{once_v6}");

    let again = ns.sluice(&["install", "--proxy-uid", "1234", "--ipv6"]);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(
        ns.nat("iptables-save"),
        once,
        "a second install changed the table"
    );
    assert_eq!(ns.nat("ip6tables-save"), once_v6);

    // Over an install, the jump already in place is kept rather than added again.
    let dry = ns.sluice(&["install", "--proxy-uid", "1234", "--dry-run"]);
    assert!(dry.ok, "{}", dry.stderr);
    assert!(!dry.stdout.contains("-A OUTPUT"), "{}", dry.stdout);
    assert_eq!(ns.nat("iptables-save"), once);

    // Other options replace the rules; the DNS chain goes with --no-dns.
    let changed = ns.sluice(&[
        "install",
        "--proxy-uid",
        "1234",
        "--uid",
        "65534",
        "--no-dns",
        "--exclude-outbound-ports",
        "22,5432",
    ]);
    assert!(changed.ok, "{}", changed.stderr);
    let replaced = ns.nat("iptables-save");
    assert_eq!(
        sluice_lines(&replaced),
        [
            ":SLUICE_OUTPUT -",
            ":SLUICE_REDIRECT -",
            "-A OUTPUT -j SLUICE_OUTPUT",
            "-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN",
            "-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A SLUICE_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
            "-A SLUICE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A SLUICE_OUTPUT -p tcp -m owner --uid-owner 65534 -j SLUICE_REDIRECT",
            "-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
        "{replaced}"
    );

    let dry = ns.sluice(&["uninstall", "--dry-run"]);
    assert!(dry.ok, "{}", dry.stderr);
    assert_eq!(
        dry.stdout,
        "# iptables-restore --noflush\n*nat\n-D OUTPUT -j SLUICE_OUTPUT\n-F SLUICE_OUTPUT\n\
         -F SLUICE_REDIRECT\n-X SLUICE_OUTPUT\n-X SLUICE_REDIRECT\nCOMMIT\n"
    );
    assert_eq!(
        ns.nat("iptables-save"),
        replaced,
        "a dry run changed the table"
    );

    let removed = ns.sluice(&["uninstall", "--ipv6"]);
    assert!(removed.ok, "{}", removed.stderr);
    assert!(
        removed.stdout.contains("removed (IPv4)"),
        "{}",
        removed.stdout
    );
    assert_eq!(ns.nat("iptables-save"), before);
    assert_eq!(ns.nat("ip6tables-save"), before_v6);

    let nothing = ns.sluice(&["uninstall", "--ipv6"]);
    assert!(nothing.ok, "{}", nothing.stderr);
    assert!(
        nothing.stdout.contains("nothing installed (IPv4)")
            && nothing.stdout.contains("nothing installed (IPv6)"),
        "{}",
        nothing.stdout
    );
    assert_eq!(ns.nat("iptables-save"), before);
}

/// Refusals need no root: they come before anything is read, and --dry-run keeps any slip from
/// reaching a table.
#[test]
fn options_that_cannot_work_are_refused_in_one_line() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--proxy-uid", "1234", "--uid", "65534,1234"],
            "sluice: --uid 1234 is the proxy's uid (--proxy-uid)",
        ),
        (
            &["--proxy-uid", "1234", "--redirect-port", "0"],
            "sluice: --redirect-port 0: a port is between 1 and 65535",
        ),
        (
            &["--proxy-uid", "1", "--exclude-outbound-ports", "22,0"],
            "sluice: --exclude-outbound-ports: 0 is not a port",
        ),
    ];
    for (options, error) in cases {
        let mut args = vec!["iptables", "install", "--dry-run"];
        args.extend_from_slice(options);
        let refused = run(SLUICE, &args, None);
        assert!(!refused.ok, "{options:?} was accepted");
        assert!(refused.stderr.starts_with(error), "{}", refused.stderr);
        assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
        assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    }
}

/// Without root, a change is refused with the way out, and a dry run still shows the rules.
#[test]
fn without_root_changes_are_refused_and_a_dry_run_still_prints() {
    let unprivileged = |args: &[&str]| {
        let mut command: Vec<&str> = Vec::new();
        if is_root() {
            command.extend_from_slice(&AS_NOBODY);
        }
        command.push(SLUICE);
        command.push("iptables");
        command.extend_from_slice(args);
        run(command[0], &command[1..], None)
    };
    if is_root() && !has("setpriv") {
        eprintln!("skipped: dropping root needs setpriv (util-linux)");
        return;
    }
    for args in [&["install", "--proxy-uid", "1234"][..], &["uninstall"][..]] {
        let refused = unprivileged(args);
        assert!(!refused.ok, "{args:?} ran without root");
        assert_eq!(
            refused.stderr.trim(),
            "sluice: needs root (CAP_NET_ADMIN) to change the nat table: run as root or use --dry-run",
            "{args:?}"
        );
    }
    let dry = unprivileged(&["install", "--proxy-uid", "1234", "--dry-run"]);
    assert!(dry.ok, "{}", dry.stderr);
    assert!(
        dry.stdout.contains("-A OUTPUT -j SLUICE_OUTPUT"),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stderr
            .contains("showing the input for a table holding nothing of sluice's"),
        "{}",
        dry.stderr
    );
}

/// Accepts on 127.0.0.1:15001 and answers with the connection's original destination
/// (SO_ORIGINAL_DST); answers any datagram on 127.0.0.1:15053 with `dns`.
const LISTENER: &str = r#"
import os, socket, struct, sys, threading
SO_ORIGINAL_DST = 80
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("127.0.0.1", 15001))
tcp.listen(8)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 15053))
def answer_dns():
    while True:
        _, peer = udp.recvfrom(512)
        udp.sendto(b"dns\n", peer)
def exit_with_the_test():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=answer_dns, daemon=True).start()
threading.Thread(target=exit_with_the_test, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    dst = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", dst[2:4])[0]
    conn.sendall(("%s:%d\n" % (socket.inet_ntoa(dst[4:8]), port)).encode())
    conn.close()
"#;

/// Connects to 203.0.113.9:80 and prints the first line the other end sends.
const TCP_CLIENT: &str = "exec 3<>/dev/tcp/203.0.113.9/80 && head -n1 <&3";
/// Sends a datagram to the stub resolver address and prints the answer.
const DNS_CLIENT: &str = "exec 3<>/dev/udp/127.0.0.53/53 && echo query >&3 && head -n1 <&3";

#[test]
fn the_chosen_uid_reaches_the_listener_and_root_does_not() {
    let tools = [
        "ip",
        "iptables-save",
        "iptables-restore",
        "python3",
        "setpriv",
        "bash",
        "timeout",
    ];
    let Some(mut ns) = Netns::create("redirect", &tools) else {
        return;
    };
    // A route out of the namespace, through a veth pair that stays inside it: nothing answers
    // there, so a connection that is not redirected never completes.
    ns.must(&[
        "ip", "link", "add", "slx0", "type", "veth", "peer", "name", "slx1",
    ]);
    ns.must(&["ip", "addr", "add", "192.0.2.1/24", "dev", "slx0"]);
    ns.must(&["ip", "link", "set", "slx0", "up"]);
    ns.must(&["ip", "link", "set", "slx1", "up"]);
    ns.must(&["ip", "route", "add", "default", "dev", "slx0"]);
    ns.start_listener(LISTENER);

    let installed = ns.sluice(&["install", "--proxy-uid", "1234", "--uid", "65534"]);
    assert!(installed.ok, "{}", installed.stderr);

    let as_nobody = |seconds: &str, script: &str| {
        let mut command = AS_NOBODY.to_vec();
        command.extend_from_slice(&["timeout", seconds, "bash", "-c", script]);
        ns.exec(&command)
    };
    let as_root =
        |seconds: &str, script: &str| ns.exec(&["timeout", seconds, "bash", "-c", script]);

    let redirected = as_nobody("5", TCP_CLIENT);
    assert!(redirected.ok, "{}", redirected.stderr);
    assert_eq!(redirected.stdout.trim(), "203.0.113.9:80");
    let resolved = as_nobody("5", DNS_CLIENT);
    assert!(resolved.ok, "{}", resolved.stderr);
    assert_eq!(resolved.stdout.trim(), "dns");

    let direct = as_root("2", TCP_CLIENT);
    assert!(
        !direct.ok && direct.stdout.is_empty(),
        "root was redirected: {}",
        direct.stdout
    );
    let direct_dns = as_root("2", DNS_CLIENT);
    assert!(
        !direct_dns.stdout.contains("dns"),
        "root's DNS was redirected: {}",
        direct_dns.stdout
    );

    let removed = ns.sluice(&["uninstall"]);
    assert!(removed.ok, "{}", removed.stderr);
    let after = as_nobody("2", TCP_CLIENT);
    assert!(
        !after.ok && after.stdout.is_empty(),
        "still redirected: {}",
        after.stdout
    );
}
