//! Accepting TCP connections: the one loop behind the proxy's listeners,
//! the admin server and the controller's webhook.
//!
//! Each accepted connection holds one of a fixed number of places
//! (permits) and, where a per-source cap is set, one of its source
//! address's share. Its owner may have it wait for its client's first
//! bytes in the [`WaitingRoom`] (no task, no buffer) and then be served on
//! [`Probation`] until it has shown who it is. When every place is taken,
//! a newcomer gets the place of the longest silent waiter, else of the
//! longest on probation past its grace, else it is closed at once: what
//! can be held without being identified can always be taken back. A
//! failing `accept` (out of file descriptors and the like) backs off
//! instead of spinning. The loop stops when `stop` resolves; connections
//! already accepted finish on their own terms.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use self::probation::Probation;
use self::waiting_room::{Waiter, WaitingRoom};

mod probation;
mod registered;
mod seats;
mod sources;
mod waiting_room;

pub use self::probation::{OnProbation, Place};
pub use self::sources::{SourceSlot, Sources};

/// How long to wait after `accept` fails before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a newcomer waits for the place of a connection told to give
/// it up (its task must run first); past it, the newcomer is closed.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

/// What the loop tells its owner: a connection it did not serve, or one
/// that lost its place.
#[derive(Debug)]
pub enum Notice {
    /// `accept` itself failed; the loop waits a moment and goes on.
    AcceptFailed(std::io::Error),
    /// Every permit was taken; the connection from this peer was closed.
    AtCapacity(SocketAddr),
    /// This peer's address already holds its share; closed.
    SourceAtCapacity(SocketAddr),
    /// The listener was full and this peer's connection, the longest
    /// waiting for its client's first bytes, was closed to make room.
    EvictedSilent(SocketAddr),
    /// The listener was full and the connection longest on probation was
    /// told to give its place to a newcomer (the connection itself hears
    /// of it through [`OnProbation::cut`]).
    EvictedOnProbation,
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

/// What becomes of a freshly accepted connection, decided before any task
/// exists for it.
pub enum Admission<C> {
    /// Closed at once (the caller has recorded why).
    Refuse,
    /// Served now with this context.
    Serve(C),
    /// Held in the [`WaitingRoom`] until its client's first bytes (or its
    /// end) arrive or `deadline` passes, then served. While it waits it
    /// has no task and no buffer, and when the listener is full it is the
    /// first to go (oldest first): a flood of silent connections cannot
    /// keep out a client that speaks.
    AwaitFirstBytes(C, Instant),
    /// As [`Admission::AwaitFirstBytes`], then served on [`Probation`]:
    /// until the server says the connection has shown who it is, its
    /// place may go to a newcomer when the listener is full.
    Probation(C, Instant),
}

/// A connection's share of the listener: its permit and, where capped,
/// its source's slot; given back when the connection ends.
type Share = (OwnedSemaphorePermit, Option<SourceSlot>);

/// What waits with a socket in the room: its peer, its context, its
/// share, and whether it is served on probation.
type Seated<C> = (SocketAddr, C, Share, bool);

/// Accepts on `listener` until `stop` resolves, serving each connection
/// with `serve` on a task of its own within `caps`. `notice` hears of
/// every connection that was not served.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    caps: Caps,
    stop: impl Future<Output = ()>,
    notice: impl FnMut(Notice),
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    accept_admitting(
        listener,
        caps,
        stop,
        notice,
        |_, _| Admission::Serve(()),
        move |stream, peer, (), _| serve(stream, peer),
    )
    .await;
}

