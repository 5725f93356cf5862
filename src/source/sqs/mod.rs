//! The SQS source: long-polled standard and FIFO queues, with AWS's semantics.
//!
//! Receiving: one long poll (20 s) runs always, so an empty queue costs three
//! ReceiveMessage calls a minute; while receives come back full, more pollers join (up to
//! the mapping's concurrency) to fill large batches within the window, and each leaves
//! after an empty receive. Delivering: batches run concurrently up to `max_concurrency`.
//! A standard queue's batches mix messages of several receives; a FIFO queue's batch is
//! exactly one receive, because SQS hands out a message group to one receiver at a time
//! and that is what keeps each group in order while groups proceed in parallel.
//!
//! Every received message's visibility is held by the [`Keeper`] from the moment its
//! receive returns (it may wait for a delivery permit longer than the queue's timeout)
//! until it is deleted or its batch ends.
//!
//! Success deletes (DeleteMessageBatch, ten at a time). A failure leaves the message to
//! its visibility timeout and the queue's redrive policy, as on AWS; with retries
//! configured the gateway retries it first, still holding its visibility so that no
//! other consumer receives it, and with an on-failure destination an exhausted message is
//! parked there and then deleted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub mod config;
pub mod event;
pub mod visibility;

use crate::pipeline::batcher::Batcher;
use crate::pipeline::retry::Outcome;
use crate::record::{Ack, Hold, Record, Resolution};
use crate::source::Context;
use crate::status::State;
use config::SqsSource;
use event::{sqs_fragment, sqs_trace};
use visibility::{Keeper, Receipt, receipt_handle};

/// Why the source cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    #[error("cannot read the attributes of queue {url}: {message}")]
    Attributes { url: String, message: String },
    #[error(
        "queue {url}: its visibility timeout ({visibility}s) is shorter than the batching window plus the function timeout ({needed}s); \
         a message would become visible again while its batch is still running. Raise the queue's VisibilityTimeout"
    )]
    VisibilityTooShort {
        url: String,
        visibility: u64,
        needed: u64,
    },
}

/// What the queue says about itself.
struct QueueInfo {
    arn: String,
    visibility: Duration,
}

