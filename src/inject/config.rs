//! What the injector adds, as mesh-wide values (the Helm chart's `proxy`
//! and `init` values, rendered into the controller's ConfigMap) refined by
//! per-pod annotations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{parse_opaque_ports, parse_probes};
use crate::identity::TrustDomain;
use crate::init::backend::Mode as IptablesMode;
use crate::init::rules::{parse_cidrs, parse_ports};
use crate::policy::index::Probe;
use crate::policy::model::{DefaultPolicy, MtlsMode};
use crate::runtime::{LogFormat, check_log_level};
use crate::units::keyword;

/// The annotation prefix; every key below lives under it.
pub const PREFIX: &str = "outrider.dev/";
/// `enabled` or `disabled` on a pod (wins over its namespace's label).
pub const INJECT: &str = "outrider.dev/inject";
/// Set on injected pods, with the proxy version.
pub const INJECTED: &str = "outrider.dev/proxy-version";

/// What a pod asks for with `outrider.dev/inject`, as an annotation (the
/// contract) or as a label (which the API server can select on, so the
/// chart's `label` selection sends only labelled pods to the webhook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodChoice {
    Enabled,
    Disabled,
    Unsaid,
}

/// `disabled` in either place wins (never mesh a pod that says no), then
/// `enabled` in either place; any other value says nothing.
pub fn pod_choice(annotation: Option<&str>, label: Option<&str>) -> PodChoice {
    let said = [annotation, label];
    if said.contains(&Some("disabled")) {
        PodChoice::Disabled
    } else if said.contains(&Some("enabled")) {
        PodChoice::Enabled
    } else {
        PodChoice::Unsaid
    }
}

/// Where the proxy runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+):
    /// starts, and is ready, before the app and other init containers, and
    /// stops after them, so Jobs complete.
    Native,
    /// The first regular container: for clusters without native sidecars.
    Classic,
}

/// Container resources as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyResources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        // Measured: ~11 MiB RSS per proxy under load (docs/performance.md).
        Self {
            cpu_request: Some("10m".into()),
            memory_request: Some("20Mi".into()),
            cpu_limit: None,
            memory_limit: Some("128Mi".into()),
        }
    }
}

/// Where the chart's controller serves discovery when installed in
/// `outrider-system`.
pub const DEFAULT_DISCOVERY_ADDRESS: &str = "outrider-discovery.outrider-system.svc:8090";

/// Mesh-wide injection values.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct InjectConfig {
    pub image: String,
    pub image_pull_policy: String,
    pub trust_domain: String,
    pub sidecar_mode: SidecarMode,
    pub mtls_mode: String,
    pub default_policy: String,
    pub log_level: String,
    pub log_format: String,
    pub proxy_uid: i64,
    pub resources: ProxyResources,
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub skip_outbound_cidrs: String,
    /// Unset: the proxy's built-in list.
    pub opaque_ports: Option<String>,
    /// Inbound request bodies over this size get 413 (`10Mi`); unset: no
    /// limit.
    pub max_request_body: Option<String>,
    /// Whether proxies offer the post-quantum hybrid key exchange
    /// (`tls.post_quantum`); off only where it must not be used.
    pub post_quantum: bool,
    pub iptables_mode: String,
    /// The controller's discovery API (`host:port`) injected proxies
    /// resolve destinations through; unset: no discovery.
    pub discovery_address: Option<String>,
    /// The identity it must present; unset: the proxy's default
    /// (`.../ns/outrider-system/sa/outrider-controller`).
    pub discovery_identity: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!(
                "ghcr.io/outrider-mesh/outrider:{}",
                env!("CARGO_PKG_VERSION")
            ),
            image_pull_policy: "IfNotPresent".into(),
            trust_domain: "cluster.local".into(),
            sidecar_mode: SidecarMode::Native,
            mtls_mode: "permissive".into(),
            default_policy: "allow-all".into(),
            log_level: "info".into(),
            log_format: "plain".into(),
            proxy_uid: 2102,
            resources: ProxyResources::default(),
            skip_inbound_ports: String::new(),
            skip_outbound_ports: String::new(),
            skip_outbound_cidrs: String::new(),
            opaque_ports: None,
            max_request_body: None,
            post_quantum: true,
            iptables_mode: "auto".into(),
            discovery_address: Some(DEFAULT_DISCOVERY_ADDRESS.into()),
            discovery_identity: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    /// The value or annotation at fault, e.g. `outrider.dev/opaque-ports`.
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl ToString) -> ValueError {
    ValueError {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

impl InjectConfig {
    /// Checks every value with the parser the proxy and `init` will use on
    /// it, so a bad value fails at install, not in every pod.
    pub fn validate(&self) -> Result<(), ValueError> {
        TrustDomain::parse(&self.trust_domain).map_err(|e| bad("trustDomain", e))?;
        if self.image.trim().is_empty() {
            return Err(bad("image", "must not be empty"));
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(bad(
                "imagePullPolicy",
                "expected Always, IfNotPresent or Never",
            ));
        }
        keyword::<MtlsMode>(&self.mtls_mode).map_err(|e| bad("mtlsMode", e))?;
        keyword::<DefaultPolicy>(&self.default_policy).map_err(|e| bad("defaultPolicy", e))?;
        keyword::<LogFormat>(&self.log_format).map_err(|e| bad("logFormat", e))?;
        check_log_level(&self.log_level).map_err(|e| bad("logLevel", e))?;
        if !(1..=i64::from(u32::MAX)).contains(&self.proxy_uid) {
            return Err(bad("proxyUid", "must be a non-root UID"));
        }
        parse_ports(&self.skip_inbound_ports).map_err(|e| bad("skipInboundPorts", e))?;
        parse_ports(&self.skip_outbound_ports).map_err(|e| bad("skipOutboundPorts", e))?;
        parse_cidrs(&self.skip_outbound_cidrs).map_err(|e| bad("skipOutboundCidrs", e))?;
        if let Some(ports) = &self.opaque_ports {
            parse_opaque_ports(ports).map_err(|e| bad("opaquePorts", e))?;
        }
        if let Some(size) = &self.max_request_body {
            crate::units::parse_bytes(size).map_err(|e| bad("maxRequestBody", e))?;
        }
        self.iptables_mode
            .parse::<IptablesMode>()
            .map_err(|e| bad("iptablesMode", e))?;
        if let Some(address) = &self.discovery_address {
            let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(bad("discoveryAddress", "expected host:port"));
            }
        }
        if let Some(identity) = &self.discovery_identity {
            let id = crate::identity::SpiffeId::parse(identity)
                .map_err(|e| bad("discoveryIdentity", e))?;
            if id.trust_domain_str() != self.trust_domain {
                return Err(bad("discoveryIdentity", "not in trustDomain"));
            }
        }
        Ok(())
    }
}

/// The values for one pod: the mesh's, with its annotations applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub mesh: InjectConfig,
    /// Extra probe exemptions the pod asks for (`outrider.dev/probes`).
    pub extra_probes: Vec<Probe>,
}

