//! Write batching for HTTP/2 connections.
//!
//! An HTTP/2 connection is one task that writes what its stream tasks queued, and two things
//! make it write one stream's frames at a time even when many streams are ready together:
//! the codec writes out every DATA frame larger than a few hundred bytes before it encodes the
//! next frame, and each stream task wakes the connection task as soon as its frame is queued,
//! and tokio runs a task woken this way next. That costs a syscall, and a loopback or network
//! packet, per frame; over TLS a record per frame as well.
//!
//! [`Coalesce`] is the connection's IO: it takes the codec's writes into a buffer. [`Driven`]
//! polls the connection and, once the poll is over, writes the buffer out. When a
//! poll leaves bytes in the buffer for the first time the buffer is held back one turn: the
//! task wakes itself, which tokio answers by putting it at the back of the run queue, so the
//! stream tasks already ready queue their frames first, and the next poll sends them all in
//! one write. When nothing else is ready that costs one extra poll of the connection.
//!
//! A write larger than [`DIRECT`] into an empty buffer goes to the socket as is, so large
//! bodies are not copied; the buffer never grows past [`LIMIT`] before it is written, so a slow
//! peer holds back the codec exactly as the socket would.
//!
//! HTTP/1.1 connections answer one response at a time and keep the socket as is: [`opening`]
//! tells an app connection that opens with the HTTP/2 preface from one that does not, and hands
//! on what it read to tell as a [`First`].

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first bytes of every HTTP/2 connection with prior knowledge (RFC 9113, section 3.4).
const H2_PREFACE_START: &[u8] = b"PRI ";

/// Writes at least this large go to the socket unbuffered when nothing is buffered before them.
const DIRECT: usize = 16 * 1024;

/// The most the buffer holds; a write that would take it past this writes the buffer out first.
const LIMIT: usize = 64 * 1024;

/// What the first bytes of a server connection show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The HTTP/2 preface: the client speaks HTTP/2 with prior knowledge.
    H2,
    /// Anything else: HTTP/1.1, or bytes for the HTTP server to refuse.
    Other,
    /// Closed, failed, or silent past the deadline, before a byte that decides.
    Gone,
}

/// What the bytes seen so far decide, or `None` while they are a proper prefix of the preface.
fn decided(first: &[u8]) -> Option<Opening> {
    let n = first.len().min(H2_PREFACE_START.len());
    if first[..n] != H2_PREFACE_START[..n] {
        Some(Opening::Other)
    } else if n == H2_PREFACE_START.len() {
        Some(Opening::H2)
    } else {
        None
    }
}

/// How much of an app connection is read at once to see how it opens: as much as hyper's HTTP/1.1
/// server reads at first, so that a request head that came with the opening is read whole.
const FIRST_READ: usize = 8 * 1024;

/// How an app connection opens, read within `deadline`, and the connection with what was read
/// to tell, to be read again first. Reading instead of peeking takes the request head in the
/// system call that sees the opening.
pub async fn opening<T: AsyncRead + Unpin>(mut io: T, deadline: Duration) -> (Opening, First<T>) {
    let mut first = Vec::with_capacity(FIRST_READ);
    let look = async {
        loop {
            match tokio::io::AsyncReadExt::read_buf(&mut io, &mut first).await {
                Ok(0) | Err(_) => return Opening::Gone,
                Ok(_) => {}
            }
            if let Some(opening) = decided(&first) {
                return opening;
            }
        }
    };
    let seen = tokio::time::timeout(deadline, look)
        .await
        .unwrap_or(Opening::Gone);
    (
        seen,
        First {
            bytes: first,
            at: 0,
            io,
        },
    )
}

