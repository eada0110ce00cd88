//! The command line: subcommands, flags (each with an environment
//! variable), and what each subcommand does at the top level. With
//! `main.rs`, the only place that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use rustls_pki_types::UnixTime;

use crate::app::Sidecar;
use crate::ca::secret_dir;
use crate::ca::store::CaDir;
use crate::config::{Config, ConfigError, FileConfig, LogFormat, Overrides};
use crate::identity::{SpiffeId, TrustDomain};
use crate::units::{format_utc, parse_duration};

/// Exit code for a bad configuration (sysexits EX_USAGE). Command-line
/// syntax errors exit 2, as clap and most tools do.
pub const EXIT_USAGE: u8 = 64;
/// Exit code of `policy check` and of command-line syntax errors.
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "outrider",
    version,
    about = "A service-mesh sidecar proxy with SPIFFE identities and mutual TLS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar proxy.
    Proxy(Box<ProxyArgs>),
    /// Manage a local mesh CA and workload certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a local two-workload mesh on loopback and show it working.
    Demo(DemoArgs),
    /// Print the CustomResourceDefinitions (YAML) for `kubectl apply -f -`.
    Crds(CrdsArgs),
    /// Work with authorization policies offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Install the iptables rules that send the pod's TCP through its
    /// proxy (run as the pod's init container, with NET_ADMIN).
    Init(InitArgs),
    /// Add the sidecar to Kubernetes manifests offline (the webhook's
    /// transformation): Pods and the pod templates of workloads; other
    /// documents pass through unchanged.
    Inject(InjectArgs),
    /// Run the control plane: the mesh CA issuing identity Secrets, and
    /// the injection webhook (see docs/install.md).
    Controller(Box<ControllerArgs>),
}

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
    #[arg(long, env = "OUTRIDER_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Create the CA Secret (anchor and issuer) if it does not exist.
    #[arg(long, env = "OUTRIDER_BOOTSTRAP_CA", default_value_t = true, action = clap::ArgAction::Set)]
    pub bootstrap_ca: bool,
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    pub anchor_lifetime: Duration,
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub issuer_lifetime: Duration,
    /// Lifetime of workload identities (renewed at a third remaining).
    #[arg(long, env = "OUTRIDER_IDENTITY_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub identity_lifetime: Duration,
    /// Warn (logs) this long before the issuer or an anchor expires.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    pub expiry_warning: Duration,
    #[arg(long, env = "OUTRIDER_ADMIN_LISTEN", default_value = "0.0.0.0:9990")]
    pub admin_listen: std::net::SocketAddr,
    #[arg(long, env = "OUTRIDER_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: std::net::SocketAddr,
    /// The webhook's Service name (its DNS names go into the certificate).
    #[arg(long, default_value = "outrider-webhook")]
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "outrider-injector")]
    pub webhook_config: String,
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub webhook_cert_lifetime: Duration,
    /// Injection values (YAML), as for `outrider inject --config`.
    #[arg(long, env = "OUTRIDER_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
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
    #[arg(long, env = "OUTRIDER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "OUTRIDER_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The manifest file, or `-` for standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub file: String,
    /// Injection values (YAML, the `inject` section the chart renders for
    /// the controller); defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The proxy image (overrides the config's `image`).
    #[arg(long)]
    pub image: Option<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The proxy's inbound listener port.
    #[arg(long, env = "OUTRIDER_INIT_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// The proxy's outbound listener port.
    #[arg(long, env = "OUTRIDER_INIT_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// The proxy's admin port: reached directly, never redirected.
    #[arg(long, env = "OUTRIDER_INIT_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// The UID the proxy runs as; its traffic is never captured.
    #[arg(long, env = "OUTRIDER_INIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Inbound ports that bypass the proxy, e.g. `22,9000-9010`.
    #[arg(long, env = "OUTRIDER_INIT_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound destination ports that bypass the proxy.
    #[arg(long, env = "OUTRIDER_INIT_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: String,
    /// Outbound destination CIDRs that bypass the proxy.
    #[arg(long, env = "OUTRIDER_INIT_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: String,
    /// auto (follow the flavor already in use, nft on a tie), nft or legacy.
    #[arg(long, env = "OUTRIDER_INIT_IPTABLES_MODE", default_value = "auto")]
    pub iptables_mode: String,
    /// Print the iptables-restore documents instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// YAML configuration file (see docs/configuration.md).
    #[arg(long, env = "OUTRIDER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check: bool,
    /// Tokio worker threads; 1 runs everything on the current thread.
    #[arg(long, env = "OUTRIDER_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    #[arg(long, env = "OUTRIDER_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// The SPIFFE ID this workload's certificate must carry.
    #[arg(long, env = "OUTRIDER_IDENTITY_ID")]
    pub identity_id: Option<String>,
    /// strict or permissive.
    #[arg(long, env = "OUTRIDER_MTLS_MODE")]
    pub mtls_mode: Option<String>,
    #[arg(long, env = "OUTRIDER_INBOUND_LISTEN")]
    pub inbound_listen: Option<String>,
    /// Static mode: forward inbound traffic to this address.
    #[arg(long, env = "OUTRIDER_INBOUND_APP")]
    pub inbound_app: Option<String>,
    /// detect or opaque.
    #[arg(long, env = "OUTRIDER_INBOUND_PROTOCOL")]
    pub inbound_protocol: Option<String>,
    #[arg(long, env = "OUTRIDER_OUTBOUND_LISTEN")]
    pub outbound_listen: Option<String>,
    /// Static mode: send outbound traffic to this peer proxy.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PEER")]
    pub outbound_peer: Option<String>,
    /// The SPIFFE ID the static peer must present.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PEER_ID")]
    pub outbound_peer_id: Option<String>,
    /// detect or opaque.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PROTOCOL")]
    pub outbound_protocol: Option<String>,
    #[arg(long, env = "OUTRIDER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Enable TLS 1.3 session resumption.
    #[arg(long, env = "OUTRIDER_TLS_RESUMPTION")]
    pub tls_resumption: Option<bool>,
    /// Comma-separated key-exchange groups (x25519, secp256r1, secp384r1).
    #[arg(long, env = "OUTRIDER_TLS_KEY_EXCHANGE")]
    pub tls_key_exchange: Option<String>,
    /// A tracing filter such as `info` or `outrider=debug`.
    #[arg(long, env = "OUTRIDER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// plain or json.
    #[arg(long, env = "OUTRIDER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// The workload's namespace (default: the one in --identity-id).
    #[arg(long, env = "OUTRIDER_WORKLOAD_NAMESPACE")]
    pub workload_namespace: Option<String>,
    /// The workload's labels, `key=value,key=value` (local mode).
    #[arg(long, env = "OUTRIDER_WORKLOAD_LABELS")]
    pub workload_labels: Option<String>,
    /// A downward-API file holding the workload's labels (cluster mode).
    #[arg(long, env = "OUTRIDER_WORKLOAD_LABELS_FILE")]
    pub workload_labels_file: Option<PathBuf>,
    /// none, files or kubernetes.
    #[arg(long, env = "OUTRIDER_POLICY_SOURCE")]
    pub policy_source: Option<String>,
    /// The directory of policy YAML (policy source `files`).
    #[arg(long, env = "OUTRIDER_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// allow-all, allow-authenticated, allow-same-namespace or deny.
    #[arg(long, env = "OUTRIDER_POLICY_DEFAULT")]
    pub policy_default: Option<String>,
    /// Kubelet probes always allowed, `PORT` or `PORT/path`, comma-separated
    /// (the injector fills it from the pod's probes).
    #[arg(long, env = "OUTRIDER_POLICY_PROBES")]
    pub policy_probes: Option<String>,
    /// Ports that skip protocol detection, comma-separated (replaces the
    /// default list).
    #[arg(long, env = "OUTRIDER_OPAQUE_PORTS")]
    pub opaque_ports: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a trust anchor (root) and an issuer (intermediate).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "87600h", value_parser = parse_duration)]
        root_ttl: Duration,
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        issuer_ttl: Duration,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload identity into a Secret-style directory (a rotation
    /// if OUT already holds one).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long)]
        out: PathBuf,
        /// Another root to trust as well (trust-anchor rotation); repeatable.
        #[arg(long)]
        extra_root: Vec<PathBuf>,
    },
    /// Replace the issuer in DIR with a new one signed by the same trust
    /// anchor (needs DIR/root.key); then publish it with `ca secret`.
    RotateIssuer {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        issuer_ttl: Duration,
    },
    /// Print the `outrider-ca` Secret (YAML, for `kubectl apply -f -`)
    /// holding the issuer from a CA directory and the given trust bundle;
    /// checked exactly as the controller will check it. The anchor
    /// rotation runbook (docs/operations.md) is three of these.
    Secret {
        /// A directory from `ca init` whose issuer signs identities.
        #[arg(long)]
        issuer_dir: PathBuf,
        /// A root certificate to trust (repeatable; the bundle).
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long, default_value = "outrider-system")]
        namespace: String,
    },
    /// Describe a certificate and check it is a valid X509-SVID now.
    Inspect {
        file: PathBuf,
        /// Also verify the chain against this bundle.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Write one file per CRD into this directory instead of printing
    /// (how `manifests/crds/` is generated).
    #[arg(long)]
    pub write: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Explain whether a request would be allowed: prints ALLOW or DENY,
    /// the deciding policy and rule, and every AUDIT match. Exits 0 on
    /// allow, 1 on deny, 2 on bad input.
    Check(Box<PolicyCheckArgs>),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("caller").required(true).args(["source", "unauthenticated"])))]
