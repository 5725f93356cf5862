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

mod read;

/// Where the parked records are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    File(PathBuf),
    Sqs(String),
    Rabbitmq(String),
    Kafka(String),
}

/// A `--from` that names no kind of store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?}: expected file:PATH, sqs:QUEUE_URL, rabbitmq:QUEUE (a queue bound to the exchange destination) or kafka:TOPIC"
)]
pub struct UnknownFrom(String);

impl std::str::FromStr for From {
    type Err = UnknownFrom;

    fn from_str(s: &str) -> Result<From, UnknownFrom> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(From::File(p.into())),
            Some(("sqs", u)) => Ok(From::Sqs(u.to_owned())),
            Some(("rabbitmq", q)) => Ok(From::Rabbitmq(q.to_owned())),
            Some(("kafka", t)) => Ok(From::Kafka(t.to_owned())),
            _ => Err(UnknownFrom(s.to_owned())),
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
    let sdk = crate::aws::sdk_config(&config.aws).await;
    let invoker = Invoker::new(&sdk, &m.function, false, m.function_timeout());
    let replay = Replay {
        invoker,
        mapping: m,
        payload_dir: payload_dir(m),
        dry_run,
    };
    match from {
        From::File(path) => replay.file(&path).await,
        From::Sqs(url) => replay.sqs(crate::aws::sqs_client(&sdk), &url).await,
        From::Rabbitmq(queue) => {
            let url = match &m.on_failure {
                Some(DestinationConfig::Rabbitmq(d)) => d.url.clone(),
                _ => match m.source.rabbitmq_url() {
                    Some(url) => url.clone(),
                    None => return Err(RedriveError::NoSource(mapping.to_owned())),
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
            .invoke(serde_json::to_vec(&payload).expect("JSON"), None)
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
    // The pipeline's rules (`pipeline::response`): an empty body, null or an object
    // without failures is success; any other JSON (a string, a list) is not.
    match serde_json::from_slice::<Value>(&r.payload) {
        Ok(Value::Null) => true,
        Ok(Value::Object(o)) => o
            .get("batchItemFailures")
            .is_none_or(|f| f.is_null() || f.as_array().is_some_and(Vec::is_empty)),
        Ok(_) => false,
        Err(_) => r.payload.iter().all(u8::is_ascii_whitespace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_succeeds_only_on_what_the_pipeline_counts_as_success() {
        let answer = |body: &str| Response {
            status: 200,
            payload: body.as_bytes().to_vec(),
            function_error: None,
            executed_version: None,
        };
        for ok in ["", " ", "null", "{}", r#"{"batchItemFailures":[]}"#] {
            assert!(succeeded(&answer(ok), true), "{ok:?}");
        }
        for failed in [
            r#"{"batchItemFailures":[{"itemIdentifier":"m"}]}"#,
            r#""done""#,
            "[]",
            "0",
            "{bad",
        ] {
            assert!(!succeeded(&answer(failed), true), "{failed:?}");
        }
        assert!(succeeded(&answer(r#""done""#), false));
    }

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
