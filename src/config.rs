//! The proxy's configuration: a YAML file, overridden by flags and
//! environment variables, parsed once into typed values.
//!
//! Every field has a default except the workload's own SPIFFE ID. Unknown
//! keys are errors (a typo must not silently fall back to a default), and
//! every error names the offending field. `docs/configuration.md`
//! documents each key.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::identity::SpiffeId;
use crate::identity::reload::ReloadConfig;
use crate::policy::{DefaultPolicy, MtlsMode, Probe, Settings, Workload};
use crate::proxy::{
    InboundConfig, InboundTarget, Limits, OutboundConfig, OutboundTarget, ProtocolMode, ProxyConfig,
};
use crate::runtime::LogFormat;
use crate::tls::{KxGroup, TlsSettings};
use crate::units::{keyword, list, port, serde_bytes, serde_duration};

/// Default identity mount, as in DESIGN.md.
pub const DEFAULT_IDENTITY_DIR: &str = "/var/run/outrider/identity";
/// Linkerd's default opaque ports: protocols where the server speaks
/// first or that are never HTTP.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// The file's shape. Every section and key is optional.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub identity: IdentitySection,
    pub tls: TlsSection,
    pub mtls_mode: MtlsMode,
    pub inbound: InboundSection,
    pub outbound: OutboundSection,
    pub admin: AdminSection,
    pub opaque_ports: BTreeSet<u16>,
    #[serde(with = "serde_duration")]
    pub plaintext_fallback_ttl: Duration,
    pub limits: LimitsSection,
    #[serde(with = "serde_duration")]
    pub shutdown_grace_period: Duration,
    pub log: LogSection,
    pub workload: WorkloadSection,
    pub policy: PolicySection,
}

/// Who this workload is, for selecting policies.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadSection {
    /// Defaults to the namespace in `identity.id`.
    pub namespace: Option<String>,
    /// Fixed labels (local mode).
    pub labels: BTreeMap<String, String>,
    /// A downward-API labels file, watched (cluster mode).
    pub labels_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySourceKind {
    None,
    Files,
    Kubernetes,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    pub source: PolicySourceKind,
    /// `files`: the directory of policy YAML.
    pub dir: Option<PathBuf>,
    /// `kubernetes`: a kubeconfig; default: the usual inference.
    pub kubeconfig: Option<PathBuf>,
    pub default: DefaultPolicy,
    pub probes: Vec<Probe>,
    #[serde(with = "serde_duration")]
    pub reload_debounce: Duration,
    #[serde(with = "serde_duration")]
    pub poll_interval: Duration,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            source: PolicySourceKind::None,
            dir: None,
            kubeconfig: None,
            default: DefaultPolicy::AllowAll,
            probes: Vec::new(),
            reload_debounce: Duration::from_millis(100),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Where policies come from, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    None,
    Files(PathBuf),
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The policy side of the proxy, validated.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub source: PolicySource,
    pub workload: Workload,
    pub labels_file: Option<PathBuf>,
    pub settings: Settings,
    pub reload_debounce: Duration,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitySection {
    pub dir: PathBuf,
    pub id: Option<SpiffeId>,
    #[serde(with = "serde_duration")]
    pub clock_skew: Duration,
    #[serde(with = "serde_duration")]
    pub reload_debounce: Duration,
    #[serde(with = "serde_duration")]
    pub reload_poll_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    #[serde(with = "serde_duration")]
    pub handshake_timeout: Duration,
    pub resumption: bool,
    pub key_exchange: Vec<KxGroup>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Static mode: forward to this address instead of the original
    /// destination.
    pub app: Option<SocketAddr>,
    pub protocol: ProtocolMode,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Static mode: send everything to this peer proxy.
    pub peer: Option<SocketAddr>,
    /// The identity the static peer must present.
    pub peer_id: Option<SpiffeId>,
    pub protocol: ProtocolMode,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(with = "serde_duration")]
    pub connect_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub detect_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "serde_bytes")]
    pub max_header_bytes: usize,
    #[serde(with = "serde_duration")]
    pub app_pool_idle_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub peer_pool_idle_timeout: Duration,
    pub pool_max_idle_per_destination: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
}

// === defaults ===

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            identity: IdentitySection::default(),
            tls: TlsSection::default(),
            mtls_mode: MtlsMode::Permissive,
            inbound: InboundSection::default(),
            outbound: OutboundSection::default(),
            admin: AdminSection::default(),
            opaque_ports: DEFAULT_OPAQUE_PORTS.into_iter().collect(),
            plaintext_fallback_ttl: Duration::from_secs(60),
            limits: LimitsSection::default(),
            shutdown_grace_period: Duration::from_secs(30),
            log: LogSection::default(),
            workload: WorkloadSection::default(),
            policy: PolicySection::default(),
        }
    }
}

