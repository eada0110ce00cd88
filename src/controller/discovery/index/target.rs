//! What a proxy asks discovery about: an address, or a Service's name
//! in the cluster's DNS form, parsed strictly.

use std::net::SocketAddr;

/// What a proxy asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A ClusterIP or a pod IP, and a port.
    Addr(SocketAddr),
    /// `name.namespace.svc[.<cluster domain>]:port`.
    Name {
        namespace: String,
        name: String,
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a target (IP:port or name.namespace.svc[.domain]:port): {0}")]
pub struct InvalidTarget(String);

impl Target {
    /// Parses a target; `cluster_domain` is the only domain accepted after
    /// `.svc`.
    pub fn parse(text: &str, cluster_domain: &str) -> Result<Self, InvalidTarget> {
        let invalid = || InvalidTarget(text.chars().take(256).collect());
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        if port == 0 {
            return Err(invalid());
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let host = host
            .strip_suffix(&format!(".{cluster_domain}"))
            .unwrap_or(host);
        let mut labels = host.split('.');
        let (Some(name), Some(namespace), Some("svc"), None) =
            (labels.next(), labels.next(), labels.next(), labels.next())
        else {
            return Err(invalid());
        };
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(name) || !dns_label(namespace) {
            return Err(invalid());
        }
        Ok(Self::Name {
            namespace: namespace.into(),
            name: name.into(),
            port,
        })
    }
}
