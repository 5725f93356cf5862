//! The SQS source's visibility keeper: owns the visibility of every message the gateway
//! holds, from the moment ReceiveMessage returns it until it is deleted or given back.
//!
//! A received message waits inside the gateway (receive channel, batcher, a free
//! delivery permit) before its invoke starts, and then runs and may be retried there.
//! Through all of that its visibility is renewed, so that SQS never hands it to another
//! receiver: a standard queue would deliver it twice, a FIFO queue would put a second
//! copy of its group in flight, out of order.
//!
//! A message is renewed to the queue's visibility timeout once less than two renewal
//! periods of it remain; the period is a third of that timeout, at least 500 ms. A
//! queue whose timeout is under 2 s (0 s included, where every receive would otherwise
//! hand the same messages out again) is received with an explicit 2 s, so a failed
//! message reappears after 2 s there rather than the queue's own timeout.
//!
//! The keeper's map is bounded by what the source holds: the bounded channels between
//! its pollers, batcher and delivery loop, and `max_concurrency` batches in flight.
//!
//! SQS caps a message's total visibility at 12 hours from its first receipt. A message
//! that reaches the cap is given back (ChangeMessageVisibility 0) instead of being
//! invoked or retried further: its batch is cancelled, as on shutdown, and the message is
//! logged and counted in `esm_gateway_records_visibility_capped_total`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
use metrics::Counter;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::record::Record;

/// SQS's limit on a message's total visibility, counted from its first receipt.
pub const CAP: Duration = Duration::from_secs(12 * 3600);
/// The shortest visibility the gateway holds a message for; shorter queues are
/// received with this explicitly.
const MIN_HOLD: Duration = Duration::from_secs(2);
/// The shortest renewal period.
const MIN_PERIOD: Duration = Duration::from_millis(500);
/// Kept off the cap: our receipt instant is a little after SQS's.
const CAP_MARGIN: Duration = Duration::from_secs(60);

/// One held message.
#[derive(Debug)]
struct Held {
    received: Instant,
    /// When it becomes visible again unless renewed.
    visible_until: Instant,
    /// Cancels its batch once the batch is delivering.
    batch: Option<CancellationToken>,
}

/// What one renewal round does.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// (receipt handle, new visibility timeout in whole seconds).
    extend: Vec<(String, i32)>,
    /// At the cap: given back, no longer held.
    release: Vec<String>,
}

/// The timings the keeper works with, from the queue's visibility timeout.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Timing {
    hold: Duration,
    period: Duration,
    cap: Duration,
}

impl Timing {
    fn new(queue_visibility: Duration) -> Timing {
        let hold = queue_visibility.max(MIN_HOLD);
        Timing {
            hold,
            period: (hold / 3).max(MIN_PERIOD),
            cap: CAP - CAP_MARGIN,
        }
    }
}

/// Decides which messages to renew and which have reached the cap; updates their
/// deadlines. Pure, so that the cap can be tested without waiting 12 hours.
fn plan(held: &mut HashMap<String, Held>, now: Instant, t: Timing) -> Plan {
    let mut plan = Plan::default();
    held.retain(|handle, h| {
        if h.visible_until > now + 2 * t.period {
            return true;
        }
        let limit = h.received + t.cap;
        let target = (now + t.hold).min(limit);
        // Renewing by less than a period would only buy time until the next round.
        if target <= now + t.period {
            if let Some(batch) = &h.batch {
                batch.cancel();
            }
            plan.release.push(handle.clone());
            return false;
        }
        let seconds = (target - now).as_secs().max(1);
        h.visible_until = now + Duration::from_secs(seconds);
        plan.extend.push((handle.clone(), seconds as i32));
        true
    });
    plan
}

/// Holds the visibility of a source's received messages. Shared by its pollers (which
/// hand messages over at receipt) and its delivery loop.
pub struct Keeper {
    client: Client,
    url: String,
    mapping: String,
    timing: Timing,
    queue_visibility: Duration,
    held: Mutex<HashMap<String, Held>>,
    capped: Counter,
}

/// An SQS message's receipt handle: its record's acknowledgement handle.
#[derive(Debug, Clone)]
pub struct Receipt(pub String);

/// A record's SQS receipt handle.
pub fn receipt_handle(r: &Record) -> Option<&str> {
    r.ack.get::<Receipt>().map(|h| h.0.as_str())
}

impl Keeper {
    pub fn new(
        client: Client,
        url: &str,
        mapping: &str,
        queue_visibility: Duration,
        capped: Counter,
    ) -> Arc<Keeper> {
        Arc::new(Keeper {
            client,
            url: url.to_owned(),
            mapping: mapping.to_owned(),
            timing: Timing::new(queue_visibility),
            queue_visibility,
            held: Mutex::new(HashMap::new()),
            capped,
        })
    }

