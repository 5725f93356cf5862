//! Lambda's Invoke API through aws-sdk-lambda, and what each outcome means to a mapping.
//!
//! One owner of retries: the SDK's own retries are turned off for this client, so every
//! attempt the gateway counts is one HTTP request, and throttles and transient errors are
//! retried by the pipeline with the mapping's backoff (without spending its retry budget).

use std::time::Duration;

use aws_sdk_lambda::Client;
use aws_sdk_lambda::config::http::HttpResponse;
use aws_sdk_lambda::error::SdkError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use futures_util::future::Either;

use crate::trace::TraceContext;

/// The header that carries a trace into the function (its `_X_AMZN_TRACE_ID`).
pub const TRACE_HEADER: &str = "X-Amzn-Trace-Id";

/// Why a `function` is not a function reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionRefError {
    #[error("the function name is empty")]
    Empty,
    #[error("{0:?} is longer than 170 characters")]
    TooLong(String),
    #[error("{0:?} contains {1:?}, which no function name or ARN can")]
    Character(String, char),
    #[error("{0:?} is neither a function name, name:qualifier, nor a function ARN")]
    Shape(String),
}

/// A validated function reference: a name, `name:qualifier`, or a full or partial ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef(String);

impl FunctionRef {
    pub fn parse(s: &str) -> Result<FunctionRef, FunctionRefError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_:.$".contains(c);
        if s.is_empty() {
            return Err(FunctionRefError::Empty);
        }
        if s.len() > 170 {
            return Err(FunctionRefError::TooLong(s.to_owned()));
        }
        if let Some(bad) = s.chars().find(|&c| !ok_char(c)) {
            return Err(FunctionRefError::Character(s.to_owned(), bad));
        }
        let parts: Vec<&str> = s.split(':').collect();
        let shape_ok = matches!(
            parts.as_slice(),
            [_] | [_, _]
                | [
                    "arn",
                    "aws" | "aws-cn" | "aws-us-gov",
                    "lambda",
                    _,
                    _,
                    "function",
                    _
                ]
                | [
                    "arn",
                    "aws" | "aws-cn" | "aws-us-gov",
                    "lambda",
                    _,
                    _,
                    "function",
                    _,
                    _
                ]
                | [_, "function", _]
                | [_, "function", _, _]
        );
        if !shape_ok || parts.iter().any(|p| p.is_empty()) {
            return Err(FunctionRefError::Shape(s.to_owned()));
        }
        Ok(FunctionRef(s.to_owned()))
    }

    /// The ARN failure records carry: the given one, or one built from the name.
    pub fn arn(&self, region: &str, account: &str) -> String {
        let parts: Vec<&str> = self.0.split(':').collect();
        match parts.as_slice() {
            ["arn", ..] => self.0.clone(),
            [acct, "function", rest @ ..] => {
                format!("arn:aws:lambda:{region}:{acct}:function:{}", rest.join(":"))
            }
            _ => format!("arn:aws:lambda:{region}:{account}:function:{}", self.0),
        }
    }
}

/// What an Invoke returned (HTTP 200 or 202): the function ran, well or not.
#[derive(Debug)]
pub struct Response {
    pub status: i32,
    /// `X-Amz-Function-Error`: "Handled" or "Unhandled" when the function failed.
    pub function_error: Option<String>,
    pub executed_version: Option<String>,
    pub payload: Vec<u8>,
}

/// Why an Invoke did not reach or run the function. Each class answers one question:
/// does retrying spend the batch's retry budget (none does), and is the mapping broken?
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// 429: Lambda throttled us. Retried with backoff, free of charge.
    #[error("function {function} throttled the invoke: {message}")]
    Throttled { function: String, message: String },
    /// 5xx, timeouts, connection errors. Retried with backoff, free of charge.
    #[error("invoke of {function} failed transiently: {message}")]
    Transient { function: String, message: String },
    /// 413: the event is too large; the batch is split, or a lone record parked.
    #[error("function {function} refused the event as too large ({bytes} bytes)")]
    TooLarge { function: String, bytes: usize },
    /// 4xx other than the above: missing function, denied permission, bad credentials.
    /// The mapping is marked failed and keeps retrying slowly; nothing is acked.
    #[error("cannot invoke function {function}: {message}")]
    Fatal { function: String, message: String },
}

/// Lambda's asynchronous invoke payload limit: 1 MB.
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;

