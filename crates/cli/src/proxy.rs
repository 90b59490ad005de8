//! `sluice proxy`: the proxy fed by a control plane's config stream.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use sluice_proxy::subscribe::{follow, Subscription};

use crate::run::{start_forward_proxy, start_proxy, ProxyFlags, Termination};

#[derive(Args)]
pub struct ProxyArgs {
    /// Control plane URLs (http://HOST:PORT), comma-separated or repeated: tried in turn, the
    /// next one when a stream is lost.
    #[arg(
        long,
        env = "SLUICE_CONTROL_PLANE",
        value_delimiter = ',',
        required = true
    )]
    control_plane: Vec<String>,
    /// This proxy's name: a Dataplane of this name decides its listeners and what it may reach.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    mesh: String,
    /// The control plane's proxy token (or its admin token).
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token, instead of --token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Where the last good config is kept, to start from when no control plane answers.
    #[arg(long, default_value = "./.sluice")]
    data_dir: PathBuf,
    #[command(flatten)]
    proxy: ProxyFlags,
}

pub fn main(args: ProxyArgs) -> ExitCode {
    crate::run::serve_until_done(args.proxy.workers, serve(args))
}

async fn serve(args: ProxyArgs) -> anyhow::Result<()> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(path)) => crate::control_plane::read_token(path)?,
        (None, None) => bail!("a token is required: --token, --token-file or SLUICE_TOKEN (the control plane writes one to DATA_DIR/proxy-token)"),
    };
    let control_planes = args
        .control_plane
        .iter()
        .map(|url| crate::client::control_plane_address(url).map(|a| format!("http://{a}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let cache = args.data_dir.join(format!(
        "proxy-{}-{}.config",
        file_safe(&args.mesh),
        file_safe(&args.name)
    ));
    let proxy = start_proxy(&args.proxy, Some(token.clone())).await?;
    start_forward_proxy(&args.proxy, &proxy).await?;
    proxy.mark_started();
    let subscription = Subscription {
        control_planes,
        mesh: args.mesh.clone(),
        name: args.name.clone(),
        token,
        cache,
        connect_timeout: args.proxy.connect_timeout,
    };
    let following = tokio::spawn(follow(subscription, proxy.clone()));
    let mut stop = Termination::new()?;
    stop.wait().await;
    following.abort();
    tracing::info!(drain = ?args.proxy.drain_timeout, "shutting down; draining open connections");
    proxy.shutdown().await;
    Ok(())
}

/// A name as part of a file name: anything but letters, digits, `-`, `_` and `.` becomes `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
