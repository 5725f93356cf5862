//! The schedule source: EventBridge-style schedules fired into functions.
//!
//! One timer task serves every schedule of the process: a heap ordered by the next
//! moment each schedule is due, so ten thousand idle schedules cost one sleeping task
//! (woken at least once a minute, to notice a wall clock that was set). When a schedule
//! is due, its fire runs in a task of its own (claim, render, deliver with retries) and
//! its next time goes back on the heap; a slow function never delays another schedule.
//!
//! Once across replicas, and at least once: with a store, a fire first claims (schedule,
//! scheduled time) in PostgreSQL as a lease, and only the replica whose insert wins
//! invokes. It renews the lease while it retries and marks the row finished when the fire
//! is delivered, parked or dropped. A fire stopped before that (shutdown, reload,
//! disable) releases its lease; one whose replica died keeps it until it expires. Either
//! way every replica running the schedule looks for such fires at start and every half
//! lease, takes them over and resumes them, with the retry budget of the event's age from
//! its scheduled time. Fire times are computed from the configuration alone (rates count
//! from their start or the epoch, flexible-window offsets are a hash), so every replica
//! names the same instants.
//!
//! Without a store nothing outlives the process, so a fire that shutdown interrupts is
//! parked in the on-failure destination at once (or, with none, logged and dropped as an
//! exhausted fire is).

pub mod expression;
pub mod store;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{MissedFire, ScheduleSource};
use crate::pipeline::retry::Deliverer;
use crate::record::{Ack, Hold, Record};
use crate::status::State;
pub use expression::{Expression, ExpressionError};
use store::Store;

/// The Scheduler input placeholders substituted when a schedule fires (the attempt
/// number is substituted per invoke, by the envelope).
pub const SCHEDULED_TIME: &str = "<aws.scheduler.scheduled-time>";
pub const EXECUTION_ID: &str = "<aws.scheduler.execution-id>";
pub const SCHEDULE_ARN: &str = "<aws.scheduler.schedule-arn>";

/// Longest the timer sleeps at once, so that a wall clock that was set is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A fire this late (the process was suspended or starved) is still sent, but the
/// schedule's ticks missed meanwhile are skipped rather than sent in a burst.
const LATE: TimeDelta = TimeDelta::seconds(60);

/// When a schedule fires: its expression in its zone, between its start and end.
#[derive(Debug, Clone)]
pub struct Timing {
    pub expression: Expression,
    pub tz: Tz,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

impl Timing {
    pub fn new(source: &ScheduleSource) -> Timing {
        let tz = source.timezone.0;
        Timing {
            expression: source.expression.0.clone(),
            tz,
            start: source.start.as_ref().map(|s| s.resolve(tz)),
            end: source.end.as_ref().map(|s| s.resolve(tz)),
        }
    }

    /// Rates count from the start date, else from the Unix epoch: the same instants in
    /// every replica, whenever it started.
    fn anchor(&self) -> DateTime<Utc> {
        self.start.unwrap_or(DateTime::UNIX_EPOCH)
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let e = &self.expression;
        if !e.recurring() {
            return e.next_after(after, self.tz, self.anchor());
        }
        // On or after the start: search from just before it.
        let from = match self.start {
            Some(s) if after < s => s - TimeDelta::milliseconds(1),
            _ => after,
        };
        e.next_after(from, self.tz, self.anchor())
            .filter(|t| self.end.is_none_or(|end| *t <= end))
    }

    /// The last fire time at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let e = &self.expression;
        if !e.recurring() {
            return e.last_at_or_before(t, self.tz, self.anchor());
        }
        let t = self.end.map_or(t, |end| t.min(end));
        e.last_at_or_before(t, self.tz, self.anchor())
            .filter(|p| self.start.is_none_or(|s| *p >= s))
    }