/// Invokes one function: synchronously (RequestResponse: the function's result decides
/// the batch) or asynchronously (Event: Lambda's 202 accepting it counts as delivered,
/// and Lambda's own async retries and destinations take over).
#[derive(Clone, Debug)]
pub struct Invoker {
    client: Client,
    function: String,
    asynchronous: bool,
    /// Longest wait for one answer (the mapping's `function_timeout`).
    timeout: Duration,
}

impl Invoker {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        function: &str,
        asynchronous: bool,
        timeout: Duration,
    ) -> Invoker {
        Self::with_client(Client::new(sdk), function, asynchronous, timeout)
    }

    /// An invoker on a client shared with other mappings: a client is cheap to clone,
    /// but building one per mapping costs tens of KiB each (10,000 schedules).
    pub fn with_client(
        client: Client,
        function: &str,
        asynchronous: bool,
        timeout: Duration,
    ) -> Invoker {
        Invoker {
            client,
            function: function.to_owned(),
            asynchronous,
            timeout,
        }
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    /// Invokes the function with `event`; with a `trace`, the request carries it as
    /// `X-Amzn-Trace-Id` (Invoke models no such field), so that the function's X-Ray
    /// segment continues it.
    pub async fn invoke(
        &self,
        event: Vec<u8>,
        trace: Option<TraceContext>,
    ) -> Result<Response, InvokeError> {
        let bytes = event.len();
        let op = self
            .client
            .invoke()
            .function_name(&self.function)
            .invocation_type(if self.asynchronous {
                InvocationType::Event
            } else {
                InvocationType::RequestResponse
            })
            .payload(Blob::new(event));
        let call = match trace {
            None => Either::Left(op.send()),
            Some(trace) => {
                let value = trace.to_string();
                Either::Right(
                    op.customize()
                        .mutate_request(move |req| {
                            req.headers_mut().insert(TRACE_HEADER, value.clone());
                        })
                        .send(),
                )
            }
        };
        // Dropping the call on timeout closes its connection: a flow that a NAT or
        // firewall forgot would otherwise never answer, and the batch would wait forever.
        let Ok(result) = tokio::time::timeout(self.timeout, call).await else {
            return Err(InvokeError::Transient {
                function: self.function.clone(),
                message: format!(
                    "no answer within the function timeout ({})",
                    humantime::format_duration(self.timeout)
                ),
            });
        };
        match result {
            Ok(out) => Ok(Response {
                status: out.status_code(),
                function_error: out.function_error().map(str::to_owned),
                executed_version: out.executed_version().map(str::to_owned),
                payload: out
                    .payload()
                    .map(|b| b.as_ref().to_vec())
                    .unwrap_or_default(),
            }),
            Err(e) => Err(self.classify(e, bytes)),
        }
    }

    fn classify(
        &self,
        e: SdkError<aws_sdk_lambda::operation::invoke::InvokeError, HttpResponse>,
        bytes: usize,
    ) -> InvokeError {
        let function = self.function.clone();
        let status = e.raw_response().map(|r| r.status().as_u16());
        let message = aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
        match (&e, status) {
            (_, Some(429)) => InvokeError::Throttled { function, message },
            (_, Some(413)) => InvokeError::TooLarge { function, bytes },
            (_, Some(s)) if s >= 500 => InvokeError::Transient { function, message },
            // A function being updated answers 409: it will be ready shortly.
            (_, Some(409)) => InvokeError::Transient { function, message },
            (_, Some(_)) => InvokeError::Fatal { function, message },
            (SdkError::ConstructionFailure(_), None) => InvokeError::Fatal { function, message },
            (_, None) => InvokeError::Transient { function, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_references() {
        for ok in [
            "my-function",
            "my-function:live",
            "my-function:$LATEST",
            "arn:aws:lambda:eu-west-1:123456789012:function:f",
            "arn:aws:lambda:eu-west-1:123456789012:function:f:3",
            "123456789012:function:f",
        ] {
            assert!(FunctionRef::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a:b:c",
            "arn:aws:s3:::bucket",
            "f:",
            "x".repeat(171).as_str(),
        ] {
            assert!(FunctionRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arns_are_derived_from_names() {
        let f = FunctionRef::parse("orders:live").unwrap();
        assert_eq!(
            f.arn("us-east-1", "000000000000"),
            "arn:aws:lambda:us-east-1:000000000000:function:orders:live"
        );
        let f = FunctionRef::parse("123456789012:function:f").unwrap();
        assert_eq!(
            f.arn("eu-west-1", "000000000000"),
            "arn:aws:lambda:eu-west-1:123456789012:function:f"
        );
    }
}
