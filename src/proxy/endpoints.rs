//! Where the outbound data path sends a connection's traffic: straight to
//! one upstream, or to the endpoints discovery gave for the destination,
//! one picked per request (HTTP) or per connection (opaque TCP) by the
//! [`Balancer`].
//!
//! An [`Endpoints`] follows discovery's answers for one original
//! destination and applies each to its balancer the next time it picks,
//! so churn costs nothing until traffic flows. Upstreams that left the set
//! get no new requests; their pooled connections are retired and close
//! once their last request is done. Each endpoint carries what discovery
//! says about its proxy ([`PeerKnown`]): that exact identity, or none.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::balance::{Balancer, Outcome};
use super::connect::{PeerKnown, Upstream};
use super::discover::{Answer, Endpoint, EndpointSet, Resolver};
use super::metrics::Metrics;
use super::pool::Pool;

/// Destinations with balancer state kept at once; past it, those discovery
/// no longer follows are dropped first.
const MAX_DESTINATIONS: usize = 4096;

/// What a connection to the outbound listener is sent to.
#[derive(Clone)]
pub enum Target {
    /// One upstream: static routes, inbound, and destinations discovery
    /// does not know (or could not answer for).
    Fixed(Upstream),
    /// A destination discovery answered with endpoints.
    Balanced(Arc<Endpoints>),
}

impl Target {
    /// The address the client dialled (or the static route's).
    pub fn original(&self) -> SocketAddr {
        match self {
            Self::Fixed(upstream) => upstream.addr,
            Self::Balanced(endpoints) => endpoints.original,
        }
    }
}

/// What a pick found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    Endpoint(Upstream),
    /// Discovery no longer knows the destination: the original address.
    Original,
    /// The Service has no endpoint (none ready, none terminating).
    NoEndpoints,
}

impl Pick {
    /// The upstream to use, given the original destination.
    pub fn upstream(self, original: SocketAddr) -> Option<Upstream> {
        match self {
            Self::Endpoint(upstream) => Some(upstream),
            Self::Original => Some(Upstream::unvouched(original)),
            Self::NoEndpoints => None,
        }
    }
}

/// The upstream an endpoint stands for: discovery's word on its proxy.
pub fn upstream_of(endpoint: &Endpoint) -> Upstream {
    Upstream {
        addr: endpoint.addr,
        peer: match &endpoint.identity {
            Some(id) => PeerKnown::Mesh(Arc::new(id.clone())),
            None => PeerKnown::NoProxy,
        },
    }
}

/// Whether connections to this set are relayed as bytes rather than read
/// as HTTP: the Service's hint or any endpoint's (a server-speaks-first
/// protocol must never wait for the client).
pub fn is_opaque(set: &EndpointSet) -> bool {
    set.opaque || set.endpoints.iter().any(|e| e.opaque)
}

/// One discovered destination and its balancer.
pub struct Endpoints {
    original: SocketAddr,
    resolver: Resolver,
    pool: Arc<Pool>,
    metrics: Metrics,
    state: Mutex<State>,
}

struct State {
    answers: watch::Receiver<Option<Answer>>,
    current: Current,
    balancer: Balancer<Upstream>,
    /// `outbound_service_requests_total` of the current set's Service.
    requests: Option<prometheus::IntCounter>,
}

#[derive(Clone)]
enum Current {
    Set(Arc<EndpointSet>),
    Unknown,
}

impl Endpoints {
    /// The answer discovery gave for `original` (endpoints), followed from
    /// `answers` from now on.
    fn new(
        original: SocketAddr,
        set: Arc<EndpointSet>,
        answers: watch::Receiver<Option<Answer>>,
        resolver: Resolver,
        pool: Arc<Pool>,
        metrics: Metrics,
    ) -> Self {
        let mut balancer = Balancer::new(fastrand::u64(..));
        balancer.set_endpoints(set.endpoints.iter().map(upstream_of), Instant::now());
        metrics.balancer_endpoints_changed(balancer.len() as i64);
        let requests = set.service.as_deref().map(|s| metrics.service_requests(s));
        Self {
            original,
            resolver,
            pool,
            metrics,
            state: Mutex::new(State {
                answers,
                current: Current::Set(set),
                balancer,
                requests,
            }),
        }
    }

    pub fn original(&self) -> SocketAddr {
        self.original
    }

    /// Whether the current set's traffic is opaque.
    fn is_opaque(&self) -> bool {
        match &self.state.lock().current {
            Current::Set(set) => is_opaque(set),
            Current::Unknown => false,
        }
    }

