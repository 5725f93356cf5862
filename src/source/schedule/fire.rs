//! One fire of a schedule, from claim to resolution: claiming it in the ledger, holding
//! and renewing its lease while it is delivered with retries, finishing or releasing it,
//! and resuming fires that another replica or run left unfinished.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::store::Store;
use super::{Scheduled, rfc3339};
use crate::record::{Ack, Hold, Record};

pub(super) async fn missed_tick(
    s: &Scheduled,
    store: &Store,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let last = match store.last_fired(&s.when.name).await {
        Ok(last) => last?,
        Err(e) => {
            tracing::warn!(mapping = %s.when.name, error = %e, "cannot read the schedule's history; missed fires are skipped");
            return None;
        }
    };
    s.when.timing.last_at_or_before(now).filter(|&t| t > last)
}

/// One fire: claim it (with a store), render its event, deliver it with the retry policy.
pub(super) async fn fire(
    s: Arc<Scheduled>,
    scheduled: DateTime<Utc>,
    store: Option<Arc<Store>>,
    shutdown: CancellationToken,
) {
    let name = &s.when.name;
    // Chosen before the claim, so that a claim retried after a lost reply finds its own row.
    let execution_id = uuid::Uuid::new_v4().to_string();
    if let Some(store) = &store {
        match claim(&s, store, scheduled, &execution_id, &shutdown).await {
            Some(true) => {}
            Some(false) => {
                tracing::debug!(mapping = %name, scheduled = %rfc3339(scheduled), "another replica fired this time");
                return;
            }
            None => return,
        }
    }
    let lateness = (Utc::now() - scheduled).as_seconds_f64().max(0.0);
    metrics::histogram!("esm_gateway_schedule_fire_delay_seconds", "mapping" => name.clone())
        .record(lateness);
    metrics::counter!("esm_gateway_schedule_fires_total", "mapping" => name.clone()).increment(1);
    tracing::debug!(mapping = %name, scheduled = %rfc3339(scheduled), execution_id, "schedule fired");
    run_fire(
        &s,
        scheduled,
        execution_id,
        Duration::ZERO,
        store,
        &shutdown,
    )
    .await;
}

/// Delivers a claimed fire whose record is already `age` old, holding its lease (with a
/// store) until it is resolved; then finishes, releases or (without a store) parks it.
async fn run_fire(
    s: &Scheduled,
    scheduled: DateTime<Utc>,
    execution_id: String,
    age: Duration,
    store: Option<Arc<Store>>,
    shutdown: &CancellationToken,
) {
    let name = &s.when.name;
    let _running = match &store {
        Some(store) => match store.deliver_once(name, scheduled) {
            Some(guard) => Some(guard),
            None => return,
        },
        None => None,
    };
    let now = tokio::time::Instant::now();
    let record = Record {
        key: None,
        fragment: s.payload.render(scheduled, &execution_id),
        id: Some(execution_id.into()),
        position: scheduled.timestamp().max(0) as u64,
        received: now.checked_sub(age).unwrap_or(now),
        received_at: SystemTime::now(),
        trace: None,
        ack: Ack::NONE,
        hold: Hold::default(),
    };
    // Stops the delivery when shutdown comes or the lease is lost to another replica.
    let stop = shutdown.child_token();
    let renewing = CancellationToken::new();
    let renewer = store.clone().map(|store| {
        tokio::spawn(renew(
            name.clone(),
            scheduled,
            store,
            stop.clone(),
            renewing.clone(),
        ))
    });
    let outcome = s.deliverer.deliver(vec![record], &stop).await;
    renewing.cancel();
    let lost = match renewer {
        Some(r) => r.await.unwrap_or(false),
        None => false,
    };
    match (&store, outcome.unresolved.is_empty()) {
        (Some(store), true) => finish(name, scheduled, store, shutdown).await,
        (Some(_), false) if lost => {}
        (Some(store), false) => match store.release(name, scheduled).await {
            Ok(()) => {
                tracing::info!(mapping = %name, scheduled = %rfc3339(scheduled),
                    "shutdown interrupted a fire; its lease is released for a replica or the next start to resume")
            }
            Err(e) => {
                tracing::warn!(mapping = %name, scheduled = %rfc3339(scheduled), error = %e,
                    "shutdown interrupted a fire and its lease cannot be released; a replica resumes it when the lease expires")
            }
        },
        (None, true) => {}
        (None, false) => {
            tracing::warn!(mapping = %name, scheduled = %rfc3339(scheduled),
                "shutdown interrupted a fire and there is no schedule store to resume it from; parking it");
            // Shutdown is under way: the runtime's grace period bounds this.
            let left = s
                .deliverer
                .park_interrupted(
                    outcome.unresolved,
                    outcome.unresolved_invokes,
                    "the gateway stopped during the fire's retries and has no [schedules] store to resume it from",
                    &CancellationToken::new(),
                )
                .await;
            if !left.unresolved.is_empty() {
                tracing::error!(mapping = %name, scheduled = %rfc3339(scheduled), "an interrupted fire could not be parked; lost");
            }
        }
    }
}

