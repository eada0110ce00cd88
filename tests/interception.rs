//! The real interception path: "pods" as network namespaces on a bridge,
//! `outrider init` installing real iptables rules, the proxy running as
//! UID 2102, apps that know nothing about the mesh.
//!
//! Needs root (network namespaces, iptables); CI runs as root. Without
//! root these tests fail with a message saying so rather than pretending
//! to pass. Each test builds its own topology with unique names and its
//! own /24 under 10.222.0.0/16, inside namespaces it created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use common::BIN;
use nix::sched::{CloneFlags, setns};
use outrider::test_util::apps::{http1_app_at, http1_get, metric};
use outrider::test_util::certs::{TestCa, write_identity};

const PROXY_UID: u32 = 2102;
const APP_PORT: u16 = 8080;
/// A string that must never cross the bridge in clear when both ends are
/// meshed.
const MARKER: &str = "cleartext-marker-7f3a9c";

static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// Tests take turns through this: most share it, the ones that measure
/// spread take it alone.
static TURNS: parking_lot::RwLock<()> = parking_lot::RwLock::new(());

enum Turn {
    Shared {
        _guard: parking_lot::RwLockReadGuard<'static, ()>,
    },
    Alone {
        _guard: parking_lot::RwLockWriteGuard<'static, ()>,
    },
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the interception tests need root (network namespaces, iptables): run them as root, as CI does"
    );
}

fn sh(args: &[&str]) {
    output(args);
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(ns);
                f()
            })
            .join()
            .expect("netns thread")
    })
}

fn enter(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// One HTTP/1 GET from inside `ns`, as a plain application would send it.
fn get_from(ns: &str, to: SocketAddr, path: &str) -> Result<(u16, String), String> {
    in_netns(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(5), http1_get(to, path)).await {
                Ok(result) => result.map(|(status, body)| (status.as_u16(), body)),
                Err(_) => Err("timed out".to_string()),
            }
        })
    })
}

struct Pod {
    ns: String,
    ip: Ipv4Addr,
}

/// A bridge in its own namespace and one namespace per pod, torn down on
/// drop together with every process started in them.
struct Net {
    /// Shared with the other tests, or exclusive for one that measures
    /// how traffic spreads (see [`Net::alone`]).
    _turn: Turn,
    switch: String,
    subnet: u8,
    pods: Vec<Pod>,
    children: Vec<(String, Child)>,
    app_stops: Vec<tokio::sync::oneshot::Sender<()>>,
    dir: tempfile::TempDir,
    ca: TestCa,
    /// Pods whose ServiceAccount is not their own name.
    service_accounts: std::collections::BTreeMap<String, String>,
    /// The controller's discovery API, for proxies started from now on.
    discovery: Option<SocketAddr>,
}

impl Net {
    fn new(pod_names: &[&str]) -> Self {
        Self::with_turn(
            pod_names,
            Turn::Shared {
                _guard: TURNS.read_recursive(),
            },
        )
    }

    /// A net for a test that measures how requests spread over replicas
    /// by latency: it runs with no other test of this binary, whose load
    /// would make some replicas really slower than others (on CI's 2
    /// cores, a replica once got 50 % of 600 requests that way).
    fn alone(pod_names: &[&str]) -> Self {
        Self::with_turn(
            pod_names,
            Turn::Alone {
                _guard: TURNS.write(),
            },
        )
    }

