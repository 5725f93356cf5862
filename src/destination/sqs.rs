//! The SQS queue destination: one SendMessage per failure record; a record too large for
//! the queue is kept in the payload directory and its message points to it.

use std::path::PathBuf;

use super::{DestinationError, within_limit};
use crate::config;

#[derive(Debug)]
pub struct SqsDestination {
    client: aws_sdk_sqs::Client,
    url: String,
    limit: usize,
    payload_dir: PathBuf,
}

impl SqsDestination {
    pub fn new(c: &config::SqsDestination, sdk: &aws_config::SdkConfig) -> Self {
        SqsDestination {
            client: aws_sdk_sqs::Client::new(sdk),
            url: c.queue_url.clone(),
            limit: c.max_message_bytes.unwrap_or(256 * 1024),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let body = within_limit(record, self.limit, &self.payload_dir).await?;
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(String::from_utf8_lossy(&body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| DestinationError::Service {
                kind: "SQS queue",
                target: self.url.clone(),
                message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
            })
    }
}
