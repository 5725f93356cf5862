//! The ActiveMQ source: one queue drained in order into a function, over STOMP 1.2
//! (`stomp.rs`, our own client; the README says why).
//!
//! Ordering: the subscription acknowledges in `client` mode (cumulative) and at most one
//! batch is in flight; the next batch waits (already prefetched) until every record of
//! the current one is resolved. Then the records given back to the broker (retries
//! exhausted without an on-failure destination) are NACKed one by one, so that the
//! broker's redelivery policy and dead-letter queue apply, and one ACK of the batch's
//! last other record acknowledges the rest, without a receipt (one per batch made the
//! broker handle each ack synchronously, several times slower; BENCHMARKS.md): the
//! broker handles a connection's frames in order, an ERROR ends the session, and
//! DISCONNECT's receipt confirms the last acks. An ack lost with its connection means a
//! redelivery, as with RabbitMQ's unconfirmed acks. A lost connection (or broker silence past the heart-beats) ends the session:
//! the broker redelivers everything unacknowledged, in order and `redelivered`, and the
//! source reconnects with backoff. The batch in flight then is given up at once, retries
//! and all, so the only duplicates are that batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub mod config;
pub mod event;
pub mod stomp;

use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::retry::{Deliverer, Outcome};
use crate::record::{Ack, Hold, Record, Resolution};
use crate::source::Context;
use crate::status::State;
use crate::trace::TraceContext;
use config::ActiveMqSource;
use stomp::{Frame, Read, StompError};

/// How long a receipt (of a subscription, an acknowledgement, DISCONNECT) may take.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The subscription's id on its connection.
const SUBSCRIPTION: &str = "esm-gateway";

/// Why a session with the broker ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: StompError },
    #[error("cannot subscribe to queue {queue:?}: {message}")]
    Subscribe { queue: String, message: String },
    #[error("the connection consuming queue {queue:?} ended ({reason}); reconnecting")]
    Lost { queue: String, reason: String },
    #[error("acknowledging on queue {queue:?} failed, the broker will redeliver: {message}")]
    Ack { queue: String, message: String },
}

/// A record's `ack` header: what ACK and NACK name it by.
struct AckId(String);

/// Runs the source until `shutdown`, reconnecting after every broken session.
pub async fn run(source: &ActiveMqSource, context: Context) {
    let Context {
        limits,
        deliverer,
        shutdown,
        ..
    } = context;
    crate::source::reconnect_loop(
        "ActiveMQ",
        &deliverer.mapping,
        &shutdown,
        || session(source, limits, &deliverer, &shutdown),
        |e| {
            matches!(
                e,
                SessionError::Connect { .. } | SessionError::Subscribe { .. }
            )
        },
    )
    .await
}

/// Receipts awaited, by id; closed (None) when the connection's reader ends, so that
/// every waiter learns at once.
#[derive(Default)]
struct Receipts(Mutex<Option<HashMap<String, oneshot::Sender<()>>>>);

