//! The operations: each takes the request's parts that matter, answers with Lambda's
//! status and body, and changes the store and the runtime in that order (a change the
//! store cannot keep is refused before it runs).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::convert::{self, Context};
use super::wire::{AwsError, AwsState, Kind, Record, Shown, Spec, UPDATABLE, render};
use super::{Api, now};
use crate::config::{Config, DestinationConfig, Mapping};
use crate::invoke::lambda::FunctionRef;
use crate::runtime::ControlError;
use crate::status::State;

type Answer = Result<Response, AwsError>;

/// The namespace of the UUIDs of the file's mappings (v5, over their names).
const FILE_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_5e2a_8d3b_4c47_9a0e_2b1d_7c3f_5a19);

/// The stable UUID of the file's mapping `name`.
pub fn file_uuid(name: &str) -> String {
    uuid::Uuid::new_v5(&FILE_NAMESPACE, name.as_bytes()).to_string()
}

/// The configuration with the region the API's ARNs are in.
pub struct Env {
    pub config: Arc<Config>,
    pub region: String,
}

impl Env {
    pub fn as_context(&self) -> Context<'_> {
        Context {
            config: &self.config,
            region: &self.region,
            account: self.config.account_id(),
        }
    }
}

pub fn context(config: &Arc<Config>) -> Env {
    let region = config
        .aws
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_owned());
    Env {
        config: config.clone(),
        region,
    }
}

/// A mapping as the API sees it: the file's or the store's.
struct Entry {
    uuid: String,
    /// Its name in the runtime (the UUID for the API's).
    name: String,
    spec: Spec,
    file: bool,
    last_modified: f64,
}

fn entries(api: &Api, env: &Env) -> Vec<Entry> {
    let cx = env.as_context();
    let mut out: Vec<Entry> = env
        .config
        .mappings
        .iter()
        .map(|m| Entry {
            uuid: file_uuid(&m.name),
            name: m.name.clone(),
            spec: convert::describe(m, &cx),
            file: true,
            last_modified: api.started,
        })
        .chain(api.store.all().into_iter().map(|r| Entry {
            name: r.uuid.clone(),
            uuid: r.uuid,
            spec: r.spec,
            file: false,
            last_modified: r.last_modified,
        }))
        .collect();
    out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    out
}

fn find(api: &Api, env: &Env, uuid: &str) -> Result<Entry, AwsError> {
    entries(api, env)
        .into_iter()
        .find(|e| e.uuid == uuid)
        .ok_or_else(|| AwsError::not_found(uuid))
}

fn function_arn(name: &str, env: &Env) -> String {
    FunctionRef::parse(name).map_or_else(
        |_| name.to_owned(),
        |f| f.arn(&env.region, env.config.account_id()),
    )
}

fn mapping_arn(uuid: &str, env: &Env) -> String {
    format!(
        "arn:aws:lambda:{}:{}:event-source-mapping:{uuid}",
        env.region,
        env.config.account_id()
    )
}

/// The response for `e`, in `state` when given (the operation's own), else as its
/// status says.
fn show(api: &Api, env: &Env, e: &Entry, state: Option<AwsState>) -> Value {
    let status = api
        .runtime
        .mappings()
        .into_iter()
        .find(|m| m.name == e.name)
        .map(|m| m.snapshot());
    let (observed, result) = match &status {
        None => (AwsState::Creating, "No records processed".to_owned()),
        Some(s) => {
            let state = match (s.state, s.enabled) {
                (State::Disabled, _) => AwsState::Disabled,
                (State::Starting, _) => AwsState::Enabling,
                (State::Draining, false) => AwsState::Disabling,
                (State::Draining, true) => AwsState::Updating,
                (State::Running | State::Failed, _) => AwsState::Enabled,
            };
            let result = match (s.state, &s.last_error, s.last_success) {
                (State::Failed, Some(err), _) => format!("PROBLEM: {err}"),
                (_, _, Some(_)) => "OK".to_owned(),
                _ => "No records processed".to_owned(),
            };
            (state, result)
        }
    };
    let kind = convert::kind(&e.spec);
    let defaults = match kind {
        Kind::Sqs => crate::source::sqs::config::DEFAULTS,
        Kind::Kafka | Kind::Mq | Kind::Other => crate::source::STREAM_DEFAULTS,
    };
    render(
        &e.spec,
        &Shown {
            uuid: &e.uuid,
            mapping_arn: mapping_arn(&e.uuid, env),
            function_arn: function_arn(&e.spec.function_name, env),
            kind,
            state: state.unwrap_or(observed),
            reason: "USER_INITIATED",
            last_processing_result: result,
            last_modified: e.last_modified,
            batch_size: defaults.batch_size as u32,
            window: defaults.batch_window.as_secs() as u32,
        },
    )
}

