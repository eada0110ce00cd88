//! An in-process fake Kubernetes API server, at the HTTP level, for the
//! policy CRDs in one namespace: list, watch from a resourceVersion (with
//! bookmarks), `410 Gone` for expired versions, and a switch to make it
//! vanish and come back on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Resource {
    objects: BTreeMap<String, Value>,
    /// Every event with its resourceVersion, replayed to a watch that
    /// starts from an older version (as the API server's watch cache does).
    history: Vec<(u64, Value)>,
    /// Watch streams open on this resource.
    watchers: Vec<mpsc::UnboundedSender<Value>>,
}

impl Resource {
    fn record(&mut self, version: u64, event: Value) {
        self.history.push((version, event.clone()));
        self.watchers.retain(|w| w.send(event.clone()).is_ok());
    }
}

#[derive(Default)]
struct State {
    version: u64,
    /// Versions below this answer `410 Gone` to a watch.
    oldest: u64,
    resources: BTreeMap<String, Resource>,
    lists: u64,
    watches: u64,
}

/// The fake server. Cloning shares it.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

const PREFIX: &str = "/apis/security.outrider.dev/v1alpha1/namespaces/";

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
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
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.task.lock().expect("task") = Some(task);
    }

    /// Stops answering and drops every open watch.
    pub fn vanish(&self) {
        if let Some(task) = self.task.lock().expect("task").take() {
            task.abort();
        }
        let mut state = self.state.lock().expect("state");
        for resource in state.resources.values_mut() {
            resource.watchers.clear();
        }
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

    /// Creates or replaces an object (`plural` such as
    /// `authorizationpolicies`), notifying watches.
    pub fn apply(&self, plural: &str, mut object: Value) {
        let mut state = self.state.lock().expect("state");
        state.version += 1;
        let version = state.version.to_string();
        object["metadata"]["resourceVersion"] = json!(version);
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let at = state.version;
        let resource = state.resources.entry(plural.to_string()).or_default();
        let kind = if resource.objects.insert(name, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        resource.record(at, json!({"type": kind, "object": object}));
    }

    pub fn delete(&self, plural: &str, name: &str) {
        let mut state = self.state.lock().expect("state");
        state.version += 1;
        let version = state.version.to_string();
        let at = state.version;
        let resource = state.resources.entry(plural.to_string()).or_default();
        if let Some(mut object) = resource.objects.remove(name) {
            object["metadata"]["resourceVersion"] = json!(version);
            resource.record(at, json!({"type": "DELETED", "object": object}));
        }
    }

    /// Sends a bookmark on every open watch.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().expect("state");
        let version = state.version.to_string();
        for (plural, resource) in state.resources.iter_mut() {
            let kind = kind_of(plural);
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "apiVersion": "security.outrider.dev/v1alpha1", "kind": kind,
                "metadata": {"resourceVersion": version}}});
            resource
                .watchers
                .retain(|w| w.send(bookmark.clone()).is_ok());
        }
    }

    /// Expires every version seen so far: open watches get a `410 Gone`
    /// error event and must relist.
    pub fn expire_versions(&self) {
        let mut state = self.state.lock().expect("state");
        state.version += 1;
        state.oldest = state.version;
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        for resource in state.resources.values_mut() {
            resource.watchers.retain(|w| w.send(gone.clone()).is_ok());
            resource.watchers.clear();
        }
    }

    /// How many lists and watches were served (relists show up here).
    pub fn requests(&self) -> (u64, u64) {
        let state = self.state.lock().expect("state");
        (state.lists, state.watches)
    }
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "peerauthentications" => "PeerAuthentication",
        _ => "AuthorizationPolicy",
    }
}

fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "code": 404}),
        );
    };
    let Some((_namespace, plural)) = rest.split_once('/') else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "code": 404}),
        );
    };
    let mut state = state.lock().expect("state");
    if query.get("watch").map(String::as_str) == Some("true") {
        state.watches += 1;
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if from < state.oldest {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}});
            return stream_response(vec![gone], None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let resource = state.resources.entry(plural.to_string()).or_default();
        let missed = resource
            .history
            .iter()
            .filter(|(v, _)| *v > from)
            .map(|(_, e)| e.clone())
            .collect();
        resource.watchers.push(tx);
        return stream_response(missed, Some(rx));
    }
    state.lists += 1;
    let version = state.version.to_string();
    let kind = kind_of(plural);
    // Like the API server for built-in kinds, list items carry no
    // apiVersion and kind: a client must not depend on them.
    let items: Vec<Value> = state
        .resources
        .get(plural)
        .map(|r| {
            r.objects
                .values()
                .cloned()
                .map(|mut item| {
                    if let Some(fields) = item.as_object_mut() {
                        fields.remove("apiVersion");
                        fields.remove("kind");
                    }
                    item
                })
                .collect()
        })
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": format!("{kind}List"),
               "metadata": {"resourceVersion": version}, "items": items}),
    )
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
