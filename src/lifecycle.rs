//! Graceful shutdown: a drain signal every long-running task can watch,
//! and a way to wait (with a deadline) until they have all let go.
//!
//! Every listener and every connection holds a [`Watch`]. Draining flips
//! the signal; listeners stop accepting, HTTP connections finish their
//! in-flight requests and close, opaque connections run on. [`Signal::drain`]
//! resolves when the last [`Watch`] is dropped or the deadline passes.

use std::time::Duration;

use tokio::sync::watch;

/// Owned by whoever decides to shut down.
#[derive(Debug)]
pub struct Signal {
    tx: watch::Sender<bool>,
}

/// Held by each task that must finish before the process exits.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every task finished.
    Clean,
    /// The deadline passed with tasks still running.
    DeadlineExceeded,
}

pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal { tx }, Watch { rx })
}

impl Signal {
    /// Tells every watcher to drain and waits for them to finish, for at
    /// most `deadline`.
    pub async fn drain(self, deadline: Duration) -> Drained {
        let _ = self.tx.send(true);
        match tokio::time::timeout(deadline, self.tx.closed()).await {
            Ok(()) => Drained::Clean,
            Err(_) => Drained::DeadlineExceeded,
        }
    }

    /// A new watcher, for tasks started after the signal was created.
    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
        }
    }
}

impl Watch {
    /// Resolves once draining has started (at once if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        // An error means the Signal was dropped without draining: treat it
        // as a drain, the process is going away.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watcher_to_finish() {
        let (signal, watch) = channel();
        let task = tokio::spawn(async move {
            watch.signaled().await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(watch);
        });
        assert_eq!(signal.drain(Duration::from_secs(5)).await, Drained::Clean);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_deadline() {
        let (signal, watch) = channel();
        let held = watch.clone();
        drop(watch);
        assert_eq!(
            signal.drain(Duration::from_secs(1)).await,
            Drained::DeadlineExceeded
        );
        assert!(held.is_draining());
    }
}
