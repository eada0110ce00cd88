//! `outrider controller`: flags into a checked `ControllerConfig`, then
//! the control plane until a stop signal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::UsageError;
use crate::controller::lease::LeaseTiming;
use crate::controller::{self, ControllerConfig};
use crate::identity::TrustDomain;
use crate::inject::InjectConfig;
use crate::runtime::{LogFormat, build_runtime, init_tracing, shutdown_signal};
use crate::units::{format_duration, keyword, parse_duration};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The control-plane namespace (the CA Secret and the Lease live here).
    #[arg(
        long,
        env = "OUTRIDER_CONTROLLER_NAMESPACE",
        default_value = "outrider-system"
    )]
    pub namespace: String,
    /// A kubeconfig; default: the usual inference (in-cluster in a pod).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The mesh's trust domain; identities are spiffe://<this>/ns/../sa/..
    #[arg(long, env = "OUTRIDER_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Create the CA Secret (anchor and issuer) if it does not exist.
    #[arg(long, env = "OUTRIDER_BOOTSTRAP_CA", default_value_t = true, action = clap::ArgAction::Set)]
    pub bootstrap_ca: bool,
    /// Lifetime of a bootstrapped trust anchor.
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    pub anchor_lifetime: Duration,
    /// Lifetime of a bootstrapped issuer.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub issuer_lifetime: Duration,
    /// Lifetime of workload identities (renewed at a third remaining).
    #[arg(long, env = "OUTRIDER_IDENTITY_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub identity_lifetime: Duration,
    /// Warn (logs) this long before the issuer or an anchor expires.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    pub expiry_warning: Duration,
    /// Metrics, readiness and liveness.
    #[arg(long, env = "OUTRIDER_ADMIN_LISTEN", default_value = "0.0.0.0:9990")]
    pub admin_listen: std::net::SocketAddr,
    /// The injection webhook (HTTPS).
    #[arg(long, env = "OUTRIDER_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: std::net::SocketAddr,
    /// The webhook's Service name (its DNS names go into the certificate).
    #[arg(long, default_value = "outrider-webhook")]
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "outrider-injector")]
    pub webhook_config: String,
    /// Lifetime of the webhook's serving certificate.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub webhook_cert_lifetime: Duration,
    /// The discovery gRPC server (mTLS; proxies resolve destinations here).
    #[arg(
        long,
        env = "OUTRIDER_DISCOVERY_LISTEN",
        default_value = "0.0.0.0:8090"
    )]
    pub discovery_listen: std::net::SocketAddr,
    /// Offer the post-quantum hybrid key exchange (x25519mlkem768) to
    /// proxies; `false` leaves X25519 and P-256.
    #[arg(long, env = "OUTRIDER_TLS_POST_QUANTUM", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_post_quantum: bool,
    /// The cluster's DNS domain.
    #[arg(long, env = "OUTRIDER_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// A pod whose namespace enforces a Pod Security level that would
    /// reject it once injected: refuse (saying what to do) or warn (and
    /// inject: for namespaces exempted in the admission configuration).
    #[arg(long, env = "OUTRIDER_POD_SECURITY", default_value = "refuse")]
    pub pod_security: String,
    /// Injection values (YAML), as for `outrider inject --config`.
    #[arg(long, env = "OUTRIDER_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
    /// The Lease that elects the writing replica.
    #[arg(long, default_value = "outrider-controller")]
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub lease_retry: Duration,
    /// Look at every ServiceAccount and Secret at least this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resync: Duration,
    /// A tracing filter such as `info` or `outrider=debug`.
    #[arg(long, env = "OUTRIDER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// plain or json.
    #[arg(long, env = "OUTRIDER_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let invalid = |message: String| UsageError::Config(format!("controller: {message}"));
    // Parsed as the proxy's `log.format` is: a typo is an error, not plain.
    let format: LogFormat =
        keyword(&args.log_format).map_err(|e| invalid(format!("--log-format: {e}")))?;
    crate::runtime::check_log_level(&args.log_level)
        .map_err(|e| invalid(format!("--log-level: {e}")))?;
    init_tracing(&args.log_level, format);
    let trust_domain = TrustDomain::parse(&args.trust_domain)
        .map_err(|e| invalid(format!("--trust-domain: {e}")))?;
    let inject = load_inject_config(args.inject_config.as_deref())
        .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
        .map_err(|e| invalid(format!("--inject-config: {e}")))?;
    if inject.trust_domain != trust_domain.as_str() {
        return Err(invalid(format!(
            "--inject-config: trustDomain {} differs from --trust-domain {trust_domain}",
            inject.trust_domain
        ))
        .into());
    }
    let pod_security =
        keyword(&args.pod_security).map_err(|e| invalid(format!("--pod-security: {e}")))?;
    // Every duration within reach of the clock and the certificates' dates.
    let century = Duration::from_secs(100 * 365 * 86_400);
    let second = Duration::from_secs(1);
    for (flag, value, min, max) in [
        ("--anchor-lifetime", args.anchor_lifetime, second, century),
        ("--issuer-lifetime", args.issuer_lifetime, second, century),
        (
            "--identity-lifetime",
            args.identity_lifetime,
            second,
            century,
        ),
        (
            "--expiry-warning",
            args.expiry_warning,
            Duration::ZERO,
            century,
        ),
        (
            "--webhook-cert-lifetime",
            args.webhook_cert_lifetime,
            second,
            century,
        ),
        (
            "--lease-duration",
            args.lease_duration,
            second,
            Duration::from_secs(3600),
        ),
        (
            "--lease-renew-deadline",
            args.lease_renew_deadline,
            second,
            Duration::from_secs(3600),
        ),
        (
            "--lease-retry",
            args.lease_retry,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
        ("--resync", args.resync, second, Duration::from_secs(86_400)),
    ] {
        if value < min || value > max {
            return Err(invalid(format!(
                "{flag}: {} is outside {}..={}",
                format_duration(value),
                format_duration(min),
                format_duration(max)
            ))
            .into());
        }
    }
    if args.lease_renew_deadline >= args.lease_duration {
        return Err(
            invalid("--lease-renew-deadline must be shorter than --lease-duration".into()).into(),
        );
    }
    let replica = args
        .replica_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("outrider-controller-{}", std::process::id()));
    let config = ControllerConfig {
        namespace: args.namespace,
        kubeconfig: args.kubeconfig,
        trust_domain,
        bootstrap: args.bootstrap_ca,
        anchor_lifetime: args.anchor_lifetime,
        issuer_lifetime: args.issuer_lifetime,
        identity_lifetime: args.identity_lifetime,
        expiry_warning: args.expiry_warning,
        admin_listen: args.admin_listen,
        webhook_listen: args.webhook_listen,
        webhook_service: args.webhook_service,
        webhook_config: args.webhook_config,
        webhook_cert_lifetime: args.webhook_cert_lifetime,
        inject,
        lease_name: args.lease_name,
        identity: replica,
        lease: LeaseTiming {
            lease_duration: args.lease_duration,
            renew_deadline: args.lease_renew_deadline,
            retry_period: args.lease_retry,
        },
        resync: args.resync,
        pod_security,
        discovery_listen: args.discovery_listen,
        cluster_domain: args.cluster_domain,
        post_quantum: args.tls_post_quantum,
    };
    let runtime = build_runtime(2).context("starting the async runtime")?;
    runtime.block_on(controller::run(config, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// Injection values from a YAML file, or the defaults.
pub(super) fn load_inject_config(path: Option<&Path>) -> Result<InjectConfig, String> {
    let Some(path) = path else {
        return Ok(InjectConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = crate::yaml::value(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {e}", path.display()))
}
