//! JSON access log: one line per HTTP request and per TCP connection, written off the request
//! path by one thread of its own so a slow disk never stalls traffic.
//!
//! The writer wakes on a short interval and writes whatever has queued as one batch. Waking it
//! per line instead would cost a thread switch per request, which under load costs more than
//! the rest of the proxy's work. The queue is a vector behind a mutex that the writer swaps for
//! an empty one: a line costs the request one uncontended lock, where a channel costs several
//! atomic operations on each side and a lock on the writer's to hand the slot back.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::oneshot;

/// Lines waiting to be written; past this, lines are dropped rather than block traffic.
const QUEUE: usize = 64 * 1024;

/// What the writer keeps of its queue's memory between bursts, in lines.
const KEPT_CAPACITY: usize = 4096;

/// Lines are formatted and written in batches of about this size.
const BATCH_BYTES: usize = 16 * 1024;

/// How long a line may wait before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// One access-log line. Built on the request path, so its fields are cheap to fill: shared
/// names, the raw time and address; formatting happens on the writer thread.
#[derive(Debug, Serialize)]
pub struct Entry {
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    /// `http`, `forward`, `tunnel` or `tcp`: written as it is, unescaped.
    pub kind: &'static str,
    pub listener: Arc<str>,
    pub source: SocketAddr,
    pub service: Arc<str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_method"
    )]
    pub method: Option<http::Method>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub upstream: Option<Arc<str>>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(rename = "duration_ms", serialize_with = "serialize_ms")]
    pub duration: Duration,
    pub tls_version: Option<&'static str>,
    pub error: Option<String>,
}

impl Entry {
    pub fn new(
        kind: &'static str,
        listener: Arc<str>,
        source: SocketAddr,
        service: Arc<str>,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            kind,
            listener,
            source,
            service,
            method: None,
            authority: None,
            path: None,
            protocol: None,
            status: None,
            upstream: None,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            tls_version: None,
            error: None,
        }
    }
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// Milliseconds with microseconds as the fraction, the way the line has always carried them.
fn serialize_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_micros() as f64 / 1000.0)
}

fn serialize_method<S: serde::Serializer>(
    m: &Option<http::Method>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

/// Where lines go; cloned into every listener. Off, it holds nothing and logs nothing.
#[derive(Clone)]
pub struct AccessLog {
    queue: Option<Arc<Open>>,
}

/// The queue as the proxy holds it: when the last clone goes, the writer writes what is left
/// and ends.
struct Open(Arc<Queue>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

struct Queue {
    lines: Mutex<Vec<Entry>>,
    /// Answered once everything logged before them is written.
    flushes: Mutex<Vec<oneshot::Sender<()>>>,
    /// Lines the queue had no room for: `sluice_access_log_lines_dropped_total`.
    dropped: Counter,
    closed: AtomicBool,
}

pub enum Target {
    Stdout,
    File(PathBuf),
    /// No access log: no writer thread, and requests skip building their lines.
    Off,
}

impl AccessLog {
    /// Opens the target and starts the writer thread; lines it has no room for count in
    /// `dropped`.
    pub fn start(target: Target, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self { queue: None }),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?,
            ),
        };
        let queue = Arc::new(Queue {
            lines: Mutex::new(Vec::new()),
            flushes: Mutex::new(Vec::new()),
            dropped,
            closed: AtomicBool::new(false),
        });
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn({
                let queue = queue.clone();
                move || write_lines(&queue, out)
            })?;
        Ok(Self {
            queue: Some(Arc::new(Open(queue))),
        })
    }

    /// Whether lines are written: off, callers may leave out what only the line would carry.
    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    pub fn log(&self, entry: Entry) {
        let Some(open) = &self.queue else {
            return;
        };
        let queue = &open.0;
        match queue.lines.lock() {
            Ok(mut lines) if lines.len() < QUEUE => lines.push(entry),
            _ => {
                queue.dropped.inc();
            }
        }
    }

    /// Waits (a second at most) until every line logged so far is written: before the process
    /// exits.
    pub async fn flush(&self) {
        let Some(open) = &self.queue else {
            return;
        };
        let (done, written) = oneshot::channel();
        if let Ok(mut flushes) = open.0.flushes.lock() {
            flushes.push(done);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), written).await;
    }
}

