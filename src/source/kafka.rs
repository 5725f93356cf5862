//! The Kafka source: a consumer group whose partitions are drained in order, each
//! blocking only itself.
//!
//! Each assigned partition gets its own librdkafka queue (split off before the
//! assignment takes effect, so no message ever reaches the main queue) and its own task:
//! at most one batch per partition is in flight, or with `parallelization_factor` one per
//! lane, records spread over lanes by key so that each key keeps its order. A partition
//! commits only past a contiguous run of resolved records (`pipeline::offsets`), after
//! each batch (asynchronously, one request for every partition that finished a batch
//! within the last 10 ms) and, on revocation or shutdown, synchronously once its task has
//! finished or abandoned the batch in flight within the revoke deadline.
//!
//! The main queue is polled on a thread of its own, because the rebalance callback runs
//! there and blocks while revoked partitions wind down.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaSource, SaslMechanism, StartingPosition};
use crate::invoke::event::{Envelope, KafkaFragments};
use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::offsets::OffsetTracker;
use crate::pipeline::retry::Deliverer;
use crate::record::{Ack, Record};
use crate::status::State;

type KafkaConsumer = StreamConsumer<Context>;
type TopicPartition = (String, i32);

/// The default consumer group of a mapping.
pub fn group_id(source: &KafkaSource, mapping: &str) -> String {
    source
        .group_id
        .clone()
        .unwrap_or_else(|| format!("esm-gateway-{mapping}"))
}

/// The librdkafka configuration of a source.
pub fn client_config(source: &KafkaSource, mapping: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &source.bootstrap_servers)
        .set("group.id", group_id(source, mapping))
        .set("client.id", format!("esm-gateway-{mapping}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "10000")
        // librdkafka prefetches up to 64 MiB per partition by default; a blocked
        // partition needs far less, and a mapping with many partitions would hold
        // gigabytes. 16 MiB keeps a draining partition's fetches ahead of it (4 MiB cost
        // a quarter of the drain rate in `cargo bench --bench kafka`). Overridable
        // through `properties`.
        .set("queued.max.messages.kbytes", "16384")
        // ... and when a partition's queue is full librdkafka postpones its next fetch by
        // this much (default 1 s): a draining partition would idle most of the time.
        .set("fetch.queue.backoff.ms", "10")
        .set(
            "auto.offset.reset",
            match source.starting_position {
                StartingPosition::TrimHorizon => "earliest",
                // at_timestamp seeds committed offsets before subscribing; a partition
                // that appears later starts at its end.
                StartingPosition::Latest | StartingPosition::AtTimestamp => "latest",
            },
        );
    let tls = source.tls.is_some();
    let protocol = match (&source.sasl, tls) {
        (None, false) => "plaintext",
        (None, true) => "ssl",
        (Some(_), false) => "sasl_plaintext",
        (Some(_), true) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(sasl) = &source.sasl {
        c.set(
            "sasl.mechanisms",
            match sasl.mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        )
        .set("sasl.username", &sasl.username.0)
        .set("sasl.password", sasl.password.expose());
    }
    if let Some(t) = &source.tls {
        let path = |p: &std::path::Path| p.display().to_string();
        if let Some(p) = &t.ca_file {
            c.set("ssl.ca.location", path(p));
        }
        if let Some(p) = &t.cert_file {
            c.set("ssl.certificate.location", path(p));
        }
        if let Some(p) = &t.key_file {
            c.set("ssl.key.location", path(p));
        }
        if let Some(p) = &t.key_password {
            c.set("ssl.key.password", p.expose());
        }
    }
    for (k, v) in &source.properties {
        c.set(k, &v.0);
    }
    c
}

/// What every partition task of a mapping shares.
struct Shared {
    deliverer: Arc<Deliverer>,
    bootstrap_servers: String,
    limits: BatchLimits,
    lanes: usize,
    /// `max_concurrency`: batches in flight across partitions.
    permits: Option<Arc<Semaphore>>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
    commits: Commits,
}

/// How long positions reported after a commit wait, at most, to go out together in the
/// next one. Every batch's position is committed, but one OffsetCommit carries all the
/// partitions that finished a batch meanwhile: per batch and partition, the commits cost
/// the broker more than the fetches (Tansu: 3.1 instead of 1.9 µs per record).
const COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// Positions waiting for the committer, at most one per partition (the furthest).
#[derive(Default)]
struct Commits {
    pending: Mutex<HashMap<TopicPartition, u64>>,
    wake: tokio::sync::Notify,
}

impl Commits {
    fn offer(&self, tp: TopicPartition, position: u64) {
        let mut pending = self.pending.lock().expect("commits lock");
        let p = pending.entry(tp).or_insert(position);
        *p = (*p).max(position);
        drop(pending);
        self.wake.notify_one();
    }

    /// Sends what is pending as one asynchronous commit. The lock is held until the
    /// commit is queued, so a revocation's synchronous commit (after [`Self::forget`])
    /// always goes out after it.
    fn flush<C: Consumer<Context>>(&self, consumer: &C) {
        let mut pending = self.pending.lock().expect("commits lock");
        if pending.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), position) in pending.drain() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(position as i64));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "async commit not sent; the next one covers it");
        }
    }

    /// Drops what is pending for `partitions`: their final commit supersedes it.
    fn forget(&self, partitions: &[TopicPartition]) {
        let mut pending = self.pending.lock().expect("commits lock");
        for tp in partitions {
            pending.remove(tp);
        }
    }
}

