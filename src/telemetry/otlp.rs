//! The gateway's own spans, exported over OTLP/HTTP (protobuf) when `[telemetry]
//! otlp_endpoint` is set.
//!
//! Spans are made with the OpenTelemetry API directly, not through `tracing`: log lines
//! stay as they are, and a span's parent can be a record's trace (a remote context). A
//! delivered batch is one `batch` span (its parent the trace of its first traced record,
//! links to the others'), with an `invoke` child per attempt, a `park` child per piece
//! parked, and an `ack` child for the source's acknowledgement. Without an exporter no
//! span exists: [`Span`] is then an empty `Option`, and nothing is allocated or timed.
//!
//! The SDK's batch processor exports from a thread of its own; the HTTP request runs on
//! the gateway's Tokio runtime (hyper, through `OnRuntime`), so no second HTTP stack or
//! runtime is built.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::trace::TraceContext;

/// `[telemetry]`
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector to export the gateway's spans (batch, invoke, park, ack) to,
    /// e.g. "http://127.0.0.1:4318" (`/v1/traces` is appended unless the URL ends with
    /// it; http or https). Default: none, and no spans are made.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// What is wrong with it, if anything (for the config's checks).
    pub fn problem(&self) -> Option<String> {
        let url = self.otlp_endpoint.as_deref()?;
        let authority = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
        match authority {
            Some(a) if !a.is_empty() && !url.contains(char::is_whitespace) => None,
            _ => Some(format!(
                "[telemetry] otlp_endpoint {url:?} is not an http:// or https:// URL"
            )),
        }
    }

    /// The traces URL: the endpoint with `/v1/traces`, as OTEL_EXPORTER_OTLP_ENDPOINT.
    pub fn traces_url(&self) -> Option<String> {
        let url = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if url.ends_with("/v1/traces") {
            url.to_owned()
        } else {
            format!("{url}/v1/traces")
        })
    }
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter: {0}")]
pub struct OtlpError(String);

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The installed exporter; [`Exporter::shutdown`] exports what is left.
pub struct Exporter(SdkTracerProvider);

impl Exporter {
    /// Flushes the spans not yet exported and stops the exporter. Blocks (call it from a
    /// blocking thread: the export runs on the runtime).
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown_with_timeout(Duration::from_secs(10)) {
            tracing::warn!(error = %e, "OTLP exporter shutdown");
        }
    }
}

/// Installs the exporter to `config`'s endpoint, its requests made on `runtime`; None
/// without an endpoint. Call once, before any mapping starts.
pub fn install(
    config: &TelemetryConfig,
    runtime: tokio::runtime::Handle,
) -> Result<Option<Exporter>, OtlpError> {
    let Some(url) = config.traces_url() else {
        return Ok(None);
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
        .map_err(|e| OtlpError(format!("TLS roots: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    let client = OnRuntime {
        inner: opentelemetry_http::hyper::HyperClient::new(https, Duration::from_secs(10), None),
        runtime,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&url)
        .build()
        .map_err(|e| OtlpError(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("esm-gateway")
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let _ = TRACER.set(provider.tracer("esm-gateway"));
    tracing::info!(endpoint = %url, "exporting spans over OTLP");
    Ok(Some(Exporter(provider)))
}

/// Runs the exporter's requests on the gateway's runtime (hyper needs one; the batch
/// processor's thread has none).
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_http::hyper::HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    >,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await?
    }
}

/// One span of the gateway's work, ended when dropped; nothing without an exporter.
#[derive(Default)]
pub struct Span(Option<Context>);

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(cx) => write!(f, "Span({:?})", cx.span().span_context()),
            None => f.write_str("Span(none)"),
        }
    }
}

/// A source's acknowledgement of a batch, timed (see [`Span::into_ack`]). Fields drop
/// in order: the `ack` span ends before its batch.
pub struct Acking {
    _ack: Span,
    _batch: Span,
}

/// X-Ray allows a segment 20 links; a batch span takes no more.
const MAX_LINKS: usize = 20;

