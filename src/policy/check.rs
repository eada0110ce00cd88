//! `outrider policy check`: explains an authorization decision offline,
//! from the same YAML that would be applied with kubectl.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::authz::{AuditMatch, Decider, Http, Request, authorize};
use super::index::{Settings, Workload, compile};
use super::jwt::VerifiedToken;
use super::model::{Kind, PeerAuth, Policy};
use super::objects::{ObjectSet, parse_documents};
use crate::identity::SpiffeId;

pub mod token;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: super::objects::ParseError,
    },
}

/// The request to explain.
pub struct Question {
    pub workload: Workload,
    pub settings: Settings,
    pub peer: Option<SpiffeId>,
    pub source: IpAddr,
    pub port: u16,
    pub http: Option<(String, String)>,
    /// The request's verified token (from `--jwt`, or made up of
    /// `--request-principal` and `--claim`).
    pub token: Option<VerifiedToken>,
}

/// The answer, with its reasons.
#[derive(Debug)]
pub struct Answer {
    pub allowed: bool,
    pub by: Decider,
    /// The request was judged as an opaque TCP connection (no method and
    /// path given), where HTTP conditions never allow and always deny.
    pub opaque: bool,
    pub audits: Vec<AuditMatch>,
    /// Invalid objects and what their fail-safe form is.
    pub warnings: Vec<String>,
    pub policies_in_force: usize,
}

/// Reads every `*.yaml`/`*.yml`/`*.json` of a directory, or the file given.
pub fn load(paths: &[PathBuf], default_namespace: &str) -> Result<ObjectSet, CheckError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| CheckError::Read {
                path: path.clone(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| is_policy_file(p))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut set = ObjectSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| CheckError::Read {
            path: file.clone(),
            source,
        })?;
        let objects =
            parse_documents(&text, default_namespace).map_err(|source| CheckError::Parse {
                path: file.clone(),
                source,
            })?;
        for object in objects {
            set.insert(
                (object.kind, object.namespace.clone(), object.name.clone()),
                object,
            );
        }
    }
    Ok(set)
}

fn is_policy_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !name.starts_with('.')
        && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
}