/// Refuses `m` when another mapping (the file's or the API's) already parks into its
/// on-failure file: two writers would rotate each other's records, and a redrive would
/// replay them into the wrong function.
pub(super) fn check_exclusive(api: &Api, m: &Mapping) -> Result<(), AwsError> {
    let Some(path) = m
        .on_failure
        .as_ref()
        .and_then(DestinationConfig::exclusive_path)
    else {
        return Ok(());
    };
    let config = api.runtime.config();
    let parks_there = |o: &Mapping| {
        o.name != m.name
            && o.on_failure
                .as_ref()
                .and_then(DestinationConfig::exclusive_path)
                == Some(path)
    };
    let other = config
        .mappings
        .iter()
        .find(|o| parks_there(o))
        .map(|o| o.name.clone())
        .or_else(|| {
            api.mappings()
                .into_iter()
                .find(|o| parks_there(o))
                .map(|o| o.name)
        });
    match other {
        None => Ok(()),
        Some(other) => Err(AwsError::conflict(format!(
            "the mapping {other} already parks its failed records into the file {}; a file destination takes one mapping's records",
            path.display()
        ))),
    }
}

fn control_error(e: ControlError) -> AwsError {
    match e {
        ControlError::NotFound(name) => AwsError::not_found(&name),
        ControlError::Busy(_) => AwsError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            e.to_string(),
        ),
        other => AwsError::service(other.to_string()),
    }
}

/// The request body as a JSON object, refusing `${` anywhere: the gateway expands it
/// from its environment in configuration values, and a request must not read that.
pub(super) fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, AwsError> {
    let value: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| AwsError::invalid(format!("the request body is not JSON: {e}")))?
    };
    fn has_expansion(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains("${"),
            Value::Array(a) => a.iter().any(has_expansion),
            Value::Object(o) => o.iter().any(|(k, v)| k.contains("${") || has_expansion(v)),
            _ => false,
        }
    }
    if has_expansion(&value) {
        return Err(AwsError::invalid("values must not contain \"${\""));
    }
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(AwsError::invalid("the request body must be a JSON object")),
    }
}

fn spec_of(o: serde_json::Map<String, Value>) -> Result<Spec, AwsError> {
    serde_json::from_value(Value::Object(o)).map_err(|e| AwsError::invalid(e.to_string()))
}

fn tags_of(v: Option<Value>) -> Result<BTreeMap<String, String>, AwsError> {
    v.map_or(Ok(BTreeMap::new()), |t| {
        serde_json::from_value(t).map_err(|e| AwsError::invalid(format!("Tags: {e}")))
    })
}

pub async fn create(api: &Api, body: &[u8]) -> Answer {
    let mut o = object(body)?;
    let tags = tags_of(o.remove("Tags"))?;
    let spec = spec_of(o)?;
    let env = context(&api.runtime.config());
    let uuid = uuid::Uuid::new_v4().to_string();
    let mapping = convert::mapping(&uuid, &spec, &env.as_context()).map_err(AwsError::invalid)?;
    let _guard = api.change().await?;
    check_exclusive(api, &mapping)?;
    let arn = function_arn(&spec.function_name, &env);
    if let Some(other) = entries(api, &env).into_iter().find(|e| {
        e.spec.event_source_arn.is_some()
            && e.spec.event_source_arn == spec.event_source_arn
            && function_arn(&e.spec.function_name, &env) == arn
    }) {
        return Err(AwsError::conflict(format!(
            "An event source mapping with event source ({}), function ({arn}) already exists. Please update or delete the existing mapping with UUID {}",
            spec.event_source_arn.as_deref().unwrap_or_default(),
            other.uuid
        )));
    }
    let record = Record {
        uuid: uuid.clone(),
        spec,
        last_modified: now(),
        tags,
    };
    api.store.put(record.clone()).await?;
    if let Err(e) = api.runtime.put_mapping(mapping).await {
        let _ = api.store.remove(&uuid).await;
        return Err(control_error(e));
    }
    tracing::info!(uuid = %uuid, function = %arn, "event source mapping created through the API");
    let entry = Entry {
        name: uuid.clone(),
        uuid,
        spec: record.spec,
        file: false,
        last_modified: record.last_modified,
    };
    let view = show(api, &env, &entry, Some(AwsState::Creating));
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

pub fn get(api: &Api, uuid: &str) -> Answer {
    let env = context(&api.runtime.config());
    let e = find(api, &env, uuid)?;
    Ok(Json(show(api, &env, &e, None)).into_response())
}

pub fn list(api: &Api, query: &BTreeMap<String, Vec<String>>) -> Answer {
    let env = context(&api.runtime.config());
    let one = |k: &str| query.get(k).and_then(|v| v.first()).map(String::as_str);
    let function = one("FunctionName").map(|f| function_arn(f, &env));
    let source = one("EventSourceArn");
    let max = match one("MaxItems") {
        None => 100,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=10_000).contains(m))
            .ok_or_else(|| AwsError::invalid("MaxItems must be between 1 and 10000"))?,
    };
    let marker = one("Marker");
    let matching: Vec<Entry> = entries(api, &env)
        .into_iter()
        .filter(|e| {
            function
                .as_ref()
                .is_none_or(|f| *f == function_arn(&e.spec.function_name, &env))
        })
        .filter(|e| source.is_none_or(|s| e.spec.event_source_arn.as_deref() == Some(s)))
        .filter(|e| marker.is_none_or(|m| e.uuid.as_str() > m))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .take(max)
        .map(|e| show(api, &env, e, None))
        .collect();
    let mut out = json!({"EventSourceMappings": page});
    if matching.len() > max {
        out["NextMarker"] = json!(matching[max - 1].uuid);
    }
    Ok(Json(out).into_response())
}

