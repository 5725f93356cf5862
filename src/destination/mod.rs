//! On-failure destinations: where a record goes when it cannot be delivered, in AWS's
//! failure-record shape extended with the payload (so a redrive can replay it).
//!
//! A write returns only once the record is durable (fsynced, or confirmed by the
//! broker); the pipeline acknowledges the source only after that, and retries a failed
//! write with backoff for as long as it takes, acknowledging nothing meanwhile.

mod file;
mod rabbitmq;

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
}

impl Destination {
    pub fn new(config: &DestinationConfig, mapping: &str) -> Destination {
        match config {
            DestinationConfig::File(c) => Destination::File(file::FileDestination::new(c)),
            DestinationConfig::Rabbitmq(c) => {
                Destination::Rabbit(Box::new(rabbitmq::RabbitDestination::new(c, mapping)))
            }
        }
    }

    /// Writes one failure record durably.
    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        match self {
            Destination::File(d) => d.write(record).await,
            Destination::Rabbit(d) => d.write(record).await,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Destination::File(_) => "file",
            Destination::Rabbit(_) => "rabbitmq",
        }
    }
}

/// Why records were parked (AWS's `requestContext.condition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    RetryAttemptsExhausted,
    RecordAgeExceeded,
    MaximumPayloadSizeExceeded,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Condition::RecordAgeExceeded => "RecordAgeExceeded",
            Condition::MaximumPayloadSizeExceeded => "MaximumPayloadSizeExceeded",
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