pub fn check(objects: &ObjectSet, question: &Question) -> Answer {
    let mut warnings = Vec::new();
    let mut policies = Vec::new();
    let mut peer_auths = Vec::new();
    for object in objects.values() {
        match object.kind {
            Kind::AuthorizationPolicy => {
                let policy = Policy::from_object(object);
                if !policy.is_valid() {
                    warnings.push(format!(
                        "{} is invalid ({}); applying its fail-safe form",
                        policy.id,
                        policy.problems.join("; ")
                    ));
                }
                policies.push(Arc::new(policy));
            }
            Kind::PeerAuthentication => peer_auths.push(PeerAuth::from_object(object)),
            // Token checks are explained from what the request carries
            // (see `Question`), not from the keys.
            Kind::RequestAuthentication | Kind::LocalRateLimitPolicy => {}
        }
    }
    let compiled = compile(
        &question.workload,
        &question.settings,
        &policies,
        &peer_auths,
        true,
    );
    let request = Request {
        peer: question.peer.as_ref(),
        source: question.source,
        port: question.port,
        http: question.http.as_ref().map(|(method, path)| Http {
            method,
            path,
            token: question.token.as_ref(),
        }),
    };
    let policies_in_force = compiled.deny.len() + compiled.allow.len() + compiled.audit.len();
    let opaque = request.http.is_none();
    let (allowed, by, audits) = match authorize(&compiled, &request) {
        Ok(permit) => (true, permit.by, permit.audits),
        Err(denied) => (false, denied.by, denied.audits),
    };
    Answer {
        allowed,
        by,
        opaque,
        audits,
        warnings,
        policies_in_force,
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", if self.allowed { "ALLOW" } else { "DENY" })?;
        let reason = match &self.by {
            Decider::StrictMtls => {
                "mTLS is STRICT on this port and the caller is unauthenticated".to_string()
            }
            Decider::Policy { id, rule } => format!("policy {id}, rules[{rule}]"),
            Decider::NoAllowMatched => {
                "ALLOW policies select the workload and none matched".to_string()
            }
            Decider::Default(d) => {
                format!("the mesh default ({d}); no ALLOW policy selects the workload")
            }
            Decider::Probe => "a kubelet probe exemption".to_string(),
            Decider::NotSynced => "no policy received yet".to_string(),
        };
        writeln!(f, "  decided by: {reason}")?;
        if self.opaque {
            writeln!(
                f,
                "  judged as opaque TCP: rules with methods or paths never allow it and always deny it"
            )?;
        }
        for audit in &self.audits {
            writeln!(
                f,
                "  audit: policy {}, rules[{}] matched",
                audit.id, audit.rule
            )?;
        }
        writeln!(
            f,
            "  policies selecting the workload: {}",
            self.policies_in_force
        )?;
        for warning in &self.warnings {
            writeln!(f, "  warning: {warning}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{DefaultPolicy, MtlsMode};

    const PAYMENTS: &str = "
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{principals: [cluster.local/ns/shop/sa/orders]}]
    to: [{methods: [POST]}]
---
apiVersion: security.outrider.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  portLevelMtls: {\"9090\": {mode: STRICT}}
";

    fn objects(yaml: &str) -> ObjectSet {
        parse_documents(yaml, "shop")
            .unwrap()
            .into_iter()
            .map(|o| ((o.kind, o.namespace.clone(), o.name.clone()), o))
            .collect()
    }

    fn question(peer: Option<&str>, port: u16, http: Option<(&str, &str)>) -> Question {
        Question {
            workload: Workload {
                namespace: "shop".into(),
                labels: BTreeMap::from([("app".into(), "payments".into())]),
            },
            settings: Settings {
                default: DefaultPolicy::AllowAll,
                mtls: MtlsMode::Permissive,
                probes: Vec::new(),
            },
            peer: peer.map(|p| SpiffeId::parse(p).unwrap()),
            source: "10.0.0.1".parse().unwrap(),
            port,
            http: http.map(|(m, p)| (m.to_string(), p.to_string())),
            token: None,
        }
    }

    #[test]
    fn names_the_deciding_rule_and_defaults_the_namespace() {
        let answer = check(
            &objects(PAYMENTS),
            &question(
                Some("spiffe://cluster.local/ns/shop/sa/orders"),
                8080,
                Some(("POST", "/pay")),
            ),
        );
        assert!(answer.allowed);
        assert_eq!(
            answer.by,
            Decider::Policy {
                id: "shop/payments".into(),
                rule: 0
            }
        );
        assert!(!answer.opaque);
    }

    #[test]
    fn without_method_and_path_the_request_is_judged_as_opaque_tcp() {
        let answer = check(
            &objects(PAYMENTS),
            &question(Some("spiffe://cluster.local/ns/shop/sa/orders"), 8080, None),
        );
        assert!(!answer.allowed);
        assert!(answer.opaque);
        assert!(answer.to_string().contains("opaque TCP"));
    }

    #[test]
    fn plaintext_on_a_strict_port_is_refused_before_any_policy() {
        let answer = check(
            &objects(PAYMENTS),
            &question(None, 9090, Some(("POST", "/"))),
        );
        assert_eq!((answer.allowed, answer.by), (false, Decider::StrictMtls));
        let answer = check(
            &objects(PAYMENTS),
            &question(None, 8080, Some(("POST", "/"))),
        );
        assert_eq!(
            answer.by,
            Decider::NoAllowMatched,
            "port 8080 stays permissive, so the ALLOW policy decides"
        );
    }

    #[test]
    fn an_invalid_object_is_reported_and_explained_in_its_fail_safe_form() {
        let broken = PAYMENTS.replace("methods: [POST]", "methods: [post]");
        let answer = check(
            &objects(&broken),
            &question(
                Some("spiffe://cluster.local/ns/shop/sa/orders"),
                8080,
                Some(("POST", "/pay")),
            ),
        );
        assert!(!answer.allowed, "a broken ALLOW matches nothing");
        assert_eq!(answer.warnings.len(), 1, "{:?}", answer.warnings);
        assert!(answer.warnings[0].contains("shop/payments"));
    }

    #[test]
    fn load_reads_policy_files_in_order_and_names_the_file_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), PAYMENTS).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "not yaml: [").unwrap();
        let set = load(&[dir.path().to_path_buf()], "shop").unwrap();
        assert_eq!(set.len(), 2);

        std::fs::write(dir.path().join("b.yml"), "kind: [").unwrap();
        let error = load(&[dir.path().to_path_buf()], "shop").unwrap_err();
        assert!(error.to_string().contains("b.yml"), "{error}");
        let error = load(&[dir.path().join("missing.yaml")], "shop").unwrap_err();
        assert!(matches!(error, CheckError::Read { .. }));
    }
}
