//! How a send through the pool fails: the error, and the request itself
//! when none of it was written (so the caller may send it elsewhere).

use std::sync::Arc;

use http::Request;

use super::super::body::RequestBody;
use super::super::connect::ConnectError;
use super::super::outcome::ConnError;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The failure of a connect that several requests waited on.
    #[error(transparent)]
    Shared(Arc<ForwardError>),
}

impl ForwardError {
    pub fn reason(&self) -> ConnError {
        match self.root() {
            Self::Connect(e) => e.reason(),
            Self::Http(_) | Self::Shared(_) => ConnError::UpstreamHttpError,
        }
    }

    /// The error itself, whether it was this request's or a shared one.
    pub fn root(&self) -> &ForwardError {
        match self {
            Self::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

/// A request that got no response, and the request itself when none of
/// it was written (so it can go elsewhere).
pub struct SendFailed {
    pub error: ForwardError,
    pub unsent: Option<Request<RequestBody>>,
}

impl SendFailed {
    pub(super) fn unsent(error: impl Into<ForwardError>, req: Request<RequestBody>) -> Self {
        Self {
            error: error.into(),
            unsent: Some(req),
        }
    }

    /// From hyper's failed send, which hands the request back when it was
    /// never written.
    pub(super) fn from_try_send(
        mut error: hyper::client::conn::TrySendError<Request<RequestBody>>,
    ) -> Self {
        let unsent = error.take_message();
        Self {
            error: error.into_error().into(),
            unsent,
        }
    }
}
