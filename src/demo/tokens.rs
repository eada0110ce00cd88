//! The demo's request-authentication step: the backend's sidecar verifies
//! tokens from the demo's issuer ([`super::issuer`]), a private route
//! needs one, and a burst over the frontend's rate limit is turned away.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use super::app::HttpClient;
use super::issuer::{AUDIENCE, ISSUER, Issuer};

/// Requests of the burst; the limit lets 20 through.
const BURST: usize = 100;
const PER_CALLER: u32 = 20;

/// The objects the step applies, as an operator would.
fn policies(jwks_uri: &str) -> String {
    format!(
        "\
apiVersion: security.outrider.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: demo-issuer, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  jwtRules:
    - issuer: {ISSUER}
      audiences: [{AUDIENCE}]
      jwksUri: {jwks_uri}
---
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: private-needs-a-user, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  action: DENY
  rules:
    - from: [{{notRequestPrincipals: [\"*\"]}}]
      to: [{{paths: [\"/api/private/*\"]}}]
---
apiVersion: security.outrider.dev/v1alpha1
kind: LocalRateLimitPolicy
metadata: {{name: burst-limit, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  limits:
    - match: {{paths: [\"/api/burst\"]}}
      perClient: {{requestsPerSecond: {PER_CALLER}, burst: {PER_CALLER}}}
"
    )
}

/// Runs the step, printing what it sees; `Err` says what went wrong.
pub async fn run(policy_dir: &Path, frontend: SocketAddr, issuer: &Issuer) -> Result<(), String> {
    let file = policy_dir.join("tokens.yaml");
    std::fs::write(&file, policies(&issuer.jwks_uri)).map_err(|e| e.to_string())?;
    println!(
        "      wrote {}: tokens from {ISSUER} (keys at {}), /api/private/* needs one, /api/burst is limited to {PER_CALLER}/s per caller",
        file.display(),
        issuer.jwks_uri
    );
    let good = issuer.mint("alice", 600).map_err(|e| e.to_string())?;
    let expired = issuer.mint("alice", -600).map_err(|e| e.to_string())?;
    let mut client = HttpClient::connect(frontend)
        .await
        .map_err(|e| e.to_string())?;
    // The sidecar picks the file up after its debounce.
    let started = Instant::now();
    let (status, body) = loop {
        let answer = client
            .send(Method::GET, "/api/private/report", None)
            .await
            .map_err(|e| e.to_string())?;
        if answer.0 == StatusCode::FORBIDDEN || started.elapsed() > Duration::from_secs(5) {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    expect(
        status,
        StatusCode::FORBIDDEN,
        "no token on a private route",
        &body,
    )?;
    println!("      GET /api/private/report, no token      -> {status}");
    let (status, body) = client
        .send(Method::GET, "/api/private/report", Some(&good))
        .await
        .map_err(|e| e.to_string())?;
    expect(status, StatusCode::OK, "a valid token", &body)?;
    if !body.contains(&format!("as {ISSUER}/alice")) {
        return Err(format!("the backend did not see the principal: {body:?}"));
    }
    println!(
        "      GET /api/private/report, alice's token -> {status}: {}",
        body.trim_end()
    );
    let (status, body) = client
        .send(Method::GET, "/api/orders", Some(&expired))
        .await
        .map_err(|e| e.to_string())?;
    expect(status, StatusCode::UNAUTHORIZED, "an expired token", &body)?;
    println!("      GET /api/orders, an expired token      -> {status}");
    let (mut passed, mut limited) = (0, 0);
    for _ in 0..BURST {
        let (status, _) = client
            .send(Method::GET, "/api/burst", None)
            .await
            .map_err(|e| e.to_string())?;
        match status {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => return Err(format!("the burst got {other}")),
        }
    }
    println!("      a burst of {BURST} to /api/burst: {passed} passed, {limited} got 429");
    // The burst takes well under a second: about one second's worth
    // passes, plus what refills meanwhile.
    if limited == 0 || passed < PER_CALLER as usize {
        return Err(format!("{passed} passed and {limited} were limited"));
    }
    Ok(())
}

fn expect(got: StatusCode, want: StatusCode, what: &str, body: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: {got} (wanted {want}): {}",
            body.trim_end()
        ))
    }
}
