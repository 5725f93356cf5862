//! The API's wire format, botocore's `lambda/2015-03-31` model: the request fields a
//! mapping is made of ([`Spec`], kept as sent), the error shape, and the response
//! (`EventSourceMappingConfiguration`) rendered per kind of source, with only the fields
//! AWS returns for it.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A mapping's fields as CreateEventSourceMapping and UpdateEventSourceMapping carry
/// them; a field the gateway does not support is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Spec {
    pub function_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_batching_window_in_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelization_factor: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_position: Option<String>,
    /// Epoch seconds, as rest-json sends timestamps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_position_timestamp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_criteria: Option<FilterCriteria>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_config: Option<ScalingConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_config: Option<DestinationConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_record_age_in_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bisect_batch_on_function_error: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_retry_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_access_configurations: Option<Vec<SourceAccess>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_managed_event_source: Option<SelfManagedEventSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_response_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_managed_kafka_event_source_config: Option<KafkaEventSourceConfig>,
}

/// The fields of a Spec that UpdateEventSourceMapping may change (the rest identify the
/// source, which AWS does not let an update change).
pub const UPDATABLE: &[&str] = &[
    "FunctionName",
    "Enabled",
    "BatchSize",
    "MaximumBatchingWindowInSeconds",
    "ParallelizationFactor",
    "FilterCriteria",
    "ScalingConfig",
    "DestinationConfig",
    "MaximumRecordAgeInSeconds",
    "BisectBatchOnFunctionError",
    "MaximumRetryAttempts",
    "SourceAccessConfigurations",
    "FunctionResponseTypes",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FilterCriteria {
    #[serde(default)]
    pub filters: Vec<FilterPattern>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FilterPattern {
    #[serde(default)]
    pub pattern: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScalingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OnFailure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceAccess {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "URI")]
    pub uri: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SelfManagedEventSource {
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KafkaEventSourceConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group_id: Option<String>,
}

/// An API-created mapping as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Record {
    #[serde(rename = "UUID")]
    pub uuid: String,
    pub spec: Spec,
    /// Epoch seconds of the last change.
    pub last_modified: f64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// An error as Lambda sends it: the status, `x-amzn-ErrorType` and
/// `{"Type": "User", "Message": ...}` (botocore reads the code from the header).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl AwsError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message,
        )
    }

    pub fn not_found(uuid: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("The resource you requested does not exist. (Service: Lambda, UUID: {uuid})"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "ResourceConflictException", message)
    }

    pub fn service(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            message,
        )
    }
}

impl IntoResponse for AwsError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "Service"
        } else {
            "User"
        };
        let mut r = (
            self.status,
            axum::Json(json!({"Type": kind, "Message": self.message, "message": self.message})),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(self.code) {
            r.headers_mut().insert("x-amzn-ErrorType", v);
        }
        r
    }
}

/// A mapping's state as AWS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsState {
    Creating,
    Enabling,
    Enabled,
    Disabling,
    Disabled,
    Updating,
    Deleting,
}

impl AwsState {
    pub fn as_str(self) -> &'static str {
        match self {
            AwsState::Creating => "Creating",
            AwsState::Enabling => "Enabling",
            AwsState::Enabled => "Enabled",
            AwsState::Disabling => "Disabling",
            AwsState::Disabled => "Disabled",
            AwsState::Updating => "Updating",
            AwsState::Deleting => "Deleting",
        }
    }
}

/// The kind of source a Spec names, for what its response holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqs,
    Kafka,
    Mq,
    /// A TOML-only kind (schedule): the common fields only.
    Other,
}

/// What a response says beyond the spec.
pub struct Shown<'a> {
    pub uuid: &'a str,
    pub mapping_arn: String,
    pub function_arn: String,
    pub kind: Kind,
    pub state: AwsState,
    pub reason: &'a str,
    pub last_processing_result: String,
    pub last_modified: f64,
    /// The defaults of the source (batch size, window in seconds).
    pub batch_size: u32,
    pub window: u32,
}

/// `EventSourceMappingConfiguration` for `spec`: the fields AWS returns for its kind of
/// source, with AWS's defaults for those it always returns.
pub fn render(spec: &Spec, s: &Shown) -> Value {
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    put("UUID", json!(s.uuid));
    put("EventSourceMappingArn", json!(s.mapping_arn));
    put("FunctionArn", json!(s.function_arn));
    put("BatchSize", json!(spec.batch_size.unwrap_or(s.batch_size)));
    put(
        "MaximumBatchingWindowInSeconds",
        json!(spec.maximum_batching_window_in_seconds.unwrap_or(s.window)),
    );
    put("LastModified", json!(s.last_modified));
    put("State", json!(s.state.as_str()));
    put("StateTransitionReason", json!(s.reason));
    put(
        "FunctionResponseTypes",
        json!(spec.function_response_types.clone().unwrap_or_default()),
    );
    if let Some(f) = &spec.filter_criteria {
        put("FilterCriteria", json!(f));
    }
    if let Some(a) = &spec.event_source_arn {
        put("EventSourceArn", json!(a));
    }
    if let Some(d) = &spec.destination_config {
        put("DestinationConfig", json!(d));
    }
    for (key, value) in [
        (
            "MaximumRetryAttempts",
            spec.maximum_retry_attempts.map(Value::from),
        ),
        (
            "MaximumRecordAgeInSeconds",
            spec.maximum_record_age_in_seconds.map(Value::from),
        ),
        (
            "BisectBatchOnFunctionError",
            spec.bisect_batch_on_function_error.map(Value::from),
        ),
    ] {
        if let Some(v) = value
            && s.kind != Kind::Sqs
        {
            put(key, v);
        }
    }
    match s.kind {
        Kind::Sqs => {
            if let Some(c) = &spec.scaling_config {
                put("ScalingConfig", json!(c));
            }
        }
        Kind::Kafka => {
            put(
                "StartingPosition",
                json!(spec.starting_position.as_deref().unwrap_or("LATEST")),
            );
            if let Some(t) = spec.starting_position_timestamp {
                put("StartingPositionTimestamp", json!(t));
            }
            put("Topics", json!(spec.topics.clone().unwrap_or_default()));
            put(
                "SelfManagedEventSource",
                json!(spec.self_managed_event_source),
            );
            // AWS's default consumer group is the mapping's UUID.
            let group = spec
                .self_managed_kafka_event_source_config
                .as_ref()
                .and_then(|c| c.consumer_group_id.as_deref())
                .unwrap_or(s.uuid);
            put(
                "SelfManagedKafkaEventSourceConfig",
                json!({ "ConsumerGroupId": group }),
            );
            if let Some(p) = spec.parallelization_factor {
                put("ParallelizationFactor", json!(p));
            }
            put("LastProcessingResult", json!(s.last_processing_result));
        }
        Kind::Mq => {
            put("Queues", json!(spec.queues.clone().unwrap_or_default()));
            put("LastProcessingResult", json!(s.last_processing_result));
        }
        Kind::Other => {
            put("LastProcessingResult", json!(s.last_processing_result));
        }
    }
    if let Some(a) = &spec.source_access_configurations
        && s.kind != Kind::Sqs
    {
        put("SourceAccessConfigurations", json!(a));
    }
    Value::Object(out)
}
