//! Wires one sidecar together: identity reloader → TLS material → proxy
//! listeners → admin server, and shuts it down in order.
//!
//! Used by `outrider proxy` and, several times over, by `outrider demo`.
//! Everything is bound in [`Sidecar::start`], so callers can use port 0
//! and read the addresses before traffic flows.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{IntCounter, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, Admin};
use crate::config::{Config, PolicyConfig, PolicySource};
use crate::identity::reload::{self, CredentialsRx, Reloader};
use crate::lifecycle::{self, Drained};
use crate::memory;
use crate::policy::publish::{self, PolicyRx, Publisher};
use crate::policy::source::{self, files::FileSource};
use crate::proxy::discover::{Resolver, ResolverMetrics};
use crate::proxy::{self, Proxy};
use crate::tls::MeshTls;

/// Metric names all start with this.
pub const METRICS_PREFIX: &str = "outrider";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
    #[error("admin server: {0}")]
    Admin(#[from] admin::Error),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("policy source: {0}")]
    KubeClient(#[from] crate::kube_client::Error),
    #[error("policy source: discovery is not configured")]
    NoDiscovery,
}

/// Starts the policy source the config names and returns the compiled
/// policy's channel and the tasks that keep it current.
async fn start_policy(
    config: &PolicyConfig,
    resolver: Option<&Resolver>,
    registry: &Registry,
) -> Result<(PolicyRx, Vec<JoinHandle<()>>), StartError> {
    let metrics = publish::Metrics::new(registry)?;
    let (workload, settings) = (config.workload.clone(), config.settings.clone());
    if let PolicySource::None = config.source {
        return Ok((
            Publisher::without_source(workload, settings, metrics),
            Vec::new(),
        ));
    }
    let (publisher, rx) = Publisher::new(
        workload.clone(),
        settings,
        config.labels_file.is_some(),
        metrics.clone(),
    );
    let (tx, updates) = mpsc::channel(16);
    let mut tasks = vec![tokio::spawn(publisher.run(updates))];
    match &config.source {
        PolicySource::None => {}
        PolicySource::Files(dir) => {
            let files = FileSource::new(
                dir.clone(),
                workload.namespace.clone(),
                config.reload_debounce,
                config.poll_interval,
                metrics,
            );
            tasks.push(tokio::spawn(files.run(tx.clone())));
        }
        PolicySource::Kubernetes { kubeconfig } => {
            let client = crate::kube_client::client(kubeconfig.as_deref(), "proxy").await?;
            tasks.push(tokio::spawn(source::kube::run(
                client,
                workload.namespace.clone(),
                metrics,
                tx.clone(),
            )));
        }
        PolicySource::Discovery { pod } => {
            let resolver = resolver.ok_or(StartError::NoDiscovery)?;
            tasks.push(tokio::spawn(crate::proxy::discover::policies::run(
                resolver.clone(),
                workload.namespace.clone(),
                pod.clone(),
                metrics,
                tx.clone(),
            )));
        }
    }
    if let Some(path) = &config.labels_file {
        tasks.push(tokio::spawn(source::labels::watch(
            path.clone(),
            config.poll_interval,
            tx,
        )));
    }
    Ok((rx, tasks))
}

/// A running sidecar.
pub struct Sidecar {
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub credentials: CredentialsRx,
    /// The policy in force for inbound traffic.
    pub policy: PolicyRx,
    policy_tasks: Vec<JoinHandle<()>>,
    grace: std::time::Duration,
    draining: Arc<AtomicBool>,
    drain: lifecycle::Signal,
    stop_background: watch::Sender<bool>,
    proxy_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    /// Notified by `POST /shutdown` on the admin port.
    shutdown_requested: Arc<tokio::sync::Notify>,
}

impl Sidecar {
    /// Binds every listener and starts serving.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let registry = Registry::new_custom(Some(METRICS_PREFIX.into()), None)?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels carry the version."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;

        let (stop_background, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };

        let memory_returned = IntCounter::with_opts(Opts::new(
            "memory_returned_bytes_total",
            "Free memory given back to the system after bursts of connections (malloc_trim).",
        ))?;
        registry.register(Box::new(memory_returned.clone()))?;
        tokio::spawn(memory::give_back_after_bursts(memory_returned, stopped()));

        let (reloader, credentials) =
            Reloader::new(config.identity.clone(), reload::Metrics::new(&registry)?);
        tokio::spawn(reloader.run(stopped()));
        let tls = spawn_tls_builder(credentials.clone(), config.tls.clone(), stopped());

        // One connection to the controller for destinations and policies.
        let resolver = match config.proxy.discovery.clone() {
            Some(d) => Some(Resolver::with_metrics(
                d,
                tls.clone(),
                ResolverMetrics::new(&registry)?,
            )),
            None => None,
        };
        let (policy, policy_tasks) =
            start_policy(&config.policy, resolver.as_ref(), &registry).await?;
        let metrics = proxy::Metrics::new(&registry)?;
        let proxy = Proxy::bind(
            &config.proxy,
            tls.clone(),
            policy.clone(),
            resolver,
            metrics,
        )
        .await?;
        let (inbound, outbound) = (proxy.inbound_addr(), proxy.outbound_addr());

        let draining = Arc::new(AtomicBool::new(false));
        let ready = {
            let draining = draining.clone();
            let tls = tls.clone();
            let policy = policy.clone();
            Arc::new(move || {
                !draining.load(Ordering::Relaxed)
                    && tls.borrow().is_some()
                    && policy.borrow().synced
            })
        };
        let shutdown_requested = Arc::new(tokio::sync::Notify::new());
        let admin = Admin::bind(config.admin_listen, registry, ready)
            .await?
            .with_shutdown(shutdown_requested.clone());
        let admin_addr = admin.local_addr()?;

        let (drain, watch) = lifecycle::channel();
        let proxy_task = tokio::spawn(proxy.run(watch));
        let admin_task = tokio::spawn(admin.run());
        let show =
            |a: Option<SocketAddr>| a.map_or_else(|| "disabled".to_string(), |a| a.to_string());
        tracing::info!(
            inbound = %show(inbound),
            outbound = %show(outbound),
            admin = %admin_addr,
            id = %config.identity.expected_id,
            "Listeners bound"
        );
        Ok(Self {
            inbound,
            outbound,
            admin: admin_addr,
            credentials,
            policy,
            policy_tasks,
            grace: config.shutdown_grace_period,
            draining,
            drain,
            stop_background,
            proxy_task,
            admin_task,
            shutdown_requested,
        })
    }

    /// Serves until `shutdown` resolves, then drains: listeners stop
    /// accepting, `/ready` turns 503, in-flight requests and connections
    /// get up to the grace period to finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Drained {
        tokio::select! {
            _ = shutdown => {}
            // POST /shutdown from inside the pod (classic-sidecar Jobs).
            _ = self.shutdown_requested.notified() => {}
        }
        self.shutdown().await
    }

    pub async fn shutdown(self) -> Drained {
        tracing::info!(grace = ?self.grace, "Draining");
        self.draining.store(true, Ordering::Relaxed);
        let drained = self.drain.drain(self.grace).await;
        let _ = self.proxy_task.await;
        let _ = self.stop_background.send(true);
        self.admin_task.abort();
        for task in self.policy_tasks {
            task.abort();
        }
        match drained {
            Drained::Clean => tracing::info!("Drained"),
            Drained::DeadlineExceeded => {
                tracing::warn!("Grace period ended with connections still open")
            }
        }
        drained
    }
}

/// Rebuilds the TLS configs whenever the credentials change, so each new
/// handshake uses the newest identity and bundle while established
/// connections keep theirs.
fn spawn_tls_builder(
    mut credentials: CredentialsRx,
    settings: crate::tls::TlsSettings,
    stop: impl Future<Output = ()> + Send + 'static,
) -> proxy::TlsRx {
    let build = move |creds: &Option<Arc<crate::identity::Credentials>>| {
        creds.as_ref().and_then(|c| match MeshTls::new(c.clone(), &settings) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(error) => {
                tracing::error!(%error, "Cannot build TLS configuration; keeping the previous one");
                None
            }
        })
    };
    let initial = build(&credentials.borrow_and_update());
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                changed = credentials.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let next = build(&credentials.borrow_and_update());
                    if next.is_some() {
                        tx.send_replace(next);
                    }
                }
                _ = &mut stop => break,
            }
        }
    });
    rx
}