impl Default for IdentitySection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_IDENTITY_DIR),
            id: None,
            clock_skew: Duration::from_secs(60),
            reload_debounce: Duration::from_millis(100),
            reload_poll_interval: Duration::from_secs(10),
        }
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            resumption: false,
            key_exchange: vec![KxGroup::X25519, KxGroup::Secp256r1],
        }
    }
}

impl Default for InboundSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: addr("0.0.0.0:4143"),
            app: None,
            protocol: ProtocolMode::Detect,
        }
    }
}

impl Default for OutboundSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: addr("127.0.0.1:4140"),
            peer: None,
            peer_id: None,
            protocol: ProtocolMode::Detect,
        }
    }
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: addr("0.0.0.0:4191"),
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            detect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            // Below the keep-alive timeouts of common servers (Node.js: 5 s),
            // so we never reuse a connection the application is closing.
            app_pool_idle_timeout: Duration::from_secs(3),
            // Peer proxies keep idle connections for `idle_timeout` (1 h).
            peer_pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_destination: 256,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

/// Values given on the command line or in the environment; each replaces
/// its key in the file and is parsed exactly as the file's value is, so a
/// bad one exits 64 naming that key. This is the one list of proxy flags:
/// `outrider proxy` flattens it into its arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// The identity directory (tls.crt, tls.key, ca.crt).
    #[arg(long, env = "OUTRIDER_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// The SPIFFE ID this workload's certificate must carry.
    #[arg(long, env = "OUTRIDER_IDENTITY_ID")]
    pub identity_id: Option<String>,
    /// strict or permissive.
    #[arg(long, env = "OUTRIDER_MTLS_MODE")]
    pub mtls_mode: Option<String>,
    #[arg(long, env = "OUTRIDER_INBOUND_LISTEN")]
    pub inbound_listen: Option<String>,
    /// Static mode: forward inbound traffic to this address.
    #[arg(long, env = "OUTRIDER_INBOUND_APP")]
    pub inbound_app: Option<String>,
    /// detect or opaque.
    #[arg(long, env = "OUTRIDER_INBOUND_PROTOCOL")]
    pub inbound_protocol: Option<String>,
    #[arg(long, env = "OUTRIDER_OUTBOUND_LISTEN")]
    pub outbound_listen: Option<String>,
    /// Static mode: send outbound traffic to this peer proxy.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PEER")]
    pub outbound_peer: Option<String>,
    /// The SPIFFE ID the static peer must present.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PEER_ID")]
    pub outbound_peer_id: Option<String>,
    /// detect or opaque.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PROTOCOL")]
    pub outbound_protocol: Option<String>,
    #[arg(long, env = "OUTRIDER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Enable TLS 1.3 session resumption.
    #[arg(long, env = "OUTRIDER_TLS_RESUMPTION")]
    pub tls_resumption: Option<bool>,
    /// Comma-separated key-exchange groups (x25519, secp256r1, secp384r1).
    #[arg(long, env = "OUTRIDER_TLS_KEY_EXCHANGE")]
    pub tls_key_exchange: Option<String>,
    /// A tracing filter such as `info` or `outrider=debug`.
    #[arg(long, env = "OUTRIDER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// plain or json.
    #[arg(long, env = "OUTRIDER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// The workload's namespace (default: the one in --identity-id).
    #[arg(long, env = "OUTRIDER_WORKLOAD_NAMESPACE")]
    pub workload_namespace: Option<String>,
    /// The workload's labels, `key=value,key=value` (local mode).
    #[arg(long, env = "OUTRIDER_WORKLOAD_LABELS")]
    pub workload_labels: Option<String>,
    /// A downward-API file holding the workload's labels (cluster mode).
    #[arg(long, env = "OUTRIDER_WORKLOAD_LABELS_FILE")]
    pub workload_labels_file: Option<PathBuf>,
    /// none, files or kubernetes.
    #[arg(long, env = "OUTRIDER_POLICY_SOURCE")]
    pub policy_source: Option<String>,
    /// The directory of policy YAML (policy source `files`).
    #[arg(long, env = "OUTRIDER_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// allow-all, allow-authenticated, allow-same-namespace or deny.
    #[arg(long, env = "OUTRIDER_POLICY_DEFAULT")]
    pub policy_default: Option<String>,
    /// Kubelet probes always allowed, `PORT` or `PORT/path`, comma-separated
    /// (the injector fills it from the pod's probes).
    #[arg(long, env = "OUTRIDER_POLICY_PROBES")]
    pub policy_probes: Option<String>,
    /// Ports that skip protocol detection, comma-separated (replaces the
    /// default list).
    #[arg(long, env = "OUTRIDER_OPAQUE_PORTS")]
    pub opaque_ports: Option<String>,
}