/// [`accept_loop`] with a say, per connection and before any task exists
/// for it, in whether it is served now, after its first bytes, on
/// probation, or not at all (`admit`, given the socket and its peer).
/// `serve` gets the connection's probation where it asked for one.
pub async fn accept_admitting<A, C, S, F>(
    listener: TcpListener,
    caps: Caps,
    stop: impl Future<Output = ()>,
    mut notice: impl FnMut(Notice),
    mut admit: A,
    mut serve: S,
) where
    A: FnMut(&std::net::TcpStream, SocketAddr) -> Admission<C>,
    S: FnMut(TcpStream, SocketAddr, C, Option<OnProbation>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Accepting through mio rather than tokio leaves a new socket
    // unregistered with the runtime until it is served: a connection that
    // waits in the room costs the runtime nothing.
    let listener = match listener.into_std().and_then(registered::listener) {
        Ok(listener) => listener,
        Err(error) => {
            notice(Notice::AcceptFailed(error));
            return;
        }
    };
    let mut places = Places {
        caps,
        // A semaphore holds at most MAX_PERMITS; more would panic.
        limit: Arc::new(Semaphore::new(caps.total.clamp(1, Semaphore::MAX_PERMITS))),
        sources: Arc::new(Sources::default()),
        room: None,
        probation: Arc::new(Probation::default()),
    };
    tokio::pin!(stop);
    loop {
        let waiting = places.room.as_ref().is_some_and(|room| room.len() > 0);
        let event = tokio::select! {
            biased;
            () = &mut stop => break,
            left = async { places.room.as_mut()?.next().await.ok() }, if waiting => match left {
                Some((waiter, _)) => Woke::Left(waiter),
                None => continue,
            },
            accepted = accept(&listener) => Woke::Accepted(accepted),
        };
        let admitted = match event {
            Woke::Left(Waiter {
                stream,
                value: (peer, context, share, probation),
            }) => Some((stream, peer, context, share, probation)),
            Woke::Accepted(Ok((stream, peer))) => {
                places
                    .admit(
                        std::net::TcpStream::from(stream),
                        peer,
                        &mut admit,
                        &mut notice,
                    )
                    .await
            }
            Woke::Accepted(Err(error)) => {
                notice(Notice::AcceptFailed(error));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                None
            }
        };
        let Some((stream, peer, context, share, probation)) = admitted else {
            continue;
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                notice(Notice::AcceptFailed(error));
                continue;
            }
        };
        let (on_probation, held) = if probation {
            (Some(places.probation.admit(share)), None)
        } else {
            (None, Some(share))
        };
        // `map` keeps the share beside the future rather than in an async
        // block, which would hold the future twice.
        let task = serve(stream, peer, context, on_probation).map(move |()| drop(held));
        drop(tokio::spawn(task));
    }
}

/// A connection to serve now: socket, peer, context, share, probation.
type Admitted<C> = (std::net::TcpStream, SocketAddr, C, Share, bool);

/// A listener's places and who holds them.
struct Places<C> {
    caps: Caps,
    limit: Arc<Semaphore>,
    sources: Arc<Sources>,
    room: Option<WaitingRoom<Seated<C>>>,
    probation: Arc<Probation>,
}

impl<C> Places<C> {
    /// A place for a connection from `peer`: a free one, else one given up
    /// by the longest silent waiter (at once: it has no task), else by the
    /// longest on probation (once its task has let go, waited for up to
    /// [`EVICTION_WAIT`] while new connections queue in the kernel).
    async fn take(&mut self, peer: SocketAddr, notice: &mut impl FnMut(Notice)) -> Option<Share> {
        let slot = match self.caps.per_source {
            Some(cap) => match self.sources.take(peer.ip(), cap) {
                Some(slot) => Some(slot),
                None => {
                    notice(Notice::SourceAtCapacity(peer));
                    return None;
                }
            },
            None => None,
        };
        loop {
            if let Ok(permit) = self.limit.clone().try_acquire_owned() {
                return Some((permit, slot));
            }
            let Some(Waiter {
                value: (evicted, ..),
                ..
            }) = self.room.as_mut().and_then(WaitingRoom::evict_oldest)
            else {
                break;
            };
            notice(Notice::EvictedSilent(evicted));
        }
        if self.probation.evict_oldest() {
            notice(Notice::EvictedOnProbation);
            let freed =
                tokio::time::timeout(EVICTION_WAIT, self.limit.clone().acquire_owned()).await;
            if let Ok(Ok(permit)) = freed {
                return Some((permit, slot));
            }
        }
        notice(Notice::AtCapacity(peer));
        None
    }

