//! `esm-gateway redrive`: replays parked failure records into the mapping's function
//! and removes from the destination only the records whose replay succeeded.
//!
//! Each failure record carries the event that failed (`payload`, or `payloadLocation`
//! naming the file that holds the whole record); it is invoked synchronously as it was.
//! A replay succeeds when the function returns without a function error and, with
//! `report_batch_item_failures`, reports no failed item. Removal: a file destination's
//! rotated files are read too, and its live file is first moved aside under the lock the
//! gateway appends under (so a running gateway loses nothing); each is rewritten with the
//! records that remain (atomically, by rename) or removed; an SQS message is deleted; a
//! RabbitMQ message (from a queue bound to the exchange destination) is acked, and a
//! failed one is requeued; a Kafka topic's records are consumed by the group
//! `esm-gateway-redrive-<mapping>`, which commits past each partition's records up to its
//! first failure (that record and those after it are read again by the next redrive).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Config, DestinationConfig, Mapping};
use crate::destination::file;
use crate::invoke::lambda::{Invoker, Response};

/// Where the parked records are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    File(PathBuf),
    Sqs(String),
    Rabbitmq(String),
    Kafka(String),
}

impl std::str::FromStr for From {
    type Err = String;

    fn from_str(s: &str) -> Result<From, String> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(From::File(p.into())),
            Some(("sqs", u)) => Ok(From::Sqs(u.to_owned())),
            Some(("rabbitmq", q)) => Ok(From::Rabbitmq(q.to_owned())),
            Some(("kafka", t)) => Ok(From::Kafka(t.to_owned())),
            _ => Err(format!(
                "{s:?}: expected file:PATH, sqs:QUEUE_URL, rabbitmq:QUEUE (a queue bound to the exchange destination) or kafka:TOPIC"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("there is no mapping named {0:?} in the configuration")]
    NoMapping(String),
    #[error(
        "mapping {0:?}: say where the parked records are with --from (its on_failure destination cannot be read back by itself)"
    )]
    NoSource(String),
    #[error("{0}")]
    Read(String),
}

/// What a redrive did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub replayed: usize,
    pub removed: usize,
    pub remaining: usize,
}

/// Runs a redrive; with `dry_run`, lists what it would replay and changes nothing.
pub async fn run(
    config: &Config,
    mapping: &str,
    from: Option<From>,
    dry_run: bool,
) -> Result<Report, RedriveError> {
    let m = config
        .mappings
        .iter()
        .find(|m| m.name == mapping)
        .ok_or_else(|| RedriveError::NoMapping(mapping.to_owned()))?;
    let from = match (from, &m.on_failure) {
        (Some(f), _) => f,
        (None, Some(DestinationConfig::File(f))) => From::File(f.path.clone()),
        (None, Some(DestinationConfig::Sqs(q))) => From::Sqs(q.queue_url.clone()),
        (None, Some(DestinationConfig::Kafka(k))) => From::Kafka(k.topic.clone()),
        (None, _) => return Err(RedriveError::NoSource(mapping.to_owned())),
    };
    let sdk = crate::invoke::lambda::sdk_config(&config.aws).await;
    let invoker = Invoker::new(&sdk, &m.function, false, m.function_timeout());
    let replay = Replay {
        invoker,
        mapping: m,
        dry_run,
    };
    match from {
        From::File(path) => replay.file(&path).await,
        From::Sqs(url) => replay.sqs(aws_sdk_sqs::Client::new(&sdk), &url).await,
        From::Rabbitmq(queue) => {
            let url = match &m.on_failure {
                Some(DestinationConfig::Rabbitmq(d)) => d.url.clone(),
                _ => match &m.source {
                    crate::config::Source::Rabbitmq(s) => s.url.clone(),
                    _ => return Err(RedriveError::NoSource(mapping.to_owned())),
                },
            };
            replay.rabbitmq(&url, &queue).await
        }
        From::Kafka(topic) => {
            let Some(DestinationConfig::Kafka(k)) = &m.on_failure else {
                return Err(RedriveError::NoSource(mapping.to_owned()));
            };
            replay.kafka(&k.bootstrap_servers, &topic).await
        }
    }
}

struct Replay<'a> {
    invoker: Invoker,
    mapping: &'a Mapping,
    dry_run: bool,
}

