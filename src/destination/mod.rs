//! On-failure destinations: where a record goes when it cannot be delivered, in AWS's
//! failure-record shape extended with the payload (so a redrive can replay it).
//!
//! A write returns only once the record is durable (fsynced, or confirmed by the
//! broker); the pipeline acknowledges the source only after that, and retries a failed
//! write with backoff for as long as it takes, acknowledging nothing meanwhile.

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
            DestinationConfig::Sqs(c) => Destination::Sqs(sqs::SqsDestination::new(c, sdk)),
            DestinationConfig::Kafka(c) => Destination::Kafka(kafka::KafkaDestination::new(c)),
            DestinationConfig::Lambda(c) => {
                Destination::Lambda(lambda::LambdaDestination::new(c, sdk))
            }
        }
    }

    /// Writes one failure record durably; `key` is the original record's key (Kafka).
    pub async fn write(&self, record: &[u8], key: Option<&str>) -> Result<(), DestinationError> {
        match self {
            Destination::File(d) => d.write(record).await,
            Destination::Rabbit(d) => d.write(record).await,
            Destination::Sqs(d) => d.write(record).await,
            Destination::Kafka(d) => d.write(record, key).await,
            Destination::Lambda(d) => d.write(record).await,
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

/// The record as it can be sent to a destination that takes at most `limit` bytes: as
/// is, or, when larger, its metadata with `payloadLocation` naming a file in `dir` that
/// holds the whole record (written and fsynced first, so nothing is lost).
pub async fn within_limit<'a>(
    record: &'a [u8],
    limit: usize,
    dir: &Path,
) -> Result<Cow<'a, [u8]>, DestinationError> {
    if record.len() <= limit {
        return Ok(Cow::Borrowed(record));
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(record).expect("failure records are JSON");
    let id = v["requestContext"]["requestId"]
        .as_str()
        .unwrap_or("record")
        .to_owned();
    let path = dir.join(format!("{id}.json"));
    let (kept, whole) = (path.clone(), record.to_vec());
    tokio::task::spawn_blocking(move || keep_payload(&kept, &whole))
        .await
        .expect("the payload write does not panic")
        .map_err(|source| DestinationError::PayloadDir {
            dir: dir.to_owned(),
            source,
        })?;
    if let Some(o) = v.as_object_mut() {
        o.remove("payload");
        o.insert(
            "payloadLocation".into(),
            format!("file://{}", path.display()).into(),
        );
    }
    Ok(Cow::Owned(
        serde_json::to_vec(&v).expect("JSON value to bytes"),
    ))
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
    /// The JSON failure record: AWS's shape, plus `error` and the failed event as
    /// `payload`.
    pub fn render(&self) -> Vec<u8> {
        let (info_key, info) = self.envelope.batch_info(self.records);
        let mut meta = json!({
            "requestContext": {
                "requestId": uuid::Uuid::new_v4().to_string(),
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
            "error": self.error,
        });
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
        out
    }
}
