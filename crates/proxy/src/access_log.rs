//! JSON access log: one line per HTTP request and per TCP connection, written off the request
//! path by a single task so a slow disk never stalls traffic.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Lines waiting to be written; past this, lines are dropped and counted rather than block.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Serialize, Default)]
pub struct Entry {
    pub time: String,
    pub kind: &'static str,
    pub listener: String,
    pub source: String,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub upstream: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub tls_version: Option<&'static str>,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
}

pub enum Target {
    Stdout,
    File(PathBuf),
}

impl AccessLog {
    /// Opens the target and starts the writer task.
    pub async fn start(target: Target) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        match target {
            Target::Stdout => {
                tokio::spawn(write_lines(rx, tokio::io::stdout()));
            }
            Target::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await?;
                tokio::spawn(write_lines(rx, file));
            }
        }
        Ok(Self { tx })
    }

    /// A log that writes nowhere, for embedding without an access log.
    pub fn disabled() -> Self {
        let (tx, _rx) = mpsc::channel(1);
        Self { tx }
    }

    pub fn log(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() && !self.tx.is_closed() {
            tracing::warn!("access log queue full: line dropped");
        }
    }
}

async fn write_lines<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Entry>, mut out: W) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(entry) = rx.recv().await {
        push_line(&mut buf, &entry);
        // Batch what is already queued into one write.
        while buf.len() < 60 * 1024 {
            match rx.try_recv() {
                Ok(entry) => push_line(&mut buf, &entry),
                Err(_) => break,
            }
        }
        if let Err(e) = out.write_all(&buf).await {
            tracing::error!(error = %e, "access log write failed");
        }
        let _ = out.flush().await;
        buf.clear();
    }
}

fn push_line(buf: &mut Vec<u8>, entry: &Entry) {
    if serde_json::to_writer(&mut *buf, entry).is_ok() {
        buf.push(b'\n');
    }
}

/// RFC 3339 UTC time with milliseconds, without pulling in a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_795_000_000_000, "2026-11-18T11:06:40.000Z"),
        ];
        for (ms, want) in cases {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(rfc3339(t), want);
        }
    }
}
