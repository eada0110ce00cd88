//! Leader election through a `coordination.k8s.io/v1` Lease, so two
//! controller replicas never issue at once.
//!
//! The decision is pure ([`step`]); [`run`] reads and writes the Lease
//! with optimistic concurrency (a replace carries the resourceVersion it
//! read, so of two racing replicas exactly one wins). A leader that cannot
//! renew within the renew deadline stops leading before its Lease can
//! expire, so there is never a moment with two leaders.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use time::OffsetDateTime;
use tokio::sync::watch;

/// Timing, as client-go's defaults.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What the Lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub renewed: Option<OffsetDateTime>,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it (or the holder let it expire): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live Lease.
    Follow { holder: String },
}

pub fn step(lease: Option<&LeaseView>, me: &str, now: OffsetDateTime) -> Step {
    let Some(lease) = lease else {
        return Step::Acquire;
    };
    match &lease.holder {
        Some(holder) if holder == me => Step::Renew,
        Some(holder) if !holder.is_empty() => {
            let expired = lease
                .renewed
                .is_none_or(|renewed| now >= renewed + lease.duration);
            if expired {
                Step::Acquire
            } else {
                Step::Follow {
                    holder: holder.clone(),
                }
            }
        }
        _ => Step::Acquire,
    }
}

fn view(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        renewed: spec
            .renew_time
            .or(spec.acquire_time)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok()),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
    }
}

fn micro(now: OffsetDateTime) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_second(now.unix_timestamp())
        .ok()
        .map(MicroTime)
}

/// How long a stopping leader tries to hand its Lease back.
const RELEASE_WITHIN: Duration = Duration::from_secs(2);

/// Keeps trying to lead, publishing whether we lead on `leading`, until
/// `stop` resolves; then stops leading and, if it held the Lease, hands
/// it back so another replica takes over at its next try instead of when
/// the Lease expires (client-go's `ReleaseOnCancel`).
pub async fn run(
    api: Api<Lease>,
    name: String,
    me: String,
    timing: LeaseTiming,
    leading: watch::Sender<bool>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    tokio::select! {
        () = lead(&api, &name, &me, timing, &leading) => {}
        () = &mut stop => {}
    }
    let held = leading.send_replace(false);
    if held {
        match tokio::time::timeout(RELEASE_WITHIN, release(&api, &name, &me)).await {
            Ok(Ok(())) => tracing::info!(lease = %name, "Released the lease"),
            Ok(Err(error)) => {
                tracing::warn!(lease = %name, %error, "Cannot release the lease; it expires on its own");
            }
            Err(_) => {
                tracing::warn!(lease = %name, "Releasing the lease timed out; it expires on its own")
            }
        }
    }
}

/// Gives the Lease up if we still hold it: no holder, so any replica
/// acquires it at once.
async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = micro(OffsetDateTime::now_utc());
    // Carries the resourceVersion we read: if someone took it meanwhile,
    // the 409 leaves their hold alone.
    match api.replace(name, &super::write_params(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The leadership loop; never returns.
async fn lead(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    timing: LeaseTiming,
    leading: &watch::Sender<bool>,
) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let result = attempt(api, name, me, timing).await;
        match result {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(lease = %name, "Became the leader");
                }
                last_renewal = Some(tokio::time::Instant::now());
                set(leading, true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(lease = %name, "Lost the lease to another replica");
                }
                last_renewal = None;
                set(leading, false);
            }
            Err(error) => {
                tracing::warn!(lease = %name, %error, "Cannot read or write the lease");
                // Stop leading before the Lease could expire and another
                // replica take over.
                if last_renewal.is_some_and(|t| t.elapsed() >= timing.renew_deadline) {
                    tracing::warn!(lease = %name, "Renew deadline passed: no longer the leader");
                    last_renewal = None;
                    set(leading, false);
                }
            }
        }
        tokio::time::sleep(timing.retry_period).await;
    }
}

/// Publishes whether we lead, waking the watchers only when it changes:
/// a renewal that changes nothing must not start a reconcile pass.
fn set(leading: &watch::Sender<bool>, now_leading: bool) {
    leading.send_if_modified(|leads| std::mem::replace(leads, now_leading) != now_leading);
}

/// One round: `Ok(true)` if we hold the Lease afterwards.
async fn attempt(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    timing: LeaseTiming,
) -> Result<bool, kube::Error> {
    let now = OffsetDateTime::now_utc();
    let current = api.get_opt(name).await?;
    let decision = step(current.as_ref().map(view).as_ref(), me, now);
    let duration_seconds = timing.lease_duration.as_secs().clamp(1, i32::MAX as u64) as i32;
    match (decision, current) {
        (Step::Follow { .. }, _) => Ok(false),
        (_, None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_string()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: micro(now),
                    renew_time: micro(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&super::write_params(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        (decision, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if decision == Step::Acquire {
                spec.holder_identity = Some(me.to_string());
                spec.acquire_time = micro(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = micro(now);
            spec.lease_duration_seconds = Some(duration_seconds);
            // Carries the resourceVersion we read: a concurrent writer
            // makes this a 409 and we follow.
            match api.replace(name, &super::write_params(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, now: OffsetDateTime) -> LeaseView {
        LeaseView {
            holder: Some(holder.into()),
            renewed: Some(now - time::Duration::seconds(renewed_secs_ago)),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_missing_or_expired_lease_is_taken_and_a_live_one_followed() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(step(None, "a", now), Step::Acquire);
        assert_eq!(step(Some(&lease("a", 3, now)), "a", now), Step::Renew);
        assert_eq!(
            step(Some(&lease("b", 3, now)), "a", now),
            Step::Follow { holder: "b".into() }
        );
        assert_eq!(step(Some(&lease("b", 15, now)), "a", now), Step::Acquire);
        let released = LeaseView {
            holder: None,
            renewed: None,
            duration: Duration::from_secs(15),
        };
        assert_eq!(step(Some(&released), "a", now), Step::Acquire);
    }
}