pub async fn update(api: &Api, uuid: &str, body: &[u8]) -> Answer {
    let o = object(body)?;
    if let Some(k) = o.keys().find(|k| !UPDATABLE.contains(&k.as_str())) {
        return Err(AwsError::invalid(format!(
            "{k} cannot be changed by UpdateEventSourceMapping"
        )));
    }
    let env = context(&api.runtime.config());
    let _guard = api.change().await?;
    let e = find(api, &env, uuid)?;
    if e.file {
        if let Some(k) = o.keys().find(|k| k.as_str() != "Enabled") {
            return Err(read_only(api, &e.name, k));
        }
        if let Some(enabled) = o.get("Enabled").and_then(Value::as_bool) {
            api.runtime
                .set_enabled(&e.name, enabled)
                .await
                .map_err(control_error)?;
        }
        let view = show(api, &env, &e, None);
        return Ok((StatusCode::ACCEPTED, Json(view)).into_response());
    }
    let mut merged = match serde_json::to_value(&e.spec) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("a spec is an object"),
    };
    for (k, v) in o {
        if v.is_null() {
            merged.remove(&k);
        } else {
            merged.insert(k, v);
        }
    }
    let spec = spec_of(merged)?;
    let mapping = convert::mapping(uuid, &spec, &env.as_context()).map_err(AwsError::invalid)?;
    check_exclusive(api, &mapping)?;
    let previous = api
        .store
        .get(uuid)
        .ok_or_else(|| AwsError::not_found(uuid))?;
    let record = Record {
        spec,
        last_modified: now(),
        ..previous.clone()
    };
    api.store.put(record.clone()).await?;
    if let Err(e) = api.runtime.put_mapping(mapping).await {
        let _ = api.store.put(previous).await;
        return Err(control_error(e));
    }
    tracing::info!(uuid = %uuid, "event source mapping updated through the API");
    let entry = Entry {
        spec: record.spec,
        last_modified: record.last_modified,
        ..e
    };
    let view = show(api, &env, &entry, Some(AwsState::Updating));
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

fn read_only(api: &Api, name: &str, field: &str) -> AwsError {
    AwsError::conflict(format!(
        "The event source mapping {name:?} is defined in the configuration file {}; change it there ({field} is read-only through the API; only Enabled can be changed)",
        api.config_path.display()
    ))
}

pub async fn delete(api: &Api, uuid: &str) -> Answer {
    let env = context(&api.runtime.config());
    let _guard = api.change().await?;
    let e = find(api, &env, uuid)?;
    if e.file {
        return Err(read_only(api, &e.name, "the mapping"));
    }
    let view = show(api, &env, &e, Some(AwsState::Deleting));
    api.store.remove(uuid).await?;
    match api.runtime.remove_mapping(uuid).await {
        Ok(()) | Err(ControlError::NotFound(_)) => {}
        Err(e) => return Err(control_error(e)),
    }
    tracing::info!(uuid = %uuid, "event source mapping deleted through the API");
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// The store's record an event source mapping ARN names.
fn tagged(api: &Api, arn: &str) -> Result<Record, AwsError> {
    let Some((_, uuid)) = arn.split_once(":event-source-mapping:") else {
        return Err(AwsError::invalid(format!(
            "{arn} is not an event source mapping ARN; only mappings are tagged here"
        )));
    };
    if let Some(r) = api.store.get(uuid) {
        return Ok(r);
    }
    let env = context(&api.runtime.config());
    match find(api, &env, uuid) {
        Ok(e) => Err(read_only(api, &e.name, "Tags")),
        Err(e) => Err(e),
    }
}

pub fn list_tags(api: &Api, arn: &str) -> Answer {
    let tags = match tagged(api, arn) {
        Ok(r) => r.tags,
        // The file's mappings have no tags.
        Err(e) if e.code == "ResourceConflictException" => BTreeMap::new(),
        Err(e) => return Err(e),
    };
    Ok(Json(json!({ "Tags": tags })).into_response())
}

pub async fn tag(api: &Api, arn: &str, body: &[u8]) -> Answer {
    let mut o = object(body)?;
    let tags = tags_of(o.remove("Tags"))?;
    let _guard = api.change().await?;
    let mut r = tagged(api, arn)?;
    r.tags.extend(tags);
    api.store.put(r).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn untag(api: &Api, arn: &str, query: &BTreeMap<String, Vec<String>>) -> Answer {
    let _guard = api.change().await?;
    let mut r = tagged(api, arn)?;
    for k in query.get("tagKeys").into_iter().flatten() {
        r.tags.remove(k);
    }
    api.store.put(r).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
