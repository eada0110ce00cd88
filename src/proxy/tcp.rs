//! Opaque forwarding: bytes both ways, with half-close and an idle timeout,
//! and no memory held by an idle connection.
//!
//! Each direction reads into a buffer on the stack of the poll that reads
//! and writes it straight on; only bytes the writer cannot take at once are
//! kept, in a heap buffer that is given back as soon as the direction goes
//! quiet. An idle relay therefore owns no copy buffer at all, where a
//! `tokio::io::copy_bidirectional` holds 16 KiB for the connection's life.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::Activity;
use super::outcome::ConnOutcome;

/// The most one read takes (a TLS record's plaintext).
const READ_CHUNK: usize = 16 * 1024;

/// Copies until both directions have closed (a half-close is passed on as
/// a write shutdown), an error occurs, or nothing moves for `idle`.
/// Returns how it ended.
pub async fn relay<D, U>(
    mut downstream: D,
    mut upstream: U,
    activity: &Activity,
    idle: Duration,
) -> ConnOutcome
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pump::default();
    let mut down = Pump::default();
    let copy = poll_fn(|cx| {
        let to_upstream = up.poll_copy(cx, &mut downstream, &mut upstream)?;
        let to_downstream = down.poll_copy(cx, &mut upstream, &mut downstream)?;
        if to_upstream.is_ready() && to_downstream.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    });
    tokio::select! {
        result = copy => match result {
            Ok(()) => ConnOutcome::Ok,
            Err(_) => ConnOutcome::Error,
        },
        _ = activity.idle_for(idle) => ConnOutcome::IdleTimeout,
    }
}

/// One direction of a relay.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written, and how far writing got.
    spilled: Option<(Box<[u8]>, usize)>,
    /// Written since the last flush.
    unflushed: bool,
    read_done: bool,
    shut_down: bool,
}

impl Pump {
    /// Moves bytes from `reader` to `writer` until `reader` ends (then
    /// shuts `writer` down) or something has to wait.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some((buf, written)) = &mut self.spilled {
                while *written < buf.len() {
                    let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[*written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *written += n;
                    self.unflushed = true;
                }
                self.spilled = None;
            }
            if self.read_done {
                if self.unflushed {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.unflushed = false;
                }
                if !self.shut_down {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut chunk = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut chunk) {
                Poll::Pending => {
                    // Nothing more to read now: push out what the writer
                    // may be holding (a TLS writer buffers records).
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) if chunk.filled().is_empty() => self.read_done = true,
                Poll::Ready(Ok(())) => {
                    let data = chunk.filled();
                    let mut written = 0;
                    while written < data.len() {
                        match Pin::new(&mut *writer).poll_write(cx, &data[written..]) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                            }
                            Poll::Ready(Ok(n)) => {
                                written += n;
                                self.unflushed = true;
                            }
                            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                            Poll::Pending => break,
                        }
                    }
                    if written < data.len() {
                        // The writer is full: keep the rest, exactly sized,
                        // until it drains.
                        self.spilled = Some((data[written..].into(), 0));
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_half_close_is_passed_on_and_the_reply_still_arrives() {
        let (mut client, downstream) = tokio::io::duplex(1024);
        let (upstream, mut server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let relay = tokio::spawn(async move {
            relay(downstream, upstream, &activity, Duration::from_secs(60)).await
        });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server saw EOF after the request");
        server.write_all(b"reply after half-close").await.unwrap();
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        assert_eq!(relay.await.unwrap(), ConnOutcome::Ok);
    }

    #[tokio::test]
    async fn bytes_a_slow_writer_cannot_take_are_kept_and_all_arrive_in_order() {
        // 64-byte pipes: most writes are partial, so bytes spill and drain.
        let (mut client, downstream) = tokio::io::duplex(64);
        let (upstream, mut server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let relay = tokio::spawn(async move {
            relay(downstream, upstream, &activity, Duration::from_secs(60)).await
        });
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes reordered or lost");
        drop(server);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap(), ConnOutcome::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let (_client, downstream) = tokio::io::duplex(1024);
        let (upstream, _server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let ended = relay(downstream, upstream, &activity, Duration::from_millis(10)).await;
        assert_eq!(ended, ConnOutcome::IdleTimeout);
    }
}
