//! Choosing an endpoint for each request: power of two choices over a
//! peak-EWMA cost, with endpoints that keep failing set aside for a
//! while. Pure: time is passed in, and randomness is a seeded generator,
//! so every choice is reproducible in tests.
//!
//! - **Cost** = (the latency estimate + 5 ms) × (requests in flight + 1).
//!   The estimate jumps up to any slower sample at once (a peak), moves
//!   toward faster ones with a 2 s time constant, and while an endpoint
//!   is not picked it decays toward zero with the same constant, so an
//!   endpoint avoided for one slow answer is tried again (tower's
//!   peak-EWMA; Linkerd's 10 s let one stalled answer steer sequential
//!   traffic away from a healthy replica for that long: docs/discovery.md).
//!   An endpoint
//!   never measured is assumed as fast as the one it is compared with
//!   (30 ms when neither is measured), and its first sample replaces that
//!   guess: a new replica is tried at once instead of starving behind a
//!   guess. A request that had to open its connection gives no sample
//!   (its time is mostly the handshake: [`Outcome::AnsweredOnNewConnection`]).
//! - **Choice**: two distinct endpoints at random; the second wins only
//!   when it costs less than the first by a factor of 1.5. Latencies of a
//!   few milliseconds jitter by as much as they differ, and a strict
//!   comparison would let that noise pin sequential traffic to one
//!   endpoint; the 5 ms added to each estimate makes sub-millisecond
//!   differences ties for the same reason. A replica 50 ms slower, or one
//!   request more in flight, is still a clear difference. Cheap (no
//!   sorting, no global state) and free of the herd behaviour of always
//!   picking the single least-loaded endpoint.
//! - **Failure accrual**: after 5 consecutive failures to connect or to
//!   get a response (not HTTP error statuses) an endpoint is skipped for
//!   1 s, doubling per renewed failure up to 30 s; after the pause it gets
//!   one request, which on success clears the record. When every endpoint
//!   is paused, the one whose pause ends first is still tried: traffic to
//!   a Service is never refused by the balancer alone.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The latency assumed for an endpoint never measured, when the endpoint
/// it is compared with is not measured either.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the estimate forgets a slow past.
pub const DECAY: Duration = Duration::from_secs(2);
/// Added to every estimate before comparing: differences well below it
/// are noise.
pub const COST_FLOOR: Duration = Duration::from_millis(5);
/// How much cheaper the second choice must be to win.
pub const CLEARLY_CHEAPER: f64 = 1.5;
/// Consecutive failures before an endpoint is paused.
pub const FAILURES_TO_PAUSE: u32 = 5;
pub const FIRST_PAUSE: Duration = Duration::from_secs(1);
pub const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The peak-EWMA latency estimate and the requests in flight.
#[derive(Debug, Clone)]
struct Load {
    /// `None` until the first sample.
    estimate_ns: Option<f64>,
    updated: Instant,
    pending: u32,
}

impl Load {
    fn new(now: Instant) -> Self {
        Self {
            estimate_ns: None,
            updated: now,
            pending: 0,
        }
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        self.estimate_ns = Some(match self.estimate_ns {
            Some(estimate) if sample <= estimate => {
                let keep = decay(now.saturating_duration_since(self.updated));
                estimate * keep + sample * (1.0 - keep)
            }
            // A peak, or the first sample replacing the guess.
            _ => sample,
        });
        self.updated = now;
    }

    /// The estimate at `now`, decayed toward zero since the last sample.
    fn latency(&self, now: Instant) -> Option<f64> {
        self.estimate_ns
            .map(|estimate| estimate * decay(now.saturating_duration_since(self.updated)))
    }

    /// The cost at a latency (the decayed estimate, or a stand-in for an
    /// endpoint never measured).
    fn cost(&self, latency_ns: f64) -> f64 {
        (latency_ns + COST_FLOOR.as_nanos() as f64) * f64::from(self.pending + 1)
    }
}

