//! The Lambda destination: the failure record is another function's asynchronous
//! (Event) invoke; Lambda accepting it (202) is the confirmation.

use serde::Deserialize;
use std::path::PathBuf;

use aws_sdk_lambda::error::ProvideErrorMetadata;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;

use super::{DestinationError, Limit, Rendered, aws_code, within_limit};
use crate::invoke::lambda::MAX_ASYNC_PAYLOAD;

/// `on_failure = { type = "lambda", function = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(deserialize_with = "crate::env::expand")]
    pub function: String,
    /// Where a failure record above the 1 MB asynchronous limit is kept; the function then
    /// gets its metadata and `payloadLocation`. A record Lambda refuses for good is kept
    /// here whole. Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

/// Invoke errors that the same payload would get again.
const PERMANENT: [&str; 2] = ["RequestTooLargeException", "InvalidRequestContentException"];

#[derive(Debug)]
pub struct LambdaDestination {
    client: aws_sdk_lambda::Client,
    function: String,
    pub(super) payload_dir: PathBuf,
}

impl LambdaDestination {
    pub fn new(c: &Config, sdk: &aws_config::SdkConfig) -> Self {
        LambdaDestination {
            client: aws_sdk_lambda::Client::new(sdk),
            function: c.function.clone(),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
        }
    }

    pub async fn write(&self, record: &Rendered) -> Result<(), DestinationError> {
        const KIND: &str = "Lambda function";
        let limit = Limit {
            kind: KIND,
            target: &self.function,
            bytes: MAX_ASYNC_PAYLOAD,
            payload_dir: &self.payload_dir,
        };
        let body = within_limit(record, &limit).await?;
        let error = |message: String| DestinationError::Service {
            kind: KIND,
            target: self.function.clone(),
            message,
        };
        let out = self
            .client
            .invoke()
            .function_name(&self.function)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(body.into_owned()))
            .send()
            .await
            .map_err(|e| {
                let message = aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
                if PERMANENT.contains(&aws_code(e.code())) {
                    DestinationError::Rejected {
                        kind: KIND,
                        target: self.function.clone(),
                        message,
                        kept: None,
                    }
                } else {
                    error(message)
                }
            })?;
        if out.status_code() == 202 {
            Ok(())
        } else {
            Err(error(format!(
                "Lambda answered {} instead of 202",
                out.status_code()
            )))
        }
    }
}
