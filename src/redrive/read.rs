//! Where a redrive reads parked records from: the file destination (live and rotated
//! files), an SQS queue, a RabbitMQ queue or a Kafka topic. Each reader replays every
//! record through [`Replay::one`] and keeps or removes it by the outcome.

use std::path::Path;

use super::*;

impl Replay<'_> {
    /// Replays a file destination's records: its rotated files, oldest first, and the
    /// live file, which is first moved aside (under the lock the gateway takes to append)
    /// as the newest rotated file, so that a running gateway appends to a fresh file and
    pub(super) async fn file(&self, path: &Path) -> Result<Report, RedriveError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            RedriveError::Read(format!("cannot {what} {}: {e}", p.display()))
        };
        if !path.exists()
            && file::rotated(path)
                .map_err(|e| io("list the rotated files of", path, e))?
                .is_empty()
        {
            return Err(RedriveError::Read(format!(
                "there is no {} (nor any rotated {}.<n>) to redrive",
                path.display(),
                path.display()
            )));
        }
        // Two redrives of one file would replay each record twice.
        let one = file::sibling(path, "redrive.lock");
        let _only = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&one)
            .map_err(|e| io("open", &one, e))?;
        _only.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => RedriveError::Read(format!(
                "another redrive of {} is running (it holds {})",
                path.display(),
                one.display()
            )),
            std::fs::TryLockError::Error(e) => io("lock", &one, e),
        })?;
        let files = {
            let _lock = file::lock(path).map_err(|e| io("lock", path, e))?;
            let live = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
            if live && !self.dry_run {
                file::rotate(path).map_err(|e| io("move aside", path, e))?;
            }
            let mut files =
                file::rotated(path).map_err(|e| io("list the rotated files of", path, e))?;
            if live && self.dry_run {
                files.push((u64::MAX, path.to_owned()));
            }
            // Read under the lock: a dry run must not see a line half appended.
            files
                .into_iter()
                .map(|(_, p)| std::fs::read_to_string(&p).map(|t| (p, t)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| io("read", path, e))?
        };
        let mut report = Report::default();
        for (p, text) in files {
            let mut keep = String::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{}:{}", p.display(), n + 1);
                let outcome = self.one(line.as_bytes(), &at).await;
                report.add(outcome);
                if outcome != Outcome::Removed {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
            if !self.dry_run {
                rewrite(path, &p, &keep).map_err(|e| io("rewrite", &p, e))?;
            }
        }
        Ok(report)
    }

    /// Replays an SQS queue's messages, received ten at a time. Every message received
    /// and not deleted (waiting for its replay, or kept) is held hidden: its visibility
    /// (the queue's, at least [`MIN_SQS_VISIBILITY`]) is extended every third of it while
    /// the replays run, so that no other consumer gets it and one run replays it once
    /// however long it lasts; at the end the kept ones are made visible again at once.
    pub(super) async fn sqs(
        &self,
        client: aws_sdk_sqs::Client,
        url: &str,
    ) -> Result<Report, RedriveError> {
        let mut held: std::collections::BTreeMap<String, String> = Default::default();
        let mut seen = std::collections::BTreeSet::new();
        let attrs = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|e| {
                RedriveError::Read(format!(
                    "SQS queue {url}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ))
            })?;
        let visibility = attrs
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout))
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(30), Duration::from_secs)
            .max(MIN_SQS_VISIBILITY);
        let mut extend = tokio::time::interval(visibility / 3);
        extend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        extend.reset();
        let report = self
            .sqs_replay(&client, url, visibility, &mut held, &mut seen, &mut extend)
            .await;
        let kept: Vec<String> = held.into_values().collect();
        crate::source::sqs::extend(&client, url, &kept, Duration::ZERO).await;
        report
    }

    async fn sqs_replay(
        &self,
        client: &aws_sdk_sqs::Client,
        url: &str,
        visibility: Duration,
        held: &mut std::collections::BTreeMap<String, String>,
        seen: &mut std::collections::BTreeSet<String>,
        extend: &mut tokio::time::Interval,
    ) -> Result<Report, RedriveError> {
        let mut report = Report::default();
        let err = |e: &dyn std::fmt::Display| RedriveError::Read(format!("SQS queue {url}: {e}"));
        loop {
            let out = client
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(visibility.as_secs() as i32)
                .send()
                .await
                .map_err(|e| err(&aws_smithy_types::error::display::DisplayErrorContext(&e)))?;
            let messages = out.messages();
            if messages.is_empty() {
                break;
            }
            let mut todo = Vec::new();
            for m in messages {
                let id = m.message_id().unwrap_or_default().to_owned();
                let handle = m.receipt_handle().unwrap_or_default().to_owned();
                // A message seen before whose visibility lapsed (SQS's 12 h cap, or an
                // extension that failed): held again, not replayed twice.
                held.insert(id.clone(), handle);
                if seen.insert(id.clone()) {
                    todo.push((id, m.body().unwrap_or_default().to_owned()));
                }
            }
            for (id, body) in todo {
                let at = format!("SQS message {id}");
                let replay = self.one(body.as_bytes(), &at);
                tokio::pin!(replay);
                let outcome = loop {
                    tokio::select! {
                        o = &mut replay => break o,
                        _ = extend.tick() => {
                            let handles: Vec<String> = held.values().cloned().collect();
                            crate::source::sqs::extend(client, url, &handles, visibility).await;
                        }
                    }
                };
                report.add(outcome);
                if outcome == Outcome::Removed {
                    let handle = held.remove(&id).unwrap_or_default();
                    client
                        .delete_message()
                        .queue_url(url)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .map_err(|e| {
                            err(&aws_smithy_types::error::display::DisplayErrorContext(&e))
                        })?;
                }
            }
        }
        Ok(report)
    }

    pub(super) async fn rabbitmq(
        &self,
        url: &crate::config::SecretUrl,
        queue: &str,
    ) -> Result<Report, RedriveError> {
        use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
        let conn = crate::amqp::connect(url, None, "esm-gateway redrive")
            .await
            .map_err(|e| RedriveError::Read(e.to_string()))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| RedriveError::Read(e.to_string()))?;
        let mut report = Report::default();
        let mut held = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .map_err(|e| RedriveError::Read(format!("queue {queue:?}: {e}")))?
        {
            let at = format!("queue {queue:?} delivery {}", m.delivery.delivery_tag);
            let outcome = self.one(&m.delivery.data, &at).await;
            report.add(outcome);
            if outcome == Outcome::Removed {
                m.delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| RedriveError::Read(e.to_string()))?;
            } else {
                held.push(m.delivery);
            }
        }
        // Requeued only now, so that one run never replays a record twice.
        for d in held {
            let _ = d
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
        let _ = conn.close(200, "redrive done".into()).await;
        Ok(report)
    }

    pub(super) async fn kafka(&self, bootstrap: &str, topic: &str) -> Result<Report, RedriveError> {
        use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let err = |e: rdkafka::error::KafkaError| {
            RedriveError::Read(format!("Kafka topic {topic:?}: {e}"))
        };
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "group.id",
                format!("esm-gateway-redrive-{}", self.mapping.name),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .map_err(err)?;
        consumer.subscribe(&[topic]).map_err(err)?;
        let mut report = Report::default();
        // Per partition: the next offset to commit, and whether a failure stopped it.
        let mut positions: std::collections::BTreeMap<i32, (i64, bool)> = Default::default();
        // The first record waits out the group join; after that, a quiet topic is done.
        let mut wait = std::time::Duration::from_secs(30);
        while let Ok(m) = tokio::time::timeout(wait, consumer.recv()).await {
            wait = std::time::Duration::from_secs(2);
            let m = m.map_err(err)?;
            let at = format!("{topic}/{}@{}", m.partition(), m.offset());
            let outcome = self.one(m.payload().unwrap_or_default(), &at).await;
            let entry = positions
                .entry(m.partition())
                .or_insert((m.offset(), false));
            if outcome == Outcome::Removed && !entry.1 {
                entry.0 = m.offset() + 1;
                report.add(outcome);
            } else {
                // Not committed past: read again by the next redrive.
                entry.1 = true;
                report.add(match outcome {
                    Outcome::Removed => Outcome::Kept,
                    o => o,
                });
            }
        }
        if !self.dry_run && !positions.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, (offset, _)) in &positions {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*offset))
                    .map_err(err)?;
            }
            consumer.commit(&tpl, CommitMode::Sync).map_err(err)?;
        }
        Ok(report)
    }
}

/// Replaces the rotated file `p` of `live` with `keep` atomically (a temporary file,
/// fsynced, renamed over it, the directory fsynced), or removes it when `keep` is empty.
fn rewrite(live: &Path, p: &Path, keep: &str) -> std::io::Result<()> {
    let _lock = file::lock(live)?;
    if keep.is_empty() {
        std::fs::remove_file(p)?;
        file::sync_dir(p)
    } else {
        crate::durable::replace(p, &file::sibling(p, "redrive.tmp"), keep.as_bytes())
    }
}
