//! Accepting TCP connections: the one loop behind the proxy's listeners,
//! the admin server and the controller's webhook.
//!
//! Each accepted connection is served on its own task while it holds one
//! of a fixed number of permits; a connection over the limit is closed at
//! once, and a failing `accept` (out of file descriptors and the like)
//! backs off instead of spinning. The loop stops when `stop` resolves;
//! connections already accepted finish on their own terms.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
}

/// Accepts on `listener` until `stop` resolves, serving each connection
/// with `serve` on a task of its own while at most `max_connections` are
/// open. `refused` hears of every connection that was not served.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    max_connections: usize,
    stop: impl Future<Output = ()>,
    mut refused: impl FnMut(Refused),
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // A semaphore holds at most MAX_PERMITS; more would panic.
    let limit = Arc::new(Semaphore::new(
        max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(stream);
            refused(Refused::AtCapacity(peer));
            continue;
        };
        let task = serve(stream, peer);
        tokio::spawn(async move {
            task.await;
            drop(permit);
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
            1,
            async {
                let _ = stop_rx.await;
            },
            move |refused| {
                if let Refused::AtCapacity(_) = refused {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
            move |_stream, _peer| {
                let mut release = release_rx.clone();
                async move {
                    let _ = release.wait_for(|go| *go).await;
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
}
