//! `outrider proxy`: load and check the configuration, then run the
//! sidecar until a stop signal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::UsageError;
use crate::app::Sidecar;
use crate::config::{FileConfig, Overrides};
use crate::runtime::{build_runtime, init_tracing, shutdown_signal};

/// More worker threads than this is a typo, not a sidecar.
const MAX_WORKER_THREADS: usize = 256;

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
    /// Each flag replaces its key in the file (docs/configuration.md).
    #[command(flatten)]
    pub overrides: Overrides,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let config = FileConfig::load(args.config.as_deref(), &args.overrides)
        .map_err(|error| UsageError::Config(error.to_string()))?;
    if !(1..=MAX_WORKER_THREADS).contains(&args.worker_threads) {
        return Err(UsageError::Config(format!(
            "invalid configuration: --worker-threads: {} is outside 1..={MAX_WORKER_THREADS}",
            args.worker_threads
        ))
        .into());
    }
    let effective =
        crate::yaml::to_string(&config.effective).context("serialising the configuration")?;
    if args.check {
        print!("{effective}");
        return Ok(ExitCode::SUCCESS);
    }
    init_tracing(&config.log.level, config.log.format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %effective, "Starting outrider proxy");

    let runtime = build_runtime(args.worker_threads).context("starting the async runtime")?;
    runtime.block_on(async {
        let sidecar = Sidecar::start(&config).await?;
        sidecar.run_until(shutdown_signal()).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