impl Span {
    /// A batch's span: a child of `traces`' first (the producer's span), linked to the
    /// next distinct ones; a root span when none of them has a parent span.
    pub fn batch<'a>(
        mapping: &str,
        source: &'static str,
        records: usize,
        traces: impl IntoIterator<Item = &'a Option<TraceContext>>,
    ) -> Span {
        let Some(tracer) = TRACER.get() else {
            return Span(None);
        };
        let mut remote = traces.into_iter().filter_map(|t| remote(t.as_ref()?));
        let parent = remote.next();
        let mut links: Vec<Link> = Vec::new();
        for sc in remote {
            if links.len() == MAX_LINKS {
                break;
            }
            let known = |other: &SpanContext| other.trace_id() == sc.trace_id();
            if !parent.as_ref().is_some_and(known) && !links.iter().any(|l| known(&l.span_context))
            {
                links.push(Link::with_context(sc));
            }
        }
        let cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let span = tracer
            .span_builder("batch")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("esm_gateway.mapping", mapping.to_owned()),
                KeyValue::new("esm_gateway.source", source),
                KeyValue::new("esm_gateway.batch.records", records as i64),
            ])
            .with_links(links)
            .start_with_context(tracer, &cx);
        Span(Some(cx.with_span(span)))
    }

    /// A span within this one (none if this is none), with the `attributes` (made only
    /// when the span is), linked to `link` when that is another trace than this one's.
    pub fn child(
        &self,
        name: &'static str,
        attributes: impl FnOnce() -> Vec<KeyValue>,
        link: Option<&TraceContext>,
    ) -> Span {
        let (Some(cx), Some(tracer)) = (&self.0, TRACER.get()) else {
            return Span(None);
        };
        let links: Vec<Link> = link
            .and_then(remote)
            .filter(|sc| sc.trace_id() != cx.span().span_context().trace_id())
            .map(Link::with_context)
            .into_iter()
            .collect();
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes(attributes())
            .with_links(links)
            .start_with_context(tracer, cx);
        Span(Some(cx.with_span(span)))
    }

    /// This batch span and an `ack` span within it, for the source's acknowledgement of
    /// `records`: both end when the [`Acking`] is dropped, the `ack` first.
    pub fn into_ack(self, mapping: &str, records: usize) -> Acking {
        let ack = self.child(
            "ack",
            || {
                vec![
                    KeyValue::new("esm_gateway.mapping", mapping.to_owned()),
                    KeyValue::new("esm_gateway.batch.records", records as i64),
                ]
            },
            None,
        );
        Acking {
            _ack: ack,
            _batch: self,
        }
    }

    /// True when spans are being made (an exporter is installed).
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    pub fn set(&self, attribute: KeyValue) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(attribute);
        }
    }

    /// Marks the span failed with `message`.
    pub fn fail(&self, message: impl Into<String>) {
        if let Some(cx) = &self.0 {
            cx.span().set_status(Status::error(message.into()));
        }
    }
}

/// A record's trace as a remote parent: only with a parent span id (an X-Ray header
/// without `Parent` names no span to hang ours from).
fn remote(t: &TraceContext) -> Option<SpanContext> {
    let parent = t.parent_id?;
    let flags = if t.sampled == Some(false) {
        TraceFlags::default()
    } else {
        TraceFlags::SAMPLED
    };
    Some(SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(parent),
        flags,
        true,
        TraceState::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path_once() {
        let c = |u: &str| TelemetryConfig {
            otlp_endpoint: Some(u.into()),
        };
        assert_eq!(
            c("http://collector:4318").traces_url().unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            c("http://collector:4318/").traces_url().unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            c("https://c.example/otlp/v1/traces").traces_url().unwrap(),
            "https://c.example/otlp/v1/traces"
        );
        assert_eq!(TelemetryConfig::default().traces_url(), None);
        assert_eq!(c("https://c.example:4318").problem(), None);
        assert!(c("collector:4318").problem().is_some());
        assert!(c("grpc://collector:4317").problem().is_some());
        assert!(c("not a url").problem().is_some());
    }

    #[test]
    fn without_an_exporter_no_span_is_made() {
        let t = TraceContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let span = Span::batch("m", "sqs", 1, [&t]);
        assert!(!span.is_on());
        assert!(!span.child("invoke", || unreachable!(), t.as_ref()).is_on());
    }
}