/// A connection whose first bytes were already read: they are read again first, then the rest.
pub struct First<T> {
    bytes: Vec<u8>,
    /// How much of `bytes` was read again.
    at: usize,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for First<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.bytes.len() {
            let n = (this.bytes.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.bytes[this.at..this.at + n]);
            this.at += n;
            if this.at == this.bytes.len() {
                // Read again whole: the buffer goes.
                this.bytes = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for First<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An IO whose HTTP/2 writes are batched; see the module docs. Only the connection polled by
/// its [`Driven`] may use it.
pub struct Coalesce<T> {
    state: Arc<Mutex<State<T>>>,
}

pin_project_lite::pin_project! {
    /// Polls an HTTP/2 connection and writes out what each poll buffered.
    pub struct Driven<F, T> {
        #[pin]
        conn: F,
        state: Arc<Mutex<State<T>>>,
    }
}

struct State<T> {
    io: T,
    out: Vec<u8>,
    /// How much of `out` is already written.
    sent: usize,
    /// `out` was held back one turn already.
    held: bool,
    /// Written to `io` since its last completed flush.
    unflushed: bool,
    /// A write after a poll failed; the connection sees it at its next use of the IO.
    failed: Option<io::Error>,
}

/// For a connection that speaks HTTP/2: the IO to hand to the connection, and what drives the
/// connection once it exists.
pub fn h2<T>(io: T) -> (Coalesce<T>, Driver<T>) {
    let state = Arc::new(Mutex::new(State {
        io,
        out: Vec::new(),
        sent: 0,
        held: false,
        unflushed: false,
        failed: None,
    }));
    (
        Coalesce {
            state: state.clone(),
        },
        Driver { state },
    )
}

/// What turns a connection over a [`Coalesce`] into a [`Driven`] one.
pub struct Driver<T> {
    state: Arc<Mutex<State<T>>>,
}

impl<T> Driver<T> {
    pub fn drive<F: Future>(&self, conn: F) -> Driven<F, T> {
        Driven {
            conn,
            state: self.state.clone(),
        }
    }
}

impl<F, T> Driven<F, T> {
    /// The connection, to call its methods (a graceful shutdown, say).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().conn
    }
}

impl<F: Future, T: AsyncWrite + Unpin> Future for Driven<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = this.conn.poll(cx);
        if polled.is_pending() {
            if let Ok(mut state) = this.state.lock() {
                state.after_poll(cx);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> State<T> {
    /// Writes out what the poll just over buffered, or holds it back one turn.
    fn after_poll(&mut self, cx: &mut Context<'_>) {
        if self.out.is_empty() {
            self.held = false;
            if self.unflushed {
                self.flush_io(cx);
            }
            return;
        }
        if !self.held {
            self.held = true;
            cx.waker().wake_by_ref();
            return;
        }
        match self.drain(cx) {
            Poll::Ready(Ok(())) => {
                self.held = false;
                self.flush_io(cx);
            }
            // The socket wakes the task when it takes more.
            Poll::Pending => {}
            Poll::Ready(Err(e)) => self.fail(e, cx),
        }
    }

    fn flush_io(&mut self, cx: &mut Context<'_>) {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => self.unflushed = false,
            Poll::Pending => {}
            Poll::Ready(Err(e)) => self.fail(e, cx),
        }
    }

    /// Keeps an error from a write no caller is waiting on for the connection's next use of the
    /// IO, and wakes the connection to find it.
    fn fail(&mut self, e: io::Error, cx: &mut Context<'_>) {
        self.failed = Some(e);
        self.out.clear();
        self.sent = 0;
        cx.waker().wake_by_ref();
    }

    /// Writes the buffer out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.unflushed = true;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn write(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.out.len() + len > LIMIT {
            ready!(self.drain(cx))?;
        }
        if self.out.is_empty() && len >= DIRECT {
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
            self.unflushed = true;
            return Poll::Ready(Ok(written));
        }
        for b in bufs {
            self.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}

impl<T> Coalesce<T> {
    /// The state, for a use of the IO; the error of a write after an earlier poll, if one
    /// failed.
    fn enter(&self) -> io::Result<MutexGuard<'_, State<T>>> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| io::Error::other("connection IO poisoned by a panic"))?;
        match state.failed.take() {
            Some(e) => Err(e),
            None => Ok(state),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.enter()?;
        Pin::new(&mut state.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.enter()?;
        state.write(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.enter()?;
        state.write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Writes are copied into the buffer whatever their shape.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.enter()?;
        if !state.out.is_empty() {
            // Written out when the poll that buffered it is over.
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut state.io).poll_flush(cx))?;
        state.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.enter()?;
        ready!(state.drain(cx))?;
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn the_first_bytes_decide_whether_the_client_speaks_http2() {
        let cases: &[(&[u8], Option<Opening>)] = &[
            (b"", None),
            (b"PR", None),
            (b"PRI ", Some(Opening::H2)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Opening::H2)),
            (b"PUT /x HTTP/1.1\r\n", Some(Opening::Other)),
            (b"G", Some(Opening::Other)),
            (b"PRIX", Some(Opening::Other)),
            (b"\x16\x03\x01", Some(Opening::Other)),
        ];
        for (first, want) in cases {
            assert_eq!(
                decided(first),
                *want,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    /// A client that sends the preface a byte at a time is waited for, and what was read to tell
    /// is read again first, then the rest, whatever the reader's buffer.
    #[tokio::test]
    async fn the_opening_waits_for_a_slow_preface_and_is_read_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            for b in b"PRI * HTTP/2.0" {
                c.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            c.write_all(b"\r\n\r\nSM\r\n\r\n").await.unwrap();
            c
        });
        let (server, _) = listener.accept().await.unwrap();
        let (seen, mut first) = opening(server, Duration::from_secs(10)).await;
        assert_eq!(seen, Opening::H2);
        let mut client = client.await.unwrap();
        client.write_all(b"after").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        let mut small = [0u8; 3];
        loop {
            let n = first.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&small[..n]);
        }
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nafter");
    }

    /// An HTTP/1.1 request head is read whole with the opening, and writes go to the socket.
    #[tokio::test]
    async fn a_request_head_comes_with_the_opening() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(head).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (seen, mut first) = opening(server, Duration::from_secs(10)).await;
        assert_eq!(seen, Opening::Other);
        let mut got = vec![0u8; head.len()];
        first.read_exact(&mut got).await.unwrap();
        assert_eq!(got, head);
        first
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 25];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 204 No Content\r\n");
    }

    #[tokio::test]
    async fn a_silent_or_closed_client_is_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (seen, _) = opening(server, Duration::from_millis(50)).await;
        assert_eq!(seen, Opening::Gone);

        let closed = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(closed);
        let (seen, _) = opening(server, Duration::from_secs(10)).await;
        assert_eq!(seen, Opening::Gone);
    }

    /// A waker of a task of its own, told apart from another by `will_wake`.
    fn task_waker() -> Waker {
        struct Task;
        impl std::task::Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        Waker::from(Arc::new(Task))
    }

    /// Reads whatever the far side has now, without waiting.
    fn ready_bytes(far: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut got = vec![0u8; 1 << 20];
        let mut buf = ReadBuf::new(&mut got);
        let waker = std::task::Waker::noop();
        let _ = Pin::new(far).poll_read(&mut Context::from_waker(waker), &mut buf);
        buf.filled().to_vec()
    }

    /// A connection that writes and flushes one frame per poll for `frames` polls, then ends.
    async fn frames(mut io: Coalesce<tokio::io::DuplexStream>, frames: usize) {
        for i in 0..frames {
            io.write_all(format!("frame {i};").as_bytes())
                .await
                .unwrap();
            io.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        io.shutdown().await.unwrap();
    }

    /// What one poll buffers waits one turn, then goes out together with what the next polls
    /// added; nothing is lost or reordered, and the end of the connection writes the rest.
    #[tokio::test]
    async fn frames_of_consecutive_polls_leave_in_one_write() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (io, driver) = h2(near);
        let conn = driver.drive(frames(io, 4));
        tokio::pin!(conn);
        let waker = task_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ready_bytes(&mut far), b"", "held back one turn");
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ready_bytes(&mut far), b"frame 0;frame 1;");
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ready_bytes(&mut far), b"", "a new batch is held back again");
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ready_bytes(&mut far), b"frame 2;frame 3;");
        assert!(conn.as_mut().poll(&mut cx).is_ready());
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"");
    }

    /// The size of the `i`th write of the slow-peer test: mostly frame-sized, now and then
    /// larger than a direct write.
    fn size_of_write(i: usize) -> usize {
        if i.is_multiple_of(100) {
            40_000
        } else {
            1 + (i * 37) % 3000
        }
    }

    /// A peer that reads slowly holds the writer back instead of the buffer growing, and every
    /// byte arrives in order, small writes and large alike.
    #[tokio::test]
    async fn a_slow_peer_gets_every_byte_in_order_and_bounds_the_buffer() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, driver) = h2(near);
        let state = io.state.clone();
        let mut want = Vec::new();
        for i in 0..2000 {
            want.extend(std::iter::repeat_n((i % 251) as u8, size_of_write(i)));
        }
        let writes = want.clone();
        let conn = driver.drive(async move {
            let (mut at, mut i) = (0, 0);
            while at < writes.len() {
                let size = size_of_write(i);
                io.write_all(&writes[at..at + size]).await.unwrap();
                assert!(io.state.lock().unwrap().out.len() <= LIMIT);
                if i.is_multiple_of(7) {
                    io.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
                at += size;
                i += 1;
            }
            io.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), conn)
            .await
            .expect("the writer finishes");
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
            .await
            .expect("the reader finishes")
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes arrive in order");
        assert!(state.lock().unwrap().out.capacity() <= 2 * LIMIT);
    }
}
