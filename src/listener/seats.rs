//! Seats: values held in arrival order, each with a time that never goes
//! backwards (a deadline from the same timeout, or the arrival itself),
//! so the oldest is always at the front of the queue and can be timed out
//! or evicted first. Pure bookkeeping, shared by the waiting room and
//! probation.

use std::collections::VecDeque;

use slab::Slab;
use tokio::time::Instant;

/// One waiting connection's entry: the value and its place in the
/// deadline queue (a slab key is reused, the ticket is not).
struct Seat<T> {
    ticket: u64,
    value: T,
}

/// Who is waiting, in arrival order with their deadlines.
pub struct Seats<T> {
    seats: Slab<Seat<T>>,
    /// (deadline, slab key, ticket), in arrival order; entries whose seat
    /// has been taken since are skipped when they reach the front.
    queue: VecDeque<(Instant, usize, u64)>,
    next_ticket: u64,
}

impl<T> Default for Seats<T> {
    fn default() -> Self {
        Self {
            seats: Slab::new(),
            queue: VecDeque::new(),
            next_ticket: 0,
        }
    }
}

impl<T> Seats<T> {
    pub fn len(&self) -> usize {
        self.seats.len()
    }

    /// Seats `value` with a time (a deadline, or when it arrived) that
    /// must not go backwards; returns its key and ticket.
    pub fn seat(&mut self, value: T, at: Instant) -> (usize, u64) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let key = self.seats.insert(Seat { ticket, value });
        self.queue.push_back((at, key, ticket));
        (key, ticket)
    }

    /// Takes the value seated under `key`, if it is still there.
    pub fn take(&mut self, key: usize) -> Option<T> {
        self.seats.try_remove(key).map(|seat| seat.value)
    }

    /// Takes the value seated under `key` if it is the one that got
    /// `ticket` (the key may have been given to someone else since).
    pub fn take_ticketed(&mut self, key: usize, ticket: u64) -> Option<T> {
        match self.seats.get(key) {
            Some(seat) if seat.ticket == ticket => self.take(key),
            _ => None,
        }
    }

    /// Drops queue entries whose seat is gone, so the front is live.
    fn skip_departed(&mut self) {
        while let Some(&(_, key, ticket)) = self.queue.front() {
            if self
                .seats
                .get(key)
                .is_some_and(|seat| seat.ticket == ticket)
            {
                break;
            }
            self.queue.pop_front();
        }
        // The queue holds one entry per seat ever taken since it was last
        // empty; when everyone has left, start afresh rather than keep a
        // long-gone burst's capacity.
        if self.seats.is_empty() && self.queue.capacity() > 64 {
            self.queue = VecDeque::new();
        }
    }

    /// The earliest time of anyone still seated.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.skip_departed();
        self.queue.front().map(|&(deadline, _, _)| deadline)
    }

    /// The oldest one whose time is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(usize, T)> {
        match self.next_deadline() {
            Some(deadline) if deadline <= now => self.pop_oldest(),
            _ => None,
        }
    }

    /// The oldest one, whatever its time.
    pub fn pop_oldest(&mut self) -> Option<(usize, T)> {
        self.skip_departed();
        let (_, key, _) = self.queue.pop_front()?;
        self.take(key).map(|value| (key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn waiters_leave_in_arrival_order_when_their_deadlines_pass() {
        let start = Instant::now();
        let mut seats = Seats::default();
        seats.seat("first", at(start, 10));
        seats.seat("second", at(start, 20));
        assert_eq!(seats.pop_expired(at(start, 5)), None);
        assert_eq!(
            seats.pop_expired(at(start, 15)).map(|(_, v)| v),
            Some("first")
        );
        assert_eq!(seats.pop_expired(at(start, 15)), None);
        assert_eq!(
            seats.pop_expired(at(start, 20)).map(|(_, v)| v),
            Some("second")
        );
        assert_eq!(seats.len(), 0);
    }

    #[test]
    fn a_waiter_that_left_early_is_not_timed_out_or_evicted_later() {
        let start = Instant::now();
        let mut seats = Seats::default();
        let (early, _) = seats.seat("spoke", at(start, 10));
        seats.seat("silent", at(start, 20));
        assert_eq!(seats.take(early), Some("spoke"));
        assert_eq!(seats.next_deadline(), Some(at(start, 20)));
        assert_eq!(seats.pop_oldest().map(|(_, v)| v), Some("silent"));
        assert_eq!(seats.pop_oldest(), None);
    }

    #[test]
    fn a_reused_key_keeps_its_new_deadline_not_the_old_one() {
        let start = Instant::now();
        let mut seats = Seats::default();
        let (key, old_ticket) = seats.seat("old", at(start, 10));
        seats.take(key);
        // The slab hands the same key to the next arrival.
        let (again, _) = seats.seat("new", at(start, 50));
        assert_eq!(again, key);
        assert_eq!(
            seats.take_ticketed(key, old_ticket),
            None,
            "the old holder took the new one"
        );
        assert_eq!(seats.pop_expired(at(start, 20)), None);
        assert_eq!(seats.next_deadline(), Some(at(start, 50)));
    }

    #[test]
    fn eviction_takes_the_longest_waiter() {
        let start = Instant::now();
        let mut seats = Seats::default();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            seats.seat(name, at(start, 10 * i as u64));
        }
        assert_eq!(seats.pop_oldest().map(|(_, v)| v), Some("a"));
        assert_eq!(seats.len(), 2);
    }

    #[test]
    fn the_queue_does_not_keep_a_burst_once_everyone_left() {
        let start = Instant::now();
        let mut seats = Seats::default();
        let keys: Vec<_> = (0..1000).map(|i| seats.seat(i, at(start, i)).0).collect();
        for key in keys {
            seats.take(key);
        }
        assert_eq!(seats.next_deadline(), None);
        assert!(seats.queue.capacity() <= 64);
    }
}
