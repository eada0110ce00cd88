//! An in-process fake Kubernetes API server, at the HTTP level, for any
//! resource addressed the usual way (`/api/v1/...`, `/apis/<group>/<v>/...`,
//! namespaced or cluster-scoped): list (with label selectors and the
//! metadata-only form), watch from a resourceVersion (with bookmarks and
//! history), `410 Gone` for expired versions, get, create, replace with
//! optimistic concurrency, merge / JSON / server-side-apply patches,
//! delete; injected failures; and a switch to make it vanish and come back
//! on the same port.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Where an object lives: resource (plural), namespace ("" when
/// cluster-scoped), name.
type Key = (String, String, String);

struct Watcher {
    plural: String,
    namespace: Option<String>,
    selector: Vec<(String, String)>,
    metadata_only: bool,
    tx: mpsc::UnboundedSender<Value>,
}

/// One request as the server saw it, for assertions.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub user_agent: String,
}

#[derive(Default)]
struct State {
    version: u64,
    /// Versions below this answer `410 Gone` to a watch.
    oldest: u64,
    objects: BTreeMap<Key, Value>,
    /// Every event with its resourceVersion and key, replayed to a watch
    /// that starts from an older version (as the watch cache does).
    history: Vec<(u64, Key, Value)>,
    watchers: Vec<Watcher>,
    lists: u64,
    watches: u64,
    seen: Vec<Seen>,
    /// Answers to give instead of serving: (method, plural, status).
    failures: VecDeque<(String, String, u16)>,
}

impl State {
    fn record(&mut self, key: &Key, kind: &str, object: &Value) {
        let event = json!({"type": kind, "object": object});
        self.history
            .push((self.version, key.clone(), event.clone()));
        self.watchers.retain(|w| {
            if !w.matches(key, object) {
                return true;
            }
            let event = if w.metadata_only {
                json!({"type": kind, "object": strip_to_metadata(object)})
            } else {
                event.clone()
            };
            w.tx.send(event).is_ok()
        });
    }
}

impl Watcher {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        key.0 == self.plural
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.1)
            && selects(&self.selector, object)
    }
}

fn selects(selector: &[(String, String)], object: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

fn strip_to_metadata(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": object["metadata"].clone()})
}

/// The fake server. Cloning shares it.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl FakeApiServer {
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("addr")).await
    }

    /// Listens on `addr` (an address inside a test's network namespace).
    pub async fn start_at(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Self {
            state: Arc::new(Mutex::new(State::default())),
            addr,
            task: Arc::new(Mutex::new(None)),
        };
        server.serve(listener);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig that points at this server without credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: nobody, namespace: shop}}\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n",
            self.addr
        )
    }

    fn serve(&self, listener: TcpListener) {
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // As Go's net/http does: a watch event is a small write,
                // which Nagle would hold for the previous one's ACK.
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.task.lock() = Some(task);
    }

    /// Stops answering and drops every open watch.
    pub fn vanish(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
        self.state.lock().watchers.clear();
    }

    /// Listens again on the same port.
    pub async fn come_back(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Creates or replaces an object (`plural` such as `secrets`) in the
    /// namespace its metadata names, notifying watches.
    pub fn apply(&self, plural: &str, object: Value) {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let mut state = self.state.lock();
        store(&mut state, (plural.to_string(), namespace, name), object);
    }

    /// Deletes every object of `plural` called `name`, in any namespace.
    pub fn delete(&self, plural: &str, name: &str) {
        let mut state = self.state.lock();
        let keys: Vec<Key> = state
            .objects
            .keys()
            .filter(|(p, _, n)| p == plural && n == name)
            .cloned()
            .collect();
        for key in keys {
            remove(&mut state, &key);
        }
    }

    /// The object, if it exists.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.lock();
        state
            .objects
            .get(&(plural.to_string(), namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of `plural` (in every namespace).
    pub fn all(&self, plural: &str) -> Vec<Value> {
        let state = self.state.lock();
        state
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Sends a bookmark on every open watch.
    pub fn bookmark(&self) {
        let mut state = self.state.lock();
        let version = state.version.to_string();
        state.watchers.retain(|w| {
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": kind_of(&w.plural), "apiVersion": api_version_of(&w.plural),
                "metadata": {"resourceVersion": version}}});
            w.tx.send(bookmark).is_ok()
        });
    }

    /// Expires every version seen so far: open watches get a `410 Gone`
    /// error event and must relist.
    pub fn expire_versions(&self) {
        let mut state = self.state.lock();
        state.version += 1;
        state.oldest = state.version;
        for watcher in state.watchers.drain(..) {
            let _ = watcher.tx.send(gone());
        }
    }

    /// How many lists and watches were served (relists show up here).
    pub fn requests(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.lists, state.watches)
    }

    /// Every request served so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().seen.clone()
    }

    /// The next `method` request on `plural` gets `status` instead of
    /// being served (409 for a conflict, 500, ...).
    pub fn fail_next(&self, method: &str, plural: &str, status: u16) {
        self.state
            .lock()
            .failures
            .push_back((method.to_string(), plural.to_string(), status));
    }
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")})
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn store(state: &mut State, key: Key, mut object: Value) -> Value {
    state.version += 1;
    let version = state.version.to_string();
    object["metadata"]["resourceVersion"] = json!(version);
    if !key.1.is_empty() {
        object["metadata"]["namespace"] = json!(key.1);
    }
    let existed = state.objects.contains_key(&key);
    if !existed {
        object["metadata"]["uid"] = json!(format!("uid-{}-{}", key.2, state.version));
        if object["metadata"]["creationTimestamp"].is_null() {
            object["metadata"]["creationTimestamp"] = json!("2026-11-29T00:00:00Z");
        }
    } else if let Some(old) = state.objects.get(&key) {
        object["metadata"]["uid"] = old["metadata"]["uid"].clone();
        object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
    }
    state.objects.insert(key.clone(), object.clone());
    state.record(&key, if existed { "MODIFIED" } else { "ADDED" }, &object);
    object
}

