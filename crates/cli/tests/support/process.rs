//! Running the `sluice` binary under test.
//!
//! [`Sluice`] writes the given YAML files into a fresh temp directory, runs
//! `sluice run -f <dir> --admin 127.0.0.1:<port> --access-log <file>` plus
//! extra arguments, sends stdout/stderr to files, and waits until
//! `GET /ready` on the admin address answers 200. The child is killed on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::client::{H1Client, HttpResponse};
use super::{BoxError, TempDir, DEFAULT_TIMEOUT, POLL_INTERVAL};

/// The file name [`Sluice::start`] and [`Sluice::rewrite_config`] use.
pub const CONFIG_FILE: &str = "sluice.yaml";

/// Ports handed to processes that bind them later. Taken below the kernel's range for
/// ephemeral ports (32768 and up on Linux), so no outgoing connection can take one in the
/// meantime, and never handed out twice by one test binary.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback TCP port that was free a moment ago and that no other caller in this process has
/// been given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    // Test binaries that run at once start far apart.
    let start = std::process::id().wrapping_mul(997) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}")
}

/// Options for starting [`Sluice`].
#[derive(Clone, Debug)]
pub struct SluiceBuilder {
    /// `sluice proxy --control-plane URLS --name NAME --token TOKEN` instead of `sluice run`.
    proxy: Option<(String, String, String)>,
    data_dir: Option<PathBuf>,
    /// Whether `sluice run` serves its control plane API (off unless a test needs it).
    api: bool,
    files: Vec<(String, String)>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    ready_timeout: Duration,
}

