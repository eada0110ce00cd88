//! `outrider demo`: a two-workload mesh on loopback, no cluster needed.
//!
//! Creates a CA, issues identities for `frontend` and `backend`, runs their
//! sidecars and small built-in HTTP apps in this process, and walks through
//! what the mesh guarantees: mutual TLS with the caller's identity handed
//! to the app, refusal of foreign and plaintext clients, identity rotation
//! under load without a failed request, an authorization policy applied
//! live, the metrics endpoint, and per-request balancing over three
//! replicas found through the controller's discovery service
//! ([`replicas`]), and tokens from the demo's own identity provider
//! verified at the backend, with a rate limit ([`tokens`]). Each step
//! checks its own outcome; the exit code is 0 only if all pass.

mod app;
mod issuer;
mod probe;
mod replicas;
mod tokens;

pub use app::{HttpClient, spawn_identity_app, spawn_slow_identity_app};
pub use probe::{is_served, served_leaf};

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use rustls_pki_types::UnixTime;

use crate::app::Sidecar;
use crate::ca::secret_dir;
use crate::ca::store::CaDir;
use crate::config::{Config, FileConfig, Overrides};
use crate::identity::{Credentials, RawCredentials, SpiffeId, TrustDomain};
use crate::runtime::{LogFormat, build_runtime, init_tracing};
use crate::tls::{KxGroup, TlsSettings};

const ROTATIONS: usize = 3;
const LOAD_CLIENTS: usize = 4;
const STEPS: usize = 10;
/// Requests of the balancing step, on one keep-alive connection.
const BALANCED_REQUESTS: usize = 300;

/// The policy of the authorization step, as an operator would apply it.
const BACKEND_POLICY: &str = "\
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: backend-api-readers
  namespace: demo
