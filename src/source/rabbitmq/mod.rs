//! The RabbitMQ source: one queue drained in order into a function.
//!
//! Ordering: at most one batch is in flight per queue; the next batch waits (already
//! prefetched) until every record of the current one is delivered or parked, and only
//! then is the batch acknowledged, with one `multiple` ack of its last delivery tag.
//! A dropped connection or channel ends the session: unacknowledged deliveries go back
//! to the queue (`redelivered = true`) and the source reconnects with backoff. The batch
//! in flight when its channel closes (connection lost, consumer_timeout) is given up at
//! once, retries and all: the broker owns its deliveries again. The only duplicates are
//! therefore the batch that was in flight.
//!
//! With `report_batch_item_failures` the function has said that its records may succeed
//! out of order, and a failure does not hold the queue back: the retries of a batch's
//! failed records (after their backoff, with their retry budget, bisection and parking)
//! run beside the following batches, and the records are acked one by one while any
//! such retry is pending.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use depth::{Traffic, poll_depth};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod config;
mod depth;
pub mod event;

use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::park::Condition;
use crate::pipeline::retry::{Deferred, Deliverer, Outcome};
use crate::record::{Ack, Hold, Record};
use crate::source::Context;
use crate::status::State;
use config::RabbitSource;

/// Why a session with the broker ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] crate::amqp::AmqpError),
    #[error("queue {queue:?} in vhost {vhost:?}: {message}")]
    Queue {
        queue: String,
        vhost: String,
        message: String,
    },
    #[error("the consumer of queue {0:?} stopped (connection or channel closed); reconnecting")]
    ConsumerEnded(String),
    #[error("acknowledging on queue {queue:?} failed, the broker will redeliver: {source}")]
    Ack { queue: String, source: AckError },
}

/// Runs the source until `shutdown`, reconnecting after every broken session.
pub async fn run(source: &RabbitSource, context: Context) {
    let Context {
        limits,
        deliverer,
        shutdown,
        env,
        ..
    } = context;
    crate::source::reconnect_loop(
        "RabbitMQ",
        &deliverer.mapping,
        &shutdown,
        || session(source, limits, &deliverer, &env.amqp, &shutdown),
        |e| matches!(e, SessionError::Connect(_) | SessionError::Queue { .. }),
    )
    .await
}

