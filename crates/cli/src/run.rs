//! `sluice run`: the proxy driven by resource files, reloaded live.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use sluice_proxy::access_log::{AccessLog, Target};
use sluice_proxy::metrics::Metrics;
use sluice_proxy::policy::Mode;
use sluice_proxy::{Proxy, Settings};
use tokio::signal::unix::{signal, Signal, SignalKind};

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use sluice_control::server::{Api, Prepared, Refused};
use sluice_control::ProxyConfig;
use sluice_store::Key;

use crate::load;

#[derive(Args)]
pub struct RunArgs {
    /// Files or directories of YAML resources; `-` reads standard input (then not reloaded).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// How often the files are checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    watch_interval: Duration,
    /// Where the store (SQLite) and the generated tokens live: the files are written into it,
    /// and so is what the API is sent.
    #[arg(long, default_value = "./.sluice")]
    data_dir: PathBuf,
    /// Address of the control plane API and config stream, or `off`.
    #[arg(long, default_value = "127.0.0.1:5681")]
    listen: String,
    #[command(flatten)]
    tokens: crate::control_plane::Tokens,
    /// Where VIPs for transparent mode come from (IPv4 or IPv6 CIDR).
    #[arg(long, default_value = sluice_control::vip::DEFAULT_RANGE, value_parser = crate::control_plane::parse_vip_range)]
    vip_range: sluice_api::model::Cidr,
    #[command(flatten)]
    proxy: ProxyFlags,
}

/// How the proxy serves apps: the same for `sluice run` and `sluice proxy`.
#[derive(Args)]
pub struct ProxyFlags {
    /// Threads serving connections; by default one for each CPU the process may run on (its
    /// CPU affinity and cgroup quota). With one, everything runs on a single thread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Admin endpoint (/ready, /metrics, /config_dump); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// Where the JSON access log goes: a file, `-` for standard output, or `off` for none
    /// (`./off` is a file of that name).
    #[arg(long, default_value = "-")]
    access_log: String,
    /// How long removed listeners may keep serving open connections, e.g. `30s`, `500ms`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Time allowed to connect to an endpoint.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream response to start (504 after it).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    response_timeout: Duration,
    /// Time an app connection has to send a complete request head.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Client connections open at once over all listeners.
    #[arg(long, default_value_t = 16_384)]
    max_connections: usize,
    /// The forward proxy for apps that use HTTP_PROXY/HTTPS_PROXY; `off` disables it.
    #[arg(long, default_value = "127.0.0.1:3128")]
    http_proxy: String,
    /// Outbound traffic policy for the forward proxy: `allowed` passes unregistered destinations
    /// through (logged), `restricted` only registered ones. A Mesh resource overrides it.
    #[arg(long, default_value = "allowed", value_parser = parse_mode)]
    outbound_traffic_policy: Mode,
    /// A DNS server (IP:PORT) to resolve endpoint and forward-proxy names with, instead of the
    /// system's resolver configuration.
    #[arg(long)]
    dns_server: Option<SocketAddr>,
    /// A TCP outbound connection with no bytes moving either way for this long is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    tcp_idle_timeout: Duration,
    /// The directory certificate and key files named by resources (Istio's caCertificates,
    /// clientCertificate, privateKey) must be in; without it the proxy reads no such file.
    #[arg(long)]
    tls_file_dir: Option<PathBuf>,
    /// Transparent mode's listener for connections iptables redirects (see `sluice iptables`),
    /// on IP:PORT[,IP:PORT...]. `--transparent` alone listens on 127.0.0.1:15001 and, where the
    /// host has IPv6, [::1]:15001; off by default.
    #[arg(long, default_value = "off", num_args = 0..=1, default_missing_value = LOOPBACK)]
    transparent: String,
    /// Transparent mode's DNS server (UDP and TCP): registered names answered with their VIPs,
    /// others forwarded. `--dns` alone listens on 127.0.0.1:15053 and, where the host has IPv6,
    /// [::1]:15053; off by default.
    #[arg(long, default_value = "off", num_args = 0..=1, default_missing_value = LOOPBACK)]
    dns: String,
    /// Where the DNS server forwards what it does not answer (IP:PORT, repeatable); the
    /// name servers of /etc/resolv.conf by default.
    #[arg(long)]
    dns_upstream: Vec<SocketAddr>,
}