/// Commits what the lanes offer: at once when idle, then at most every
/// [`COMMIT_INTERVAL`].
async fn committer(consumer: Arc<KafkaConsumer>, stop: CancellationToken) {
    let commits = &consumer.context().shared.commits;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = commits.wake.notified() => {}
        }
        commits.flush(consumer.as_ref());
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(COMMIT_INTERVAL) => {}
        }
    }
}

/// A running partition task: how to stop it and where it reports its final position.
struct PartitionTask {
    stop: CancellationToken,
    done: std::sync::mpsc::Receiver<Option<u64>>,
}

/// The consumer's context: owns the partition tasks and serves rebalances.
struct Context {
    consumer: OnceLock<Weak<KafkaConsumer>>,
    tasks: Mutex<HashMap<TopicPartition, PartitionTask>>,
    shared: Arc<Shared>,
    /// How long a revoked partition may take to finish its batch in flight.
    revoke_deadline: Duration,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        let mapping = &self.shared.deliverer.mapping.name;
        let mut total = 0;
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    total += p.consumer_lag as u64;
                    metrics::gauge!("esm_gateway_kafka_consumer_lag_records",
                        "mapping" => mapping.clone(), "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
                }
            }
        }
        // The mapping's depth (in /mappings and esm_gateway_source_depth_messages) is
        // its total lag over the partitions it owns.
        self.shared.deliverer.mapping.depth(total);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let status = &self.shared.deliverer.mapping;
        tracing::warn!(mapping = %status.name, error = %error, reason, "Kafka client error");
        status.error(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Context {
    // Runs on the polling thread, before librdkafka applies the change: splitting a
    // partition's queue here is what keeps its messages off the main queue, and waiting
    // here for revoked partitions is what lets them commit before another member owns
    // them.
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                for e in tpl.elements() {
                    self.start(&consumer, e.topic(), e.partition());
                }
            }
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                self.stop_and_commit(base, &revoked);
            }
            Rebalance::Error(e) => {
                tracing::warn!(mapping = %self.shared.deliverer.mapping.name, error = %e, "rebalance error");
            }
        }
    }
}

impl Context {
    fn start(&self, consumer: &Arc<KafkaConsumer>, topic: &str, partition: i32) {
        let Some(queue) = consumer.split_partition_queue(topic, partition) else {
            tracing::warn!(
                topic,
                partition,
                "cannot split the queue of an assigned partition"
            );
            return;
        };
        let stop = self.shared.shutdown.child_token();
        // One report per task, so one place: the send never waits.
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        self.shared.runtime.spawn(partition_task(
            queue,
            consumer.clone(),
            topic.to_owned(),
            partition,
            self.shared.clone(),
            stop.clone(),
            done_tx,
        ));
        tracing::info!(mapping = %self.shared.deliverer.mapping.name, topic, partition, "partition assigned");
        let old = self
            .tasks
            .lock()
            .expect("tasks lock")
            .insert((topic.to_owned(), partition), PartitionTask { stop, done });
        if let Some(old) = old {
            old.stop.cancel();
        }
    }

    /// Stops the partitions' tasks, waits (up to the revoke deadline) for their final
    /// positions and commits them synchronously.
    fn stop_and_commit<C: Consumer<Self>>(&self, consumer: &C, partitions: &[TopicPartition]) {
        let tasks: Vec<(TopicPartition, PartitionTask)> = {
            let mut all = self.tasks.lock().expect("tasks lock");
            partitions
                .iter()
                .filter_map(|tp| all.remove(tp).map(|t| (tp.clone(), t)))
                .collect()
        };
        for (_, t) in &tasks {
            t.stop.cancel();
        }
        let deadline = std::time::Instant::now() + self.revoke_deadline;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), t) in tasks {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match t.done.recv_timeout(left) {
                Ok(Some(position)) => {
                    let _ = tpl.add_partition_offset(
                        &topic,
                        partition,
                        Offset::Offset(position as i64),
                    );
                }
                Ok(None) => {}
                Err(_) => tracing::warn!(
                    topic,
                    partition,
                    "partition did not finish its batch within the revoke deadline; its last commit stands"
                ),
            }
        }
        self.shared.commits.forget(partitions);
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(mapping = %self.shared.deliverer.mapping.name, error = %e,
                "final commit failed; the next owner re-reads from the last successful commit");
        }
    }
}

