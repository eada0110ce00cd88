//! `outrider ca`: a local CA directory, identities issued from it, the
//! CA Secret for a cluster, and certificate inspection.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

use super::UsageError;
use crate::ca::inspect::{inspect, parse_bundle};
use crate::ca::secret::{self, concat_bundle};
use crate::ca::secret_dir;
use crate::ca::store::{CaDir, ISSUER_CERT, ISSUER_KEY};
use crate::identity::{SpiffeId, TrustDomain};
use crate::units::{format_utc, parse_duration};

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

pub fn run(command: CaCommand) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            root_ttl,
            issuer_ttl,
            force,
        } => {
            let td = TrustDomain::parse(&trust_domain)
                .map_err(|e| UsageError::Config(format!("--trust-domain: {e}")))?;
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
            let id = SpiffeId::workload(&td, &namespace, &service_account)
                .map_err(|e| UsageError::Config(format!("--namespace/--service-account: {e}")))?;
            let mut roots = vec![ca.root_pem()?];
            for path in &extra_root {
                let pem = read(path)?;
                parse_bundle(pem.as_bytes()).with_context(|| {
                    format!("{} is not a PEM certificate bundle", path.display())
                })?;
                roots.push(pem);
            }
            let bundle = concat_bundle(roots.iter().map(String::as_str));
            let svid = ca.signing_ca()?.issue(&id, ttl, now)?;
            secret_dir::publish_identity(&out, &svid.chain_pem, &svid.key_pem, &bundle)?;
            println!(
                "Issued {} (serial {}) valid until {} into {}",
                svid.id,
                svid.serial,
                fmt_time(svid.not_after),
                out.display()
            );
        }
        CaCommand::RotateIssuer { dir, issuer_ttl } => {
            let not_after = CaDir::new(&dir)
                .rotate_issuer(issuer_ttl, now)
                .with_context(|| format!("rotating the issuer in {}", dir.display()))?;
            println!(
                "New issuer in {}: issuer.crt, issuer.key, valid until {}",
                dir.display(),
                fmt_time(not_after)
            );
        }
        CaCommand::Secret {
            issuer_dir,
            trust,
            namespace,
        } => {
            let ca = CaDir::new(&issuer_dir);
            let issuer = read(&ca.path(ISSUER_CERT))?;
            let key = read(&ca.path(ISSUER_KEY))?;
            let roots = trust
                .iter()
                .map(|p| read(p))
                .collect::<Result<Vec<_>, _>>()?;
            let bundle = concat_bundle(roots.iter().map(String::as_str));
            let yaml = secret::render(&issuer, &key, &bundle, &namespace, now).map_err(|e| {
                anyhow::anyhow!("refusing to print a CA Secret the controller would refuse: {e}")
            })?;
            print!("{yaml}");
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
            let report = inspect(&pem, bundle_pem.as_deref(), UnixTime::now())
                .with_context(|| file.display().to_string())?;
            print!("{report}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn fmt_time(t: OffsetDateTime) -> String {
    format_utc(t.unix_timestamp())
}
