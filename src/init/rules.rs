//! The capture rules as `iptables-restore` documents, from pure data.
//!
//! [`apply_plan`] turns a [`CaptureConfig`] and the table as it is now
//! (`iptables-save -t nat` output) into one document that installs the
//! rules atomically; [`cleanup_plan`] does the reverse. Both read the
//! current table so that running `outrider init` twice leaves exactly one
//! set of rules: declaring our chains flushes them, and the jumps into them
//! from `PREROUTING`/`OUTPUT` are only added when missing.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Our chains. The names say which hook they hang off.
pub const INBOUND_CHAIN: &str = "OUTRIDER_INBOUND";
pub const INBOUND_REDIRECT_CHAIN: &str = "OUTRIDER_INBOUND_REDIRECT";
pub const OUTBOUND_CHAIN: &str = "OUTRIDER_OUTBOUND";
pub const OUTBOUND_REDIRECT_CHAIN: &str = "OUTRIDER_OUTBOUND_REDIRECT";
const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    INBOUND_REDIRECT_CHAIN,
    OUTBOUND_CHAIN,
    OUTBOUND_REDIRECT_CHAIN,
];
/// The jumps from the built-in chains into ours, as `iptables-save`
/// prints them.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)];

/// `multiport` takes at most 15 ports, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// IPv4 or IPv6: the same rules, rendered for `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net.addr()),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// A single port or an inclusive range, as `--skip-inbound-ports 22,8000-8099`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    fn slots(self) -> usize {
        if self.first == self.last { 1 } else { 2 }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{0:?} is not a port or a port range (like 8080 or 8000-8099, ports 1-65535)")]
    BadPort(String),
    #[error("{0:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8)")]
    BadCidr(String),
}

