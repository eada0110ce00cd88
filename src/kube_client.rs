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
