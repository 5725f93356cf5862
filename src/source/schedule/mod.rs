//! The schedule source: EventBridge-style schedules fired into functions.
//!
//! One timer task serves every schedule of the process (`timer.rs`): a heap ordered by
//! the next moment each schedule is due, so ten thousand idle schedules cost one
//! sleeping task (woken at least once a minute, to notice a wall clock that was set).
//! Each schedule mapping registers with it while it runs. When a schedule is due, its
//! fire runs in a task of its own (`fire.rs`: claim, render, deliver with retries) and
//! its next time goes back on the heap; a slow function never delays another schedule.
//! The ledger's hourly prune runs once per process too ([`prune`], started with the
//! store).
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

pub mod config;
pub mod event;
pub mod expression;
mod fire;
pub mod store;
mod timer;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pipeline::retry::Deliverer;
use crate::source::Context;
use crate::status::State;
use config::{MissedFire, ScheduleSource, rule_arn, schedule_arn};
pub use expression::{Expression, ExpressionError};
use fire::{adopt, fire, missed_tick};
use store::Store;
pub use timer::{Clock, Registration, Timer, timer};

/// The Scheduler input placeholders substituted when a schedule fires (the attempt
/// number and the execution id are substituted per invoke, by the envelope).
pub const SCHEDULED_TIME: &str = "<aws.scheduler.scheduled-time>";
pub use event::EXECUTION_ID;
pub const SCHEDULE_ARN: &str = "<aws.scheduler.schedule-arn>";

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
    /// The configured input, with Scheduler's placeholders substituted (the attempt
    /// number and execution id per invoke).
    Input {
        template: String,
        schedule_arn: String,
    },
}

impl Payload {
    /// The event for one fire. A Scheduled Event's `id` is the fire's `execution_id`;
    /// an input's attempt number and execution id are left to the envelope, which
    /// gives each attempt its own.
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

/// Runs one schedule mapping until `context.shutdown`.
pub async fn run_source(source: &ScheduleSource, context: Context) {
    let Context {
        deliverer,
        env,
        shutdown,
        ..
    } = context;
    let name = deliverer.mapping.name.clone();
    let (region, account) = (env.region.as_str(), env.account.as_str());
    let payload = match &source.input {
        Some(input) => Payload::Input {
            template: input.0.clone(),
            schedule_arn: schedule_arn(&name, region, account),
        },
        None => Payload::Event {
            account: account.to_owned(),
            region: region.to_owned(),
            rule_arn: rule_arn(&name, region, account),
        },
    };
    let scheduled = Scheduled {
        when: When {
            name,
            timing: Timing::new(source),
            window: source.flexible_window.map_or(Duration::ZERO, |w| w.0),
        },
        missed: source.missed,
        payload,
        max_age: deliverer.policy.max_age.unwrap_or(config::MAX_EVENT_AGE),
        deliverer,
    };
    run(
        vec![scheduled],
        env.schedule_store.clone(),
        &env.schedule_timer,
        shutdown,
    )
    .await
}

/// Runs every schedule until `shutdown`; a fire in flight then stops at its next retry
/// backoff and is released to the ledger for resuming (with a store) or parked.
pub async fn run(
    schedules: Vec<Scheduled>,
    store: Option<Arc<Store>>,
    timer: &Timer,
    shutdown: CancellationToken,
) {
    let schedules: Vec<Arc<Scheduled>> = schedules.into_iter().map(Arc::new).collect();
    // Fires run detached; the tracker only lets shutdown wait for them.
    let fires = TaskTracker::new();
    let now = timer.clock().now();
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
        fires.spawn(adopt(
            schedules.clone(),
            store.clone(),
            fires.clone(),
            shutdown.clone(),
        ));
    }
    let (tx, mut due) = tokio::sync::mpsc::unbounded_channel();
    let registrations: Vec<Registration> = schedules
        .iter()
        .enumerate()
        .map(|(index, s)| timer.register(index, s.when.clone(), tx.clone()))
        .collect();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some((index, scheduled)) = due.recv() => {
                fires.spawn(fire(
                    schedules[index].clone(),
                    scheduled,
                    store.clone(),
                    shutdown.clone(),
                ));
            }
        }
    }
    drop(registrations);
    fires.close();
    fires.wait().await;
}

/// Deletes ledger rows older than a week, hourly, until `shutdown`: enough history for
/// the missed-fire policy, without growing forever. One per process and store (the
/// runtime starts it with the store), however many schedules share the ledger.
pub async fn prune(store: Arc<Store>, shutdown: CancellationToken) {
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
pub fn dry_run<'a>(
    schedules: impl IntoIterator<Item = (&'a str, &'a ScheduleSource, bool)>,
    from: DateTime<Utc>,
    n: usize,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (name, source, enabled) in schedules {
        let timing = Timing::new(source);
        let _ = write!(out, "{}  {}  {}", name, timing.expression, timing.tz.name());
        if let Some(w) = source.flexible_window.filter(|w| !w.0.is_zero()) {
            let _ = write!(
                out,
                "  (flexible window {})",
                humantime::format_duration(w.0)
            );
        }
        if !enabled {
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