/// Renews the lease every third of it until `done`. Returns true (and cancels `stop`) if
/// another replica took the fire over: a lease that expired while the store was
/// unreachable, say. The fire then stops, and that replica resumes it.
async fn renew(
    name: String,
    scheduled: DateTime<Utc>,
    store: Arc<Store>,
    stop: CancellationToken,
    done: CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            () = tokio::time::sleep(store.lease() / 3) => {}
            () = done.cancelled() => return false,
        }
        match store.renew(&name, scheduled).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(mapping = %name, scheduled = %rfc3339(scheduled),
                    "another replica took this fire over; it stops here");
                stop.cancel();
                return true;
            }
            Err(e) => {
                tracing::warn!(mapping = %name, scheduled = %rfc3339(scheduled), error = %e,
                    "cannot renew a fire's lease; retrying")
            }
        }
    }
}

/// Marks a resolved fire finished, retrying while the store is unreachable until
/// shutdown (even past the lease: until a replica takes the fire over, finishing it still
/// saves a second delivery); a fire left unfinished is resumed and delivered again.
async fn finish(name: &str, scheduled: DateTime<Utc>, store: &Store, shutdown: &CancellationToken) {
    let mut tries = 0u32;
    loop {
        match store.finish(name, scheduled).await {
            Ok(()) => return,
            Err(e) => {
                tries += 1;
                tracing::warn!(mapping = %name, scheduled = %rfc3339(scheduled), error = %e,
                    "cannot mark a delivered fire finished; retrying");
                let delay = Duration::from_millis(100).saturating_mul(1 << tries.min(6));
                if shutdown.is_cancelled() {
                    tracing::error!(mapping = %name, scheduled = %rfc3339(scheduled),
                        "a delivered fire is not marked finished; it is fired again when its lease expires");
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// With a store: at start and every half lease, takes over the unfinished fires of these
/// schedules whose lease expired and resumes them.
pub(super) async fn adopt(
    schedules: Vec<Arc<Scheduled>>,
    store: Arc<Store>,
    fires: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        for s in &schedules {
            let name = &s.when.name;
            let orphans = match store.take_over(name).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(mapping = %name, error = %e, "cannot look for unfinished fires to resume");
                    continue;
                }
            };
            for o in orphans {
                // Our own lease, expired while the store was unreachable, on a fire this
                // process still delivers: it is ours again, and already running. (The
                // guard taken here drops at once; run_fire takes its own.)
                if store.deliver_once(name, o.scheduled).is_none() {
                    continue;
                }
                let age = (Utc::now() - o.scheduled).to_std().unwrap_or_default();
                tracing::info!(mapping = %name, scheduled = %rfc3339(o.scheduled), execution_id = %o.execution_id,
                    "resuming a fire another replica or run left unfinished");
                metrics::counter!("esm_gateway_schedule_resumed_fires_total", "mapping" => name.clone())
                    .increment(1);
                let (s, store, shutdown) = (s.clone(), store.clone(), shutdown.clone());
                fires.spawn(async move {
                    run_fire(&s, o.scheduled, o.execution_id, age, Some(store), &shutdown).await
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(store.lease() / 2) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Claims the tick in the store, retrying while it is unreachable for as long as the
/// event may live. Some(false): another replica has it; None: gave up (or shutdown),
/// and the tick is not fired, since firing unclaimed could fire it twice.
async fn claim(
    s: &Scheduled,
    store: &Store,
    scheduled: DateTime<Utc>,
    execution_id: &str,
    shutdown: &CancellationToken,
) -> Option<bool> {
    let started = tokio::time::Instant::now();
    let mut tries = 0u32;
    loop {
        match store.claim(&s.when.name, scheduled, execution_id).await {
            Ok(won) => return Some(won),
            Err(e) => {
                tries += 1;
                if started.elapsed() > s.max_age {
                    tracing::error!(mapping = %s.when.name, scheduled = %rfc3339(scheduled), error = %e,
                        "schedule store unreachable for longer than the event's maximum age; this time is not fired");
                    s.deliverer.mapping.fail(&e);
                    return None;
                }
                tracing::warn!(mapping = %s.when.name, error = %e, "cannot claim a schedule fire; retrying");
                s.deliverer.mapping.error(&e);
                let delay = s.deliverer.policy.backoff(tries);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}