    fn with_turn(pod_names: &[&str], turn: Turn) -> Self {
        require_root();
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{subnet}", std::process::id() % 100_000);
        let switch = format!("or{tag}-sw");
        sh(&["ip", "netns", "add", &switch]);
        sh(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
        sh(&["ip", "-n", &switch, "link", "set", "lo", "up"]);
        // The bridge's own address: where the "control plane" (a fake API
        // server, the controller) lives, reachable from every pod.
        sh(&[
            "ip",
            "-n",
            &switch,
            "addr",
            "add",
            &format!("10.222.{subnet}.254/24"),
            "dev",
            "br0",
        ]);
        let mut pods = Vec::new();
        for (i, name) in pod_names.iter().enumerate() {
            let ns = format!("or{tag}-{name}");
            let ip = Ipv4Addr::new(10, 222, subnet, i as u8 + 1);
            let port = format!("p{i}");
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", &switch, "link", "set", &port, "master", "br0"]);
            sh(&["ip", "-n", &switch, "link", "set", &port, "up"]);
            pods.push(Pod { ns, ip });
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // The proxy runs as UID 2102 and must reach its files.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Self {
            _turn: turn,
            switch,
            subnet,
            pods,
            children: Vec::new(),
            app_stops: Vec::new(),
            dir,
            ca: TestCa::new("cluster.local"),
            service_accounts: std::collections::BTreeMap::new(),
            discovery: None,
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.ns.ends_with(&format!("-{name}")))
            .expect("pod")
    }

    fn addr(&self, name: &str) -> SocketAddr {
        SocketAddr::from((self.pod(name).ip, APP_PORT))
    }

    /// `outrider init` inside the pod, as its init container would.
    fn init(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["ip", "netns", "exec", &self.pod(name).ns, BIN, "init"];
        args.extend_from_slice(extra);
        output(&args)
    }

    fn nat_table(&self, name: &str) -> String {
        let dump = output(&[
            "ip",
            "netns",
            "exec",
            &self.pod(name).ns,
            "iptables-save",
            "-t",
            "nat",
        ]);
        // Drop the comment lines carrying timestamps.
        dump.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// An HTTP app on 0.0.0.0:8080 inside the pod, answering with the
    /// caller identity the proxy passed on.
    fn start_app(&mut self, name: &str) {
        self.start_slow_app(name, Duration::ZERO);
    }

    /// An app like [`Self::start_app`] that takes `delay` per request.
    fn start_slow_app(&mut self, name: &str, delay: Duration) {
        let ns = self.pod(name).ns.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                http1_app_at(SocketAddr::from(([0, 0, 0, 0], APP_PORT)), delay).await;
                let _ = ready.send(());
                let _ = stopped.await;
            });
        });
        is_ready
            .recv_timeout(Duration::from_secs(5))
            .expect("app ready");
        self.app_stops.push(stop);
    }

    /// The pod's identity directory, readable by the proxy's UID.
    fn identity(&self, name: &str) -> (PathBuf, String) {
        let dir = self.dir.path().join(format!("identity-{name}"));
        let sa = self.service_accounts.get(name).map_or(name, String::as_str);
        let svid = self.ca.issue("shop", sa);
        write_identity(&dir, &svid.chain_pem, &svid.key_pem, &self.ca.root_pem);
        chown_tree(&dir);
        (dir, svid.id.to_string())
    }

    fn policy_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("policies-{name}"));
        std::fs::create_dir_all(&dir).expect("policy dir");
        chown_tree(&dir);
        dir
    }

    /// Starts the proxy in the pod as UID 2102 with the listeners an
    /// injected pod has, and waits until it is ready.
    fn start_proxy(&mut self, name: &str, mtls_mode: &str) {
        let (identity, id) = self.identity(name);
        let policies = self.policy_dir(name);
        let config = self.dir.path().join(format!("proxy-{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "identity:\n  dir: {}\n  id: {id}\n\
                 mtls_mode: {mtls_mode}\n\
                 workload:\n  labels: {{app: {name}}}\n\
                 policy:\n  source: files\n  dir: {}\n  reload_debounce: 50ms\n  poll_interval: 500ms\n\
                 log:\n  level: info\n{}",
                identity.display(),
                policies.display(),
                self.discovery
                    .map(|at| format!("discovery:\n  address: {at}\n"))
                    .unwrap_or_default(),
            ),
        )
        .expect("config");
        chown_tree(&config);
        let log = File::create(self.dir.path().join(format!("proxy-{name}.log"))).expect("log");
        let ns = self.pod(name).ns.clone();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "setpriv"])
            .arg(format!("--reuid={PROXY_UID}"))
            .arg(format!("--regid={PROXY_UID}"))
            .args(["--clear-groups", BIN, "proxy", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn proxy");
        self.children.push((name.to_string(), child));
        let admin = SocketAddr::from((self.pod(name).ip, 4191));
        let ready = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            matches!(get_from(&ns, admin, "/ready"), Ok((200, _)))
        });
        assert!(ready, "proxy in {name} never ready:\n{}", self.logs(name));
    }

    /// The bridge's address: where the control plane lives.
    fn bridge(&self) -> std::net::IpAddr {
        std::net::IpAddr::V4(Ipv4Addr::new(10, 222, self.subnet, 254))
    }

    /// A fake API server on the bridge (port 6443), and beside it the
    /// cluster DNS of [`cluster_dns`] (port 53); both stop with the net.
    fn start_api_server(&mut self) -> outrider::test_util::fake_apiserver::FakeApiServer {
        use outrider::test_util::fake_apiserver::FakeApiServer;
        let bridge = self.bridge();
        let (tx, rx) = std::sync::mpsc::channel();
        let switch = self.switch.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            enter(&switch);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::spawn(cluster_dns(SocketAddr::new(bridge, 53), bridge));
                tx.send(FakeApiServer::start_at(SocketAddr::new(bridge, 6443)).await)
                    .unwrap();
                let _ = stopped.await;
            });
        });
        self.app_stops.push(stop);
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    /// `outrider controller` on the bridge against `api`, serving discovery
    /// on the bridge's port 8090; its log is `controller.log`.
    fn start_controller(&mut self, api: &outrider::test_util::fake_apiserver::FakeApiServer) {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        chown_tree(&kubeconfig);
        let log = File::create(self.dir.path().join("controller.log")).unwrap();
        let controller = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch,
                BIN,
                "controller",
                "--kubeconfig",
            ])
            .arg(&kubeconfig)
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--webhook-listen", "127.0.0.1:0"])
            .args(["--discovery-listen", &self.discovery_addr().to_string()])
            .args(["--resync", "1s"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(("controller".into(), controller));
    }

    fn discovery_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bridge(), 8090)
    }

    /// `ip netns exec` in this pod reads a resolv.conf naming the DNS
    /// server on the bridge (see [`cluster_dns`]), with kubelet's search
    /// list and `ndots`.
    fn use_cluster_dns(&self, name: &str) {
        let dir = format!("/etc/netns/{}", self.pod(name).ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(
            format!("{dir}/resolv.conf"),
            format!(
                "nameserver 10.222.{}.254\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
                self.subnet
            ),
        )
        .expect("resolv.conf");
    }

    fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("proxy-{name}.log")))
            .unwrap_or_default()
    }

    fn metrics(&self, name: &str) -> String {
        let admin = SocketAddr::from((self.pod(name).ip, 4191));
        get_from(&self.pod(name).ns, admin, "/metrics")
            .expect("metrics")
            .1
    }

    /// Captures what crosses the bridge while `traffic` runs. The capture
    /// listens on the bridge's ports: the bridge device itself only sees
    /// frames addressed to it, not those it forwards.
    fn capture(&self, traffic: impl FnOnce()) -> Vec<u8> {
        let file = self.dir.path().join("bridge.pcap");
        let mut tcpdump = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch,
                "tcpdump",
                "-i",
                "any",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump says "listening on" once the capture runs.
        let mut stderr = tcpdump.stderr.take().expect("stderr");
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            let n = std::io::Read::read(&mut stderr, &mut buf).expect("tcpdump stderr");
            assert!(n > 0, "tcpdump exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        traffic();
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tcpdump.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("stop tcpdump");
        let _ = tcpdump.wait();
        std::fs::read(&file).expect("pcap")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", pod.ns));
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for stop in self.app_stops.drain(..) {
            let _ = stop.send(());
        }
        for pod in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &pod.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}

fn chown_tree(path: &Path) {
    std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_symlink() {
                continue;
            }
            chown_tree(&entry.path());
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A meshed pod with its app, init rules and proxy.
fn meshed(net: &mut Net, name: &str, mode: &str) {
    net.start_app(name);
    net.init(name, &[]);
    net.start_proxy(name, mode);
}

#[test]
fn a_plain_connection_between_meshed_pods_crosses_the_wire_as_mtls_and_arrives_with_the_callers_identity()
 {
    let mut net = Net::new(&["a", "b", "c"]);
    meshed(&mut net, "a", "permissive");
    meshed(&mut net, "b", "permissive");
    let b = net.addr("b");
    let path = format!("/{MARKER}");

    let mut answer = None;
    let wire = net.capture(|| answer = Some(get_from(&net.pod("a").ns, b, &path)));
    let (status, body) = answer.expect("ran").expect("a -> b");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("caller=spiffe://cluster.local/ns/shop/sa/a"),
        "b's app must see a's identity: {body}"
    );
    assert!(!wire.is_empty());
    assert!(
        !contains(&wire, MARKER),
        "the request crossed the bridge in clear text"
    );
    // The bytes on the wire are TLS: a handshake record and the mesh ALPN.
    assert!(contains(&wire, "outrider/1"), "no mesh ALPN on the wire");

    // Control: the capture does see clear text when the caller is not
    // meshed, so the assertion above can fail.
    let wire = net.capture(|| {
        let (status, body) = get_from(&net.pod("c").ns, b, &path).expect("c -> b");
        assert_eq!(status, 200);
        assert!(body.contains("caller=unauthenticated"), "{body}");
    });
    assert!(
        contains(&wire, MARKER),
        "control: plaintext must be visible"
    );

    // The proxies' own connections were not captured again (no loop).
    for pod in ["a", "b"] {
        let metrics = net.metrics(pod);
        assert_eq!(
            metric(
                &metrics,
                "outrider_connection_errors_total",
                &[("reason", "loop_detected")]
            ),
            0.0,
            "{pod}: {metrics}"
        );
    }
    let b_metrics = net.metrics("b");
    assert!(
        metric(
            &b_metrics,
            "outrider_tcp_open_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("peer_id", "spiffe://cluster.local/ns/shop/sa/a")
            ]
        ) >= 1.0,
        "{b_metrics}"
    );
}

