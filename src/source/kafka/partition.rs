//! One assigned partition: its supervised task, its reader spreading records over
//! lanes, and the lanes, each running one batch at a time.

use super::*;

/// Runs one partition until it is stopped, and reports its final committable position
/// on `done`. A panic in its reader or one of its lanes would otherwise leave the
/// partition assigned and silent: it fails the mapping (status, log,
/// `esm_gateway_kafka_partition_restarts_total`), and after a backoff the partition
/// rewinds to its first unresolved record and starts over.
pub(super) async fn partition_task(
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
        let delay = crate::source::reconnect_delay(restarts);
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
        crate::source::pause(delay, &stop).await;
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
pub(super) struct Assignment {
    pub(super) topic: String,
    pub(super) partition: i32,
    /// Which one (see [`CommitState::owners`]).
    pub(super) generation: u64,
    /// Cancelled when the task of the partition's previous assignment has ended.
    pub(super) previous: Option<CancellationToken>,
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
                let delay = crate::source::reconnect_delay(failures);
                tracing::warn!(mapping = %consumer.context().shared.deliverer.mapping.name, topic, partition,
                    offset, error = %e, retry_in = ?delay, "cannot rewind a restarted partition");
                crate::source::pause(delay, stop).await;
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
    let shape = KafkaShape::new(&shared.bootstrap_servers, &topic, partition)
        .with_event_source_arn(&shared.event_source_arn);
    let deliverer = Arc::new(shared.deliverer.with_shape(Arc::new(shape)));
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
    let (fragment, trace) = fragments.render(m, &mut |name| {
            metrics::counter!("esm_gateway_kafka_header_names_replaced_total", "mapping" => mapping.to_owned())
                .increment(1);
            let raw: String = name.iter().map(|b| format!("{b:02x}")).collect();
            tracing::warn!(mapping, topic = m.topic(), partition = m.partition(), offset = m.offset(),
                header_name_hex = %raw,
                "Kafka header name is not UTF-8; delivered with each invalid byte sequence replaced by U+FFFD");
        });
    Record {
        fragment,
        id: None,
        key: m.key().map(Into::into),
        position: m.offset() as u64,
        received: received.checked_sub(age).unwrap_or(received),
        received_at: now.checked_sub(age).unwrap_or(now),
        trace,
        ack: Ack::NONE,
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
        let mut outcome = deliverer.deliver(batch, &stop).await;
        // Kafka's ack: the position handed to the committer (which commits it async).
        let acking = std::mem::take(&mut outcome.span)
            .into_ack(&deliverer.mapping.name, outcome.resolved.len());
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
        drop(acking);
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
pub(super) fn injected_split_failure() -> bool {
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
