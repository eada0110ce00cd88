//! The injection webhook: AdmissionReview v1 in, AdmissionReview v1 out,
//! over HTTPS with a serving certificate from the mesh CA.
//!
//! [`review`] is pure: a request body and the path it came on to the
//! response body. Two paths, one per webhook in the chart's
//! MutatingWebhookConfiguration: `/inject/namespace` for pods in
//! namespaces labelled `outrider.dev/inject=enabled` (inject unless the pod
//! says `disabled`), `/inject/pod` for every other namespace (inject only
//! pods that opt in with `outrider.dev/inject: enabled`, as an annotation
//! or a label: [`pod_choice`]). Anything malformed is
//! answered with a denial and its reason, never with a 500.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::metrics::ControllerMetrics;
use crate::inject::config::{INJECT, PodChoice, pod_choice};
use crate::inject::pod_security::{self, ENFORCE, Level, Violation};
use crate::inject::{InjectConfig, InjectedPod, Outcome, inject_pod, pod_security_violations};
use crate::listener::{Caps, accept_loop};

pub const NAMESPACE_PATH: &str = "/inject/namespace";
pub const POD_PATH: &str = "/inject/pod";
/// The API server sends at most a few MiB; anything bigger is not a pod.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// The port is reachable from the whole cluster: a peer gets this long
/// for its TLS handshake, its request head, and its body, and only this
/// many connections are served at once (more are closed on accept).
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Deserialize)]
struct Review {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    request: Option<ReviewRequest>,
}

#[derive(Debug, Deserialize)]
struct ReviewRequest {
    uid: String,
    kind: Gvk,
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Gvk {
    #[serde(default)]
    group: String,
    kind: String,
}

/// How a review ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped,
    Denied,
    /// Refused because the namespace's Pod Security level would reject
    /// the injected pod.
    PodSecurity,
    Malformed,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::PodSecurity => "pod_security",
            Verdict::Malformed => "malformed",
        }
    }
}

fn response(uid: &str, allowed: bool, message: Option<&str>, patch: Option<&[u8]>) -> Value {
    let mut response = json!({"uid": uid, "allowed": allowed});
    // An allowed review's message is a warning (kubectl prints it).
    if allowed && let Some(message) = message {
        response["warnings"] = json!([message]);
        return review_with(response, patch);
    }
    if let Some(message) = message {
        response["status"] = json!({"code": 400, "message": message});
    }
    review_with(response, patch)
}

