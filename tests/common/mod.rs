//! Running the real `outrider` binary in black-box tests: spawn it with a
//! config file on loopback port 0, learn its addresses from its JSON log,
//! read its metrics, signal it.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};

pub mod controller;
pub mod jwt;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use outrider::identity::SpiffeId;
use outrider::test_util::apps;
use outrider::test_util::certs::{TestCa, write_identity};

pub const BIN: &str = env!("CARGO_BIN_EXE_outrider");

/// The binary the proxy tests run: this build's, or `OUTRIDER_TEST_BIN`
/// (how a test is shown to fail on an older build).
pub fn bin() -> String {
    std::env::var("OUTRIDER_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A workload identity directory with its ID.
pub struct Workload {
    pub dir: PathBuf,
    pub id: SpiffeId,
}

/// Issues `ns/sa` from `ca` into `<tmp>/<sa>` the way kubelet would.
pub fn workload(tmp: &Path, ca: &TestCa, namespace: &str, service_account: &str) -> Workload {
    let dir = tmp.join(service_account);
    let svid = ca.issue(namespace, service_account);
    write_identity(&dir, &svid.chain_pem, &svid.key_pem, &ca.root_pem);
    Workload { dir, id: svid.id }
}

/// A config with every listener on 127.0.0.1:0 and fast reloads; `extra`
/// is appended YAML (top-level keys not already set here).
pub fn config(w: &Workload, sections: &str) -> String {
    format!(
        "identity:\n  dir: {}\n  id: {}\n  reload_debounce: 50ms\n  reload_poll_interval: 1s\n\
         admin:\n  listen: 127.0.0.1:0\n\
         shutdown_grace_period: 10s\n\
         {sections}",
        w.dir.display(),
        w.id
    )
}

/// [`sections`] with an outbound listener that never detects protocols:
/// every connection gets its own mTLS connection and is relayed as bytes.
pub fn opaque_outbound(sections: &str) -> String {
    sections.replace(
        "outbound:\n  listen: 127.0.0.1:0\n",
        "outbound:\n  listen: 127.0.0.1:0\n  protocol: opaque\n",
    )
}

/// Inbound to a fixed app, outbound to a fixed peer.
pub fn sections(
    app: Option<SocketAddr>,
    peer: Option<(SocketAddr, &SpiffeId)>,
    mode: &str,
    extra: &str,
) -> String {
    let mut s = format!("mtls_mode: {mode}\ninbound:\n  listen: 127.0.0.1:0\n");
    if let Some(app) = app {
        s += &format!("  app: {app}\n");
    }
    s += "outbound:\n  listen: 127.0.0.1:0\n";
    if let Some((peer, id)) = peer {
        s += &format!("  peer: {peer}\n  peer_id: {id}\n");
    }
    s + extra
}

/// A strict-mode server proxy in front of `app` and a client proxy whose
/// outbound is routed to it (by exact ID): the usual two-sidecar setup.
pub async fn strict_pair(
    server: &Workload,
    client: &Workload,
    app: SocketAddr,
) -> (ProxyProcess, ProxyProcess) {
    let server_proxy =
        ProxyProcess::start(&config(server, &sections(Some(app), None, "strict", ""))).await;
    let client_proxy = ProxyProcess::start(&config(
        client,
        &sections(
            None,
            Some((server_proxy.inbound(), &server.id)),
            "strict",
            "",
        ),
    ))
    .await;
    (server_proxy, client_proxy)
}

/// A strict client proxy whose outbound relays opaque TCP to `server`
/// (which must present `server_id`).
pub async fn opaque_client(
    client: &Workload,
    server: &ProxyProcess,
    server_id: &SpiffeId,
) -> ProxyProcess {
    ProxyProcess::start(&config(
        client,
        &opaque_outbound(&sections(
            None,
            Some((server.inbound(), server_id)),
            "strict",
            "",
        )),
    ))
    .await
}

pub struct ProxyProcess {
    child: Child,
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _config_dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `outrider proxy` and waits until it has bound its listeners
    /// and reports ready.
    pub async fn start(config_yaml: &str) -> Self {
        let proxy = Self::spawn(config_yaml);
        let ready = outrider::test_util::eventually(Duration::from_secs(10), async || {
            let (status, _) = apps::http1_get(proxy.admin, "/ready").await.ok()?;
            (status == 200).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "proxy never became ready; logs:\n{}",
            proxy.logs()
        );
        proxy
    }

    /// Starts it without waiting for readiness.
    pub fn spawn(config_yaml: &str) -> Self {
        let config_dir = tempfile::tempdir().expect("tempdir");
        let path = config_dir.path().join("config.yaml");
        std::fs::write(&path, config_yaml).expect("write config");
        let mut child = Command::new(bin())
            .args(["proxy", "--config"])
            .arg(&path)
            .args(["--log-format", "json", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outrider");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (bound_tx, bound_rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("\"Listeners bound\"") {
                        let _ = bound_tx.send(line.clone());
                    }
                    logs.lock().push(line);
                }
            });
        }
        let line = match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("proxy did not bind; logs:\n{}", logs.lock().join("\n"));
            }
        };
        let event: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let addr = |field: &str| {
            event[field]
                .as_str()
                .and_then(|s| s.parse::<SocketAddr>().ok())
        };
        Self {
            child,
            inbound: addr("inbound"),
            outbound: addr("outbound"),
            admin: addr("admin").expect("admin address"),
            logs,
            _config_dir: config_dir,
        }
    }

    pub fn inbound(&self) -> SocketAddr {
        self.inbound.expect("inbound enabled")
    }

    pub fn outbound(&self) -> SocketAddr {
        self.outbound.expect("outbound enabled")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().join("\n")
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = apps::http1_get(self.admin, "/metrics")
            .await
            .expect("scrape");
        assert_eq!(status, 200);
        body
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        apps::metric(&self.metrics().await, name, labels)
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("kill");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Polls `check` every 20 ms for up to `timeout`.
pub async fn eventually<T>(timeout: Duration, check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    outrider::test_util::eventually(timeout, check).await
}