fn remove(state: &mut State, key: &Key) -> Option<Value> {
    let mut object = state.objects.remove(key)?;
    state.version += 1;
    object["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state.record(key, "DELETED", &object);
    Some(object)
}

fn kind_of(plural: &str) -> String {
    match plural {
        "peerauthentications" => "PeerAuthentication".into(),
        "requestauthentications" => "RequestAuthentication".into(),
        "localratelimitpolicies" => "LocalRateLimitPolicy".into(),
        "authorizationpolicies" => "AuthorizationPolicy".into(),
        "serviceaccounts" => "ServiceAccount".into(),
        "mutatingwebhookconfigurations" => "MutatingWebhookConfiguration".into(),
        "rolebindings" => "RoleBinding".into(),
        "endpointslices" => "EndpointSlice".into(),
        other => {
            let singular = other.strip_suffix('s').unwrap_or(other);
            let mut chars = singular.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().collect::<String>() + chars.as_str())
                .unwrap_or_default()
        }
    }
}

fn api_version_of(plural: &str) -> &'static str {
    match plural {
        "peerauthentications"
        | "authorizationpolicies"
        | "requestauthentications"
        | "localratelimitpolicies" => "security.outrider.dev/v1alpha1",
        "leases" => "coordination.k8s.io/v1",
        "events" => "events.k8s.io/v1",
        "rolebindings" => "rbac.authorization.k8s.io/v1",
        "endpointslices" => "discovery.k8s.io/v1",
        "mutatingwebhookconfigurations" => "admissionregistration.k8s.io/v1",
        _ => "v1",
    }
}

