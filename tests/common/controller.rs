//! `outrider controller` as a child process: spawned against a
//! kubeconfig with loopback ports, its JSON log captured, its addresses
//! read from the log, its metrics scraped, stopped with SIGTERM.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use outrider::test_util::apps::http1_get;
use parking_lot::Mutex;
use serde_json::Value;

pub struct ControllerProcess {
    pub child: Child,
    pub admin: SocketAddr,
    pub webhook: SocketAddr,
    pub discovery: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ControllerProcess {
    pub fn spawn(kubeconfig: &Path, extra: &[&str]) -> Self {
        // A quick resync unless the test sets its own.
        let resync: &[&str] = if extra.contains(&"--resync") {
            &[]
        } else {
            &["--resync", "1s"]
        };
        // Any free discovery port unless the test names one.
        let discovery: &[&str] = if extra.contains(&"--discovery-listen") {
            &[]
        } else {
            &["--discovery-listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(super::bin())
            .arg("controller")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--webhook-listen",
                "127.0.0.1:0",
            ])
            .args(discovery)
            .args(["--log-format", "json"])
            .args(resync)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn controller");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("\"Controller listening\"") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().push(line);
                }
            });
        }
        let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            panic!("controller did not start: {}", logs.lock().join("\n"));
        };
        let event: Value = serde_json::from_str(&line).expect("json log");
        let addr = |f: &str| event[f].as_str().unwrap().parse().unwrap();
        Self {
            child,
            admin: addr("admin"),
            webhook: addr("webhook"),
            discovery: addr("discovery"),
            logs,
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().join("\n")
    }

    pub async fn metrics(&self) -> String {
        http1_get(self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl ControllerProcess {
    /// SIGTERM, as kubelet sends it in a rolling update; waits for the
    /// process to exit (up to 10 s) while the fake API server, on this
    /// test's runtime, keeps answering it.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = i32::try_from(self.child.id()).unwrap();
        kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