#[test]
fn a_policy_file_denying_the_caller_is_enforced_on_the_intercepted_path() {
    let mut net = Net::new(&["a", "b"]);
    meshed(&mut net, "a", "permissive");
    meshed(&mut net, "b", "permissive");
    let b = net.addr("b");
    assert_eq!(
        get_from(&net.pod("a").ns, b, "/api").expect("allowed").0,
        200
    );

    let policy = net.policy_dir("b").join("deny-a.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-a, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n\
         \x20 rules:\n  - from: [{principals: [spiffe://cluster.local/ns/shop/sa/a]}]\n",
    )
    .expect("write policy");
    let denied = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        matches!(get_from(&net.pod("a").ns, b, "/api"), Ok((403, _)))
    });
    assert!(denied, "the DENY never applied:\n{}", net.logs("b"));
    let metrics = net.metrics("b");
    assert!(
        metric(
            &metrics,
            "outrider_authz_decisions_total",
            &[("decision", "deny"), ("policy", "shop/deny-a")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[test]
fn an_unmeshed_caller_is_served_in_permissive_mode_and_refused_in_strict() {
    let mut net = Net::new(&["a", "b", "c"]);
    meshed(&mut net, "a", "permissive");
    meshed(&mut net, "b", "permissive");
    let b = net.addr("b");
    let (status, body) = get_from(&net.pod("c").ns, b, "/").expect("permissive");
    assert_eq!(
        (status, body.contains("caller=unauthenticated")),
        (200, true),
        "{body}"
    );

    std::fs::write(
        net.policy_dir("b").join("strict.yaml"),
        "apiVersion: security.outrider.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n",
    )
    .expect("write policy");
    let refused = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        get_from(&net.pod("c").ns, b, "/").is_err()
    });
    assert!(
        refused,
        "c was still served under STRICT:\n{}",
        net.logs("b")
    );
    // The meshed caller is unaffected.
    let (status, body) = get_from(&net.pod("a").ns, b, "/").expect("a under strict");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("caller=spiffe://cluster.local/ns/shop/sa/a"));
}

#[test]
fn a_meshed_caller_reaches_an_unmeshed_pod_through_the_plaintext_fallback() {
    let mut net = Net::new(&["a", "c"]);
    meshed(&mut net, "a", "permissive");
    net.start_app("c");
    let c = net.addr("c");
    let (status, body) = get_from(&net.pod("a").ns, c, "/").expect("a -> c");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("caller=unauthenticated"), "{body}");
    let metrics = net.metrics("a");
    assert!(
        metric(&metrics, "outrider_outbound_plaintext_fallbacks_total", &[]) >= 1.0,
        "{metrics}"
    );

    // In strict mode the same call is refused rather than sent in clear.
    let mut strict = Net::new(&["a", "c"]);
    meshed(&mut strict, "a", "strict");
    strict.start_app("c");
    let c = strict.addr("c");
    let result = get_from(&strict.pod("a").ns, c, "/");
    assert!(
        !matches!(result, Ok((200, _))),
        "strict must not fall back to plaintext: {result:?}"
    );
}

#[test]
fn init_is_idempotent_and_cleanup_leaves_the_namespace_as_it_found_it() {
    let net = Net::new(&["a"]);
    let before = net.nat_table("a");
    net.init("a", &["--skip-outbound-cidrs", "10.96.0.0/12"]);
    let once = net.nat_table("a");
    net.init("a", &["--skip-outbound-cidrs", "10.96.0.0/12"]);
    let twice = net.nat_table("a");
    assert_eq!(once, twice, "a second run must not add rules");
    assert_eq!(once.matches("-A PREROUTING -j OUTRIDER_INBOUND").count(), 1);
    assert!(
        once.contains("-A OUTRIDER_OUTBOUND -d 10.96.0.0/12 -j RETURN"),
        "{once}"
    );
    assert!(
        once.contains("-A OUTRIDER_OUTBOUND -m owner --uid-owner 2102 -j RETURN"),
        "{once}"
    );

    let removed = net.init("a", &["--cleanup"]);
    assert!(removed.contains("removed"), "{removed}");
    assert_eq!(net.nat_table("a"), before);
    assert!(net.init("a", &["--cleanup"]).contains("nothing to remove"));
}

#[test]
fn init_without_net_admin_fails_with_a_clear_error_and_changes_nothing() {
    let net = Net::new(&["a"]);
    let before = net.nat_table("a");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.pod("a").ns,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args(["--clear-groups", "--inh-caps=-all", BIN, "init"])
        .output()
        .expect("run init");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CAP_NET_ADMIN is missing"), "{stderr}");
    assert_eq!(net.nat_table("a"), before);
}

