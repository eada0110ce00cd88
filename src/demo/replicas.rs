//! The demo's balancing step: three replicas of the backend behind one
//! Service address, the controller's discovery service answering for it
//! from hand-written cluster objects (what the controller's watches would
//! hold), and a frontend sidecar that balances one keep-alive client's
//! requests over the replicas, each held to the backend's identity.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{issue, sidecar_config, spawn_slow_identity_app};
use crate::app::Sidecar;
use crate::ca::store::CaDir;
use crate::controller::discovery::index::Index;
use crate::controller::discovery::server;
use crate::identity::{Credentials, RawCredentials, SpiffeId, TrustDomain};
use crate::lifecycle::Drained;

/// The replicas' names; the last one answers 50 ms late.
pub const NAMES: [&str; 3] = ["replica-1", "replica-2", "replica-3"];
pub const SLOW: Duration = Duration::from_millis(50);
/// The Service's address: nothing listens there; discovery answers for it.
pub const SERVICE_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)), 80);

pub struct Replicas {
    pub frontend_outbound: SocketAddr,
    frontend: Sidecar,
    sidecars: Vec<Sidecar>,
    discovery: JoinHandle<()>,
}

impl Replicas {
    /// Starts the replicas (apps and sidecars, on 127.0.0.2-4 as if each
    /// were a pod), the discovery server and the frontend sidecar whose
    /// static route is the Service address.
    pub async fn start(
        workdir: &Path,
        ca: &CaDir,
        td: &TrustDomain,
        backend: (&Path, &SpiffeId),
        frontend: (&Path, &SpiffeId),
    ) -> Result<Self, String> {
        let mut sidecars = Vec::new();
        let mut endpoints = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let delay = if i + 1 == NAMES.len() {
                SLOW
            } else {
                Duration::ZERO
            };
            let app = spawn_slow_identity_app(name, delay)
                .await
                .map_err(|e| e.to_string())?;
            let pod_ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
            let config = sidecar_config(
                backend.0,
                backend.1,
                Some(app),
                None,
                None,
                &format!("{pod_ip}:0"),
            )
            .map_err(|e| e.to_string())?;
            let sidecar = Sidecar::start(&config).await.map_err(|e| e.to_string())?;
            let inbound = sidecar.inbound.ok_or("no inbound listener")?;
            endpoints.push((*name, inbound));
            sidecars.push(sidecar);
        }
        let (discovery_addr, discovery) = serve_discovery(workdir, ca, td, &endpoints).await?;
        let mut config = sidecar_config(frontend.0, frontend.1, None, None, None, "127.0.0.1:0")
            .map_err(|e| e.to_string())?;
        config.proxy.discovery = config_with_discovery(frontend.1, discovery_addr)?;
        if let Some(outbound) = config.proxy.outbound.as_mut() {
            outbound.target = crate::proxy::OutboundTarget::Peer {
                addr: SERVICE_ADDR,
                id: None,
            };
        }
        let frontend = Sidecar::start(&config).await.map_err(|e| e.to_string())?;
        let frontend_outbound = frontend.outbound.ok_or("no outbound listener")?;
        Ok(Self {
            frontend_outbound,
            frontend,
            sidecars,
            discovery,
        })
    }

    pub async fn shutdown(self) -> bool {
        self.discovery.abort();
        let mut clean = self.frontend.shutdown().await == Drained::Clean;
        for sidecar in self.sidecars {
            clean &= sidecar.shutdown().await == Drained::Clean;
        }
        clean
    }
}

fn config_with_discovery(
    id: &SpiffeId,
    addr: SocketAddr,
) -> Result<Option<crate::proxy::discover::DiscoveryConfig>, String> {
    let td = id.trust_domain_str();
    Ok(Some(crate::proxy::discover::DiscoveryConfig {
        address: addr.to_string(),
        authority: addr.to_string(),
        server_id: SpiffeId::parse(&format!(
            "spiffe://{td}/ns/outrider-system/sa/outrider-controller"
        ))
        .map_err(|e| e.to_string())?,
        first_answer_timeout: Duration::from_secs(1),
    }))
}

/// The controller's discovery service on loopback, answering from an index
/// that holds the Service `demo/backend` (`SERVICE_ADDR`), one
/// EndpointSlice per replica and the replicas' Pods (meshed, running as
/// `backend`).
async fn serve_discovery(
    workdir: &Path,
    ca: &CaDir,
    td: &TrustDomain,
    endpoints: &[(&str, SocketAddr)],
) -> Result<(SocketAddr, JoinHandle<()>), String> {
    let mut index = Index::new(td.clone());
    let service: Service = from_json(json!({
        "metadata": {"name": "backend", "namespace": "demo"},
        "spec": {"clusterIP": SERVICE_ADDR.ip().to_string(),
                 "clusterIPs": [SERVICE_ADDR.ip().to_string()],
                 "ports": [{"name": "http", "port": SERVICE_ADDR.port(), "targetPort": "http"}]}}))?;
    index.apply_service(&service);
    for (name, addr) in endpoints {
        let ip = addr.ip().to_string();
        let pod: Pod = from_json(json!({
            "metadata": {"name": name, "namespace": "demo",
                         "annotations": {crate::inject::config::INJECTED: env!("CARGO_PKG_VERSION")}},
            "spec": {"serviceAccountName": "backend", "containers": []},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}))?;
        index.apply_pod(&pod);
        let slice: EndpointSlice = from_json(json!({
            "metadata": {"name": format!("backend-{name}"), "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": addr.port()}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": name, "namespace": "demo"}}]}))?;
        index.apply_slice(&slice);
    }
    // The controller's own SVID, from the demo's CA.
    let id = SpiffeId::workload(td, "outrider-system", server::SERVICE_ACCOUNT)
        .map_err(|e| e.to_string())?;
    let dir = workdir.join("controller");
    issue(ca, &id, &dir, "").map_err(|e| e.to_string())?;
    let credentials = Credentials::from_raw(
        &RawCredentials::read_dir(&dir).map_err(|e| e.to_string())?,
        &id,
        rustls_pki_types::UnixTime::now(),
        Duration::from_secs(60),
    )
    .map_err(|e| e.to_string())?;
    let tls = server::server_tls(Arc::new(credentials), true).map_err(|e| e.to_string())?;
    server::serve_index(index, tls)
        .await
        .map_err(|e| e.to_string())
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}
