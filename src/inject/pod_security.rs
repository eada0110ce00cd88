//! The Pod Security Standards against what injection adds: which level a
//! namespace enforces (`pod-security.kubernetes.io/enforce`), and which
//! of that level's checks the injected containers fail, so the injector
//! can refuse such a pod with a message that says what to do instead of
//! leaving the PodSecurity admission plugin to reject it after injection
//! with a message about a container the user never wrote.
//!
//! Only the checks that a container's or the pod's security context can
//! fail are here (privileged, capabilities, privilege escalation, running
//! as root, seccomp): injection adds no host namespaces, host paths, host
//! ports, sysctls or volume types the standards forbid. The app's own
//! containers are not judged: PodSecurity does that itself.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSecurityContext};

/// The namespace label PodSecurity admission enforces.
pub const ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// The capabilities `baseline` lets a container add (Kubernetes' list).
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// What the injector does with a pod the enforced level would reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Refuse it, saying why and what to do (the default: PodSecurity
    /// would reject it anyway, with a less helpful message).
    Refuse,
    /// Inject it and return the message as an admission warning (for a
    /// namespace exempted in the PodSecurity admission configuration,
    /// which the injector cannot see).
    Warn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        })
    }
}

/// The level a namespace enforces, from its labels. An unreadable value
/// counts as `restricted`, as PodSecurity admission itself treats it.
pub fn enforced(labels: &BTreeMap<String, String>) -> Level {
    match labels.get(ENFORCE).map(String::as_str) {
        None | Some("privileged") => Level::Privileged,
        Some("baseline") => Level::Baseline,
        Some(_) => Level::Restricted,
    }
}

/// One failed check, in one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub container: String,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Privileged,
    /// Capabilities added beyond what the level allows.
    AddsCapabilities(Vec<String>),
    /// `restricted`: `capabilities.drop` must contain ALL.
    KeepsCapabilities,
    /// `restricted`: `allowPrivilegeEscalation` must be false.
    MayEscalate,
    /// `restricted`: runAsNonRoot must be true and runAsUser not 0.
    RunsAsRoot,
    /// `baseline`: not Unconfined; `restricted`: RuntimeDefault or Localhost.
    Seccomp,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.container;
        match &self.check {
            Check::Privileged => write!(f, "container {c} is privileged"),
            Check::AddsCapabilities(caps) => {
                write!(f, "container {c} adds capabilities {}", caps.join(", "))
            }
            Check::KeepsCapabilities => write!(f, "container {c} does not drop ALL capabilities"),
            Check::MayEscalate => write!(f, "container {c} allows privilege escalation"),
            Check::RunsAsRoot => write!(f, "container {c} runs as root"),
            Check::Seccomp => write!(f, "container {c} has no allowed seccomp profile"),
        }
    }
}