impl Receipts {
    fn open() -> Receipts {
        Receipts(Mutex::new(Some(HashMap::new())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<String, oneshot::Sender<()>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `id`; None if the connection is gone already.
    fn expect(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.lock().as_mut()?.insert(id.to_owned(), tx);
        Some(rx)
    }

    fn arrived(&self, id: &str) {
        if let Some(tx) = self.lock().as_mut().and_then(|m| m.remove(id)) {
            let _ = tx.send(());
        }
    }

    fn close(&self) {
        self.lock().take();
    }
}

/// One session's connection, as the run loop writes to it.
struct Conn {
    writer: tokio::sync::Mutex<stomp::Writer>,
    receipts: Arc<Receipts>,
    /// Why the reader ended, once it has.
    ended: Arc<Mutex<Option<String>>>,
    next_receipt: std::sync::atomic::AtomicU64,
}

impl Conn {
    /// Sends `frames`, the last with a receipt, and waits for the receipt.
    async fn send_confirmed(&self, frames: Vec<Frame>) -> Result<(), String> {
        match self.send(frames).await? {
            Some(rx) => self.confirm(rx).await,
            None => Ok(()),
        }
    }

    /// Sends `frames` without asking for a receipt.
    async fn send_unconfirmed(&self, frames: Vec<Frame>) -> Result<(), String> {
        let mut w = self.writer.lock().await;
        for f in &frames {
            w.send(f).await.map_err(|e| e.to_string())?;
        }
        w.flush().await.map_err(|e| e.to_string())
    }

    /// Sends `frames`, the last with a receipt, and returns what the receipt arrives on
    /// (None for no frames).
    async fn send(&self, mut frames: Vec<Frame>) -> Result<Option<oneshot::Receiver<()>>, String> {
        let n = self
            .next_receipt
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("r-{n}");
        let Some(last) = frames.last_mut() else {
            return Ok(None);
        };
        last.headers.push(("receipt".into(), id.clone()));
        let rx = self.receipts.expect(&id).ok_or_else(|| self.why())?;
        {
            let mut w = self.writer.lock().await;
            for f in &frames {
                w.send(f).await.map_err(|e| e.to_string())?;
            }
            w.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(Some(rx))
    }

    /// Waits for a receipt of [`Conn::send`].
    async fn confirm(&self, rx: oneshot::Receiver<()>) -> Result<(), String> {
        match tokio::time::timeout(RECEIPT_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.why()),
            Err(_) => Err(format!("no receipt in {RECEIPT_TIMEOUT:?}")),
        }
    }

    fn why(&self) -> String {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the connection closed".into())
    }
}

async fn session(
    source: &ActiveMqSource,
    limits: BatchLimits,
    deliverer: &Deliverer,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let status = &deliverer.mapping;
    let queue = source.queue.as_str();
    let url = source.url.to_string();
    let broker = source.broker().map_err(|e| SessionError::Connect {
        url: url.clone(),
        source: StompError::Protocol(e),
    })?;
    let (mut reader, writer, connected) = stomp::connect(&stomp::Endpoint {
        host: &broker.host,
        port: broker.port,
        tls: broker.tls,
        ca_file: source.ca_file.as_deref(),
        login: source.username.as_ref().map(|u| u.0.as_str()),
        passcode: source.password.as_ref().map(|p| p.expose()),
        heart_beat: source.heart_beat(),
    })
    .await
    .map_err(|source| SessionError::Connect {
        url: url.clone(),
        source,
    })?;
    let conn = Arc::new(Conn {
        writer: tokio::sync::Mutex::new(writer),
        receipts: Arc::new(Receipts::open()),
        ended: Arc::default(),
        next_receipt: 0.into(),
    });
    let prefetch = source.prefetch(limits.size);

    // The reader renders each message into its event element while the previous batch
    // is being invoked; the channel's bound is the prefetch, so it never holds the
    // connection up for long.
    let (tx, rx) = mpsc::channel(prefetch as usize);
    // Cancelled by shutdown, or when the reader ends with its connection: the batch in
    // flight then stops retrying, since the broker has taken its messages back.
    let batch_stop = shutdown.child_token();
    let reader_task = {
        let (receipts, ended) = (conn.receipts.clone(), conn.ended.clone());
        let lost = batch_stop.clone().drop_guard();
        let name = status.name.clone();
        let received = status.metrics.received.clone();
        let queue = queue.to_owned();
        let silent_for = connected.silent_for;
        let session_id = connected.session.clone();
        tokio::spawn(async move {
            let _lost = lost;
            let mut position = 0u64;
            let reason = loop {
                let read = match silent_for {
                    Some(d) => tokio::time::timeout(d, reader.read())
                        .await
                        .unwrap_or(Err(StompError::Silent(d))),
                    None => reader.read().await,
                };
                let frame = match read {
                    Ok(Read::HeartBeat) => continue,
                    Ok(Read::Frame(f)) => f,
                    Err(e) => break e.to_string(),
                };
                match frame.command.as_str() {
                    "MESSAGE" => {
                        received.increment(1);
                        position += 1;
                        let record = record(&frame, &queue, &session_id, position);
                        if tx.send(record).await.is_err() {
                            break "the session ended".into();
                        }
                    }
                    "RECEIPT" => receipts.arrived(frame.header("receipt-id").unwrap_or("")),
                    "ERROR" => break StompError::Broker(frame.describe()).to_string(),
                    other => tracing::debug!(mapping = %name, command = other, "frame ignored"),
                }
            };
            *ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
            receipts.close();
        })
    };
    let _reader_guard = AbortOnDrop(reader_task);
    let _beat_guard = connected.send_every.map(|every| {
        let conn = conn.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let mut w = conn.writer.lock().await;
                if w.heart_beat().await.is_err() || w.flush().await.is_err() {
                    return;
                }
            }
        }))
    });

    let prefetch_size = prefetch.to_string();
    let destination = format!("/queue/{queue}");
    let subscribe = Frame::new(
        "SUBSCRIBE",
        &[
            ("destination", &destination),
            ("id", SUBSCRIPTION),
            ("ack", "client"),
            ("activemq.prefetchSize", &prefetch_size),
        ],
    );
    conn.send_confirmed(vec![subscribe])
        .await
        .map_err(|message| SessionError::Subscribe {
            queue: queue.to_owned(),
            message,
        })?;
    status.set(State::Running);
    tracing::info!(mapping = %status.name, queue, prefetch, session = %connected.session,
        heart_beat = ?connected.send_every, "consuming");

    let lost = || SessionError::Lost {
        queue: queue.to_owned(),
        reason: conn.why(),
    };
    let mut batcher = Batcher::new(rx, limits);
    loop {
        // Shutdown first: a batch not yet started is left to the broker.
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            b = batcher.next() => b,
        };
        // Records buffered from a connection that has since closed will be redelivered
        // on the next one: invoking them now would only make duplicates.
        let Some(batch) = batch.filter(|_| !batch_stop.is_cancelled()) else {
            return Err(lost());
        };
        let mut outcome = deliverer.deliver(batch, &batch_stop).await;
        if batch_stop.is_cancelled() && !shutdown.is_cancelled() {
            tracing::warn!(mapping = %status.name, queue, resolved = outcome.resolved.len(),
                unresolved = outcome.unresolved.len(),
                "connection lost during the batch; it is given up, the broker redelivers all of it");
            return Err(lost());
        }
        let _acking =
            std::mem::take(&mut outcome.span).into_ack(&status.name, outcome.resolved.len());
        conn.send_unconfirmed(acknowledgements(outcome))
            .await
            .map_err(|message| SessionError::Ack {
                queue: queue.to_owned(),
                message,
            })?;
        // Only a shutdown leaves records unresolved; they stay unacknowledged.
        if shutdown.is_cancelled() {
            break;
        }
    }
    // DISCONNECT (rather than dropping the connection) hands the prefetched,
    // unacknowledged messages back to the queue at once, in order: a disabled or
    // restarting mapping must not sit on them. Its receipt also confirms the last acks,
    // which the broker handles first.
    drop(batcher);
    if let Err(e) = conn
        .send_confirmed(vec![Frame::new("DISCONNECT", &[])])
        .await
    {
        tracing::debug!(mapping = %status.name, error = %e, "disconnecting");
    }
    Ok(())
}

