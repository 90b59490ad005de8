//! TCP outbounds: bytes both ways, each direction closed on its own (half-close respected).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, Entry};
use crate::metrics::{BytesLabels, Metrics};
use crate::upstream::Connector;

pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    connector: Arc<Connector>,
    metrics: &Metrics,
    access_log: &AccessLog,
    kill: CancellationToken,
) {
    let started = Instant::now();
    let mut entry = Entry::new("tcp", listener, peer, connector.log_label.clone());
    metrics
        .tcp_connections
        .get_or_create(&Metrics::service(&connector.label))
        .inc();
    let connected = tokio::select! {
        c = connector.connect() => c,
        _ = kill.cancelled() => return,
    };
    match connected {
        Err(e) => {
            tracing::debug!(service = %connector.label, error = %e, "tcp upstream failed");
            entry.error = Some(e.to_string());
        }
        Ok(mut upstream) => {
            entry.upstream = Some(upstream.info.address.clone());
            entry.tls_version = upstream.info.tls_version;
            let copied = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream.io) => Some(r),
                _ = kill.cancelled() => None,
            };
            match copied {
                Some(Ok((up, down))) => {
                    entry.bytes_in = up;
                    entry.bytes_out = down;
                }
                Some(Err(e)) => entry.error = Some(format!("connection ended with an error: {e}")),
                None => entry.error = Some("closed at the end of the drain deadline".into()),
            }
        }
    }
    for (direction, n) in [
        ("upstream", entry.bytes_in),
        ("downstream", entry.bytes_out),
    ] {
        metrics
            .bytes
            .get_or_create(&BytesLabels {
                service: connector.label.clone(),
                direction,
            })
            .inc_by(n);
    }
    entry.duration_ms = started.elapsed().as_micros() as f64 / 1000.0;
    access_log.log(entry);
}