/// What `--transparent` and `--dns` alone mean: both loopbacks, on the flag's default port.
const LOOPBACK: &str = "loopback";

/// Where a transparent-mode server listens, from its flag: nowhere (`off`), IPv4 loopback and,
/// where the host has it, IPv6 loopback on `port` (`loopback`), or the addresses given.
fn listen_addresses(flag: &str, value: &str, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    match value {
        "off" => Ok(Vec::new()),
        LOOPBACK => {
            let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], port))];
            // A host without IPv6 (disabled, or a container without it) has no [::1] to bind.
            if std::net::UdpSocket::bind("[::1]:0").is_ok() {
                addrs.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
            }
            Ok(addrs)
        }
        list => list
            .split(',')
            .map(|a| {
                a.trim().parse().map_err(|_| {
                    anyhow::anyhow!(
                        "{flag} {a}: not an address; give IP:PORT (IPv6 as [::1]:PORT), several separated by commas, or off"
                    )
                })
            })
            .collect(),
    }
}

pub fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration; write it like 30s, 500ms or 2m"))?;
    let seconds = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("\"{s}\" is too long a duration"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        _ => Err(format!(
            "\"{s}\": unknown unit \"{unit}\"; use ms, s, m or h"
        )),
    }
}

/// SIGTERM or SIGINT, whichever comes first; listening from creation, so that one arriving
/// while the command is busy elsewhere is not lost.
pub struct Termination {
    term: Signal,
    int: Signal,
}

impl Termination {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

pub fn main(args: RunArgs) -> ExitCode {
    serve_until_done(args.proxy.workers, run(args))
}

/// Every connection holds descriptors (a relay two, its app's socket and the upstream's), and
/// the soft limit many systems start processes with (1024) would refuse connections long before
/// `--max-connections`: the soft limit is raised to the hard one, which only an administrator sets.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "open file limit raised")
            }
            Err(e) => {
                tracing::warn!(limit = ?limit.current, error = %e, "open file limit could not be raised; connections beyond it will be refused")
            }
        }
    }
}

/// Logs to stderr, runs a long-lived command on `workers` threads (by default the CPUs the
/// process may use), and turns its error into one line and a failing exit code.
pub fn serve_until_done(
    workers: Option<u16>,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    init_logging();
    raise_open_file_limit();
    let workers = workers.map_or_else(available_cpus, usize::from);
    let runtime = match runtime_builder(workers).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let flavor = runtime.handle().runtime_flavor();
    tracing::info!(workers, ?flavor, "runtime started");
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The CPUs this process may run on (its CPU affinity and cgroup quota).
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One worker runs on tokio's single-threaded scheduler, which skips the multi-threaded one's
/// bookkeeping (work stealing, waking idle workers, timing each batch of tasks).
fn runtime_builder(workers: usize) -> tokio::runtime::Builder {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    }
}

