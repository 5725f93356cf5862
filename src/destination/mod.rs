//! On-failure destinations: where a record goes when it cannot be delivered, in AWS's
//! failure-record shape extended with the payload (so a redrive can replay it).
//!
//! A write returns only once the record is durable (fsynced, or confirmed by the
//! broker); the pipeline acknowledges the source only after that. A failed write is
//! either transient (the destination is down, full or misconfigured: retried with
//! backoff for as long as it takes, acknowledging nothing meanwhile) or permanent (the
//! destination refuses this record and always will, e.g. it is too large): then the
//! record is kept whole in the destination's payload directory instead
//! ([`Destination::fall_back`]), so one record never blocks a mapping.

pub(crate) mod file;
mod kafka;
mod lambda;
mod rabbitmq;
mod sqs;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use std::time::SystemTime;

use serde_json::json;

use crate::config::DestinationConfig;
use crate::invoke::event::{Envelope, rfc3339};
use crate::invoke::lambda::Response;
use crate::record::Record;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("cannot write failure record to file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send failure record to {kind} {target}: {message}")]
    Service {
        kind: &'static str,
        target: String,
        message: String,
    },
    #[error("cannot keep an oversized failure record in {dir}: {source}")]
    PayloadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot publish failure record to RabbitMQ exchange {exchange:?} at {url}: {message}")]
    Rabbit {
        url: String,
        exchange: String,
        message: String,
    },
    #[error("{kind} {target} refuses the failure record, and would refuse it again: {message}")]
    Rejected {
        kind: &'static str,
        target: String,
        message: String,
        /// The payload file that already holds the whole record, when one was written
        /// before the rejection (metadata still too large).
        kept: Option<PathBuf>,
    },
}

impl DestinationError {
    /// Whether writing the same record again cannot succeed: it is then kept in the
    /// payload directory instead of being retried for ever.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DestinationError::Rejected { .. })
    }
}

/// The last part of an AWS error code (`AWS.SimpleQueueService.InvalidMessageContents`,
/// `com.amazonaws.sqs#InvalidMessageContents` or the bare name), to compare with a name.
pub(crate) fn aws_code(code: Option<&str>) -> &str {
    code.and_then(|c| c.rsplit(['.', '#']).next())
        .unwrap_or_default()
}

/// The closed set of destinations, opened from their configuration.
#[derive(Debug)]
pub enum Destination {
    File(file::FileDestination),
    Rabbit(Box<rabbitmq::RabbitDestination>),
    Sqs(sqs::SqsDestination),
    Kafka(kafka::KafkaDestination),
    Lambda(lambda::LambdaDestination),
}

impl Destination {
    pub fn new(
        config: &DestinationConfig,
        mapping: &str,
        sdk: &aws_config::SdkConfig,
    ) -> Destination {
        match config {
            DestinationConfig::File(c) => Destination::File(file::FileDestination::new(c)),
            DestinationConfig::Rabbitmq(c) => {
                Destination::Rabbit(Box::new(rabbitmq::RabbitDestination::new(c, mapping)))
            }
            DestinationConfig::Sqs(c) => {
                Destination::Sqs(sqs::SqsDestination::new(c, mapping, sdk))
            }
            DestinationConfig::Kafka(c) => Destination::Kafka(kafka::KafkaDestination::new(c)),
            DestinationConfig::Lambda(c) => {
                Destination::Lambda(lambda::LambdaDestination::new(c, sdk))
            }
        }
    }

    /// Writes one failure record durably; `key` is the original record's key (Kafka).
    pub async fn write(
        &self,
        record: &Rendered,
        key: Option<&str>,
    ) -> Result<(), DestinationError> {
        match self {
            Destination::File(d) => d.write(&record.bytes).await,
            Destination::Rabbit(d) => d.write(&record.bytes).await,
            Destination::Sqs(d) => d.write(record).await,
            Destination::Kafka(d) => d.write(&record.bytes, key).await,
            Destination::Lambda(d) => d.write(record).await,
        }
    }

    /// Keeps a record this destination refused for good, whole, as
    /// `<payload_dir>/<requestId>.json` (fsynced like a payload file: that file is then
    /// the parked copy) and returns its path.
    pub async fn fall_back(
        &self,
        record: &Rendered,
        refused: &DestinationError,
    ) -> Result<PathBuf, DestinationError> {
        if let DestinationError::Rejected {
            kept: Some(path), ..
        } = refused
        {
            return Ok(path.clone());
        }
        let dir = match self {
            Destination::Sqs(d) => d.payload_dir.clone(),
            Destination::Kafka(d) => d.payload_dir.clone(),
            Destination::Lambda(d) => d.payload_dir.clone(),
            // Never refuse a record for good; a default keeps this total.
            Destination::File(_) | Destination::Rabbit(_) => default_payload_dir(),
        };
        let path = dir.join(format!("{}.json", record.request_id));
        keep(&dir, &path, &record.bytes).await?;
        Ok(path)
    }

