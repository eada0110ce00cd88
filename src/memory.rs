//! Giving memory back after a burst.
//!
//! glibc's allocator keeps the pages that freed connections held, to reuse
//! them: after 10,000 connections closed, the proxy stayed at the 42 MiB
//! they had needed (from 12 MiB idle) until the next burst, and a pod's
//! memory use is what its limit and the node's scheduler see. `malloc_trim`
//! gives the free pages back (42 → 13 MiB in that run) but walks every
//! arena with its lock held, so it runs only when it pays: every
//! [`CHECK_EVERY`], when the resident memory not in use by the allocator's
//! callers has grown by [`TRIM_ABOVE`] since the last trim (less while a
//! burst winds down). The decision is
//! [`TrimPolicy`] (pure); the calls into the C library are in
//! [`allocator`], the only other place in the crate allowed `unsafe`.

pub mod allocator;

use std::time::Duration;

/// How often the allocator's slack is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Slack (resident, but free in the allocator) that is worth a trim.
pub const TRIM_ABOVE: usize = 8 * 1024 * 1024;

/// While a burst winds down (the last trim gave back at least this much),
/// a trim is worth it for this much slack already: connections close over
/// several checks, and what the last of them free would otherwise stay
/// below [`TRIM_ABOVE`] and be kept.
pub const SETTLE_ABOVE: usize = 1024 * 1024;

/// When to trim, from what the process holds: `resident` bytes, of which
/// the allocator's callers use `in_use`. What remains (code, stacks, the
/// allocator's own free pages) is the slack; the slack right after a trim
/// is the floor that trimming cannot go below, and a trim is due when the
/// slack has grown [`TRIM_ABOVE`] past it ([`SETTLE_ABOVE`] while a burst
/// winds down).
#[derive(Debug, Default)]
pub struct TrimPolicy {
    /// The slack right after the last trim; `None` before the first.
    floor: Option<usize>,
    /// The last trim gave back at least [`SETTLE_ABOVE`].
    settling: bool,
}

impl TrimPolicy {
    /// Whether to trim now.
    pub fn due(&self, resident: usize, in_use: usize) -> bool {
        let slack = resident.saturating_sub(in_use);
        let threshold = if self.settling {
            SETTLE_ABOVE
        } else {
            TRIM_ABOVE
        };
        match self.floor {
            // The first look calibrates: a trim of a small heap is cheap.
            None => true,
            Some(floor) => slack > floor.saturating_add(threshold),
        }
    }

    /// Notes what a trim gave back and left.
    pub fn trimmed(&mut self, given_back: usize, resident: usize, in_use: usize) {
        self.floor = Some(resident.saturating_sub(in_use));
        self.settling = given_back >= SETTLE_ABOVE;
    }
}

/// Trims whenever [`TrimPolicy`] says so, until `stop` resolves; counts
/// the bytes given back in `returned`. Does nothing where the allocator
/// cannot report or trim (not glibc).
pub async fn give_back_after_bursts(
    returned: prometheus::IntCounter,
    stop: impl Future<Output = ()>,
) {
    if !allocator::CAN_TRIM {
        return;
    }
    let mut policy = TrimPolicy::default();
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        let Some(resident) = allocator::resident_bytes() else {
            continue;
        };
        if !policy.due(resident, allocator::in_use_bytes()) {
            continue;
        }
        // The walk over the arenas can take milliseconds: not on a
        // runtime thread.
        let after = tokio::task::spawn_blocking(|| {
            allocator::trim();
            (allocator::resident_bytes(), allocator::in_use_bytes())
        })
        .await;
        if let Ok((Some(after), in_use)) = after {
            let given_back = resident.saturating_sub(after);
            policy.trimmed(given_back, after, in_use);
            returned.inc_by(u64::try_from(given_back).unwrap_or(u64::MAX));
            if given_back >= TRIM_ABOVE {
                tracing::debug!(
                    given_back,
                    resident = after,
                    "Gave free memory back after a burst"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_first_look_trims_to_learn_the_floor() {
        assert!(TrimPolicy::default().due(12 * MIB, 4 * MIB));
    }

    #[test]
    fn a_trim_is_due_only_when_the_slack_grew_past_the_floor_by_the_threshold() {
        let mut policy = TrimPolicy::default();
        policy.trimmed(0, 13 * MIB, 5 * MIB); // floor: 8 MiB of slack
        // A burst being served: resident memory in use, no slack.
        assert!(!policy.due(60 * MIB, 52 * MIB));
        // Slack up by less than the threshold.
        assert!(!policy.due(20 * MIB, 5 * MIB));
        // The burst is over: 34 MiB of slack, 26 past the floor.
        assert!(policy.due(42 * MIB, 8 * MIB));
    }

    #[test]
    fn while_a_burst_winds_down_smaller_slack_is_trimmed_too() {
        let mut policy = TrimPolicy::default();
        policy.trimmed(0, 13 * MIB, 5 * MIB);
        // Most of the burst's connections have closed: 20 MiB given back,
        // but a quarter of them are still open.
        policy.trimmed(20 * MIB, 20 * MIB, 12 * MIB);
        // They close: 6 MiB more slack, under TRIM_ABOVE.
        assert!(policy.due(20 * MIB, 6 * MIB));
        // That trim gave back little: the burst is over, and the usual
        // threshold applies again.
        policy.trimmed(SETTLE_ABOVE / 2, 14 * MIB, 6 * MIB);
        assert!(!policy.due(16 * MIB, 6 * MIB));
        assert!(policy.due(25 * MIB, 6 * MIB));
    }

    #[test]
    fn nonsense_readings_never_overflow() {
        let mut policy = TrimPolicy::default();
        policy.trimmed(usize::MAX, usize::MAX, 0);
        assert!(!policy.due(usize::MAX, 0));
        assert!(!policy.due(0, usize::MAX));
    }
}