fn review_with(mut response: Value, patch: Option<&[u8]>) -> Value {
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// A denial for a request that carries no uid to echo (unreadable, not a
/// review, or a review without a request).
fn refuse_unread(message: &str) -> (Value, Verdict) {
    (response("", false, Some(message), None), Verdict::Malformed)
}

/// The level a namespace enforces, when known.
pub type LevelOf = dyn Fn(&str) -> Option<Level> + Send + Sync;

/// What the webhook knows of each namespace's enforced Pod Security
/// level, and what it does with a pod that level would reject.
pub struct PodSecurityGate {
    pub response: pod_security::Response,
    /// The level a namespace enforces, when known (the namespace cache).
    pub levels: Box<LevelOf>,
}

impl PodSecurityGate {
    /// Knows no namespace: nothing is checked (PodSecurity still is).
    pub fn unknown() -> Self {
        Self {
            response: pod_security::Response::Refuse,
            levels: Box::new(|_| None),
        }
    }
}

/// The refusal (or warning) for a pod `level` would reject.
fn pod_security_message(namespace: &str, level: Level, violations: &[Violation]) -> String {
    let found: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!(
        "outrider injector: namespace {namespace} enforces Pod Security \"{level}\" \
         ({ENFORCE}), which rejects the injected pod: {}. outrider-init needs root with \
         NET_ADMIN and NET_RAW to redirect the pod's traffic with iptables. Label the \
         namespace {ENFORCE}=privileged, exempt it in the PodSecurity admission \
         configuration, or opt the pod out with outrider.dev/inject=disabled \
         (docs/install.md, \"Pod Security\")",
        found.join("; ")
    )
}

/// Answers one AdmissionReview.
pub fn review(
    body: &[u8],
    path: &str,
    mesh: &InjectConfig,
    gate: &PodSecurityGate,
) -> (Value, Verdict) {
    let review: Review = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(e) => {
            return refuse_unread(&format!("outrider injector: not an AdmissionReview: {e}"));
        }
    };
    let Some(request) = review.request else {
        return refuse_unread("outrider injector: the AdmissionReview has no request");
    };
    let uid = request.uid.as_str();
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        let message = format!(
            "outrider injector: expected admission.k8s.io/v1 AdmissionReview, got {} {}",
            review.api_version, review.kind
        );
        return (
            response(uid, false, Some(&message), None),
            Verdict::Malformed,
        );
    }
    // Only pod creation is ours; anything else is let through untouched.
    if !request.kind.group.is_empty() || request.kind.kind != "Pod" || request.operation != "CREATE"
    {
        return (response(uid, true, None, None), Verdict::Skipped);
    }
    let Some(pod) = request.object else {
        return (
            response(
                uid,
                false,
                Some("outrider injector: the request carries no pod"),
                None,
            ),
            Verdict::Malformed,
        );
    };
    let choice = pod_choice(
        pod["metadata"]["annotations"][INJECT].as_str(),
        pod["metadata"]["labels"][INJECT].as_str(),
    );
    let wanted = match path {
        NAMESPACE_PATH => true,
        POD_PATH => choice == PodChoice::Enabled,
        other => {
            let message = format!("outrider injector: unknown path {other}");
            return (
                response(uid, false, Some(&message), None),
                Verdict::Malformed,
            );
        }
    };
    if !wanted {
        return (response(uid, true, None, None), Verdict::Skipped);
    }
    match inject_pod(&pod, mesh) {
        Ok((Outcome::Injected { .. }, Some(injected))) => {
            let warning = match pod_security_verdict(&injected, request.namespace.as_deref(), gate)
            {
                None => None,
                Some((message, pod_security::Response::Warn)) => Some(message),
                Some((message, pod_security::Response::Refuse)) => {
                    return (
                        response(uid, false, Some(&message), None),
                        Verdict::PodSecurity,
                    );
                }
            };
            match serde_json::to_vec(&injected.patch) {
                Ok(bytes) => (
                    response(uid, true, warning.as_deref(), Some(&bytes)),
                    Verdict::Injected,
                ),
                Err(e) => {
                    let message = format!("outrider injector: cannot encode the patch: {e}");
                    (response(uid, false, Some(&message), None), Verdict::Denied)
                }
            }
        }
        Ok(_) => (response(uid, true, None, None), Verdict::Skipped),
        // A pod we were asked to mesh but cannot (a bad annotation, a
        // malformed spec) is refused with the reason, rather than started
        // outside the mesh.
        Err(e) => {
            let message = format!("outrider injector: {e}");
            (response(uid, false, Some(&message), None), Verdict::Denied)
        }
    }
}

/// The message, and what to do with it, when the namespace's enforced
/// level would reject what injection adds.
fn pod_security_verdict(
    injected: &InjectedPod,
    namespace: Option<&str>,
    gate: &PodSecurityGate,
) -> Option<(String, pod_security::Response)> {
    let (namespace, level) = namespace.and_then(|ns| Some((ns, (gate.levels)(ns)?)))?;
    let violations = pod_security_violations(&injected.spec, level);
    if violations.is_empty() {
        return None;
    }
    Some((
        pod_security_message(namespace, level, &violations),
        gate.response,
    ))
}

/// The serving certificate, swappable while serving (renewal, CA
/// rotation).
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(key),
        })
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write() = key;
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Why a serving certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not PEM: {0}")]
    Pem(String),
    #[error("unusable key: {0}")]
    Key(#[from] rustls::Error),
}

