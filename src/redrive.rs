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
//!
//! The records are input, not trusted: a `payloadLocation` is read only when it resolves
//! (symlinks followed) to a regular file inside the mapping's `payload_dir`, of at most
//! [`MAX_PAYLOAD_FILE`] bytes. A record that is not JSON, has no payload, or whose
//! payload is refused or unreadable is skipped: logged with its position, counted, and
//! left where it is (as a record whose replay failed), and the run goes on.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[error("the record is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the record has neither a payload nor a payloadLocation")]
    NoPayload,
    #[error("payloadLocation {location:?} refused (payload_dir is {}): {reason}", dir.display())]
    PayloadRefused {
        location: String,
        dir: PathBuf,
        reason: String,
    },
    #[error("cannot read the payload kept at {}: {source}", path.display())]
    PayloadUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the payload kept at {} is not JSON: {source}", path.display())]
    PayloadNotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The largest payload file a redrive reads: above Lambda's 6 MB synchronous event, with
/// room for the failure record's metadata around it, and small enough to hold in memory.
pub const MAX_PAYLOAD_FILE: u64 = 16 * 1024 * 1024;

/// The shortest time an SQS message a redrive received stays hidden at once. A redrive
/// holds messages for the queue's own visibility timeout (so that after a crash they
/// come back when the queue's consumers expect), but not less than this, extended every
/// third of it while a message is held (waiting for its replay, or kept).
const MIN_SQS_VISIBILITY: Duration = Duration::from_secs(2);

/// What a redrive did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Records invoked (or, in a dry run, that would be).
    pub replayed: usize,
    /// Replayed records that succeeded and left the source.
    pub removed: usize,
    /// Records still in the source: replays that failed, and the skipped ones.
    pub remaining: usize,
    /// Records not replayed because they cannot be read as they are (not JSON, no
    /// payload, a payloadLocation refused or unreadable); each is logged and kept.
    pub skipped: usize,
}

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Replayed successfully: it may leave the source.
    Removed,
    /// Replayed and failed (or a dry run): it stays.
    Kept,
    /// Not replayed: it cannot be read as it is; it stays.
    Skipped,
}

impl Report {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Removed => {
                self.replayed += 1;
                self.removed += 1;
            }
            Outcome::Kept => {
                self.replayed += 1;
                self.remaining += 1;
            }
            Outcome::Skipped => {
                self.skipped += 1;
                self.remaining += 1;
            }
        }
    }
}

/// Where a mapping's destination keeps payloads too large for it: the only directory a
/// redrive reads a `payloadLocation` from.
fn payload_dir(m: &Mapping) -> PathBuf {
    match &m.on_failure {
        Some(DestinationConfig::Sqs(d)) => d.payload_dir.clone(),
        Some(DestinationConfig::Lambda(d)) => d.payload_dir.clone(),
        Some(DestinationConfig::Kafka(d)) => d.payload_dir.clone(),
        Some(DestinationConfig::File(_) | DestinationConfig::Rabbitmq(_)) | None => None,
    }
    .unwrap_or_else(crate::destination::default_payload_dir)
}

/// Reads the payload file `location` names, if it resolves to a regular file of at most
/// [`MAX_PAYLOAD_FILE`] bytes inside `dir`.
fn read_payload(location: &str, dir: &Path) -> Result<Vec<u8>, RedriveError> {
    let refused = |reason: String| RedriveError::PayloadRefused {
        location: location.to_owned(),
        dir: dir.to_owned(),
        reason,
    };
    let path = location.strip_prefix("file://").unwrap_or(location);
    let root = dir
        .canonicalize()
        .map_err(|e| refused(format!("payload_dir cannot be resolved: {e}")))?;
    let real = Path::new(path)
        .canonicalize()
        .map_err(|e| refused(format!("it cannot be resolved: {e}")))?;
    if !real.starts_with(&root) {
        return Err(refused(format!(
            "it resolves to {}, outside payload_dir",
            real.display()
        )));
    }
    let unreadable = |source| RedriveError::PayloadUnreadable {
        path: real.clone(),
        source,
    };
    // The path is resolved: a symlink swapped in since is not followed, and a FIFO does
    // not block the open waiting for a writer.
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", real.display())));
    }
    let too_large = |len: u64| {
        refused(format!(
            "{} holds {len} bytes, above the {MAX_PAYLOAD_FILE} a redrive reads",
            real.display()
        ))
    };
    if meta.len() > MAX_PAYLOAD_FILE {
        return Err(too_large(meta.len()));
    }
    let mut whole = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_PAYLOAD_FILE + 1)
        .read_to_end(&mut whole)
        .map_err(unreadable)?;
    if whole.len() as u64 > MAX_PAYLOAD_FILE {
        return Err(too_large(whole.len() as u64));
    }
    Ok(whole)
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
        payload_dir: payload_dir(m),
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
    payload_dir: PathBuf,
    dry_run: bool,
}

