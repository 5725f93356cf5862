//! The Lambda-compatible event source mapping API: `CreateEventSourceMapping`, `List`,
//! `Get`, `Update`, `Delete` and the tag operations of AWS Lambda's REST API
//! (botocore's `lambda/2015-03-31` model), so that the AWS CLI, the SDKs and Terraform
//! manage the gateway's mappings. Served on its own listener (`[api] listen`, loopback
//! by default; HTTPS with `[api] cert_file` and `key_file`, `tls.rs`); every request
//! must be SigV4-signed with a key pair of `[[api.key]]` (`sigv4.rs`), and a refused one
//! changes nothing.
//!
//! A request's AWS fields ([`wire::Spec`]) become the same [`Mapping`](crate::config::Mapping)
//! a `[[mapping]]` table would (`convert.rs`), named by the mapping's UUID and run by the
//! runtime beside the file's; they are kept in the state file, or in PostgreSQL with
//! `[api] store` (`store/`), and come back at the next start. Replicas sharing a
//! PostgreSQL store follow each other's changes (`shared.rs`). The file's mappings are
//! listed too, under UUIDs derived from their names, and are read-only here except for
//! `Enabled`. EventBridge Scheduler's schedule operations are served beside them
//! (`scheduler.rs`), for schedule mappings.

mod brokers;
mod convert;
mod handlers;
pub mod scheduler;
mod shared;
pub mod sigv4;
pub mod store;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::config::{ApiConfig, Mapping};
use crate::runtime::Handle;
use store::Store;
use store::postgres::{self, Db};
use wire::AwsError;

/// Largest request body the API reads.
const MAX_BODY: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub runtime: Handle,
    pub store: Arc<Store>,
    /// The Scheduler API's schedules, by name.
    pub schedules: Arc<Store<scheduler::ScheduleRecord>>,
    /// Serialises changes, so that the store and the runtime see them in one order.
    pub changes: Arc<tokio::sync::Mutex<()>>,
    /// When the process started: the `LastModified` of the file's mappings.
    pub started: f64,
    /// The configuration file, named when a request would change one of its mappings.
    pub config_path: std::path::PathBuf,
}

impl Api {
    /// The API of `runtime`, keeping its mappings and schedules where `config` says:
    /// in `state_dir`, or in the PostgreSQL `store`, whose changes by other replicas it
    /// then follows (on a task of its own, for as long as the process runs).
    pub async fn open(
        runtime: Handle,
        config: &ApiConfig,
        config_path: std::path::PathBuf,
    ) -> Result<Api, store::StoreError> {
        let db = config.store.as_ref().map(|url| Arc::new(Db::new(url)));
        let (mappings, schedules) = match &db {
            None => (
                Store::open(&config.state_dir)?,
                Store::open_file(&config.state_dir, scheduler::FILE)?,
            ),
            Some(db) => (
                Store::open_postgres(db.clone(), postgres::MAPPINGS).await?,
                Store::open_postgres(db.clone(), postgres::SCHEDULES).await?,
            ),
        };
        let api = Api {
            runtime,
            store: Arc::new(mappings),
            schedules: Arc::new(schedules),
            changes: Arc::default(),
            started: now(),
            config_path,
        };
        if let Some(db) = db {
            tokio::spawn(shared::follow(api.clone(), db, config.store_refresh));
        }
        Ok(api)
    }