    /// Warns when the destination keeps records for less than 14 days (SQS's
    /// `MessageRetentionPeriod`): "nothing lost" lasts only as long as they stay there.
    pub async fn check_retention(&self, mapping: &str) {
        if let Destination::Sqs(d) = self {
            d.check_retention(mapping).await;
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Destination::File(_) => "file",
            Destination::Rabbit(_) => "rabbitmq",
            Destination::Sqs(_) => "sqs",
            Destination::Kafka(_) => "kafka",
            Destination::Lambda(_) => "lambda",
        }
    }
}

pub fn default_payload_dir() -> PathBuf {
    PathBuf::from("/var/lib/esm-gateway/payloads")
}

/// Where a destination of `kind` named `target` takes at most `limit` bytes.
pub struct Limit<'a> {
    pub kind: &'static str,
    pub target: &'a str,
    pub bytes: usize,
    pub payload_dir: &'a Path,
}

/// The record as it can be sent to a destination that takes at most `limit.bytes`: as
/// is, or, when larger, its metadata with `payloadLocation` naming a file in
/// `payload_dir` that holds the whole record (written and fsynced first, so nothing is
/// lost). Metadata still too large is a permanent rejection.
pub async fn within_limit<'a>(
    record: &'a Rendered,
    limit: &Limit<'_>,
) -> Result<Cow<'a, [u8]>, DestinationError> {
    if record.bytes.len() <= limit.bytes {
        return Ok(Cow::Borrowed(&record.bytes));
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(&record.bytes).expect("failure records are JSON");
    let path = limit
        .payload_dir
        .join(format!("{}.json", record.request_id));
    keep(limit.payload_dir, &path, &record.bytes).await?;
    if let Some(o) = v.as_object_mut() {
        o.remove("payload");
        o.insert(
            "payloadLocation".into(),
            format!("file://{}", path.display()).into(),
        );
    }
    let meta = serde_json::to_vec(&v).expect("JSON value to bytes");
    if meta.len() > limit.bytes {
        return Err(DestinationError::Rejected {
            kind: limit.kind,
            target: limit.target.to_owned(),
            message: format!(
                "its metadata alone is {} bytes, above the limit of {} bytes",
                meta.len(),
                limit.bytes
            ),
            kept: Some(path),
        });
    }
    Ok(Cow::Owned(meta))
}

/// [`keep_payload`] on a blocking thread, its error naming `dir`.
async fn keep(dir: &Path, path: &Path, record: &[u8]) -> Result<(), DestinationError> {
    let (kept, whole) = (path.to_owned(), record.to_vec());
    tokio::task::spawn_blocking(move || keep_payload(&kept, &whole))
        .await
        .expect("the payload write does not panic")
        .map_err(|source| DestinationError::PayloadDir {
            dir: dir.to_owned(),
            source,
        })
}

/// Writes `record` to `path` whole or not at all: into a temporary file that is fsynced,
/// renamed into place and its directory fsynced, each result checked (tokio's `File`
/// would report a failed write only on the next call).
fn keep_payload(path: &Path, record: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("a payload file is inside payload_dir");
    std::fs::create_dir_all(dir)?;
    let tmp = file::sibling(path, "tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(record).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| file::sync_dir(path));
    if written.is_err() {
        // Frees the space for the retry: nothing refers to a file that was not parked.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Why records were parked (AWS's `requestContext.condition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    RetryAttemptsExhausted,
    RecordAgeExceeded,
    MaximumPayloadSizeExceeded,
    /// The record cannot be put in an event as it is (a RabbitMQ property or header name
    /// that is not UTF-8): parked without an invoke. Not one of AWS's conditions.
    UndecodableRecord,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Condition::RecordAgeExceeded => "RecordAgeExceeded",
            Condition::MaximumPayloadSizeExceeded => "MaximumPayloadSizeExceeded",
            Condition::UndecodableRecord => "UndecodableRecord",
        }
    }
}

/// Longest `error` text a failure record carries, in bytes: a function's error message
/// can be as large as its response, and would make the record too large to park.
pub const MAX_ERROR_BYTES: usize = 4096;

/// A rendered failure record: its JSON and its `requestContext.requestId`.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub request_id: String,
    pub bytes: Vec<u8>,
}

/// `error` cut to at most [`MAX_ERROR_BYTES`] (on a character boundary), and whether it
/// was cut.
fn bounded(error: &str) -> (&str, bool) {
    if error.len() <= MAX_ERROR_BYTES {
        return (error, false);
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    (&error[..end], true)
}

/// Everything a failure record says about the records it parks.
pub struct Failure<'a> {
    pub function_arn: &'a str,
    pub condition: Condition,
    /// Invokes spent on these records (AWS's approximateInvokeCount).
    pub invoke_count: u32,
    /// The last response of the function, when it answered.
    pub response: Option<&'a Response>,
    /// The last error, in words (function error message or invoke error).
    pub error: Option<&'a str>,
    pub envelope: &'a Envelope,
    pub records: &'a [Record],
}

