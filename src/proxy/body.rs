//! Request bodies on their way upstream, watched and bounded: when
//! forwarding fails, was it the client's own body that broke (malformed
//! chunked encoding, a reset mid-body)? Then the client gets 400, not the
//! 502 an upstream failure earns. A body past the inbound limit
//! (`limits.max_request_body`) fails as it streams past, without being
//! buffered: the upstream request is reset (the application never sees a
//! truncated body as a complete one) and the client gets 413.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A downstream request body, forwarded frame by frame.
pub struct RequestBody {
    inner: Incoming,
    fault: Arc<AtomicU8>,
    /// Bytes still allowed; `None`: unbounded.
    remaining: Option<u64>,
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client's body broke: {0}")]
    Client(#[from] hyper::Error),
    #[error("the body is over the limit")]
    TooLarge,
}

const CLIENT_FAILED: u8 = 1;
const TOO_LARGE: u8 = 2;

/// How a [`RequestBody`] failed, if it did on the client's side.
#[derive(Clone, Default)]
pub struct BodyFault(Arc<AtomicU8>);

impl BodyFault {
    pub fn client_body_failed(&self) -> bool {
        self.0.load(Ordering::Relaxed) == CLIENT_FAILED
    }

    pub fn too_large(&self) -> bool {
        self.0.load(Ordering::Relaxed) == TOO_LARGE
    }
}

impl RequestBody {
    /// `limit`: the most bytes the body may carry.
    pub fn new(inner: Incoming, limit: Option<u64>) -> (Self, BodyFault) {
        let fault = BodyFault::default();
        (
            Self {
                inner,
                fault: fault.0.clone(),
                remaining: limit,
            },
            fault,
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                this.fault.store(CLIENT_FAILED, Ordering::Relaxed);
                return Poll::Ready(Some(Err(BodyError::Client(error))));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
            let len = data.len() as u64;
            if len > *remaining {
                this.fault.store(TOO_LARGE, Ordering::Relaxed);
                return Poll::Ready(Some(Err(BodyError::TooLarge)));
            }
            *remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
