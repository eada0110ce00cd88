//! Accepting TCP connections: the one loop behind the proxy's listeners,
//! the admin server and the controller's webhook.
//!
//! Each accepted connection is served on its own task while it holds one
//! of a fixed number of permits, and, where a per-source cap is set, one
//! of its source address's share; a connection over either is closed at
//! once. A failing `accept` (out of file descriptors and the like) backs
//! off instead of spinning. The loop stops when `stop` resolves;
//! connections already accepted finish on their own terms.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long to wait after `accept` fails before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A connection the loop did not serve.
#[derive(Debug)]
pub enum Refused {
    /// `accept` itself failed; the loop waits a moment and goes on.
    AcceptFailed(std::io::Error),
    /// Every permit was taken; the connection from this peer was closed.
    AtCapacity(SocketAddr),
    /// This peer's address already holds its share; closed.
    SourceAtCapacity(SocketAddr),
}

/// How many connections a listener serves at once.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    /// At most this many from one source address (IPv4-mapped IPv6
    /// addresses count as their IPv4 address).
    pub per_source: Option<usize>,
}

impl Caps {
    pub fn total(total: usize) -> Self {
        Self {
            total,
            per_source: None,
        }
    }
}

/// Open connections per source address, for [`Caps::per_source`].
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`Sources`], given back when dropped.
struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceSlot> {
        let mut open = self.0.lock();
        let count = open.entry(ip).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.0.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Accepts on `listener` until `stop` resolves, serving each connection
/// with `serve` on a task of its own within `caps`. `refused` hears of
/// every connection that was not served.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    caps: Caps,
    stop: impl Future<Output = ()>,
    mut refused: impl FnMut(Refused),
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // A semaphore holds at most MAX_PERMITS; more would panic.
    let limit = Arc::new(Semaphore::new(caps.total.clamp(1, Semaphore::MAX_PERMITS)));
    let sources = Arc::new(Sources::default());
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    refused(Refused::AcceptFailed(error));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let slot = match caps.per_source {
            Some(cap) => match sources.take(peer.ip().to_canonical(), cap) {
                Some(slot) => Some(slot),
                None => {
                    drop(stream);
                    refused(Refused::SourceAtCapacity(peer));
                    continue;
                }
            },
            None => None,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(stream);
            refused(Refused::AtCapacity(peer));
            continue;
        };
        let task = serve(stream, peer);
        tokio::spawn(async move {
            task.await;
            drop((permit, slot));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let at_capacity = Arc::new(AtomicUsize::new(0));
        let counted = at_capacity.clone();
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            Caps::total(1),
            async {
                let _ = stop_rx.await;
            },
            move |refused| {
                if let Refused::AtCapacity(_) = refused {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
            move |stream, _peer| {
                let mut release = release_rx.clone();
                async move {
                    let _ = release.wait_for(|go| *go).await;
                    drop(stream);
                }
            },
        ));
        let _held = TcpStream::connect(addr).await.unwrap();
        // The second connection is accepted by the kernel, then closed by
        // the loop: reading it sees EOF.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("the refused connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(at_capacity.load(Ordering::SeqCst), 1);
        release_tx.send_replace(true);
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn one_source_cannot_take_another_sources_share() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused_sources = Arc::new(AtomicUsize::new(0));
        let counted = refused_sources.clone();
        let (_release_tx, release_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(accept_loop(
            listener,
            Caps {
                total: 10,
                per_source: Some(2),
            },
            std::future::pending(),
            move |refused| {
                if let Refused::SourceAtCapacity(_) = refused {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
            move |stream, _peer| {
                let mut release = release_rx.clone();
                async move {
                    let _ = release.wait_for(|go| *go).await;
                    drop(stream);
                }
            },
        ));
        let from = |ip: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(addr)
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(from("127.0.0.2").await.unwrap());
        }
        // The third from .2 is closed; .3 still gets in.
        let mut third = held.pop().unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(refused_sources.load(Ordering::SeqCst), 1);
        let mut other = from("127.0.0.3").await.unwrap();
        let open = tokio::time::timeout(Duration::from_millis(200), other.read(&mut buf)).await;
        assert!(open.is_err(), "the other source was refused: {open:?}");
    }
}