/// Builds a rustls key from PEM chain and key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, KeyError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KeyError::Pem(format!("{e:?}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| KeyError::Pem(format!("{e:?}")))?;
    let signing = crate::crypto::provider()
        .key_provider
        .load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Serves the webhook until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    cert: Arc<ServingCert>,
    mesh: Arc<InjectConfig>,
    gate: Arc<PodSecurityGate>,
    metrics: ControllerMetrics,
) {
    let mut config =
        match rustls::ServerConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        {
            Ok(builder) => builder.with_no_client_auth().with_cert_resolver(cert),
            Err(error) => {
                tracing::error!(%error, "Cannot configure the webhook's TLS");
                return;
            }
        };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    accept_loop(
        listener,
        Caps::total(MAX_CONNECTIONS),
        std::future::pending(),
        |_refused| {},
        move |stream, peer| {
            let acceptor = acceptor.clone();
            let mesh = mesh.clone();
            let gate = gate.clone();
            let metrics = metrics.clone();
            async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                let service = service_fn(move |req| {
                    let mesh = mesh.clone();
                    let gate = gate.clone();
                    let metrics = metrics.clone();
                    async move {
                        Ok::<_, Infallible>(handle(req, &mesh, &gate, &metrics, peer).await)
                    }
                });
                // The header timeout also bounds an idle keep-alive connection.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(CLIENT_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            }
        },
    )
    .await;
}