    /// The VisibilityTimeout to ask for on ReceiveMessage: set only where the queue's
    /// own is too short to renew in time.
    pub fn receive_visibility(&self) -> Option<i32> {
        (self.queue_visibility < MIN_HOLD).then_some(self.timing.hold.as_secs() as i32)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        // The map stays consistent across a panic elsewhere (every update is one insert
        // or remove), so a poisoned lock is still usable.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over the messages of one receive, `received` being when it returned.
    pub fn hold(&self, records: &[Record], received: Instant) {
        let mut held = self.lock();
        for h in records.iter().filter_map(receipt_handle) {
            held.insert(
                h.to_owned(),
                Held {
                    received,
                    visible_until: received + self.timing.hold,
                    batch: None,
                },
            );
        }
    }

    /// A batch is about to be delivered under `token`: returns the records still held
    /// (those given back at the cap meanwhile are dropped) and lets a later cap cancel
    /// the batch. A FIFO batch is one receive, whose messages share their receipt
    /// instant and so reach the cap together: a group is never delivered with a gap.
    pub fn start(&self, batch: Vec<Record>, token: &CancellationToken) -> Vec<Record> {
        let mut held = self.lock();
        batch
            .into_iter()
            .filter(|r| match receipt_handle(r).and_then(|h| held.get_mut(h)) {
                Some(h) => {
                    h.batch = Some(token.clone());
                    true
                }
                None => false,
            })
            .collect()
    }

    /// Stops holding these messages (deleted, or left to their visibility timeout).
    pub fn forget(&self, records: impl IntoIterator<Item = String>) {
        let mut held = self.lock();
        for h in records {
            held.remove(&h);
        }
    }

    /// Renews visibility until `stop`; then gives back what is still held (received but
    /// never delivered), so another consumer need not wait out its timeout.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.timing.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let plan = plan(&mut self.lock(), Instant::now(), self.timing);
            for h in &plan.release {
                tracing::warn!(mapping = %self.mapping, queue = %self.url, receipt_handle = %h,
                    "message reached SQS's 12-hour visibility cap; given back to the queue unprocessed");
            }
            self.capped.increment(plan.release.len() as u64);
            let entries = plan
                .extend
                .into_iter()
                .chain(plan.release.into_iter().map(|h| (h, 0)));
            self.change(entries.collect()).await;
        }
        let rest: Vec<(String, i32)> = self.lock().drain().map(|(h, _)| (h, 0)).collect();
        self.change(rest).await;
    }

    /// ChangeMessageVisibilityBatch, ten at a time.
    async fn change(&self, entries: Vec<(String, i32)>) {
        for chunk in entries.chunks(10) {
            let batch = chunk.iter().enumerate().map(|(i, (h, secs))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(h)
                    .visibility_timeout(*secs)
                    .build()
                    .expect("id and receipt handle are set")
            });
            match self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(batch.collect()))
                .send()
                .await
            {
                Ok(out) => {
                    let held = self.lock();
                    for f in out.failed() {
                        let Some((h, _)) = f.id().parse::<usize>().ok().and_then(|i| chunk.get(i))
                        else {
                            continue;
                        };
                        // A message deleted meanwhile is no longer held: nothing lost.
                        if held.contains_key(h) {
                            tracing::warn!(mapping = %self.mapping, queue = %self.url, code = f.code(), error = f.message(),
                                "cannot extend a message's visibility; it may be delivered twice");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(mapping = %self.mapping, queue = %self.url,
                        error = %aws_smithy_types::error::display::DisplayErrorContext(&e),
                        "cannot extend visibility; these messages may be delivered twice");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(received: Instant, visible_until: Instant) -> Held {
        Held {
            received,
            visible_until,
            batch: None,
        }
    }

    #[test]
    fn short_and_zero_timeouts_are_held_for_two_seconds_and_renewed_every_fraction() {
        let t = Timing::new(Duration::ZERO);
        assert_eq!(t.hold, Duration::from_secs(2));
        assert!(t.period >= MIN_PERIOD && 2 * t.period < t.hold);
        let t = Timing::new(Duration::from_secs(30));
        assert_eq!(
            (t.hold, t.period),
            (Duration::from_secs(30), Duration::from_secs(10))
        );
    }

    #[test]
    fn a_message_is_renewed_only_when_little_of_its_visibility_is_left() {
        let t = Timing::new(Duration::from_secs(30));
        let now = Instant::now();
        let mut m = HashMap::from([
            ("fresh".to_owned(), held(now, now + Duration::from_secs(30))),
            ("due".to_owned(), held(now, now + Duration::from_secs(15))),
        ]);
        let p = plan(&mut m, now, t);
        assert_eq!(p.extend, vec![("due".to_owned(), 30)]);
        assert!(p.release.is_empty());
        assert_eq!(m["due"].visible_until, now + Duration::from_secs(30));
    }

    #[test]
    fn at_the_twelve_hour_cap_a_message_is_renewed_to_the_cap_then_given_back_and_its_batch_cancelled()
     {
        let t = Timing::new(Duration::from_secs(30));
        let received = Instant::now();
        let token = CancellationToken::new();
        // 25 s before the cap: renewed for exactly what is left, not beyond.
        let now = received + t.cap - Duration::from_secs(25);
        let mut m = HashMap::from([(
            "old".to_owned(),
            Held {
                batch: Some(token.clone()),
                ..held(received, now + Duration::from_secs(5))
            },
        )]);
        let p = plan(&mut m, now, t);
        assert_eq!(p.extend, vec![("old".to_owned(), 25)]);
        assert!(!token.is_cancelled());
        // At the cap nothing can be added: given back, no longer held, batch cancelled.
        let now = received + t.cap - Duration::from_secs(5);
        let p = plan(&mut m, now, t);
        assert_eq!(p.release, vec!["old".to_owned()]);
        assert!(p.extend.is_empty() && m.is_empty() && token.is_cancelled());
    }
}
