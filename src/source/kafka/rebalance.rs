//! The consumer's context: rebalances (assigning, revoking and seeding partitions) and
//! librdkafka's logs and statistics.

use super::*;

/// Where a partition starts in a topic of which the group has no committed offset yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    Beginning,
    /// The end as of the assignment.
    End,
    /// The first record at or after this time (ms since the epoch), else the end as of
    /// the assignment.
    At(i64),
}

impl Start {
    pub(super) fn of(source: &KafkaSource) -> Start {
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
pub(super) struct Context {
    pub(super) consumer: OnceLock<Weak<KafkaConsumer>>,
    pub(super) tasks: Mutex<HashMap<TopicPartition, PartitionTask>>,
    /// Tasks of revoked partitions still finishing a batch past the revoke deadline,
    /// by their `ended` token: if the partition comes back, its new task waits for it.
    pub(super) stragglers: Mutex<HashMap<TopicPartition, CancellationToken>>,
    /// The last assignment generation handed out (see [`CommitState::owners`]).
    pub(super) generations: std::sync::atomic::AtomicU64,
    pub(super) shared: Arc<Shared>,
    /// How long a revoked partition may take to finish its batch in flight.
    pub(super) revoke_deadline: Duration,
    /// Wakes the poll thread to leave and rejoin the group after an assignment error.
    pub(super) rejoin: Arc<tokio::sync::Notify>,
    pub(super) start: Start,
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
pub(super) enum AssignmentError {
    /// An assigned partition's queue could not be split off.
    Split,
    /// librdkafka reported a rebalance error.
    Rebalance,
}

impl AssignmentError {
    pub(super) const ALL: [AssignmentError; 2] =
        [AssignmentError::Split, AssignmentError::Rebalance];

    pub(super) fn kind(self) -> &'static str {
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
    pub(super) fn stop_and_commit<C: Consumer<Self>>(
        &self,
        consumer: &C,
        partitions: &[TopicPartition],
    ) {
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
