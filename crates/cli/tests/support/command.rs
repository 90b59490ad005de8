//! Running a command to its end with a deadline, its output captured.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest any one command may run.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to its end, stopping it (and failing the test) after [`TIMEOUT`].
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Ran {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    {
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap();
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        ok: status.success(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Drops privileges to nobody (uid and gid 65534) for the command that follows.
pub const AS_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

pub fn is_root() -> bool {
    run("id", &["-u"], None).stdout.trim() == "0"
}

pub fn has(tool: &str) -> bool {
    run("sh", &["-c", &format!("command -v {tool}")], None).ok
}

/// Why a test needing root and `tools` cannot run here, if it cannot.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("network namespaces and nat tables need root".to_string());
    }
    let absent: Vec<&str> = tools.iter().copied().filter(|t| !has(t)).collect();
    (!absent.is_empty()).then(|| format!("{} not installed", absent.join(", ")))
}

/// A nat table as `iptables-save` prints it, without its dated comments and packet counters.
pub fn nat_rules(saved: &str) -> String {
    saved
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(counters)) => &l[..counters],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
