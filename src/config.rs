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
use crate::policy::{DefaultPolicy, Probe, Settings, Workload};
use crate::proxy::{
    InboundConfig, InboundTarget, Limits, MtlsMode, OutboundConfig, OutboundTarget, ProtocolMode,
    ProxyConfig,
};
use crate::tls::{KxGroup, TlsSettings};
use crate::units::{serde_bytes, serde_duration};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
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
/// the file's value when set.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub identity_dir: Option<PathBuf>,
    pub identity_id: Option<String>,
    pub mtls_mode: Option<String>,
    pub inbound_listen: Option<String>,
    pub inbound_app: Option<String>,
    pub inbound_protocol: Option<String>,
    pub outbound_listen: Option<String>,
    pub outbound_peer: Option<String>,
    pub outbound_peer_id: Option<String>,
    pub outbound_protocol: Option<String>,
    pub admin_listen: Option<String>,
    pub tls_resumption: Option<bool>,
    pub tls_key_exchange: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub workload_namespace: Option<String>,
    /// `key=value,key=value`.
    pub workload_labels: Option<String>,
    pub workload_labels_file: Option<PathBuf>,
    pub policy_source: Option<String>,
    pub policy_dir: Option<PathBuf>,
    pub policy_default: Option<String>,
    /// `PORT` or `PORT/path`, comma-separated.
    pub policy_probes: Option<String>,
    /// Comma-separated ports.
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

    /// Applies overrides; each one is parsed exactly like the file's value.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        fn parse<T: serde::de::DeserializeOwned>(
            field: &str,
            value: &str,
        ) -> Result<T, ConfigError> {
            serde_yaml::from_value(serde_yaml::Value::String(value.to_string()))
                .map_err(|e| invalid(field, format!("{value:?}: {e}")))
        }
        if let Some(v) = &o.identity_dir {
            self.identity.dir = v.clone();
        }
        if let Some(v) = &o.identity_id {
            self.identity.id = Some(parse("identity.id", v)?);
        }
        if let Some(v) = &o.mtls_mode {
            self.mtls_mode = parse("mtls_mode", v)?;
        }
        if let Some(v) = &o.inbound_listen {
            self.inbound.listen = parse("inbound.listen", v)?;
        }
        if let Some(v) = &o.inbound_app {
            self.inbound.app = Some(parse("inbound.app", v)?);
        }
        if let Some(v) = &o.inbound_protocol {
            self.inbound.protocol = parse("inbound.protocol", v)?;
        }
        if let Some(v) = &o.outbound_listen {
            self.outbound.listen = parse("outbound.listen", v)?;
        }
        if let Some(v) = &o.outbound_peer {
            self.outbound.peer = Some(parse("outbound.peer", v)?);
        }
        if let Some(v) = &o.outbound_peer_id {
            self.outbound.peer_id = Some(parse("outbound.peer_id", v)?);
        }
        if let Some(v) = &o.outbound_protocol {
            self.outbound.protocol = parse("outbound.protocol", v)?;
        }
        if let Some(v) = &o.admin_listen {
            self.admin.listen = parse("admin.listen", v)?;
        }
        if let Some(v) = o.tls_resumption {
            self.tls.resumption = v;
        }
        if let Some(v) = &o.tls_key_exchange {
            self.tls.key_exchange = v
                .split(',')
                .map(|g| parse("tls.key_exchange", g.trim()))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(v) = &o.log_format {
            self.log.format = parse("log.format", v)?;
        }
        if let Some(v) = &o.workload_namespace {
            self.workload.namespace = Some(v.clone());
        }
        if let Some(v) = &o.workload_labels {
            self.workload.labels =
                parse_labels(v).map_err(|reason| invalid("workload.labels", reason))?;
        }
        if let Some(v) = &o.workload_labels_file {
            self.workload.labels_file = Some(v.clone());
        }
        if let Some(v) = &o.policy_source {
            self.policy.source = parse("policy.source", v)?;
        }
        if let Some(v) = &o.policy_dir {
            self.policy.dir = Some(v.clone());
        }
        if let Some(v) = &o.policy_default {
            self.policy.default = parse("policy.default", v)?;
        }
        if let Some(v) = &o.policy_probes {
            self.policy.probes = v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().map_err(|e| invalid("policy.probes", e)))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = &o.opaque_ports {
            self.opaque_ports = v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| match p.parse::<u16>() {
                    Ok(port) if port > 0 => Ok(port),
                    _ => Err(invalid("opaque_ports", format!("{p:?} is not a port"))),
                })
                .collect::<Result<_, _>>()?;
        }
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
pub(crate) fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect()
}

#[cfg(test)]
mod tests;
