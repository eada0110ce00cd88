//! The data plane's Prometheus metrics, registered into a registry the
//! caller owns.
//!
//! Label values come from closed sets (direction, TLS status and its
//! reason, failure reasons, status codes) plus peer SPIFFE IDs, which are
//! bounded by the number of service accounts that talk to this workload.
//! Never addresses, paths or hosts.

use std::time::Duration;

use parking_lot::Mutex;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::detect::Version;
use super::io::ByteCounters;
use super::outcome::{AuthzKind, ConnError, ConnOutcome, HandshakeFailure};
use super::tls_status::TlsStatus;
use crate::tls::KxGroup;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Every data-plane metric family.
#[derive(Debug, Clone)]
pub struct Metrics {
    http_requests: IntCounterVec,
    http_responses: IntCounterVec,
    http_latency: HistogramVec,
    tcp_open: IntCounterVec,
    tcp_close: IntCounterVec,
    tcp_open_connections: IntGaugeVec,
    tcp_read_bytes: IntCounterVec,
    tcp_write_bytes: IntCounterVec,
    tls_handshakes: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    detect_timeouts: IntCounterVec,
    protocols: IntCounterVec,
    connection_errors: IntCounterVec,
    plaintext_fallbacks: IntCounter,
    authz_decisions: IntCounterVec,
    authz_terminated: IntCounterVec,
    authz_http_rules_on_opaque: IntCounterVec,
    discovery_answers: IntCounterVec,
    balancer_endpoints: IntGauge,
    endpoint_pauses: IntCounter,
    retries: IntCounter,
    service_requests: IntCounterVec,
    pub authn_outcomes: IntCounterVec,
    pub rate_limited: IntCounterVec,
    body_too_large: IntCounter,
    pub jwks: super::jwks::JwksMetrics,
}

/// Handles for one connection, resolved once when its TLS status is known.
/// Counts the close (with the result set last) when dropped.
#[derive(Debug)]
pub struct ConnMetrics {
    metrics: Metrics,
    labels: [String; 4],
    result: ConnOutcome,
}