impl FromStr for PortRange {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        let bad = || RuleError::BadPort(s.to_string());
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(p) => Ok(p),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

/// Parses a comma-separated list of ports and ranges; empty means none.
pub fn parse_ports(list: &str) -> Result<Vec<PortRange>, RuleError> {
    crate::units::list(list, str::parse)
}

/// Parses a comma-separated list of CIDRs (a bare address is a /32 or
/// /128); empty means none.
pub fn parse_cidrs(list: &str) -> Result<Vec<IpNet>, RuleError> {
    crate::units::list(list, |s| {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| RuleError::BadCidr(s.to_string()))
    })
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// The proxy's own traffic is never captured (no loops).
    pub proxy_uid: u32,
    /// Inbound ports reached directly, never redirected. Always includes
    /// the admin port so probes of the proxy itself and scrapes arrive.
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<IpNet>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            skip_inbound_ports: vec![PortRange {
                first: 4191,
                last: 4191,
            }],
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

/// The document that installs the rules, given the table as
/// `iptables-save -t nat` printed it (empty if it printed nothing).
pub fn apply_plan(config: &CaptureConfig, family: Family, current: &str) -> String {
    let mut doc = String::new();
    doc.push_str("# outrider init: capture rules (iptables-restore --noflush)\n*nat\n");
    // Declaring a chain creates it, or flushes it if it exists: a re-run
    // replaces our rules instead of appending a second copy.
    for chain in CHAINS {
        let _ = writeln!(doc, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        doc,
        "-A {INBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    );
    for ports in multiport_groups(&config.skip_inbound_ports) {
        let _ = writeln!(doc, "-A {INBOUND_CHAIN} -p tcp {ports} -j RETURN");
    }
    let _ = writeln!(doc, "-A {INBOUND_CHAIN} -p tcp -j {INBOUND_REDIRECT_CHAIN}");

    let _ = writeln!(
        doc,
        "-A {OUTBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    );
    let _ = writeln!(
        doc,
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    );
    let _ = writeln!(doc, "-A {OUTBOUND_CHAIN} -o lo -j RETURN");
    let _ = writeln!(
        doc,
        "-A {OUTBOUND_CHAIN} -d {} -j RETURN",
        family.loopback()
    );
    for ports in multiport_groups(&config.skip_outbound_ports) {
        let _ = writeln!(doc, "-A {OUTBOUND_CHAIN} -p tcp {ports} -j RETURN");
    }
    for cidr in config
        .skip_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        let _ = writeln!(doc, "-A {OUTBOUND_CHAIN} -d {} -j RETURN", cidr.trunc());
    }
    let _ = writeln!(
        doc,
        "-A {OUTBOUND_CHAIN} -p tcp -j {OUTBOUND_REDIRECT_CHAIN}"
    );

    for (builtin, ours) in JUMPS {
        if !has_jump(current, builtin, ours) {
            let _ = writeln!(doc, "-A {builtin} -j {ours}");
        }
    }
    doc.push_str("COMMIT\n");
    doc
}

/// The document that removes every trace of our rules, or `None` when
/// there is nothing to remove.
pub fn cleanup_plan(current: &str) -> Option<String> {
    let mut body = String::new();
    for (builtin, ours) in JUMPS {
        for _ in 0..jump_count(current, builtin, ours) {
            let _ = writeln!(body, "-D {builtin} -j {ours}");
        }
    }
    let present: Vec<&str> = CHAINS
        .into_iter()
        .filter(|chain| has_chain(current, chain))
        .collect();
    // Flush all before deleting any: the inbound chain jumps to its
    // redirect chain, which cannot be deleted while referenced.
    for chain in &present {
        let _ = writeln!(body, "-F {chain}");
    }
    for chain in &present {
        let _ = writeln!(body, "-X {chain}");
    }
    if body.is_empty() {
        return None;
    }
    Some(format!(
        "# outrider init --cleanup (iptables-restore --noflush)\n*nat\n{body}COMMIT\n"
    ))
}

/// Whether the table holds any of our chains or jumps.
pub fn is_installed(current: &str) -> bool {
    CHAINS.iter().any(|chain| has_chain(current, chain))
        || JUMPS
            .iter()
            .any(|(builtin, ours)| has_jump(current, builtin, ours))
}

fn has_chain(current: &str, chain: &str) -> bool {
    current.lines().any(|line| {
        line.strip_prefix(':')
            .and_then(|rest| rest.split_whitespace().next())
            == Some(chain)
    })
}

fn has_jump(current: &str, builtin: &str, ours: &str) -> bool {
    jump_count(current, builtin, ours) > 0
}

fn jump_count(current: &str, builtin: &str, ours: &str) -> usize {
    let wanted = format!("-A {builtin} -j {ours}");
    current.lines().filter(|line| line.trim() == wanted).count()
}

/// `-m multiport --dports a,b:c` arguments, split to respect the kernel's
/// limit of 15 slots per rule; a single port uses plain `--dport`.
fn multiport_groups(ports: &[PortRange]) -> Vec<String> {
    let mut groups = Vec::new();
    let mut current: Vec<PortRange> = Vec::new();
    let mut used = 0;
    for &range in ports {
        if used + range.slots() > MULTIPORT_SLOTS {
            groups.push(std::mem::take(&mut current));
            used = 0;
        }
        used += range.slots();
        current.push(range);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
        .into_iter()
        .map(|group| match group.as_slice() {
            [single] => format!("--dport {single}"),
            _ => {
                let list: Vec<String> = group.iter().map(ToString::to_string).collect();
                format!("-m multiport --dports {}", list.join(","))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::golden::assert_golden;

    const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

    fn busy_config() -> CaptureConfig {
        let mut config = CaptureConfig {
            skip_outbound_cidrs: parse_cidrs("10.96.0.1/32, 169.254.169.254, fd00:10::/64")
                .expect("cidrs"),
            skip_outbound_ports: parse_ports("25,3306-3310").expect("ports"),
            ..CaptureConfig::default()
        };
        config
            .skip_inbound_ports
            .extend(parse_ports("22, 9000-9010").expect("ports"));
        config
    }

    /// What `iptables-save -t nat` prints once our rules are in.
    fn installed(config: &CaptureConfig) -> String {
        let plan = apply_plan(config, Family::V4, EMPTY_NAT);
        let mut lines: Vec<&str> = plan.lines().filter(|l| !l.starts_with('#')).collect();
        lines.retain(|l| *l != "COMMIT" && *l != "*nat");
        format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{}\nCOMMIT\n",
            lines.join("\n")
        )
    }

    #[test]
    fn default_rules_redirect_everything_but_the_admin_port_loopback_and_the_proxy() {
        assert_golden(
            "init/default-v4.rules",
            &apply_plan(&CaptureConfig::default(), Family::V4, EMPTY_NAT),
        );
    }

    #[test]
    fn skip_ports_and_cidrs_become_return_rules_of_their_family() {
        let config = busy_config();
        assert_golden(
            "init/skips-v4.rules",
            &apply_plan(&config, Family::V4, EMPTY_NAT),
        );
        assert_golden("init/skips-v6.rules", &apply_plan(&config, Family::V6, ""));
    }

    #[test]
    fn rerun_replaces_the_rules_without_a_second_jump() {
        let config = busy_config();
        let again = apply_plan(&config, Family::V4, &installed(&config));
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT"), "{again}");
        // The chains are still declared (and so flushed and refilled).
        assert!(again.contains(":OUTRIDER_INBOUND - [0:0]"));
        assert!(again.contains("-A OUTRIDER_OUTBOUND -p tcp -j OUTRIDER_OUTBOUND_REDIRECT"));
    }

    #[test]
    fn cleanup_removes_jumps_then_chains_and_is_empty_when_nothing_is_installed() {
        assert_eq!(cleanup_plan(EMPTY_NAT), None);
        assert!(!is_installed(EMPTY_NAT));
        let current = installed(&busy_config());
        assert!(is_installed(&current));
        assert_golden(
            "init/cleanup.rules",
            &cleanup_plan(&current).expect("something to remove"),
        );
    }

    #[test]
    fn more_than_fifteen_port_slots_split_into_several_rules() {
        let ports: Vec<PortRange> = (1..=10)
            .map(|i| PortRange {
                first: i * 100,
                last: i * 100 + 1,
            })
            .collect();
        let groups = multiport_groups(&ports);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(
            groups[0],
            "-m multiport --dports 100:101,200:201,300:301,400:401,500:501,600:601,700:701"
        );
        assert_eq!(multiport_groups(&ports[..1]), vec!["--dport 100:101"]);
    }

    #[test]
    fn port_and_cidr_lists_reject_nonsense_with_the_offending_value() {
        assert_eq!(
            parse_ports("80, 0"),
            Err(RuleError::BadPort("0".to_string()))
        );
        assert_eq!(
            parse_ports("90-80"),
            Err(RuleError::BadPort("90-80".to_string()))
        );
        assert_eq!(
            parse_ports("http"),
            Err(RuleError::BadPort("http".to_string()))
        );
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert_eq!(
            parse_cidrs("10.0.0.0/33"),
            Err(RuleError::BadCidr("10.0.0.0/33".to_string()))
        );
        assert_eq!(
            parse_cidrs("10.1.2.3/8").expect("host bits are allowed")[0].trunc(),
            "10.0.0.0/8".parse::<IpNet>().expect("net")
        );
    }
}