spec:
  selector:
    matchLabels:
      app: backend
  action: ALLOW
  rules:
    - from:
        - principals: [\"spiffe://cluster.local/ns/demo/sa/frontend\"]
      to:
        - methods: [\"GET\"]
          paths: [\"/api/*\"]
";

/// A step that did not do what it promised.
#[derive(Debug)]
struct StepFailed {
    step: &'static str,
    reason: String,
}

type StepResult<T = ()> = Result<T, StepFailed>;

trait OrFail<T> {
    fn or_fail(self, step: &'static str) -> StepResult<T>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, step: &'static str) -> StepResult<T> {
        self.map_err(|e| StepFailed {
            step,
            reason: e.to_string(),
        })
    }
}

fn check(ok: bool, step: &'static str, reason: impl FnOnce() -> String) -> StepResult {
    if ok {
        Ok(())
    } else {
        Err(StepFailed {
            step,
            reason: reason(),
        })
    }
}

/// Runs the demo on a runtime of its own; the exit code says whether every
/// step passed.
pub fn main(keep_running: bool) -> std::io::Result<ExitCode> {
    init_tracing("error", LogFormat::Plain);
    let runtime = build_runtime(1)?;
    runtime.block_on(async {
        let started = Instant::now();
        match run(keep_running).await {
            Ok(()) => {
                println!(
                    "\nAll steps passed in {:.1}s.",
                    started.elapsed().as_secs_f64()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(failed) => {
                eprintln!("\nFAILED at step \"{}\": {}", failed.step, failed.reason);
                Ok(ExitCode::FAILURE)
            }
        }
    })
}

fn tls_settings() -> TlsSettings {
    TlsSettings {
        clock_skew: Duration::from_secs(60),
        resumption: false,
        key_exchange: KxGroup::DEFAULT.to_vec(),
    }
}

/// Why an identity could not be issued into a directory.
#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error(transparent)]
    Store(#[from] crate::ca::store::StoreError),
    #[error(transparent)]
    Sign(#[from] crate::ca::issuer::IssueError),
    #[error(transparent)]
    Write(#[from] secret_dir::WriteError),
}

fn issue(ca: &CaDir, id: &SpiffeId, out: &Path, extra_bundle: &str) -> Result<String, IssueError> {
    let svid = ca.signing_ca()?.issue(
        id,
        Duration::from_secs(86400),
        time::OffsetDateTime::now_utc(),
    )?;
    let bundle = format!("{}{extra_bundle}", ca.root_pem()?);
    secret_dir::publish_identity(out, &svid.chain_pem, &svid.key_pem, &bundle)?;
    Ok(svid.serial)
}

/// Where a sidecar takes its authorization policy from.
struct PolicyFiles<'a> {
    dir: &'a Path,
    labels: &'a str,
    /// The CA of the identity provider whose keys it fetches.
    jwks_ca: &'a Path,
}

fn sidecar_config(
    dir: &Path,
    id: &SpiffeId,
    app: Option<SocketAddr>,
    peer: Option<(SocketAddr, &SpiffeId)>,
    policy: Option<PolicyFiles<'_>>,
    inbound_listen: &str,
) -> Result<Config, crate::config::ConfigError> {
    let mut file = FileConfig::default();
    file.identity.reload_debounce = Duration::from_millis(50);
    file.identity.reload_poll_interval = Duration::from_secs(2);
    file.policy.reload_debounce = Duration::from_millis(50);
    file.shutdown_grace_period = Duration::from_secs(5);
    file.apply(&Overrides {
        policy_source: policy.as_ref().map(|_| "files".into()),
        policy_dir: policy.as_ref().map(|p| p.dir.to_path_buf()),
        workload_labels: policy.as_ref().map(|p| p.labels.to_string()),
        jwks_ca_file: policy.as_ref().map(|p| p.jwks_ca.to_path_buf()),
        identity_dir: Some(dir.to_path_buf()),
        identity_id: Some(id.to_string()),
        mtls_mode: Some("strict".into()),
        inbound_listen: Some(inbound_listen.into()),
        inbound_app: app.map(|a| a.to_string()),
        outbound_listen: Some("127.0.0.1:0".into()),
        outbound_peer: peer.map(|(a, _)| a.to_string()),
        outbound_peer_id: peer.map(|(_, id)| id.to_string()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..Overrides::default()
    })?;
    file.validate()
}

fn current(sidecar: &Sidecar) -> Option<Arc<Credentials>> {
    sidecar.credentials.borrow().clone()
}

async fn run(keep_running: bool) -> StepResult {
    const S1: &str = "create a CA and issue identities";
    println!("[1/{STEPS}] {S1}");
    let workdir = tempfile::tempdir().or_fail(S1)?;
    let ca = CaDir::new(workdir.path().join("ca"));
    let td = TrustDomain::parse("cluster.local").or_fail(S1)?;
    ca.init(
        &td,
        Duration::from_secs(86400 * 365),
        Duration::from_secs(86400 * 30),
        false,
        time::OffsetDateTime::now_utc(),
    )
    .or_fail(S1)?;
    let frontend_id = SpiffeId::workload(&td, "demo", "frontend").or_fail(S1)?;
    let backend_id = SpiffeId::workload(&td, "demo", "backend").or_fail(S1)?;
    let frontend_dir = workdir.path().join("frontend");
    let backend_dir = workdir.path().join("backend");
    issue(&ca, &frontend_id, &frontend_dir, "").or_fail(S1)?;
    let mut backend_serial = issue(&ca, &backend_id, &backend_dir, "").or_fail(S1)?;
    println!("      CA in {}", workdir.path().join("ca").display());
    println!("      {frontend_id}");
    println!("      {backend_id} (serial {backend_serial})");

    const S2: &str = "start the apps and their sidecars";
    println!("[2/{STEPS}] {S2}");
    let backend_app = spawn_identity_app("backend").await.or_fail(S2)?;
    // The backend's sidecar watches a policy directory, empty for now: the
    // mesh default (allow-all) applies until step 6.
    let policy_dir = workdir.path().join("policies");
    std::fs::create_dir(&policy_dir).or_fail(S2)?;
    // The identity provider of step 9, whose CA the backend trusts.
    let issuer = issuer::Issuer::start(&workdir.path().join("issuer"))
        .await
        .or_fail(S2)?;
    let backend_policy = PolicyFiles {
        dir: &policy_dir,
        labels: "app=backend",
        jwks_ca: &issuer.ca_file,
    };
    let backend = Sidecar::start(
        &sidecar_config(
            &backend_dir,
            &backend_id,
            Some(backend_app),
            None,
            Some(backend_policy),
            "127.0.0.1:0",
        )
        .or_fail(S2)?,
    )
    .await
    .or_fail(S2)?;
    let backend_inbound = backend.inbound.ok_or("no inbound listener").or_fail(S2)?;
    let frontend = Sidecar::start(
        &sidecar_config(
            &frontend_dir,
            &frontend_id,
            None,
            Some((backend_inbound, &backend_id)),
            None,
            "127.0.0.1:0",
        )
        .or_fail(S2)?,
    )
    .await
    .or_fail(S2)?;
    let frontend_outbound = frontend
        .outbound
        .ok_or("no outbound listener")
        .or_fail(S2)?;
    check(
        current(&backend).is_some() && current(&frontend).is_some(),
        S2,
        || "a sidecar did not load its identity".into(),
    )?;
    println!(
        "      backend app {backend_app} <- backend sidecar inbound {backend_inbound} (strict mTLS)"
    );
    println!("      frontend app -> frontend sidecar outbound {frontend_outbound} -> backend");

    const S3: &str = "frontend calls backend through the mesh";
    println!("[3/{STEPS}] {S3}");
    let mut client = HttpClient::connect(frontend_outbound).await.or_fail(S3)?;
    for _ in 0..3 {
        let (status, body) = client.get("/hello").await.or_fail(S3)?;
        check(status == 200, S3, || format!("status {status}"))?;
        let expected = format!("backend saw caller {frontend_id}\n");
        check(body == expected, S3, || {
            format!("backend answered {body:?}")
        })?;
    }
    println!("      3 requests, each answered: \"backend saw caller {frontend_id}\"");
    let mut admin = HttpClient::connect(backend.admin).await.or_fail(S3)?;
    let (_, metrics) = admin.get("/metrics").await.or_fail(S3)?;
    // A handshake counted with the hybrid's group label, not merely listed.
    let hybrid = metrics.lines().any(|l| {
        l.starts_with("outrider_tls_handshakes_total{")
            && l.contains("group=\"x25519mlkem768\"")
            && l.rsplit(' ')
                .next()
                .and_then(|count| count.parse::<f64>().ok())
                .is_some_and(|count| count > 0.0)
    });
    check(hybrid, S3, || {
        "the sidecars did not agree on X25519MLKEM768".into()
    })?;
    println!("      key exchange between the sidecars: X25519MLKEM768 (post-quantum hybrid)");

    const S4: &str = "strangers are refused";
    println!("[4/{STEPS}] {S4}");
    let foreign = CaDir::new(workdir.path().join("foreign-ca"));
    foreign
        .init(
            &td,
            Duration::from_secs(86400),
            Duration::from_secs(86400),
            false,
            time::OffsetDateTime::now_utc(),
        )
        .or_fail(S4)?;
    let intruder_dir = workdir.path().join("intruder");
    // The intruder trusts our root so that it gets as far as presenting
    // its own certificate; the backend must then refuse it.
    let our_root = ca.root_pem().or_fail(S4)?;
    let intruder_id = SpiffeId::workload(&td, "demo", "frontend").or_fail(S4)?;
    issue(&foreign, &intruder_id, &intruder_dir, &our_root).or_fail(S4)?;
    let intruder = Arc::new(
        Credentials::from_raw(
            &RawCredentials::read_dir(&intruder_dir).or_fail(S4)?,
            &intruder_id,
            UnixTime::now(),
            Duration::from_secs(60),
        )
        .or_fail(S4)?,
    );
    let served = is_served(backend_inbound, intruder, &tls_settings())
        .await
        .or_fail(S4)?;
    check(!served, S4, || {
        "the backend served a client certificate from a foreign CA".into()
    })?;
    println!("      a client claiming {intruder_id} with a certificate from another CA: refused");
    let plaintext = HttpClient::connect(backend_inbound)
        .await
        .or_fail(S4)?
        .get("/")
        .await;
    check(plaintext.is_err(), S4, || {
        format!("plaintext got {plaintext:?}")
    })?;
    println!(
        "      a plaintext request straight to the backend's inbound port: refused (strict mode)"
    );

    const S5: &str = "rotate the backend's identity under load";
    println!("[5/{STEPS}] {S5} ({ROTATIONS} rotations, {LOAD_CLIENTS} clients)");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..LOAD_CLIENTS {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut client = HttpClient::connect(frontend_outbound).await.ok();
            while !stop.load(Ordering::Relaxed) {
                let answered = match client.as_mut() {
                    Some(c) => matches!(c.get("/load").await, Ok((s, _)) if s == 200),
                    None => false,
                };
                if answered {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    client = HttpClient::connect(frontend_outbound).await.ok();
                }
            }
        }));
    }
    let frontend_creds = current(&frontend)
        .ok_or("frontend has no identity")
        .or_fail(S5)?;
    for round in 1..=ROTATIONS {
        let before = backend_serial.clone();
        backend_serial = issue(&ca, &backend_id, &backend_dir, "").or_fail(S5)?;
        let started = Instant::now();
        loop {
            let leaf = served_leaf(backend_inbound, frontend_creds.clone(), &tls_settings())
                .await
                .or_fail(S5)?;
            if leaf.serial == backend_serial {
                break;
            }
            check(started.elapsed() < Duration::from_secs(10), S5, || {
                format!(
                    "still serving {} 10s after rotating away from {before}",
                    leaf.serial
                )
            })?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "      rotation {round}: new handshakes get serial {backend_serial} after {} ms",
            started.elapsed().as_millis()
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    check(failed == 0 && ok > 0, S5, || {
        format!("{ok} requests succeeded, {failed} failed")
    })?;
    println!("      {ok} requests during the rotations, 0 failed");

    const S6: &str = "an authorization policy, applied live";
    println!("[6/{STEPS}] {S6}");
    let policy_file = policy_dir.join("backend.yaml");
    std::fs::write(&policy_file, BACKEND_POLICY).or_fail(S6)?;
    println!(
        "      wrote {}: frontend may call backend only with GET /api/*",
        policy_file.display()
    );
    let mut client = HttpClient::connect(frontend_outbound).await.or_fail(S6)?;
    let started = Instant::now();
    // The sidecar picks the file up after its debounce; until then the
    // mesh default still allows everything.
    let (status, body) = loop {
        let (status, body) = client
            .request(Method::DELETE, "/api/orders/7")
            .await
            .or_fail(S6)?;
        if status != StatusCode::OK {
            break (status, body);
        }
        check(started.elapsed() < Duration::from_secs(5), S6, || {
            "the policy was not in force 5s after it was written".into()
        })?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let in_force_after = started.elapsed();
    check(status == StatusCode::FORBIDDEN, S6, || {
        format!("DELETE /api/orders/7 answered {status}")
    })?;
    let (allowed_status, allowed_body) = client.get("/api/orders").await.or_fail(S6)?;
    check(allowed_status == StatusCode::OK, S6, || {
        format!("GET /api/orders answered {allowed_status}")
    })?;
    println!("      in force after {} ms", in_force_after.as_millis());
    println!(
        "      GET /api/orders      -> {allowed_status}: {}",
        allowed_body.trim_end()
    );
    println!(
        "      DELETE /api/orders/7 -> {status}: {}",
        body.trim_end()
    );
    let mut admin = HttpClient::connect(backend.admin).await.or_fail(S6)?;
    let (_, metrics) = admin.get("/metrics").await.or_fail(S6)?;
    let denials = metrics.lines().find(|l| {
        l.starts_with("outrider_authz_decisions_total{") && l.contains("decision=\"deny\"")
    });
    check(denials.is_some(), S6, || "no deny counted".into())?;
    println!("      {}", denials.unwrap_or_default());

    const S7: &str = "metrics";
    println!("[7/{STEPS}] {S7}");
    let mut admin = HttpClient::connect(backend.admin).await.or_fail(S7)?;
    let (status, metrics) = admin.get("/metrics").await.or_fail(S7)?;
    check(status == 200, S7, || format!("/metrics answered {status}"))?;
    let interesting = [
        "outrider_http_requests_total{",
        "outrider_tls_handshake_failures_total{",
        "outrider_identity_reloads_total ",
        "outrider_identity_cert_expiration_timestamp_seconds ",
    ];
    for prefix in interesting {
        let line = metrics.lines().find(|l| l.starts_with(prefix));
        check(line.is_some(), S7, || format!("no {prefix} series"))?;
        println!("      {}", line.unwrap_or_default());
    }
    println!("      backend metrics:  http://{}/metrics", backend.admin);
    println!("      frontend metrics: http://{}/metrics", frontend.admin);

    const S8: &str = "three replicas behind one Service address";
    println!("[8/{STEPS}] {S8}");
    let replicas = replicas::Replicas::start(
        workdir.path(),
        &ca,
        &td,
        (&backend_dir, &backend_id),
        (&frontend_dir, &frontend_id),
    )
    .await
    .or_fail(S8)?;
    println!(
        "      {} -> discovery -> {} (each must present {backend_id}); {} answers {} ms late",
        replicas::SERVICE_ADDR,
        replicas::NAMES.join(", "),
        replicas::NAMES[2],
        replicas::SLOW.as_millis()
    );
    let mut client = HttpClient::connect(replicas.frontend_outbound)
        .await
        .or_fail(S8)?;
    let mut counts = [0usize; replicas::NAMES.len()];
    for _ in 0..BALANCED_REQUESTS {
        let (status, body) = client.get("/balanced").await.or_fail(S8)?;
        check(status == 200, S8, || format!("status {status}: {body}"))?;
        let replica = replicas::NAMES
            .iter()
            .position(|name| body.starts_with(&format!("{name} saw caller {frontend_id}")));
        let Some(replica) = replica else {
            return Err(StepFailed {
                step: S8,
                reason: format!("unexpected answer {body:?}"),
            });
        };
        counts[replica] += 1;
    }
    for (name, count) in replicas::NAMES.iter().zip(counts) {
        println!("      {name}: {count} of {BALANCED_REQUESTS} requests");
    }
    let share = |n: usize| n as f64 / BALANCED_REQUESTS as f64;
    check(
        share(counts[0]) >= 0.2 && share(counts[1]) >= 0.2 && share(counts[2]) < 0.15,
        S8,
        || format!("one keep-alive connection's requests did not spread as expected: {counts:?}"),
    )?;
    println!("      one keep-alive connection, spread per request; the slow replica gets little");
    check(replicas.shutdown().await, S8, || {
        "a replica's sidecar did not drain cleanly".into()
    })?;

    const S9: &str = "tokens from an identity provider, and a rate limit";
    println!("[9/{STEPS}] {S9}");
    tokens::run(&policy_dir, frontend_outbound, &issuer)
        .await
        .or_fail(S9)?;

    const S10: &str = "shut down";
    if keep_running {
        println!("\nThe mesh keeps running. Try:");
        println!("  curl http://{frontend_outbound}/api/hello        (allowed)");
        println!("  curl -X POST http://{frontend_outbound}/api/hello (403)");
        println!("  curl http://{}/metrics", backend.admin);
        println!(
            "Identities live in {}; Ctrl-C to stop.",
            workdir.path().display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("[10/{STEPS}] {S10}");
    let (a, b) = tokio::join!(frontend.shutdown(), backend.shutdown());
    check(
        a == crate::lifecycle::Drained::Clean && b == crate::lifecycle::Drained::Clean,
        S10,
        || "connections were still open at the end of the grace period".into(),
    )?;
    println!("      both sidecars drained cleanly");
    Ok(())
}
