//! Body types shared by the clients and the origins.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio::time::Sleep;

/// Boxed error used throughout the support code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the clients send and the origins answer with.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `data` in one frame (with a known length).
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body (length 0).
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// The content `/big?bytes=n` answers with: byte `i` is `i % 251`.
pub fn big_body(n: usize) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// A streaming body fed from a [`BodySender`] (no length known in advance,
/// so HTTP/1.1 uses chunked encoding). Dropping the sender ends the body.
pub fn body_channel() -> (BodySender, Body) {
    let (tx, rx) = mpsc::channel(16);
    (BodySender { tx }, ChannelBody { rx }.boxed())
}

/// Feeds a body made by [`body_channel`].
#[derive(Clone, Debug)]
pub struct BodySender {
    tx: mpsc::Sender<Frame<Bytes>>,
}

impl BodySender {
    /// Sends one data frame; false if the body was dropped by its reader.
    pub async fn send_data(&self, data: impl Into<Bytes>) -> bool {
        self.tx.send(Frame::data(data.into())).await.is_ok()
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// A fixed list of frames; counts in `trailers_sent` when its trailers frame
/// is handed to the connection.
pub(crate) struct FramesBody {
    frames: VecDeque<Frame<Bytes>>,
    trailers_sent: Option<Arc<AtomicUsize>>,
}

impl FramesBody {
    pub(crate) fn new(frames: Vec<Frame<Bytes>>, trailers_sent: Option<Arc<AtomicUsize>>) -> Self {
        FramesBody {
            frames: frames.into(),
            trailers_sent,
        }
    }
}

impl HttpBody for FramesBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = self.frames.pop_front();
        if let (Some(f), Some(counter)) = (&frame, &self.trailers_sent) {
            if f.is_trailers() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// `n` bytes of [`big_body`] content produced lazily in 64 KiB frames.
pub(crate) struct PatternBody {
    offset: usize,
    total: usize,
}

impl PatternBody {
    pub(crate) fn new(total: usize) -> Self {
        PatternBody { offset: 0, total }
    }
}

impl HttpBody for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        const CHUNK: usize = 64 * 1024;
        if self.offset >= self.total {
            return Poll::Ready(None);
        }
        let end = (self.offset + CHUNK).min(self.total);
        let chunk: Vec<u8> = (self.offset..end).map(pattern_byte).collect();
        self.offset = end;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.total - self.offset) as u64)
    }
}

/// `chunks` data frames `slow-chunk-<i>\n`, the first one at once and each
/// following one `interval` after the previous.
pub(crate) struct SlowBody {
    next: usize,
    chunks: usize,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SlowBody {
    pub(crate) fn new(chunks: usize, interval: Duration) -> Self {
        SlowBody {
            next: 0,
            chunks,
            interval,
            sleep: None,
        }
    }

    /// The full content a `SlowBody::new(chunks, _)` produces.
    pub(crate) fn content(chunks: usize) -> String {
        (0..chunks).map(|i| format!("slow-chunk-{i}\n")).collect()
    }
}

impl HttpBody for SlowBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.next >= self.chunks {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let i = self.next;
        self.next += 1;
        let interval = self.interval;
        self.sleep = Some(Box::pin(tokio::time::sleep(interval)));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
            "slow-chunk-{i}\n"
        ))))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks
    }
}
