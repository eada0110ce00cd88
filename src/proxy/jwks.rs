//! Every issuer's keys, fetched by the proxy itself (not by the control
//! plane: a provider unreachable from the controller must not break the
//! mesh, and keys must not wait on a control-plane round trip).
//!
//! - Each `jwksUri` in force is fetched as soon as a policy names it, then
//!   every [`REFRESH`]; a failed fetch is retried after 1 s, doubling up
//!   to [`MAX_BACKOFF`].
//! - The last good keys stay in use for [`KEEP_LAST_GOOD`] while refreshes
//!   fail; then, as before any fetch succeeded, tokens of that issuer are
//!   answered 503 (`jwks-unavailable`): never fail open.
//! - A token naming a key id we do not have may cause one fetch of its
//!   issuer's keys (single-flight: concurrent requests share it), at most
//!   once per [`REFETCH_EVERY`], so forged key ids cannot make us hammer
//!   the provider.
//! - A request arriving before the first fetch finished waits for it.

pub mod fetch;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tokio::time::Instant;

pub use fetch::{FetchError, Fetcher};

use crate::policy::jwt::{JwtRule, KeySet, KeySource};

pub const REFRESH: Duration = Duration::from_secs(10 * 60);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
pub const KEEP_LAST_GOOD: Duration = Duration::from_secs(24 * 60 * 60);
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// Why an issuer's keys cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the issuer's keys have never been fetched")]
    NeverFetched,
    #[error("the issuer's keys are older than 24 h and cannot be refreshed")]
    Stale,
}

#[derive(Debug, Clone)]
pub struct JwksMetrics {
    fetches: IntCounterVec,
    last_success: GaugeVec,
}

impl JwksMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let fetches = IntCounterVec::new(
            Opts::new(
                "jwks_fetches_total",
                "JWKS fetches by issuer and result (ok, or why it failed).",
            ),
            &["issuer", "result"],
        )?;
        registry.register(Box::new(fetches.clone()))?;
        let last_success = GaugeVec::new(
            Opts::new(
                "jwks_last_success_timestamp_seconds",
                "When each issuer's keys in use were fetched (the key age is time() minus this).",
            ),
            &["issuer"],
        )?;
        registry.register(Box::new(last_success.clone()))?;
        Ok(Self {
            fetches,
            last_success,
        })
    }
}

/// What is known of one JWKS URL.
#[derive(Debug, Default, Clone)]
struct State {
    keys: Option<(Arc<KeySet>, Instant)>,
    last_attempt: Option<Instant>,
    /// Bumped when an attempt ends, success or not.
    attempts: u64,
}

/// One JWKS URL's keys and the task that keeps them fresh.
pub struct Issuer {
    url: Arc<str>,
    /// The issuer named in metrics (bounded: one per rule in force).
    issuer: Arc<str>,
    state: watch::Sender<State>,
    /// Held while fetching: one fetch at a time per URL.
    fetching: tokio::sync::Mutex<()>,
}

/// How the fetcher is made: only when a policy first names a URL, so
/// that a proxy without RequestAuthentications never loads the
/// platform's roots (about 0.3 MiB per proxy).
type MakeFetcher = Box<dyn Fn() -> Result<Fetcher, rustls::Error> + Send + Sync>;

/// The keys of every issuer in force.
pub struct KeyStore {
    issuers: Mutex<HashMap<Arc<str>, Arc<Issuer>>>,
    fetcher: OnceLock<Option<Fetcher>>,
    make_fetcher: MakeFetcher,
    metrics: JwksMetrics,
}

impl KeyStore {
    /// A store whose fetcher is made when first needed.
    pub fn new(make_fetcher: MakeFetcher, metrics: JwksMetrics) -> Arc<Self> {
        Arc::new(Self {
            issuers: Mutex::new(HashMap::new()),
            fetcher: OnceLock::new(),
            make_fetcher,
            metrics,
        })
    }

    /// A store with its fetcher made already (tests).
    pub fn with_fetcher(fetcher: Fetcher, metrics: JwksMetrics) -> Arc<Self> {
        let store = Self::new(
            Box::new(|| Err(rustls::Error::General("unused".into()))),
            metrics,
        );
        let _ = store.fetcher.set(Some(fetcher));
        store
    }

    fn fetcher(&self) -> Option<&Fetcher> {
        self.fetcher
            .get_or_init(|| match (self.make_fetcher)() {
                Ok(fetcher) => Some(fetcher),
                Err(error) => {
                    tracing::error!(%error, "Cannot set up TLS for fetching JWKS; issuers' keys stay unavailable");
                    None
                }
            })
            .as_ref()
    }

    /// Keeps exactly the URLs of `rules`: new ones are fetched now and
    /// refreshed from then on; the refresh of ones no longer named stops.
    pub fn sync(self: &Arc<Self>, rules: &[Arc<JwtRule>]) {
        let mut issuers = self.issuers.lock();
        let wanted: HashMap<Arc<str>, Arc<str>> = rules
            .iter()
            .filter_map(|r| match &r.keys {
                KeySource::Uri(url) => Some((url.clone(), r.issuer.clone())),
                KeySource::Inline(_) => None,
            })
            .collect();
        issuers.retain(|url, _| wanted.contains_key(url));
        for (url, issuer) in wanted {
            self.entry(&mut issuers, &url, &issuer);
        }
    }