const TCP_LABELS: &[&str] = &["direction", "tls", "no_tls_reason", "peer_id"];

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "http_response_latency_seconds",
                "Time from receiving a request to sending the response headers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["direction", "peer_id"],
        )?;
        registry.register(Box::new(http_latency.clone()))?;
        let tcp_open_connections = IntGaugeVec::new(
            Opts::new(
                "tcp_open_connections",
                "Connections currently accepted and not yet closed.",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(tcp_open_connections.clone()))?;
        let plaintext_fallbacks = IntCounter::new(
            "outbound_plaintext_fallbacks_total",
            "Outbound connections sent in plaintext because the destination has no proxy (permissive mode).",
        )?;
        registry.register(Box::new(plaintext_fallbacks.clone()))?;
        let balancer_endpoints = IntGauge::new(
            "outbound_balancer_endpoints",
            "Endpoints in the balancers of discovered destinations (summed over destinations).",
        )?;
        registry.register(Box::new(balancer_endpoints.clone()))?;
        let endpoint_pauses = IntCounter::new(
            "outbound_endpoint_pauses_total",
            "Times an endpoint that kept failing was set aside by its balancer.",
        )?;
        registry.register(Box::new(endpoint_pauses.clone()))?;
        let retries = IntCounter::new(
            "outbound_retries_total",
            "Requests and connections sent to another endpoint after failing before any byte reached a server.",
        )?;
        registry.register(Box::new(retries.clone()))?;
        Ok(Self {
            authn_outcomes: counter(
                "request_authn_total",
                "Inbound requests by request-authentication outcome (verified, anonymous, refused) and reason.",
                &["outcome", "reason"],
            )?,
            jwks: super::jwks::JwksMetrics::new(registry)?,
            rate_limited: counter(
                "rate_limited_total",
                "Inbound requests over a LocalRateLimitPolicy limit, by policy and mode (enforce: refused with 429; dry-run: only counted).",
                &["policy", "mode"],
            )?,
            body_too_large: {
                let c = IntCounter::new(
                    "http_request_body_too_large_total",
                    "Inbound requests refused with 413: a body over limits.max_request_body.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            http_requests: counter(
                "http_requests_total",
                "HTTP requests received, by direction and TLS status of the connection.",
                &["direction", "tls", "peer_id"],
            )?,
            http_responses: counter(
                "http_responses_total",
                "HTTP responses sent, by status code.",
                &["direction", "tls", "peer_id", "status_code"],
            )?,
            http_latency,
            tcp_open: counter(
                "tcp_open_total",
                "Connections opened (counted once TLS status is known).",
                TCP_LABELS,
            )?,
            tcp_close: counter(
                "tcp_close_total",
                "Connections closed, by how they ended.",
                &["direction", "tls", "no_tls_reason", "peer_id", "result"],
            )?,
            tcp_open_connections,
            tcp_read_bytes: counter(
                "tcp_read_bytes_total",
                "Bytes read from downstream connections.",
                TCP_LABELS,
            )?,
            tcp_write_bytes: counter(
                "tcp_write_bytes_total",
                "Bytes written to downstream connections.",
                TCP_LABELS,
            )?,
            tls_handshakes: counter(
                "tls_handshakes_total",
                "Successful mesh TLS handshakes, by the key-exchange group they agreed (x25519mlkem768 is post-quantum).",
                &["direction", "group"],
            )?,
            tls_handshake_failures: counter(
                "tls_handshake_failures_total",
                "Failed mesh TLS handshakes, by reason.",
                &["direction", "reason"],
            )?,
            detect_timeouts: counter(
                "protocol_detect_timeouts_total",
                "Connections whose protocol was not known before the detection timeout (treated as opaque).",
                &["direction"],
            )?,
            protocols: counter(
                "protocol_detections_total",
                "Connections by the protocol detected (or configured) after the mesh hop.",
                &["direction", "protocol"],
            )?,
            connection_errors: counter(
                "connection_errors_total",
                "Connections refused or failed, by reason.",
                &["direction", "reason"],
            )?,
            plaintext_fallbacks,
            authz_decisions: counter(
                "authz_decisions_total",
                "Authorization decisions by kind (tcp per connection, http per request), outcome and the policy that decided (audit: each AUDIT policy that matched).",
                &["direction", "kind", "decision", "policy"],
            )?,
            authz_terminated: counter(
                "authz_terminated_total",
                "Established opaque connections closed because an updated policy denies them.",
                &["policy"],
            )?,
            authz_http_rules_on_opaque: counter(
                "authz_http_rules_on_opaque_total",
                "Opaque connections judged by a policy whose HTTP conditions cannot apply to them (they never match an ALLOW and always match a DENY).",
                &["policy"],
            )?,
            discovery_answers: counter(
                "outbound_discovery_answers_total",
                "Outbound connections by what discovery said of their destination: endpoints (balanced), unknown (not in the cluster: original destination) or unavailable (no answer in time: original destination).",
                &["answer"],
            )?,
            balancer_endpoints,
            endpoint_pauses,
            retries,
            service_requests: counter(
                "outbound_service_requests_total",
                "Outbound HTTP requests balanced over a Service's endpoints, by Service (namespace/name).",
                &["service"],
            )?,
        })
    }

    /// Counts a decision and any AUDIT matches that came with it.
    pub fn authz(
        &self,
        direction: Direction,
        kind: AuthzKind,
        outcome: &Result<crate::policy::Permit, crate::policy::Denied>,
    ) {
        let (decision, by, audits) = match outcome {
            Ok(permit) => ("allow", &permit.by, &permit.audits),
            Err(denied) => ("deny", &denied.by, &denied.audits),
        };
        let (dir, kind) = (direction.as_str(), kind.as_str());
        self.authz_decisions
            .with_label_values(&[dir, kind, decision, by.label()])
            .inc();
        for audit in audits {
            self.authz_decisions
                .with_label_values(&[dir, kind, "audit", &audit.id])
                .inc();
        }
    }

    pub fn authz_terminated(&self, policy: &str) {
        self.authz_terminated.with_label_values(&[policy]).inc();
    }

    pub fn authz_http_rules_on_opaque(&self, policy: &str) {
        self.authz_http_rules_on_opaque
            .with_label_values(&[policy])
            .inc();
    }

    pub fn connection(&self, direction: Direction, tls: &TlsStatus) -> ConnMetrics {
        let labels = [
            direction.as_str().to_string(),
            tls.label().to_string(),
            tls.no_tls_reason().to_string(),
            tls.peer_id_label().to_string(),
        ];
        let l = [&*labels[0], &*labels[1], &*labels[2], &*labels[3]];
        self.tcp_open.with_label_values(&l).inc();
        ConnMetrics {
            metrics: self.clone(),
            labels,
            result: ConnOutcome::Ok,
        }
    }

    fn http_series(&self, direction: Direction, tls: &TlsStatus) -> HttpSeries {
        let (dir, peer) = (direction.as_str(), tls.peer_id_label());
        HttpSeries {
            tls: tls.clone(),
            requests: self
                .http_requests
                .with_label_values(&[dir, tls.label(), peer]),
            latency: self.http_latency.with_label_values(&[dir, peer]),
            responses: Vec::new(),
        }
    }

    pub fn accepted(&self, direction: Direction) -> OpenConnection {
        let gauge = self
            .tcp_open_connections
            .with_label_values(&[direction.as_str()]);
        gauge.inc();
        OpenConnection(gauge)
    }

    /// A handshake that completed, with the group it agreed (`None`: one
    /// rustls names but the mesh does not offer, counted as `other`).
    pub fn handshake_ok(&self, direction: Direction, group: Option<KxGroup>) {
        let group = group.map_or("other", KxGroup::name);
        self.tls_handshakes
            .with_label_values(&[direction.as_str(), group])
            .inc();
    }

    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.tls_handshake_failures
            .with_label_values(&[direction.as_str(), reason.as_str()])
            .inc();
    }

    pub fn detect_timeout(&self, direction: Direction) {
        self.detect_timeouts
            .with_label_values(&[direction.as_str()])
            .inc();
    }

    /// Counts a connection served as HTTP of `version`, or opaque (`None`).
    pub fn protocol(&self, direction: Direction, version: Option<Version>) {
        self.protocols
            .with_label_values(&[direction.as_str(), Version::label(version)])
            .inc();
    }

    pub fn connection_error(&self, direction: Direction, reason: ConnError) {
        self.connection_errors
            .with_label_values(&[direction.as_str(), reason.as_str()])
            .inc();
    }

    pub fn plaintext_fallback(&self) {
        self.plaintext_fallbacks.inc();
    }

    pub fn discovery_answer(&self, answer: &super::discover::Answer) {
        use super::discover::Answer;
        let label = match answer {
            Answer::Endpoints(_) => "endpoints",
            Answer::Unknown => "unknown",
            Answer::Unavailable => "unavailable",
        };
        self.discovery_answers.with_label_values(&[label]).inc();
    }

    pub fn balancer_endpoints_changed(&self, delta: i64) {
        self.balancer_endpoints.add(delta);
    }

    pub fn endpoint_paused(&self) {
        self.endpoint_pauses.inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    /// The request counter of a Service, looked up once per endpoint set.
    pub fn request_body_too_large(&self) {
        self.body_too_large.inc();
    }

    pub fn service_requests(&self, service: &str) -> IntCounter {
        self.service_requests.with_label_values(&[service])
    }
}