async fn session(
    source: &RabbitSource,
    limits: BatchLimits,
    deliverer: &Deliverer,
    pool: &crate::amqp::Pool,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let status = &deliverer.mapping;
    let queue = source.queue.as_str();
    let vhost = source.url.amqp().map(|u| u.vhost).unwrap_or_default();
    let queue_error = |e: lapin::Error| SessionError::Queue {
        queue: queue.to_owned(),
        vhost: vhost.clone(),
        message: e.to_string(),
    };
    // A channel of its own on a connection shared with the broker's other mappings.
    let lease = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        lease = pool.channel(&source.url, source.ca_file.as_deref(), "consumers") => lease?,
    };
    let channel = lease.channel.clone();
    let prefetch = source
        .prefetch
        .unwrap_or_else(|| (limits.size * 2).clamp(100, 65_535) as u16);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(queue_error)?;
    let mut args = FieldTable::default();
    if source.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    let options = QueueDeclareOptions {
        passive: !source.declare,
        durable: source.declare,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, args)
        .await
        .map_err(queue_error)?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("esm-gateway-{}", status.name).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(queue_error)?;
    status.set(State::Running);
    tracing::info!(mapping = %status.name, queue, vhost, prefetch, "consuming");
    let traffic = Arc::new(Traffic::default());
    let _depth_guard = AbortOnDrop(tokio::spawn(poll_depth(
        channel.clone(),
        queue.to_owned(),
        deliverer.mapping.clone(),
        traffic.clone(),
    )));

    // The reader renders each delivery into its event element while the previous batch
    // is being invoked; the channel's bound is the prefetch, so it never blocks the
    // connection for long.
    let (tx, rx) = mpsc::channel(prefetch as usize);
    let name = status.name.clone();
    let received = status.metrics.received.clone();
    let undecodable = Arc::new(Undecodable::default());
    let to_park = undecodable.clone();
    let counted = traffic.clone();
    // Cancelled by shutdown, or when the consumer ends with its channel: the batch in
    // flight then stops retrying, since the broker has taken its deliveries back (and may
    // be redelivering them to another consumer) and no ack on the dead channel can land.
    let batch_stop = shutdown.child_token();
    let channel_lost = batch_stop.clone().drop_guard();
    let reader = tokio::spawn(async move {
        let _channel_lost = channel_lost;
        while let Some(delivery) = consumer.next().await {
            let d = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(mapping = %name, error = %e, "consumer error");
                    break;
                }
            };
            received.increment(1);
            counted.delivered.fetch_add(1, Ordering::Relaxed);
            let mut fragment = event::rabbit_fragment(&d.properties, d.redelivered, &d.data);
            let bad = event::rabbit_undecodable(&d.properties);
            if !bad.is_empty() {
                let error = undecodable_error(&bad);
                tracing::warn!(mapping = %name, delivery_tag = d.delivery_tag, error = %error,
                    "message cannot be put in an event unaltered; it will be parked without an invoke");
                fragment = event::with_undecodable(fragment, &bad);
                to_park.mark(d.delivery_tag, error);
            }
            let record = Record {
                fragment,
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().into()),
                key: None,
                position: d.delivery_tag,
                received: tokio::time::Instant::now(),
                received_at: SystemTime::now(),
                trace: event::rabbit_trace(&d.properties),
                ack: Ack::new(d.acker),
                hold: Hold::default(),
            };
            if tx.send(record).await.is_err() {
                break;
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);

    // With partial batch responses the queue is unordered: a failed record's retries
    // run beside the next batches (their number is bounded by the prefetch, since the
    // records stay unacknowledged). While any of them is unacknowledged, batches are
    // acked one record at a time: a `multiple` ack would take the deferred ones too.
    let unordered = deliverer.policy.report_item_failures;
    let deferred_unacked = Arc::new(AtomicUsize::new(0));
    let mut retries = tokio::task::JoinSet::new();
    let mut batcher = Batcher::new(rx, limits);
    loop {
        // Shutdown first: a batch not yet started is left to the broker.
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            b = batcher.next() => b,
        };
        // Records buffered from a channel that has since closed will be redelivered on
        // the next one: invoking them now would only make duplicates.
        let Some(batch) = batch.filter(|_| channel.status().connected()) else {
            return Err(SessionError::ConsumerEnded(queue.to_owned()));
        };
        let (mut outcome, deferred) =
            deliver_in_order(deliverer, batch, &undecodable, &batch_stop, unordered).await;
        if batch_stop.is_cancelled() && !shutdown.is_cancelled() {
            tracing::warn!(mapping = %status.name, queue, resolved = outcome.resolved.len(),
                unresolved = outcome.unresolved.len(),
                "channel closed during the batch; it is given up, the broker redelivers all of it");
            return Err(SessionError::ConsumerEnded(queue.to_owned()));
        }
        let multiple = deferred.is_empty() && deferred_unacked.load(Ordering::Acquire) == 0;
        let _acking =
            std::mem::take(&mut outcome.span).into_ack(&status.name, outcome.resolved.len());
        acknowledge(outcome, multiple, &traffic)
            .await
            .map_err(|source| SessionError::Ack {
                queue: queue.to_owned(),
                source,
            })?;
        for d in deferred {
            deferred_unacked.fetch_add(d.records().count(), Ordering::AcqRel);
            retries.spawn(retry_deferred(
                deliverer.clone(),
                d,
                batch_stop.clone(),
                deferred_unacked.clone(),
                traffic.clone(),
            ));
        }
        while retries.try_join_next().is_some() {}
        // Only a shutdown leaves records unresolved; they stay unacknowledged.
        if shutdown.is_cancelled() {
            break;
        }
    }
    // The deferred retries stop at the shutdown too; what they resolved is acked before
    // the channel closes.
    while retries.join_next().await.is_some() {}
    // Closing (rather than dropping) the channel hands the prefetched, unacknowledged
    // deliveries back to the queue at once, in order: a disabled or restarting mapping
    // must not sit on them. The shared connection stays for the other mappings.
    drop(batcher);
    lease.close("esm-gateway mapping stopped").await;
    Ok(())
}

/// The delivery tags of this session's messages that must be parked uninvoked, with why.
#[derive(Default)]
struct Undecodable(Mutex<HashMap<u64, String>>);