impl Replay<'_> {
    /// Replays one failure record; true when it succeeded (so it may be removed).
    async fn one(&self, record: &[u8]) -> Result<bool, RedriveError> {
        let v: Value = serde_json::from_slice(record)
            .map_err(|e| RedriveError::Read(format!("a parked record is not JSON: {e}")))?;
        let payload = match (
            v.get("payload"),
            v.get("payloadLocation").and_then(Value::as_str),
        ) {
            (Some(p), _) => p.clone(),
            (None, Some(loc)) => {
                let path = loc.strip_prefix("file://").unwrap_or(loc);
                let whole = std::fs::read(path).map_err(|e| {
                    RedriveError::Read(format!("cannot read the payload kept at {path}: {e}"))
                })?;
                let whole: Value = serde_json::from_slice(&whole)
                    .map_err(|e| RedriveError::Read(format!("{path} is not JSON: {e}")))?;
                whole["payload"].clone()
            }
            (None, None) => {
                return Err(RedriveError::Read(
                    "a parked record has no payload to replay".into(),
                ));
            }
        };
        let id = v["requestContext"]["requestId"].as_str().unwrap_or("?");
        if self.dry_run {
            println!(
                "would replay {id} ({} {})",
                v["requestContext"]["condition"], v["timestamp"]
            );
            return Ok(false);
        }
        let ok = match self
            .invoker
            .invoke(serde_json::to_vec(&payload).expect("JSON"))
            .await
        {
            Ok(r) => succeeded(&r, self.mapping.report_batch_item_failures),
            Err(e) => {
                tracing::warn!(request_id = id, error = %e, "replay failed; the record stays parked");
                false
            }
        };
        Ok(ok)
    }

    /// Replays a file destination's records: its rotated files, oldest first, and the
    /// live file, which is first moved aside (under the lock the gateway takes to append)
    /// as the newest rotated file, so that a running gateway appends to a fresh file and
    /// never to one read here. Each file is then rewritten with what remains, or removed.
    async fn file(&self, path: &Path) -> Result<Report, RedriveError> {
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
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                report.replayed += 1;
                if self.one(line.as_bytes()).await? {
                    report.removed += 1;
                } else {
                    report.remaining += 1;
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

    async fn sqs(&self, client: aws_sdk_sqs::Client, url: &str) -> Result<Report, RedriveError> {
        let mut report = Report::default();
        let err = |e: &dyn std::fmt::Display| RedriveError::Read(format!("SQS queue {url}: {e}"));
        loop {
            let out = client
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(300)
                .send()
                .await
                .map_err(|e| err(&aws_smithy_types::error::display::DisplayErrorContext(&e)))?;
            let messages = out.messages();
            if messages.is_empty() {
                break;
            }
            for m in messages {
                report.replayed += 1;
                let handle = m.receipt_handle().unwrap_or_default();
                if self.one(m.body().unwrap_or_default().as_bytes()).await? {
                    report.removed += 1;
                    client
                        .delete_message()
                        .queue_url(url)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .map_err(|e| {
                            err(&aws_smithy_types::error::display::DisplayErrorContext(&e))
                        })?;
                } else {
                    // Kept: hidden until this redrive ends (the 300 s visibility above),
                    // so that it is not replayed twice in one run.
                    report.remaining += 1;
                }
            }
        }
        Ok(report)
    }

    async fn rabbitmq(
        &self,
        url: &crate::config::SecretUrl,
        queue: &str,
    ) -> Result<Report, RedriveError> {
        use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
        let conn = crate::source::rabbitmq::connect(url, None, "esm-gateway redrive")
            .await
            .map_err(RedriveError::Read)?;
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
            report.replayed += 1;
            if self.one(&m.delivery.data).await? {
                report.removed += 1;
                m.delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| RedriveError::Read(e.to_string()))?;
            } else {
                report.remaining += 1;
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
}

impl Replay<'_> {
    async fn kafka(&self, bootstrap: &str, topic: &str) -> Result<Report, RedriveError> {
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
            report.replayed += 1;
            let ok = self.one(m.payload().unwrap_or_default()).await?;
            let entry = positions
                .entry(m.partition())
                .or_insert((m.offset(), false));
            if ok && !entry.1 {
                entry.0 = m.offset() + 1;
                report.removed += 1;
            } else {
                entry.1 = true;
                report.remaining += 1;
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
    } else {
        let tmp = file::sibling(p, "redrive.tmp");
        std::fs::write(&tmp, keep)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, p)?;
    }
    file::sync_dir(p)
}

fn succeeded(r: &Response, item_failures: bool) -> bool {
    if r.function_error.is_some() {
        return false;
    }
    if !item_failures {
        return true;
    }
    match serde_json::from_slice::<Value>(&r.payload) {
        Ok(v) => v
            .get("batchItemFailures")
            .is_none_or(|f| f.is_null() || f.as_array().is_some_and(Vec::is_empty)),
        Err(_) => r.payload.iter().all(u8::is_ascii_whitespace),
    }
}