async fn queue_info(
    client: &Client,
    source: &SqsSource,
    window: Duration,
) -> Result<QueueInfo, SqsError> {
    let url = &source.queue_url;
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .map_err(|e| SqsError::Attributes {
            url: url.clone(),
            message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
        })?;
    let attrs = out.attributes();
    let get = |k: &QueueAttributeName| attrs.and_then(|a| a.get(k)).cloned();
    let arn = get(&QueueAttributeName::QueueArn).unwrap_or_else(|| url.clone());
    let visibility = Duration::from_secs(
        get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    if let Some(timeout) = source.function_timeout {
        let needed = window + timeout;
        if visibility < needed {
            return Err(SqsError::VisibilityTooShort {
                url: url.clone(),
                visibility: visibility.as_secs(),
                needed: needed.as_secs_f64().ceil() as u64,
            });
        }
    }
    Ok(QueueInfo { arn, visibility })
}

/// Runs the source until `shutdown`.
pub async fn run(source: &SqsSource, context: Context) {
    let Context {
        limits,
        deliverer,
        env,
        function_timeout,
        shutdown,
    } = context;
    let client = crate::aws::sqs_client(&env.sdk);
    let region = env.region.clone();
    // The visibility check follows the mapping's function_timeout when set (the
    // source's own key is the older spelling of the same setting).
    let source = &SqsSource {
        function_timeout: source.function_timeout.or(function_timeout),
        ..source.clone()
    };
    let status = deliverer.mapping.clone();
    let info = loop {
        match queue_info(&client, source, limits.window).await {
            Ok(info) => break info,
            Err(e @ SqsError::VisibilityTooShort { .. }) => {
                // A configuration mistake: say so and do nothing, rather than
                // delivering messages twice.
                tracing::error!(mapping = %status.name, error = %e, "SQS source not started");
                status.fail(&e);
                shutdown.cancelled().await;
                return;
            }
            Err(e) => {
                tracing::warn!(mapping = %status.name, error = %e, "retrying in 5s");
                status.fail(&e);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    status.set(State::Running);
    let concurrency = source.max_concurrency.unwrap_or(5) as usize;
    let fifo = source.is_fifo();
    tracing::info!(mapping = %status.name, queue = %source.queue_url, fifo, concurrency, "polling");

    let keeper = Keeper::new(
        client.clone(),
        &source.queue_url,
        &status.name,
        info.visibility,
        status.metrics.visibility_capped.clone(),
    );
    // The keeper outlives `shutdown`: batches in flight then finish, and their messages
    // must stay invisible until they are deleted.
    let keeper_stop = CancellationToken::new();
    let keeping = tokio::spawn(keeper.clone().run(keeper_stop.clone()));
    let receiver = Receiver {
        client: client.clone(),
        url: source.queue_url.clone(),
        arn: info.arn,
        region,
        per_receive: if fifo { limits.size.min(10) } else { 10 },
        active: Arc::new(AtomicUsize::new(0)),
        max_pollers: concurrency,
        shutdown: shutdown.clone(),
        status: status.clone(),
        keeper: keeper.clone(),
    };
    let (tx, rx) = mpsc::channel::<Vec<Record>>(concurrency * 2);
    tokio::spawn(receiver.clone().poll(tx, true));

    // FIFO: one receive is one batch. Standard: batches gather several receives.
    let (batches_tx, mut batches) = mpsc::channel::<Vec<Record>>(concurrency);
    if fifo {
        tokio::spawn(forward(rx, batches_tx));
    } else {
        let (records_tx, records_rx) = mpsc::channel::<Record>(limits.size.max(10) * 2);
        tokio::spawn(flatten(rx, records_tx));
        let mut batcher = Batcher::new(records_rx, limits);
        tokio::spawn(async move {
            while let Some(b) = batcher.next().await {
                if batches_tx.send(b).await.is_err() {
                    break;
                }
            }
        });
    }

    let permits = Arc::new(Semaphore::new(concurrency));
    let mut running = tokio::task::JoinSet::new();
    loop {
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            b = batches.recv() => match b {
                Some(b) => b,
                None => break,
            },
        };
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        // Cancelled by shutdown, or by the keeper when a message reaches SQS's cap.
        let token = shutdown.child_token();
        let batch = keeper.start(batch, &token);
        if batch.is_empty() {
            continue;
        }
        let (client, url, deliverer, keeper) = (
            client.clone(),
            source.queue_url.clone(),
            deliverer.clone(),
            keeper.clone(),
        );
        running.spawn(async move {
            let handles: Vec<String> = batch
                .iter()
                .filter_map(|r| receipt_handle(r).map(str::to_owned))
                .collect();
            let mut outcome = deliverer.deliver(batch, &token).await;
            let _acking = std::mem::take(&mut outcome.span)
                .into_ack(&deliverer.mapping.name, outcome.resolved.len());
            delete(&client, &url, outcome, &deliverer.mapping.name).await;
            keeper.forget(handles);
            drop(permit);
        });
        // Reap finished batches so the set stays small.
        while running.try_join_next().is_some() {}
    }
    // Batches in flight finish (a retrying one is abandoned at once and its messages
    // reappear after their visibility timeout); what they delivered is deleted.
    while running.join_next().await.is_some() {}
    keeper_stop.cancel();
    let _ = keeping.await;
}

async fn forward(mut rx: mpsc::Receiver<Vec<Record>>, tx: mpsc::Sender<Vec<Record>>) {
    while let Some(b) = rx.recv().await {
        if tx.send(b).await.is_err() {
            break;
        }
    }
}

async fn flatten(mut rx: mpsc::Receiver<Vec<Record>>, tx: mpsc::Sender<Record>) {
    while let Some(b) = rx.recv().await {
        for r in b {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Clone)]
struct Receiver {
    client: Client,
    url: String,
    arn: String,
    region: String,
    per_receive: usize,
    /// Pollers running now.
    active: Arc<AtomicUsize>,
    max_pollers: usize,
    shutdown: CancellationToken,
    status: Arc<crate::status::MappingStatus>,
    keeper: Arc<Keeper>,
}

impl Receiver {
    /// Long-polls until shutdown (`permanent`) or until a receive comes back empty.
    /// A full receive starts another poller while there is room for one.
    /// (Boxed: a poller may start another.)
    fn poll(self, tx: mpsc::Sender<Vec<Record>>, permanent: bool) -> BoxFuture<'static, ()> {
        Box::pin(self.poll_loop(tx, permanent))
    }

    async fn poll_loop(self, tx: mpsc::Sender<Vec<Record>>, permanent: bool) {
        self.active.fetch_add(1, Ordering::SeqCst);
        let mut errors = 0u32;
        let mut position = 0u64;
        loop {
            let result = tokio::select! {
                () = self.shutdown.cancelled() => break,
                r = self
                    .client
                    .receive_message()
                    .queue_url(&self.url)
                    .max_number_of_messages(self.per_receive as i32)
                    .wait_time_seconds(20)
                    .set_visibility_timeout(self.keeper.receive_visibility())
                    .message_system_attribute_names(MessageSystemAttributeName::All)
                    .message_attribute_names("All")
                    .send() => r,
            };
            let messages = match result {
                Ok(out) => {
                    errors = 0;
                    out.messages.unwrap_or_default()
                }
                Err(e) => {
                    errors += 1;
                    let delay = Duration::from_millis(200 * (1 << errors.min(7)));
                    tracing::warn!(queue = %self.url, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), retry_in = ?delay, "ReceiveMessage failed");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.shutdown.cancelled() => break,
                    }
                }
            };
            if messages.is_empty() {
                if permanent {
                    continue;
                }
                break;
            }
            if messages.len() == self.per_receive
                && self.active.load(Ordering::SeqCst) < self.max_pollers
            {
                tokio::spawn(self.clone().poll(tx.clone(), false));
            }
            let now = tokio::time::Instant::now();
            let records: Vec<Record> = messages
                .iter()
                .map(|m| {
                    position += 1;
                    Record {
                        fragment: sqs_fragment(m, &self.arn, &self.region),
                        id: m.message_id().map(Into::into),
                        key: m
                            .attributes()
                            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                            .map(|g| g.as_bytes().into()),
                        position,
                        received: now,
                        received_at: SystemTime::now(),
                        trace: sqs_trace(m),
                        ack: Ack::new(Receipt(m.receipt_handle().unwrap_or_default().to_owned())),
                        hold: Hold::default(),
                    }
                })
                .collect();
            self.keeper.hold(&records, now);
            self.status
                .metrics
                .received
                .increment(messages.len() as u64);
            if tx.send(records).await.is_err() {
                break;
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets the visibility of the messages `handles` to `visibility`, ten per call (for
/// `redrive`, which holds the messages it replays; a mapping's messages are held by
/// `visibility::Keeper`).
pub(crate) async fn extend(client: &Client, url: &str, handles: &[String], visibility: Duration) {
    for chunk in handles.chunks(10) {
        let entries = chunk.iter().enumerate().map(|(i, h)| {
            aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .visibility_timeout(visibility.as_secs() as i32)
                .build()
                .expect("id and receipt handle are set")
        });
        if let Err(e) = client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries.collect()))
            .send()
            .await
        {
            tracing::warn!(queue = url, error = %aws_smithy_types::error::display::DisplayErrorContext(&e),
                "cannot extend visibility; the batch may be received again");
        }
    }
}

/// Deletes what was delivered or parked, ten at a time (the chunks of a large batch
/// concurrently); released and unresolved messages stay for their visibility timeout.
async fn delete(client: &Client, url: &str, outcome: Outcome, mapping: &str) {
    let handles: Vec<String> = outcome
        .resolved
        .into_iter()
        .filter(|(_, res)| *res != Resolution::Released)
        .filter_map(|(r, _)| r.ack.take::<Receipt>().map(|h| h.0))
        .collect();
    futures_util::future::join_all(
        handles
            .chunks(10)
            .map(|chunk| delete_chunk(client, url, chunk, mapping)),
    )
    .await;
}

/// One DeleteMessageBatch of up to ten, retried five times.
async fn delete_chunk(client: &Client, url: &str, chunk: &[String], mapping: &str) {
    let entries = chunk.iter().enumerate().map(|(i, h)| {
        DeleteMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .receipt_handle(h)
            .build()
            .expect("id and receipt handle are set")
    });
    let mut tries = 0;
    loop {
        match client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries.clone().collect()))
            .send()
            .await
        {
            Ok(out) => {
                for f in out.failed() {
                    tracing::warn!(
                        mapping,
                        queue = url,
                        id = f.id(),
                        code = f.code(),
                        message = f.message(),
                        "message not deleted; it will be delivered again"
                    );
                }
                return;
            }
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::warn!(mapping, queue = url, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "DeleteMessageBatch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * (1 << tries))).await;
            }
            Err(e) => {
                tracing::error!(mapping, queue = url, error = %aws_smithy_types::error::display::DisplayErrorContext(&e),
                    "DeleteMessageBatch failed; these messages will be delivered again");
                return;
            }
        }
    }
}