/// Applies the pod's `outrider.dev/*` annotations. An unknown key under
/// our prefix or a bad value is an error: silently ignoring a mistyped
/// `skip-inbound-ports` would leave a port captured that the operator
/// meant to bypass (or the reverse).
pub fn pod_settings(
    mesh: &InjectConfig,
    annotations: &BTreeMap<String, String>,
) -> Result<PodSettings, ValueError> {
    let mut settings = PodSettings {
        mesh: mesh.clone(),
        extra_probes: Vec::new(),
    };
    let m = &mut settings.mesh;
    for (key, value) in annotations {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let value = value.trim().to_string();
        match name {
            "inject" => {
                if !matches!(value.as_str(), "enabled" | "disabled") {
                    return Err(bad(key, "expected enabled or disabled"));
                }
            }
            "proxy-version" => {}
            "sidecar-mode" => m.sidecar_mode = keyword(&value).map_err(|e| bad(key, e))?,
            "skip-inbound-ports" => m.skip_inbound_ports = value,
            "skip-outbound-ports" => m.skip_outbound_ports = value,
            "skip-outbound-cidrs" => m.skip_outbound_cidrs = value,
            "opaque-ports" => m.opaque_ports = Some(value),
            "max-request-body" => m.max_request_body = Some(value),
            "log-level" => m.log_level = value,
            "default-policy" => m.default_policy = value,
            "proxy-cpu-request" => m.resources.cpu_request = Some(value),
            "proxy-memory-request" => m.resources.memory_request = Some(value),
            "proxy-cpu-limit" => m.resources.cpu_limit = Some(value),
            "proxy-memory-limit" => m.resources.memory_limit = Some(value),
            "probes" => settings.extra_probes = parse_probes(&value).map_err(|e| bad(key, e))?,
            _ => return Err(bad(key, "unknown outrider annotation")),
        }
    }
    // Re-check with the annotations' names in the error.
    let m = &settings.mesh;
    parse_ports(&m.skip_inbound_ports).map_err(|e| bad("outrider.dev/skip-inbound-ports", e))?;
    parse_ports(&m.skip_outbound_ports).map_err(|e| bad("outrider.dev/skip-outbound-ports", e))?;
    parse_cidrs(&m.skip_outbound_cidrs).map_err(|e| bad("outrider.dev/skip-outbound-cidrs", e))?;
    if let Some(ports) = &m.opaque_ports {
        parse_opaque_ports(ports).map_err(|e| bad("outrider.dev/opaque-ports", e))?;
    }
    if let Some(size) = &m.max_request_body {
        crate::units::parse_bytes(size).map_err(|e| bad("outrider.dev/max-request-body", e))?;
    }
    keyword::<DefaultPolicy>(&m.default_policy)
        .map_err(|e| bad("outrider.dev/default-policy", e))?;
    check_log_level(&m.log_level).map_err(|e| bad("outrider.dev/log-level", e))?;
    for (field, quantity) in [
        ("outrider.dev/proxy-cpu-request", &m.resources.cpu_request),
        (
            "outrider.dev/proxy-memory-request",
            &m.resources.memory_request,
        ),
        ("outrider.dev/proxy-cpu-limit", &m.resources.cpu_limit),
        ("outrider.dev/proxy-memory-limit", &m.resources.memory_limit),
    ] {
        if let Some(q) = quantity
            && !is_quantity(q)
        {
            return Err(bad(field, format!("{q:?} is not a Kubernetes quantity")));
        }
    }
    Ok(settings)
}