/// The checks of `level` that `containers` fail in a pod with `pod`'s
/// security context (a container's own settings win over the pod's).
pub fn violations(
    level: Level,
    pod: Option<&PodSecurityContext>,
    containers: &[&Container],
) -> Vec<Violation> {
    if level == Level::Privileged {
        return Vec::new();
    }
    let mut found = Vec::new();
    for container in containers {
        let context = container.security_context.clone().unwrap_or_default();
        let mut fail = |check| {
            found.push(Violation {
                container: container.name.clone(),
                check,
            })
        };
        if context.privileged == Some(true) {
            fail(Check::Privileged);
        }
        let capabilities = context.capabilities.clone().unwrap_or_default();
        let allowed: &[&str] = match level {
            Level::Restricted => &["NET_BIND_SERVICE"],
            _ => BASELINE_CAPABILITIES,
        };
        let beyond: Vec<String> = capabilities
            .add
            .iter()
            .flatten()
            .filter(|cap| !allowed.contains(&cap.as_str()))
            .cloned()
            .collect();
        if !beyond.is_empty() {
            fail(Check::AddsCapabilities(beyond));
        }
        let seccomp = context
            .seccomp_profile
            .as_ref()
            .or_else(|| pod.and_then(|p| p.seccomp_profile.as_ref()))
            .map(|profile| profile.type_.as_str());
        if seccomp == Some("Unconfined") {
            fail(Check::Seccomp);
        }
        if level < Level::Restricted {
            continue;
        }
        if !capabilities.drop.iter().flatten().any(|cap| cap == "ALL") {
            fail(Check::KeepsCapabilities);
        }
        if context.allow_privilege_escalation != Some(false) {
            fail(Check::MayEscalate);
        }
        let non_root = context
            .run_as_non_root
            .or_else(|| pod.and_then(|p| p.run_as_non_root));
        let user = context
            .run_as_user
            .or_else(|| pod.and_then(|p| p.run_as_user));
        if non_root != Some(true) || user == Some(0) {
            fail(Check::RunsAsRoot);
        }
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            fail(Check::Seccomp);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, SecurityContext};

    use super::*;

    fn labels(level: Option<&str>) -> BTreeMap<String, String> {
        level
            .map(|l| BTreeMap::from([(ENFORCE.to_string(), l.to_string())]))
            .unwrap_or_default()
    }

    fn container(name: &str, context: SecurityContext) -> Container {
        Container {
            name: name.into(),
            security_context: Some(context),
            ..Container::default()
        }
    }

    fn hardened() -> SecurityContext {
        SecurityContext {
            run_as_user: Some(2102),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }
    }

    fn iptables() -> SecurityContext {
        SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..hardened()
        }
    }

    #[test]
    fn the_enforced_level_comes_from_the_label_and_nonsense_is_restricted() {
        assert_eq!(enforced(&labels(None)), Level::Privileged);
        assert_eq!(enforced(&labels(Some("privileged"))), Level::Privileged);
        assert_eq!(enforced(&labels(Some("baseline"))), Level::Baseline);
        assert_eq!(enforced(&labels(Some("restricted"))), Level::Restricted);
        assert_eq!(enforced(&labels(Some("Baseline "))), Level::Restricted);
    }

    #[test]
    fn an_iptables_init_container_fails_baseline_on_its_capabilities_and_restricted_on_root_too() {
        let init = container("outrider-init", iptables());
        assert!(violations(Level::Privileged, None, &[&init]).is_empty());
        let caps = Check::AddsCapabilities(vec!["NET_ADMIN".into(), "NET_RAW".into()]);
        let baseline = violations(Level::Baseline, None, &[&init]);
        assert_eq!(
            baseline,
            [Violation {
                container: "outrider-init".into(),
                check: caps.clone()
            }]
        );
        assert_eq!(
            baseline[0].to_string(),
            "container outrider-init adds capabilities NET_ADMIN, NET_RAW"
        );
        let restricted: Vec<Check> = violations(Level::Restricted, None, &[&init])
            .into_iter()
            .map(|v| v.check)
            .collect();
        assert_eq!(restricted, [caps, Check::RunsAsRoot]);
    }

    #[test]
    fn a_hardened_proxy_container_passes_restricted() {
        let proxy = container("outrider-proxy", hardened());
        assert!(violations(Level::Restricted, None, &[&proxy]).is_empty());
    }

    #[test]
    fn each_restricted_check_fails_on_its_own_and_the_pod_context_counts() {
        let cases: [(SecurityContext, Check); 5] = [
            (
                SecurityContext {
                    allow_privilege_escalation: None,
                    ..hardened()
                },
                Check::MayEscalate,
            ),
            (
                SecurityContext {
                    capabilities: None,
                    ..hardened()
                },
                Check::KeepsCapabilities,
            ),
            (
                SecurityContext {
                    run_as_non_root: None,
                    ..hardened()
                },
                Check::RunsAsRoot,
            ),
            (
                SecurityContext {
                    seccomp_profile: None,
                    ..hardened()
                },
                Check::Seccomp,
            ),
            (
                SecurityContext {
                    privileged: Some(true),
                    ..hardened()
                },
                Check::Privileged,
            ),
        ];
        for (context, check) in cases {
            let c = container("c", context);
            let checks: Vec<Check> = violations(Level::Restricted, None, &[&c])
                .into_iter()
                .map(|v| v.check)
                .collect();
            assert_eq!(checks, std::slice::from_ref(&check), "{check:?}");
        }
        // The pod's runAsNonRoot and seccomp profile stand in for the
        // container's.
        let bare = container(
            "c",
            SecurityContext {
                run_as_non_root: None,
                seccomp_profile: None,
                ..hardened()
            },
        );
        let pod = PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        };
        assert!(violations(Level::Restricted, Some(&pod), &[&bare]).is_empty());
        // Unconfined fails baseline too.
        let unconfined = container(
            "c",
            SecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "Unconfined".into(),
                    localhost_profile: None,
                }),
                ..hardened()
            },
        );
        assert_eq!(
            violations(Level::Baseline, None, &[&unconfined])[0].check,
            Check::Seccomp
        );
    }
}
