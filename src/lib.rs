//! outrider: a service-mesh sidecar proxy.
pub mod ca;
pub mod identity;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod units;
