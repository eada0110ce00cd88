//! outrider: a service-mesh sidecar proxy.
pub mod admin;
pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crypto;
pub mod demo;
pub mod identity;
pub mod init;
pub mod inject;
pub mod lifecycle;
pub mod policy;
pub mod proxy;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod units;