/// The weight an estimate keeps after `elapsed`.
fn decay(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

#[derive(Debug, Clone, Default)]
struct Failures {
    consecutive: u32,
    pause: Option<Duration>,
    paused_until: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Slot<K> {
    key: K,
    load: Load,
    failures: Failures,
}

/// How a request to an endpoint ended, for the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived after this long (whatever its status).
    Answered(Duration),
    /// A response arrived on a connection the request had to open: the
    /// endpoint works, but the time includes connecting and the TLS
    /// handshake (the proxy's own CPU, not the endpoint's latency), so it
    /// is no latency sample. Counting it let one handshake on a busy CPU
    /// steer sequential traffic away from a healthy replica.
    AnsweredOnNewConnection,
    /// No connection, or no response.
    Failed,
    /// Given up by the caller before an answer (not the endpoint's fault).
    Abandoned,
}

/// The endpoints of one destination and their state.
#[derive(Debug)]
pub struct Balancer<K> {
    slots: Vec<Slot<K>>,
    /// Where each key's slot is, so finishing a request costs a lookup
    /// whatever the size of the set.
    positions: HashMap<K, usize>,
    rng: fastrand::Rng,
}

impl<K: Clone + Eq + Hash> Balancer<K> {
    pub fn new(seed: u64) -> Self {
        Self {
            slots: Vec::new(),
            positions: HashMap::new(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn slot_mut(&mut self, key: &K) -> Option<&mut Slot<K>> {
        let at = *self.positions.get(key)?;
        self.slots.get_mut(at)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Replaces the endpoint set; endpoints still present keep their
    /// estimate, load and failure record; removed ones get no new requests.
    pub fn set_endpoints(&mut self, keys: impl IntoIterator<Item = K>, now: Instant) {
        let mut old: HashMap<K, Slot<K>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|slot| (slot.key.clone(), slot))
            .collect();
        self.positions.clear();
        for key in keys {
            if self.positions.contains_key(&key) {
                continue;
            }
            let slot = old.remove(&key).unwrap_or_else(|| Slot {
                key: key.clone(),
                load: Load::new(now),
                failures: Failures::default(),
            });
            self.positions.insert(key, self.slots.len());
            self.slots.push(slot);
        }
    }

    /// The endpoint for the next request, counted as in flight until
    /// [`Self::finish`]; `None` only when there is no endpoint. `avoid` is
    /// skipped when another endpoint exists (a retry goes elsewhere).
    pub fn pick(&mut self, now: Instant, avoid: Option<&K>) -> Option<K> {
        let chosen = match self.two_usable(now, avoid) {
            Some((a, b)) => self.cheaper(a, b, now),
            None => self.pick_among_few(now, avoid)?,
        };
        let slot = &mut self.slots[chosen];
        slot.load.pending += 1;
        Some(slot.key.clone())
    }

    /// Whether slot `i` may take the next request.
    fn usable(&self, i: usize, now: Instant, avoid: Option<&K>) -> bool {
        let slot = &self.slots[i];
        (self.slots.len() == 1 || Some(&slot.key) != avoid)
            && slot.failures.paused_until.is_none_or(|until| now >= until)
    }

    /// Two distinct usable slots drawn at random, without allocating; `None`
    /// when a few draws find none (few usable slots: see
    /// [`Self::pick_among_few`]).
    fn two_usable(&mut self, now: Instant, avoid: Option<&K>) -> Option<(usize, usize)> {
        const DRAWS: usize = 4;
        let n = self.slots.len();
        if n < 2 {
            return None;
        }
        let mut first = None;
        for _ in 0..DRAWS {
            let a = self.rng.usize(..n);
            if self.usable(a, now, avoid) {
                first = Some(a);
                break;
            }
        }
        let a = first?;
        for _ in 0..DRAWS {
            let mut b = self.rng.usize(..n - 1);
            if b >= a {
                b += 1;
            }
            if self.usable(b, now, avoid) {
                return Some((a, b));
            }
        }
        None
    }

    /// The first choice, unless the second is clearly cheaper. An endpoint
    /// never measured is assumed as fast as the one it is compared with
    /// (30 ms when neither is measured).
    fn cheaper(&self, a: usize, b: usize, now: Instant) -> usize {
        let (la, lb) = (
            self.slots[a].load.latency(now),
            self.slots[b].load.latency(now),
        );
        let default = DEFAULT_RTT.as_nanos() as f64;
        let cost_a = self.slots[a].load.cost(la.or(lb).unwrap_or(default));
        let cost_b = self.slots[b].load.cost(lb.or(la).unwrap_or(default));
        if cost_b * CLEARLY_CHEAPER < cost_a {
            b
        } else {
            a
        }
    }

    /// The exact choice when random draws found no two usable slots: the
    /// one usable slot, two of a few, or with every slot paused the one
    /// whose pause ends first.
    fn pick_among_few(&mut self, now: Instant, avoid: Option<&K>) -> Option<usize> {
        let usable: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.usable(i, now, avoid))
            .collect();
        match usable.len() {
            0 => (0..self.slots.len())
                .filter(|&i| self.slots.len() == 1 || Some(&self.slots[i].key) != avoid)
                .min_by_key(|&i| self.slots[i].failures.paused_until.unwrap_or(now)),
            1 => Some(usable[0]),
            n => {
                let a = self.rng.usize(..n);
                let mut b = self.rng.usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                Some(self.cheaper(usable[a], usable[b], now))
            }
        }
    }

    /// Records how a request picked from `key` ended; true when this
    /// outcome paused the endpoint. A key no longer in the set (removed
    /// meanwhile) is ignored.
    pub fn finish(&mut self, key: &K, outcome: Outcome, now: Instant) -> bool {
        let Some(slot) = self.slot_mut(key) else {
            return false;
        };
        slot.load.pending = slot.load.pending.saturating_sub(1);
        match outcome {
            Outcome::Answered(rtt) => {
                slot.load.observe(rtt, now);
                slot.failures = Failures::default();
            }
            Outcome::AnsweredOnNewConnection => slot.failures = Failures::default(),
            Outcome::Failed => {
                let failures = &mut slot.failures;
                failures.consecutive += 1;
                if failures.consecutive >= FAILURES_TO_PAUSE {
                    let pause = failures
                        .pause
                        .map_or(FIRST_PAUSE, |p| (p * 2).min(MAX_PAUSE));
                    failures.pause = Some(pause);
                    failures.paused_until = Some(now + pause);
                    // One more failure after the pause renews it.
                    failures.consecutive = FAILURES_TO_PAUSE - 1;
                    return true;
                }
            }
            Outcome::Abandoned => {}
        }
        false
    }

    /// Records that `key` works (a connection to it was established)
    /// while its request stays in flight: the latency sample counts and
    /// its failure record is cleared.
    pub fn succeeded(&mut self, key: &K, rtt: Duration, now: Instant) {
        if let Some(slot) = self.slot_mut(key) {
            slot.load.observe(rtt, now);
            slot.failures = Failures::default();
        }
    }

    /// Whether `key` is paused at `now` (for metrics).
    pub fn is_paused(&self, key: &K, now: Instant) -> bool {
        self.positions
            .get(key)
            .and_then(|&at| self.slots[at].failures.paused_until)
            .is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `requests` sequential requests through the balancer with
    /// the given latency per endpoint, some in flight at once.
    fn spread(latencies_ms: &[u64], requests: usize) -> Vec<usize> {
        let mut balancer = Balancer::new(7);
        let start = Instant::now();
        balancer.set_endpoints(0..latencies_ms.len(), start);
        let mut now = start;
        let mut counts = vec![0; latencies_ms.len()];
        let mut in_flight: Vec<(Instant, usize)> = Vec::new();
        for _ in 0..requests {
            // Four concurrent requests, each answered after its latency.
            if in_flight.len() == 4 {
                in_flight.sort_by_key(|(done, _)| *done);
                let (done, key) = in_flight.remove(0);
                now = now.max(done);
                let rtt = Duration::from_millis(latencies_ms[key]);
                balancer.finish(&key, Outcome::Answered(rtt), now);
            }
            let key = balancer.pick(now, None).unwrap();
            counts[key] += 1;
            in_flight.push((now + Duration::from_millis(latencies_ms[key]), key));
        }
        counts
    }

    #[test]
    fn equal_endpoints_share_the_load() {
        let counts = spread(&[10, 10, 10], 600);
        for count in &counts {
            assert!((150..=250).contains(count), "{counts:?}");
        }
    }

    #[test]
    fn a_slow_endpoint_gets_a_small_share() {
        let counts = spread(&[10, 10, 60], 600);
        assert!(counts[2] < 90, "{counts:?}");
    }

    /// Sequential 1 ms answers after `first` was `b`'s first outcome.
    fn sequential_after(first: Outcome) -> Vec<usize> {
        let mut balancer = Balancer::new(11);
        let t0 = Instant::now();
        balancer.set_endpoints(0..3usize, t0);
        balancer.finish(&1, first, t0);
        let mut counts = vec![0; 3];
        let mut now = t0;
        for _ in 0..600 {
            let key = balancer.pick(now, None).unwrap();
            counts[key] += 1;
            now += Duration::from_millis(1);
            balancer.finish(&key, Outcome::Answered(Duration::from_millis(1)), now);
        }
        counts
    }

    #[test]
    fn an_answer_on_a_new_connection_is_no_latency_sample_but_clears_failures() {
        // The first request to an endpoint waited 40 ms for its connection
        // and handshake: as a sample it steers sequential traffic away
        // from a healthy endpoint; as what it is, it changes nothing.
        let counted = sequential_after(Outcome::Answered(Duration::from_millis(40)));
        assert!(counted[1] < 120, "{counted:?}");
        let counts = sequential_after(Outcome::AnsweredOnNewConnection);
        for count in &counts {
            assert!((150..=250).contains(count), "{counts:?}");
        }

        let mut balancer = Balancer::new(1);
        let t0 = Instant::now();
        balancer.set_endpoints(["a", "b"], t0);
        for _ in 0..FAILURES_TO_PAUSE - 1 {
            balancer.finish(&"b", Outcome::Failed, t0);
        }
        balancer.finish(&"b", Outcome::AnsweredOnNewConnection, t0);
        balancer.finish(&"b", Outcome::Failed, t0);
        assert!(!balancer.is_paused(&"b", t0));
    }

    #[test]
    fn a_failing_endpoint_is_paused_then_tried_once_then_trusted_again() {
        let mut balancer = Balancer::new(1);
        let t0 = Instant::now();
        balancer.set_endpoints(["a", "b"], t0);
        for _ in 0..FAILURES_TO_PAUSE {
            balancer.pick(t0, None);
            balancer.finish(&"b", Outcome::Failed, t0);
        }
        assert!(balancer.is_paused(&"b", t0));
        for _ in 0..50 {
            let key = balancer.pick(t0, None).unwrap();
            assert_eq!(key, "a");
            balancer.finish(&key, Outcome::Answered(Duration::from_millis(5)), t0);
        }
        // After the pause: picked again; one more failure pauses it for
        // twice as long.
        let t1 = t0 + FIRST_PAUSE;
        assert!(!balancer.is_paused(&"b", t1));
        balancer.finish(&"b", Outcome::Failed, t1);
        assert!(balancer.is_paused(&"b", t1 + FIRST_PAUSE));
        assert!(!balancer.is_paused(&"b", t1 + FIRST_PAUSE * 2));
        // A success clears the record.
        balancer.finish(&"b", Outcome::Answered(Duration::from_millis(5)), t1);
        assert!(!balancer.is_paused(&"b", t1));
    }

    #[test]
    fn when_every_endpoint_is_paused_the_soonest_back_is_still_tried() {
        let mut balancer = Balancer::new(3);
        let t0 = Instant::now();
        balancer.set_endpoints(["a"], t0);
        for _ in 0..FAILURES_TO_PAUSE {
            balancer.finish(&"a", Outcome::Failed, t0);
        }
        assert!(balancer.is_paused(&"a", t0));
        assert_eq!(balancer.pick(t0, None), Some("a"));
        let mut empty: Balancer<&str> = Balancer::new(3);
        assert_eq!(empty.pick(t0, None), None);
    }

    #[test]
    fn removed_endpoints_get_nothing_and_kept_ones_keep_their_record() {
        let mut balancer = Balancer::new(5);
        let t0 = Instant::now();
        balancer.set_endpoints(["a", "b", "c"], t0);
        for _ in 0..FAILURES_TO_PAUSE {
            balancer.finish(&"b", Outcome::Failed, t0);
        }
        balancer.set_endpoints(["b", "c"], t0);
        assert!(balancer.is_paused(&"b", t0));
        for _ in 0..100 {
            let key = balancer.pick(t0, None).unwrap();
            assert_eq!(key, "c");
            balancer.finish(&key, Outcome::Answered(Duration::from_millis(1)), t0);
        }
        // Finishing a request to a removed endpoint is harmless.
        balancer.finish(&"a", Outcome::Failed, t0);
        assert_eq!(balancer.len(), 2);
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed_when_it_can() {
        let mut balancer = Balancer::new(9);
        let t0 = Instant::now();
        balancer.set_endpoints(["a", "b", "c"], t0);
        for _ in 0..100 {
            let key = balancer.pick(t0, Some(&"a")).unwrap();
            assert_ne!(key, "a");
            balancer.finish(&key, Outcome::Abandoned, t0);
        }
        balancer.set_endpoints(["a"], t0);
        assert_eq!(balancer.pick(t0, Some(&"a")), Some("a"));
    }

    #[test]
    fn the_estimate_jumps_to_a_slow_sample_and_decays_toward_fast_ones() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        load.observe(Duration::from_millis(20), t0);
        assert_eq!(
            load.estimate_ns,
            Some(20e6),
            "the first sample replaces the guess"
        );
        load.observe(Duration::from_millis(100), t0);
        assert_eq!(load.estimate_ns, Some(100e6));
        load.observe(Duration::from_millis(10), t0 + DECAY);
        // One time constant: about 63 % of the way to the sample.
        let expected = 100e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        let estimate = load.estimate_ns.unwrap();
        assert!((estimate - expected).abs() < 1.0, "{estimate}");
        load.pending = 2;
        let floor = COST_FLOOR.as_nanos() as f64;
        let t1 = t0 + DECAY;
        let latency = load.latency(t1).unwrap();
        assert!((load.cost(latency) - (expected + floor) * 3.0).abs() < 3.0);
        // Not picked for one more time constant: decayed toward zero.
        let later = load.latency(t1 + DECAY).unwrap();
        assert!((later - expected * (-1f64).exp()).abs() < 1.0, "{later}");
    }

    /// Requests one at a time, each answered after its endpoint's latency
    /// plus jitter, as a keep-alive client sends them.
    fn sequential(latencies_ms: &[f64], jitter_ms: f64, requests: usize) -> Vec<usize> {
        let mut balancer = Balancer::new(11);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut now = Instant::now();
        balancer.set_endpoints(0..latencies_ms.len(), now);
        let mut counts = vec![0; latencies_ms.len()];
        for _ in 0..requests {
            let key = balancer.pick(now, None).unwrap();
            counts[key] += 1;
            let rtt = Duration::from_secs_f64((latencies_ms[key] + rng.f64() * jitter_ms) / 1e3);
            now += rtt;
            balancer.finish(&key, Outcome::Answered(rtt), now);
        }
        counts
    }

    #[test]
    fn sequential_requests_spread_over_equal_endpoints_despite_jitter() {
        // Sub-millisecond service times jittering by 3x: noise, not a
        // reason to pin traffic to one endpoint.
        let counts = sequential(&[0.5, 0.5, 0.5], 1.5, 600);
        for count in &counts {
            assert!((120..=280).contains(count), "{counts:?}");
        }
    }

    /// Sequential requests where any request may stall (a loaded machine):
    /// `spike_ms` with probability `spike_chance`.
    fn sequential_with_spikes(spike_ms: f64, spike_chance: f64, requests: usize) -> Vec<usize> {
        let mut balancer = Balancer::new(13);
        let mut rng = fastrand::Rng::with_seed(17);
        let mut now = Instant::now();
        balancer.set_endpoints(0..3usize, now);
        let mut counts = vec![0; 3];
        for _ in 0..requests {
            let key = balancer.pick(now, None).unwrap();
            counts[key] += 1;
            let ms = if rng.f64() < spike_chance {
                spike_ms
            } else {
                1.0 + rng.f64()
            };
            let rtt = Duration::from_secs_f64(ms / 1e3);
            now += rtt;
            balancer.finish(&key, Outcome::Answered(rtt), now);
        }
        counts
    }

    #[test]
    fn noise_spikes_on_a_loaded_machine_do_not_starve_an_equal_endpoint() {
        for (spike_ms, chance) in [(20.0, 0.02), (50.0, 0.01), (10.0, 0.05)] {
            for requests in [600, 3000] {
                let counts = sequential_with_spikes(spike_ms, chance, requests);
                for count in &counts {
                    let share = *count as f64 / requests as f64;
                    assert!(
                        (0.2..=0.47).contains(&share),
                        "spikes of {spike_ms} ms at {chance}: {counts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sequential_requests_avoid_a_much_slower_endpoint() {
        let counts = sequential(&[0.5, 0.5, 50.0], 1.0, 600);
        assert!(counts[2] < 10, "{counts:?}");
    }

    #[test]
    fn a_new_endpoint_is_tried_at_once_not_starved_behind_a_guess() {
        let mut balancer = Balancer::new(2);
        let mut now = Instant::now();
        balancer.set_endpoints(["a", "b"], now);
        for _ in 0..100 {
            let key = balancer.pick(now, None).unwrap();
            now += Duration::from_millis(1);
            balancer.finish(&key, Outcome::Answered(Duration::from_millis(1)), now);
        }
        balancer.set_endpoints(["a", "b", "c"], now);
        let mut c = 0;
        for _ in 0..300 {
            let key = balancer.pick(now, None).unwrap();
            c += usize::from(key == "c");
            now += Duration::from_millis(1);
            balancer.finish(&key, Outcome::Answered(Duration::from_millis(1)), now);
        }
        assert!(c >= 60, "the new endpoint got {c} of 300");
    }
}
