//! The buckets under tokio's paused clock: rates, bursts, refills, the
//! order of the caller's and the shared budget, overrides, dry runs, and
//! the bound on callers.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::policy::model::{Match, Selector};

fn rate(per_second: u32, burst: u32) -> Rate {
    Rate { per_second, burst }
}

fn limit(total: Option<Rate>, per_client: Option<Rate>) -> Limit {
    Limit {
        ports: Match::default(),
        methods: Match::default(),
        paths: Match::default(),
        total,
        per_client,
        overrides: Vec::new(),
    }
}

fn policy(limits: Vec<Limit>, dry_run: bool) -> Vec<Arc<RateLimitPolicy>> {
    vec![Arc::new(RateLimitPolicy {
        id: "shop/limits".into(),
        selector: Selector::All,
        dry_run,
        limits,
        problems: Vec::new(),
    })]
}

fn limiter() -> RateLimiter {
    RateLimiter::new(
        IntCounterVec::new(prometheus::Opts::new("limited", "h"), &["policy", "mode"]).unwrap(),
    )
}

fn request(caller: &str) -> Counted<'_> {
    Counted {
        port: 80,
        method: "GET",
        path: "/",
        caller,
    }
}

/// How many of `n` back-to-back requests from `caller` pass.
fn passed(
    limiter: &RateLimiter,
    policies: &[Arc<RateLimitPolicy>],
    caller: &str,
    n: usize,
) -> usize {
    (0..n)
        .filter(|_| {
            limiter
                .check(policies, request(caller), Instant::now())
                .is_ok()
        })
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_burst_passes_then_the_rate_refills_it() {
    let limiter = limiter();
    let policies = policy(vec![limit(Some(rate(10, 5)), None)], false);
    assert_eq!(passed(&limiter, &policies, "a", 20), 5, "the burst");
    let refused = limiter
        .check(&policies, request("a"), Instant::now())
        .unwrap_err();
    assert_eq!(refused.retry_after, Duration::from_millis(100));
    tokio::time::advance(Duration::from_millis(300)).await;
    assert_eq!(
        passed(&limiter, &policies, "a", 20),
        3,
        "100 ms per request"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        passed(&limiter, &policies, "a", 20),
        5,
        "full again, never more"
    );
}

#[tokio::test(start_paused = true)]
async fn over_a_second_the_count_is_the_rate_plus_the_burst() {
    let limiter = limiter();
    let policies = policy(vec![limit(Some(rate(100, 100)), None)], false);
    let mut passed_total = 0;
    for _ in 0..100 {
        passed_total += passed(&limiter, &policies, "a", 10);
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert!((195..=201).contains(&passed_total), "{passed_total}");
}

#[tokio::test(start_paused = true)]
async fn a_caller_over_its_own_budget_does_not_drain_the_shared_one() {
    let limiter = limiter();
    let policies = policy(vec![limit(Some(rate(10, 10)), Some(rate(2, 2)))], false);
    assert_eq!(passed(&limiter, &policies, "flood", 1000), 2);
    // The flood spent 2 of the shared 10; the others share the rest.
    assert_eq!(passed(&limiter, &policies, "b", 1), 1);
    assert_eq!(passed(&limiter, &policies, "c", 1), 1);
    let mut others = 0;
    for caller in ["d", "e", "f", "g", "h", "i", "j"] {
        others += passed(&limiter, &policies, caller, 2);
    }
    assert_eq!(others, 6, "10 shared: 2 + 1 + 1 + 6");
}

#[tokio::test(start_paused = true)]
async fn a_named_caller_gets_its_override_instead_of_the_per_client_rate() {
    let limiter = limiter();
    let mut l = limit(None, Some(rate(1, 1)));
    l.overrides = vec![(
        vec!["spiffe://cluster.local/ns/shop/sa/batch".into()],
        rate(50, 50),
    )];
    let policies = policy(vec![l], false);
    assert_eq!(
        passed(
            &limiter,
            &policies,
            "spiffe://cluster.local/ns/shop/sa/batch",
            100
        ),
        50
    );
    assert_eq!(
        passed(
            &limiter,
            &policies,
            "spiffe://cluster.local/ns/shop/sa/web",
            100
        ),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_counts_but_refuses_nothing() {
    let limiter = limiter();
    let policies = policy(vec![limit(Some(rate(1, 1)), None)], true);
    assert_eq!(passed(&limiter, &policies, "a", 10), 10);
    assert_eq!(
        limiter
            .limited
            .with_label_values(&["shop/limits", "dry-run"])
            .get(),
        9
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_refused_by_one_limit_spends_nothing_of_the_others() {
    let limiter = limiter();
    let mut narrow = limit(Some(rate(1, 1)), None);
    narrow.paths = Match {
        any_of: Some(vec![crate::policy::model::Pattern::Exact("/".into())]),
        none_of: Vec::new(),
    };
    let policies = policy(vec![limit(Some(rate(1, 3)), None), narrow], false);
    assert_eq!(passed(&limiter, &policies, "a", 5), 1, "the narrow limit");
    // The wide limit spent 1 of 3: two other paths still pass.
    let other = |path| Counted {
        path,
        ..request("a")
    };
    assert!(
        limiter
            .check(&policies, other("/x"), Instant::now())
            .is_ok()
    );
    assert!(
        limiter
            .check(&policies, other("/y"), Instant::now())
            .is_ok()
    );
    assert!(
        limiter
            .check(&policies, other("/z"), Instant::now())
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_distinct_callers_is_bounded_in_memory() {
    let limiter = limiter();
    let policies = policy(vec![limit(None, Some(rate(1, 1)))], false);
    for i in 0..(MAX_CALLERS_PER_LIMIT * 3) {
        let caller = format!("10.0.{}.{}", i / 256, i % 256);
        let _ = limiter.check(&policies, request(&caller), Instant::now());
    }
    let slots = limiter.slots.lock();
    assert!(slots.slots[0].callers.len() <= MAX_CALLERS_PER_LIMIT);
}

#[tokio::test(start_paused = true)]
async fn a_changed_limit_starts_with_full_buckets() {
    let limiter = limiter();
    let policies = policy(vec![limit(Some(rate(1, 1)), None)], false);
    assert_eq!(passed(&limiter, &policies, "a", 5), 1);
    let raised = policy(vec![limit(Some(rate(1, 4)), None)], false);
    assert_eq!(passed(&limiter, &raised, "a", 5), 4);
}
