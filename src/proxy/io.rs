//! Socket wrappers used on every connection: replaying bytes consumed by
//! detection ([`Rewind`]), metering bytes and activity for metrics and idle
//! timeouts ([`MeteredIo`]), and one type for upstream connections whether
//! they are mTLS or plaintext ([`UpstreamIo`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Byte counts are pushed to the shared counters in chunks of at least
/// this size (and on close), so the hot path touches no shared memory.
const FLUSH_BYTES: u64 = 64 * 1024;

// === Rewind ===

/// Replays `prefix` before reading from `inner`.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Give the detection buffer back now, not when the
                // connection closes.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === Activity ===

/// Whether a connection moved a byte since a watchdog last looked.
///
/// A flag rather than a timestamp: the hot path sets it without reading a
/// clock, and the watchdog closes a connection after between one and two
/// idle periods of silence.
#[derive(Debug, Default)]
pub struct Activity {
    moved: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Completes once a whole `idle` period has passed with nothing moved.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            tokio::time::sleep(idle).await;
            if !self.moved.swap(false, Ordering::Relaxed) {
                return;
            }
        }
    }
}

// === MeteredIo ===

/// Counts bytes into a pair of counters and records activity.
#[derive(Debug)]
pub struct MeteredIo<T> {
    inner: T,
    activity: Arc<Activity>,
    counters: Option<ByteCounters>,
    unflushed_read: u64,
    unflushed_written: u64,
}

/// Where a connection's byte counts go.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    pub read: IntCounter,
    pub written: IntCounter,
}

impl<T> MeteredIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            counters: None,
            unflushed_read: 0,
            unflushed_written: 0,
        }
    }

    /// Attaches counters once the connection's labels are known (after
    /// detection and the handshake); bytes moved so far are kept.
    pub fn set_counters(&mut self, counters: ByteCounters) {
        self.counters = Some(counters);
        self.flush(0);
    }

    fn flush(&mut self, threshold: u64) {
        let Some(counters) = &self.counters else {
            return;
        };
        if self.unflushed_read > threshold {
            counters.read.inc_by(self.unflushed_read);
            self.unflushed_read = 0;
        }
        if self.unflushed_written > threshold {
            counters.written.inc_by(self.unflushed_written);
            self.unflushed_written = 0;
        }
    }
}

impl<T> Drop for MeteredIo<T> {
    fn drop(&mut self) {
        self.flush(0);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MeteredIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.activity.touch();
            self.unflushed_read += n;
            if self.unflushed_read >= FLUSH_BYTES {
                self.flush(FLUSH_BYTES - 1);
            }
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MeteredIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.record_write(n);
        }
        poll
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.record_write(n);
        }
        poll
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> MeteredIo<T> {
    fn record_write(&mut self, n: usize) {
        if n > 0 {
            self.activity.touch();
            self.unflushed_written += n as u64;
            if self.unflushed_written >= FLUSH_BYTES {
                self.flush(FLUSH_BYTES - 1);
            }
        }
    }
}

// === UpstreamIo ===

/// A connection the proxy opened: mTLS to a peer proxy, or plaintext (to
/// the local application, or to an unmeshed destination in permissive
/// mode).
pub enum UpstreamIo {
    Plain(MeteredIo<TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<MeteredIo<TcpStream>>>),
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamIo::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            UpstreamIo::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Rewind::new(Bytes::from_static(b"hello"), server);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn metered_io_counts_bytes_into_its_counters_by_close() {
        let read = IntCounter::new("r", "r").unwrap();
        let written = IntCounter::new("w", "w").unwrap();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = MeteredIo::new(server, Activity::new());
        client.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        io.read_exact(&mut buf).await.unwrap();
        io.set_counters(ByteCounters {
            read: read.clone(),
            written: written.clone(),
        });
        io.write_all(b"hello").await.unwrap();
        drop(io);
        assert_eq!(read.get(), 3);
        assert_eq!(written.get(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_reports_idle_only_after_the_quiet_period() {
        let activity = Activity::new();
        let idle = tokio::time::timeout(
            Duration::from_millis(20),
            activity.idle_for(Duration::from_secs(3600)),
        );
        assert!(idle.await.is_err(), "idle reported too early");
    }
}
