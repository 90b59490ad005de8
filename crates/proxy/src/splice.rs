//! Relaying between two plain TCP sockets with splice(2): each direction moves bytes from one
//! socket into a pipe and from the pipe into the other socket, so they never enter the proxy's
//! memory. This costs two pipes (four descriptors) per relay instead of two 64 KiB buffers.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::pipe::{fcntl_getpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

/// One direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What one splice into it may move: the kernel may give a pipe less than the usual
    /// 64 KiB when its owner has many (`/proc/sys/fs/pipe-user-pages-soft`).
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = fcntl_getpipe_size(&write)?.max(1);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// The pipes of one relay; made before the relay starts so that a shortage of descriptors
/// leaves the caller free to copy instead.
pub struct Pipes {
    a_to_b: Pipe,
    b_to_a: Pipe,
}

impl Pipes {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            a_to_b: Pipe::new()?,
            b_to_a: Pipe::new()?,
        })
    }
}

/// Bytes both ways until both directions have ended: the end of one direction is passed on
/// as a half-close (shutdown for writing) of the other socket. `moved` is called whenever
/// bytes arrive from either side; `to_a` and `to_b` count what was written to each.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    pipes: Pipes,
    moved: &(dyn Fn() + Sync),
    to_a: &AtomicU64,
    to_b: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(a, b, &pipes.a_to_b, moved, to_b),
        one_way(b, a, &pipes.b_to_a, moved, to_a),
    )?;
    Ok(())
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    moved: &(dyn Fn() + Sync),
    written: &AtomicU64,
) -> io::Result<()> {
    loop {
        // The pipe is empty here, so "would block" can only mean the socket has nothing.
        let held = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, pipe.capacity, FLAGS)?)
            })
            .await?;
        if held == 0 {
            return SockRef::from(to).shutdown(Shutdown::Write);
        }
        moved();
        let mut left = held;
        while left > 0 {
            // The pipe holds bytes here, so "would block" can only mean the socket is full.
            let n = to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, to, None, left, FLAGS)?)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= n;
            written.fetch_add(n as u64, Ordering::Relaxed);
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
        let relaying = relay(&a, &b, Pipes::new().unwrap(), &moved, &to_a, &to_b);
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
        let relaying = relay(&a, &b, Pipes::new().unwrap(), &|| {}, &to_a, &to_b);
        let ended = tokio::time::timeout(Duration::from_secs(10), relaying)
            .await
            .unwrap();
        assert!(ended.is_err(), "a reset must end the relay: {ended:?}");
        drop(app);
    }
}