/// Everything the `proxy` subcommand runs with, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub identity: ReloadConfig,
    pub tls: TlsSettings,
    pub admin_listen: SocketAddr,
    pub shutdown_grace_period: Duration,
    pub log: LogSection,
    pub policy: PolicyConfig,
    /// The file as finally merged, for logging the effective config.
    pub effective: FileConfig,
}

// === parsing ===

impl FileConfig {
    /// Parses YAML; errors name the path of the bad field.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "(file)".to_string()
            } else {
                path
            };
            invalid(&field, e.into_inner().to_string())
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("--config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_yaml(&text)
    }

    /// The file (or the defaults, without one) with `overrides` applied,
    /// checked: everything `outrider proxy` runs with.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut file = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        file.apply(overrides)?;
        file.validate()
    }

    /// Applies overrides; each one is parsed exactly like the file's value.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        /// Replaces `slot` with `value` parsed, naming `field` on failure.
        fn set<T, V: ?Sized>(
            slot: &mut T,
            field: &str,
            value: Option<&V>,
            parse: impl FnOnce(&V) -> Result<T, String>,
        ) -> Result<(), ConfigError> {
            if let Some(value) = value {
                *slot = parse(value).map_err(|reason| invalid(field, reason))?;
            }
            Ok(())
        }
        fn some<T: serde::de::DeserializeOwned>(v: &str) -> Result<Option<T>, String> {
            keyword(v).map(Some)
        }
        let text = |v: &str| Ok(v.to_string());
        let path = |v: &Path| Ok(v.to_path_buf());
        set(
            &mut self.identity.dir,
            "identity.dir",
            o.identity_dir.as_deref(),
            path,
        )?;
        set(
            &mut self.identity.id,
            "identity.id",
            o.identity_id.as_deref(),
            some,
        )?;
        set(
            &mut self.mtls_mode,
            "mtls_mode",
            o.mtls_mode.as_deref(),
            keyword,
        )?;
        set(
            &mut self.inbound.listen,
            "inbound.listen",
            o.inbound_listen.as_deref(),
            keyword,
        )?;
        set(
            &mut self.inbound.app,
            "inbound.app",
            o.inbound_app.as_deref(),
            some,
        )?;
        set(
            &mut self.inbound.protocol,
            "inbound.protocol",
            o.inbound_protocol.as_deref(),
            keyword,
        )?;
        set(
            &mut self.outbound.listen,
            "outbound.listen",
            o.outbound_listen.as_deref(),
            keyword,
        )?;
        set(
            &mut self.outbound.peer,
            "outbound.peer",
            o.outbound_peer.as_deref(),
            some,
        )?;
        set(
            &mut self.outbound.peer_id,
            "outbound.peer_id",
            o.outbound_peer_id.as_deref(),
            some,
        )?;
        set(
            &mut self.outbound.protocol,
            "outbound.protocol",
            o.outbound_protocol.as_deref(),
            keyword,
        )?;
        set(
            &mut self.admin.listen,
            "admin.listen",
            o.admin_listen.as_deref(),
            keyword,
        )?;
        set(
            &mut self.tls.resumption,
            "tls.resumption",
            o.tls_resumption.as_ref(),
            |v| Ok(*v),
        )?;
        set(
            &mut self.tls.key_exchange,
            "tls.key_exchange",
            o.tls_key_exchange.as_deref(),
            |v| list(v, keyword),
        )?;
        set(
            &mut self.log.level,
            "log.level",
            o.log_level.as_deref(),
            text,
        )?;
        set(
            &mut self.log.format,
            "log.format",
            o.log_format.as_deref(),
            keyword,
        )?;
        set(
            &mut self.workload.namespace,
            "workload.namespace",
            o.workload_namespace.as_deref(),
            |v| Ok(Some(v.to_string())),
        )?;
        set(
            &mut self.workload.labels,
            "workload.labels",
            o.workload_labels.as_deref(),
            parse_labels,
        )?;
        set(
            &mut self.workload.labels_file,
            "workload.labels_file",
            o.workload_labels_file.as_deref(),
            |v| Ok(Some(v.to_path_buf())),
        )?;
        set(
            &mut self.policy.source,
            "policy.source",
            o.policy_source.as_deref(),
            keyword,
        )?;
        set(
            &mut self.policy.dir,
            "policy.dir",
            o.policy_dir.as_deref(),
            |v| Ok(Some(v.to_path_buf())),
        )?;
        set(
            &mut self.policy.default,
            "policy.default",
            o.policy_default.as_deref(),
            keyword,
        )?;
        set(
            &mut self.policy.probes,
            "policy.probes",
            o.policy_probes.as_deref(),
            parse_probes,
        )?;
        set(
            &mut self.opaque_ports,
            "opaque_ports",
            o.opaque_ports.as_deref(),
            parse_opaque_ports,
        )?;
        Ok(())
    }

    /// Checks what types alone cannot and builds the typed config.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let id = self.identity.id.clone().ok_or_else(|| {
            invalid(
                "identity.id",
                "required: the SPIFFE ID this workload's certificate must carry",
            )
        })?;
        if id.is_root() {
            return Err(invalid(
                "identity.id",
                "a workload ID needs a path (spiffe://<td>/ns/<ns>/sa/<sa>)",
            ));
        }
        let positive = |field: &str, d: Duration| {
            if d.is_zero() {
                Err(invalid(field, "must be greater than zero"))
            } else {
                Ok(())
            }
        };
        positive("tls.handshake_timeout", self.tls.handshake_timeout)?;
        positive("limits.connect_timeout", self.limits.connect_timeout)?;
        positive("limits.detect_timeout", self.limits.detect_timeout)?;
        positive("limits.idle_timeout", self.limits.idle_timeout)?;
        positive(
            "limits.app_pool_idle_timeout",
            self.limits.app_pool_idle_timeout,
        )?;
        positive(
            "limits.peer_pool_idle_timeout",
            self.limits.peer_pool_idle_timeout,
        )?;

        positive("identity.reload_debounce", self.identity.reload_debounce)?;
        positive(
            "identity.reload_poll_interval",
            self.identity.reload_poll_interval,
        )?;
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1KiB"));
        }
        if self.tls.key_exchange.is_empty() {
            return Err(invalid("tls.key_exchange", "needs at least one group"));
        }
        if self.outbound.peer_id.is_some() && self.outbound.peer.is_none() {
            return Err(invalid(
                "outbound.peer_id",
                "only meaningful with outbound.peer",
            ));
        }
        if let Some(peer_id) = &self.outbound.peer_id {
            if peer_id.trust_domain_str() != id.trust_domain_str() {
                return Err(invalid(
                    "outbound.peer_id",
                    format!(
                        "trust domain differs from identity.id ({})",
                        id.trust_domain_str()
                    ),
                ));
            }
        }
        if !self.inbound.enabled && !self.outbound.enabled {
            return Err(invalid(
                "inbound.enabled",
                "inbound and outbound are both disabled",
            ));
        }
        if self.inbound.enabled && self.inbound.app == Some(self.inbound.listen) {
            return Err(invalid(
                "inbound.app",
                "equals inbound.listen: the proxy would forward to itself",
            ));
        }
        if self.outbound.enabled && self.outbound.peer == Some(self.outbound.listen) {
            return Err(invalid(
                "outbound.peer",
                "equals outbound.listen: the proxy would forward to itself",
            ));
        }
        self.log
            .level
            .parse::<tracing_subscriber::filter::Targets>()
            .map_err(|e| invalid("log.level", e.to_string()))?;
        let policy = self.policy_config(&id)?;

        let proxy = ProxyConfig {
            inbound: self.inbound.enabled.then(|| InboundConfig {
                listen: self.inbound.listen,
                target: self
                    .inbound
                    .app
                    .map_or(InboundTarget::OriginalDst, InboundTarget::App),
                protocol: self.inbound.protocol,
            }),
            outbound: self.outbound.enabled.then(|| OutboundConfig {
                listen: self.outbound.listen,
                target: match self.outbound.peer {
                    Some(addr) => OutboundTarget::Peer {
                        addr,
                        id: self.outbound.peer_id.clone(),
                    },
                    None => OutboundTarget::OriginalDst,
                },
                protocol: self.outbound.protocol,
            }),
            mtls_mode: self.mtls_mode,
            opaque_ports: self.opaque_ports.clone(),
            plaintext_fallback_ttl: self.plaintext_fallback_ttl,
            limits: Limits {
                connect_timeout: self.limits.connect_timeout,
                handshake_timeout: self.tls.handshake_timeout,
                detect_timeout: self.limits.detect_timeout,
                idle_timeout: self.limits.idle_timeout,
                max_connections: self.limits.max_connections,
                max_header_bytes: self.limits.max_header_bytes,
                app_pool_idle_timeout: self.limits.app_pool_idle_timeout,
                // A pooled connection must be retired before the peer's idle
                // timeout (the same setting, mesh-wide) closes it under us.
                peer_pool_idle_timeout: self
                    .limits
                    .peer_pool_idle_timeout
                    .min(self.limits.idle_timeout / 2),
                pool_max_idle_per_destination: self.limits.pool_max_idle_per_destination,
            },
        };
        Ok(Config {
            proxy,
            identity: ReloadConfig {
                dir: self.identity.dir.clone(),
                expected_id: id,
                clock_skew: self.identity.clock_skew,
                debounce: self.identity.reload_debounce,
                poll_interval: self.identity.reload_poll_interval,
            },
            tls: TlsSettings {
                clock_skew: self.identity.clock_skew,
                resumption: self.tls.resumption,
                key_exchange: self.tls.key_exchange.clone(),
            },
            admin_listen: self.admin.listen,
            shutdown_grace_period: self.shutdown_grace_period,
            log: self.log.clone(),
            policy,
            effective: self,
        })
    }

    fn policy_config(&self, id: &SpiffeId) -> Result<PolicyConfig, ConfigError> {
        let namespace = match &self.workload.namespace {
            Some(ns) => ns.clone(),
            None => id
                .namespace_and_service_account()
                .map_or_else(|| "default".to_string(), |(ns, _)| ns.to_string()),
        };
        if namespace.is_empty() {
            return Err(invalid("workload.namespace", "must not be empty"));
        }
        if self.workload.labels_file.is_some() && !self.workload.labels.is_empty() {
            return Err(invalid(
                "workload.labels",
                "give labels or labels_file, not both",
            ));
        }
        let source = match self.policy.source {
            PolicySourceKind::None => PolicySource::None,
            PolicySourceKind::Files => {
                let dir =
                    self.policy.dir.clone().ok_or_else(|| {
                        invalid("policy.dir", "required with policy.source: files")
                    })?;
                // A mistyped directory must not silently mean "no policies".
                if !dir.is_dir() {
                    return Err(invalid(
                        "policy.dir",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                PolicySource::Files(dir)
            }
            PolicySourceKind::Kubernetes => PolicySource::Kubernetes {
                kubeconfig: self.policy.kubeconfig.clone(),
            },
        };
        let positive = |field: &str, d: Duration| {
            if d.is_zero() {
                Err(invalid(field, "must be greater than zero"))
            } else {
                Ok(())
            }
        };
        positive("policy.reload_debounce", self.policy.reload_debounce)?;
        positive("policy.poll_interval", self.policy.poll_interval)?;
        for (i, probe) in self.policy.probes.iter().enumerate() {
            if probe.port == 0 {
                return Err(invalid(
                    &format!("policy.probes[{i}].port"),
                    "must be 1-65535",
                ));
            }
            if probe.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
                return Err(invalid(
                    &format!("policy.probes[{i}].path"),
                    "must start with '/'",
                ));
            }
        }
        Ok(PolicyConfig {
            source,
            workload: Workload {
                namespace,
                labels: self.workload.labels.clone(),
            },
            labels_file: self.workload.labels_file.clone(),
            settings: Settings {
                default: self.policy.default,
                mtls: self.mtls_mode,
                probes: self.policy.probes.clone(),
            },
            reload_debounce: self.policy.reload_debounce,
            poll_interval: self.policy.poll_interval,
        })
    }
}

/// `app=payments,tier=backend` into a map.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    list(text, |pair| {
        pair.split_once('=')
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("{pair:?} is not key=value"))
    })
    .map(|pairs| pairs.into_iter().collect())
}

/// `8080,9000/healthz`: probe exemptions as `OUTRIDER_POLICY_PROBES` and
/// the injector's `outrider.dev/probes` annotation give them.
pub fn parse_probes(text: &str) -> Result<Vec<Probe>, String> {
    list(text, str::parse)
}

/// `3306,5432`: the ports that skip protocol detection, as
/// `OUTRIDER_OPAQUE_PORTS` and the `outrider.dev/opaque-ports` annotation
/// give them.
pub fn parse_opaque_ports(text: &str) -> Result<BTreeSet<u16>, String> {
    list(text, port).map(|ports| ports.into_iter().collect())
}

#[cfg(test)]
mod tests;
