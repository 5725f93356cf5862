//! The SQS queue destination: one SendMessage per failure record; a record too large for
//! the queue is kept in the payload directory and its message points to it. A FIFO queue
//! (`.fifo`) gets the mapping's name as message group, so its records stay in parking
//! order, and the record's requestId as deduplication id, so a send retried after a lost
//! answer is not parked twice.

use serde::Deserialize;
use std::path::PathBuf;

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use aws_smithy_types::error::display::DisplayErrorContext;

use super::{DestinationError, Limit, Rendered, aws_code, within_limit};

/// `on_failure = { type = "sqs", queue_url = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(deserialize_with = "crate::env::expand")]
    pub queue_url: String,
    /// Largest message the queue takes. Default: 262,144 (256 KiB).
    pub max_message_bytes: Option<usize>,
    /// Where a failure record too large for a message is kept; the message then carries
    /// its metadata and `payloadLocation`. A record the queue refuses for good is kept
    /// here whole. Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

/// How long a dead-letter queue should keep messages: SQS's maximum, 14 days.
pub const MIN_RETENTION_SECONDS: u64 = 14 * 24 * 3600;

/// SendMessage errors that the same message would get again.
const PERMANENT: [&str; 4] = [
    "InvalidMessageContents",
    "InvalidParameterValue",
    "MissingParameter",
    "InvalidParameterCombination",
];

#[derive(Debug)]
pub struct SqsDestination {
    client: aws_sdk_sqs::Client,
    url: String,
    limit: usize,
    pub(super) payload_dir: PathBuf,
    /// The message group of a FIFO queue; None for a standard queue.
    group: Option<String>,
}

impl SqsDestination {
    pub fn new(c: &Config, mapping: &str, sdk: &aws_config::SdkConfig) -> Self {
        SqsDestination {
            client: crate::aws::sqs_client(sdk),
            url: c.queue_url.clone(),
            limit: c.max_message_bytes.unwrap_or(256 * 1024),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
            group: c.queue_url.ends_with(".fifo").then(|| mapping.to_owned()),
        }
    }

    pub async fn write(&self, record: &Rendered) -> Result<(), DestinationError> {
        let limit = Limit {
            kind: "SQS queue",
            target: &self.url,
            bytes: self.limit,
            payload_dir: &self.payload_dir,
        };
        let body = within_limit(record, &limit).await?;
        let mut send = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(String::from_utf8_lossy(&body));
        if let Some(group) = &self.group {
            send = send
                .message_group_id(group)
                .message_deduplication_id(&record.request_id);
        }
        send.send().await.map(|_| ()).map_err(|e| {
            let message = DisplayErrorContext(&e).to_string();
            let (kind, target) = ("SQS queue", self.url.clone());
            if PERMANENT.contains(&aws_code(e.code())) {
                DestinationError::Rejected {
                    kind,
                    target,
                    message,
                    kept: None,
                }
            } else {
                DestinationError::Service {
                    kind,
                    target,
                    message,
                }
            }
        })
    }

    /// Logs a warning when the queue keeps messages for less than 14 days, or when its
    /// retention cannot be read.
    pub async fn check_retention(&self, mapping: &str) {
        let got = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::MessageRetentionPeriod)
            .send()
            .await;
        let seconds = match got {
            Ok(out) => out
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::MessageRetentionPeriod))
                .and_then(|v| v.parse::<u64>().ok()),
            Err(e) => {
                tracing::warn!(mapping, queue = %self.url, error = %DisplayErrorContext(&e),
                    "cannot read the dead-letter queue's MessageRetentionPeriod; parked records stay only as long as it keeps them");
                return;
            }
        };
        match seconds {
            Some(s) if s < MIN_RETENTION_SECONDS => {
                tracing::warn!(mapping, queue = %self.url, retention_seconds = s, minimum_seconds = MIN_RETENTION_SECONDS,
                    "the dead-letter queue keeps messages for less than 14 days; SQS deletes parked records after that, so raise its MessageRetentionPeriod");
            }
            Some(s) => {
                tracing::debug!(mapping, queue = %self.url, retention_seconds = s, "dead-letter queue retention checked");
            }
            None => {
                tracing::warn!(mapping, queue = %self.url,
                    "the dead-letter queue did not report its MessageRetentionPeriod; parked records stay only as long as it keeps them");
            }
        }
    }
}
