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
//! there and blocks while revoked partitions wind down. The callback also sets where
//! newly assigned partitions start: `starting_position` is resolved to an offset and
//! committed only for topics the group has never committed; anything else without a
//! usable committed offset starts at its earliest record.
//!
//! A partition's task supervises its reader and lanes: a panic fails the mapping
//! visibly and restarts the partition from its first unresolved record. An assignment
//! that cannot be applied (a queue that cannot be split off, a rebalance error) fails
//! the mapping too, and the consumer leaves and rejoins the group.
//!
//! Each lane holds at most `batch.buffer_bytes` of records (`pipeline::budget`); the
//! partition's reader waits while its lane is full.
//!
//! Every assignment of a partition has a generation; only the current one's task may
//! commit, so a task revoked while its batch ran past the revoke deadline can no longer
//! move the offset back behind the new owner. If the partition comes back to this
//! process meanwhile, its new task waits for the old one to end.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaSource, SaslMechanism, StartingPosition};
use crate::invoke::event::{Envelope, KafkaFragments};
use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::budget::Budget;
use crate::pipeline::offsets::OffsetTracker;
use crate::pipeline::retry::Deliverer;
use crate::record::{Ack, Hold, Record};
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
        // Only reached by a partition without a committed offset that is not seeded (see
        // `Context::seed`), or whose committed offset is out of range (an outage longer
        // than retention, a partition blocked behind a failing record): both resume at
        // the earliest record still in the log, never past records not yet delivered.
        .set("auto.offset.reset", "earliest");
    // The out-of-range reset is only reported as a librdkafka warning (see
    // `Context::log`): let warnings through whatever the global log level.
    if (c.log_level as i32) < (RDKafkaLogLevel::Warning as i32) {
        c.set_log_level(RDKafkaLogLevel::Warning);
    }
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

/// Positions waiting for the committer, at most one per partition (the furthest), and
/// which assignment of each partition may still commit.
#[derive(Default)]
struct Commits {
    state: Mutex<CommitState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct CommitState {
    pending: HashMap<TopicPartition, u64>,
    /// The generation of each partition's current assignment in this process. A task
    /// of an earlier one (revoked while its batch ran past the revoke deadline) must not
    /// commit: the partition's new owner may have committed further since.
    owners: HashMap<TopicPartition, u64>,
}

impl Commits {
    fn own(&self, tp: TopicPartition, generation: u64) {
        self.lock().owners.insert(tp, generation);
    }

