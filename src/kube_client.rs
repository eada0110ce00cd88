//! The Kubernetes client every kube-rs user here starts from: the
//! controller, and the proxy's direct policy source.
//!
//! One place decides how a kubeconfig is found, so the two cannot drift.

use std::path::Path;

use kube::Client;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(String),
}

/// A client from an explicit kubeconfig, or inferred the usual way
/// (`KUBECONFIG`, `~/.kube/config`, in-cluster service account). Its
/// requests carry the User-Agent `outrider-<component>/<version>`, so the
/// API server's audit log and metrics name who sent them.
pub async fn client(kubeconfig: Option<&Path>, component: &str) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |reason: String| Error::Kubeconfig {
                path: path.display().to_string(),
                reason,
            };
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Client(e.to_string()))?,
    };
    let mut config = config;
    let agent = format!("outrider-{component}/{}", env!("CARGO_PKG_VERSION"));
    let agent = http::HeaderValue::from_str(&agent).map_err(|e| Error::Client(e.to_string()))?;
    config.headers.push((http::header::USER_AGENT, agent));
    Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}

/// The backoff of every watch here: 1 s, doubling to 60 s, and back to
/// 1 s only after two minutes without a failure. kube-rs's default
/// backoff starts over on every successful event, and a watcher emits
/// one (`Init`) before each list, so a list that keeps failing (an API
/// the server does not serve, a forbidden resource) was retried every
/// ~1.25 s: 48 requests a minute per watch, measured on a real
/// kube-apiserver.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: std::time::Duration,
    last: Option<tokio::time::Instant>,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
    const MAX: std::time::Duration = std::time::Duration::from_secs(60);
    const QUIET: std::time::Duration = std::time::Duration::from_secs(120);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            last: None,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|last| now - last > Self::QUIET) {
            self.next = Self::FIRST;
        }
        self.last = Some(now);
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    /// Ignored: only a quiet period starts the delays over (see above).
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::utils::Backoff as _;

    use super::WatchBackoff;

    #[tokio::test(start_paused = true)]
    async fn watch_backoff_doubles_to_a_minute_ignores_resets_and_restarts_after_quiet() {
        let mut backoff = WatchBackoff::default();
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(backoff.next().unwrap().as_secs());
            // What the stream does after the watcher's Init event.
            backoff.reset();
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        tokio::time::advance(Duration::from_secs(121)).await;
        assert_eq!(backoff.next(), Some(Duration::from_secs(1)));
    }
}