impl Replay<'_> {
    /// Replays one failure record, found `at` (a position in the source, for the log).
    async fn one(&self, record: &[u8], at: &str) -> Outcome {
        let v: Value = match serde_json::from_slice(record) {
            Ok(v) => v,
            Err(e) => return skipped(at, "?", &RedriveError::NotJson(e)),
        };
        let id = v["requestContext"]["requestId"].as_str().unwrap_or("?");
        let payload = match self.payload(&v) {
            Ok(p) => p,
            Err(e) => return skipped(at, id, &e),
        };
        if self.dry_run {
            println!(
                "would replay {id} ({} {})",
                v["requestContext"]["condition"], v["timestamp"]
            );
            return Outcome::Kept;
        }
        match self
            .invoker
            .invoke(serde_json::to_vec(&payload).expect("JSON"))
            .await
        {
            Ok(r) if succeeded(&r, self.mapping.report_batch_item_failures) => Outcome::Removed,
            Ok(_) => Outcome::Kept,
            Err(e) => {
                tracing::warn!(at, request_id = id, error = %e, "replay failed; the record stays parked");
                Outcome::Kept
            }
        }
    }

    /// The event a failure record holds: its `payload`, or the one in the file its
    /// `payloadLocation` names.
    fn payload(&self, v: &Value) -> Result<Value, RedriveError> {
        if let Some(p) = v.get("payload") {
            return Ok(p.clone());
        }
        let loc = v
            .get("payloadLocation")
            .and_then(Value::as_str)
            .ok_or(RedriveError::NoPayload)?;
        let whole = read_payload(loc, &self.payload_dir)?;
        let whole: Value =
            serde_json::from_slice(&whole).map_err(|source| RedriveError::PayloadNotJson {
                path: loc.strip_prefix("file://").unwrap_or(loc).into(),
                source,
            })?;
        whole.get("payload").cloned().ok_or(RedriveError::NoPayload)
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
    async fn sqs(&self, client: aws_sdk_sqs::Client, url: &str) -> Result<Report, RedriveError> {
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
    } else {
        let tmp = file::sibling(p, "redrive.tmp");
        std::fs::write(&tmp, keep)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, p)?;
    }
    file::sync_dir(p)
}

/// Logs why the record `at` cannot be replayed; it stays where it is.
fn skipped(at: &str, request_id: &str, e: &RedriveError) -> Outcome {
    tracing::warn!(at, request_id, error = %e, "record skipped; it stays where it is");
    Outcome::Skipped
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<Vec<u8>, RedriveError>) -> String {
        match r {
            Err(e @ RedriveError::PayloadRefused { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn only_regular_files_of_bounded_size_inside_payload_dir_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = dir.path().join("payloads");
        std::fs::create_dir(&payloads).unwrap();
        let good = payloads.join("good.json");
        std::fs::write(&good, b"{}").unwrap();
        let loc = |p: &Path| format!("file://{}", p.display());
        assert_eq!(read_payload(&loc(&good), &payloads).unwrap(), b"{}");
        // A relative path with `..` that climbs out.
        let outside = dir.path().join("outside.json");
        std::fs::write(&outside, b"{}").unwrap();
        let climb = format!("{}/../outside.json", payloads.display());
        assert!(refused(read_payload(&climb, &payloads)).contains("outside payload_dir"));
        // A FIFO inside: refused without waiting for a writer.
        let fifo = payloads.join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(refused(read_payload(&loc(&fifo), &payloads)).contains("not a regular file"));
        // A directory, and a device reached through a symlink inside.
        let sub = payloads.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(refused(read_payload(&loc(&sub), &payloads)).contains("not a regular file"));
        let zero = payloads.join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(refused(read_payload(&loc(&zero), &payloads)).contains("outside payload_dir"));
        // Above the cap (sparse: no disk used).
        let big = payloads.join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_PAYLOAD_FILE + 1)
            .unwrap();
        assert!(refused(read_payload(&loc(&big), &payloads)).contains("above the 16777216"));
        // A missing file, and a payload_dir that does not exist.
        let missing = payloads.join("missing.json");
        assert!(refused(read_payload(&loc(&missing), &payloads)).contains("cannot be resolved"));
        let nowhere = dir.path().join("nowhere");
        assert!(refused(read_payload(&loc(&good), &nowhere)).contains("payload_dir cannot"));
    }
}
