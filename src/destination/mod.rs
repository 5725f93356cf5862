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

pub mod file;
pub mod kafka;
pub mod lambda;
pub mod rabbitmq;
pub mod sqs;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// The closed set of on-failure destinations.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DestinationConfig {
    /// Append one JSON failure record per line, fsynced before the source is acked.
    File(file::Config),
    /// Publish to an exchange with publisher confirms (and `mandatory`).
    Rabbitmq(rabbitmq::Config),
    /// Send to an SQS queue.
    Sqs(sqs::Config),
    /// Produce to a Kafka topic, keyed by the original record's key.
    Kafka(kafka::Config),
    /// Invoke another function asynchronously with the failure record.
    Lambda(lambda::Config),
}

impl DestinationConfig {
    /// What is wrong with it, each problem naming `mapping`.
    pub fn problems(&self, mapping: &str, out: &mut Vec<String>) {
        match self {
            DestinationConfig::File(c) => c.problems(mapping, out),
            DestinationConfig::Rabbitmq(c) => c.problems(mapping, out),
            DestinationConfig::Kafka(c) => c.problems(mapping, out),
            DestinationConfig::Sqs(_) | DestinationConfig::Lambda(_) => {}
        }
    }

    /// A file no other mapping may write: two writers rotating one file would each
    /// rotate the other's records, and a redrive would replay them into the wrong
    /// function.
    pub fn exclusive_path(&self) -> Option<&Path> {
        match self {
            DestinationConfig::File(c) => Some(&c.path),
            DestinationConfig::Rabbitmq(_)
            | DestinationConfig::Sqs(_)
            | DestinationConfig::Kafka(_)
            | DestinationConfig::Lambda(_) => None,
        }
    }
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
        amqp: &crate::amqp::Pool,
    ) -> Destination {
        match config {
            DestinationConfig::File(c) => Destination::File(file::FileDestination::new(c)),
            DestinationConfig::Rabbitmq(c) => {
                Destination::Rabbit(Box::new(rabbitmq::RabbitDestination::new(c, mapping, amqp)))
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

    /// Writes one failure record durably; `key` is the original record's key, as bytes
    /// (Kafka).
    pub async fn write(
        &self,
        record: &Rendered,
        key: Option<&[u8]>,
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

    /// Whether it takes one failure record per failed record rather than one per failed
    /// batch: a Kafka topic does, as AWS writes them, each keyed by its record's key.
    pub fn one_per_record(&self) -> bool {
        match self {
            Destination::Kafka(_) => true,
            Destination::File(_)
            | Destination::Rabbit(_)
            | Destination::Sqs(_)
            | Destination::Lambda(_) => false,
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

/// Writes `record` to `path` whole or not at all ([`crate::durable::replace`]; not tokio's
/// `File`, which would report a failed write only on the next call).
fn keep_payload(path: &Path, record: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a payload file is inside payload_dir");
    std::fs::create_dir_all(dir)?;
    crate::durable::replace(path, &file::sibling(path, "tmp"), record)
}

/// A rendered failure record: its JSON and its `requestContext.requestId`.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub request_id: String,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
