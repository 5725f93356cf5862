//! Logging setup. Logs are structured fields first, then a short sentence; the error
//! field is `error = %e`; secrets never appear (URLs are logged redacted).
//!
//! Metrics (all labelled by `mapping`):
//! - `esm_gateway_records_total{outcome="delivered|dead_lettered|dropped"}` (dropped: a
//!   schedule fire exhausted with no destination)
//! - `esm_gateway_invocations_total{outcome="success|function_error|throttled|transient_error|too_large|fatal_error"}`
//! - `esm_gateway_retries_total`
//! - `esm_gateway_invoke_duration_seconds` and `esm_gateway_batch_records` histograms
//! - `esm_gateway_mapping_failed` gauge (1 while a mapping cannot make progress)
//! - `esm_gateway_schedule_fires_total` and the `esm_gateway_schedule_fire_delay_seconds`
//!   histogram (scheduled time to invoke start), per schedule this replica fired

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `RUST_LOG`-style filters (default `info`) to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