    /// Gives a just-accepted connection a place and asks `admit` about
    /// it: returns it if it is to be served now; seats it in the room if it
    /// waits for its first bytes; closes it otherwise.
    async fn admit(
        &mut self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        admit: &mut impl FnMut(&std::net::TcpStream, SocketAddr) -> Admission<C>,
        notice: &mut impl FnMut(Notice),
    ) -> Option<Admitted<C>> {
        let share = self.take(peer, notice).await?;
        let (context, deadline, probation) = match admit(&stream, peer) {
            Admission::Refuse => return None,
            Admission::Serve(context) => return Some((stream, peer, context, share, false)),
            Admission::AwaitFirstBytes(context, deadline) => (context, deadline, false),
            Admission::Probation(context, deadline) => (context, deadline, true),
        };
        // Most clients have spoken by the time they are accepted: serve
        // those at once instead of seating them.
        match stream.peek(&mut [0u8; 1]) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            _ => return Some((stream, peer, context, share, probation)),
        }
        let room = match &mut self.room {
            Some(room) => room,
            None => match WaitingRoom::new() {
                Ok(new) => self.room.insert(new),
                Err(error) => {
                    notice(Notice::AcceptFailed(error));
                    return Some((stream, peer, context, share, probation));
                }
            },
        };
        match room.seat(stream, (peer, context, share, probation), deadline) {
            Ok(()) => None,
            // The poller would not take it: serve it the ordinary way.
            Err((error, Waiter { stream, value })) => {
                notice(Notice::AcceptFailed(error));
                let (peer, context, share, probation) = value;
                Some((stream, peer, context, share, probation))
            }
        }
    }
}

/// What woke the accept loop.
enum Woke<C> {
    Left(Waiter<Seated<C>>),
    Accepted(io::Result<(mio::net::TcpStream, SocketAddr)>),
}

/// The next connection on `listener`. Cancel-safe: a connection is only
/// taken from the kernel when it is returned.
async fn accept(
    listener: &AsyncFd<mio::net::TcpListener>,
) -> io::Result<(mio::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
            return accepted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// Serves a connection by holding it open until `release` says go.
    async fn held(stream: TcpStream, mut release: tokio::sync::watch::Receiver<bool>) {
        let _ = release.wait_for(|go| *go).await;
        drop(stream);
    }

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
                if let Notice::AtCapacity(_) = refused {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
            move |stream, _peer| held(stream, release_rx.clone()),
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
                if let Notice::SourceAtCapacity(_) = refused {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
            move |stream, _peer| held(stream, release_rx.clone()),
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

    /// Serves every connection after its client's first bytes (deadline
    /// `wait` from accept), reporting each served one on `served`.
    fn waiting_listener(
        listener: TcpListener,
        total: usize,
        wait: Duration,
        served: tokio::sync::mpsc::UnboundedSender<TcpStream>,
        refused: tokio::sync::mpsc::UnboundedSender<Notice>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(accept_admitting(
            listener,
            Caps::total(total),
            std::future::pending(),
            move |why| drop(refused.send(why)),
            move |_, _| Admission::AwaitFirstBytes((), Instant::now() + wait),
            move |stream, _peer, (), _probation| {
                let served = served.clone();
                async move {
                    let _ = served.send(stream);
                    // Hold the connection (and its share) until the test ends.
                    std::future::pending::<()>().await;
                }
            },
        ))
    }

    #[tokio::test]
    async fn a_silent_connection_is_served_only_once_its_client_speaks() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
        let (refused_tx, _refused) = tokio::sync::mpsc::unbounded_channel();
        waiting_listener(listener, 10, Duration::from_secs(30), served_tx, refused_tx);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), served.recv()).await;
        assert!(early.is_err(), "served before the client spoke");
        client.write_all(b"hello").await.unwrap();
        let mut stream = tokio::time::timeout(Duration::from_secs(5), served.recv())
            .await
            .expect("served after speaking")
            .unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello", "the waiting consumed nothing");
    }

    #[tokio::test]
    async fn a_silent_connection_is_served_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
        let (refused_tx, _refused) = tokio::sync::mpsc::unbounded_channel();
        waiting_listener(
            listener,
            10,
            Duration::from_millis(300),
            served_tx,
            refused_tx,
        );
        let started = std::time::Instant::now();
        let _client = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), served.recv())
            .await
            .expect("served at the deadline")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn when_full_the_longest_silent_connection_makes_room_for_a_new_one() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
        let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
        waiting_listener(listener, 2, Duration::from_secs(30), served_tx, refused_tx);
        let mut oldest = TcpStream::connect(addr).await.unwrap();
        let oldest_addr = oldest.local_addr().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Both wait; a third that speaks at once still gets in.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(b"x").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), served.recv())
            .await
            .expect("the third is served")
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), refused.recv()).await {
            Ok(Some(Notice::EvictedSilent(peer))) => assert_eq!(peer, oldest_addr),
            other => panic!("expected the oldest to be evicted: {other:?}"),
        }
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), oldest.read(&mut buf))
            .await
            .expect("the evicted connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let still = tokio::time::timeout(Duration::from_millis(200), second.read(&mut buf)).await;
        assert!(
            still.is_err(),
            "the younger silent connection was closed too"
        );
    }
}