/// `(plural, namespace, name)` from a request path.
fn route(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let owned = |s: &&str| s.to_string();
    match rest {
        [plural] => Some((plural.to_string(), None, None)),
        ["namespaces", name] => Some(("namespaces".into(), None, Some(name.to_string()))),
        ["namespaces", ns, plural] => Some((plural.to_string(), Some(owned(ns)), None)),
        ["namespaces", ns, plural, name] => {
            Some((plural.to_string(), Some(owned(ns)), Some(owned(name))))
        }
        [plural, name] => Some((plural.to_string(), None, Some(name.to_string()))),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_selector(selector: Option<&String>) -> Vec<(String, String)> {
    selector
        .map(|s| {
            s.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let query: BTreeMap<String, String> = raw_query
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
        })
        .collect();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };

    let Some((plural, namespace, name)) = route(&path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", "no route"),
        );
    };
    let mut state = state.lock();
    state.seen.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        query: raw_query.clone(),
        content_type: content_type.clone(),
        user_agent,
    });
    if let Some(i) = state
        .failures
        .iter()
        .position(|(m, p, _)| *m == method.as_str() && *p == plural)
    {
        let (_, _, code) = state.failures.remove(i).expect("failure");
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let reason = if code == 409 {
            "Conflict"
        } else {
            "InternalError"
        };
        return json_response(status, status_body(code, reason, "injected failure"));
    }
    let ns = namespace.clone().unwrap_or_default();
    let not_found = || {
        json_response(
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", "not found"),
        )
    };
    match (method, name) {
        (Method::GET, None) => {
            let selector = parse_selector(query.get("labelSelector"));
            if query.get("watch").map(String::as_str) == Some("true") {
                state.watches += 1;
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if from < state.oldest {
                    return stream_response(vec![gone()], None);
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let watcher = Watcher {
                    plural: plural.clone(),
                    namespace: namespace.clone(),
                    selector,
                    metadata_only,
                    tx,
                };
                let missed = state
                    .history
                    .iter()
                    .filter(|(v, key, event)| *v > from && watcher.matches(key, &event["object"]))
                    .map(|(_, _, e)| {
                        if metadata_only {
                            json!({"type": e["type"], "object": strip_to_metadata(&e["object"])})
                        } else {
                            e.clone()
                        }
                    })
                    .collect();
                state.watchers.push(watcher);
                return stream_response(missed, Some(rx));
            }
            state.lists += 1;
            // Pages as the API server serves them (`limit`, `continue`):
            // every page carries the resourceVersion the list began at.
            // The token is that version and how many items came before.
            let (version, skip) = match query
                .get("continue")
                .and_then(|token| token.split_once('/'))
                .and_then(|(v, n)| Some((v.to_string(), n.parse::<usize>().ok()?)))
            {
                Some(resumed) => resumed,
                None => (state.version.to_string(), 0),
            };
            let limit = query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let mut more = false;
            // Like the API server, list items carry no apiVersion and
            // kind: a client must not depend on them.
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((p, n, _), o)| {
                    *p == plural
                        && namespace.as_ref().is_none_or(|ns| ns == n)
                        && selects(&selector, o)
                })
                .skip(skip)
                .enumerate()
                .filter_map(|(i, item)| {
                    if i < limit {
                        Some(item)
                    } else {
                        more = true;
                        None
                    }
                })
                .map(|(_, o)| {
                    if metadata_only {
                        strip_to_metadata(o)
                    } else {
                        let mut item = o.clone();
                        if let Some(fields) = item.as_object_mut() {
                            fields.remove("apiVersion");
                            fields.remove("kind");
                        }
                        item
                    }
                })
                .collect();
            let (api_version, kind) = if metadata_only {
                (
                    "meta.k8s.io/v1".to_string(),
                    "PartialObjectMetadataList".to_string(),
                )
            } else {
                (
                    api_version_of(&plural).to_string(),
                    format!("{}List", kind_of(&plural)),
                )
            };
            let mut metadata = json!({"resourceVersion": version});
            if more {
                metadata["continue"] = json!(format!("{version}/{}", skip + items.len()));
            }
            json_response(
                StatusCode::OK,
                json!({"apiVersion": api_version, "kind": kind,
                       "metadata": metadata, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match state.objects.get(&(plural, ns, name)) {
            Some(object) => json_response(StatusCode::OK, object.clone()),
            None => not_found(),
        },
        (Method::POST, None) => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    status_body(400, "BadRequest", "not JSON"),
                );
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    status_body(422, "Invalid", "metadata.name required"),
                );
            };
            let key = (plural.clone(), ns, name);
            if state.objects.contains_key(&key) {
                return json_response(
                    StatusCode::CONFLICT,
                    status_body(409, "AlreadyExists", "already exists"),
                );
            }
            object["apiVersion"] = json!(api_version_of(&plural));
            object["kind"] = json!(kind_of(&plural));
            let stored = store(&mut state, key, object);
            json_response(StatusCode::CREATED, stored)
        }
        (Method::PUT, Some(name)) => {
            let Ok(object) = serde_json::from_slice::<Value>(&body) else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    status_body(400, "BadRequest", "not JSON"),
                );
            };
            let key = (plural, ns, name);
            let Some(current) = state.objects.get(&key) else {
                return not_found();
            };
            if let Some(expected) = object["metadata"]["resourceVersion"].as_str()
                && current["metadata"]["resourceVersion"].as_str() != Some(expected)
            {
                return json_response(
                    StatusCode::CONFLICT,
                    status_body(409, "Conflict", "the object has been modified"),
                );
            }
            if let Some(refusal) = immutable_change(&key.0, current, &object) {
                return refusal;
            }
            let stored = store(&mut state, key, object);
            json_response(StatusCode::OK, stored)
        }
        (Method::PATCH, Some(name)) => {
            let key = (plural.clone(), ns, name);
            let current = state.objects.get(&key).cloned();
            let patched = if content_type.starts_with("application/apply-patch") {
                let Ok(applied) = serde_json::from_slice::<Value>(&body)
                    .or_else(|_| crate::yaml::value(&String::from_utf8_lossy(&body)))
                else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        status_body(400, "BadRequest", "not YAML"),
                    );
                };
                if !query.contains_key("fieldManager") {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        status_body(400, "BadRequest", "fieldManager is required for apply"),
                    );
                }
                match current {
                    None => applied,
                    Some(mut current) => {
                        deep_merge(&mut current, &applied);
                        current
                    }
                }
            } else {
                let Some(mut current) = current else {
                    return not_found();
                };
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        status_body(400, "BadRequest", "not JSON"),
                    );
                };
                if content_type.starts_with("application/json-patch") {
                    let Ok(ops) = serde_json::from_value::<json_patch::Patch>(patch) else {
                        return json_response(
                            StatusCode::BAD_REQUEST,
                            status_body(400, "BadRequest", "not a JSON patch"),
                        );
                    };
                    if json_patch::patch(&mut current, &ops).is_err() {
                        return json_response(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            status_body(422, "Invalid", "patch does not apply"),
                        );
                    }
                } else {
                    json_patch::merge(&mut current, &patch);
                }
                current
            };
            if let Some(current) = state.objects.get(&key)
                && let Some(refusal) = immutable_change(&key.0, current, &patched)
            {
                return refusal;
            }
            let stored = store(&mut state, key, patched);
            json_response(StatusCode::OK, stored)
        }
        (Method::DELETE, Some(name)) => {
            let key = (plural, ns, name);
            // DeleteOptions.preconditions: uid and resourceVersion must
            // still be those of the stored object.
            let options = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
            if let Some(current) = state.objects.get(&key) {
                for field in ["uid", "resourceVersion"] {
                    let expected = &options["preconditions"][field];
                    if !expected.is_null() && *expected != current["metadata"][field] {
                        return json_response(
                            StatusCode::CONFLICT,
                            status_body(409, "Conflict", &format!("Precondition failed: {field}")),
                        );
                    }
                }
            }
            match remove(&mut state, &key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(),
            }
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            status_body(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}

/// The real server's refusals of a change to an immutable field: a
/// Secret's `type` (absent means Opaque) and a RoleBinding's `roleRef`.
fn immutable_change(plural: &str, current: &Value, next: &Value) -> Option<Response<Body>> {
    let refused = match plural {
        "secrets" => {
            let kind = |v: &Value| v["type"].as_str().unwrap_or("Opaque").to_string();
            (kind(current) != kind(next)).then_some("type: Invalid value: field is immutable")
        }
        "rolebindings" => (current["roleRef"] != next["roleRef"])
            .then_some("roleRef: Invalid value: cannot change roleRef"),
        _ => None,
    }?;
    Some(json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        status_body(422, "Invalid", refused),
    ))
}

/// Server-side apply, as far as one field manager is concerned: maps
/// merge, everything else is replaced by the applied value.
fn deep_merge(current: &mut Value, applied: &Value) {
    match (current, applied) {
        (Value::Object(current), Value::Object(applied)) => {
            for (key, value) in applied {
                match current.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        deep_merge(existing, value)
                    }
                    _ => {
                        current.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (current, applied) => *current = applied.clone(),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("value"));
    response
}

fn stream_response(
    first: Vec<Value>,
    rest: Option<mpsc::UnboundedReceiver<Value>>,
) -> Response<Body> {
    let stream = futures_util::stream::unfold(
        (first.into_iter(), rest),
        |(mut first, mut rest)| async move {
            if let Some(event) = first.next() {
                return Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))),
                    (first, rest),
                ));
            }
            let event = rest.as_mut()?.recv().await?;
            Some((
                Ok(Frame::data(Bytes::from(format!("{event}\n")))),
                (first, rest),
            ))
        },
    );
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("value"));
    response
}
