//! The controller's metrics, on its admin port: what it issued, what
//! failed, whether it leads, and the expiry dates operators alert on.

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    issued: IntCounterVec,
    failures: IntCounterVec,
    deleted: prometheus::IntCounter,
    webhook: IntCounterVec,
    leader: IntGauge,
    issuer_expiry: Gauge,
    anchor_expiry: Gauge,
    soonest_identity_expiry: Gauge,
    ca_load_failures: prometheus::IntCounter,
    foreign_objects: IntCounterVec,
    left_alone: IntGaugeVec,
    discovery_streams: IntGauge,
    discovery_answers: IntCounterVec,
    discovery_refused: IntCounterVec,
    discovery_changes: IntCounterVec,
}

impl ControllerMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("outrider_controller");
        let issued = IntCounterVec::new(
            opts(
                "certificates_issued_total",
                "Certificates issued, by kind (identity, webhook) and reason.",
            ),
            &["kind", "reason"],
        )?;
        let failures = IntCounterVec::new(
            opts(
                "renewal_failures_total",
                "Identity Secrets that could not be issued or written, by cause.",
            ),
            &["cause"],
        )?;
        let deleted = prometheus::IntCounter::with_opts(opts(
            "identities_deleted_total",
            "Identity Secrets removed because their ServiceAccount is gone.",
        ))?;
        let webhook = IntCounterVec::new(
            opts(
                "webhook_reviews_total",
                "Admission reviews answered, by verdict.",
            ),
            &["verdict"],
        )?;
        let leader = IntGauge::with_opts(opts(
            "leader",
            "1 while this replica holds the Lease (and issues), else 0.",
        ))?;
        let issuer_expiry = Gauge::with_opts(opts(
            "issuer_expiry_timestamp_seconds",
            "When the issuer certificate expires (Unix time).",
        ))?;
        let anchor_expiry = Gauge::with_opts(opts(
            "trust_anchor_expiry_timestamp_seconds",
            "When the soonest-expiring trust anchor in the bundle expires (Unix time).",
        ))?;
        let soonest_identity_expiry = Gauge::with_opts(opts(
            "identity_soonest_expiry_timestamp_seconds",
            "The soonest expiry among the identity Secrets (Unix time).",
        ))?;
        let ca_load_failures = prometheus::IntCounter::with_opts(opts(
            "ca_load_failures_total",
            "Times the CA Secret was unreadable or failed its checks (the last good CA is kept).",
        ))?;
        let foreign_objects = IntCounterVec::new(
            opts(
                "foreign_objects_total",
                "Objects found under a name the controller writes that it did not write, by kind and resolution (replaced, left_alone).",
            ),
            &["kind", "resolution"],
        )?;
        let left_alone = IntGaugeVec::new(
            opts(
                "objects_left_alone",
                "Foreign objects holding a name the controller writes, left alone because another controller or tool keeps them (what they block does not work).",
            ),
            &["kind"],
        )?;
        let discovery_streams = IntGauge::with_opts(opts(
            "discovery_streams",
            "Resolve streams open (one per destination a proxy follows).",
        ))?;
        let discovery_answers = IntCounterVec::new(
            opts(
                "discovery_answers_total",
                "Answers sent on Resolve streams, by kind (endpoints, unknown).",
            ),
            &["answer"],
        )?;
        let discovery_refused = IntCounterVec::new(
            opts(
                "discovery_refused_total",
                "Resolve requests refused, by reason.",
            ),
            &["reason"],
        )?;
        let discovery_changes = IntCounterVec::new(
            opts(
                "discovery_changes_total",
                "Changes to the discovery index from the watches, by kind (Service, EndpointSlice, Pod).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(discovery_streams.clone()))?;
        registry.register(Box::new(discovery_answers.clone()))?;
        registry.register(Box::new(discovery_refused.clone()))?;
        registry.register(Box::new(discovery_changes.clone()))?;
        registry.register(Box::new(foreign_objects.clone()))?;
        registry.register(Box::new(left_alone.clone()))?;
        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(deleted.clone()))?;
        registry.register(Box::new(webhook.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(issuer_expiry.clone()))?;
        registry.register(Box::new(anchor_expiry.clone()))?;
        registry.register(Box::new(soonest_identity_expiry.clone()))?;
        registry.register(Box::new(ca_load_failures.clone()))?;
        Ok(Self {
            issued,
            failures,
            deleted,
            webhook,
            leader,
            issuer_expiry,
            anchor_expiry,
            soonest_identity_expiry,
            ca_load_failures,
            foreign_objects,
            left_alone,
            discovery_streams,
            discovery_answers,
            discovery_refused,
            discovery_changes,
        })
    }

    pub fn issued(&self, kind: &str, reason: &str) {
        self.issued.with_label_values(&[kind, reason]).inc();
    }

    pub fn failure(&self, cause: &str) {
        self.failures.with_label_values(&[cause]).inc();
    }

    pub fn deleted(&self) {
        self.deleted.inc();
    }

    pub fn webhook(&self, verdict: &str) {
        self.webhook.with_label_values(&[verdict]).inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn set_ca_expiry(&self, issuer: time::OffsetDateTime, anchor: time::OffsetDateTime) {
        self.issuer_expiry.set(issuer.unix_timestamp() as f64);
        self.anchor_expiry.set(anchor.unix_timestamp() as f64);
    }

    pub fn set_soonest_identity_expiry(&self, at: Option<time::OffsetDateTime>) {
        self.soonest_identity_expiry
            .set(at.map_or(0.0, |t| t.unix_timestamp() as f64));
    }

    pub fn foreign_object(&self, kind: &str, resolution: &str) {
        self.foreign_objects
            .with_label_values(&[kind, resolution])
            .inc();
    }

    pub fn set_left_alone(&self, kind: &str, count: usize) {
        self.left_alone
            .with_label_values(&[kind])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts a Resolve stream open until the returned guard is dropped.
    pub fn discovery_stream(&self) -> StreamGuard {
        self.discovery_streams.inc();
        StreamGuard(self.discovery_streams.clone())
    }

    pub fn discovery_answer(&self, answer: &str) {
        self.discovery_answers.with_label_values(&[answer]).inc();
    }

    pub fn discovery_refused(&self, reason: &str) {
        self.discovery_refused.with_label_values(&[reason]).inc();
    }

    pub fn discovery_change(&self, kind: &str) {
        self.discovery_changes.with_label_values(&[kind]).inc();
    }

    pub fn ca_load_failure(&self) {
        self.ca_load_failures.inc();
    }
}

/// Keeps a Resolve stream counted while it is open.
#[derive(Debug)]
pub struct StreamGuard(IntGauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
