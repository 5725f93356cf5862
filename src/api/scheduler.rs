//! EventBridge Scheduler's API (botocore's `scheduler/2021-06-30`) on the same listener,
//! for schedule mappings: `CreateSchedule`, `GetSchedule`, `UpdateSchedule`,
//! `ListSchedules` and `DeleteSchedule` in the default group, with a Lambda function as
//! the target. A schedule becomes the `type = "schedule"` mapping the file would write,
//! kept in its own state file: `Target.RetryPolicy` is its `[mapping.retry]`, and
//! `Target.DeadLetterConfig` (an SQS queue ARN, or a TOML `[[destination]]` as
//! `esm-gateway:destination:<name>`) its on-failure destination.

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
pub(super) fn mapping_name(name: &str) -> String {
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

/// `p[field]` as an integer within `range`, if given.
fn bounded(
    p: &Value,
    field: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<Option<i64>, AwsError> {
    match &p[field] {
        Value::Null => Ok(None),
        v => v
            .as_i64()
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or_else(|| {
                validation(format!(
                    "Target.RetryPolicy.{field} must be an integer between {} and {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
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
    if let Some(p) = target.get("RetryPolicy").filter(|p| !p.is_null()) {
        // Scheduler's own limits (botocore's model), refused as Scheduler refuses them.
        if let Some(n) = bounded(p, "MaximumRetryAttempts", 0..=185)? {
            retry.insert("max_attempts".into(), toml::Value::Integer(n));
        }
        if let Some(a) = bounded(p, "MaximumEventAgeInSeconds", 60..=86_400)? {
            retry.insert("max_record_age".into(), string(&format!("{a}s")));
        }
    }
    let dead_letter = match target.get("DeadLetterConfig").filter(|d| !d.is_null()) {
        None => None,
        Some(d) => {
            let arn = d["Arn"]
                .as_str()
                .ok_or_else(|| validation("Target.DeadLetterConfig.Arn is required"))?;
            let env = super::handlers::context(&api.runtime.config());
            Some(
                super::convert::dead_letter_queue(arn, &env.as_context())
                    .map_err(|e| validation(format!("Target.DeadLetterConfig.Arn: {e}")))?,
            )
        }
    };
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
    mapping.on_failure = dead_letter;
    api.runtime
        .config()
        .check_mapping(&mut mapping)
        .map_err(|p| validation(p.join("; ")))?;
    Ok(mapping)
}

/// The request of CreateSchedule or UpdateSchedule without the fields that are not the
/// schedule's (its name is the path's), and the mapping it describes.
fn parse(
    api: &Api,
    name: &str,
    body: &[u8],
) -> Result<(serde_json::Map<String, Value>, Mapping), AwsError> {
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
    Ok((request, m))
}

pub async fn create(api: &Api, name: &str, body: &[u8]) -> Answer {
    let (request, m) = parse(api, name, body)?;
    let _guard = api.change().await?;
    super::handlers::check_exclusive(api, &m)?;
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
    apply(api, record, None, m).await?;
    tracing::info!(schedule = %name, "schedule created through the Scheduler API");
    Ok(Json(json!({ "ScheduleArn": arn(api, name) })).into_response())
}

/// Keeps `record` in the store, then has the runtime run `m`; if the runtime refuses,
/// the store goes back to `previous` (none: the record is removed).
async fn apply(
    api: &Api,
    record: ScheduleRecord,
    previous: Option<ScheduleRecord>,
    m: Mapping,
) -> Result<(), AwsError> {
    let name = record.name.clone();
    api.schedules.put(record).await?;
    if let Err(e) = api.runtime.put_mapping(m).await {
        let _ = match previous {
            Some(p) => api.schedules.put(p).await,
            None => api.schedules.remove(&name).await.map(drop),
        };
        return Err(AwsError::service(e.to_string()));
    }
    Ok(())
}

/// UpdateSchedule: as on AWS, the request replaces the whole schedule (fields it leaves
/// out take their defaults); the runtime restarts the mapping with it.
pub async fn update(api: &Api, name: &str, body: &[u8]) -> Answer {
    let (request, m) = parse(api, name, body)?;
    let _guard = api.change().await?;
    super::handlers::check_exclusive(api, &m)?;
    let previous = api.schedules.get(name).ok_or_else(|| not_found(name))?;
    let record = ScheduleRecord {
        request,
        last_modification_date: now(),
        ..previous.clone()
    };
    apply(api, record, Some(previous), m).await?;
    tracing::info!(schedule = %name, "schedule updated through the Scheduler API");
    Ok(Json(json!({ "ScheduleArn": arn(api, name) })).into_response())
}

/// The state a stored request gives its schedule.
fn state(request: &serde_json::Map<String, Value>) -> &str {
    request
        .get("State")
        .and_then(Value::as_str)
        .unwrap_or("ENABLED")
}

/// ListSchedules: by name, filtered by `NamePrefix` and `State`, in pages of
/// `MaxResults` (1-100, default 100) whose `NextToken` is the last name given.
pub fn list(api: &Api, query: &std::collections::BTreeMap<String, Vec<String>>) -> Answer {
    let one = |k: &str| query.get(k).and_then(|v| v.first()).map(String::as_str);
    let max = match one("MaxResults") {
        None => 100,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=100).contains(m))
            .ok_or_else(|| validation("MaxResults must be between 1 and 100"))?,
    };
    if let Some(s) = one("State").filter(|s| !["ENABLED", "DISABLED"].contains(s)) {
        return Err(validation(format!(
            "State {s:?} is not ENABLED or DISABLED"
        )));
    }
    // Every schedule is in the default group.
    let group = one("ScheduleGroup").unwrap_or("default");
    let prefix = one("NamePrefix").unwrap_or_default();
    let after = one("NextToken");
    let matching: Vec<ScheduleRecord> = api
        .schedules
        .all()
        .into_iter()
        .filter(|r| group == "default" && r.name.starts_with(prefix))
        .filter(|r| one("State").is_none_or(|s| s == state(&r.request)))
        .filter(|r| after.is_none_or(|a| r.name.as_str() > a))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .take(max)
        .map(|r| {
            json!({
                "Arn": arn(api, &r.name),
                "Name": r.name,
                "GroupName": "default",
                "State": state(&r.request),
                "CreationDate": r.creation_date,
                "LastModificationDate": r.last_modification_date,
                "Target": { "Arn": r.request.get("Target").map(|t| t["Arn"].clone()) },
            })
        })
        .collect();
    let mut out = json!({ "Schedules": page });
    if matching.len() > max {
        out["NextToken"] = json!(matching[max - 1].name);
    }
    Ok(Json(out).into_response())
}

pub fn get(api: &Api, name: &str) -> Answer {
    let r = api.schedules.get(name).ok_or_else(|| not_found(name))?;
    let mut out = r.request.clone();
    out.insert("Name".into(), json!(r.name));
    out.insert("Arn".into(), json!(arn(api, name)));
    out.insert("GroupName".into(), json!("default"));
    out.insert("State".into(), json!(state(&r.request)));
    out.insert("CreationDate".into(), json!(r.creation_date));
    out.insert(
        "LastModificationDate".into(),
        json!(r.last_modification_date),
    );
    Ok(Json(Value::Object(out)).into_response())
}

pub async fn delete(api: &Api, name: &str) -> Answer {
    let _guard = api.change().await?;
    if api.schedules.remove(name).await?.is_none() {
        return Err(not_found(name));
    }
    match api.runtime.remove_mapping(&mapping_name(name)).await {
        Ok(()) | Err(crate::runtime::ControlError::NotFound(_)) => {}
        Err(e) => return Err(AwsError::service(e.to_string())),
    }
    tracing::info!(schedule = %name, "schedule deleted through the Scheduler API");
    Ok(Json(json!({})).into_response())
}
