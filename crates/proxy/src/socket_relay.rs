//! Relaying between two plain TCP sockets: each direction waits for bytes holding no memory,
//! then moves them through a buffer borrowed from its thread's pool for as long as they keep
//! coming. An open relay with nothing moving holds no buffer, and one moving bytes holds one
//! per busy direction, whose size lets a bulk transfer move in few system calls.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use socket2::SockRef;
use tokio::net::TcpStream;

/// What one read may take. Copying rather than splice(2) hands the receiving app compact
/// segments of freshly written memory: on loopback the app then spends a quarter less CPU per
/// byte it reads, more than the copy costs the proxy (BENCHMARKS.md, CONNECT).
const BUFFER: usize = 256 * 1024;

/// How many full-size buffers the process lends at once (64 MiB): a direction holds its buffer
/// until the other side has taken the bytes, so slow readers could otherwise pin
/// `--max-connections` times two of them.
const LENT_AT_MOST: usize = 256;

/// What a direction borrows when the full-size buffers are all lent: still moves bytes, in
/// more system calls.
const SMALL_BUFFER: usize = 16 * 1024;

/// Buffers a thread keeps for its next bursts; any beyond are freed.
const KEPT: usize = 4;

/// Counts the full-size buffers out, so that no more than `at_most` are.
struct Lender {
    lent: AtomicUsize,
    at_most: usize,
}

impl Lender {
    /// Whether one more full-size buffer may be lent; if so, it is counted until `give_back`.
    fn lend(&self) -> bool {
        if self.lent.fetch_add(1, Ordering::Relaxed) < self.at_most {
            return true;
        }
        self.lent.fetch_sub(1, Ordering::Relaxed);
        false
    }

    fn give_back(&self) {
        self.lent.fetch_sub(1, Ordering::Relaxed);
    }
}

static LENDER: Lender = Lender {
    lent: AtomicUsize::new(0),
    at_most: LENT_AT_MOST,
};

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer taken from the pool (or, with every full-size one lent, a small one of its own),
/// given back on drop however the relay ends.
struct Borrowed {
    buf: Vec<u8>,
    full_size: bool,
}

impl Borrowed {
    fn take() -> Self {
        if !LENDER.lend() {
            return Self {
                buf: Vec::with_capacity(SMALL_BUFFER),
                full_size: false,
            };
        }
        let pooled = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        Self {
            buf: pooled.unwrap_or_else(|| Vec::with_capacity(BUFFER)),
            full_size: true,
        }
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if !self.full_size {
            return;
        }
        LENDER.give_back();
        let buf = std::mem::take(&mut self.buf);
        // At thread exit the pool may be gone already; the buffer is then just freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEPT {
                p.push(buf);
            }
        });
    }
}

/// Bytes both ways until both directions have ended: the end of one direction is passed on
/// as a half-close (shutdown for writing) of the other socket. `moved` is called whenever
/// bytes arrive from either side; `to_a` and `to_b` count what was written to each.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    moved: &(dyn Fn() + Sync),
    to_a: &AtomicU64,
    to_b: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(one_way(a, b, moved, to_b), one_way(b, a, moved, to_a))?;
    Ok(())
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &(dyn Fn() + Sync),
    written: &AtomicU64,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = Borrowed::take();
        loop {
            buf.buf.clear();
            let n = match from.try_read_buf(&mut buf.buf) {
                Ok(n) => n,
                // Drained: the buffer goes back until the next bytes arrive.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return SockRef::from(to).shutdown(Shutdown::Write);
            }
            moved();
            let mut at = 0;
            while at < n {
                to.writable().await?;
                match to.try_write(&buf.buf[at..n]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => {
                        at += w;
                        written.fetch_add(w as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn carries_both_ways_in_order_and_passes_half_closes_on() {
        // app <-> (a | relay | b) <-> origin
        let (mut app, a) = pair().await;
        let (b, mut origin) = pair().await;
        let (to_a, to_b) = (AtomicU64::new(0), AtomicU64::new(0));
        let moves = AtomicU64::new(0);
        let moved = || {
            moves.fetch_add(1, Ordering::Relaxed);
        };
        let up = pattern(3 * 1024 * 1024 + 17, 1);
        let down = pattern(5 * 1024 * 1024 + 3, 7);
        let relaying = relay(&a, &b, &moved, &to_a, &to_b);
        let app_side = async {
            let (mut r, mut w) = app.split();
            let send = async {
                w.write_all(&up).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        };
        let origin_side = async {
            let (mut r, mut w) = origin.split();
            let mut got = Vec::new();
            // The origin answers only after the app's half-close reached it.
            r.read_to_end(&mut got).await.unwrap();
            w.write_all(&down).await.unwrap();
            w.shutdown().await.unwrap();
            got
        };
        let (relayed, at_app, at_origin) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(relaying, app_side, origin_side)
        })
        .await
        .unwrap();
        relayed.unwrap();
        assert!(at_origin == up, "the origin got the app's bytes in order");
        assert!(at_app == down, "the app got the origin's bytes in order");
        assert_eq!(to_b.load(Ordering::Relaxed), up.len() as u64);
        assert_eq!(to_a.load(Ordering::Relaxed), down.len() as u64);
        assert!(moves.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn no_more_full_size_buffers_are_lent_than_the_bound_and_each_given_back_can_be_lent_again() {
        let lender = Lender {
            lent: AtomicUsize::new(0),
            at_most: 3,
        };
        assert!((0..3).all(|_| lender.lend()));
        assert!(!lender.lend(), "a fourth is refused");
        assert!(!lender.lend(), "a refusal does not count as lent");
        lender.give_back();
        assert!(lender.lend());
        assert!(!lender.lend());
        assert_eq!(lender.lent.load(Ordering::Relaxed), 3);
    }

    fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }

    #[tokio::test]
    async fn an_open_relay_with_nothing_moving_holds_no_buffer_and_reuses_the_pooled_one() {
        let (mut app, a) = pair().await;
        let (b, mut origin) = pair().await;
        let (to_a, to_b) = (AtomicU64::new(0), AtomicU64::new(0));
        let relaying = relay(&a, &b, &|| {}, &to_a, &to_b);
        tokio::pin!(relaying);
        assert_eq!(pooled(), 0);
        let exchange = async {
            let returned = || async {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while pooled() == 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the buffer never went back to the pool"
                    );
                    tokio::task::yield_now().await;
                }
            };
            let mut got = [0u8; 4];
            app.write_all(b"ping").await.unwrap();
            origin.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            returned().await;
            origin.write_all(b"pong").await.unwrap();
            app.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            returned().await;
            // The second burst, the other way, took the pooled buffer instead of a new one.
            assert_eq!(pooled(), 1);
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                ended = &mut relaying => panic!("the relay ended while both ends were open: {ended:?}"),
                () = exchange => {}
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (app, a) = pair().await;
        let (b, origin) = pair().await;
        let (to_a, to_b) = (AtomicU64::new(0), AtomicU64::new(0));
        // A linger of zero makes the close a reset.
        SockRef::from(&origin)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(origin);
        let relaying = relay(&a, &b, &|| {}, &to_a, &to_b);
        let ended = tokio::time::timeout(Duration::from_secs(10), relaying)
            .await
            .unwrap();
        assert!(ended.is_err(), "a reset must end the relay: {ended:?}");
        drop(app);
    }
}