    /// Queues `position` for the next commit, unless the task of assignment
    /// `generation` no longer owns the partition (then false).
    fn offer(&self, tp: TopicPartition, generation: u64, position: u64) -> bool {
        let mut state = self.lock();
        if state.owners.get(&tp) != Some(&generation) {
            return false;
        }
        let p = state.pending.entry(tp).or_insert(position);
        *p = (*p).max(position);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Sends what is pending as one asynchronous commit. The lock is held until the
    /// commit is queued, so a revocation's synchronous commit (after [`Self::disown`])
    /// always goes out after it.
    fn flush<C: Consumer<Context>>(&self, consumer: &C) {
        let mut state = self.lock();
        if state.pending.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), position) in state.pending.drain() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(position as i64));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "async commit not sent; the next one covers it");
        }
    }

    /// Ends the current assignment of `partitions`: nothing pending for them is sent
    /// (their final commit supersedes it) and their tasks' later offers are refused.
    fn disown(&self, partitions: &[TopicPartition]) {
        let mut state = self.lock();
        for tp in partitions {
            state.pending.remove(tp);
            state.owners.remove(tp);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.state.lock().expect("commits lock")
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

/// A running partition task: how to stop it, where it reports its final position, and
/// a token cancelled once it has ended (batch in flight included).
struct PartitionTask {
    stop: CancellationToken,
    done: std::sync::mpsc::Receiver<Option<u64>>,
    ended: CancellationToken,
}

/// Where a partition starts in a topic of which the group has no committed offset yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Beginning,
    /// The end as of the assignment.
    End,
    /// The first record at or after this time (ms since the epoch), else the end as of
    /// the assignment.
    At(i64),
}

impl Start {
    fn of(source: &KafkaSource) -> Start {
        match source.starting_position {
            StartingPosition::TrimHorizon => Start::Beginning,
            StartingPosition::Latest => Start::End,
            StartingPosition::AtTimestamp => {
                let ts = source.starting_timestamp.as_deref().unwrap_or_default();
                let at = humantime::parse_rfc3339_weak(ts).expect("validated at load");
                Start::At(
                    at.duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                )
            }
        }
    }
}

/// The consumer's context: owns the partition tasks and serves rebalances.
struct Context {
    consumer: OnceLock<Weak<KafkaConsumer>>,
    tasks: Mutex<HashMap<TopicPartition, PartitionTask>>,
    /// Tasks of revoked partitions still finishing a batch past the revoke deadline,
    /// by their `ended` token: if the partition comes back, its new task waits for it.
    stragglers: Mutex<HashMap<TopicPartition, CancellationToken>>,
    /// The last assignment generation handed out (see [`CommitState::owners`]).
    generations: std::sync::atomic::AtomicU64,
    shared: Arc<Shared>,
    /// How long a revoked partition may take to finish its batch in flight.
    revoke_deadline: Duration,
    /// Wakes the poll thread to leave and rejoin the group after an assignment error.
    rejoin: Arc<tokio::sync::Notify>,
    start: Start,
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

    // librdkafka reports a committed offset it found out of range (and reset per
    // `auto.offset.reset`) only as this warning.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let mapping = &self.shared.deliverer.mapping.name;
        if fac == "OFFSET"
            && matches!(level, RDKafkaLogLevel::Warning)
            && message.contains("offset reset")
        {
            metrics::counter!("esm_gateway_kafka_offset_resets_total", "mapping" => mapping.clone())
                .increment(1);
            tracing::warn!(mapping = %mapping, detail = message,
                "committed offset out of range; resuming at the earliest record still in the log");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", mapping = %mapping, fac, "{message}");
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", mapping = %mapping, fac, "{message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", mapping = %mapping, fac, "{message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", mapping = %mapping, fac, "{message}");
            }
        }
    }
}

impl ConsumerContext for Context {
    // Runs on the polling thread and replaces rdkafka's own handling, which applies the
    // assignment as librdkafka proposed it: each newly assigned partition gets its
    // starting offset first (`seed`), and its queue is split off before the assignment
    // takes effect, which keeps its messages off the main queue. Waiting here for
    // revoked partitions is what lets them commit before another member owns them.
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let mapping = &self.shared.deliverer.mapping.name;
        let applied = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.seed(base, tpl);
                let mut unsplit = Vec::new();
                if let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) {
                    for e in tpl.elements() {
                        if !self.start(&consumer, e.topic(), e.partition(), e.offset()) {
                            unsplit.push(format!("{}-{}", e.topic(), e.partition()));
                        }
                    }
                }
                // Such a partition has no task: what librdkafka fetches for it reaches
                // the main queue, where the poll thread drops it, and nothing commits
                // it. A new assignment from a rejoin splits it afresh from its committed
                // offset.
                if !unsplit.is_empty() {
                    self.assignment_failed(
                        AssignmentError::Split,
                        &format!(
                            "cannot split the queue of assigned partitions {}; the consumer rejoins the group",
                            unsplit.join(", ")
                        ),
                    );
                }
                if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                self.stop_and_commit(base, &revoked);
                if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                }
            }
            other => {
                // The tasks of the partitions in question stop first (committing what
                // they resolved, while that may still succeed): unassigned, they would
                // run on unfenced.
                let partitions: Vec<TopicPartition> = if cooperative {
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition()))
                        .collect()
                } else {
                    self.tasks
                        .lock()
                        .expect("tasks lock")
                        .keys()
                        .cloned()
                        .collect()
                };
                self.stop_and_commit(base, &partitions);
                self.assignment_failed(
                    AssignmentError::Rebalance,
                    &format!(
                        "rebalance error: {}; the consumer rejoins the group",
                        RDKafkaErrorCode::from(other)
                    ),
                );
                if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                }
            }
        };
        if let Err(e) = applied {
            tracing::error!(mapping = %mapping, error = %e, "cannot apply a rebalance");
        }
    }
}

/// What went wrong with an assignment (the `kind` of
/// `esm_gateway_kafka_assignment_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AssignmentError {
    /// An assigned partition's queue could not be split off.
    Split,
    /// librdkafka reported a rebalance error.
    Rebalance,
}