    /// The next `n` fire times after `from` (the `schedules` command).
    pub fn upcoming(&self, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = from;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// What a fire sends.
#[derive(Debug, Clone)]
pub enum Payload {
    /// EventBridge's "Scheduled Event", with the rule's ARN in `resources`.
    Event {
        account: String,
        region: String,
        rule_arn: String,
    },
    /// The configured input, with Scheduler's placeholders substituted.
    Input {
        template: String,
        schedule_arn: String,
    },
}

impl Payload {
    /// The event for one fire (the attempt number is left to the envelope).
    pub fn render(&self, scheduled: DateTime<Utc>, execution_id: &str) -> String {
        let time = scheduled.to_rfc3339_opts(SecondsFormat::Secs, true);
        let s = |v: &str| serde_json::Value::from(v).to_string();
        match self {
            Payload::Event {
                account,
                region,
                rule_arn,
            } => format!(
                r#"{{"version":"0","id":{},"detail-type":"Scheduled Event","source":"aws.events","account":{},"time":{},"region":{},"resources":[{}],"detail":{{}}}}"#,
                s(execution_id),
                s(account),
                s(&time),
                s(region),
                s(rule_arn)
            ),
            Payload::Input {
                template,
                schedule_arn,
            } => template
                .replace(SCHEDULED_TIME, &time)
                .replace(EXECUTION_ID, execution_id)
                .replace(SCHEDULE_ARN, schedule_arn),
        }
    }
}

/// When one schedule is due: what the timer needs of it.
#[derive(Debug, Clone)]
pub struct When {
    pub name: String,
    pub timing: Timing,
    /// Flexible window: each fire is delayed by an offset within it.
    pub window: Duration,
}

impl When {
    /// The moment a fire of `scheduled` goes out: within the flexible window, at an
    /// offset that is a hash of the schedule and the time, so replicas agree on it.
    pub fn fire_at(&self, scheduled: DateTime<Utc>) -> DateTime<Utc> {
        let window = self.window.as_millis() as u64;
        if window == 0 {
            return scheduled;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a: stable across builds
        for b in self.name.bytes().chain(scheduled.timestamp().to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        scheduled + TimeDelta::milliseconds((h % window) as i64)
    }
}

/// One schedule mapping, ready to fire.
pub struct Scheduled {
    pub when: When,
    pub missed: MissedFire,
    pub payload: Payload,
    pub deliverer: Arc<Deliverer>,
    /// How long a fire keeps trying to claim its tick (the retry policy's event age).
    pub max_age: Duration,
}

/// Where "now" comes from: the system's wall clock, or tokio's clock from a fixed
/// wall time, so that tests can run the timer under `tokio::time::pause()`.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    Tokio {
        wall: DateTime<Utc>,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock reading `wall` now and advancing with tokio's time.
    pub fn tokio_from(wall: DateTime<Utc>) -> Clock {
        Clock::Tokio {
            wall,
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { wall, at } => {
                *wall + TimeDelta::from_std(at.elapsed()).unwrap_or(TimeDelta::MAX)
            }
        }
    }
}

/// A moment in the timer's heap: ordered by `at`, the earliest on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: DateTime<Utc>,
    index: usize,
    scheduled: DateTime<Utc>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The scheduled time: the fire is placed (now, or later within a flexible window)
    /// and the schedule's next time armed. Arming on the scheduled time rather than on
    /// the fire keeps a window wider than the period from delaying the next tick.
    Arm,
    /// A fire delayed within the flexible window.
    Fire,
}

/// Runs every schedule until `shutdown`; a fire in flight then stops at its next retry
/// backoff and is released to the ledger for resuming (with a store) or parked.
pub async fn run(
    schedules: Vec<Scheduled>,
    store: Option<Arc<Store>>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let schedules: Vec<Arc<Scheduled>> = schedules.into_iter().map(Arc::new).collect();
    // Fires run detached; the tracker only lets shutdown wait for them.
    let fires = TaskTracker::new();
    let now = clock.now();
    for s in &schedules {
        s.deliverer.mapping.set(State::Running);
        if s.missed == MissedFire::FireOnce
            && let Some(store) = &store
            && let Some(missed) = missed_tick(s, store, now).await
        {
            tracing::info!(mapping = %s.when.name, scheduled = %rfc3339(missed), "firing once for a time missed while no gateway ran");
            fires.spawn(fire(
                s.clone(),
                missed,
                Some(store.clone()),
                shutdown.clone(),
            ));
        }
    }
    tracing::info!(
        schedules = schedules.len(),
        store = store.is_some(),
        "schedules running"
    );
    if let Some(store) = &store {
        fires.spawn(prune(store.clone(), shutdown.clone()));
        fires.spawn(adopt(
            schedules.clone(),
            store.clone(),
            fires.clone(),
            shutdown.clone(),
        ));
    }
    let whens: Vec<&When> = schedules.iter().map(|s| &s.when).collect();
    timer(&whens, clock, &shutdown, |index, scheduled| {
        fires.spawn(fire(
            schedules[index].clone(),
            scheduled,
            store.clone(),
            shutdown.clone(),
        ));
    })
    .await;
    fires.close();
    fires.wait().await;
}

/// The one timer: calls `due(index, scheduled time)` at each schedule's fire moment, in
/// order, until `shutdown`. A heap holds each schedule's next moment, so the task sleeps
/// until the earliest one whatever the number of schedules.
pub async fn timer(
    schedules: &[&When],
    clock: Clock,
    shutdown: &CancellationToken,
    mut due: impl FnMut(usize, DateTime<Utc>),
) {
    let mut heap = BinaryHeap::with_capacity(schedules.len());
    let now = clock.now();
    for (index, s) in schedules.iter().enumerate() {
        // A tick just past whose delayed fire is still ahead.
        if !s.window.is_zero()
            && let Some(p) = s.timing.last_at_or_before(now)
            && s.fire_at(p) > now
        {
            heap.push(Reverse(Due {
                at: s.fire_at(p),
                index,
                scheduled: p,
                kind: Kind::Fire,
            }));
        }
        match s.timing.next_after(now) {
            Some(t) => heap.push(Reverse(Due {
                at: t,
                index,
                scheduled: t,
                kind: Kind::Arm,
            })),
            None => {
                tracing::info!(mapping = %s.name, expression = %s.timing.expression, "schedule has no time left to fire")
            }
        }
    }
    loop {
        let next = heap.peek().map(|Reverse(d)| *d);
        let now = clock.now();
        match next {
            Some(d) if d.at <= now => {
                heap.pop();
                if d.kind == Kind::Fire {
                    due(d.index, d.scheduled);
                    continue;
                }
                let s = schedules[d.index];
                let fire_at = s.fire_at(d.scheduled);
                if fire_at <= now {
                    due(d.index, d.scheduled);
                } else {
                    heap.push(Reverse(Due {
                        at: fire_at,
                        kind: Kind::Fire,
                        ..d
                    }));
                }
                let from = if now - d.at > LATE {
                    tracing::warn!(mapping = %s.name, scheduled = %rfc3339(d.scheduled), "fired late; skipping the ticks missed meanwhile");
                    now
                } else {
                    d.scheduled
                };
                if let Some(t) = s.timing.next_after(from) {
                    heap.push(Reverse(Due {
                        at: t,
                        index: d.index,
                        scheduled: t,
                        kind: Kind::Arm,
                    }));
                }
            }
            _ => {
                let wait = next.map_or(MAX_SLEEP, |d| {
                    (d.at - now).to_std().unwrap_or_default().min(MAX_SLEEP)
                });
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// With `missed = "fire_once"`: the last scheduled time at or before `now`, if the
/// ledger shows it (and any earlier one since the last recorded fire) was not fired.
/// A schedule never fired before has missed nothing.
async fn missed_tick(s: &Scheduled, store: &Store, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
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
async fn fire(
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
        ack: Ack::None,
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
async fn adopt(
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

/// Deletes ledger rows older than a week, hourly: enough history for the missed-fire
/// policy, without growing forever.
async fn prune(store: Arc<Store>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            () = shutdown.cancelled() => return,
        }
        match store.prune(Utc::now() - TimeDelta::days(7)).await {
            Ok(n) => tracing::debug!(rows = n, "pruned the schedule ledger"),
            Err(e) => tracing::warn!(error = %e, "cannot prune the schedule ledger"),
        }
    }
}

/// The `schedules` command's report: the next `n` fire times after `from` of every
/// schedule mapping, in UTC and in the schedule's zone. Flexible-window offsets are not
/// applied: these are the scheduled times the events carry.
pub fn dry_run(config: &crate::config::Config, from: DateTime<Utc>, n: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for m in &config.mappings {
        let crate::config::Source::Schedule(source) = &m.source else {
            continue;
        };
        let timing = Timing::new(source);
        let _ = write!(
            out,
            "{}  {}  {}",
            m.name,
            timing.expression,
            timing.tz.name()
        );
        if let Some(w) = source.flexible_window.filter(|w| !w.0.is_zero()) {
            let _ = write!(
                out,
                "  (flexible window {})",
                humantime::format_duration(w.0)
            );
        }
        if !m.enabled {
            out.push_str("  (disabled)");
        }
        out.push('\n');
        let times = timing.upcoming(from, n);
        if times.is_empty() {
            out.push_str("  no fire time after this\n");
        }
        for t in times {
            let local = t.with_timezone(&timing.tz);
            let _ = writeln!(
                out,
                "  {}  {}",
                rfc3339(t),
                local.format("%Y-%m-%dT%H:%M:%S%:z %Z")
            );
        }
    }
    if out.is_empty() {
        out.push_str("no schedule mappings\n");
    }
    out
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests;