/// What kubelet does with an injected container's `env`: resolves the
/// downward-API fields and expands `$(VAR)` references to earlier
/// variables.
fn kubelet_env(container: &serde_json::Value, namespace: &str, sa: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(value) = var["value"].as_str() {
            let mut value = value.to_string();
            for (k, v) in &env {
                value = value.replace(&format!("$({k})"), v);
            }
            value
        } else {
            let source = &var["valueFrom"];
            if let Some(resource) = source["resourceFieldRef"]["resource"].as_str() {
                assert_eq!(
                    source["resourceFieldRef"]["containerName"],
                    container["name"]
                );
                assert_eq!(resource, "limits.memory");
                let limit = container["resources"]["limits"]["memory"].as_str();
                quantity_bytes(limit.expect("a memory limit")).to_string()
            } else {
                match source["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.namespace") => namespace.to_string(),
                    Some("spec.serviceAccountName") => sa.to_string(),
                    // The pods of these tests are named after their
                    // ServiceAccounts.
                    Some("metadata.name") => sa.to_string(),
                    other => panic!("unexpected field {other:?}"),
                }
            }
        };
        env.push((name, value));
    }
    env
}

/// A Kubernetes quantity in bytes, as kubelet passes `limits.memory`
/// (divisor 1) to a `resourceFieldRef`.
fn quantity_bytes(quantity: &str) -> u64 {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, unit) = quantity.split_at(split);
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("unexpected unit {other:?} in {quantity}"),
    };
    number.parse::<u64>().expect("a whole number") * scale
}

fn container<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["spec"]["containers"].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The whole chain on real interception: the controller issues identities
/// into a (fake) API server, a stand-in kubelet mounts them, `outrider
/// inject` writes the pod, and its init container and proxy run with
/// exactly the environment the injector wrote, the proxy finding the
/// controller by name and taking its policies from it. A STRICT +
/// default-deny pod then serves an allowed meshed caller and the kubelet
/// probe, and nothing else.
#[test]
fn an_injected_pod_runs_on_what_the_injector_and_controller_wrote() {
    use serde_json::json;
    let mut net = Net::new(&["a", "b"]);
    let api = net.start_api_server();
    // The pods resolve names through the "cluster DNS" on the bridge, as
    // kubelet's resolv.conf would have them.
    for pod in ["a", "b"] {
        net.use_cluster_dns(pod);
    }
    api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"outrider.dev/inject": "enabled"}}}),
    );
    api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "outrider-system"}}),
    );
    for sa in ["a", "b"] {
        api.apply(
            "serviceaccounts",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": "shop"}}),
        );
        // The pods as the API server holds them once injected: the
        // controller serves a proxy its policies only for a pod it knows
        // to run as the proxy's ServiceAccount.
        let ip = net.pod(sa).ip.to_string();
        api.apply(
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": sa, "namespace": "shop",
                         "annotations": {"outrider.dev/proxy-version": "0.1.0"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}),
        );
    }
    // b: STRICT, deny by default, a may GET /api/*.
    api.apply(
        "peerauthentications",
        json!({"apiVersion": "security.outrider.dev/v1alpha1",
        "kind": "PeerAuthentication", "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    api.apply(
        "authorizationpolicies",
        json!({"apiVersion": "security.outrider.dev/v1alpha1",
        "kind": "AuthorizationPolicy", "metadata": {"name": "b-from-a", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "b"}}, "action": "ALLOW",
                 "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/a"]}],
                            "to": [{"methods": ["GET"], "paths": ["/api/*"]}]}]}}),
    );
    // The controller, next to the API server.
    net.start_controller(&api);
    let kubeconfig = net.dir.path().join("kubeconfig");

    // A stand-in kubelet: Secret volumes and the downward-API labels.
    let mut identity_dirs = Vec::new();
    for pod in ["a", "b"] {
        let dir = net.dir.path().join(format!("mounted-identity-{pod}"));
        identity_dirs.push((pod.to_string(), dir));
    }
    {
        let api = api.clone();
        let dirs = identity_dirs.clone();
        std::thread::spawn(move || {
            use base64::Engine as _;
            let mut seen = std::collections::BTreeMap::new();
            loop {
                for (sa, dir) in &dirs {
                    let Some(secret) =
                        api.get("secrets", "shop", &format!("outrider-identity-{sa}"))
                    else {
                        continue;
                    };
                    let version = secret["metadata"]["resourceVersion"].clone();
                    if seen.get(sa) == Some(&version) {
                        continue;
                    }
                    let field = |k: &str| {
                        String::from_utf8(
                            base64::engine::general_purpose::STANDARD
                                .decode(secret["data"][k].as_str().unwrap_or_default())
                                .unwrap(),
                        )
                        .unwrap()
                    };
                    write_identity(dir, &field("tls.crt"), &field("tls.key"), &field("ca.crt"));
                    chown_tree(dir);
                    seen.insert(sa.clone(), version);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }

    // Kubelet does not start a pod before its Secret volume exists.
    for (pod, dir) in &identity_dirs {
        let mounted = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            dir.join("tls.crt").exists()
        });
        assert!(
            mounted,
            "no identity issued for {pod}:\n{}",
            std::fs::read_to_string(net.dir.path().join("controller.log")).unwrap_or_default()
        );
    }
    for pod in ["a", "b"] {
        net.start_app(pod);
        // The pod as a user writes it, injected by the real transformation.
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: shop\n  labels: {{app: {pod}}}\n  annotations: {{outrider.dev/default-policy: deny}}\n\
             spec:\n  serviceAccountName: {pod}\n  containers:\n  - name: app\n    image: app:1\n    ports: [{{name: http, containerPort: 8080}}]\n    readinessProbe:\n      httpGet: {{path: /healthz, port: http}}\n"
        );
        let input = net.dir.path().join(format!("pod-{pod}.yaml"));
        std::fs::write(&input, manifest).unwrap();
        let injected = output(&[BIN, "inject", "-f", input.to_str().unwrap()]);
        let injected = outrider::yaml::value(&injected).unwrap();

        // The init container, with its environment.
        let init_env = kubelet_env(container(&injected, "outrider-init"), "shop", pod);
        let mut init = Command::new("ip");
        init.args(["netns", "exec", &net.pod(pod).ns, "env"]);
        for (k, v) in &init_env {
            init.arg(format!("{k}={v}"));
        }
        let out = init.args([BIN, "init"]).output().unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The proxy, with its environment; mount points become directories.
        let proxy = container(&injected, "outrider-proxy");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
        let mut env = kubelet_env(proxy, "shop", pod);
        let identity = identity_dirs
            .iter()
            .find(|(p, _)| p == pod)
            .unwrap()
            .1
            .clone();
        let labels = net.dir.path().join(format!("labels-{pod}"));
        std::fs::write(&labels, format!("app=\"{pod}\"\n")).unwrap();
        chown_tree(&labels);
        for (k, v) in env.iter_mut() {
            match k.as_str() {
                "OUTRIDER_IDENTITY_DIR" => *v = identity.display().to_string(),
                "OUTRIDER_WORKLOAD_LABELS_FILE" => *v = labels.display().to_string(),
                _ => {}
            }
        }
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        assert!(
            env.contains(&(
                "OUTRIDER_IDENTITY_ID".into(),
                format!("spiffe://cluster.local/ns/shop/sa/{pod}")
            )),
            "{env:?}"
        );
        assert!(
            env.contains(&("OUTRIDER_POLICY_PROBES".into(), "8080/healthz".into())),
            "{env:?}"
        );
        assert!(
            env.contains(&("OUTRIDER_POLICY_SOURCE".into(), "discovery".into())),
            "{env:?}"
        );
        let log = File::create(net.dir.path().join(format!("proxy-{pod}.log"))).unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.pod(pod).ns, "setpriv"]);
        command
            .arg(format!("--reuid={PROXY_UID}"))
            .arg(format!("--regid={PROXY_UID}"));
        command.args(["--clear-groups", "env"]);
        for (k, v) in &env {
            command.arg(format!("{k}={v}"));
        }
        let child = command
            .args([BIN, "proxy"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        net.children.push((pod.to_string(), child));
    }
    // Ready once the controller's identity is mounted and policies synced.
    for pod in ["a", "b"] {
        let admin = SocketAddr::from((net.pod(pod).ip, 4191));
        let ready = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            matches!(get_from(&net.pod(pod).ns, admin, "/ready"), Ok((200, _)))
        });
        assert!(
            ready,
            "{pod} never ready:\n{}\ncontroller:\n{}",
            net.logs(pod),
            std::fs::read_to_string(net.dir.path().join("controller.log")).unwrap_or_default()
        );
    }

    let b = net.addr("b");
    let (status, body) = get_from(&net.pod("a").ns, b, "/api/orders").expect("a -> b");
    assert_eq!(status, 200, "{body}\n{}", net.logs("b"));
    assert!(
        body.contains("caller=spiffe://cluster.local/ns/shop/sa/a"),
        "{body}"
    );
    let (status, _) = get_from(&net.pod("a").ns, b, "/admin").expect("a -> b /admin");
    assert_eq!(status, 403, "only GET /api/* is allowed");
    // The injected proxies found the controller by its Service's name
    // through DNS: b's policies above came over it (no proxy watches the
    // API server), and a asked it about b's address: b's pod, whose
    // exact identity a's proxy then required.
    let metrics = net.metrics("a");
    assert!(
        metric(
            &metrics,
            "outrider_outbound_discovery_answers_total",
            &[("answer", "endpoints")]
        ) >= 1.0,
        "{metrics}\n{}",
        net.logs("a")
    );

    // The kubelet probes from the node, in plaintext: the probe passes
    // STRICT and the deny default; anything else on that port does not.
    let (status, _) = get_from(&net.switch, b, "/healthz").expect("probe");
    assert_eq!(status, 200, "{}", net.logs("b"));
    let other = get_from(&net.switch, b, "/api/orders");
    assert!(!matches!(other, Ok((200, _))), "{other:?}");
}