    /// Starts a change: holds [`Api::changes`] until the guard drops, having applied
    /// first what other replicas sharing the store changed, so that a change builds on
    /// the latest set (a file store has nothing to read). An unreachable store refuses
    /// the change here.
    async fn change(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, AwsError> {
        let guard = self.changes.lock().await;
        shared::catch_up(self).await?;
        Ok(guard)
    }

    /// The stored mappings as the runtime runs them; a record that no longer converts
    /// (its broker was removed from the file) is logged and left out.
    pub fn mappings(&self) -> Vec<Mapping> {
        let config = self.runtime.config();
        let env = handlers::context(&config);
        let cx = env.as_context();
        self.store
            .all()
            .iter()
            .filter_map(|r| match convert::mapping(&r.uuid, &r.spec, &cx) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(uuid = %r.uuid, error = %e, "an API mapping no longer fits the configuration; it does not run");
                    None
                }
            })
            .chain(self.schedules.all().iter().filter_map(|r| {
                scheduler::mapping(self, &r.name, &r.request)
                    .inspect_err(|e| tracing::error!(schedule = %r.name, error = %e.message, "a schedule no longer fits the configuration; it does not run"))
                    .ok()
            }))
            .collect()
    }
}

/// Seconds since the epoch, as rest-json timestamps are.
pub fn now() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}

/// Serves the API on `listener` until the process exits, over TLS with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Api,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let app = axum::Router::new().fallback(dispatch).with_state(api);
    match tls {
        None => crate::listen::serve(crate::listen::Capped::new(listener), app).await,
        Some(config) => crate::listen::serve(tls::TlsListener::new(listener, config)?, app).await,
    }
}

/// Verifies the signature, then routes by method and path.
async fn dispatch(State(api): State<Api>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(Body::new(body), MAX_BODY).await else {
        return AwsError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            "Request must be smaller than 1048576 bytes.",
        )
        .into_response();
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or_default();
    let signed = sigv4::Signed {
        method: parts.method.as_str(),
        path,
        query,
        headers: &headers,
        body: &body,
    };
    let keys = api.runtime.config().api.keys.clone();
    let service = if path.starts_with("/schedules") {
        "scheduler"
    } else {
        "lambda"
    };
    if let Err(refusal) = sigv4::verify(&signed, &keys, service, chrono::Utc::now()) {
        tracing::warn!(method = %parts.method, path, code = refusal.code(), "API request refused");
        return AwsError::new(StatusCode::FORBIDDEN, refusal.code(), refusal.to_string())
            .into_response();
    }
    let query = query_params(query);
    let segments: Vec<String> = path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(sigv4::decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = parts.method.as_str();
    let r = match (method, &segments[..]) {
        ("POST", ["2015-03-31", "event-source-mappings"]) => handlers::create(&api, &body).await,
        ("GET", ["2015-03-31", "event-source-mappings"]) => handlers::list(&api, &query),
        ("GET", ["2015-03-31", "event-source-mappings", uuid]) => handlers::get(&api, uuid),
        ("PUT", ["2015-03-31", "event-source-mappings", uuid]) => {
            handlers::update(&api, uuid, &body).await
        }
        ("DELETE", ["2015-03-31", "event-source-mappings", uuid]) => {
            handlers::delete(&api, uuid).await
        }
        ("GET", ["2017-03-31", "tags", arn]) => handlers::list_tags(&api, arn),
        ("POST", ["2017-03-31", "tags", arn]) => handlers::tag(&api, arn, &body).await,
        ("DELETE", ["2017-03-31", "tags", arn]) => handlers::untag(&api, arn, &query).await,
        ("POST", ["schedules", name]) => scheduler::create(&api, name, &body).await,
        ("GET", ["schedules"]) => scheduler::list(&api, &query),
        ("GET", ["schedules", name]) => scheduler::get(&api, name),
        ("PUT", ["schedules", name]) => scheduler::update(&api, name, &body).await,
        ("DELETE", ["schedules", name]) => scheduler::delete(&api, name).await,
        _ => Err(AwsError::new(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            format!("{method} {path} is not an operation of this API"),
        )),
    };
    r.unwrap_or_else(IntoResponse::into_response)
}

/// The query's parameters, decoded, each name with its values in order.
fn query_params(query: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        out.entry(sigv4::decode(k))
            .or_default()
            .push(sigv4::decode(&v.replace('+', " ")));
    }
    out
}
