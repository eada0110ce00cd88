//! The configuration file's shape: every section and key, each optional,
//! with the documented defaults. Unknown keys are errors (a typo must not
//! silently fall back to a default); `docs/configuration.md` documents
//! each key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_IDENTITY_DIR, DEFAULT_OPAQUE_PORTS};
use crate::identity::SpiffeId;
use crate::policy::{DefaultPolicy, MtlsMode, Probe};
use crate::proxy::ProtocolMode;
use crate::runtime::LogFormat;
use crate::tls::KxGroup;
use crate::units::{serde_bytes, serde_duration, serde_opt_bytes};

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
    pub discovery: DiscoverySection,
    pub jwt: JwtSection,
}

/// Fetching the keys of JWT issuers (RequestAuthentication `jwksUri`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSection {
    /// PEM CA certificates trusted for JWKS servers beside the platform's
    /// roots (an identity provider with a private CA).
    pub extra_ca_file: Option<PathBuf>,
    /// The deadline of one JWKS fetch, redirects included.
    #[serde(with = "serde_duration")]
    pub fetch_timeout: Duration,
}

impl Default for JwtSection {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// The controller's discovery API (cluster mode). Without an address,
/// every destination is its original address.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverySection {
    /// `host:port`; a name is resolved at each connect.
    pub address: Option<String>,
    /// The identity the controller must present; defaults to
    /// `spiffe://<trust domain>/ns/outrider-system/sa/outrider-controller`.
    pub identity: Option<SpiffeId>,
    /// How long a connection to a destination not yet resolved waits for
    /// discovery before going to the original address.
    #[serde(with = "serde_duration")]
    pub first_answer_timeout: Duration,
}

impl Default for DiscoverySection {
    fn default() -> Self {
        Self {
            address: None,
            identity: None,
            first_answer_timeout: Duration::from_secs(1),
        }
    }
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
    /// The pod's name (cluster mode, `policy.source: discovery`).
    pub pod: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySourceKind {
    None,
    Files,
    Kubernetes,
    /// The controller's discovery API (`discovery.address`).
    Discovery,
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
    /// The groups offered and accepted, most preferred first.
    pub key_exchange: Vec<KxGroup>,
    /// Off: `x25519mlkem768` is dropped from `key_exchange` (the switch
    /// for environments that must not use it, without restating the list).
    pub post_quantum: bool,
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
    /// From a new HTTP/1 connection's start to its first request head.
    #[serde(with = "serde_duration")]
    pub request_head_timeout: Duration,
    /// The container's memory limit (the injector passes it through the
    /// downward API); sizes `max_connections` when that is unset.
    #[serde(with = "serde_opt_bytes")]
    pub memory_limit: Option<usize>,
    /// Unset: derived from `memory_limit` (see `super::budget`).
    pub max_connections: Option<usize>,
    /// Unset: half of `max_connections`.
    pub max_plaintext_connections: Option<usize>,
    /// Inbound connections from one source address that have not yet
    /// finished detection or the mTLS handshake.
    pub max_unverified_per_source: usize,
    #[serde(with = "serde_bytes")]
    pub max_header_bytes: usize,
    #[serde(with = "serde_duration")]
    pub app_pool_idle_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub peer_pool_idle_timeout: Duration,
    pub pool_max_idle_per_destination: usize,
    /// Inbound request bodies over this size are refused with 413 (unset:
    /// no limit).
    #[serde(with = "serde_opt_bytes")]
    pub max_request_body: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
}

// === defaults ===

pub(super) fn addr(s: &str) -> SocketAddr {
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
            discovery: DiscoverySection::default(),
            jwt: JwtSection::default(),
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
            key_exchange: KxGroup::DEFAULT.to_vec(),
            post_quantum: true,
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
            request_head_timeout: Duration::from_secs(10),
            memory_limit: None,
            max_request_body: None,
            max_connections: None,
            max_plaintext_connections: None,
            max_unverified_per_source: 128,
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
