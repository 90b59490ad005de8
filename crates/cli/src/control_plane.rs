//! `sluice control-plane`: the registry's REST API over a store.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use sluice_control::server::{router, Api};
use sluice_store::Store;

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
    /// A file holding the admin token; without it one is generated into DATA_DIR/admin-token.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// A file holding a token that may only read.
    #[arg(long)]
    read_token_file: Option<PathBuf>,
    /// Time a client has to send a complete request head.
    #[arg(long, default_value = "10s", value_parser = crate::run::parse_duration)]
    header_read_timeout: std::time::Duration,
}

pub fn main(args: ControlPlaneArgs) -> ExitCode {
    crate::run::serve_until_done(serve(args))
}

async fn serve(args: ControlPlaneArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("data dir {}: cannot create", args.data_dir.display()))?;
    let admin_token = match &args.auth_token_file {
        Some(path) => read_token(path)?,
        None => admin_token(&args.data_dir)?,
    };
    let read_token = args
        .read_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("sluice.db").display()));
    let store = Store::open(&url)
        .await
        .with_context(|| format!("store {}", redact_url(&url)))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "{}: cannot listen; choose another with --listen",
                args.listen
            )
        })?;
    tracing::info!(address = %listener.local_addr()?, store = %redact_url(&url), "control plane listening");
    let api = Arc::new(Api {
        store,
        admin_token,
        read_token,
    });
    let app = router(api);
    let header_read_timeout = args.header_read_timeout;
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // A client must send its request head in time: slow clients cannot hold the API.
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
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

/// The admin token in DATA_DIR/admin-token, generated on first start, readable by its owner only.
fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("admin-token");
    if path.exists() {
        return read_token(&path);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read random bytes for the admin token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("{}: cannot create the admin token file", path.display()))?;
    writeln!(file, "{token}")?;
    eprintln!(
        "sluice: admin token written to {} (readable by its owner only)",
        path.display()
    );
    Ok(token)
}

/// A store URL with any password left out, for logs and errors.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://./x.db"), "sqlite://./x.db");
    }
}
