//! The range every numeric setting must fall in, checked before anything
//! runs: a value outside it exits 64 naming the key, instead of a panic
//! later (a timeout near `u64::MAX` seconds overflowed the clock on the
//! first connection; a connection limit near `u64::MAX` panicked in the
//! semaphore) or a proxy that cannot work (connecting to port 0).

use std::net::SocketAddr;
use std::time::Duration;

use super::file::FileConfig;
use super::{ConfigError, invalid};
use crate::units::format_duration;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// The most connections a listener may be configured for.
pub const MAX_CONNECTIONS: usize = 1_000_000;
const MIB: usize = 1024 * 1024;

impl FileConfig {
    /// Every duration, count and size within its range; every address the
    /// proxy connects to one it can connect to.
    pub(super) fn check_ranges(&self) -> Result<(), ConfigError> {
        let durations: [(&str, Duration, Duration, Duration); 14] = [
            (
                "identity.clock_skew",
                self.identity.clock_skew,
                Duration::ZERO,
                HOUR,
            ),
            (
                "identity.reload_debounce",
                self.identity.reload_debounce,
                MS,
                MINUTE,
            ),
            (
                "identity.reload_poll_interval",
                self.identity.reload_poll_interval,
                100 * MS,
                HOUR,
            ),
            (
                "tls.handshake_timeout",
                self.tls.handshake_timeout,
                MS,
                5 * MINUTE,
            ),
            (
                "plaintext_fallback_ttl",
                self.plaintext_fallback_ttl,
                SECOND,
                DAY,
            ),
            (
                "limits.connect_timeout",
                self.limits.connect_timeout,
                MS,
                5 * MINUTE,
            ),
            (
                "limits.detect_timeout",
                self.limits.detect_timeout,
                MS,
                5 * MINUTE,
            ),
            (
                "limits.request_head_timeout",
                self.limits.request_head_timeout,
                100 * MS,
                HOUR,
            ),
            (
                "limits.idle_timeout",
                self.limits.idle_timeout,
                100 * MS,
                7 * DAY,
            ),
            (
                "limits.app_pool_idle_timeout",
                self.limits.app_pool_idle_timeout,
                MS,
                DAY,
            ),
            (
                "limits.peer_pool_idle_timeout",
                self.limits.peer_pool_idle_timeout,
                MS,
                DAY,
            ),
            (
                "shutdown_grace_period",
                self.shutdown_grace_period,
                Duration::ZERO,
                DAY,
            ),
            (
                "policy.reload_debounce",
                self.policy.reload_debounce,
                MS,
                MINUTE,
            ),
            (
                "policy.poll_interval",
                self.policy.poll_interval,
                100 * MS,
                HOUR,
            ),
        ];
        for (field, value, min, max) in durations {
            if value < min || value > max {
                return Err(invalid(
                    field,
                    format!(
                        "{} is outside {}..={}",
                        format_duration(value),
                        format_duration(min),
                        format_duration(max)
                    ),
                ));
            }
        }
        let counts: [(&str, usize, usize, usize); 6] = [
            (
                "limits.max_connections",
                self.limits.max_connections.unwrap_or(1),
                1,
                MAX_CONNECTIONS,
            ),
            (
                "limits.max_plaintext_connections",
                self.limits.max_plaintext_connections.unwrap_or(1),
                1,
                MAX_CONNECTIONS,
            ),
            (
                "limits.max_unverified_per_source",
                self.limits.max_unverified_per_source,
                1,
                MAX_CONNECTIONS,
            ),
            (
                "limits.memory_limit",
                self.limits.memory_limit.unwrap_or(MIB),
                MIB,
                1024 * 1024 * MIB,
            ),
            (
                "limits.max_header_bytes",
                self.limits.max_header_bytes,
                1024,
                1024 * 1024,
            ),
            (
                "limits.pool_max_idle_per_destination",
                self.limits.pool_max_idle_per_destination,
                0,
                100_000,
            ),
        ];
        for (field, value, min, max) in counts {
            if value < min || value > max {
                return Err(invalid(field, format!("{value} is outside {min}..={max}")));
            }
        }
        if let (Some(plaintext), Some(total)) = (
            self.limits.max_plaintext_connections,
            self.limits.max_connections,
        ) && plaintext > total
        {
            return Err(invalid(
                "limits.max_plaintext_connections",
                format!("{plaintext} is above limits.max_connections ({total})"),
            ));
        }
        for (field, addr) in [
            ("inbound.app", self.inbound.app),
            ("outbound.peer", self.outbound.peer),
        ] {
            if let Some(addr) = addr {
                connectable(field, addr)?;
            }
        }
        Ok(())
    }
}

/// An address the proxy connects to: a real port and a real address (a
/// listener may bind port 0 or `0.0.0.0`; nobody can connect to them).
fn connectable(field: &str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.port() == 0 {
        return Err(invalid(
            field,
            format!("{addr}: port 0 cannot be connected to"),
        ));
    }
    if addr.ip().is_unspecified() {
        return Err(invalid(
            field,
            format!("{addr}: the unspecified address cannot be connected to"),
        ));
    }
    Ok(())
}