    /// The upstream for the next request or connection, counted as in
    /// flight until the returned guard is finished or dropped. `avoid` is
    /// skipped when another endpoint exists (a retry goes elsewhere).
    pub fn pick(self: &Arc<Self>, avoid: Option<&Upstream>) -> (Pick, Option<InFlight>) {
        self.pick_counted(avoid, false)
    }

    /// [`Self::pick`] for an HTTP request, counted by Service.
    pub fn pick_request(self: &Arc<Self>) -> (Pick, Option<InFlight>) {
        self.pick_counted(None, true)
    }

    fn pick_counted(
        self: &Arc<Self>,
        avoid: Option<&Upstream>,
        request: bool,
    ) -> (Pick, Option<InFlight>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        self.catch_up(&mut state, now);
        if let Current::Unknown = state.current {
            return (Pick::Original, None);
        }
        if request && let Some(counter) = &state.requests {
            counter.inc();
        }
        match state.balancer.pick(now, avoid) {
            Some(upstream) => (
                Pick::Endpoint(upstream.clone()),
                Some(InFlight {
                    endpoints: self.clone(),
                    upstream,
                    started: now,
                    finished: false,
                }),
            ),
            None => (Pick::NoEndpoints, None),
        }
    }

    /// Applies discovery's latest answer, if it changed.
    fn catch_up(&self, state: &mut State, now: Instant) {
        match state.answers.has_changed() {
            Ok(false) => return,
            Ok(true) => {}
            // The resolver forgot the destination (unused for a while by
            // new connections): follow it again, keeping the last set
            // until the fresh stream answers.
            Err(_) => {
                state.answers = self.resolver.follow(self.original);
                if !matches!(state.answers.has_changed(), Ok(true)) {
                    return;
                }
            }
        }
        let answer = state.answers.borrow_and_update().clone();
        let next = match answer {
            Some(Answer::Endpoints(set)) => Current::Set(set),
            Some(Answer::Unknown) => Current::Unknown,
            Some(Answer::Unavailable) | None => return,
        };
        let before: Vec<Upstream> = match &state.current {
            Current::Set(set) => set.endpoints.iter().map(upstream_of).collect(),
            Current::Unknown => Vec::new(),
        };
        let after: Vec<Upstream> = match &next {
            Current::Set(set) => set.endpoints.iter().map(upstream_of).collect(),
            Current::Unknown => Vec::new(),
        };
        for gone in before.iter().filter(|u| !after.contains(u)) {
            self.pool.retire(gone);
        }
        let len_before = state.balancer.len() as i64;
        state.balancer.set_endpoints(after, now);
        self.metrics
            .balancer_endpoints_changed(state.balancer.len() as i64 - len_before);
        state.requests = match &next {
            Current::Set(set) => set
                .service
                .as_deref()
                .map(|s| self.metrics.service_requests(s)),
            Current::Unknown => None,
        };
        state.current = next;
    }

    fn finish(&self, upstream: &Upstream, outcome: Outcome) {
        let now = Instant::now();
        let paused = self.state.lock().balancer.finish(upstream, outcome, now);
        if paused {
            self.metrics.endpoint_paused();
            tracing::info!(original = %self.original, endpoint = %upstream.addr, "Endpoint keeps failing; skipped for a while");
        }
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        let len = self.state.get_mut().balancer.len() as i64;
        self.metrics.balancer_endpoints_changed(-len);
    }
}

/// A request or connection picked from [`Endpoints`]; tells the balancer
/// how it ended (abandoned, if dropped unfinished).
pub struct InFlight {
    endpoints: Arc<Endpoints>,
    upstream: Upstream,
    started: Instant,
    finished: bool,
}

impl InFlight {
    /// A response arrived (whatever its status); `new_connection`: on a
    /// connection the request opened, whose time is no latency sample.
    pub fn answered(mut self, new_connection: bool) {
        self.finished = true;
        let outcome = if new_connection {
            Outcome::AnsweredOnNewConnection
        } else {
            Outcome::Answered(self.started.elapsed().max(Duration::from_micros(1)))
        };
        self.endpoints.finish(&self.upstream, outcome);
    }

    /// An opaque connection was established: the endpoint works, and the
    /// connection keeps counting on it until dropped.
    pub fn connected(&self) {
        let now = Instant::now();
        let rtt = now
            .duration_since(self.started)
            .max(Duration::from_micros(1));
        self.endpoints
            .state
            .lock()
            .balancer
            .succeeded(&self.upstream, rtt, now);
    }

    /// No connection, or no response.
    pub fn failed(mut self) {
        self.finished = true;
        self.endpoints.finish(&self.upstream, Outcome::Failed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.endpoints.finish(&self.upstream, Outcome::Abandoned);
        }
    }
}

