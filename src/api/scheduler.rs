//! EventBridge Scheduler's API (botocore's `scheduler/2021-06-30`) on the same listener,
//! for schedule mappings: `CreateSchedule`, `GetSchedule` and `DeleteSchedule` in the
//! default group, with a Lambda function as the target. A schedule becomes the
//! `type = "schedule"` mapping the file would write, kept in its own state file.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Table;

use super::store::Keyed;
use super::wire::AwsError;
use super::{Api, now};
use crate::config::Mapping;

/// The schedules' file in the state directory.
pub const FILE: &str = "api-schedules.json";

/// A schedule as its state file keeps it: the request as sent (no credentials).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleRecord {
    pub name: String,
    pub request: serde_json::Map<String, Value>,
    pub creation_date: f64,
    pub last_modification_date: f64,
}

impl Keyed for ScheduleRecord {
    fn key(&self) -> &str {
        &self.name
    }
}

type Answer = Result<Response, AwsError>;

fn validation(message: impl Into<String>) -> AwsError {
    AwsError::new(StatusCode::BAD_REQUEST, "ValidationException", message)
}

fn not_found(name: &str) -> AwsError {
    AwsError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!("Schedule {name} does not exist."),
    )
}

/// The runtime's name of schedule `name`.
fn mapping_name(name: &str) -> String {
    format!(
        "schedule-{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
    )
}

fn arn(api: &Api, name: &str) -> String {
    let env = super::handlers::context(&api.runtime.config());
    format!(
        "arn:aws:scheduler:{}:{}:schedule/default/{name}",
        env.region,
        env.config.account_id()
    )
}

fn rfc3339(epoch: &Value) -> Result<String, AwsError> {
    epoch
        .as_f64()
        .and_then(|t| chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64))
        .map(|t| t.to_rfc3339())
        .ok_or_else(|| validation("StartDate and EndDate must be timestamps"))
}

fn string(s: &str) -> toml::Value {
    toml::Value::String(s.replace("${", "$${"))
}

/// The mapping a schedule request describes, checked as the file's are.
pub fn mapping(
    api: &Api,
    name: &str,
    r: &serde_json::Map<String, Value>,
) -> Result<Mapping, AwsError> {
    let get = |k: &str| r.get(k).filter(|v| !v.is_null());
    let target = get("Target").ok_or_else(|| validation("Target is required"))?;
    let function = target["Arn"]
        .as_str()
        .filter(|a| a.split(':').nth(2) == Some("lambda"))
        .ok_or_else(|| validation("Target.Arn must be a Lambda function ARN"))?;
    let expression = get("ScheduleExpression")
        .and_then(Value::as_str)
        .ok_or_else(|| validation("ScheduleExpression is required"))?;
    let mut source = Table::new();
    source.insert("type".into(), string("schedule"));
    source.insert("expression".into(), string(expression));
    if let Some(tz) = get("ScheduleExpressionTimezone").and_then(Value::as_str) {
        source.insert("timezone".into(), string(tz));
    }
    for (field, key) in [("StartDate", "start"), ("EndDate", "end")] {
        if let Some(t) = get(field) {
            source.insert(key.into(), string(&rfc3339(t)?));
        }
    }
    let window =
        get("FlexibleTimeWindow").ok_or_else(|| validation("FlexibleTimeWindow is required"))?;
    if window["Mode"] == "FLEXIBLE" {
        let minutes = window["MaximumWindowInMinutes"].as_u64().ok_or_else(|| {
            validation("FlexibleTimeWindow.MaximumWindowInMinutes is required with Mode FLEXIBLE")
        })?;
        source.insert("flexible_window".into(), string(&format!("{minutes}m")));
    }
    if let Some(input) = target.get("Input").and_then(Value::as_str) {
        source.insert("input".into(), string(input));
    }
    let mut retry = Table::new();
    if let Some(p) = target.get("RetryPolicy") {
        if let Some(n) = p["MaximumRetryAttempts"].as_i64() {
            retry.insert("max_attempts".into(), toml::Value::Integer(n));
        }
        if let Some(a) = p["MaximumEventAgeInSeconds"].as_i64() {
            retry.insert("max_record_age".into(), string(&format!("{a}s")));
        }
    }
    if target.get("DeadLetterConfig").is_some_and(|d| !d.is_null()) {
        return Err(validation(
            "Target.DeadLetterConfig is not supported by the gateway yet",
        ));
    }
    let mut m = Table::new();
    m.insert("name".into(), string(&mapping_name(name)));
    m.insert("function".into(), string(function));
    m.insert(
        "enabled".into(),
        toml::Value::Boolean(get("State").and_then(Value::as_str) != Some("DISABLED")),
    );
    m.insert("retry".into(), toml::Value::Table(retry));
    m.insert("source".into(), toml::Value::Table(source));
    let mut mapping: Mapping = toml::Value::Table(m)
        .try_into()
        .map_err(|e: toml::de::Error| validation(e.message().to_owned()))?;
    api.runtime
        .config()
        .check_mapping(&mut mapping)
        .map_err(|p| validation(p.join("; ")))?;
    Ok(mapping)
}

pub async fn create(api: &Api, name: &str, body: &[u8]) -> Answer {
    let mut request = super::handlers::object(body)?;
    request.remove("Name");
    request.remove("ClientToken");
    if request
        .get("GroupName")
        .and_then(Value::as_str)
        .is_some_and(|g| g != "default")
    {
        return Err(validation("only the default schedule group is supported"));
    }
    let m = mapping(api, name, &request)?;
    let _guard = api.changes.lock().await;
    if api.schedules.get(name).is_some() {
        return Err(AwsError::new(
            StatusCode::CONFLICT,
            "ConflictException",
            format!("Schedule {name} already exists."),
        ));
    }
    let t = now();
    let record = ScheduleRecord {
        name: name.to_owned(),
        request,
        creation_date: t,
        last_modification_date: t,
    };
    api.schedules
        .put(record)
        .map_err(|e| AwsError::service(e.to_string()))?;
    if let Err(e) = api.runtime.put_mapping(m).await {
        let _ = api.schedules.remove(name);
        return Err(AwsError::service(e.to_string()));
    }
    tracing::info!(schedule = %name, "schedule created through the Scheduler API");
    Ok(Json(json!({ "ScheduleArn": arn(api, name) })).into_response())
}

pub fn get(api: &Api, name: &str) -> Answer {
    let r = api.schedules.get(name).ok_or_else(|| not_found(name))?;
    let mut out = r.request.clone();
    out.insert("Name".into(), json!(r.name));
    out.insert("Arn".into(), json!(arn(api, name)));
    out.insert("GroupName".into(), json!("default"));
    out.entry("State").or_insert(json!("ENABLED"));
    out.insert("CreationDate".into(), json!(r.creation_date));
    out.insert(
        "LastModificationDate".into(),
        json!(r.last_modification_date),
    );
    Ok(Json(Value::Object(out)).into_response())
}

pub async fn delete(api: &Api, name: &str) -> Answer {
    let _guard = api.changes.lock().await;
    if api
        .schedules
        .remove(name)
        .map_err(|e| AwsError::service(e.to_string()))?
        .is_none()
    {
        return Err(not_found(name));
    }
    match api.runtime.remove_mapping(&mapping_name(name)).await {
        Ok(()) | Err(crate::runtime::ControlError::NotFound(_)) => {}
        Err(e) => return Err(AwsError::service(e.to_string())),
    }
    tracing::info!(schedule = %name, "schedule deleted through the Scheduler API");
    Ok(Json(json!({})).into_response())
}
