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
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

use super::seats::Seats;

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
        let (key, _) = self.seats.seat(Waiter { stream, value }, deadline);
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