/// Runs the source until `shutdown`, recreating the consumer if it cannot be built.
pub async fn run(
    source: &KafkaSource,
    limits: BatchLimits,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
) {
    let status = deliverer.mapping.clone();
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match session(source, limits, deliverer.clone(), shutdown.clone()).await {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                let delay = super::reconnect_delay(failures);
                tracing::error!(mapping = %status.name, error = %e, retry_in = ?delay, "Kafka consumer failed");
                status.fail(&e);
                super::pause(delay, &shutdown).await;
            }
        }
    }
}

async fn session(
    source: &KafkaSource,
    limits: BatchLimits,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
) -> Result<(), KafkaError> {
    let name = deliverer.mapping.name.clone();
    let config = client_config(source, &name);
    let session_timeout = config
        .get("session.timeout.ms")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(45), Duration::from_millis);
    let shared = Arc::new(Shared {
        bootstrap_servers: source.bootstrap_servers.clone(),
        limits,
        lanes: source.parallelization_factor.unwrap_or(1).max(1) as usize,
        permits: source
            .max_concurrency
            .map(|n| Arc::new(Semaphore::new(n as usize))),
        shutdown: shutdown.clone(),
        runtime: tokio::runtime::Handle::current(),
        commits: Commits::default(),
        deliverer,
    });
    let context = Context {
        consumer: OnceLock::new(),
        tasks: Mutex::new(HashMap::new()),
        shared: shared.clone(),
        revoke_deadline: (session_timeout / 2).min(Duration::from_secs(20)),
    };
    let consumer: Arc<KafkaConsumer> = Arc::new(config.create_with_context(context)?);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));

    if source.starting_position == StartingPosition::AtTimestamp {
        let ts = source.starting_timestamp.as_deref().unwrap_or_default();
        let at = humantime::parse_rfc3339_weak(ts).expect("validated at load");
        let (c, topics) = (consumer.clone(), source.topics.clone());
        tokio::task::spawn_blocking(move || seed_offsets(&c, &topics, at))
            .await
            .expect("seed task")?;
    }
    let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    shared.deliverer.mapping.set(State::Running);
    tracing::info!(mapping = %name, topics = ?source.topics, group = %group_id(source, &name), "consumer subscribed");

    // The main queue only carries events (rebalances, errors, statistics): poll it on a
    // thread of its own, since the rebalance callback blocks while partitions wind down.
    let poll_stop = CancellationToken::new();
    let poller = {
        let (consumer, stop, name) = (consumer.clone(), poll_stop.clone(), name.clone());
        std::thread::Builder::new()
            .name(format!("kafka-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("poll runtime");
                rt.block_on(async {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            m = consumer.recv() => match m {
                                Ok(m) => tracing::error!(mapping = %name, topic = m.topic(), partition = m.partition(),
                                    "message on the main queue of a split partition; it will be re-read after a rebalance"),
                                Err(e) => tracing::warn!(mapping = %name, error = %e, "Kafka consumer error"),
                            },
                        }
                    }
                });
            })
            .expect("spawn Kafka poll thread")
    };

    let committer_stop = CancellationToken::new();
    let committer = tokio::spawn(committer(consumer.clone(), committer_stop.clone()));

    shutdown.cancelled().await;
    // Shutdown: every partition finishes or abandons its batch, then commits its final
    // position synchronously; then the consumer leaves the group.
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || {
        let all: Vec<TopicPartition> = c
            .context()
            .tasks
            .lock()
            .expect("tasks lock")
            .keys()
            .cloned()
            .collect();
        c.context().stop_and_commit(c.as_ref(), &all);
    })
    .await
    .expect("final commit task");
    committer_stop.cancel();
    let _ = committer.await;
    poll_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .expect("consumer close");
    Ok(())
}

