//! Which iptables to drive (nft or legacy), whether we may, and running
//! `*-save` / `*-restore`.
//!
//! The choice itself is pure ([`choose_flavor`], [`has_net_admin`]); this
//! module's I/O is limited to probing the binaries and piping documents
//! into them.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::InitError;
use super::rules::Family;

/// The two kernels' interfaces that `iptables` 1.8 can drive. Rules in
/// one are invisible to the other, so we must use the one the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Nft,
    Legacy,
}

/// `--iptables-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Forced(Flavor),
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "nft" => Ok(Mode::Forced(Flavor::Nft)),
            "legacy" => Ok(Mode::Forced(Flavor::Legacy)),
            other => Err(format!("{other:?}: expected auto, nft or legacy")),
        }
    }
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Nft => "nft",
            Flavor::Legacy => "legacy",
        }
    }

    pub fn save_command(self, family: Family) -> String {
        format!("{}-{}-save", prefix(family), self.name())
    }

    pub fn restore_command(self, family: Family) -> String {
        format!("{}-{}-restore", prefix(family), self.name())
    }
}

fn prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// What probing each flavor found: `None` when its tools are missing or
/// fail, else how many rules it holds in this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub nft_rules: Option<usize>,
    pub legacy_rules: Option<usize>,
}

/// Picks the flavor: a forced one if its tools work; otherwise the one
/// already holding rules here (CNI plugins and kube-proxy wrote with the
/// host's flavor), and nft on a tie — the default of current
/// distributions and of Linkerd's chart.
pub fn choose_flavor(mode: Mode, probe: Probe) -> Result<Flavor, InitError> {
    match mode {
        Mode::Forced(flavor) => {
            let found = match flavor {
                Flavor::Nft => probe.nft_rules,
                Flavor::Legacy => probe.legacy_rules,
            };
            found
                .map(|_| flavor)
                .ok_or(InitError::NoIptables(Some(flavor)))
        }
        Mode::Auto => match (probe.nft_rules, probe.legacy_rules) {
            (None, None) => Err(InitError::NoIptables(None)),
            (Some(_), None) => Ok(Flavor::Nft),
            (None, Some(_)) => Ok(Flavor::Legacy),
            (Some(nft), Some(legacy)) if legacy > nft => Ok(Flavor::Legacy),
            (Some(_), Some(_)) => Ok(Flavor::Nft),
        },
    }
}

/// Whether `/proc/self/status` grants CAP_NET_ADMIN (bit 12 of CapEff);
/// `None` when the file does not say.
pub fn has_net_admin(status: &str) -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Counts the rules (`-A` lines) in a `*-save` dump.
pub fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Runs both flavors' IPv4 save tools and counts what they hold.
pub fn probe() -> Probe {
    let count = |flavor: Flavor| {
        run_save(&flavor.save_command(Family::V4), &[])
            .ok()
            .map(|dump| count_rules(&dump))
    };
    Probe {
        nft_rules: count(Flavor::Nft),
        legacy_rules: count(Flavor::Legacy),
    }
}

/// `<save> -t nat`, the table we work on.
pub fn save_nat(flavor: Flavor, family: Family) -> Result<String, InitError> {
    run_save(&flavor.save_command(family), &["-t", "nat"])
}

fn spawn_error(command: &str) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Spawn {
        command: command.to_string(),
        source,
    }
}

/// The command's stdout, or its stderr as the error.
fn checked(command: &str, output: std::process::Output) -> Result<String, InitError> {
    if !output.status.success() {
        return Err(InitError::Failed {
            command: command.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_save(command: &str, args: &[&str]) -> Result<String, InitError> {
    let output = Command::new(command)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(command))?;
    checked(command, output)
}

/// Pipes `document` into `<restore> --noflush`: all of it applies or
/// none does.
pub fn restore(flavor: Flavor, family: Family, document: &str) -> Result<(), InitError> {
    let command = flavor.restore_command(family);
    let mut child = Command::new(&command)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error(&command))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(document.as_bytes())
            .map_err(spawn_error(&command))?;
    }
    let output = child.wait_with_output().map_err(spawn_error(&command))?;
    checked(&command, output).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(nft: Option<usize>, legacy: Option<usize>) -> Probe {
        Probe {
            nft_rules: nft,
            legacy_rules: legacy,
        }
    }

    #[test]
    fn auto_follows_the_flavor_that_already_holds_rules_and_prefers_nft_on_a_tie() {
        assert!(matches!(
            choose_flavor(Mode::Auto, probe(Some(0), Some(12))),
            Ok(Flavor::Legacy)
        ));
        assert!(matches!(
            choose_flavor(Mode::Auto, probe(Some(3), Some(1))),
            Ok(Flavor::Nft)
        ));
        assert!(matches!(
            choose_flavor(Mode::Auto, probe(Some(0), Some(0))),
            Ok(Flavor::Nft)
        ));
        assert!(matches!(
            choose_flavor(Mode::Auto, probe(None, Some(0))),
            Ok(Flavor::Legacy)
        ));
        assert!(matches!(
            choose_flavor(Mode::Auto, probe(None, None)),
            Err(InitError::NoIptables(None))
        ));
    }

    #[test]
    fn a_forced_flavor_needs_its_tools() {
        assert!(matches!(
            choose_flavor(Mode::Forced(Flavor::Legacy), probe(Some(5), Some(0))),
            Ok(Flavor::Legacy)
        ));
        assert!(matches!(
            choose_flavor(Mode::Forced(Flavor::Legacy), probe(Some(5), None)),
            Err(InitError::NoIptables(Some(Flavor::Legacy)))
        ));
    }

    #[test]
    fn net_admin_is_read_from_the_effective_capabilities() {
        let root = "Name:\tx\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(has_net_admin(root), Some(true));
        // NET_ADMIN (bit 12) and NET_RAW (bit 13) only: 0x3000.
        assert_eq!(has_net_admin("CapEff:\t0000000000003000\n"), Some(true));
        assert_eq!(has_net_admin("CapEff:\t0000000000002000\n"), Some(false));
        assert_eq!(has_net_admin("CapEff:\tzz\n"), None);
        assert_eq!(has_net_admin("Name:\tx\n"), None);
    }

    #[test]
    fn count_rules_counts_appends_only() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j X\n-A X -j RETURN\nCOMMIT\n";
        assert_eq!(count_rules(dump), 2);
    }
}
