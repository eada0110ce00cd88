//! `outrider inject`: the webhook's transformation applied to manifests
//! offline, with a line per object on stderr saying what was done.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::controller::load_inject_config;
use super::{UsageError, read_input};
use crate::inject::{Outcome, manifest};

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

pub fn run(args: &InjectArgs) -> anyhow::Result<ExitCode> {
    let mut config = load_inject_config(args.config.as_deref())
        .map_err(|e| UsageError::Config(format!("inject: {e}")))?;
    if let Some(image) = &args.image {
        config.image = image.clone();
    }
    config
        .validate()
        .map_err(|e| UsageError::Config(format!("inject: invalid values: {e}")))?;
    let input = read_input(&args.file)?;
    let (output, reports) = manifest::inject_manifests(&input, &config)
        .map_err(|e| UsageError::Input(format!("inject: {e}")))?;
    print!("{output}");
    for report in reports {
        if let Some(outcome) = &report.outcome {
            eprintln!("{}: {}", report.object, describe(outcome));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Injected { probes } if probes.is_empty() => "injected".to_string(),
        Outcome::Injected { probes } => {
            let list: Vec<String> = probes
                .iter()
                .map(|p| match &p.path {
                    Some(path) => format!("{}{path}", p.port),
                    None => format!("{} (whole port)", p.port),
                })
                .collect();
            format!("injected; probes allowed: {}", list.join(", "))
        }
        Outcome::AlreadyInjected => "already injected".to_string(),
        Outcome::HostNetwork => {
            "skipped (hostNetwork: the capture rules would apply to the node)".to_string()
        }
        Outcome::Disabled => "skipped (outrider.dev/inject: disabled)".to_string(),
    }
}