impl Failure<'_> {
    /// The JSON failure record: AWS's shape, plus `error` (at most [`MAX_ERROR_BYTES`],
    /// with `errorTruncated` when cut) and the failed event as `payload`.
    pub fn render(&self) -> Rendered {
        let (info_key, info) = self.envelope.batch_info(self.records);
        let request_id = uuid::Uuid::new_v4().to_string();
        let (error, truncated) = match self.error.map(bounded) {
            Some((e, t)) => (Some(e), t),
            None => (None, false),
        };
        let mut meta = json!({
            "requestContext": {
                "requestId": request_id,
                "functionArn": self.function_arn,
                "condition": self.condition.as_str(),
                "approximateInvokeCount": self.invoke_count,
            },
            "responseContext": {
                "statusCode": self.response.map(|r| r.status),
                "executedVersion": self.response.and_then(|r| r.executed_version.as_deref()),
                "functionError": self.response.and_then(|r| r.function_error.as_deref()),
            },
            "version": "1.0",
            "timestamp": rfc3339(SystemTime::now()),
            "error": error,
        });
        if truncated {
            meta["errorTruncated"] = true.into();
        }
        meta[info_key] = info;
        let mut out = serde_json::to_vec(&meta).expect("JSON value to bytes");
        // Append the event as it was sent, without parsing it again.
        out.pop();
        out.extend_from_slice(br#","payload":"#);
        // The event of the last attempt (only a schedule's input names its attempt).
        out.extend_from_slice(
            &self
                .envelope
                .render_attempt(self.records, self.invoke_count.max(1)),
        );
        out.push(b'}');
        Rendered {
            request_id,
            bytes: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure_with(error: &str) -> serde_json::Value {
        let envelope = Envelope::Sqs {
            queue_url: "q".into(),
            fifo: false,
        };
        let records = [Record::for_test(Some("m1"), None, 0)];
        let rendered = Failure {
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f",
            condition: Condition::RetryAttemptsExhausted,
            invoke_count: 1,
            response: None,
            error: Some(error),
            envelope: &envelope,
            records: &records,
        }
        .render();
        let v: serde_json::Value = serde_json::from_slice(&rendered.bytes).unwrap();
        assert_eq!(v["requestContext"]["requestId"], rendered.request_id);
        v
    }

    #[test]
    fn a_long_error_message_is_cut_to_four_kib_and_marked() {
        let short = failure_with("ValueError: boom");
        assert_eq!(short["error"], "ValueError: boom");
        assert!(short.get("errorTruncated").is_none());
        // Multi-byte characters across the limit: the cut stays on a character boundary.
        let long = format!("ValueError: {}", "é".repeat(1_000_000));
        let v = failure_with(&long);
        let error = v["error"].as_str().unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES, "{}", error.len());
        assert!(error.len() > MAX_ERROR_BYTES - 4);
        assert!(long.starts_with(error));
        assert_eq!(v["errorTruncated"], true);
    }

    #[test]
    fn only_a_rejection_is_permanent() {
        let rejected = DestinationError::Rejected {
            kind: "Kafka topic",
            target: "t".into(),
            message: "Message production error: MessageSizeTooLarge".into(),
            kept: None,
        };
        assert!(rejected.is_permanent());
        assert!(
            !DestinationError::Service {
                kind: "SQS queue",
                target: "q".into(),
                message: "connection refused".into(),
            }
            .is_permanent()
        );
        for code in [
            "AWS.SimpleQueueService.InvalidMessageContents",
            "com.amazonaws.sqs#InvalidMessageContents",
            "InvalidMessageContents",
        ] {
            assert_eq!(aws_code(Some(code)), "InvalidMessageContents");
        }
        assert_eq!(aws_code(None), "");
    }

    #[tokio::test]
    async fn metadata_still_above_the_limit_is_a_rejection_with_the_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        let record = Rendered {
            request_id: "r1".into(),
            bytes: format!(
                r#"{{"requestContext":{{"requestId":"r1"}},"error":"boom","payload":"{}"}}"#,
                "x".repeat(500)
            )
            .into_bytes(),
        };
        let limit = |bytes| Limit {
            kind: "SQS queue",
            target: "q",
            bytes,
            payload_dir: dir.path(),
        };
        let sent = within_limit(&record, &limit(200)).await.unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&sent).unwrap();
        assert!(sent.get("payload").is_none() && sent["payloadLocation"].is_string());
        let e = within_limit(&record, &limit(50)).await.unwrap_err();
        assert!(e.is_permanent(), "{e}");
        assert!(e.to_string().contains("above the limit of 50 bytes"), "{e}");
        let DestinationError::Rejected {
            kept: Some(kept), ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(kept, &dir.path().join("r1.json"));
        // The whole record is in its payload file all the same.
        assert_eq!(
            std::fs::read(dir.path().join("r1.json")).unwrap(),
            record.bytes
        );
    }
}