/// The proxy with its admin endpoint serving; no config yet. Changes through the admin endpoint
/// need `admin_token`.
pub async fn start_proxy(
    flags: &ProxyFlags,
    admin_token: Option<String>,
) -> anyhow::Result<Arc<Proxy>> {
    let metrics = Arc::new(Metrics::default());
    let target = match flags.access_log.as_str() {
        "-" => Target::Stdout,
        "off" => Target::Off,
        path => Target::File(path.into()),
    };
    let access_log = AccessLog::start(target, metrics.access_log_lines_dropped.clone())
        .with_context(|| format!("access log {}: cannot open", flags.access_log))?;
    let settings = Settings {
        drain_timeout: flags.drain_timeout,
        upstream: sluice_proxy::upstream::Timeouts {
            connect: flags.connect_timeout,
            ..Default::default()
        },
        http: sluice_proxy::http::HttpTimeouts {
            response: flags.response_timeout,
            ..Default::default()
        },
        header_read_timeout: flags.header_read_timeout,
        max_connections: flags.max_connections,
        tcp_idle_timeout: flags.tcp_idle_timeout,
        outbound_traffic_policy: flags.outbound_traffic_policy,
        dns_server: flags.dns_server,
        tls_file_dir: flags.tls_file_dir.clone(),
    };
    let proxy = Arc::new(Proxy::new(settings, metrics, access_log).map_err(anyhow::Error::msg)?);

    if flags.admin != "off" {
        let addr: SocketAddr = flags.admin.parse().with_context(|| {
            format!(
                "--admin {}: not an address; give IP:PORT or off",
                flags.admin
            )
        })?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("admin endpoint {addr}: cannot listen; choose another with --admin")
        })?;
        let bound = listener.local_addr()?;
        tracing::info!(address = %bound, "admin endpoint listening");
        proxy.add_own_address(bound).await;
        tokio::spawn(sluice_proxy::admin::serve(
            listener,
            proxy.clone(),
            admin_token,
        ));
    }
    Ok(proxy)
}

/// The forward proxy, and transparent mode's listener and DNS server, unless turned off.
pub async fn start_forward_proxy(flags: &ProxyFlags, proxy: &Proxy) -> anyhow::Result<()> {
    for addr in listen_addresses("--transparent", &flags.transparent, 15001)? {
        proxy.start_transparent(addr).await.with_context(|| {
            format!("transparent listener {addr}: cannot listen; choose another with --transparent")
        })?;
    }
    let dns = listen_addresses("--dns", &flags.dns, 15053)?;
    if !dns.is_empty() {
        let upstreams = if flags.dns_upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf")
                .context("/etc/resolv.conf: cannot read the name servers to forward to; give --dns-upstream IP:PORT")?;
            sluice_proxy::dns::upstreams_from_resolv_conf(&text).map_err(|e| {
                anyhow::anyhow!("/etc/resolv.conf: {e}; give --dns-upstream IP:PORT")
            })?
        } else {
            flags.dns_upstream.clone()
        };
        for addr in dns {
            proxy
                .start_dns(addr, upstreams.clone())
                .await
                .map_err(|e| anyhow::anyhow!("DNS server {e}"))?;
        }
    }
    if flags.http_proxy == "off" {
        return Ok(());
    }
    let addr: SocketAddr = flags.http_proxy.parse().with_context(|| {
        format!(
            "--http-proxy {}: not an address; give IP:PORT or off",
            flags.http_proxy
        )
    })?;
    proxy.start_forward_proxy(addr).await.with_context(|| {
        format!(
            "forward proxy {addr}: cannot listen; choose another with --http-proxy or turn it off"
        )
    })?;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let api = start_control_plane(&args).await?;
    let proxy = start_proxy(&args.proxy, Some(api.admin_token.clone())).await?;
    let owned_path = args.data_dir.join("run-files.json");
    // What the files declared lives in `owned_path` between changes; in memory only while it
    // could not be written there.
    let mut unrecorded = None;
    let stdin = read_stdin_once(&args.files)?;
    let first = read_sources(&args.files, stdin.clone()).await;
    let mut last = fingerprint(&first);
    if let Err(lines) = write_files(&api, first, &mut unrecorded, &owned_path).await {
        for l in &lines {
            eprintln!("{l}");
        }
        bail!(
            "{} problem(s) in the configuration; nothing started",
            lines.len()
        );
    }
    let config = api.catalog.view().config.clone();
    match proxy.apply((*config).clone()).await {
        Ok(bind_errors) if bind_errors.is_empty() => {}
        Ok(errors) | Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("the configuration could not be started");
        }
    }
    // After the config, so that nothing is served by an empty table (which would pass
    // everything through); /ready waits for these too.
    start_forward_proxy(&args.proxy, &proxy).await?;
    proxy.mark_started();
    let listeners = proxy.current().map(|c| c.listeners.len()).unwrap_or(0);
    tracing::info!(listeners, "sluice is running");
    // From here on the proxy follows the store, whichever way it was written.
    let following = tokio::spawn(follow_store(api.clone(), proxy.clone(), config));

    let mut hup = signal(SignalKind::hangup())?;
    let mut stop = Termination::new()?;
    let mut tick = tokio::time::interval(args.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The files were read just now.
    tick.reset();
    let mut glanced: Option<Glance> = None;
    let mut unread_ticks = 0;
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hup.recv() => true,
            _ = stop.wait() => break,
        };
        if !forced {
            let now = glance_at_sources(&args.files).await;
            let unchanged = glanced
                .as_ref()
                .is_some_and(|g| g.settled && g.hash == now.hash);
            glanced = Some(now);
            if unchanged && unread_ticks < READ_AT_LEAST_EVERY {
                unread_ticks += 1;
                continue;
            }
            unread_ticks = 0;
            if look_at_sources(&args.files, stdin.clone()).await == last {
                continue;
            }
        }
        // Read again to be written, and remembered as written: a change made since it was
        // looked at is seen at the next tick.
        let current = read_sources(&args.files, stdin.clone()).await;
        let seen = fingerprint(&current);
        if let Err(lines) = write_files(&api, current, &mut unrecorded, &owned_path).await {
            for l in &lines {
                tracing::error!("{l}");
            }
            proxy
                .metrics()
                .config_reloads
                .get_or_create(&sluice_proxy::metrics::ResultLabels { result: "rejected" })
                .inc();
            tracing::error!(
                problems = lines.len(),
                "configuration not applied; still serving the previous one"
            );
        }
        last = seen;
    }
    following.abort();
    tracing::info!(drain = ?args.proxy.drain_timeout, "shutting down; draining open connections");
    proxy.shutdown().await;
    Ok(())
}

