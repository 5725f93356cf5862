//! The process's one schedule timer: a heap ordered by the next moment each schedule is
//! due, so ten thousand idle schedules cost one sleeping task (woken at least once a
//! minute, to notice a wall clock that was set). Schedule mappings register with it
//! while they run and hear of each fire on a channel of their own.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::When;

/// Longest the timer sleeps at once, so that a wall clock that was set is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A fire this late (the process was suspended or starved) is still sent, but the
/// schedule's ticks missed meanwhile are skipped rather than sent in a burst.
const LATE: TimeDelta = TimeDelta::seconds(60);

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

/// What a registered schedule hears: (its index in its registrant's list, the
/// scheduled time of the fire that is due now).
pub type Due = (usize, DateTime<Utc>);

enum Change {
    Add {
        id: u64,
        index: usize,
        when: When,
        due: mpsc::UnboundedSender<Due>,
    },
    Remove(u64),
}

/// The process's schedule timer. Its task ends once the timer and every registration
/// are dropped.
pub struct Timer {
    changes: mpsc::UnboundedSender<Change>,
    ids: AtomicU64,
    clock: Clock,
}

/// A schedule's place on the timer; dropping it takes the schedule off.
pub struct Registration {
    id: u64,
    changes: mpsc::UnboundedSender<Change>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.changes.send(Change::Remove(self.id));
    }
}

impl Timer {
    /// Starts the timer task on the current runtime.
    pub fn start(clock: Clock) -> Arc<Timer> {
        let (changes, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(rx, clock, CancellationToken::new(), |_, due, at| {
            let _ = due.send(at);
        }));
        Arc::new(Timer {
            changes,
            ids: AtomicU64::new(0),
            clock,
        })
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Puts `when` on the timer: each of its fires is sent on `due` as `(index, time)`
    /// until the registration is dropped.
    pub fn register(
        &self,
        index: usize,
        when: When,
        due: mpsc::UnboundedSender<Due>,
    ) -> Registration {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let _ = self.changes.send(Change::Add {
            id,
            index,
            when,
            due,
        });
        Registration {
            id,
            changes: self.changes.clone(),
        }
    }
}

/// Calls `due(index, scheduled time)` at each schedule's fire moment, in order, until
/// `shutdown`: the timer of a fixed list of schedules (tests).
pub async fn timer(
    schedules: &[&When],
    clock: Clock,
    shutdown: &CancellationToken,
    mut due: impl FnMut(usize, DateTime<Utc>),
) {
    let (changes, rx) = mpsc::unbounded_channel();
    let (tx, _rx) = mpsc::unbounded_channel();
    for (index, when) in schedules.iter().enumerate() {
        let _ = changes.send(Change::Add {
            id: index as u64,
            index,
            when: (*when).clone(),
            due: tx.clone(),
        });
    }
    serve(rx, clock, shutdown.clone(), |index, _, (_, at)| {
        due(index, at)
    })
    .await;
    drop(changes);
}

/// A moment in the timer's heap: ordered by `at`, the earliest on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Moment {
    at: DateTime<Utc>,
    id: u64,
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

/// The timer's loop: takes schedules on and off from `changes`, and calls
/// `fire(index, channel, (index, scheduled))` at each fire moment, until `changes`
/// closes or `shutdown`.
async fn serve(
    mut changes: mpsc::UnboundedReceiver<Change>,
    clock: Clock,
    shutdown: CancellationToken,
    mut fire: impl FnMut(usize, &mpsc::UnboundedSender<Due>, Due),
) {
    let mut heap = BinaryHeap::new();
    let mut schedules: HashMap<u64, (usize, When, mpsc::UnboundedSender<Due>)> = HashMap::new();
    loop {
        // Take every change waiting before looking at the heap.
        loop {
            match changes.try_recv() {
                Ok(Change::Add {
                    id,
                    index,
                    when,
                    due,
                }) => {
                    arm(&mut heap, id, &when, clock.now());
                    schedules.insert(id, (index, when, due));
                }
                Ok(Change::Remove(id)) => {
                    schedules.remove(&id);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) if schedules.is_empty() => return,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        let next = heap.peek().map(|Reverse(d): &Reverse<Moment>| *d);
        let now = clock.now();
        match next {
            Some(d) if d.at <= now => {
                heap.pop();
                // Taken off since (its moments stay in the heap until they come up).
                let Some((index, s, due)) = schedules.get(&d.id) else {
                    continue;
                };
                if d.kind == Kind::Fire {
                    fire(*index, due, (*index, d.scheduled));
                    continue;
                }
                let fire_at = s.fire_at(d.scheduled);
                if fire_at <= now {
                    fire(*index, due, (*index, d.scheduled));
                } else {
                    heap.push(Reverse(Moment {
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
                    heap.push(Reverse(Moment {
                        at: t,
                        id: d.id,
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
                    change = changes.recv() => match change {
                        Some(Change::Add { id, index, when, due }) => {
                            arm(&mut heap, id, &when, clock.now());
                            schedules.insert(id, (index, when, due));
                        }
                        Some(Change::Remove(id)) => {
                            schedules.remove(&id);
                        }
                        None if schedules.is_empty() => return,
                        None => tokio::time::sleep(wait).await,
                    },
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Puts a new schedule's first moments on the heap: a tick just past whose delayed fire
/// is still ahead, and its next tick.
fn arm(heap: &mut BinaryHeap<Reverse<Moment>>, id: u64, s: &When, now: DateTime<Utc>) {
    if !s.window.is_zero()
        && let Some(p) = s.timing.last_at_or_before(now)
        && s.fire_at(p) > now
    {
        heap.push(Reverse(Moment {
            at: s.fire_at(p),
            id,
            scheduled: p,
            kind: Kind::Fire,
        }));
    }
    match s.timing.next_after(now) {
        Some(t) => heap.push(Reverse(Moment {
            at: t,
            id,
            scheduled: t,
            kind: Kind::Arm,
        })),
        None => {
            tracing::info!(mapping = %s.name, expression = %s.timing.expression, "schedule has no time left to fire")
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}
