//! Looking at an app's first bytes without taking them, so that the server that reads them
//! next sees them all.

use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::net::TcpStream;

/// Peeks at the start of `stream` into `buf` until `decide` answers for the bytes seen so far.
/// `Ok(None)` when the app closes or the socket fails first, or when `buf` fills without an
/// answer; `Err` when `deadline` passes first.
pub async fn until<R>(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Duration,
    mut decide: impl FnMut(&[u8]) -> Option<R>,
) -> Result<Option<R>, tokio::time::error::Elapsed> {
    let look = async {
        let mut seen = 0;
        loop {
            // poll_peek waits in the socket's own waker slot; peek() and readable() would queue
            // a waiter under a lock, which costs more and is not needed for one task.
            let n = match std::future::poll_fn(|cx| stream.poll_peek(cx, &mut ReadBuf::new(buf)))
                .await
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if let Some(answer) = decide(&buf[..n]) {
                return Some(answer);
            }
            if n == buf.len() {
                return None;
            }
            if n == seen {
                // Nothing new since the last look: peeking leaves the socket readable, so mark it
                // not ready and wait for more bytes instead of looking again at once.
                let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
            }
            seen = n;
        }
    };
    tokio::time::timeout(deadline, look).await
}