impl AssignmentError {
    const ALL: [AssignmentError; 2] = [AssignmentError::Split, AssignmentError::Rebalance];

    fn kind(self) -> &'static str {
        match self {
            AssignmentError::Split => "split",
            AssignmentError::Rebalance => "rebalance",
        }
    }
}

impl Context {
    /// Fails the mapping visibly (status, `esm_gateway_kafka_assignment_errors_total`,
    /// an error log) and asks the poll thread to rejoin the group, which assigns the
    /// partitions afresh. A later successful batch sets the mapping running again.
    fn assignment_failed(&self, error: AssignmentError, detail: &str) {
        let status = &self.shared.deliverer.mapping;
        metrics::counter!("esm_gateway_kafka_assignment_errors_total",
            "mapping" => status.name.clone(), "kind" => error.kind())
        .increment(1);
        tracing::error!(mapping = %status.name, kind = error.kind(), error = detail,
            "assignment failed; rejoining the consumer group");
        status.fail(detail);
        self.rejoin.notify_one();
    }

    /// Sets where each partition of `tpl` starts. A partition with a committed offset
    /// resumes there. In a topic of which the group has committed nothing yet, the
    /// mapping's starting position is resolved to an offset now (so that nothing
    /// produced from here on is skipped), and committed, so that it applies once: a
    /// later restart or another member resumes from it. Any other partition without a
    /// committed offset (added to the topic later) starts at its earliest record.
    fn seed(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        if self.start == Start::Beginning {
            // `auto.offset.reset = earliest` already starts there.
            return;
        }
        let mapping = &self.shared.deliverer.mapping.name;
        match self.starting_offsets(consumer, tpl) {
            Ok(seed) if seed.count() == 0 => {}
            Ok(seed) => {
                for e in seed.elements() {
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), e.offset());
                }
                if let Err(e) = consumer.commit(&seed, CommitMode::Sync) {
                    tracing::warn!(mapping = %mapping, error = %e,
                        "cannot commit the starting position; it is resolved again at the next assignment");
                }
                tracing::info!(mapping = %mapping, partitions = ?seed.to_topic_map(), "starting position applied");
            }
            Err(e) => {
                self.shared
                    .deliverer
                    .mapping
                    .error(format!("cannot resolve the starting position: {e}"));
                tracing::warn!(mapping = %mapping, error = %e,
                    "cannot resolve the starting position; partitions without a committed offset start at their earliest record");
            }
        }
    }

    /// The starting offsets of the partitions of `tpl` in topics the group has no
    /// committed offset of.
    fn starting_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Result<TopicPartitionList, KafkaError> {
        let timeout = Duration::from_secs(10);
        let mut topics: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| e.topic().to_owned())
            .collect();
        topics.sort();
        topics.dedup();
        let mut all = TopicPartitionList::new();
        for topic in &topics {
            for t in consumer.fetch_metadata(Some(topic), timeout)?.topics() {
                for p in t.partitions() {
                    all.add_partition(t.name(), p.id());
                }
            }
        }
        let committed = consumer.committed_offsets(all, timeout)?;
        let mut seed = TopicPartitionList::new();
        let mut times = TopicPartitionList::new();
        for topic in &topics {
            let fresh = committed
                .elements_for_topic(topic)
                .iter()
                .all(|e| !matches!(e.offset(), Offset::Offset(_)));
            if !fresh {
                continue;
            }
            for e in tpl.elements_for_topic(topic) {
                // The end before the time query: a record at or after the time that
                // the query missed was produced after it, so lies at or past this end.
                let (_, end) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
                seed.add_partition_offset(topic, e.partition(), Offset::Offset(end))?;
                if let Start::At(ms) = self.start {
                    times.add_partition_offset(topic, e.partition(), Offset::Offset(ms))?;
                }
            }
        }
        if times.count() > 0 {
            for e in consumer.offsets_for_times(times, timeout)?.elements() {
                if let Offset::Offset(o) = e.offset() {
                    seed.set_partition_offset(e.topic(), e.partition(), Offset::Offset(o))?;
                }
            }
        }
        Ok(seed)
    }

    /// Starts the task of a newly assigned partition; false if its queue cannot be
    /// split off (then it has no task).
    fn start(
        &self,
        consumer: &Arc<KafkaConsumer>,
        topic: &str,
        partition: i32,
        from: Offset,
    ) -> bool {
        #[cfg(debug_assertions)]
        if injected_split_failure() {
            return false;
        }
        let Some(queue) = consumer.split_partition_queue(topic, partition) else {
            return false;
        };
        let tp = (topic.to_owned(), partition);
        // Whatever still runs of an earlier assignment of the partition ends before the
        // new one reads: one task per partition at a time.
        let previous = self
            .tasks
            .lock()
            .expect("tasks lock")
            .remove(&tp)
            .map(|old| {
                old.stop.cancel();
                old.ended
            });
        let previous =
            previous.or_else(|| self.stragglers.lock().expect("stragglers lock").remove(&tp));
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.shared.commits.own(tp.clone(), generation);
        let stop = self.shared.shutdown.child_token();
        let ended = CancellationToken::new();
        // One report per task, so one place: the send never waits.
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        self.shared.runtime.spawn(partition_task(
            queue,
            consumer.clone(),
            Assignment {
                topic: topic.to_owned(),
                partition,
                generation,
                previous,
            },
            self.shared.clone(),
            stop.clone(),
            (done_tx, ended.clone()),
        ));
        tracing::info!(mapping = %self.shared.deliverer.mapping.name, topic, partition, from = ?from, generation, "partition assigned");
        self.tasks
            .lock()
            .expect("tasks lock")
            .insert(tp, PartitionTask { stop, done, ended });
        true
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
                Err(_) => {
                    tracing::warn!(mapping = %self.shared.deliverer.mapping.name, topic, partition,
                        "partition did not finish its batch within the revoke deadline; its last commit stands");
                    let mut stragglers = self.stragglers.lock().expect("stragglers lock");
                    stragglers.retain(|_, ended| !ended.is_cancelled());
                    stragglers.insert((topic, partition), t.ended);
                }
            }
        }
        self.shared.commits.disown(partitions);
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
        stragglers: Mutex::new(HashMap::new()),
        generations: std::sync::atomic::AtomicU64::new(0),
        shared: shared.clone(),
        revoke_deadline: (session_timeout / 2).min(Duration::from_secs(20)),
        start: Start::of(source),
        rejoin: Arc::new(tokio::sync::Notify::new()),
    };
    for error in AssignmentError::ALL {
        metrics::counter!("esm_gateway_kafka_assignment_errors_total",
            "mapping" => name.clone(), "kind" => error.kind())
        .absolute(0);
    }
    let consumer: Arc<KafkaConsumer> = Arc::new(config.create_with_context(context)?);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));

    let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    shared.deliverer.mapping.set(State::Running);
    tracing::info!(mapping = %name, topics = ?source.topics, group = %group_id(source, &name), "consumer subscribed");

    // The main queue only carries events (rebalances, errors, statistics): poll it on a
    // thread of its own, since the rebalance callback blocks while partitions wind down.
    let poll_stop = CancellationToken::new();
    let poller = {
        let (consumer, stop, name) = (consumer.clone(), poll_stop.clone(), name.clone());
        let (rejoin, topics) = (consumer.context().rejoin.clone(), source.topics.clone());
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
                            () = rejoin.notified() => {
                                // Leaving revokes every partition (each commits what it
                                // resolved); subscribing again joins afresh.
                                consumer.unsubscribe();
                                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                                if let Err(e) = consumer.subscribe(&topics) {
                                    tracing::error!(mapping = %name, error = %e, "cannot subscribe again after an assignment error");
                                    consumer.context().shared.deliverer.mapping.fail(format!("cannot subscribe again: {e}"));
                                } else {
                                    tracing::info!(mapping = %name, "consumer rejoined the group");
                                }
                            }
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

/// Runs one partition until it is stopped, and reports its final committable position
/// on `done`. A panic in its reader or one of its lanes would otherwise leave the
/// partition assigned and silent: it fails the mapping (status, log,
/// `esm_gateway_kafka_partition_restarts_total`), and after a backoff the partition
/// rewinds to its first unresolved record and starts over.
async fn partition_task(
    queue: StreamPartitionQueue<Context>,
    consumer: Arc<KafkaConsumer>,
    assignment: Assignment,
    shared: Arc<Shared>,
    stop: CancellationToken,
    (done, ended): (std::sync::mpsc::SyncSender<Option<u64>>, CancellationToken),
) {
    // Cancelled however the task ends.
    let _ended = ended.drop_guard();
    let Assignment {
        topic,
        partition,
        generation,
        previous,
    } = assignment;
    let status = shared.deliverer.mapping.clone();
    if let Some(previous) = previous {
        tracing::info!(mapping = %status.name, topic, partition,
            "partition waits for the batch its previous assignment still runs");
        tokio::select! {
            () = previous.cancelled() => {}
            () = stop.cancelled() => {
                let _ = done.send(None);
                return;
            }
        }
    }
    let queue = Arc::new(queue);
    // Carried over restarts: a fresh run knows nothing of what the last one received.
    let mut position = None;
    let mut restarts = 0u32;
    loop {
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let run = tokio::spawn(drain(
            queue.clone(),
            consumer.clone(),
            (topic.clone(), partition),
            generation,
            shared.clone(),
            tracker.clone(),
            stop.clone(),
        ));
        let result = run.await.and_then(|r| r);
        // A panic may have poisoned the tracker mid-update; what it holds is still a
        // position no unresolved record lies before.
        let reached = tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .committable();
        position = reached.or(position);
        let Err(e) = result else { break };
        restarts += 1;
        let error = panic_message(e);
        let delay = super::reconnect_delay(restarts);
        metrics::counter!("esm_gateway_kafka_partition_restarts_total", "mapping" => status.name.clone())
            .increment(1);
        tracing::error!(mapping = %status.name, topic, partition, error = %error, restart_in = ?delay,
            "partition task panicked; its partition restarts from its first unresolved record");
        status.fail(format!(
            "the task of partition {partition} of topic {topic} panicked: {error}"
        ));
        if stop.is_cancelled() {
            break;
        }
        super::pause(delay, &stop).await;
        // Whatever the dead run had read past `position` is read again: librdkafka
        // drops what the partition's queue held from before the seek.
        if let Some(p) = position
            && !rewind(&consumer, &topic, partition, p, &stop).await
        {
            break;
        }
    }
    let _ = done.send(position);
}

/// One assignment of a partition to this process.
struct Assignment {
    topic: String,
    partition: i32,
    /// Which one (see [`CommitState::owners`]).
    generation: u64,
    /// Cancelled when the task of the partition's previous assignment has ended.
    previous: Option<CancellationToken>,
}

/// Seeks the partition back to `offset`, retrying until it works; false if stopped
/// first.
async fn rewind(
    consumer: &Arc<KafkaConsumer>,
    topic: &str,
    partition: i32,
    offset: u64,
    stop: &CancellationToken,
) -> bool {
    let mut failures = 0;
    while !stop.is_cancelled() {
        let (c, t) = (consumer.clone(), topic.to_owned());
        let sought = tokio::task::spawn_blocking(move || {
            c.seek(
                &t,
                partition,
                Offset::Offset(offset as i64),
                Duration::from_secs(10),
            )
        })
        .await
        .expect("seek task");
        match sought {
            Ok(()) => return true,
            Err(e) => {
                failures += 1;
                let delay = super::reconnect_delay(failures);
                tracing::warn!(mapping = %consumer.context().shared.deliverer.mapping.name, topic, partition,
                    offset, error = %e, retry_in = ?delay, "cannot rewind a restarted partition");
                super::pause(delay, stop).await;
            }
        }
    }
    false
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let panic = e.into_panic();
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Drains one partition: a reader spreading records over lanes, and the lanes, each
/// running one batch at a time. Returns when stopped, or with the error of a lane that
/// panicked.
async fn drain(
    queue: Arc<StreamPartitionQueue<Context>>,
    consumer: Arc<KafkaConsumer>,
    (topic, partition): TopicPartition,
    generation: u64,
    shared: Arc<Shared>,
    tracker: Arc<Mutex<OffsetTracker>>,
    stop: CancellationToken,
) -> Result<(), tokio::task::JoinError> {
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
        // Per lane, not per mapping: a blocked partition must not take the room of
        // the others.
        let budget = Budget::new(
            shared.limits.buffer_bytes,
            shared.deliverer.mapping.metrics.buffer_waits.clone(),
        );
        lanes.push((tx, budget));
        lane_tasks.spawn(lane(
            Batcher::new(rx, shared.limits),
            deliverer.clone(),
            consumer.clone(),
            ((topic.clone(), partition), generation),
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
            // A lane ends early only on shutdown, or by panicking.
            Some(ended) = lane_tasks.join_next() => {
                ended?;
                break;
            }
            m = queue.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(topic, partition, error = %e, "fetch error");
                continue;
            }
        };
        // Registered before anything else can fail, so that a restart rewinds to it.
        tracker
            .lock()
            .expect("tracker lock")
            .received(m.offset() as u64);
        let lane = match (m.key(), lanes.len()) {
            (_, 1) | (None, _) => 0,
            (Some(k), n) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                (h.finish() % n as u64) as usize
            }
        };
        let mut record = to_record(&m, &fragments, &shared.deliverer.mapping.name);
        shared.deliverer.mapping.metrics.received.increment(1);
        drop(m);
        let (tx, budget) = &lanes[lane];
        // Waiting here stops the reading: what the partition's queue holds meanwhile
        // is bounded by librdkafka (`queued.max.messages.kbytes`).
        record.hold = tokio::select! {
            biased;
            () = &mut cancelled => break,
            h = budget.acquire(record.weight()) => h,
        };
        tokio::select! {
            biased;
            () = &mut cancelled => break,
            r = tx.send(record) => if r.is_err() { break },
        }
    }
    drop(lanes);
    while let Some(ended) = lane_tasks.join_next().await {
        ended?;
    }
    Ok(())
}

