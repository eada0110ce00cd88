//! Keeps the workload's credentials current by watching the identity
//! directory.
//!
//! Watches the *directory*, never the files: kubelet (and `outrider ca
//! issue`) publish a new generation by swapping the `..data` symlink, which
//! replaces every file's inode at once and would kill a per-file watch
//! (the class of bug where Istio's watcher died after the first rotation).
//! Events are debounced, the new set is validated as a whole, and only then
//! published on a `watch` channel; a bad set is counted and logged, and the
//! last good credentials keep serving. A slow poll backs up the watcher, so
//! a lost inotify event or a recreated directory still converges.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rustls_pki_types::UnixTime;
use tokio::sync::{Notify, watch};

use super::{Credentials, LoadError, RawCredentials, SpiffeId};

/// How the reloader finds and judges credentials.
#[derive(Debug, Clone)]
pub struct ReloadConfig {
    pub dir: PathBuf,
    pub expected_id: SpiffeId,
    pub clock_skew: Duration,
    /// Quiet time after the last filesystem event before reloading; one
    /// kubelet swap produces a burst of events.
    pub debounce: Duration,
    /// Safety-net re-read interval, independent of inotify.
    pub poll_interval: Duration,
}

/// Metrics about the identity in use.
#[derive(Clone, Debug)]
pub struct Metrics {
    expiry: IntGauge,
    reloads_ok: IntCounter,
    reload_failures: IntCounterVec,
    bundle_roots: IntGauge,
}

/// The current credentials, `None` until the first valid set is loaded.
pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;

/// Identity files still missing after this many poll intervals are not a
/// kubelet swap in progress: counted (`reason="missing"`) and logged.
const MISSING_POLLS: u32 = 3;

/// Loads, validates and republishes credentials when the directory changes.
pub struct Reloader {
    config: ReloadConfig,
    metrics: Metrics,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    /// Contents of the last set we judged, good or bad, so an unchanged
    /// directory is neither re-validated nor re-counted.
    last_seen: Option<RawCredentials>,
    last_failed: bool,
    /// Since when the files have been unreadable as missing.
    missing_since: Option<Instant>,
}

// === impl Metrics ===

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let expiry = IntGauge::new(
            "identity_cert_expiration_timestamp_seconds",
            "Unix time at which the workload certificate in use expires.",
        )?;
        let reloads_ok = IntCounter::new(
            "identity_reloads_total",
            "Credential sets loaded and put in use (including the first).",
        )?;
        let reload_failures = IntCounterVec::new(
            Opts::new(
                "identity_reload_failures_total",
                "Credential sets rejected; the previous set keeps serving.",
            ),
            &["reason"],
        )?;
        let bundle_roots = IntGauge::new(
            "identity_trust_bundle_roots",
            "Number of trust anchors in the bundle in use.",
        )?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(reloads_ok.clone()))?;
        registry.register(Box::new(reload_failures.clone()))?;
        registry.register(Box::new(bundle_roots.clone()))?;
        Ok(Self {
            expiry,
            reloads_ok,
            reload_failures,
            bundle_roots,
        })
    }
}

// === impl Reloader ===

impl Reloader {
    /// Makes the first load attempt at once, so a proxy started with valid
    /// credentials is ready immediately.
    pub fn new(config: ReloadConfig, metrics: Metrics) -> (Self, CredentialsRx) {
        let (tx, rx) = watch::channel(None);
        let mut this = Self {
            config,
            metrics,
            tx,
            last_seen: None,
            last_failed: false,
            missing_since: None,
        };
        this.reload();
        (this, rx)
    }

    /// Watches until `shutdown` fires.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let changed = Arc::new(Notify::new());
        let watcher = self.start_watcher(changed.clone());
        if watcher.is_none() {
            tracing::warn!(
                dir = %self.config.dir.display(),
                poll = ?self.config.poll_interval,
                "Cannot watch identity directory; relying on polling"
            );
        }
        tokio::pin!(shutdown);
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = changed.notified() => {
                    // Let the burst of events from one swap settle.
                    loop {
                        tokio::select! {
                            _ = changed.notified() => continue,
                            _ = tokio::time::sleep(self.config.debounce) => break,
                        }
                    }
                    self.reload();
                }
                _ = poll.tick() => self.reload(),
            }
        }
        drop(watcher);
    }

    fn start_watcher(&self, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    changed.notify_one();
                }
            })
            .ok()?;
        watcher
            .watch(&self.config.dir, RecursiveMode::NonRecursive)
            .ok()?;
        Some(watcher)
    }

    /// Reads the directory and, if its contents changed (or the last
    /// attempt failed and time may have fixed it), validates and publishes.
    fn reload(&mut self) {
        let raw = match RawCredentials::read_dir(&self.config.dir) {
            Ok(raw) => raw,
            Err(error) => {
                // A missing file mid-swap or before the first mount is
                // normal; only count it if we have nothing else, or if it
                // stays gone for several polls (the Secret was deleted, or
                // the volume unmounted): then say so once, loudly, while
                // the last good credentials run towards their expiry.
                let since = *self.missing_since.get_or_insert_with(Instant::now);
                let gone_for_good = since.elapsed() >= self.config.poll_interval * MISSING_POLLS;
                if (self.tx.borrow().is_none() || gone_for_good) && !self.last_failed {
                    self.fail(&error);
                }
                return;
            }
        };
        if self.missing_since.take().is_some() && self.last_failed {
            tracing::info!(dir = %self.config.dir.display(), "Identity files are back");
        }
        let unchanged = self.last_seen.as_ref() == Some(&raw);
        if unchanged && !self.last_failed {
            return;
        }
        let result = Credentials::from_raw(
            &raw,
            &self.config.expected_id,
            UnixTime::now(),
            self.config.clock_skew,
        );
        self.last_seen = Some(raw);
        match result {
            Ok(credentials) => {
                self.last_failed = false;
                self.metrics.reloads_ok.inc();
                self.metrics.expiry.set(credentials.leaf.not_after);
                self.metrics
                    .bundle_roots
                    .set(credentials.bundle.len() as i64);
                tracing::info!(
                    id = %credentials.leaf.id,
                    serial = %credentials.leaf.serial,
                    not_after = credentials.leaf.not_after,
                    roots = credentials.bundle.len(),
                    "Identity loaded"
                );
                self.tx.send_replace(Some(Arc::new(credentials)));
            }
            // Counted once per distinct bad set; retried quietly on the
            // poll in case it was only not yet valid.
            Err(error) if unchanged => {
                tracing::debug!(%error, "Identity still invalid");
            }
            Err(error) => self.fail(&error),
        }
    }

    fn fail(&mut self, error: &LoadError) {
        self.last_failed = true;
        self.metrics
            .reload_failures
            .with_label_values(&[error.reason()])
            .inc();
        let serving = self.tx.borrow().as_ref().map(|c| c.leaf.serial.clone());
        tracing::warn!(
            dir = %self.config.dir.display(),
            %error,
            serving = serving.as_deref().unwrap_or("nothing"),
            "Rejected identity update; keeping the last good credentials"
        );
    }
}