/// Balancer state per original destination, shared by every connection
/// to it.
pub struct Destinations {
    resolver: Resolver,
    pool: Arc<Pool>,
    metrics: Metrics,
    known: Mutex<HashMap<SocketAddr, Arc<Endpoints>>>,
}

impl Destinations {
    pub fn new(resolver: Resolver, pool: Arc<Pool>, metrics: Metrics) -> Self {
        Self {
            resolver,
            pool,
            metrics,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Whether discovery's answer at hand for `dst` calls its traffic
    /// opaque.
    pub fn known_opaque(&self, dst: SocketAddr) -> bool {
        matches!(self.resolver.known(dst), Some(Answer::Endpoints(set)) if is_opaque(&set))
    }

    /// Asks discovery about `dst` (waiting a bounded time for a new one)
    /// and returns the target for a connection to it, and whether
    /// discovery calls its traffic opaque.
    pub async fn resolve(&self, dst: SocketAddr) -> (Target, bool) {
        let answer = self.resolver.resolve(dst).await;
        self.metrics.discovery_answer(&answer);
        let set = match answer {
            Answer::Endpoints(set) => set,
            Answer::Unknown => return (Target::Fixed(Upstream::unvouched(dst)), false),
            // No answer in time, but one was given before (the resolver
            // forgot the destination while idle, and the controller is
            // away now): its endpoints and identities, never the weaker
            // original-destination check.
            Answer::Unavailable => {
                return match self.known.lock().get(&dst) {
                    Some(endpoints) => {
                        let opaque = endpoints.is_opaque();
                        (Target::Balanced(endpoints.clone()), opaque)
                    }
                    None => (Target::Fixed(Upstream::unvouched(dst)), false),
                };
            }
        };
        let opaque = is_opaque(&set);
        let mut known = self.known.lock();
        if let Some(endpoints) = known.get(&dst) {
            return (Target::Balanced(endpoints.clone()), opaque);
        }
        if known.len() >= MAX_DESTINATIONS {
            known.retain(|_, e| e.state.lock().answers.has_changed().is_ok());
            if known.len() >= MAX_DESTINATIONS {
                known.clear();
            }
        }
        let endpoints = Arc::new(Endpoints::new(
            dst,
            set,
            self.resolver.follow(dst),
            self.resolver.clone(),
            self.pool.clone(),
            self.metrics.clone(),
        ));
        known.insert(dst, endpoints.clone());
        (Target::Balanced(endpoints), opaque)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;
    use crate::proxy::connect::AppConnector;
    use crate::proxy::discover::DiscoveryConfig;

    fn set() -> Arc<EndpointSet> {
        Arc::new(EndpointSet {
            service: Some("shop/web".into()),
            opaque: false,
            endpoints: vec![Endpoint {
                addr: "10.0.0.1:8080".parse().unwrap(),
                identity: Some(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()),
                opaque: false,
                terminating: false,
            }],
        })
    }

    #[tokio::test]
    async fn a_destination_answered_before_keeps_its_identities_when_discovery_cannot_answer() {
        // A controller nobody listens for: every new question times out.
        let resolver = Resolver::new(
            DiscoveryConfig {
                address: "127.0.0.1:1".into(),
                authority: "discovery".into(),
                server_id: SpiffeId::parse("spiffe://cluster.local/ns/outrider-system/sa/c")
                    .unwrap(),
                first_answer_timeout: Duration::from_millis(50),
            },
            watch::channel(None).1,
        );
        let pool = Pool::new(
            Arc::new(AppConnector {
                connect_timeout: Duration::from_millis(50),
            }),
            Duration::from_secs(1),
            1,
        );
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let destinations = Destinations::new(resolver.clone(), pool.clone(), metrics.clone());
        let dst: SocketAddr = "10.96.0.10:80".parse().unwrap();
        // Never answered: the original destination.
        let (target, _) = destinations.resolve(dst).await;
        assert!(matches!(target, Target::Fixed(_)));
        // Answered once (the resolver has since forgotten it): the last
        // endpoints, each with its identity.
        let answered = Arc::new(Endpoints::new(
            dst,
            set(),
            watch::channel(None).1,
            resolver,
            pool,
            metrics,
        ));
        destinations.known.lock().insert(dst, answered);
        let (target, _) = destinations.resolve(dst).await;
        let Target::Balanced(endpoints) = target else {
            panic!("fell back to the original destination");
        };
        let (pick, _) = endpoints.pick(None);
        assert!(
            matches!(
                pick,
                Pick::Endpoint(Upstream {
                    peer: PeerKnown::Mesh(_),
                    ..
                })
            ),
            "{pick:?}"
        );
    }
}