// === Discovery and balancing ===

/// The Service's virtual IP, as kube-proxy would program it.
fn cluster_ip(net: &Net) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, net.subnet, 10)
}

/// A Service `shop/web` (port 80 → `http`, 8080) over `backends`, each
/// a meshed pod running as ServiceAccount `web` unless `impostors` names
/// it (its Pod says `web`, its proxy presents `other`), with its
/// EndpointSlice and Pods in a fake API server, and the controller serving
/// discovery, both on the bridge. Proxies started afterwards use it.
struct ServiceCluster {
    api: outrider::test_util::fake_apiserver::FakeApiServer,
    backends: Vec<String>,
}

impl ServiceCluster {
    fn start(net: &mut Net, backends: &[&str], impostors: &[&str]) -> Self {
        use serde_json::json;
        let api = net.start_api_server();
        for ns in ["shop", "outrider-system"] {
            api.apply(
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            );
        }
        api.apply(
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"clusterIP": cluster_ip(net).to_string(),
                            "clusterIPs": [cluster_ip(net).to_string()],
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        );
        for name in backends {
            let ip = net.pod(name).ip.to_string();
            api.apply(
                "pods",
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": "shop",
                                    "annotations": {"outrider.dev/proxy-version": "0.1.0"}},
                       "spec": {"serviceAccountName": "web",
                                "containers": [{"name": "app", "image": "app"}]},
                       "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}),
            );
            let sa = if impostors.contains(name) {
                "other"
            } else {
                "web"
            };
            net.service_accounts
                .insert(name.to_string(), sa.to_string());
        }
        let cluster = Self {
            api,
            backends: backends.iter().map(|b| b.to_string()).collect(),
        };
        cluster.set_endpoints(net, backends);
        net.start_controller(&cluster.api);
        // Proxies get SVIDs from the controller's own CA, as in a cluster.
        let secret = (0..200)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                cluster.api.get("secrets", "outrider-system", "outrider-ca")
            })
            .expect("the controller wrote its CA Secret");
        net.ca =
            TestCa::from_ca_secret(&outrider::test_util::secret_data(&secret), "cluster.local");
        net.discovery = Some(net.discovery_addr());
        cluster
    }

    /// The Service's one EndpointSlice lists exactly `ready` (port 8080).
    fn set_endpoints(&self, net: &Net, ready: &[&str]) {
        use serde_json::json;
        let endpoints: Vec<_> = ready
            .iter()
            .map(|name| {
                json!({"addresses": [net.pod(name).ip.to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"}})
            })
            .collect();
        self.api.apply(
            "endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "web-x1", "namespace": "shop",
                                "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                   "endpoints": endpoints}),
        );
    }

    /// Marks the Service's port opaque (`outrider.dev/opaque-ports`).
    fn mark_opaque(&self, net: &Net) {
        use serde_json::json;
        self.api.apply(
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web", "namespace": "shop",
                                "annotations": {"outrider.dev/opaque-ports": "80"}},
                   "spec": {"clusterIP": cluster_ip(net).to_string(),
                            "clusterIPs": [cluster_ip(net).to_string()],
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        );
    }

    /// Requests each backend's proxy let through to its app.
    fn served(&self, net: &Net) -> Vec<(String, f64)> {
        let all: Vec<&str> = self.backends.iter().map(String::as_str).collect();
        served_by(net, &all)
    }
}

/// Requests the proxies of `backends` let through to their apps.
fn served_by(net: &Net, backends: &[&str]) -> Vec<(String, f64)> {
    {
        backends
            .iter()
            .map(|b| {
                let served = metric(
                    &net.metrics(b),
                    "outrider_http_responses_total",
                    &[("direction", "inbound"), ("status_code", "200")],
                );
                (b.to_string(), served)
            })
            .collect()
    }
}

/// kube-proxy's rules for the Service, in the client pod: the virtual IP
/// DNATed to one backend per connection (`statistic mode random`), after
/// outrider's own chain (which leaves the proxy's connections alone).
fn program_cluster_ip(net: &Net, client: &str, backends: &[&str]) {
    let ns = net.pod(client).ns.clone();
    let ipt = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &ns, "iptables", "-t", "nat"];
        all.extend_from_slice(args);
        sh(&all);
    };
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &format!("10.222.{}.254", net.subnet),
    ]);
    ipt(&["-N", "KUBE-SVC-WEB"]);
    let n = backends.len();
    for (i, name) in backends.iter().enumerate() {
        let to = format!("{}:{APP_PORT}", net.pod(name).ip);
        let remaining = n - i;
        if remaining > 1 {
            let probability = format!("{:.5}", 1.0 / remaining as f64);
            ipt(&[
                "-A",
                "KUBE-SVC-WEB",
                "-p",
                "tcp",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
        } else {
            ipt(&[
                "-A",
                "KUBE-SVC-WEB",
                "-p",
                "tcp",
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
        }
    }
    ipt(&[
        "-A",
        "OUTPUT",
        "-d",
        &format!("{}/32", cluster_ip(net)),
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "KUBE-SVC-WEB",
    ]);
}

/// One HTTP/1 keep-alive connection from an app in a pod, reused for every
/// request (as an HTTP client library with a connection pool of one).
struct KeepAliveClient {
    rt: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl KeepAliveClient {
    fn connect(ns: &str, to: SocketAddr) -> Self {
        let stream = in_netns(ns, || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect")
        });
        stream.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sender = rt.block_on(async {
            let stream = tokio::net::TcpStream::from_std(stream).unwrap();
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender
        });
        Self { rt, sender }
    }

    /// GETs `path`; the status, or why there was none.
    fn get(&mut self, path: &str) -> Result<u16, String> {
        use http_body_util::BodyExt as _;
        let sender = &mut self.sender;
        self.rt.block_on(async {
            let request = http::Request::get(path)
                .header("host", "web.shop.svc.cluster.local")
                .body(http_body_util::Empty::new())
                .unwrap();
            let exchange = async {
                sender.ready().await.map_err(|e| e.to_string())?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(status)
            };
            tokio::time::timeout(Duration::from_secs(5), exchange)
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
        })
    }

    /// `n` GETs; how many did not answer 200, with the first failure.
    fn run(&mut self, n: usize) -> (usize, Option<String>) {
        let mut failed = 0;
        let mut first = None;
        for i in 0..n {
            match self.get(&format!("/req/{i}")) {
                Ok(200) => {}
                other => {
                    failed += 1;
                    first.get_or_insert(format!("request {i}: {other:?}"));
                }
            }
        }
        (failed, first)
    }
}

/// Three meshed replicas b1..b3 of a Service, found by discovery, and a
/// meshed client pod with kube-proxy's rules for it, holding one
/// keep-alive connection to the Service's virtual IP.
fn service_of_three(mut net: Net) -> (Net, ServiceCluster, KeepAliveClient) {
    let backends = ["b1", "b2", "b3"];
    let cluster = ServiceCluster::start(&mut net, &backends, &[]);
    for b in backends {
        meshed(&mut net, b, "permissive");
    }
    meshed(&mut net, "client", "permissive");
    program_cluster_ip(&net, "client", &backends);
    let service = SocketAddr::from((cluster_ip(&net), 80));
    let client = KeepAliveClient::connect(&net.pod("client").ns, service);
    (net, cluster, client)
}

fn share(served: &[(String, f64)], name: &str) -> f64 {
    let total: f64 = served.iter().map(|(_, n)| n).sum();
    served
        .iter()
        .find(|(b, _)| b == name)
        .map_or(0.0, |(_, n)| *n)
        / total
}

/// On the main before discovery this fails: the one client connection
/// became one HTTP/2 connection to the virtual IP, which kube-proxy's DNAT
/// sent to one backend, so one backend got all 600 requests.
#[test]
fn requests_over_one_keep_alive_connection_spread_over_the_service_s_pods() {
    let mut net = Net::alone(&["client", "b1", "b2", "b3", "loner"]);
    let backends = ["b1", "b2", "b3"];
    let cluster = ServiceCluster::start(&mut net, &backends, &[]);
    for b in backends {
        meshed(&mut net, b, "permissive");
    }
    // A meshed pod discovery has never heard of.
    meshed(&mut net, "loner", "permissive");
    meshed(&mut net, "client", "permissive");
    program_cluster_ip(&net, "client", &backends);

    let service = SocketAddr::from((cluster_ip(&net), 80));
    let mut client = KeepAliveClient::connect(&net.pod("client").ns, service);
    let (failed, first) = client.run(600);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let served = cluster.served(&net);
    eprintln!("600 requests on one connection: {served:?}");
    for b in backends {
        let share = share(&served, b);
        assert!(
            (0.20..=0.47).contains(&share),
            "{b} served {:.0} % of 600 requests on one connection: {served:?}",
            share * 100.0
        );
    }
    let metrics = net.metrics("client");
    assert!(
        metric(
            &metrics,
            "outrider_outbound_service_requests_total",
            &[("service", "shop/web")]
        ) >= 600.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "outrider_discovery_streams_open", &[]) >= 1.0);
    assert!(
        metric(
            &metrics,
            "outrider_discovery_answers_received_total",
            &[("result", "used")]
        ) >= 1.0
    );
    assert_eq!(
        metric(&metrics, "outrider_outbound_balancer_endpoints", &[]),
        3.0
    );

    // An address discovery does not know: the original destination, as
    // without discovery (mTLS to any identity of the trust domain).
    let (status, body) =
        get_from(&net.pod("client").ns, net.addr("loner"), "/x").expect("client -> loner");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("caller=spiffe://cluster.local/ns/shop/sa/client"),
        "{body}"
    );
    assert!(
        metric(
            &net.metrics("client"),
            "outrider_outbound_discovery_answers_total",
            &[("answer", "unknown")]
        ) >= 1.0
    );

    // The controller goes away mid-traffic: the last endpoint set stays.
    let (_, controller) = net
        .children
        .iter_mut()
        .find(|(name, _)| name == "controller")
        .map(|(n, c)| (n.clone(), c))
        .unwrap();
    controller.kill().unwrap();
    let _ = controller.wait();
    let before = cluster.served(&net);
    let (failed, first) = client.run(150);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let after = cluster.served(&net);
    for ((b, was), (_, now)) in before.iter().zip(&after) {
        assert!(now - was >= 20.0, "{b}: {before:?} -> {after:?}");
    }
    let metrics = net.metrics("client");
    assert!(metric(&metrics, "outrider_discovery_stream_failures_total", &[]) >= 1.0);
    assert_eq!(
        metric(&metrics, "outrider_discovery_streams_open", &[]),
        0.0
    );
}

/// On the code before the balancer stopped taking a new connection's time
/// as a latency sample this fails: the first request to a replica paid
/// for its connection and mTLS handshake (here the replica's proxy is
/// paused 300 ms, as a busy CPU would delay it), that time became the
/// replica's latency, and sequential traffic avoided a healthy replica for
/// most of the run.
#[test]
fn a_replica_whose_first_connection_was_slow_still_gets_its_share() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let (net, cluster, mut client) = service_of_three(Net::alone(&["client", "b1", "b2", "b3"]));
    let slow = net
        .children
        .iter()
        .find(|(name, _)| name == "b2")
        .map(|(_, proxy)| Pid::from_raw(proxy.id() as i32))
        .expect("b2's proxy");

    // Requests one at a time, b2's proxy paused for the first 300 ms of
    // each, until b2 has answered one: that one opened its connection.
    let mut sent = 0;
    while served_by(&net, &["b2"])[0].1 < 1.0 {
        assert!(sent < 60, "b2 never picked: {:?}", cluster.served(&net));
        kill(slow, Signal::SIGSTOP).unwrap();
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            kill(slow, Signal::SIGCONT)
        });
        let status = client.get(&format!("/warm/{sent}"));
        resume.join().unwrap().unwrap();
        assert_eq!(status, Ok(200), "{}", net.logs("client"));
        sent += 1;
    }

    let before = cluster.served(&net);
    let (failed, first) = client.run(600);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let after = cluster.served(&net);
    eprintln!("600 requests after b2's slow first connection: {before:?} -> {after:?}");
    let b2 = after[1].1 - before[1].1;
    assert!(
        b2 >= 120.0,
        "b2 served {b2} of 600 after its slow first connection: {before:?} -> {after:?}"
    );
}