fn write_lines(queue: &Queue, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    let mut buf = Vec::with_capacity(BATCH_BYTES + 4096);
    let mut cache = LineCache::default();
    let mut reported = 0;
    let mut write = |buf: &mut Vec<u8>| {
        if let Err(e) = out.write_all(buf).and_then(|_| out.flush()) {
            tracing::error!(error = %e, "access log write failed");
        }
        buf.clear();
    };
    loop {
        // Read before the lines are taken: a line logged before the close is in this batch.
        let closed = queue.closed.load(Ordering::Acquire);
        // Flushes first: whatever they wait for is queued by now.
        let flushes = match queue.flushes.lock() {
            Ok(mut f) => std::mem::take(&mut *f),
            Err(_) => Vec::new(),
        };
        if let Ok(mut lines) = queue.lines.lock() {
            std::mem::swap(&mut *lines, &mut batch);
        }
        // No yield between writes: on a CPU the proxy keeps busy, each yield handed it a whole
        // time slice, and the writer fell behind until the queue overflowed (a tenth of the
        // lines lost at saturation). The scheduler already shares the CPU fairly.
        for entry in batch.drain(..) {
            push_line(&mut buf, &entry, &mut cache);
            if buf.len() >= BATCH_BYTES {
                write(&mut buf);
            }
        }
        batch.shrink_to(KEPT_CAPACITY);
        if !buf.is_empty() {
            write(&mut buf);
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closed {
            return;
        }
        let dropped = queue.dropped.get();
        if dropped > reported {
            tracing::warn!(
                lines = dropped - reported,
                "access log could not keep up: lines dropped"
            );
            reported = dropped;
        }
        std::thread::sleep(FLUSH_INTERVAL);
    }
}

/// One entry as a JSON line, the same as serde_json writes it, field by field: strings that
/// need no escaping (nearly all) are copied as they are, which halves the writer's work.
fn push_line(buf: &mut Vec<u8>, e: &Entry, cache: &mut LineCache) {
    buf.extend_from_slice(b"{\"time\":\"");
    cache.seconds.push(buf, e.time);
    // The kind is one of the proxy's own names, which need no escaping.
    buf.extend_from_slice(b"\",\"kind\":\"");
    buf.extend_from_slice(e.kind.as_bytes());
    buf.extend_from_slice(b"\",\"listener\":");
    cache.listener.push(buf, &e.listener);
    buf.extend_from_slice(b",\"source\":");
    push_source(buf, e.source);
    buf.extend_from_slice(b",\"service\":");
    cache.service.push(buf, &e.service);
    let optional: [(&[u8], _); 4] = [
        (b",\"method\":", e.method.as_ref().map(http::Method::as_str)),
        (b",\"authority\":", e.authority.as_deref()),
        (b",\"path\":", e.path.as_deref()),
        (b",\"protocol\":", e.protocol),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            buf.extend_from_slice(name);
            push_str(buf, v);
        }
    }
    if let Some(status) = e.status {
        buf.extend_from_slice(b",\"status\":");
        push_u64(buf, u64::from(status));
    }
    buf.extend_from_slice(b",\"upstream\":");
    push_opt(buf, e.upstream.as_deref());
    buf.extend_from_slice(b",\"bytes_in\":");
    push_u64(buf, e.bytes_in);
    buf.extend_from_slice(b",\"bytes_out\":");
    push_u64(buf, e.bytes_out);
    buf.extend_from_slice(b",\"duration_ms\":");
    push_ms(buf, e.duration);
    buf.extend_from_slice(b",\"tls_version\":");
    push_opt(buf, e.tls_version);
    buf.extend_from_slice(b",\"error\":");
    push_opt(buf, e.error.as_deref());
    buf.extend_from_slice(b"}\n");
}

/// What the lines in a row mostly share, rendered once: a listener's lines name itself and
/// mostly one service.
#[derive(Default)]
struct LineCache {
    seconds: Seconds,
    listener: Quoted,
    service: Quoted,
}

/// A name as the line writes it, kept while the next line names the same `Arc`. The `Arc` is
/// held, so its address cannot be reused by another name meanwhile.
#[derive(Default)]
struct Quoted {
    last: Option<(Arc<str>, Vec<u8>)>,
}

impl Quoted {
    fn push(&mut self, buf: &mut Vec<u8>, name: &Arc<str>) {
        let text = match &self.last {
            Some((last, text)) if Arc::ptr_eq(last, name) => text,
            _ => {
                let mut text = Vec::new();
                push_str(&mut text, name);
                &self.last.insert((name.clone(), text)).1
            }
        };
        buf.extend_from_slice(text);
    }
}

/// `d` in milliseconds with its microseconds as the fraction, as serde_json writes that f64
/// (shortest form, at least one fractional digit): exact below 10^12 ms, where the f64 still
/// holds every digit; beyond, serde_json itself.
fn push_ms(buf: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    let (ms, frac) = (micros / 1000, (micros % 1000) as u32);
    if ms >= 1_000_000_000_000 {
        let _ = serde_json::to_writer(&mut *buf, &(micros as f64 / 1000.0));
        return;
    }
    push_u64(buf, ms as u64);
    buf.push(b'.');
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = digits.iter().rposition(|&d| d != b'0').map_or(1, |i| i + 1);
    buf.extend_from_slice(&digits[..len]);
}

