//! `outrider init`: installs (or removes) the iptables rules that send a
//! pod's TCP traffic through its proxy, in the pod's network namespace.
//!
//! The rules come from a pure function ([`rules`]); this module checks
//! that we may change them, picks the iptables flavor ([`backend`]), and
//! applies one `iptables-restore` document per address family, so either
//! every rule lands or none does.

pub mod backend;
pub mod rules;

use std::path::Path;

use backend::{Flavor, Mode};
use rules::{CaptureConfig, Family};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "CAP_NET_ADMIN is missing: run the init container as root with securityContext.capabilities.add: [NET_ADMIN, NET_RAW] (the injector does this)"
    )]
    NoNetAdmin,
    #[error("{}", no_iptables_message(*.0))]
    NoIptables(Option<Flavor>),
    #[error("could not run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} reported success but the rules are not in the nat table")]
    NotInstalled { command: String },
}

fn no_iptables_message(flavor: Option<Flavor>) -> String {
    match flavor {
        Some(flavor) => format!(
            "{} is missing or does not work here (--iptables-mode {}); install iptables 1.8 or pick the other mode",
            flavor.save_command(Family::V4),
            flavor.name()
        ),
        None => "neither iptables-nft-save nor iptables-legacy-save works here: install iptables 1.8 (the outrider image ships it)".to_string(),
    }
}

/// What `outrider init` was asked to do.
#[derive(Debug, Clone)]
pub struct InitRequest {
    pub capture: CaptureConfig,
    pub mode: Mode,
    pub dry_run: bool,
    pub cleanup: bool,
}

/// Runs the request and returns what to print: the documents on a dry
/// run, a summary otherwise.
pub fn run(request: &InitRequest) -> Result<String, InitError> {
    if request.dry_run {
        return Ok(dry_run(request));
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && backend::has_net_admin(&status) == Some(false)
    {
        return Err(InitError::NoNetAdmin);
    }
    let flavor = backend::choose_flavor(request.mode, backend::probe())?;
    let mut report = String::new();
    for family in families(flavor) {
        let current = backend::save_nat(flavor, family)?;
        let restore = flavor.restore_command(family);
        if request.cleanup {
            match rules::cleanup_plan(&current) {
                Some(plan) => {
                    backend::restore(flavor, family, &plan)?;
                    report.push_str(&format!("{restore}: removed the outrider rules\n"));
                }
                None => report.push_str(&format!("{restore}: nothing to remove\n")),
            }
            continue;
        }
        let plan = rules::apply_plan(&request.capture, family, &current);
        backend::restore(flavor, family, &plan)?;
        // Trust, but verify: a restore that silently did nothing would
        // leave the pod uncaptured, which is failing open.
        if !rules::is_installed(&backend::save_nat(flavor, family)?) {
            return Err(InitError::NotInstalled { command: restore });
        }
        report.push_str(&format!(
            "{restore}: inbound TCP -> {}, outbound TCP -> {} (proxy uid {} exempt)\n",
            request.capture.inbound_port, request.capture.outbound_port, request.capture.proxy_uid
        ));
    }
    Ok(report)
}

/// IPv4 always; IPv6 when the kernel has it, since v6 traffic that
/// bypassed the proxy would bypass its policy too.
fn families(flavor: Flavor) -> Vec<Family> {
    let mut families = vec![Family::V4];
    if Path::new("/proc/net/if_inet6").exists() && backend::save_nat(flavor, Family::V6).is_ok() {
        families.push(Family::V6);
    }
    families
}

/// The documents that would be applied, against the current table when
/// it can be read and an empty one otherwise (a laptop without iptables).
fn dry_run(request: &InitRequest) -> String {
    let flavor = backend::choose_flavor(request.mode, backend::probe()).ok();
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        let current = flavor
            .and_then(|f| backend::save_nat(f, family).ok())
            .unwrap_or_default();
        let tool = match flavor {
            Some(f) => f.restore_command(family),
            None => match family {
                Family::V4 => "iptables-restore".to_string(),
                Family::V6 => "ip6tables-restore".to_string(),
            },
        };
        out.push_str(&format!("# --- {tool} --noflush ---\n"));
        if request.cleanup {
            match rules::cleanup_plan(&current) {
                Some(plan) => out.push_str(&plan),
                None => out.push_str("# nothing to remove\n"),
            }
        } else {
            out.push_str(&rules::apply_plan(&request.capture, family, &current));
        }
    }
    out
}
