//! The admin API: liveness, readiness, Prometheus metrics, mapping status, and enabling
//! or disabling a mapping at run time. Served on its own listener (`[admin] listen`,
//! loopback by default).
//!
//! Reading is open unless `[admin] read_token` is set: then `/mappings` and `/metrics`
//! need it (or the admin token) and `/readyz` shows its reasons only to them, keeping its
//! status code for probes. Changing state needs the bearer token of `[admin] token`.
//! Without a configured token the state-changing endpoints are refused outright (403), so
//! that a gateway never runs with an unauthenticated control surface by accident. Error
//! texts shown here were truncated and stripped of control characters when recorded
//! (`status::shown`).

pub mod client;

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;

use crate::runtime::{ControlError, Handle};
use crate::status::{MappingStatus, State as MappingState};

#[derive(Clone)]
struct Admin {
    runtime: Handle,
    metrics: PrometheusHandle,
}

/// Serves the admin API on `listener` until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runtime: Handle,
    metrics: PrometheusHandle,
) -> std::io::Result<()> {
    // Histograms keep recent samples in buckets that upkeep folds in; without it they grow.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    crate::listen::serve(
        crate::listen::Capped::new(listener),
        router(runtime, metrics),
    )
    .await
}

fn router(runtime: Handle, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/mappings", get(mappings))
        .route("/mappings/{name}/enable", post(enable))
        .route("/mappings/{name}/disable", post(disable))
        .with_state(Admin { runtime, metrics })
}

/// One row of `GET /mappings`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct MappingView {
    pub name: String,
    pub source: String,
    pub state: String,
    pub enabled: bool,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_success: Option<String>,
    /// Messages waiting in the source (RabbitMQ: ready messages in the queue).
    pub depth: Option<u64>,
    /// Set when the on-failure destination refused a record for good and it was kept in
    /// a payload file instead: what was refused and where the record is.
    #[serde(default)]
    pub degraded: Option<String>,
}

impl MappingView {
    fn of(m: &MappingStatus) -> MappingView {
        let s = m.snapshot();
        MappingView {
            name: m.name.clone(),
            source: m.kind.to_owned(),
            state: s.state.as_str().to_owned(),
            enabled: s.enabled,
            last_error: s.last_error,
            last_success: s.last_success.map(crate::invoke::event::rfc3339),
            depth: s.depth,
            degraded: s.degraded,
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when every enabled mapping is connected and not failed; 503 with the reasons.
async fn readyz(State(a): State<Admin>, headers: HeaderMap) -> Response {
    let reasons: Vec<String> = a
        .runtime
        .mappings()
        .iter()
        .filter_map(|m| {
            let s = m.snapshot();
            match s.state {
                _ if !s.enabled => None,
                MappingState::Running => None,
                MappingState::Failed => Some(format!(
                    "mapping {}: failed: {}",
                    m.name,
                    s.last_error.as_deref().unwrap_or("unknown error")
                )),
                other => Some(format!("mapping {}: {}", m.name, other.as_str())),
            }
        })
        .collect();
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match refuse_read(&a.runtime, &headers) {
        None => json!({"ready": reasons.is_empty(), "reasons": reasons}),
        // A probe without the read token learns only whether the gateway is ready.
        Some(_) => json!({"ready": reasons.is_empty()}),
    };
    (status, Json(body)).into_response()
}

async fn render_metrics(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_read(&a.runtime, &headers) {
        return refusal;
    }
    let mut text = a.metrics.render();
    crate::telemetry::render_process_metrics(&mut text);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn mappings(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_read(&a.runtime, &headers) {
        return refusal;
    }
    let rows: Vec<MappingView> = a
        .runtime
        .mappings()
        .iter()
        .map(|m| MappingView::of(m))
        .collect();
    Json(rows).into_response()
}

async fn enable(state: State<Admin>, headers: HeaderMap, name: Path<String>) -> Response {
    set_enabled(state, headers, name, true).await
}

async fn disable(state: State<Admin>, headers: HeaderMap, name: Path<String>) -> Response {
    set_enabled(state, headers, name, false).await
}

async fn set_enabled(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(name): Path<String>,
    enabled: bool,
) -> Response {
    if let Some(refused) = refuse(&a.runtime, &headers) {
        return refused;
    }
    match a.runtime.set_enabled(&name, enabled).await {
        Ok(()) => {
            let view = a
                .runtime
                .mappings()
                .iter()
                .find(|m| m.name == name)
                .map(|m| MappingView::of(m));
            (StatusCode::OK, Json(json!(view))).into_response()
        }
        Err(e @ ControlError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Checks the bearer token of a state-changing request: the refusal, if any.
fn refuse(runtime: &Handle, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = runtime.admin_token() else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "state-changing admin endpoints are disabled because no token is configured; \
             set [admin] token (e.g. token = \"${ESM_ADMIN_TOKEN}\") and restart or reload"
                .into(),
        ));
    };
    if bearer_is(headers, &token) {
        None
    } else {
        Some(unauthorized("admin.token"))
    }
}

/// Checks the bearer token of a read, when `[admin] read_token` is set: the read token
/// or the admin token passes.
fn refuse_read(runtime: &Handle, headers: &HeaderMap) -> Option<Response> {
    let read = runtime.read_token()?;
    let admin = runtime.admin_token();
    let passes = bearer_is(headers, &read) || admin.is_some_and(|t| bearer_is(headers, &t));
    (!passes).then(|| unauthorized("admin.read_token"))
}

fn bearer_is(headers: &HeaderMap, token: &crate::config::Secret) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes()))
}

fn unauthorized(key: &str) -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        format!("a valid bearer token is required (Authorization: Bearer <{key}>)"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Compares without an early exit, so response times do not leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