impl Default for SluiceBuilder {
    fn default() -> Self {
        SluiceBuilder {
            proxy: None,
            data_dir: None,
            api: false,
            files: Vec::new(),
            args: Vec::new(),
            envs: Vec::new(),
            ready_timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl SluiceBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `sluice proxy` fed by the control planes `urls` (comma-separated) as `name`.
    pub fn proxy(mut self, urls: &str, name: &str, token: &str) -> Self {
        self.proxy = Some((urls.to_owned(), name.to_owned(), token.to_owned()));
        self
    }

    /// Serves `sluice run`'s control plane API on a port of its own ([`Sluice::api_addr`]).
    pub fn with_api(mut self) -> Self {
        self.api = true;
        self
    }

    /// `--data-dir` (a proxy's config cache): by default a fresh directory per process.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    /// Adds the config file [`CONFIG_FILE`].
    pub fn config(self, yaml: &str) -> Self {
        self.file(CONFIG_FILE, yaml)
    }

    /// Adds a config file `name` (in the directory passed with `-f`).
    pub fn file(mut self, name: &str, yaml: &str) -> Self {
        self.files.push((name.to_owned(), yaml.to_owned()));
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of the process (`SLUICE_TEST_CONNECT_TO`, `SSL_CERT_FILE`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long [`SluiceBuilder::start`] waits for readiness (default 10 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Spawns the process without waiting for readiness (for tests that
    /// expect it to fail at startup).
    pub fn spawn(self) -> Sluice {
        let dir = TempDir::new("sluice-test");
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir).expect("create config dir");
        for (name, yaml) in &self.files {
            std::fs::write(config_dir.join(name), yaml)
                .unwrap_or_else(|e| panic!("writing config file {name}: {e}"));
        }
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        // Each process gets its own forward-proxy port unless the test chose one.
        let http_proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let own_proxy_arg = !self.args.iter().any(|a| a == "--http-proxy");
        let own_access_log_arg = !self.args.iter().any(|a| a == "--access-log");
        let access_log = dir.join("access.log");
        let stderr_path = dir.join("stderr.log");
        let stdout_path = dir.join("stdout.log");
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let stdout = File::create(&stdout_path).expect("create stdout file");

        let data_dir = self.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        let api: Option<SocketAddr> = self.api.then(|| ([127, 0, 0, 1], free_port()).into());
        let listen = api.map_or("off".to_string(), |a| a.to_string());
        match &self.proxy {
            None => cmd
                .arg("run")
                .arg("-f")
                .arg(&config_dir)
                .args(["--listen", &listen])
                .arg("--data-dir")
                .arg(&data_dir),
            Some((urls, name, token)) => cmd
                .args([
                    "proxy",
                    "--control-plane",
                    urls,
                    "--name",
                    name,
                    "--token",
                    token,
                ])
                .arg("--data-dir")
                .arg(&data_dir),
        };
        cmd.arg("--admin")
            .arg(admin.to_string())
            .args(if own_access_log_arg {
                vec!["--access-log".into(), access_log.clone().into_os_string()]
            } else {
                Vec::new()
            })
            .args(if own_proxy_arg {
                vec!["--http-proxy".to_string(), http_proxy.to_string()]
            } else {
                Vec::new()
            })
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_sluice")));
        Sluice {
            child,
            api,
            data_dir,
            config_dir,
            admin,
            http_proxy,
            access_log,
            stderr_path,
            stdout_path,
            ready_timeout: self.ready_timeout,
            dir,
        }
    }

    /// Spawns and waits until `/ready` answers 200. On failure the child is
    /// killed and the error carries its stderr.
    pub async fn try_start(self) -> Result<Sluice, String> {
        let mut sluice = self.spawn();
        let timeout = sluice.ready_timeout;
        sluice.wait_ready(timeout).await?;
        Ok(sluice)
    }

    /// Like [`SluiceBuilder::try_start`], panicking on failure.
    pub async fn start(self) -> Sluice {
        match self.try_start().await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A running `sluice run` process. Killed on drop; when the test is
/// panicking its stderr is printed and its temp dir kept.
#[derive(Debug)]
pub struct Sluice {
    child: Child,
    /// `sluice run`'s control plane API, when asked for.
    api: Option<SocketAddr>,
    data_dir: PathBuf,
    config_dir: PathBuf,
    admin: SocketAddr,
    http_proxy: SocketAddr,
    access_log: PathBuf,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    ready_timeout: Duration,
    // Last, so the directory outlives everything else in drop order.
    dir: TempDir,
}

impl Sluice {
    pub fn builder() -> SluiceBuilder {
        SluiceBuilder::new()
    }

    /// Starts with one config file and no extra arguments; panics unless
    /// ready within 10 s.
    pub async fn start(yaml: &str) -> Sluice {
        SluiceBuilder::new().config(yaml).start().await
    }

    /// Starts with one config file and extra arguments.
    pub async fn start_with_args(yaml: &str, args: &[&str]) -> Sluice {
        SluiceBuilder::new()
            .config(yaml)
            .args(args.iter().copied())
            .start()
            .await
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The control plane API of `sluice run`.
    pub fn api_addr(&self) -> SocketAddr {
        self.api.expect("started without with_api()")
    }

    /// One request to `sluice run`'s control plane API with its admin token.
    pub async fn api(&self, method: http::Method, path: &str, body: &str) -> HttpResponse {
        api_request(self.api_addr(), &self.admin_token(), method, path, body).await
    }

    /// `sluice run`'s generated admin token (in `--data-dir`).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("reading the admin token")
            .trim()
            .to_owned()
    }

    /// `--data-dir`: the store, the tokens, a proxy's config cache.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The forward proxy's address (meaningless when the test passed its own `--http-proxy`).
    pub fn http_proxy_addr(&self) -> SocketAddr {
        self.http_proxy
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `GET /ready` until it answers 200, the process exits, or
    /// `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(format!(
                    "sluice exited ({status}) before becoming ready; stderr:\n{}",
                    self.stderr()
                ));
            }
            let probe = tokio::time::timeout(Duration::from_secs(1), self.admin_get("/ready"));
            let last = match probe.await {
                Ok(Ok(resp)) if resp.status == 200 => return Ok(()),
                Ok(Ok(resp)) => format!("/ready answered {}: {}", resp.status, resp.text()),
                Ok(Err(e)) => format!("/ready failed: {e}"),
                Err(_) => "/ready timed out".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "sluice not ready after {timeout:?} (last: {last}); stderr:\n{}",
                    self.stderr()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `GET path` on the admin address (fresh connection).
    pub async fn admin_get(&self, path: &str) -> Result<HttpResponse, BoxError> {
        let mut client = H1Client::connect(self.admin).await?;
        client.get(path).await
    }

    /// The access log's complete lines, each parsed as JSON (an unfinished
    /// last line is left out; a complete line that is not JSON panics).
    /// Empty while the file does not exist.
    /// The access log once it has at least `n` lines; panics after the default timeout.
    pub async fn wait_for_log(&self, n: usize) -> Vec<serde_json::Value> {
        let ok = super::wait_until(DEFAULT_TIMEOUT, || self.access_log_lines().len() >= n).await;
        assert!(
            ok,
            "expected {n} access log lines, have {:?}",
            self.access_log_lines()
        );
        self.access_log_lines()
    }

    pub fn access_log_lines(&self) -> Vec<serde_json::Value> {
        let text = match std::fs::read_to_string(&self.access_log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading access log: {e}"),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => return Vec::new(),
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Atomically replaces the contents of [`CONFIG_FILE`].
    pub fn rewrite_config(&self, yaml: &str) {
        self.write_config_file(CONFIG_FILE, yaml);
    }

    /// Atomically writes config file `name` (written beside the config dir,
    /// then renamed into it, so a reader never sees half a file).
    pub fn write_config_file(&self, name: &str, yaml: &str) {
        let staging = self.dir.join(&format!(".staging-{name}"));
        std::fs::write(&staging, yaml).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        std::fs::rename(&staging, self.config_dir.join(name))
            .unwrap_or_else(|e| panic!("renaming {name} into place: {e}"));
    }

    /// Sends SIGHUP (`kill -HUP <pid>`).
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The process's working directory, a temporary one of its own.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let stderr = self.stderr();
            let start = stderr.len().saturating_sub(20_000);
            let start = (start..=stderr.len())
                .find(|i| stderr.is_char_boundary(*i))
                .unwrap_or(stderr.len());
            eprintln!(
                "---- sluice stderr (pid {}) ----\n{}\n---- end of sluice stderr ----",
                self.child.id(),
                &stderr[start..]
            );
        }
    }
}

/// A running `sluice control-plane` on a loopback port of its own, with its data directory.
/// Killed on drop; [`ControlPlane::restart`] brings it back on the same address and store.
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    pub addr: SocketAddr,
    data_dir: PathBuf,
    args: Vec<String>,
    stderr_path: PathBuf,
    _dir: TempDir,
}

impl ControlPlane {
    /// Starts with the store and tokens in `data_dir` and `extra` arguments; waits until it
    /// accepts connections.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> ControlPlane {
        let dir = TempDir::new("control-plane");
        let mut cp = ControlPlane {
            child: None,
            addr: ([127, 0, 0, 1], free_port()).into(),
            data_dir: data_dir.to_owned(),
            args: extra.iter().map(|a| a.to_string()).collect(),
            stderr_path: dir.join("stderr.log"),
            _dir: dir,
        };
        cp.restart().await;
        cp
    }

    /// Starts it again (after [`ControlPlane::kill`]) on the same address and store.
    pub async fn restart(&mut self) {
        self.kill();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("create stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "control-plane",
                "--listen",
                &self.addr.to_string(),
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn sluice control-plane");
        self.child = Some(child);
        // Ready when it answers HTTP itself: a bare connect could reach whatever else holds the
        // port, and a child that exited is a failure at once.
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut up = false;
        while !up && Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the control plane exited ({status}): {}", self.stderr());
            }
            up = match H1Client::connect(self.addr).await {
                Ok(mut c) => c.get("/openapi.json").await.is_ok_and(|r| r.status == 200),
                Err(_) => false,
            };
            if !up {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        assert!(
            up,
            "the control plane did not start listening: {}",
            self.stderr()
        );
    }

    /// SIGKILL: no goodbye to its proxies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    pub fn token(&self, role: &str) -> String {
        std::fs::read_to_string(self.data_dir.join(format!("{role}-token")))
            .unwrap_or_else(|e| panic!("reading the {role} token: {e}"))
            .trim()
            .to_owned()
    }

    /// One API request with the admin token.
    pub async fn api(&self, method: http::Method, path: &str, body: &str) -> HttpResponse {
        api_request(self.addr, &self.token("admin"), method, path, body).await
    }

    /// The `sluice` command line pointed at this control plane with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> CliOutput {
        sluice_cli(
            args,
            &[
                ("SLUICE_CONTROL_PLANE", &self.url()),
                ("SLUICE_TOKEN", token),
            ],
        )
    }

    /// The `sluice` command line pointed at this control plane with its admin token.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_as(&self.token("admin"), args)
    }

    /// Applies a multi-document YAML body; returns the store revision it was written at.
    pub async fn apply(&self, yaml: &str) -> u64 {
        let r = self.api(http::Method::POST, "/api/v1/apply", yaml).await;
        assert_eq!(r.status, 200, "apply: {}", r.text());
        r.json()["revision"].as_u64().expect("revision")
    }

    /// A proxy's status as `GET /api/v1/proxies/MESH/NAME` tells it (Null if unknown).
    pub async fn proxy_status(&self, mesh: &str, name: &str) -> serde_json::Value {
        let r = self
            .api(
                http::Method::GET,
                &format!("/api/v1/proxies/{mesh}/{name}"),
                "",
            )
            .await;
        if r.status == 200 {
            r.json()
        } else {
            serde_json::Value::Null
        }
    }

    /// Waits until the proxy reports running `revision` or later; false on timeout.
    pub async fn wait_running(&self, mesh: &str, name: &str, revision: u64) -> bool {
        super::wait_until_async(DEFAULT_TIMEOUT, || async move {
            let s = self.proxy_status(mesh, name).await;
            s["connected"] == true && s["ackedVersion"].as_u64().unwrap_or(0) >= revision
        })
        .await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- control plane stderr ----\n{}\n---- end ----",
                self.stderr()
            );
        }
    }
}

/// One request to a control plane API at `addr` with a bearer token.
pub async fn api_request(
    addr: SocketAddr,
    token: &str,
    method: http::Method,
    path: &str,
    body: &str,
) -> HttpResponse {
    let mut client = H1Client::connect(addr).await.expect("connect to the API");
    let req = client
        .request(method, path)
        .header("authorization", format!("Bearer {token}"))
        .body(super::full(body.to_string()))
        .expect("request");
    client.send(req).await.expect("API request")
}

/// What a `sluice` command printed, and whether it succeeded.
#[derive(Debug)]
pub struct CliOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `sluice` command line with `envs`; panics if it runs past the default timeout. It
/// blocks, so the (multi-threaded) test runtime is told to move its other work away meanwhile.
pub fn sluice_cli(args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    tokio::task::block_in_place(|| run_sluice(args, envs))
}

fn run_sluice(args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while child.try_wait().expect("wait for sluice").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("sluice {args:?} did not finish within {DEFAULT_TIMEOUT:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let out = child.wait_with_output().expect("sluice output");
    CliOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
