//! `outrider init`: flags into an `InitRequest`, then the rules.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::UsageError;
use crate::init::rules::{self, CaptureConfig, PortRange};
use crate::init::{self as capture, InitRequest};

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

pub fn run(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let request = request(args).map_err(|e| UsageError::Config(format!("init: {e}")))?;
    let report = capture::run(&request).context("outrider init")?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn request(args: &InitArgs) -> Result<InitRequest, String> {
    fn flag(name: &'static str) -> impl Fn(rules::RuleError) -> String {
        move |e| format!("{name}: {e}")
    }
    // The admin port is never redirected: probes and scrapes reach it.
    let mut skip_inbound_ports = vec![PortRange {
        first: args.admin_port,
        last: args.admin_port,
    }];
    skip_inbound_ports.extend(
        rules::parse_ports(&args.skip_inbound_ports).map_err(flag("--skip-inbound-ports"))?,
    );
    Ok(InitRequest {
        capture: CaptureConfig {
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            proxy_uid: args.proxy_uid,
            skip_inbound_ports,
            skip_outbound_ports: rules::parse_ports(&args.skip_outbound_ports)
                .map_err(flag("--skip-outbound-ports"))?,
            skip_outbound_cidrs: rules::parse_cidrs(&args.skip_outbound_cidrs)
                .map_err(flag("--skip-outbound-cidrs"))?,
        },
        mode: args
            .iptables_mode
            .parse()
            .map_err(|e| format!("--iptables-mode: {e}"))?,
        dry_run: args.dry_run,
        cleanup: args.cleanup,
    })
}