#[test]
fn a_slow_replica_gets_a_small_share_and_an_impostor_serves_nothing() {
    let mut net = Net::alone(&["client", "b1", "b2", "b3", "imp"]);
    let backends = ["b1", "b2", "b3", "imp"];
    let cluster = ServiceCluster::start(&mut net, &backends, &["imp"]);
    meshed(&mut net, "b1", "permissive");
    meshed(&mut net, "b2", "permissive");
    net.start_slow_app("b3", Duration::from_millis(50));
    net.init("b3", &[]);
    net.start_proxy("b3", "permissive");
    meshed(&mut net, "imp", "permissive");
    meshed(&mut net, "client", "permissive");
    program_cluster_ip(&net, "client", &backends);

    let service = SocketAddr::from((cluster_ip(&net), 80));
    let mut client = KeepAliveClient::connect(&net.pod("client").ns, service);
    let (failed, first) = client.run(600);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let served = cluster.served(&net);
    let slow = share(&served, "b3");
    assert!(
        slow < 0.15,
        "the +50 ms replica served {:.0} %: {served:?}",
        slow * 100.0
    );
    // Listed by the Service, but presenting another ServiceAccount's
    // identity: never trusted with a request, and counted.
    assert_eq!(share(&served, "imp"), 0.0, "{served:?}");
    let metrics = net.metrics("client");
    assert!(
        metric(
            &metrics,
            "outrider_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "wrong_identity")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[test]
fn scaling_down_under_traffic_fails_no_request() {
    let (mut net, cluster, mut client) = service_of_three(Net::new(&["client", "b1", "b2", "b3"]));
    let (failed, first) = client.run(100);
    assert_eq!(failed, 0, "{first:?}");
    // As Kubernetes scales 3 → 2: the endpoint goes, then the pod.
    cluster.set_endpoints(&net, &["b1", "b2"]);
    let (failed, first) = client.run(20);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let gone = net.pod("b3").ns.clone();
    let (_, proxy) = net
        .children
        .iter_mut()
        .find(|(name, _)| name == "b3")
        .unwrap();
    proxy.kill().unwrap();
    let _ = proxy.wait();
    sh(&["ip", "-n", &gone, "link", "set", "eth0", "down"]);
    let before = served_by(&net, &["b1", "b2"]);
    let (failed, first) = client.run(200);
    assert_eq!(failed, 0, "{first:?}\n{}", net.logs("client"));
    let after = served_by(&net, &["b1", "b2"]);
    let new: f64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    assert!(new >= 200.0, "{before:?} -> {after:?}");
}

/// A stand-in for the cluster's DNS on `at`: `A` queries for
/// `outrider-discovery.outrider-system.svc.cluster.local` answer
/// `address`, every other name does not exist (so the resolver walks the
/// search list as in a pod).
async fn cluster_dns(at: SocketAddr, address: std::net::IpAddr) {
    let socket = tokio::net::UdpSocket::bind(at).await.expect("bind DNS");
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let query = &buf[..n];
        // The question: labels from byte 12, then type and class.
        let mut at = 12;
        let mut labels = Vec::new();
        while at < n && query[at] != 0 {
            let len = usize::from(query[at]);
            if at + 1 + len > n {
                break;
            }
            labels.push(String::from_utf8_lossy(&query[at + 1..at + 1 + len]).to_lowercase());
            at += len + 1;
        }
        let question_end = at + 5;
        if question_end > n {
            continue;
        }
        let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
        let known = labels.join(".") == "outrider-discovery.outrider-system.svc.cluster.local";
        let mut reply = Vec::from(&query[..2]);
        // A response, recursion available, NXDOMAIN for unknown names.
        reply.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
        let answers = u16::from(known && qtype == 1);
        reply.extend_from_slice(&1u16.to_be_bytes());
        reply.extend_from_slice(&answers.to_be_bytes());
        reply.extend_from_slice(&[0, 0, 0, 0]);
        reply.extend_from_slice(&query[12..question_end]);
        if let (1, std::net::IpAddr::V4(v4)) = (answers, address) {
            reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            reply.extend_from_slice(&v4.octets());
        }
        let _ = socket.send_to(&reply, from).await;
    }
}

/// A TCP server on 0.0.0.0:8080 in the pod that reads a line and answers
/// with the pod's name (a protocol that is not HTTP).
fn start_name_server(net: &mut Net, name: &str) {
    let ns = net.pod(name).ns.clone();
    let answer = format!("{name}\n");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", APP_PORT))
                .await
                .expect("bind");
            let _ = ready.send(());
            let serve = async {
                while let Ok((stream, _)) = listener.accept().await {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        let mut stream = tokio::io::BufReader::new(stream);
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.is_ok() {
                            let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                        }
                    });
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stopped => {}
            }
        });
    });
    is_ready
        .recv_timeout(Duration::from_secs(5))
        .expect("name server ready");
    net.app_stops.push(stop);
}

