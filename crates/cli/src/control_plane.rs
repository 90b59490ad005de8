//! `sluice control-plane`: the registry's REST API over a store.

use sluice_api::model::Cidr;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use sluice_control::server::Api;
use sluice_store::{redact_url, Store};

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:5681")]
    listen: SocketAddr,
    /// sqlite://PATH or postgres://USER@HOST:PORT/DATABASE; SQLite under --data-dir by default.
    #[arg(long)]
    store: Option<String>,
    /// Where the SQLite store and the generated admin token live.
    #[arg(long, default_value = "./.sluice")]
    data_dir: PathBuf,
    #[command(flatten)]
    tokens: Tokens,
    /// Time a client has to send a complete request head.
    #[arg(long, default_value = "10s", value_parser = crate::run::parse_duration)]
    header_read_timeout: std::time::Duration,
    /// Where VIPs for transparent mode come from (IPv4 or IPv6 CIDR).
    #[arg(long, default_value = sluice_control::vip::DEFAULT_RANGE, value_parser = parse_vip_range)]
    vip_range: Cidr,
}

/// A VIP range: a CIDR of at least two addresses.
pub fn parse_vip_range(text: &str) -> Result<Cidr, String> {
    let range = Cidr::parse(text)?;
    sluice_control::vip::Pool::new(range).map_err(|e| e.to_string())?;
    Ok(range)
}

pub fn main(args: ControlPlaneArgs) -> ExitCode {
    crate::run::serve_until_done(None, serve(args))
}

async fn serve(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let mut stop = crate::run::Termination::new()?;
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("sluice.db").display()));
    let (_, Some(serving)) = start(
        &args.data_dir,
        &store,
        &args.tokens,
        Some(args.listen),
        args.header_read_timeout,
        args.vip_range,
    )
    .await?
    else {
        return Ok(());
    };
    tokio::select! {
        _ = stop.wait() => {}
        _ = serving => {}
    }
    Ok(())
}

/// The control plane over the store at `url` (tokens from or into `data_dir`), its API served
/// on `listen` when given; returns the API and the task serving it, if any.
pub async fn start(
    data_dir: &Path,
    url: &str,
    tokens: &Tokens,
    listen: Option<SocketAddr>,
    header_read_timeout: std::time::Duration,
    vip_range: Cidr,
) -> anyhow::Result<(Arc<Api>, Option<tokio::task::JoinHandle<()>>)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("data dir {}: cannot create", data_dir.display()))?;
    let (admin_token, read_token, proxy_token) = tokens.load(data_dir)?;
    let store = Store::open(url)
        .await
        .with_context(|| format!("store {}", redact_url(url)))?;
    let listener = match listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("control plane {addr}: cannot listen; choose another with --listen")
        })?),
        None => None,
    };
    let api = Api::start(store, admin_token, read_token, proxy_token, vip_range)
        .await
        .with_context(|| format!("store {}", redact_url(url)))?;
    let serving = match listener {
        Some(listener) => {
            tracing::info!(address = %listener.local_addr()?, store = %redact_url(url), "control plane listening");
            Some(tokio::spawn(sluice_control::server::serve(
                listener,
                api.clone(),
                header_read_timeout,
                std::future::pending(),
            )))
        }
        None => None,
    };
    Ok((api, serving))
}

/// Who may use the API and the config stream.
#[derive(Args)]
pub struct Tokens {
    /// A file holding the admin token; without it one is generated into DATA_DIR/admin-token.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// A file holding a token that may only read.
    #[arg(long)]
    read_token_file: Option<PathBuf>,
    /// A file holding the token proxies open the config stream with; without it one is
    /// generated into DATA_DIR/proxy-token.
    #[arg(long)]
    proxy_token_file: Option<PathBuf>,
}

impl Tokens {
    /// The admin, read-only and proxy tokens.
    pub fn load(
        &self,
        data_dir: &Path,
    ) -> anyhow::Result<(String, Option<String>, Option<String>)> {
        let admin = match &self.auth_token_file {
            Some(path) => read_token(path)?,
            None => generated_token(data_dir, "admin")?,
        };
        let proxy = match &self.proxy_token_file {
            Some(path) => read_token(path)?,
            None => generated_token(data_dir, "proxy")?,
        };
        let read = self
            .read_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        Ok((admin, read, Some(proxy)))
    }
}

pub(crate) fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("token file {}: cannot read", path.display()))?;
    let token = text.trim().to_string();
    if token.len() < 16 {
        bail!(
            "token file {}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}

/// The ROLE token in DATA_DIR/ROLE-token, generated on first start, readable by its owner only.
fn generated_token(data_dir: &Path, role: &str) -> anyhow::Result<String> {
    let path = data_dir.join(format!("{role}-token"));
    if path.exists() {
        return read_token(&path);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .with_context(|| format!("cannot read random bytes for the {role} token"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("{}: cannot create the {role} token file", path.display()))?;
    writeln!(file, "{token}")?;
    eprintln!(
        "sluice: {role} token written to {} (readable by its owner only)",
        path.display()
    );
    Ok(token)
}
