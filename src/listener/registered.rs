//! Descriptors this crate owns, registered with tokio's reactor: the only
//! `unsafe` in the crate besides `memory::allocator` (`tests/architecture.rs`
//! holds it to those two).
//!
//! `AsyncFd::register` is unsafe because the reactor cannot check that the
//! descriptor stays open and unchanged while registered. Each function
//! below hands it a value that owns its descriptor outright and is moved
//! into the `AsyncFd`, which deregisters before dropping it: nothing else
//! can close or replace the descriptor in between.
#![allow(unsafe_code)]

use std::io;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A new epoll instance of our own, awaited through the runtime.
pub fn poller() -> io::Result<AsyncFd<mio::Poll>> {
    let poll = mio::Poll::new()?;
    // SAFETY: `poll` owns its epoll descriptor and closes it only when
    // dropped, which the `AsyncFd` does after deregistering it.
    unsafe { AsyncFd::register_with_interest(poll, Interest::READABLE) }.map_err(io::Error::from)
}

/// A bound listening socket, accepted from without registering what it
/// accepts.
pub fn listener(listener: std::net::TcpListener) -> io::Result<AsyncFd<mio::net::TcpListener>> {
    let listener = mio::net::TcpListener::from_std(listener);
    // SAFETY: as above; the mio listener owns its socket.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(io::Error::from)
}