    /// The URL's entry, made (and its refresh started) if there is none.
    fn entry(
        self: &Arc<Self>,
        issuers: &mut HashMap<Arc<str>, Arc<Issuer>>,
        url: &Arc<str>,
        issuer: &Arc<str>,
    ) -> Arc<Issuer> {
        if let Some(entry) = issuers.get(url) {
            return entry.clone();
        }
        let entry = Arc::new(Issuer {
            url: url.clone(),
            issuer: issuer.clone(),
            state: watch::channel(State::default()).0,
            fetching: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(refresh(Arc::downgrade(&entry), Arc::downgrade(self)));
        issuers.insert(url.clone(), entry.clone());
        entry
    }

    fn issuer(&self, url: &str) -> Option<Arc<Issuer>> {
        self.issuers.lock().get(url).cloned()
    }

    /// The keys a rule verifies with, waiting for a first fetch still
    /// under way. A rule the store has not heard of yet (a request that
    /// saw a new policy before `sync` did) gets its entry now.
    pub async fn keys(self: &Arc<Self>, rule: &JwtRule) -> Result<Arc<KeySet>, Unavailable> {
        let url = match &rule.keys {
            KeySource::Inline(keys) => return Ok(keys.clone()),
            KeySource::Uri(url) => url,
        };
        let issuer = {
            let mut issuers = self.issuers.lock();
            self.entry(&mut issuers, url, &rule.issuer)
        };
        let mut state = issuer.state.subscribe();
        if state.borrow().attempts == 0 {
            // Bounded by the fetch's own deadline.
            let _ = state.wait_for(|s| s.attempts > 0).await;
        }
        let current = state.borrow().clone();
        usable(&current)
    }

    /// Fetches a rule's keys again because a token named a key id they
    /// lack, unless that was done less than [`REFETCH_EVERY`] ago; waits
    /// for a fetch already under way instead of starting another. The
    /// keys in use afterwards, if they changed.
    pub async fn refetch(&self, rule: &JwtRule, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let KeySource::Uri(url) = &rule.keys else {
            return None;
        };
        let issuer = self.issuer(url)?;
        let _turn = issuer.fetching.lock().await;
        let current = issuer.state.borrow().clone();
        if let Ok(keys) = usable(&current)
            && !Arc::ptr_eq(&keys, seen)
        {
            // Someone fetched while we waited.
            return Some(keys);
        }
        if current
            .last_attempt
            .is_some_and(|at| at.elapsed() < REFETCH_EVERY)
        {
            return None;
        }
        self.fetch_now(&issuer).await;
        let after = issuer.state.borrow().clone();
        usable(&after).ok().filter(|keys| !Arc::ptr_eq(keys, seen))
    }

    /// One fetch; the caller holds `issuer.fetching`. True on success.
    async fn fetch_now(&self, issuer: &Issuer) -> bool {
        let result = match self.fetcher() {
            None => Err(("tls_setup", "no TLS client for fetching JWKS".to_string())),
            Some(fetcher) => fetcher
                .fetch(&issuer.url)
                .await
                .map_err(|e| (fetch_label(&e), e.to_string()))
                .and_then(|body| KeySet::parse(&body).map_err(|e| ("not_jwks", e.to_string()))),
        };
        let ok = result.is_ok();
        let label = match &result {
            Ok(_) => "ok",
            Err((label, _)) => label,
        };
        self.metrics
            .fetches
            .with_label_values(&[&issuer.issuer, label])
            .inc();
        match result {
            Ok(keys) => {
                tracing::debug!(issuer = %issuer.issuer, url = %issuer.url, keys = keys.len(), skipped = keys.skipped, "Fetched JWKS");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.metrics
                    .last_success
                    .with_label_values(&[&issuer.issuer])
                    .set(now);
                issuer.state.send_modify(|s| {
                    s.keys = Some((Arc::new(keys), Instant::now()));
                    s.last_attempt = Some(Instant::now());
                    s.attempts += 1;
                });
            }
            Err((_, error)) => {
                tracing::warn!(issuer = %issuer.issuer, url = %issuer.url, %error, "Cannot fetch JWKS; keeping the last good keys");
                issuer.state.send_modify(|s| {
                    s.last_attempt = Some(Instant::now());
                    s.attempts += 1;
                });
            }
        }
        ok
    }
}

fn usable(state: &State) -> Result<Arc<KeySet>, Unavailable> {
    match &state.keys {
        None => Err(Unavailable::NeverFetched),
        Some((_, fetched)) if fetched.elapsed() > KEEP_LAST_GOOD => Err(Unavailable::Stale),
        Some((keys, _)) => Ok(keys.clone()),
    }
}

fn fetch_label(error: &FetchError) -> &'static str {
    match error {
        FetchError::NotHttps(_) => "not_https",
        FetchError::Resolve { .. } => "resolve",
        FetchError::Connect { .. } => "connect",
        FetchError::Tls { .. } => "tls",
        FetchError::Http(_) => "http",
        FetchError::Status(_) => "status",
        FetchError::TooManyRedirects => "redirects",
        FetchError::TooLarge => "too_large",
        FetchError::Timeout(_) => "timeout",
    }
}

/// Keeps one URL's keys fresh until the store lets go of it.
async fn refresh(issuer: Weak<Issuer>, store: Weak<KeyStore>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let (Some(entry), Some(keys)) = (issuer.upgrade(), store.upgrade()) else {
            return;
        };
        let ok = {
            let _turn = entry.fetching.lock().await;
            keys.fetch_now(&entry).await
        };
        drop((entry, keys));
        let wait = if ok {
            backoff = Duration::from_secs(1);
            REFRESH
        } else {
            let wait = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            wait
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests;
