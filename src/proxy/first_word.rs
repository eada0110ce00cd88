//! After a silent client: who speaks first decides what the connection is.
//!
//! A client that sends nothing within the detection timeout may be
//! waiting for a server that speaks first (SMTP, MySQL, FTP, ...), so the
//! proxy connects upstream anyway. From then on, if the server speaks
//! first, the connection is that protocol and is relayed as bytes; if the
//! client speaks first, its bytes are judged exactly as if detection had
//! just started, so a request sent late is served as HTTP (header hygiene,
//! per-request policy) or refused, never relayed raw.
//!
//! Why telling them apart this way is safe: until the server has spoken,
//! it has received nothing from the client, so no unparsed request can
//! have reached it; and an HTTP server never speaks first (at most it
//! answers a timeout and closes), so a server that does is not one a
//! forged header could be smuggled to.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::detect::{AfterWord, Detection, after_word, deadline_after, read_and_classify};
use super::io::Activity;

/// How much of a server's first words is read before relaying: enough
/// for a banner, small because many such connections may wait.
const BANNER_BYTES: usize = 512;
/// The client's first read after silence; detection grows it as needed.
const PROBE_BYTES: usize = 64;

/// Who spoke first after a silent start.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstWord {
    /// The server: relay, passing on what it said first.
    Server(Bytes),
    /// The client: what its first bytes are (`Detected` or `Stalled`).
    Client(Detection),
    /// Either side closed, a read failed, or nothing moved for the idle
    /// timeout.
    Ended,
}

/// Waits for the first word from `client` or `upstream`. The client's
/// bytes go into `prefix` (to be replayed to whatever serves it).
pub async fn first_word<C, U>(
    client: &mut C,
    prefix: &mut BytesMut,
    upstream: &mut U,
    detect_timeout: Duration,
    max: usize,
    activity: &Activity,
    idle: Duration,
) -> FirstWord
where
    C: AsyncRead + Unpin,
    U: AsyncRead + Unpin,
{
    let mut banner = BytesMut::with_capacity(BANNER_BYTES);
    prefix.reserve(PROBE_BYTES);
    tokio::select! {
        read = upstream.read_buf(&mut banner) => match read {
            Ok(n) if n > 0 => FirstWord::Server(banner.freeze()),
            _ => FirstWord::Ended,
        },
        read = client.read_buf(prefix) => match read {
            Ok(n) if n > 0 => match read_and_classify(client, prefix, deadline_after(detect_timeout), max).await {
                Ok(detection @ (Detection::Detected(_) | Detection::Stalled(_))) => {
                    FirstWord::Client(detection)
                }
                _ => FirstWord::Ended,
            },
            _ => FirstWord::Ended,
        },
        _ = activity.idle_for(idle) => FirstWord::Ended,
    }
}

/// A client connection that stalled after a bare first word, relayed
/// with a watch on what follows the word: whitespace would make it
/// HTTP-shaped, so the read fails (and the relay ends) before those bytes
/// reach the server. Any other byte ends the watch, and so does the server
/// answering: a server that replies to a bare word is not waiting for the
/// end of a request line, so it is not parsing HTTP. Wraps the connection
/// *inside* the replay of the word, so it sees only what comes after.
pub struct WatchedWord<T> {
    inner: T,
    word_len: usize,
    watching: bool,
    server_spoke: Arc<AtomicBool>,
}

