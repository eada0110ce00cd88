//! `outrider init`: installs (or removes) the iptables rules that send a
//! pod's TCP traffic through its proxy, in the pod's network namespace.
//!
//! The rules come from a pure function ([`rules`]); this module checks
//! that we may change them, picks the iptables flavor ([`backend`]), and
//! applies one `iptables-restore` document per address family, so either
//! every rule lands or none does.

pub mod backend;
pub mod rules;

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
    #[error(
        "the pod has an IPv6 address but ip6tables does not work here ({0}); its IPv6 traffic would bypass the proxy"
    )]
    Ipv6Unavailable(Box<InitError>),
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
    for family in families(flavor)? {
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

/// IPv4 always. IPv6 too whenever ip6tables works here, and then it is
/// required if the pod has a routable IPv6 address: skipping it would let
/// IPv6 traffic bypass the proxy and its policy (failing open).
fn families(flavor: Flavor) -> Result<Vec<Family>, InitError> {
    let mut families = vec![Family::V4];
    let routable_v6 = std::fs::read_to_string("/proc/net/if_inet6")
        .map(|table| has_routable_ipv6(&table))
        .unwrap_or(false);
    match backend::save_nat(flavor, Family::V6) {
        Ok(_) => families.push(Family::V6),
        Err(error) if routable_v6 => return Err(InitError::Ipv6Unavailable(Box::new(error))),
        Err(_) => {}
    }
    Ok(families)
}

/// Whether `/proc/net/if_inet6` lists an address of global scope (the
/// fourth column, `00`); link-local (`20`) and loopback (`10`) addresses
/// are not reachable from other pods.
pub fn has_routable_ipv6(table: &str) -> bool {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .any(|scope| scope == "00")
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

#[cfg(test)]
mod tests {
    use super::has_routable_ipv6;

    #[test]
    fn only_a_global_scope_ipv6_address_makes_ipv6_capture_mandatory() {
        let link_local_only = "fe800000000000000c1d2bfffe3a4b5c 02 40 20 80     eth0\n\
                               00000000000000000000000000000001 01 80 10 80       lo\n";
        assert!(!has_routable_ipv6(link_local_only));
        let dual_stack =
            format!("{link_local_only}fd000000000000000000000000000a07 02 40 00 80     eth0\n");
        assert!(has_routable_ipv6(&dual_stack));
        assert!(!has_routable_ipv6(""));
    }
}