/// The HTTP series of one connection, resolved on first use. Looking a
/// series up by its labels hashes every label value; a connection's
/// requests nearly always share them, so they are looked up once.
#[derive(Debug)]
pub struct HttpMetrics {
    metrics: Metrics,
    direction: Direction,
    cached: Mutex<Option<HttpSeries>>,
}

#[derive(Debug)]
struct HttpSeries {
    tls: TlsStatus,
    requests: IntCounter,
    latency: Histogram,
    /// Response counters by status code; a handful per connection.
    responses: Vec<(u16, IntCounter)>,
}

impl HttpMetrics {
    pub fn new(metrics: Metrics, direction: Direction) -> Self {
        Self {
            metrics,
            direction,
            cached: Mutex::new(None),
        }
    }

    /// Counts one request and its response.
    pub fn record(&self, tls: &TlsStatus, status: u16, elapsed: Duration) {
        let mut cached = self.cached.lock();
        let series = match cached.as_mut() {
            Some(series) if series.tls == *tls => series,
            _ => cached.insert(self.metrics.http_series(self.direction, tls)),
        };
        series.requests.inc();
        series.latency.observe(elapsed.as_secs_f64());
        match series.responses.iter().find(|(code, _)| *code == status) {
            Some((_, counter)) => counter.inc(),
            None => {
                let counter = self.metrics.http_responses.with_label_values(&[
                    self.direction.as_str(),
                    tls.label(),
                    tls.peer_id_label(),
                    &status.to_string(),
                ]);
                counter.inc();
                series.responses.push((status, counter));
            }
        }
    }
}

/// Keeps `tcp_open_connections` up while alive.
#[derive(Debug)]
pub struct OpenConnection(prometheus::IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ConnMetrics {
    fn labels(&self) -> [&str; 4] {
        [
            &self.labels[0],
            &self.labels[1],
            &self.labels[2],
            &self.labels[3],
        ]
    }

    pub fn bytes(&self) -> ByteCounters {
        let l = self.labels();
        ByteCounters {
            read: self.metrics.tcp_read_bytes.with_label_values(&l),
            written: self.metrics.tcp_write_bytes.with_label_values(&l),
        }
    }

    /// How the connection ended; recorded when this value is dropped.
    pub fn set_result(&mut self, result: ConnOutcome) {
        self.result = result;
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let l = self.labels();
        self.metrics
            .tcp_close
            .with_label_values(&[l[0], l[1], l[2], l[3], self.result.as_str()])
            .inc();
    }
}
