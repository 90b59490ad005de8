//! Test-side infrastructure for the `sluice` integration tests.
//!
//! Include it from an integration test with `mod support;`. Everything here
//! binds loopback addresses only and every wait is bounded by a timeout.
//!
//! * [`pki`]: a test PKI generated at run time (CA, origin, client, ...).
//! * [`origin`]: HTTP (TLS, plaintext, unix socket), gRPC-style and TCP echo
//!   origins that record what crossed the wire.
//! * [`client`]: HTTP/1.1 and HTTP/2 client helpers and TLS client configs.
//! * [`process`]: running the `sluice` binary.
//! * [`body`]: request/response body helpers.
#![allow(dead_code, unused_imports)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod body;
pub mod client;
pub mod command;
pub mod origin;
pub mod pki;
pub mod process;
pub mod resources;
pub mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use body::{big_body, body_channel, empty, full, Body, BodySender, BoxError};
pub use client::{
    collect_response, half_close_roundtrip, http1_get, http2_get, proxy_connect, proxy_get,
    read_exact_in_time, read_response_head, serves, stops_accepting, H1Client, H2Client,
    HttpResponse,
};
pub use origin::{
    closing_listener, silent_listener, start_grpc_origin, start_h2c_grpc_origin,
    start_plain_origin, start_tcp_echo, start_tls_echo, start_tls_echo_with, start_tls_origin,
    start_unix_origin, EchoRecord, Origin, OriginBuilder, Protocols, Recorder, RequestRecord,
    TlsRecord,
};
pub use pki::{pki, CertKey, Pki, CLIENT_SPIFFE_ID, ORIGIN_DNS, ORIGIN_SPIFFE_ID, PUBLIC_NAMES};
pub use process::{
    api_request, free_port, sluice_cli, CliOutput, ControlPlane, Sluice, SluiceBuilder, CONFIG_FILE,
};
pub use resources::{dataplane, ep, mes, pem_source, verification};
pub use tls::{client_tls_config, tls_connect, ClientAuth, ClientTls, TlsSettings, TlsVersions};

/// Default timeout used by helpers that wait on the network or a process.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Installs the aws-lc-rs rustls crypto provider as the process default.
/// Safe to call any number of times, from any thread.
pub fn init_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed it already.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Polls `cond` until it returns true or `timeout` elapses.
/// Returns whether the condition became true.
#[must_use = "assert on the result: false means the condition never held"]
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`wait_until`] for a condition that has to be awaited
/// (for example an admin request).
#[must_use = "assert on the result: false means the condition never held"]
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(remaining, cond()).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A uniquely named directory under [`std::env::temp_dir`], removed on drop
/// unless the thread is panicking (then it is kept for inspection and its
/// path printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-<pid>-<counter>-<nanos>`.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping temp dir {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Reads what the peer sends until it closes the connection (a reset counts as closed) and
/// returns those bytes and how long the close took. Panics if the connection is still open
/// after [`DEFAULT_TIMEOUT`].
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, Duration) {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEFAULT_TIMEOUT, stream.read_to_end(&mut out))
        .await
        .expect("the peer must close the connection");
    (out, started.elapsed())
}

/// A connection was closed by a timeout of `ms` milliseconds: not before it (less a little for
/// clocks), and not long after.
pub fn assert_cut_off_at(took: Duration, ms: u64) {
    let timeout = Duration::from_millis(ms);
    assert!(
        took >= timeout.mul_f64(0.8) && took < timeout + Duration::from_secs(4),
        "closed after {took:?}, expected about {timeout:?}"
    );
}
