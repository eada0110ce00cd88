//! The proxy's configuration: a YAML file ([`file`]), overridden by flags
//! and environment variables ([`overrides`]), checked and parsed once into
//! the typed values each component runs with ([`Config`]).
//!
//! Every field has a default except the workload's own SPIFFE ID, and
//! every error names the offending field. `docs/configuration.md`
//! documents each key.

mod budget;
mod file;
mod overrides;
mod ranges;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::file::{
    AdminSection, DiscoverySection, FileConfig, IdentitySection, InboundSection, LimitsSection,
    LogSection, OutboundSection, PolicySection, PolicySourceKind, TlsSection, WorkloadSection,
};
pub use self::overrides::Overrides;
pub use self::ranges::MAX_CONNECTIONS;
use crate::identity::SpiffeId;
use crate::identity::reload::ReloadConfig;
use crate::policy::{Probe, Settings, Workload};
use crate::proxy::discover::DiscoveryConfig;
use crate::proxy::{
    InboundConfig, InboundTarget, JwksSettings, Limits, OutboundConfig, OutboundTarget, ProxyConfig,
};
use crate::runtime::check_log_level;
use crate::tls::{KxGroup, TlsSettings};
use crate::units::{list, port};

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

/// Where policies come from, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    None,
    Files(PathBuf),
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
    /// Over the discovery API, for this pod (of `workload.namespace`).
    Discovery {
        pod: String,
    },
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
        let value = crate::yaml::value(text).map_err(|e| invalid("(file)", e.to_string()))?;
        serde_path_to_error::deserialize(value).map_err(|e| {
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
        self.check_ranges()?;
        if self.tls.key_exchange.is_empty() {
            return Err(invalid("tls.key_exchange", "needs at least one group"));
        }
        if KxGroup::offered(&self.tls.key_exchange, self.tls.post_quantum).is_empty() {
            return Err(invalid(
                "tls.post_quantum",
                "off leaves no group in tls.key_exchange: add x25519",
            ));
        }
        if self.outbound.peer_id.is_some() && self.outbound.peer.is_none() {
            return Err(invalid(
                "outbound.peer_id",
                "only meaningful with outbound.peer",
            ));
        }
        if let Some(peer_id) = &self.outbound.peer_id
            && peer_id.trust_domain_str() != id.trust_domain_str()
        {
            return Err(invalid(
                "outbound.peer_id",
                format!(
                    "trust domain differs from identity.id ({})",
                    id.trust_domain_str()
                ),
            ));
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
        check_log_level(&self.log.level).map_err(|e| invalid("log.level", e))?;
        let policy = self.policy_config(&id)?;
        let discovery = self.discovery_config(&id)?;
        let jwks = self.jwks_settings()?;

        let max_connections = self
            .limits
            .max_connections
            .unwrap_or_else(|| budget::max_connections(self.limits.memory_limit));
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
                request_head_timeout: self.limits.request_head_timeout,
                max_connections,
                max_plaintext_connections: self
                    .limits
                    .max_plaintext_connections
                    .unwrap_or_else(|| budget::plaintext_share(max_connections))
                    .min(max_connections),
                max_unverified_per_source: self.limits.max_unverified_per_source,
                max_header_bytes: self.limits.max_header_bytes,
                app_pool_idle_timeout: self.limits.app_pool_idle_timeout,
                // A pooled connection must be retired before the peer's idle
                // timeout (the same setting, mesh-wide) closes it under us.
                peer_pool_idle_timeout: self
                    .limits
                    .peer_pool_idle_timeout
                    .min(self.limits.idle_timeout / 2),
                pool_max_idle_per_destination: self.limits.pool_max_idle_per_destination,
                max_request_body: self.limits.max_request_body.map(|b| b as u64),
            },
            discovery,
            jwks,
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
                key_exchange: KxGroup::offered(&self.tls.key_exchange, self.tls.post_quantum),
            },
            admin_listen: self.admin.listen,
            shutdown_grace_period: self.shutdown_grace_period,
            log: self.log.clone(),
            policy,
            effective: self,
        })
    }

    fn jwks_settings(&self) -> Result<JwksSettings, ConfigError> {
        use rustls_pki_types::pem::PemObject;
        let extra_roots = match &self.jwt.extra_ca_file {
            None => Vec::new(),
            Some(path) => {
                let roots = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        invalid("jwt.extra_ca_file", format!("{}: {e}", path.display()))
                    })?;
                if roots.is_empty() {
                    return Err(invalid(
                        "jwt.extra_ca_file",
                        format!("{}: no certificate", path.display()),
                    ));
                }
                roots
            }
        };
        if self.jwt.fetch_timeout.is_zero() {
            return Err(invalid("jwt.fetch_timeout", "must be more than zero"));
        }
        Ok(JwksSettings {
            extra_roots,
            fetch_timeout: self.jwt.fetch_timeout,
        })
    }

    fn discovery_config(&self, id: &SpiffeId) -> Result<Option<DiscoveryConfig>, ConfigError> {
        let Some(address) = &self.discovery.address else {
            return Ok(None);
        };
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| invalid("discovery.address", "expected host:port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid("discovery.address", "expected host:port"));
        }
        let server_id = match &self.discovery.identity {
            Some(server_id) => server_id.clone(),
            None => SpiffeId::parse(&format!(
                "spiffe://{}/ns/outrider-system/sa/outrider-controller",
                id.trust_domain_str()
            ))
            .map_err(|e| invalid("discovery.identity", e.to_string()))?,
        };
        if server_id.trust_domain_str() != id.trust_domain_str() {
            return Err(invalid(
                "discovery.identity",
                format!(
                    "trust domain differs from identity.id ({})",
                    id.trust_domain_str()
                ),
            ));
        }
        Ok(Some(DiscoveryConfig {
            authority: address.clone(),
            address: address.clone(),
            server_id,
            first_answer_timeout: self.discovery.first_answer_timeout,
        }))
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
            PolicySourceKind::Discovery => {
                if self.discovery.address.is_none() {
                    return Err(invalid(
                        "policy.source",
                        "discovery needs discovery.address",
                    ));
                }
                let pod = self
                    .workload
                    .pod
                    .clone()
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| {
                        invalid("workload.pod", "required with policy.source: discovery")
                    })?;
                PolicySource::Discovery { pod }
            }
        };
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
