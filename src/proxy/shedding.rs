//! Shedding inbound connections that have not shown who they are yet when
//! the listener runs short of places.
//!
//! A connection still in protocol detection or the mTLS handshake costs a
//! place for up to the detection or handshake timeout. A neighbour that
//! opens such connections faster than those timeouts expire (each one
//! sending a byte, or half a ClientHello) could hold every place and keep
//! mesh peers out. When the accept loop reports that it is crowded, every
//! connection accepted more than [`GRACE`] ago and still unidentified is
//! cut: under pressure the detection and handshake timeouts shrink to
//! `GRACE` (as Envoy's overload manager shrinks timeouts), which a peer
//! proxy's handshake beats by orders of magnitude.

use tokio::sync::watch;
use tokio::time::{Duration, Instant};

/// How long an unidentified connection may take once the listener is
/// crowded.
pub const GRACE: Duration = Duration::from_millis(250);

/// Where crowding is announced and heard.
pub struct Shedder {
    /// Unidentified connections accepted before this instant are cut.
    cut_before: watch::Sender<Instant>,
}

impl Default for Shedder {
    fn default() -> Self {
        // Nothing accepted so far is older than now.
        Self {
            cut_before: watch::Sender::new(Instant::now()),
        }
    }
}

impl Shedder {
    /// The listener is crowded: cut what is older than [`GRACE`].
    pub fn crowded(&self) {
        let Some(cut) = Instant::now().checked_sub(GRACE) else {
            return;
        };
        self.cut_before.send_if_modified(|before| {
            let later = cut > *before;
            if later {
                *before = cut;
            }
            later
        });
    }

    /// Completes when a connection accepted at `accepted_at` is to be cut.
    pub async fn shed(&self, accepted_at: Instant) {
        let mut cut_before = self.cut_before.subscribe();
        loop {
            if *cut_before.borrow_and_update() > accepted_at {
                return;
            }
            if cut_before.changed().await.is_err() {
                // The listener is gone; so is its pressure.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn crowding_cuts_connections_older_than_the_grace_and_spares_younger_ones() {
        let shedder = Shedder::default();
        let old = Instant::now();
        tokio::time::advance(GRACE * 2).await;
        let young = Instant::now();
        shedder.crowded();
        let cut = tokio::time::timeout(Duration::from_millis(1), shedder.shed(old)).await;
        assert!(cut.is_ok(), "the old connection was not cut");
        let spared = tokio::time::timeout(Duration::from_millis(1), shedder.shed(young)).await;
        assert!(spared.is_err(), "the young connection was cut");
    }

    #[tokio::test(start_paused = true)]
    async fn without_crowding_nothing_is_cut() {
        let shedder = Shedder::default();
        let accepted = Instant::now();
        tokio::time::advance(Duration::from_secs(60)).await;
        let cut = tokio::time::timeout(Duration::from_secs(1), shedder.shed(accepted)).await;
        assert!(cut.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_waiting_to_be_cut_hears_of_crowding_that_comes_later() {
        let shedder = std::sync::Arc::new(Shedder::default());
        let accepted = Instant::now();
        let waiting = tokio::spawn({
            let shedder = shedder.clone();
            async move { shedder.shed(accepted).await }
        });
        tokio::time::advance(GRACE * 2).await;
        shedder.crowded();
        tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("cut once crowded")
            .unwrap();
    }
}