/// One connection from `ns` to `to`: a line out, the answer back.
fn ask_name(ns: &str, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, || {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        stream.write_all(b"hello\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
}

/// On the main before discovery this fails: kube-proxy's DNAT sent about
/// a quarter of the connections to the impostor, whose identity (another
/// ServiceAccount of the same trust domain) the trust-domain check took.
#[test]
fn opaque_connections_pick_an_endpoint_each_and_never_an_impostor() {
    let mut net = Net::alone(&["client", "b1", "b2", "b3", "imp"]);
    let backends = ["b1", "b2", "b3", "imp"];
    let cluster = ServiceCluster::start(&mut net, &backends, &["imp"]);
    cluster.mark_opaque(&net);
    for b in backends {
        start_name_server(&mut net, b);
        net.init(b, &[]);
        net.start_proxy(b, "permissive");
    }
    meshed(&mut net, "client", "permissive");
    program_cluster_ip(&net, "client", &backends);

    let service = SocketAddr::from((cluster_ip(&net), 80));
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for i in 0..60 {
        let name = ask_name(&net.pod("client").ns, service)
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", net.logs("client")));
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(counts.get("imp"), None, "{counts:?}");
    for b in ["b1", "b2", "b3"] {
        let n = counts.get(b).copied().unwrap_or_default();
        assert!(n >= 8, "{b} got {n} of 60 connections: {counts:?}");
    }
    let metrics = net.metrics("client");
    assert!(
        metric(
            &metrics,
            "outrider_protocol_detections_total",
            &[("direction", "outbound"), ("protocol", "opaque")]
        ) >= 60.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "outrider_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "wrong_identity")]
        ) >= 1.0,
        "{metrics}"
    );
}

/// On the code before: each request whose body the client broke counted
/// as a failure of the endpoint it went to, so after a handful of them
/// healthy endpoints were paused for every other request of the pod.
#[test]
fn a_client_that_breaks_its_request_bodies_gets_no_endpoint_paused() {
    let mut net = Net::new(&["client", "b1", "b2"]);
    let backends = ["b1", "b2"];
    let _cluster = ServiceCluster::start(&mut net, &backends, &[]);
    // Apps that take their time: the body breaks before any answer.
    for b in backends {
        net.start_slow_app(b, Duration::from_millis(300));
        net.init(b, &[]);
        net.start_proxy(b, "permissive");
    }
    meshed(&mut net, "client", "permissive");
    program_cluster_ip(&net, "client", &backends);
    let service = SocketAddr::from((cluster_ip(&net), 80));
    // A body promised in full and cut off: 20 times, more than enough
    // failures to pause both endpoints had they been counted.
    for _ in 0..20 {
        in_netns(&net.pod("client").ns, || {
            use std::io::{Read, Write};
            let mut stream =
                std::net::TcpStream::connect_timeout(&service, Duration::from_secs(5)).unwrap();
            stream
                .write_all(
                    b"POST /upload HTTP/1.1\r\nhost: web\r\ncontent-length: 1000\r\n\r\npartial",
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    let metrics = net.metrics("client");
    assert!(
        metric(&metrics, "outrider_outbound_service_requests_total", &[]) >= 20.0,
        "the broken requests went through the balancer: {metrics}"
    );
    assert_eq!(
        metric(&metrics, "outrider_outbound_endpoint_pauses_total", &[]),
        0.0,
        "{metrics}"
    );
    let mut client = KeepAliveClient::connect(&net.pod("client").ns, service);
    let (failed, first) = client.run(20);
    assert_eq!(failed, 0, "{first:?}");
}
