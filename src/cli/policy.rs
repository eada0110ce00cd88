//! `outrider policy check`: the flags as a question, the policies read
//! from files, the answer printed; exit 0 allow, 1 deny, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::PossibleValue;
use clap::{Args, Subcommand, ValueEnum};

use super::UsageError;
use crate::identity::SpiffeId;
use crate::policy::check::{self, Question};
use crate::policy::{DefaultPolicy, MtlsMode, Probe, Settings, Workload};

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
    /// The mesh default policy.
    #[arg(long, value_enum, default_value = "allow-all")]
    pub default: DefaultPolicy,
    /// The mesh mTLS mode.
    #[arg(long, value_enum, default_value = "permissive")]
    pub mtls_mode: MtlsMode,
    /// A kubelet probe exemption, `PORT` or `PORT/path`; repeatable.
    #[arg(long)]
    pub probe: Vec<String>,
    /// A JWT the request carries (a file holding it): verified as the
    /// proxy would, against --jwks; a token the proxy refuses is
    /// explained and exits 1.
    #[arg(long, requires = "jwks", conflicts_with_all = ["request_principal", "claim"])]
    pub jwt: Option<PathBuf>,
    /// The issuer's keys (a JWKS file) for --jwt.
    #[arg(long, requires = "jwt")]
    pub jwks: Option<PathBuf>,
    /// The request's verified token principal, `<iss>/<sub>`.
    #[arg(long)]
    pub request_principal: Option<String>,
    /// A claim of the request's verified token, `name=value` (value as
    /// JSON when it parses: `groups=["admin"]`); repeatable.
    #[arg(long)]
    pub claim: Vec<String>,
    /// Treat an invalid policy object as bad input (exit 2) instead of
    /// explaining with its fail-safe form.
    #[arg(long)]
    pub strict: bool,
}

// The mesh keywords as flag values, spelled as in the config file; the
// policy model itself knows nothing of the command line.
impl ValueEnum for DefaultPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &DefaultPolicy::ALL
    }
    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

impl ValueEnum for MtlsMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[MtlsMode::Strict, MtlsMode::Permissive]
    }
    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

pub fn run_check(args: &PolicyCheckArgs) -> anyhow::Result<ExitCode> {
    let question = question(args).map_err(UsageError::Input)?;
    let objects = check::load(&args.policies, &args.namespace)
        .map_err(|e| UsageError::Input(e.to_string()))?;
    let mut question = question;
    if let (Some(jwt), Some(jwks)) = (&args.jwt, &args.jwks) {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| UsageError::Input(format!("{}: {e}", path.display())))
        };
        let (token, keys) = (read(jwt)?, read(jwks)?);
        let token = String::from_utf8_lossy(&token).into_owned();
        match check::token::verify(
            &objects,
            &question.workload,
            &question.settings,
            &token,
            &keys,
        ) {
            Ok(verified) => {
                println!(
                    "token: verified, principal {}",
                    verified.principal.as_deref().unwrap_or("(no sub)")
                );
                question.token = Some(verified);
            }
            Err(refusal) => {
                println!("REFUSED before authorization\n  {refusal}");
                return Ok(ExitCode::FAILURE);
            }
        }
    } else if args.request_principal.is_some() || !args.claim.is_empty() {
        question.token = Some(
            check::token::described(args.request_principal.as_deref(), &args.claim)
                .map_err(UsageError::Input)?,
        );
    }
    let answer = check::check(&objects, &question);
    if args.strict && !answer.warnings.is_empty() {
        return Err(UsageError::Input(answer.warnings.join("\n")).into());
    }
    print!("{answer}");
    Ok(if answer.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The flags of `policy check` as a question, or what is wrong with them.
fn question(args: &PolicyCheckArgs) -> Result<Question, String> {
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
    Ok(Question {
        workload: Workload {
            namespace: args.namespace.clone(),
            labels,
        },
        settings: Settings {
            default: args.default,
            mtls: args.mtls_mode,
            probes,
        },
        peer,
        source: args.ip,
        port: args.port,
        http: args.method.clone().zip(args.path.clone()),
        token: None,
    })
}
