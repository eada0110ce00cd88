//! Shared test fixtures, compiled only for tests and the `test-util`
//! feature: certificate authorities that can also mint deliberately broken
//! certificates, identity directories, bounded polling, golden files.
//!
//! Fixtures panic on setup failure, like the tests that use them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod apps;
pub mod certs;
pub mod fake_apiserver;
pub mod golden;
pub mod jwks_server;
pub mod tls;

/// An ALLOW policy without a namespace, letting `shop/orders` call every
/// workload of the namespace it is read into: the policy source tests'
/// common document.
pub const ALLOW_ORDERS: &str = r#"
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-orders}
spec:
  action: ALLOW
  rules: [{from: [{principals: ["spiffe://cluster.local/ns/shop/sa/orders"]}]}]
"#;

use std::time::Duration;

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Secret's `data` (JSON, as the API returns it), base64-decoded.
pub fn secret_data(secret: &serde_json::Value) -> std::collections::BTreeMap<String, Vec<u8>> {
    use base64::Engine as _;
    secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .unwrap();
            (k.clone(), bytes)
        })
        .collect()
}
