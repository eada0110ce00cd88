//! Request bodies on their way upstream, watched: when forwarding fails,
//! was it the client's own body that broke (malformed chunked encoding, a
//! reset mid-body)? Then the client gets 400, not the 502 an upstream
//! failure earns.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A downstream request body, forwarded frame by frame.
pub struct RequestBody {
    inner: Incoming,
    fault: Arc<AtomicBool>,
}

/// Whether a [`RequestBody`] failed on the client's side.
#[derive(Clone, Default)]
pub struct BodyFault(Arc<AtomicBool>);

impl BodyFault {
    pub fn client_body_failed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl RequestBody {
    pub fn new(inner: Incoming) -> (Self, BodyFault) {
        let fault = BodyFault::default();
        (
            Self {
                inner,
                fault: fault.0.clone(),
            },
            fault,
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &poll {
            this.fault.store(true, Ordering::Relaxed);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
