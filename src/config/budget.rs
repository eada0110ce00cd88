//! How many connections each listener may hold, from the memory the
//! container may use: the default of `limits.max_connections` when the
//! file leaves it unset.
//!
//! The budget is per connection and deliberately above what one costs at
//! rest (an idle mTLS relay measures about 18 KiB per side, a connection
//! waiting for its first bytes about 0.2 KiB; `bench/conn-memory.sh`), so
//! the buffers an active connection grows (a TLS record each way, hyper's
//! header buffer) fit too. Both listeners share the container, so each
//! gets half of what the memory allows.

/// What one connection may cost, at most, on average.
pub const PER_CONNECTION: usize = 32 * 1024;
/// Kept for everything that is not a connection: the binary, policies,
/// pools, the allocator's slack.
pub const RESERVED: usize = 32 * 1024 * 1024;
/// Without a known memory limit (local runs), as before.
pub const WITHOUT_LIMIT: usize = 10_000;
/// Never fewer than this per listener, however small the limit.
pub const FLOOR: usize = 64;

/// Connections per listener that `memory_limit` bytes can hold.
pub fn max_connections(memory_limit: Option<usize>) -> usize {
    match memory_limit {
        None => WITHOUT_LIMIT,
        Some(limit) => {
            let per_listener = limit.saturating_sub(RESERVED) / PER_CONNECTION / 2;
            per_listener.clamp(FLOOR, WITHOUT_LIMIT)
        }
    }
}

/// Of a listener's connections, how many may be plaintext (no mesh
/// identity): half, so clients without a proxy can never take the places
/// of mesh peers.
pub fn plaintext_share(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_charts_default_limit_gives_each_listener_room_for_about_1500() {
        assert_eq!(max_connections(Some(128 * MIB)), 1536);
    }

    #[test]
    fn more_memory_means_more_connections_up_to_the_old_default() {
        assert!(max_connections(Some(256 * MIB)) > max_connections(Some(128 * MIB)));
        assert_eq!(max_connections(Some(64 * 1024 * MIB)), WITHOUT_LIMIT);
        assert_eq!(max_connections(None), WITHOUT_LIMIT);
    }

    #[test]
    fn a_tiny_limit_still_leaves_the_floor() {
        assert_eq!(max_connections(Some(16 * MIB)), FLOOR);
        assert_eq!(max_connections(Some(0)), FLOOR);
    }

    #[test]
    fn plaintext_gets_half_and_never_nothing() {
        assert_eq!(plaintext_share(1536), 768);
        assert_eq!(plaintext_share(1), 1);
    }
}