impl<T> WatchedWord<T> {
    /// Watches what follows a first word of `word_len` bytes; `None`
    /// watches nothing (a plain relay). The server's side of the relay is
    /// to go through [`WatchedWord::server`].
    pub fn new(inner: T, word_len: Option<usize>) -> Self {
        Self {
            inner,
            word_len: word_len.unwrap_or(0),
            watching: word_len.is_some(),
            server_spoke: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wraps the server's side so that its first byte ends the watch.
    pub fn server<U>(&self, upstream: U) -> ServerSide<U> {
        ServerSide {
            inner: upstream,
            spoke: self.server_spoke.clone(),
        }
    }
}

/// The server's side of a [`WatchedWord`] relay.
pub struct ServerSide<U> {
    inner: U,
    spoke: Arc<AtomicBool>,
}

impl<U: AsyncRead + Unpin> AsyncRead for ServerSide<U> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.spoke.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl<U: AsyncWrite + Unpin> AsyncWrite for ServerSide<U> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The longest first word watched; a longer one is no method.
const MAX_WATCHED_WORD: usize = 32;

impl<T: AsyncRead + Unpin> AsyncRead for WatchedWord<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.watching && self.server_spoke.load(Ordering::Relaxed) {
            self.watching = false;
        }
        if !self.watching || !matches!(poll, Poll::Ready(Ok(()))) {
            return poll;
        }
        for &byte in &buf.filled()[before..] {
            match after_word(byte) {
                AfterWord::StillAWord if self.word_len < MAX_WATCHED_WORD => self.word_len += 1,
                AfterWord::HttpShaped if self.word_len <= MAX_WATCHED_WORD => {
                    // Nothing of this read is passed on.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a stalled first word turned into an HTTP request line",
                    )));
                }
                _ => {
                    self.watching = false;
                    break;
                }
            }
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedWord<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::detect::{Protocol, Stalled};
    use tokio::io::AsyncWriteExt;

    async fn run(
        client_says: Option<&'static [u8]>,
        server_says: Option<&'static [u8]>,
    ) -> (FirstWord, BytesMut) {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut server, mut server_side) = tokio::io::duplex(1024);
        if let Some(bytes) = client_says {
            client.write_all(bytes).await.unwrap();
        }
        if let Some(bytes) = server_says {
            server.write_all(bytes).await.unwrap();
        }
        let mut prefix = BytesMut::new();
        let word = first_word(
            &mut client_side,
            &mut prefix,
            &mut server_side,
            Duration::from_millis(200),
            4096,
            &Activity::new(),
            Duration::from_secs(5),
        )
        .await;
        (word, prefix)
    }

    #[tokio::test]
    async fn a_server_that_speaks_first_makes_the_connection_opaque() {
        let (word, prefix) = run(None, Some(b"220 mail.example ESMTP\r\n")).await;
        assert_eq!(
            word,
            FirstWord::Server(Bytes::from_static(b"220 mail.example ESMTP\r\n"))
        );
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn a_late_request_is_judged_as_http() {
        let (word, prefix) = run(Some(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None).await;
        assert_eq!(
            word,
            FirstWord::Client(Detection::Detected(Protocol::Http1))
        );
        assert!(prefix.starts_with(b"GET / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_late_malformed_request_is_refused_not_relayed() {
        let (word, _) = run(
            Some(b"GET / HTTP/1.2\r\nx-outrider-client-id: forged\r\n"),
            None,
        )
        .await;
        assert_eq!(
            word,
            FirstWord::Client(Detection::Detected(Protocol::MalformedHttp))
        );
        let (word, _) = run(Some(b"GET /half-a-line"), None).await;
        assert_eq!(
            word,
            FirstWord::Client(Detection::Stalled(Stalled::MalformedHttp))
        );
    }

    #[tokio::test]
    async fn a_watched_word_passes_a_reply_protocol_and_cuts_a_request_line() {
        // `before` then a newline: not HTTP, relayed.
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = WatchedWord::new(server, Some(6));
        client.write_all(b"\nmore").await.unwrap();
        let mut got = [0u8; 5];
        watched.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\nmore");
        // `GET` then ` / HTTP/1.1`: cut before the bytes pass.
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = WatchedWord::new(server, Some(3));
        client.write_all(b" / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        let err = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // More of the word, then whitespace, in separate reads.
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = WatchedWord::new(server, Some(2));
        client.write_all(b"T").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 1);
        client.write_all(b"\t/").await.unwrap();
        assert!(watched.read(&mut buf).await.is_err());
        // Once the server has answered the word, the watch is over.
        let (mut client, server) = tokio::io::duplex(64);
        let (mut app, upstream) = tokio::io::duplex(64);
        let mut watched = WatchedWord::new(server, Some(6));
        let mut server_side = watched.server(upstream);
        app.write_all(b"before").await.unwrap();
        assert_eq!(server_side.read(&mut buf).await.unwrap(), 6);
        client.write_all(b"after rotation 2").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 16);
    }

    #[tokio::test]
    async fn late_binary_bytes_are_relayed() {
        let (word, prefix) = run(Some(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), None).await;
        assert_eq!(
            word,
            FirstWord::Client(Detection::Detected(Protocol::Unknown))
        );
        assert_eq!(prefix.len(), 8);
    }
}
