//! The Lambda destination: the failure record is another function's asynchronous
//! (Event) invoke; Lambda accepting it (202) is the confirmation.

use std::path::PathBuf;

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;

use super::{DestinationError, within_limit};
use crate::config;
use crate::invoke::lambda::MAX_ASYNC_PAYLOAD;

#[derive(Debug)]
pub struct LambdaDestination {
    client: aws_sdk_lambda::Client,
    function: String,
    payload_dir: PathBuf,
}

impl LambdaDestination {
    pub fn new(c: &config::LambdaDestination, sdk: &aws_config::SdkConfig) -> Self {
        LambdaDestination {
            client: aws_sdk_lambda::Client::new(sdk),
            function: c.function.clone(),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let body = within_limit(record, MAX_ASYNC_PAYLOAD, &self.payload_dir).await?;
        let error = |message: String| DestinationError::Service {
            kind: "Lambda function",
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
                error(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string())
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
