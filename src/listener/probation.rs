//! Probation: connections being served that have not yet shown who they
//! are (protocol detection, the mTLS handshake), whose places in the
//! listener can be taken back for a newcomer.
//!
//! At accept a connection cannot be told apart from any other: a mesh
//! peer and a neighbour that sends half a ClientHello and stalls look the
//! same until the handshake ends. What tells them apart is time: a peer
//! proxy identifies itself within milliseconds, a stalling client holds
//! its place until a timeout. So while a connection is on probation its
//! place (its permit) is kept here rather than by its task, and when the
//! listener is full the longest on probation is told to stop, handed its
//! place back to give up when its task has let go of everything (so the
//! place bounds memory, not just sockets), and the newcomer takes it. A
//! connection that passes takes its place for good.
//!
//! Eviction is strictly oldest first, without a fixed grace: each
//! connection gets as long as it takes the listener to receive as many
//! newcomers as there are places on probation. Under a flood of 3,000
//! connections a second with 768 such places that is a quarter of a
//! second, a hundred times what a peer proxy's handshake takes; a fixed
//! grace would instead let a fast enough flood hold every place.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Share;
use super::seats::Seats;

/// A place on probation: the share, and how to hand it back to its
/// holder with the word that it must go.
struct Entry {
    share: Share,
    cut: oneshot::Sender<Place>,
}

/// The connections of one listener on probation, oldest first.
#[derive(Default)]
pub struct Probation(Mutex<Seats<Entry>>);

impl Probation {
    /// Puts a connection on probation with its share of the listener.
    pub fn admit(self: &Arc<Self>, share: Share) -> OnProbation {
        let (cut, cut_rx) = oneshot::channel();
        let (key, ticket) = self.0.lock().seat(Entry { share, cut }, Instant::now());
        OnProbation {
            probation: self.clone(),
            key,
            ticket,
            cut: cut_rx,
        }
    }

    /// Tells the longest on probation to go; its place comes free when
    /// its task ends. Whether there was anyone to tell.
    pub fn evict_oldest(&self) -> bool {
        let Some((_, entry)) = self.0.lock().pop_oldest() else {
            return false;
        };
        // If the task is already gone the place simply comes free here.
        drop(entry.cut.send(Place(entry.share)));
        true
    }
}

/// A connection's side of probation.
pub struct OnProbation {
    probation: Arc<Probation>,
    key: usize,
    ticket: u64,
    cut: oneshot::Receiver<Place>,
}

/// A place in the listener, given back when dropped.
pub struct Place(#[allow(dead_code)] Share);

impl OnProbation {
    /// Completes if the listener wants this connection's place for
    /// another: with the place, to be dropped once everything the
    /// connection held is.
    pub async fn cut(&mut self) -> Place {
        match (&mut self.cut).await {
            Ok(place) => place,
            // The listener is gone without taking the place back.
            Err(_) => std::future::pending().await,
        }
    }

    /// The connection has shown who it is: it keeps its place for as
    /// long as it lives. `None` if the place was taken meanwhile.
    pub fn pass(self) -> Option<Place> {
        let entry = self
            .probation
            .0
            .lock()
            .take_ticketed(self.key, self.ticket)?;
        Some(Place(entry.share))
    }
}

impl Drop for OnProbation {
    fn drop(&mut self) {
        // Ending on probation (failed, refused, closed) gives the place
        // back; after `pass` or eviction there is nothing left to take.
        drop(self.probation.0.lock().take_ticketed(self.key, self.ticket));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    fn share(permits: &Arc<Semaphore>) -> Share {
        (permits.clone().try_acquire_owned().unwrap(), None)
    }

    #[tokio::test]
    async fn the_longest_on_probation_is_told_to_go_and_its_place_frees_when_it_lets_go() {
        let permits = Arc::new(Semaphore::new(2));
        let probation = Arc::new(Probation::default());
        let mut old = probation.admit(share(&permits));
        let mut young = probation.admit(share(&permits));
        assert!(probation.evict_oldest());
        // Not free yet: the old connection still holds its socket.
        assert_eq!(permits.available_permits(), 0);
        let place = tokio::time::timeout(Duration::from_millis(100), old.cut())
            .await
            .expect("the old one is told");
        assert!(old.pass().is_none());
        let still = tokio::time::timeout(Duration::from_millis(10), young.cut()).await;
        assert!(still.is_err(), "the young one was told too");
        drop(place);
        assert_eq!(permits.available_permits(), 1);
        drop(young);
        assert_eq!(permits.available_permits(), 2);
    }

    #[test]
    fn a_connection_that_passes_keeps_its_place_out_of_reach() {
        let permits = Arc::new(Semaphore::new(1));
        let probation = Arc::new(Probation::default());
        let on = probation.admit(share(&permits));
        let place = on.pass().expect("passed");
        assert!(!probation.evict_oldest());
        assert_eq!(permits.available_permits(), 0);
        drop(place);
        assert_eq!(permits.available_permits(), 1);
    }

    #[test]
    fn ending_on_probation_gives_the_place_back() {
        let permits = Arc::new(Semaphore::new(1));
        let probation = Arc::new(Probation::default());
        drop(probation.admit(share(&permits)));
        assert_eq!(permits.available_permits(), 1);
        assert!(!probation.evict_oldest());
    }
}