/// A MESSAGE frame as a record at `position` in its session.
fn record(frame: &Frame, queue: &str, session: &str, position: u64) -> Record {
    let now = SystemTime::now();
    Record {
        fragment: event::amq_fragment(frame, queue, session, now),
        id: frame.header("message-id").map(Into::into),
        key: None,
        position,
        received: tokio::time::Instant::now(),
        received_at: now,
        // The first of a repeated header counts, as STOMP says.
        trace: TraceContext::find(|name| {
            frame
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        }),
        ack: frame
            .header("ack")
            .map_or(Ack::NONE, |a| Ack::new(AckId(a.to_owned()))),
        hold: Hold::default(),
    }
}

/// The frames that settle a batch with the broker: a NACK for each record given back
/// (released: the broker's redelivery policy and DLQ take it), then one cumulative ACK
/// of the last other record before the first unresolved one (a shutdown's; nothing
/// from there on is acknowledged, so it comes back).
fn acknowledgements(outcome: Outcome) -> Vec<Frame> {
    let first_unresolved = outcome.unresolved.iter().map(|r| r.position).min();
    let mut resolved = outcome.resolved;
    resolved.sort_by_key(|(r, _)| r.position);
    let mut frames = Vec::new();
    let mut last: Option<(u64, String)> = None;
    for (r, resolution) in resolved {
        let position = r.position;
        let Some(AckId(id)) = r.ack.take::<AckId>() else {
            continue;
        };
        if resolution == Resolution::Released {
            frames.push(Frame::new("NACK", &[("id", &id)]));
        } else if first_unresolved.is_none_or(|u| position < u) {
            last = Some((position, id));
        }
    }
    if let Some((_, id)) = last {
        frames.push(Frame::new("ACK", &[("id", &id)]));
    }
    frames
}

/// Stops a session's task with the session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(position: u64) -> Record {
        Record {
            ack: Ack::new(AckId(format!("a{position}"))),
            ..Record::for_test(None, None, position)
        }
    }

    fn wire(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| format!("{} {}", f.command, f.header("id").unwrap_or("")))
            .collect()
    }

    #[test]
    fn released_records_are_nacked_and_the_rest_acked_up_to_the_first_unresolved() {
        let outcome = Outcome {
            resolved: vec![
                (rec(3), Resolution::Delivered),
                (rec(1), Resolution::Delivered),
                (rec(2), Resolution::Released),
                (rec(4), Resolution::DeadLettered),
                (rec(6), Resolution::Delivered),
            ],
            unresolved: vec![rec(5)],
            unresolved_invokes: 0,
            span: Default::default(),
        };
        assert_eq!(
            wire(&acknowledgements(outcome)),
            ["NACK a2", "ACK a4"],
            "6 stays unacked behind unresolved 5"
        );
        let all_released = Outcome {
            resolved: vec![
                (rec(1), Resolution::Released),
                (rec(2), Resolution::Released),
            ],
            ..Outcome::default()
        };
        assert_eq!(
            wire(&acknowledgements(all_released)),
            ["NACK a1", "NACK a2"]
        );
        let filtered = Outcome {
            resolved: vec![
                (rec(1), Resolution::Filtered),
                (rec(2), Resolution::Delivered),
            ],
            ..Outcome::default()
        };
        assert_eq!(wire(&acknowledgements(filtered)), ["ACK a2"]);
    }
}