/// For `at_timestamp`: commits, for every partition of `topics` that has no committed
/// offset yet, the first offset at or after `at`, so that committed offsets keep winning.
fn seed_offsets(
    consumer: &KafkaConsumer,
    topics: &[String],
    at: SystemTime,
) -> Result<(), KafkaError> {
    let timeout = Duration::from_secs(30);
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(all, timeout)?;
    let mut query = TopicPartitionList::new();
    for e in committed.elements() {
        if !matches!(e.offset(), Offset::Offset(_)) {
            query.add_partition_offset(e.topic(), e.partition(), Offset::Offset(ms))?;
        }
    }
    if query.count() == 0 {
        return Ok(());
    }
    let found = consumer.offsets_for_times(query, timeout)?;
    let mut seed = TopicPartitionList::new();
    for e in found.elements() {
        // No record at or after the time: start at the end.
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::End,
        };
        seed.add_partition_offset(e.topic(), e.partition(), offset)?;
    }
    consumer.commit(&seed, CommitMode::Sync)
}

/// Drains one partition: a reader spreading records over lanes, and the lanes, each
/// running one batch at a time. Reports the final committable position on `done`.
async fn partition_task(
    queue: StreamPartitionQueue<Context>,
    consumer: Arc<KafkaConsumer>,
    topic: String,
    partition: i32,
    shared: Arc<Shared>,
    stop: CancellationToken,
    done: std::sync::mpsc::SyncSender<Option<u64>>,
) {
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let fragments = KafkaFragments::new(&topic, partition);
    let deliverer = Arc::new(Deliverer {
        envelope: Envelope::Kafka {
            bootstrap_servers: shared.bootstrap_servers.clone(),
            topic: topic.clone(),
            partition,
        },
        ..(*shared.deliverer).clone()
    });
    let mut lanes = Vec::with_capacity(shared.lanes);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for _ in 0..shared.lanes {
        let (tx, rx) = mpsc::channel(shared.limits.size * 2);
        lanes.push(tx);
        lane_tasks.spawn(lane(
            Batcher::new(rx, shared.limits),
            deliverer.clone(),
            consumer.clone(),
            (topic.clone(), partition),
            tracker.clone(),
            shared.permits.clone(),
            stop.clone(),
        ));
    }

    // Registered once: a fresh `cancelled()` per record would lock the token's waiter
    // list twice for every record.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        let m = tokio::select! {
            biased;
            () = &mut cancelled => break,
            m = queue.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(topic, partition, error = %e, "fetch error");
                continue;
            }
        };
        let lane = match (m.key(), lanes.len()) {
            (_, 1) | (None, _) => 0,
            (Some(k), n) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                (h.finish() % n as u64) as usize
            }
        };
        let record = to_record(&m, &fragments);
        shared.deliverer.mapping.metrics.received.increment(1);
        tracker
            .lock()
            .expect("tracker lock")
            .received(record.position);
        drop(m);
        tokio::select! {
            biased;
            () = &mut cancelled => break,
            r = lanes[lane].send(record) => if r.is_err() { break },
        }
    }
    drop(lanes);
    while lane_tasks.join_next().await.is_some() {}
    let position = tracker.lock().expect("tracker lock").committable();
    let _ = done.send(position);
}

fn to_record<M: Message>(m: &M, fragments: &KafkaFragments) -> Record {
    let now = SystemTime::now();
    // Record age (max_record_age) counts from the record's own timestamp, as on AWS.
    let age = m
        .timestamp()
        .to_millis()
        .and_then(|ms| {
            now.duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .checked_sub(Duration::from_millis(ms as u64))
        })
        .unwrap_or_default();
    let received = tokio::time::Instant::now();
    Record {
        fragment: fragments.render(m),
        id: None,
        key: m.key().map(|k| String::from_utf8_lossy(k).into()),
        position: m.offset() as u64,
        received: received.checked_sub(age).unwrap_or(received),
        received_at: now.checked_sub(age).unwrap_or(now),
        ack: Ack::None,
    }
}

/// One lane of a partition: batches in order, one at a time; after each, hands the
/// committer the position the partition's resolved records reach.
async fn lane(
    mut batcher: Batcher,
    deliverer: Arc<Deliverer>,
    consumer: Arc<KafkaConsumer>,
    (topic, partition): TopicPartition,
    tracker: Arc<Mutex<OffsetTracker>>,
    permits: Option<Arc<Semaphore>>,
    stop: CancellationToken,
) {
    let commits = &consumer.context().shared.commits;
    loop {
        let batch = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            b = batcher.next() => match b {
                Some(b) => b,
                None => return,
            },
        };
        let _permit = match &permits {
            Some(p) => tokio::select! {
                biased;
                () = stop.cancelled() => return,
                p = p.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
            },
            None => None,
        };
        let outcome = deliverer.deliver(batch, &stop).await;
        let position = {
            let mut t = tracker.lock().expect("tracker lock");
            for (r, _) in &outcome.resolved {
                t.resolved(r.position);
            }
            t.advance()
        };
        if let Some(position) = position {
            commits.offer((topic.clone(), partition), position);
        }
        if !outcome.unresolved.is_empty() {
            return;
        }
    }
}