async fn handle(
    req: Request<Incoming>,
    mesh: &InjectConfig,
    gate: &PodSecurityGate,
    metrics: &ControllerMetrics,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
    }
    let path = req.uri().path().to_string();
    let body = tokio::time::timeout(
        CLIENT_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    );
    let (answer, verdict) = match body.await {
        Ok(Ok(body)) => review(&body.to_bytes(), &path, mesh, gate),
        Ok(Err(_)) => refuse_unread(&format!(
            "outrider injector: the request body is unreadable or over {MAX_BODY} bytes"
        )),
        Err(_) => refuse_unread("outrider injector: the request body did not arrive in time"),
    };
    metrics.webhook(verdict.label());
    if matches!(
        verdict,
        Verdict::Denied | Verdict::Malformed | Verdict::PodSecurity
    ) {
        let message = answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or("");
        tracing::warn!(%peer, %path, reason = message, "Refused an admission review");
    }
    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
    if let Ok(value) = "application/json".parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(object: Value) -> Vec<u8> {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                           "kind": {"group": "", "version": "v1", "kind": "Pod"},
                           "resource": {"group": "", "version": "v1", "resource": "pods"},
                           "namespace": "shop", "operation": "CREATE", "object": object}})
        .to_string()
        .into_bytes()
    }

    fn pod(annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "web-", "namespace": "shop", "annotations": annotations},
               "spec": {"containers": [{"name": "web", "image": "web:1"}]}})
    }

    fn decode_patch(answer: &Value) -> json_patch::Patch {
        let b64 = answer["response"]["patch"].as_str().expect("patch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        serde_json::from_slice(&bytes).expect("patch JSON")
    }

    #[test]
    fn a_pod_in_a_meshed_namespace_gets_a_base64_json_patch_with_the_sidecar() {
        let (answer, verdict) = review(
            &admission(pod(json!({}))),
            NAMESPACE_PATH,
            &InjectConfig::default(),
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Injected);
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let mut patched = pod(json!({}));
        json_patch::patch(&mut patched, &decode_patch(&answer)).expect("applies");
        let names: Vec<&str> = patched["spec"]["initContainers"]
            .as_array()
            .expect("init containers")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["outrider-init", "outrider-proxy"]);
    }

    #[test]
    fn outside_meshed_namespaces_only_annotated_pods_are_injected() {
        let mesh = InjectConfig::default();
        let (_, verdict) = review(
            &admission(pod(json!({}))),
            POD_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Skipped);
        let (answer, verdict) = review(
            &admission(pod(json!({"outrider.dev/inject": "enabled"}))),
            POD_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Injected, "{answer}");
        let (answer, verdict) = review(
            &admission(pod(json!({"outrider.dev/inject": "disabled"}))),
            NAMESPACE_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Skipped);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn the_label_opts_a_pod_in_or_out_as_the_annotation_does() {
        let mesh = InjectConfig::default();
        let labelled = |value: &str| {
            let mut pod = pod(json!({}));
            pod["metadata"]["labels"] = json!({"outrider.dev/inject": value});
            admission(pod)
        };
        let (answer, verdict) = review(
            &labelled("enabled"),
            POD_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Injected, "{answer}");
        let (_, verdict) = review(
            &labelled("disabled"),
            NAMESPACE_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Skipped);
    }

    fn gate(level: Option<Level>, response: pod_security::Response) -> PodSecurityGate {
        PodSecurityGate {
            response,
            levels: Box::new(move |ns| (ns == "shop").then_some(level).flatten()),
        }
    }

    #[test]
    fn a_namespace_enforcing_baseline_or_restricted_gets_a_refusal_that_says_what_to_do() {
        let mesh = InjectConfig::default();
        let body = admission(pod(json!({})));
        for level in [Level::Baseline, Level::Restricted] {
            let (answer, verdict) = review(
                &body,
                NAMESPACE_PATH,
                &mesh,
                &gate(Some(level), pod_security::Response::Refuse),
            );
            assert_eq!(verdict, Verdict::PodSecurity);
            assert_eq!(answer["response"]["allowed"], false);
            assert!(answer["response"].get("patch").is_none());
            let message = answer["response"]["status"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("enforces Pod Security \"{level}\""))
                    && message.contains("outrider-init adds capabilities NET_ADMIN, NET_RAW")
                    && message.contains("=privileged"),
                "{message}"
            );
            // Restricted names the root user too.
            assert_eq!(
                message.contains("container outrider-init runs as root"),
                level == Level::Restricted,
                "{message}"
            );
        }
        // Privileged, or unknown: injected without a word.
        for known in [Some(Level::Privileged), None] {
            let (answer, verdict) = review(
                &body,
                NAMESPACE_PATH,
                &mesh,
                &gate(known, pod_security::Response::Refuse),
            );
            assert_eq!(verdict, Verdict::Injected);
            assert!(answer["response"].get("warnings").is_none());
        }
    }

    #[test]
    fn in_warn_mode_the_pod_is_injected_with_the_message_as_a_warning() {
        let (answer, verdict) = review(
            &admission(pod(json!({}))),
            NAMESPACE_PATH,
            &InjectConfig::default(),
            &gate(Some(Level::Baseline), pod_security::Response::Warn),
        );
        assert_eq!(verdict, Verdict::Injected);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"]["patch"].is_string());
        let warning = answer["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.contains("enforces Pod Security"), "{warning}");
    }

    #[test]
    fn an_injected_pod_is_left_alone() {
        let mesh = InjectConfig::default();
        let (answer, _) = review(
            &admission(pod(json!({}))),
            NAMESPACE_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        let mut injected = pod(json!({}));
        json_patch::patch(&mut injected, &decode_patch(&answer)).expect("applies");
        let (answer, verdict) = review(
            &admission(injected),
            NAMESPACE_PATH,
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Skipped);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn garbage_is_denied_with_a_reason_never_an_error() {
        let mesh = InjectConfig::default();
        for (body, expect) in [
            (b"{not json".to_vec(), "not an AdmissionReview"),
            (
                b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}".to_vec(),
                "no request",
            ),
            (
                admission(json!({"metadata": {"name": "x"}, "spec": {"containers": 7}})),
                "spec.containers",
            ),
            (
                admission(pod(json!({"outrider.dev/opaque-ports": "mysql"}))),
                "outrider.dev/opaque-ports",
            ),
        ] {
            let (answer, verdict) =
                review(&body, NAMESPACE_PATH, &mesh, &PodSecurityGate::unknown());
            assert!(matches!(verdict, Verdict::Malformed | Verdict::Denied));
            assert_eq!(answer["response"]["allowed"], false);
            let message = answer["response"]["status"]["message"]
                .as_str()
                .unwrap_or("");
            assert!(message.contains(expect), "{message}");
        }
        let (answer, verdict) = review(
            &admission(pod(json!({}))),
            "/elsewhere",
            &mesh,
            &PodSecurityGate::unknown(),
        );
        assert_eq!(
            (verdict, answer["response"]["allowed"].clone()),
            (Verdict::Malformed, json!(false))
        );
    }

    #[test]
    fn other_kinds_and_operations_pass_untouched() {
        let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "UPDATE", "object": pod(json!({}))}})
        .to_string();
        let (answer, verdict) = review(
            body.as_bytes(),
            NAMESPACE_PATH,
            &InjectConfig::default(),
            &PodSecurityGate::unknown(),
        );
        assert_eq!(verdict, Verdict::Skipped);
        assert_eq!(answer["response"]["allowed"], true);
    }
}