pub struct PolicyCheckArgs {
    /// Policy YAML files or directories (multi-document, as for kubectl);
    /// repeatable.
    #[arg(long = "policies", short = 'f', required = true)]
    pub policies: Vec<PathBuf>,
    /// The target workload's namespace (also the namespace of objects that
    /// name none).
    #[arg(long)]
    pub namespace: String,
    /// The target workload's labels, `key=value,key=value`.
    #[arg(long, default_value = "")]
    pub labels: String,
    /// The target workload port.
    #[arg(long)]
    pub port: u16,
    /// The caller's SPIFFE ID (an mTLS peer).
    #[arg(long)]
    pub source: Option<String>,
    /// The caller has no mesh identity (plaintext).
    #[arg(long)]
    pub unauthenticated: bool,
    /// The caller's IP address (matched by ipBlocks).
    #[arg(long, default_value = "0.0.0.0")]
    pub ip: std::net::IpAddr,
    /// An HTTP method; with --path, the request is HTTP (else opaque TCP).
    #[arg(long, requires = "path")]
    pub method: Option<String>,
    #[arg(long, requires = "method")]
    pub path: Option<String>,
    /// The mesh default: allow-all, allow-authenticated,
    /// allow-same-namespace or deny.
    #[arg(long, default_value = "allow-all")]
    pub default: String,
    /// The mesh mTLS mode: strict or permissive.
    #[arg(long, default_value = "permissive")]
    pub mtls_mode: String,
    /// A kubelet probe exemption, `PORT` or `PORT/path`; repeatable.
    #[arg(long)]
    pub probe: Vec<String>,
    /// Treat an invalid policy object as bad input (exit 2) instead of
    /// explaining with its fail-safe form.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave the mesh running after the steps, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::crypto::install_default();
    match cli.command {
        Command::Proxy(args) => run_proxy(*args),
        Command::Ca(command) => run_ca(command),
        Command::Demo(args) => crate::demo::main(args.keep_running),
        Command::Crds(args) => {
            use crate::policy::crd;
            match args.write {
                None => print!("{}", crd::crds_yaml().context("rendering the CRDs")?),
                Some(dir) => {
                    for (name, yaml) in crd::crd_files().context("rendering the CRDs")? {
                        let path = dir.join(name);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check(args)) => Ok(run_policy_check(&args)),
        Command::Init(args) => run_init(&args),
        Command::Inject(args) => Ok(run_inject(&args)),
        Command::Controller(args) => run_controller(*args),
    }
}

// === inject ===

/// Injection values from a YAML file, or the defaults.
fn load_inject_config(
    path: Option<&std::path::Path>,
) -> Result<crate::inject::InjectConfig, String> {
    let Some(path) = path else {
        return Ok(crate::inject::InjectConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {e}", path.display()))
}

// === controller ===

fn run_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let invalid = |message: String| {
        eprintln!("outrider controller: {message}");
        Ok(ExitCode::from(EXIT_USAGE))
    };
    // Parsed as the proxy's `log.format` is: a typo is an error, not plain.
    let format: LogFormat =
        match serde_yaml::from_value(serde_yaml::Value::String(args.log_format.clone())) {
            Ok(format) => format,
            Err(_) => {
                return invalid(format!(
                    "--log-format: {:?}: expected plain or json",
                    args.log_format
                ));
            }
        };
    init_tracing(&args.log_level, format);
    let trust_domain = match TrustDomain::parse(&args.trust_domain) {
        Ok(td) => td,
        Err(e) => return invalid(format!("--trust-domain: {e}")),
    };
    let inject = match load_inject_config(args.inject_config.as_deref()).and_then(|c| {
        c.validate()
            .map(|()| c)
            .map_err(|e| format!("--inject-config: {e}"))
    }) {
        Ok(inject) => inject,
        Err(e) => return invalid(e),
    };
    if inject.trust_domain != trust_domain.as_str() {
        return invalid(format!(
            "--inject-config: trustDomain {} differs from --trust-domain {trust_domain}",
            inject.trust_domain
        ));
    }
    if args.lease_renew_deadline >= args.lease_duration {
        return invalid("--lease-renew-deadline must be shorter than --lease-duration".into());
    }
    let replica = args
        .replica_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("outrider-controller-{}", std::process::id()));
    let config = crate::controller::ControllerConfig {
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
        lease: crate::controller::lease::LeaseTiming {
            lease_duration: args.lease_duration,
            renew_deadline: args.lease_renew_deadline,
            retry_period: args.lease_retry,
        },
        resync: args.resync,
    };
    let runtime = build_runtime(2)?;
    runtime.block_on(crate::controller::run(config, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn run_inject(args: &InjectArgs) -> ExitCode {
    use crate::inject::{Outcome, manifest};
    use std::io::Read;
    let fail = |message: String, code: u8| {
        eprintln!("outrider inject: {message}");
        ExitCode::from(code)
    };
    let config = load_inject_config(args.config.as_deref()).map(|mut config| {
        if let Some(image) = &args.image {
            config.image = image.clone();
        }
        config
    });
    let config = match config.and_then(|c| {
        c.validate()
            .map(|()| c)
            .map_err(|e| format!("invalid values: {e}"))
    }) {
        Ok(config) => config,
        Err(e) => return fail(e, EXIT_USAGE),
    };
    let input = if args.file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map(|_| text)
            .map_err(|e| format!("stdin: {e}"))
    } else {
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file))
    };
    let input = match input {
        Ok(input) => input,
        Err(e) => return fail(e, EXIT_BAD_INPUT),
    };
    match manifest::inject_manifests(&input, &config) {
        Ok((output, reports)) => {
            print!("{output}");
            for report in reports {
                let what = match report.outcome {
                    None => continue,
                    Some(Outcome::Injected { probes }) if probes.is_empty() => {
                        "injected".to_string()
                    }
                    Some(Outcome::Injected { probes }) => {
                        let list: Vec<String> = probes
                            .iter()
                            .map(|p| match &p.path {
                                Some(path) => format!("{}{path}", p.port),
                                None => format!("{} (whole port)", p.port),
                            })
                            .collect();
                        format!("injected; probes allowed: {}", list.join(", "))
                    }
                    Some(Outcome::AlreadyInjected) => "already injected".to_string(),
                    Some(Outcome::HostNetwork) => {
                        "skipped (hostNetwork: the capture rules would apply to the node)"
                            .to_string()
                    }
                    Some(Outcome::Disabled) => {
                        "skipped (outrider.dev/inject: disabled)".to_string()
                    }
                };
                eprintln!("{}: {what}", report.object);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string(), EXIT_BAD_INPUT),
    }
}

// === init ===

fn run_init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    use crate::init::{InitRequest, rules};
    let request = (|| -> Result<InitRequest, String> {
        let mut skip_inbound_ports = vec![rules::PortRange {
            first: args.admin_port,
            last: args.admin_port,
        }];
        skip_inbound_ports.extend(
            rules::parse_ports(&args.skip_inbound_ports)
                .map_err(|e| format!("--skip-inbound-ports: {e}"))?,
        );
        Ok(InitRequest {
            capture: rules::CaptureConfig {
                inbound_port: args.inbound_port,
                outbound_port: args.outbound_port,
                proxy_uid: args.proxy_uid,
                skip_inbound_ports,
                skip_outbound_ports: rules::parse_ports(&args.skip_outbound_ports)
                    .map_err(|e| format!("--skip-outbound-ports: {e}"))?,
                skip_outbound_cidrs: rules::parse_cidrs(&args.skip_outbound_cidrs)
                    .map_err(|e| format!("--skip-outbound-cidrs: {e}"))?,
            },
            mode: args
                .iptables_mode
                .parse()
                .map_err(|e| format!("--iptables-mode: {e}"))?,
            dry_run: args.dry_run,
            cleanup: args.cleanup,
        })
    })();
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            eprintln!("outrider init: {message}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let report = crate::init::run(&request).context("outrider init")?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

// === proxy ===

fn load_config(args: &ProxyArgs) -> Result<Config, ConfigError> {
    let mut file = match &args.config {
        Some(path) => FileConfig::from_file(path)?,
        None => FileConfig::default(),
    };
    file.apply(&Overrides {
        identity_dir: args.identity_dir.clone(),
        identity_id: args.identity_id.clone(),
        mtls_mode: args.mtls_mode.clone(),
        inbound_listen: args.inbound_listen.clone(),
        inbound_app: args.inbound_app.clone(),
        inbound_protocol: args.inbound_protocol.clone(),
        outbound_listen: args.outbound_listen.clone(),
        outbound_peer: args.outbound_peer.clone(),
        outbound_peer_id: args.outbound_peer_id.clone(),
        outbound_protocol: args.outbound_protocol.clone(),
        admin_listen: args.admin_listen.clone(),
        tls_resumption: args.tls_resumption,
        tls_key_exchange: args.tls_key_exchange.clone(),
        log_level: args.log_level.clone(),
        log_format: args.log_format.clone(),
        workload_namespace: args.workload_namespace.clone(),
        workload_labels: args.workload_labels.clone(),
        workload_labels_file: args.workload_labels_file.clone(),
        policy_source: args.policy_source.clone(),
        policy_dir: args.policy_dir.clone(),
        policy_default: args.policy_default.clone(),
        policy_probes: args.policy_probes.clone(),
        opaque_ports: args.opaque_ports.clone(),
    })?;
    file.validate()
}

fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("outrider: {error}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if args.worker_threads == 0 {
        eprintln!("outrider: invalid configuration: --worker-threads: must be at least 1");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let effective =
        serde_yaml::to_string(&config.effective).context("serialising the configuration")?;
    if args.check {
        print!("{effective}");
        return Ok(ExitCode::SUCCESS);
    }
    init_tracing(&config.log.level, config.log.format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %effective, "Starting outrider proxy");

    let runtime = build_runtime(args.worker_threads)?;
    runtime.block_on(async {
        let sidecar = Sidecar::start(&config).await?;
        sidecar.run_until(shutdown_signal()).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn build_runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    };
    runtime.context("starting the async runtime")
}

/// Installs the global subscriber. `level` is `info` or a per-target list
/// such as `warn,outrider=debug` (validated with the config).
pub fn init_tracing(level: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = level.parse().unwrap_or_else(|_| {
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Plain => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("Received SIGTERM"),
                _ = int.recv() => tracing::info!("Received SIGINT"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

// === ca ===

fn run_ca(command: CaCommand) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc();
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            root_ttl,
            issuer_ttl,
            force,
        } => {
            let td = match TrustDomain::parse(&trust_domain) {
                Ok(td) => td,
                Err(error) => {
                    eprintln!("outrider: --trust-domain: {error}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let created = CaDir::new(&dir).init(&td, root_ttl, issuer_ttl, force, now)?;
            println!(
                "Created a CA for trust domain {} in {}",
                created.trust_domain,
                dir.display()
            );
            println!(
                "  root.crt, root.key       trust anchor, valid until {}",
                fmt_time(created.root_not_after)
            );
            println!(
                "  issuer.crt, issuer.key   issuer, valid until {}",
                fmt_time(created.issuer_not_after)
            );
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Issue {
            dir,
            namespace,
            service_account,
            ttl,
            out,
            extra_root,
        } => {
            let ca = CaDir::new(&dir);
            let td = ca.trust_domain()?;
            let id = match SpiffeId::workload(&td, &namespace, &service_account) {
                Ok(id) => id,
                Err(error) => {
                    eprintln!("outrider: --namespace/--service-account: {error}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let mut bundle = ca.root_pem()?;
            for path in &extra_root {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                crate::ca::inspect::parse_bundle(pem.as_bytes()).with_context(|| {
                    format!("{} is not a PEM certificate bundle", path.display())
                })?;
                if !bundle.ends_with('\n') {
                    bundle.push('\n');
                }
                bundle.push_str(&pem);
            }
            let svid = ca.signing_ca()?.issue(&id, ttl, now)?;
            secret_dir::publish_identity(&out, &svid.chain_pem, &svid.key_pem, &bundle)?;
            println!(
                "Issued {} (serial {}) valid until {} into {}",
                svid.id,
                svid.serial,
                fmt_time(svid.not_after),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::RotateIssuer { dir, issuer_ttl } => {
            let ca = CaDir::new(&dir);
            let not_after = ca
                .rotate_issuer(issuer_ttl, time::OffsetDateTime::now_utc())
                .with_context(|| format!("rotating the issuer in {}", dir.display()))?;
            println!(
                "New issuer in {}: issuer.crt, issuer.key, valid until {}",
                dir.display(),
                fmt_time(not_after)
            );
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Secret {
            issuer_dir,
            trust,
            namespace,
        } => {
            use crate::controller::ca::{
                BUNDLE_KEY, CA_SECRET, CaMaterial, ISSUER_CERT_KEY, ISSUER_KEY_KEY,
            };
            let ca = CaDir::new(&issuer_dir);
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
            };
            let issuer = read(&ca.path(crate::ca::store::ISSUER_CERT))?;
            let key = read(&ca.path(crate::ca::store::ISSUER_KEY))?;
            let mut bundle = String::new();
            for root in &trust {
                let pem = read(root)?;
                bundle.push_str(&pem);
                if !pem.ends_with('\n') {
                    bundle.push('\n');
                }
            }
            let data = std::collections::BTreeMap::from([
                (ISSUER_CERT_KEY.to_string(), issuer.into_bytes()),
                (ISSUER_KEY_KEY.to_string(), key.into_bytes()),
                (BUNDLE_KEY.to_string(), bundle.into_bytes()),
            ]);
            let td = crate::ca::store::trust_domain_of(
                std::str::from_utf8(&data[ISSUER_CERT_KEY]).unwrap_or_default(),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", issuer_dir.display()))?;
            if let Err(error) =
                CaMaterial::from_secret_data(&data, &td, time::OffsetDateTime::now_utc())
            {
                eprintln!(
                    "outrider: refusing to print a CA Secret the controller would refuse: {error}"
                );
                return Ok(ExitCode::FAILURE);
            }
            use base64::Engine as _;
            let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
            print!(
                "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata:\n  name: {CA_SECRET}\n  namespace: {namespace}\ndata:\n  {BUNDLE_KEY}: {}\n  {ISSUER_CERT_KEY}: {}\n  {ISSUER_KEY_KEY}: {}\n",
                b64(&data[BUNDLE_KEY]),
                b64(&data[ISSUER_CERT_KEY]),
                b64(&data[ISSUER_KEY_KEY]),
            );
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Inspect { file, bundle } => {
            let pem =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let bundle_pem = match &bundle {
                Some(path) => Some(
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                ),
                None => None,
            };
            match crate::ca::inspect::inspect(&pem, bundle_pem.as_deref(), UnixTime::now()) {
                Ok(report) => {
                    print!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("outrider: {}: {error}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    format_utc(t.unix_timestamp())
}

// === policy ===

fn run_policy_check(args: &PolicyCheckArgs) -> ExitCode {
    use crate::policy::check;
    let question = match policy_question(args) {
        Ok(question) => question,
        Err(error) => {
            eprintln!("outrider: {error}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let objects = match check::load(&args.policies, &args.namespace) {
        Ok(objects) => objects,
        Err(error) => {
            eprintln!("outrider: {error}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let answer = check::check(&objects, &question);
    if args.strict && !answer.warnings.is_empty() {
        for warning in &answer.warnings {
            eprintln!("outrider: {warning}");
        }
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    print!("{answer}");
    if answer.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The flags of `policy check` as a question, or what is wrong with them.
fn policy_question(args: &PolicyCheckArgs) -> Result<crate::policy::check::Question, String> {
    use crate::policy::{DefaultPolicy, MtlsMode, Probe, Settings, Workload};
    fn keyword<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T, String> {
        serde_yaml::from_value(serde_yaml::Value::String(value.to_string()))
            .map_err(|_| format!("{flag}: {value:?} is not one of the documented values"))
    }
    let default: DefaultPolicy = keyword("--default", &args.default)?;
    let mtls: MtlsMode = keyword("--mtls-mode", &args.mtls_mode)?;
    let labels = crate::config::parse_labels(&args.labels)
        .map_err(|reason| format!("--labels: {reason}"))?;
    let peer = match &args.source {
        Some(id) => Some(SpiffeId::parse(id).map_err(|e| format!("--source: {e}"))?),
        None => None,
    };
    let probes = args
        .probe
        .iter()
        .map(|text| text.parse::<Probe>().map_err(|e| format!("--probe: {e}")))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(crate::policy::check::Question {
        workload: Workload {
            namespace: args.namespace.clone(),
            labels,
        },
        settings: Settings {
            default,
            mtls,
            probes,
        },
        peer,
        source: args.ip,
        port: args.port,
        http: args.method.clone().zip(args.path.clone()),
    })
}
