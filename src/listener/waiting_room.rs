//! The waiting room: accepted connections whose clients have not spoken
//! yet, held without a task, a buffer or a timer of their own.
//!
//! A connection that says nothing costs what the kernel keeps for it plus
//! one entry here (the socket, who it is from, the caller's context): no
//! tokio task, no registration with the runtime's reactor, no timer. The
//! room watches all of them through one epoll instance of its own and one
//! timer for the earliest deadline, and hands a connection on when its
//! first bytes (or its end) arrive, or when its deadline passes. Deadlines
//! are handed out in accept order, so the queue of deadlines stays sorted
//! and the oldest waiter is always at its front; that waiter is also the
//! one given up when the listener needs room (see
//! [`WaitingRoom::evict_oldest`]).
//!
//! [`Seats`] is the bookkeeping (pure, tested without sockets); the room
//! adds the sockets and the poller.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

/// Events read from the room's poller per system call.
const EVENTS_PER_POLL: usize = 256;

/// Why a connection left the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Its client sent bytes, or closed.
    Spoke,
    /// Its deadline passed first.
    TimedOut,
}

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

    /// Seats `value` until `deadline`; returns its key. Deadlines must not
    /// go backwards (the room gives each the same timeout from now).
    pub fn seat(&mut self, value: T, deadline: Instant) -> usize {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let key = self.seats.insert(Seat { ticket, value });
        self.queue.push_back((deadline, key, ticket));
        key
    }

    /// Takes the value seated under `key`, if it is still there.
    pub fn take(&mut self, key: usize) -> Option<T> {
        self.seats.try_remove(key).map(|seat| seat.value)
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

    /// The earliest deadline of anyone still waiting.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.skip_departed();
        self.queue.front().map(|&(deadline, _, _)| deadline)
    }

    /// The oldest waiter whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(usize, T)> {
        match self.next_deadline() {
            Some(deadline) if deadline <= now => self.pop_oldest(),
            _ => None,
        }
    }

    /// The oldest waiter, whatever its deadline.
    pub fn pop_oldest(&mut self) -> Option<(usize, T)> {
        self.skip_departed();
        let (_, key, _) = self.queue.pop_front()?;
        self.take(key).map(|value| (key, value))
    }
}

/// A socket waiting for its client's first bytes, and what came with it.
pub struct Waiter<T> {
    pub stream: std::net::TcpStream,
    pub value: T,
}

/// Connections waiting for their clients to speak; see the module doc.
pub struct WaitingRoom<T> {
    poll: AsyncFd<Poll>,
    events: Events,
    seats: Seats<Waiter<T>>,
    /// Keys reported ready by the poller and not yet handed on.
    ready: VecDeque<usize>,
    timer: Pin<Box<Sleep>>,
}

impl<T> WaitingRoom<T> {
    /// Must be called inside a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            poll: super::registered::poller()?,
            events: Events::with_capacity(EVENTS_PER_POLL),
            seats: Seats::default(),
            ready: VecDeque::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }

    pub fn len(&self) -> usize {
        self.seats.len()
    }

    /// Seats `stream` until its client speaks or `deadline`. On error (the
    /// poller refused it) the stream is handed back.
    pub fn seat(
        &mut self,
        stream: std::net::TcpStream,
        value: T,
        deadline: Instant,
    ) -> Result<(), (io::Error, Waiter<T>)> {
        let fd = stream.as_raw_fd();
        let key = self.seats.seat(Waiter { stream, value }, deadline);
        let registered = self.poll.get_ref().registry().register(
            &mut SourceFd(&fd),
            Token(key),
            Interest::READABLE,
        );
        match registered {
            Ok(()) => Ok(()),
            Err(error) => match self.seats.take(key) {
                Some(waiter) => Err((error, waiter)),
                None => Ok(()),
            },
        }
    }

    /// Takes the longest waiter out (to make room for a new connection).
    pub fn evict_oldest(&mut self) -> Option<Waiter<T>> {
        let (_, waiter) = self.seats.pop_oldest()?;
        self.forget(&waiter);
        Some(waiter)
    }

    /// The next connection to leave: one whose client spoke, or whose
    /// deadline passed. Cancel-safe: nothing is taken out of the room
    /// until it is returned.
    pub async fn next(&mut self) -> io::Result<(Waiter<T>, Departure)> {
        loop {
            while let Some(key) = self.ready.pop_front() {
                if let Some(waiter) = self.seats.take(key) {
                    self.forget(&waiter);
                    return Ok((waiter, Departure::Spoke));
                }
            }
            if let Some((_, waiter)) = self.seats.pop_expired(Instant::now()) {
                self.forget(&waiter);
                return Ok((waiter, Departure::TimedOut));
            }
            let next_deadline = self.seats.next_deadline();
            if let Some(deadline) = next_deadline
                && self.timer.deadline() != deadline
            {
                self.timer.as_mut().reset(deadline);
            }
            let (poll, events, ready, timer) = (
                &mut self.poll,
                &mut self.events,
                &mut self.ready,
                &mut self.timer,
            );
            let expiry = async {
                match next_deadline {
                    Some(_) => timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                readable = poll.readable_mut() => {
                    let mut guard = readable?;
                    events.clear();
                    guard.get_inner_mut().poll(events, Some(Duration::ZERO))?;
                    if events.is_empty() {
                        // Everything reported has been read: wait for the
                        // poller's next edge.
                        guard.clear_ready();
                    }
                    ready.extend(events.iter().map(|event| event.token().0));
                }
                () = expiry => {}
            }
        }
    }

    /// Stops watching a socket that has left the room.
    fn forget(&self, waiter: &Waiter<T>) {
        // Closing the socket would drop it from the poller too, but it is
        // handed on open; a failure here leaves at most a stale entry that
        // reports a key no longer seated.
        let fd = waiter.stream.as_raw_fd();
        let _ = self
            .poll
            .get_ref()
            .registry()
            .deregister(&mut SourceFd(&fd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let early = seats.seat("spoke", at(start, 10));
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
        let key = seats.seat("old", at(start, 10));
        seats.take(key);
        // The slab hands the same key to the next arrival.
        assert_eq!(seats.seat("new", at(start, 50)), key);
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
        let keys: Vec<_> = (0..1000).map(|i| seats.seat(i, at(start, i))).collect();
        for key in keys {
            seats.take(key);
        }
        assert_eq!(seats.next_deadline(), None);
        assert!(seats.queue.capacity() <= 64);
    }
}
