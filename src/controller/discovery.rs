//! Discovery, the controller's side: which endpoints (and whose
//! identities) stand behind a Service or a pod address. [`index`] is the
//! pure part: cluster objects in, endpoint sets out.

pub mod index;
pub mod policies;
pub mod registry;
pub mod server;
pub mod watch;