fn push_str(buf: &mut Vec<u8>, s: &str) {
    if needs_no_escape(s.as_bytes()) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

/// True when `s` may go between quotes as it is: no control character, quote or backslash.
/// Looks at eight bytes at a time, since every field of every line passes through here.
fn needs_no_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    // Nonzero when a byte of `w` is below `n` (n <= 128): the subtraction borrows only there.
    let any_below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS;
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    chunks.into_iter().all(|chunk| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(bytes);
        let hits = any_below(w, 0x20)
            | any_below(w ^ (ONES * u64::from(b'"')), 1)
            | any_below(w ^ (ONES * u64::from(b'\\')), 1);
        hits == 0
    }) && tail.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

fn push_opt(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_str(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

/// RFC 3339 UTC time with milliseconds, without pulling in a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let mut buf = Vec::with_capacity(24);
    Seconds::default().push(&mut buf, t);
    String::from_utf8(buf).unwrap_or_default()
}

/// The last time written, rendered up to its second: lines come in bursts within a second, so
/// most need only their milliseconds written.
#[derive(Default)]
struct Seconds {
    at: Option<u64>,
    text: Vec<u8>,
}

impl Seconds {
    /// Digits written by hand: `format!` costs several times more, once per line.
    fn push(&mut self, buf: &mut Vec<u8>, t: SystemTime) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let secs = d.as_secs();
        if self.at != Some(secs) {
            self.text.clear();
            push_seconds(&mut self.text, secs);
            self.at = Some(secs);
        }
        buf.extend_from_slice(&self.text);
        buf.push(b'.');
        push_digits(buf, d.subsec_millis(), 3);
        buf.push(b'Z');
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch.
fn push_seconds(buf: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    if (0..10_000).contains(&y) {
        push_digits(buf, y as u32, 4);
    } else {
        let _ = write!(buf, "{y:04}");
    }
    let parts = [
        (b'-', m, 2),
        (b'-', day, 2),
        (b'T', (rem / 3600) as u32, 2),
        (b':', ((rem % 3600) / 60) as u32, 2),
        (b':', (rem % 60) as u32, 2),
    ];
    for (sep, value, width) in parts {
        buf.push(sep);
        push_digits(buf, value, width);
    }
}

fn push_digits(buf: &mut Vec<u8>, value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut n = value;
    let mut start = digits.len();
    while n > 0 {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let start = start.min(digits.len() - width);
    buf.extend_from_slice(&digits[start..]);
}

fn push_u64(buf: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut n = value;
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[start..]);
}

/// The address as `Display` writes it, quoted; IPv4 by hand, being nearly every line.
fn push_source(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            buf.push(b'"');
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                push_u64(buf, u64::from(octet));
            }
            buf.push(b':');
            push_u64(buf, u64::from(v4.port()));
            buf.push(b'"');
        }
        SocketAddr::V6(_) => {
            let _ = write!(buf, "\"{addr}\"");
        }
    }
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
    fn lines_are_what_serde_json_writes() {
        let mut full = Entry::new(
            "http",
            Arc::from("app/outbound/80"),
            "[::1]:4000".parse().unwrap(),
            Arc::from("api"),
        );
        full.method = Some(http::Method::POST);
        full.authority = Some("api.example.com:8443".into());
        full.path = Some("/q?a=\"b\"&c=\\d\u{1}\té".into());
        full.protocol = Some("HTTP/1.1");
        full.status = Some(503);
        full.upstream = Some(Arc::from("10.0.0.1:443"));
        full.bytes_in = 12;
        full.bytes_out = 3456;
        full.duration = Duration::from_micros(1250);
        full.tls_version = Some("TLSv1.3");
        full.error = Some("upstream said \"no\"\n".into());
        let mut bare = Entry::new(
            "tcp",
            Arc::from("l"),
            "127.0.0.1:1".parse().unwrap(),
            Arc::from("s"),
        );
        bare.duration = Duration::from_secs(40_000_000_000);
        let mut v4 = Entry::new(
            "http",
            Arc::from("l"),
            "10.200.0.255:65535".parse().unwrap(),
            Arc::from("s"),
        );
        v4.status = Some(200);
        v4.bytes_out = u64::MAX;
        v4.bytes_in = 0;
        for e in [full, bare, v4] {
            let mut line = Vec::new();
            push_line(&mut line, &e, &mut LineCache::default());
            let want = serde_json::to_string(&e).unwrap() + "\n";
            assert_eq!(String::from_utf8(line).unwrap(), want);
        }
    }

    #[test]
    fn only_control_characters_quotes_and_backslashes_need_escaping_at_any_offset() {
        let plain = |s: &[u8]| s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\');
        // Every byte value, at every offset of strings from 1 to 19 bytes long, among bytes that
        // need nothing (ASCII, the top of ASCII, UTF-8 continuation bytes).
        for filler in [b'a', b'~', 0x7f, 0x80, 0xff] {
            for len in 1..20 {
                for at in 0..len {
                    for b in 0..=255u8 {
                        let mut s = vec![filler; len];
                        s[at] = b;
                        assert_eq!(
                            needs_no_escape(&s),
                            plain(&s),
                            "byte {b:#x} at {at} of {len}"
                        );
                    }
                }
            }
        }
        let cases: [(&str, bool); 7] = [
            ("", true),
            ("/api/v1/items?page=2", true),
            ("héllo wörld, ünïcode", true),
            ("12345678\"", false),
            ("1234567\\", false),
            ("12345678123456781234567\u{1f}", false),
            ("\t", false),
        ];
        for (s, want) in cases {
            assert_eq!(needs_no_escape(s.as_bytes()), want, "{s:?}");
        }
    }

    #[test]
    fn one_cache_writes_every_line_as_serde_json_would() {
        let (a, b) = (
            Arc::<str>::from("app/outbound/80"),
            Arc::<str>::from("quote\"d"),
        );
        let (x, y) = (Arc::<str>::from("api"), Arc::<str>::from("db"));
        // Every change of kind, listener and service from line to line, and none; a listener
        // whose name needs escaping.
        let lines = [
            ("http", &a, &x),
            ("http", &a, &x),
            ("tcp", &a, &x),
            ("tcp", &b, &x),
            ("tcp", &b, &y),
            ("http", &a, &y),
            ("http", &a, &x),
        ];
        let mut cache = LineCache::default();
        for (kind, listener, service) in lines {
            let e = Entry::new(
                kind,
                listener.clone(),
                "127.0.0.1:9".parse().unwrap(),
                service.clone(),
            );
            let mut line = Vec::new();
            push_line(&mut line, &e, &mut cache);
            let want = serde_json::to_string(&e).unwrap() + "\n";
            assert_eq!(String::from_utf8(line).unwrap(), want);
        }
    }

    #[test]
    fn lines_beyond_the_bound_are_dropped_and_counted() {
        // No writer: the queue only fills.
        let dropped = Counter::default();
        let queue = Arc::new(Queue {
            lines: Mutex::new(Vec::new()),
            flushes: Mutex::new(Vec::new()),
            dropped: dropped.clone(),
            closed: AtomicBool::new(false),
        });
        let log = AccessLog {
            queue: Some(Arc::new(Open(queue.clone()))),
        };
        let entry = || {
            Entry::new(
                "http",
                Arc::from("l"),
                "127.0.0.1:1".parse().unwrap(),
                Arc::from("s"),
            )
        };
        for _ in 0..QUEUE + 5 {
            log.log(entry());
        }
        assert_eq!(queue.lines.lock().unwrap().len(), QUEUE);
        assert_eq!(dropped.get(), 5);
        drop(log);
        assert!(
            queue.closed.load(Ordering::Acquire),
            "the last handle closes the queue"
        );
    }

    #[test]
    fn durations_are_written_as_serde_json_writes_their_milliseconds() {
        let mut micros: Vec<u64> = (0..20_000).collect();
        micros.extend((0..2_000).map(|i| i * 7_919 + 100_000));
        micros.extend([
            999_999_999,
            3_600_000_000,
            86_400_123_456,
            999_999_999_999_999,
        ]);
        micros.extend([1_000_000_000_000_000, 1_234_567_890_123_456_789, u64::MAX]);
        for us in micros {
            let d = Duration::from_micros(us);
            let mut ours = Vec::new();
            push_ms(&mut ours, d);
            let theirs = serde_json::to_string(&(us as f64 / 1000.0)).unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), theirs, "{us} µs");
        }
    }

    #[test]
    fn one_clock_writes_every_time_as_a_fresh_one_would() {
        let mut clock = Seconds::default();
        for ms in [
            0,
            999,
            1_000,
            1_001,
            59_999,
            60_000,
            1_795_000_000_000,
            1_795_000_000_009,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let mut reused = Vec::new();
            clock.push(&mut reused, t);
            assert_eq!(String::from_utf8(reused).unwrap(), rfc3339(t));
        }
    }

    #[test]
    fn formats_rfc3339() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_795_000_000_000, "2026-11-18T11:06:40.000Z"),
            (1_795_000_000_009, "2026-11-18T11:06:40.009Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(rfc3339(t), want);
        }
    }
}