/// The store (SQLite in --data-dir) with its catalog, and the API on --listen unless off.
async fn start_control_plane(args: &RunArgs) -> anyhow::Result<Arc<Api>> {
    let listen = match args.listen.as_str() {
        "off" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .with_context(|| format!("--listen {addr}: not an address; give IP:PORT or off"))?,
        ),
    };
    let url = format!("sqlite://{}", args.data_dir.join("sluice.db").display());
    let (api, _serving) = crate::control_plane::start(
        &args.data_dir,
        &url,
        &args.tokens,
        listen,
        Duration::from_secs(10),
        args.vip_range,
    )
    .await?;
    Ok(api)
}

/// Applies every change of the store's whole config to the proxy.
async fn follow_store(api: Arc<Api>, proxy: Arc<Proxy>, mut applied: Arc<ProxyConfig>) {
    let mut views = api.catalog.subscribe();
    loop {
        let view = views.borrow_and_update().clone();
        if !Arc::ptr_eq(&view.config, &applied) && *view.config != *applied {
            match proxy.apply((*view.config).clone()).await {
                Ok(bind_errors) => {
                    for e in &bind_errors {
                        tracing::error!("{e}");
                    }
                    tracing::info!(revision = view.revision, "configuration reloaded");
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::error!("{e}");
                    }
                    tracing::error!("configuration not applied; still serving the previous one");
                }
            }
            applied = view.config.clone();
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// The resources the files declared when last written, so that one removed from the files is
/// removed from the store, while resources written through the API are left alone.
fn read_owned(path: &std::path::Path) -> BTreeSet<Key> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Vec<(String, String, String)>>(&text).ok())
        .map(|keys| {
            keys.into_iter()
                .map(|(kind, mesh, name)| Key { kind, mesh, name })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes what the files declare into the store and removes what they no longer declare; the
/// error is every problem, one line each, and then nothing is written. What they declared
/// before is read from `owned_path`, or is `unrecorded` if it could not be written there.
async fn write_files(
    api: &Api,
    sources: Sources,
    unrecorded: &mut Option<BTreeSet<Key>>,
    owned_path: &std::path::Path,
) -> Result<(), Vec<String>> {
    let (texts, mut problems) = sources;
    // Prepared a file at a time: as JSON trees a large registry's documents take several times
    // what is kept of them.
    let documents = load::parse_sources(texts, &mut problems, |doc| Prepared::new(&doc));
    if !problems.is_empty() {
        return Err(problems);
    }
    let from_memory = unrecorded.is_some();
    let owned = unrecorded.take().unwrap_or_else(|| read_owned(owned_path));
    let declared: BTreeSet<Key> = documents
        .iter()
        .filter_map(Prepared::key)
        .cloned()
        .collect();
    let removed: Vec<Key> = owned.difference(&declared).cloned().collect();
    let written = api.write_prepared(documents, &removed).await;
    if let Err(refused) = written {
        if from_memory {
            *unrecorded = Some(owned);
        }
        return Err(match refused {
            Refused::Invalid(problems) => problems,
            other => vec![other.to_string()],
        });
    }
    let keys: Vec<(&str, &str, &str)> = declared
        .iter()
        .map(|k| (k.kind.as_str(), k.mesh.as_str(), k.name.as_str()))
        .collect();
    let recorded = std::fs::write(owned_path, serde_json::to_string(&keys).unwrap_or_default());
    drop(keys);
    *unrecorded = match recorded {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(path = %owned_path.display(), error = %e, "cannot record which resources the files declare; keeping them in memory");
            Some(declared)
        }
    };
    Ok(())
}

/// The sources as read now, and what could not be read.
type Sources = (Vec<(String, String)>, Vec<String>);

/// Stands in for the sources between reads, so that the files' text (megabytes with a large
/// registry) is not kept to compare with: any change to a file's path or text, or to what could
/// not be read, changes it, but for a chance of one in 2^64. SIGHUP reloads whatever it says.
fn fingerprint(sources: &Sources) -> u64 {
    let mut fingerprint = Fingerprint::default();
    for (name, text) in &sources.0 {
        fingerprint.add(name, text);
    }
    fingerprint.finish(&sources.1)
}

/// Made the same way whether the sources are held ([`fingerprint`]) or looked at one at a time
/// ([`fingerprint_files`]).
#[derive(Default)]
struct Fingerprint(DefaultHasher);

impl Fingerprint {
    fn add(&mut self, name: &str, text: &str) {
        (name, text).hash(&mut self.0);
    }

    fn finish(mut self, problems: &[String]) -> u64 {
        problems.hash(&mut self.0);
        self.0.finish()
    }
}

/// What the watch sees of the files without reading them: their names and metadata, and whether
/// all of them were last changed long enough ago for equal metadata to mean equal text.
struct Glance {
    hash: u64,
    settled: bool,
}

/// A file changed less than this long before a glance may change again with the same size and
/// times (timestamps are coarse: a clock tick, a second on some filesystems), so its text is
/// read at the next tick whatever its metadata says.
const SETTLE: Duration = Duration::from_secs(3);

/// Ticks with unchanged metadata after which the files are read anyway, for filesystems whose
/// times cannot be trusted (a remote clock behind this one).
const READ_AT_LEAST_EVERY: u32 = 60;

/// At 10,000 files, reading them whole every second cost 6-10% of a CPU, their metadata about a
/// third of that.
async fn glance_at_sources(files: &[PathBuf]) -> Glance {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || glance(&files, std::time::SystemTime::now()))
        .await
        .unwrap_or(Glance {
            hash: 0,
            settled: false,
        })
}

fn glance(files: &[PathBuf], now: std::time::SystemTime) -> Glance {
    use std::os::unix::fs::MetadataExt;
    let mut hasher = DefaultHasher::new();
    let mut problems = Vec::new();
    let mut settled = true;
    load::stat_files(files, &mut problems, |file, metadata| {
        file.as_os_str().as_encoded_bytes().hash(&mut hasher);
        match metadata {
            Ok(m) => {
                let (ctime, ctime_nsec) = (m.ctime(), m.ctime_nsec());
                (
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    ctime,
                    ctime_nsec,
                )
                    .hash(&mut hasher);
                // The change time, which every write moves and nothing sets back (a
                // modification time can be set to anything).
                let changed = Duration::new(
                    u64::try_from(ctime).unwrap_or_default(),
                    u32::try_from(ctime_nsec).unwrap_or_default(),
                );
                settled &= now
                    .duration_since(std::time::UNIX_EPOCH)
                    .is_ok_and(|now| now.saturating_sub(changed) >= SETTLE);
            }
            Err(e) => {
                e.kind().hash(&mut hasher);
                settled = false;
            }
        }
    });
    problems.hash(&mut hasher);
    Glance {
        hash: hasher.finish(),
        settled,
    }
}

/// The fingerprint of the sources as they are now, read one file at a time: the watch looks
/// every second, and holding every file at once was 2.8 MiB each time at 10,000 services.
async fn look_at_sources(files: &[PathBuf], stdin: Option<String>) -> u64 {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || fingerprint_files(&files, stdin.as_deref()))
        .await
        .unwrap_or_default()
}