/// A Kubernetes resource quantity: a decimal number with an optional
/// suffix (`100m`, `0.5`, `64Mi`, `1G`, `1e3`).
fn is_quantity(q: &str) -> bool {
    let digits_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|exp| {
        !exp.is_empty()
            && exp
                .trim_start_matches(['+', '-'])
                .chars()
                .all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pod_opts_out_or_in_by_annotation_or_label_and_no_wins() {
        use super::{PodChoice, pod_choice};
        let table = [
            (None, None, PodChoice::Unsaid),
            (Some("enabled"), None, PodChoice::Enabled),
            (None, Some("enabled"), PodChoice::Enabled),
            (Some("disabled"), None, PodChoice::Disabled),
            (None, Some("disabled"), PodChoice::Disabled),
            (Some("enabled"), Some("disabled"), PodChoice::Disabled),
            (Some("disabled"), Some("enabled"), PodChoice::Disabled),
            (Some("yes"), None, PodChoice::Unsaid),
        ];
        for (annotation, label, choice) in table {
            assert_eq!(
                pod_choice(annotation, label),
                choice,
                "{annotation:?} {label:?}"
            );
        }
    }

    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(InjectConfig::default().validate(), Ok(()));
    }

    #[test]
    fn bad_mesh_values_are_named() {
        let config = InjectConfig {
            default_policy: "allow-some".into(),
            ..InjectConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field, "defaultPolicy");
        let config = InjectConfig {
            skip_outbound_cidrs: "10.0.0.0/40".into(),
            ..InjectConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field, "skipOutboundCidrs");
        let config = InjectConfig {
            proxy_uid: 0,
            ..InjectConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field, "proxyUid");
    }

    #[test]
    fn annotations_override_the_mesh_values_for_one_pod() {
        let settings = pod_settings(
            &InjectConfig::default(),
            &annotations(&[
                ("outrider.dev/skip-inbound-ports", "22"),
                ("outrider.dev/opaque-ports", "3306, 9042"),
                ("outrider.dev/default-policy", "deny"),
                ("outrider.dev/proxy-memory-limit", "256Mi"),
                ("outrider.dev/sidecar-mode", "classic"),
                ("outrider.dev/probes", "9000/ping"),
                ("outrider.dev/max-request-body", "10Mi"),
                ("example.com/unrelated", "kept"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.mesh.max_request_body.as_deref(), Some("10Mi"));
        assert_eq!(settings.mesh.skip_inbound_ports, "22");
        assert_eq!(settings.mesh.opaque_ports.as_deref(), Some("3306, 9042"));
        assert_eq!(settings.mesh.default_policy, "deny");
        assert_eq!(
            settings.mesh.resources.memory_limit.as_deref(),
            Some("256Mi")
        );
        assert_eq!(settings.mesh.sidecar_mode, SidecarMode::Classic);
        assert_eq!(
            settings.extra_probes,
            vec![Probe {
                port: 9000,
                path: Some("/ping".into())
            }]
        );
    }

    #[test]
    fn a_mistyped_or_invalid_annotation_is_an_error_not_ignored() {
        for (key, value) in [
            ("outrider.dev/skip-inbound-port", "22"),
            ("outrider.dev/skip-inbound-ports", "ssh"),
            ("outrider.dev/opaque-ports", "0"),
            ("outrider.dev/default-policy", "allow"),
            ("outrider.dev/proxy-cpu-limit", "lots"),
            ("outrider.dev/inject", "yes"),
            ("outrider.dev/probes", "/healthz"),
            ("outrider.dev/log-level", "outrider=loud"),
            ("outrider.dev/max-request-body", "10 megabytes"),
        ] {
            let err =
                pod_settings(&InjectConfig::default(), &annotations(&[(key, value)])).unwrap_err();
            assert_eq!(err.field, key, "{key}={value}: {err}");
        }
    }

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for ok in ["100m", "0.5", "64Mi", "1G", "1e3", "2"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "64MB", "lots", "-1", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
