//! The command line: the subcommands and their dispatch. Each subcommand's
//! flags and top-level steps live in a file of its own under `cli/`; what
//! they run lives in the library modules.
//!
//! With `main.rs` and `demo`'s entry point, the only code that uses
//! `anyhow`. A [`UsageError`] anywhere below becomes its exit code in
//! `main.rs`, so no subcommand picks a code by hand.

mod ca;
mod controller;
mod init;
mod inject;
mod policy;
mod proxy;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

pub use self::ca::CaCommand;
pub use self::controller::ControllerArgs;
pub use self::init::InitArgs;
pub use self::inject::InjectArgs;
pub use self::policy::{PolicyCheckArgs, PolicyCommand};
pub use self::proxy::ProxyArgs;

/// Exit code for a bad configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for bad input: an unparseable command line, or what `policy
/// check` and `inject` were asked to read.
pub const EXIT_BAD_INPUT: u8 = 2;

/// A mistake in what the user gave, as opposed to a failure while running.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// A bad flag, environment variable or configuration value: exits 64.
    #[error("{0}")]
    Config(String),
    /// Input a command reads (manifests, policies, a question) that it
    /// cannot use: exits 2.
    #[error("{0}")]
    Input(String),
}

impl UsageError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => EXIT_USAGE,
            Self::Input(_) => EXIT_BAD_INPUT,
        }
    }
}

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
pub struct CrdsArgs {
    /// Write one file per CRD into this directory instead of printing
    /// (how `manifests/crds/` is generated).
    #[arg(long)]
    pub write: Option<PathBuf>,
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
        Command::Proxy(args) => proxy::run(*args),
        Command::Ca(command) => ca::run(command),
        Command::Demo(args) => {
            Ok(crate::demo::main(args.keep_running).context("starting the async runtime")?)
        }
        Command::Crds(args) => run_crds(args),
        Command::Policy(PolicyCommand::Check(args)) => policy::run_check(&args),
        Command::Init(args) => init::run(&args),
        Command::Inject(args) => inject::run(&args),
        Command::Controller(args) => controller::run(*args),
    }
}

fn run_crds(args: CrdsArgs) -> anyhow::Result<ExitCode> {
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

/// A file's text, or standard input for `-`; unreadable input is bad input.
fn read_input(path: &str) -> Result<String, UsageError> {
    use std::io::Read;
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map(|_| text)
            .map_err(|e| UsageError::Input(format!("stdin: {e}")))
    } else {
        std::fs::read_to_string(path).map_err(|e| UsageError::Input(format!("{path}: {e}")))
    }
}