impl Undecodable {
    fn mark(&self, tag: u64, error: String) {
        self.lock().insert(tag, error);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        // The map stays consistent whatever panicked while holding it.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The failure record's error for a message with undecodable short strings.
fn undecodable_error(bad: &[event::Undecodable]) -> String {
    let fields: Vec<String> = bad
        .iter()
        .map(|u| {
            let hex: String = u.raw.iter().map(|b| format!("{b:02x}")).collect();
            format!("{} (bytes {hex})", u.field)
        })
        .collect();
    format!(
        "not valid UTF-8, so the event cannot carry it unaltered: {}; the bytes are in the message's \"undecodable\" list",
        fields.join(", ")
    )
}

/// Finishes a batch's deferred retries beside the session's next batches and acks what
/// they resolve, one by one; counts the acked ones off `unacked`. Records left (shutdown,
/// channel lost) stay unacknowledged for the broker to redeliver.
async fn retry_deferred(
    deliverer: Deliverer,
    deferred: Deferred,
    stop: CancellationToken,
    unacked: Arc<AtomicUsize>,
    traffic: Arc<Traffic>,
) {
    let outcome = deliverer.resume(deferred, &stop).await;
    let resolved = outcome.resolved.len();
    match acknowledge(outcome, false, &traffic).await {
        Ok(()) => {
            unacked.fetch_sub(resolved, Ordering::AcqRel);
        }
        Err(e) => {
            tracing::warn!(mapping = %deliverer.mapping.name, error = %e,
                "acknowledging retried messages failed; the broker will redeliver them");
        }
    }
}

/// Delivers a batch in order, parking each message marked undecodable alone and
/// uninvoked at its place: the messages before it are resolved first, those after it
/// next. Once a step leaves records unresolved (shutdown), the rest are left too. With
/// `defer`, each step's retries after a function failure are returned instead of waited
/// for (counted into `unacked` by the caller's retry tasks).
async fn deliver_in_order(
    deliverer: &Deliverer,
    batch: Vec<Record>,
    undecodable: &Undecodable,
    shutdown: &CancellationToken,
    defer: bool,
) -> (Outcome, Vec<Deferred>) {
    let mut pending = VecDeque::from(batch);
    let mut out = Outcome::default();
    let mut deferred = Vec::new();
    let deliver = |records: Vec<Record>| async move {
        if defer {
            deliverer.deliver_deferring(records, shutdown).await
        } else {
            (deliverer.deliver(records, shutdown).await, None)
        }
    };
    while !pending.is_empty() {
        let next_bad = {
            let marked = undecodable.lock();
            pending
                .iter()
                .position(|r| marked.contains_key(&r.position))
        };
        let step = match next_bad {
            Some(0) => {
                let record = pending.pop_front().expect("not empty");
                let error = undecodable
                    .lock()
                    .remove(&record.position)
                    .unwrap_or_default();
                deliverer
                    .park_uninvoked(vec![record], Condition::UndecodableRecord, &error, shutdown)
                    .await
            }
            Some(i) => {
                let (step, d) = deliver(pending.drain(..i).collect()).await;
                deferred.extend(d);
                step
            }
            None => {
                let (step, d) = deliver(pending.drain(..).collect()).await;
                deferred.extend(d);
                step
            }
        };
        out.resolved.extend(step.resolved);
        // The ack span goes in the first delivered batch's span.
        if !out.span.is_on() {
            out.span = step.span;
        }
        if !step.unresolved.is_empty() {
            out.unresolved.extend(step.unresolved);
            out.unresolved.extend(pending.drain(..));
        }
    }
    (out, deferred)
}

/// Acks every resolved record: with one `multiple` ack of the highest tag when the whole
/// batch is resolved and `multiple` says no earlier delivery is still unacknowledged
/// (batches run one at a time; only deferred retries outlive theirs), one by one
/// otherwise. Unresolved records are left unacked.
async fn acknowledge(outcome: Outcome, multiple: bool, traffic: &Traffic) -> Result<(), AckError> {
    let ackers: Vec<(u64, lapin::Acker)> = outcome
        .resolved
        .into_iter()
        .filter_map(|(r, _)| r.ack.take::<lapin::Acker>().map(|a| (r.position, a)))
        .collect();
    let count = ackers.len() as u64;
    let ack = |a: lapin::Acker, multiple: bool| async move {
        match a.ack(BasicAckOptions { multiple }).await {
            Ok(true) => Ok(()),
            // The channel was closed or recovered since the delivery: the broker redelivers.
            Ok(false) => Err(AckError::ChannelGone),
            Err(e) => Err(AckError::Failed(e)),
        }
    };
    if multiple && outcome.unresolved.is_empty() {
        if let Some((_, last)) = ackers.into_iter().max_by_key(|(tag, _)| *tag) {
            ack(last, true).await?;
        }
    } else {
        // Sent together, awaited together: awaited one at a time, each ack would wait for
        // the connection's writer, and a batch acked alone while a deferred retry is
        // pending would take a hundred round trips through it.
        futures_util::future::try_join_all(ackers.into_iter().map(|(_, a)| ack(a, false))).await?;
    }
    traffic.acked.fetch_add(count, Ordering::Relaxed);
    Ok(())
}

/// Why an acknowledgement did not land.
#[derive(Debug, thiserror::Error)]
enum AckError {
    /// The channel was closed or recovered since the delivery: the broker redelivers.
    #[error("the channel that delivered the batch is gone")]
    ChannelGone,
    #[error(transparent)]
    Failed(lapin::Error),
}

/// Stops the reader task with the session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