fn fingerprint_files(files: &[PathBuf], stdin: Option<&str>) -> u64 {
    let mut fingerprint = Fingerprint::default();
    let mut problems = Vec::new();
    load::visit_sources(files, stdin, &mut problems, |name, text| {
        fingerprint.add(&name, &text);
    });
    fingerprint.finish(&problems)
}

fn read_stdin_once(files: &[PathBuf]) -> anyhow::Result<Option<String>> {
    if !files.iter().any(|f| f.as_os_str() == "-") {
        return Ok(None);
    }
    let mut problems = Vec::new();
    let sources = load::read_sources(&[PathBuf::from("-")], None, &mut problems);
    if let Some(p) = problems.first() {
        bail!("{p}");
    }
    Ok(sources.into_iter().next().map(|(_, text)| text))
}

async fn read_sources(files: &[PathBuf], stdin: Option<String>) -> Sources {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut problems = Vec::new();
        let sources = load::read_sources(&files, stdin.as_deref(), &mut problems);
        (sources, problems)
    })
    .await
    .unwrap_or_else(|e| (Vec::new(), vec![format!("reading files failed: {e}")]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("30s", Some(Duration::from_secs(30))),
            ("500ms", Some(Duration::from_millis(500))),
            ("2m", Some(Duration::from_secs(120))),
            ("7", Some(Duration::from_secs(7))),
            ("1h", Some(Duration::from_secs(3600))),
            ("99999999999999999h", None),
            ("1d", None),
            ("s", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).ok(), want, "{text}");
        }
    }

    #[test]
    fn a_fingerprint_changes_with_any_change_to_the_sources() {
        let source = |path: &str, text: &str| (path.to_string(), text.to_string());
        let base: Sources = (
            vec![source("a.yaml", "name: a"), source("b.yaml", "name: b")],
            vec![],
        );
        let changed: [(&str, Sources); 5] = [
            (
                "a text",
                (
                    vec![source("a.yaml", "name: A"), source("b.yaml", "name: b")],
                    vec![],
                ),
            ),
            (
                "a path",
                (
                    vec![source("c.yaml", "name: a"), source("b.yaml", "name: b")],
                    vec![],
                ),
            ),
            (
                "text moved between files",
                (
                    vec![source("a.yaml", "name: an"), source("b.yaml", "ame: b")],
                    vec![],
                ),
            ),
            ("a file gone", (vec![source("a.yaml", "name: a")], vec![])),
            (
                "a read problem",
                (base.0.clone(), vec!["b.yaml: cannot read".to_string()]),
            ),
        ];
        assert_eq!(fingerprint(&base), fingerprint(&base.clone()));
        for (what, sources) in changed {
            assert_ne!(fingerprint(&base), fingerprint(&sources), "{what}");
        }
    }

    /// A directory of two resource files (`a.yaml`, `more/b.yml`).
    fn two_files(name: &str) -> load::TempDir {
        let dir = load::TempDir::new(name);
        std::fs::write(dir.path().join("a.yaml"), "name: a").unwrap();
        std::fs::create_dir(dir.path().join("more")).unwrap();
        std::fs::write(dir.path().join("more/b.yml"), "name: b").unwrap();
        dir
    }

    #[test]
    fn looking_at_the_files_fingerprints_them_as_reading_them_does() {
        let dir = two_files("look");
        let cases: [(&str, Vec<PathBuf>, Option<&str>); 3] = [
            ("a directory", vec![dir.path().to_path_buf()], None),
            (
                "a file missing",
                vec![dir.path().join("a.yaml"), dir.path().join("gone.yaml")],
                None,
            ),
            (
                "standard input",
                vec![PathBuf::from("-"), dir.path().join("more")],
                Some("name: c"),
            ),
        ];
        for (what, files, stdin) in cases {
            let mut problems = Vec::new();
            let sources = load::read_sources(&files, stdin, &mut problems);
            assert_eq!(
                fingerprint_files(&files, stdin),
                fingerprint(&(sources, problems)),
                "{what}"
            );
        }
        let before = fingerprint_files(&[dir.path().to_path_buf()], None);
        std::fs::write(dir.path().join("more/b.yml"), "name: B").unwrap();
        assert_ne!(fingerprint_files(&[dir.path().to_path_buf()], None), before);
    }

    #[test]
    fn a_glance_moves_with_the_files_and_settles_once_they_are_old() {
        let dir = two_files("glance");
        let files = [dir.path().to_path_buf()];
        let path = |name: &str| dir.path().join(name);
        // Modified long ago, as far as its modification time says.
        std::fs::File::options()
            .write(true)
            .open(path("a.yaml"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1000))
            .unwrap();
        let now = std::time::SystemTime::now();
        let later = now + Duration::from_secs(10);
        let fresh = glance(&files, now);
        assert!(
            !fresh.settled,
            "files written just now may change within their timestamp"
        );
        let old = glance(&files, later);
        assert!(old.settled);
        assert_eq!(fresh.hash, old.hash);

        let changes: [(&str, &dyn Fn()); 4] = [
            (
                "an edit that keeps the size and puts the modification time back",
                &|| {
                    use std::os::unix::fs::MetadataExt;
                    let ctime = |p: &str| {
                        let m = std::fs::metadata(path(p)).unwrap();
                        (m.ctime(), m.ctime_nsec())
                    };
                    let before = std::fs::metadata(path("a.yaml")).unwrap();
                    // Timestamps are coarse: wait, a bounded while, until a change would get a
                    // later one than the file has.
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    loop {
                        std::fs::write(path("probe.txt"), "").unwrap();
                        if ctime("probe.txt") > ctime("a.yaml") {
                            break;
                        }
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the clock did not move"
                        );
                        std::thread::yield_now();
                    }
                    std::fs::write(path("a.yaml"), "name: A").unwrap();
                    let file = std::fs::File::options()
                        .write(true)
                        .open(path("a.yaml"))
                        .unwrap();
                    file.set_modified(before.modified().unwrap()).unwrap();
                    // Only the change time tells: it is new, so the files are not settled though
                    // the modification time is decades old.
                    assert!(!glance(&files, std::time::SystemTime::now()).settled);
                },
            ),
            ("a new file", &|| {
                std::fs::write(path("c.yaml"), "name: c").unwrap();
            }),
            ("a file gone", &|| {
                std::fs::remove_file(path("more/b.yml")).unwrap();
            }),
            ("a file put in place of another", &|| {
                std::fs::write(path("new.tmp"), "name: a").unwrap();
                std::fs::rename(path("new.tmp"), path("a.yaml")).unwrap();
            }),
        ];
        let mut before = old.hash;
        for (what, change) in changes {
            change();
            let after = glance(&files, later).hash;
            assert_ne!(after, before, "{what}");
            before = after;
        }
        // Files the watch does not read do not count.
        std::fs::write(path(".hidden.yaml"), "name: h").unwrap();
        std::fs::write(path("notes.txt"), "notes").unwrap();
        assert_eq!(glance(&files, later).hash, before);
    }
}