fn to_record(m: &BorrowedMessage<'_>, fragments: &KafkaFragments, mapping: &str) -> Record {
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
        fragment: fragments.render(m, &mut |name| {
            metrics::counter!("esm_gateway_kafka_header_names_replaced_total", "mapping" => mapping.to_owned())
                .increment(1);
            let raw: String = name.iter().map(|b| format!("{b:02x}")).collect();
            tracing::warn!(mapping, topic = m.topic(), partition = m.partition(), offset = m.offset(),
                header_name_hex = %raw,
                "Kafka header name is not UTF-8; delivered with each invalid byte sequence replaced by U+FFFD");
        }),
        id: None,
        key: m.key().map(|k| String::from_utf8_lossy(k).into()),
        position: m.offset() as u64,
        received: received.checked_sub(age).unwrap_or(received),
        received_at: now.checked_sub(age).unwrap_or(now),
        ack: Ack::None,
        hold: Hold::default(),
    }
}

/// One lane of a partition: batches in order, one at a time; after each, hands the
/// committer the position the partition's resolved records reach.
async fn lane(
    mut batcher: Batcher,
    deliverer: Arc<Deliverer>,
    consumer: Arc<KafkaConsumer>,
    ((topic, partition), generation): (TopicPartition, u64),
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
        #[cfg(debug_assertions)]
        injected_panic(&batch);
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
        if let Some(position) = position
            && !commits.offer((topic.clone(), partition), generation, position)
        {
            tracing::info!(mapping = %deliverer.mapping.name, topic, partition, position,
                "commit dropped: this process no longer owns the partition (revoked while the batch ran)");
        }
        if !outcome.unresolved.is_empty() {
            return;
        }
    }
}

/// Debug builds only: with `ESM_GATEWAY_TEST_SPLIT_FAILURES=<n>`, the first n partition
/// queue splits of the process fail, as `split_partition_queue` returning None would,
/// so that the integration tests can exercise the recovery, which no known broker
/// behaviour triggers at will.
#[cfg(debug_assertions)]
fn injected_split_failure() -> bool {
    static FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(n) = std::env::var("ESM_GATEWAY_TEST_SPLIT_FAILURES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    FAILED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n
}

/// Debug builds only: with `ESM_GATEWAY_TEST_PANIC_AT=<offset>`, the first lane to take
/// a batch holding that offset panics (once per process), so that the integration tests
/// can exercise partition supervision, which no known input triggers any more.
#[cfg(debug_assertions)]
fn injected_panic(batch: &[Record]) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(at) = std::env::var("ESM_GATEWAY_TEST_PANIC_AT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if batch.iter().any(|r| r.position == at)
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        panic!("injected by ESM_GATEWAY_TEST_PANIC_AT={at}");
    }
}
