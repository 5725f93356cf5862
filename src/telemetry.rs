//! Logging setup and the catalogue of metrics.
//!
//! Logs are structured fields first, then a short sentence; the error field is
//! `error = %e`; secrets never appear (URLs are logged redacted, the admin token never).
//!
//! Metrics are recorded with the `metrics` facade into a Prometheus recorder and rendered
//! by the admin listener's `/metrics` (there is no exporter listener of its own). Every
//! per-mapping series carries `mapping` and `source` (the source kind); other labels come
//! from fixed sets. The README's metrics table lists them all; keep the two in step.
//!
//! Per mapping (`mapping`, `source`):
//! - `esm_gateway_records_received_total`: records taken from the source (redeliveries too)
//! - `esm_gateway_records_filtered_total`: records dropped by filter criteria (none yet)
//! - `esm_gateway_records_delivered_total`: records the function succeeded on
//! - `esm_gateway_records_failed_total`: records in an invoke the function failed on (each attempt)
//! - `esm_gateway_records_released_total`: records given back to the source after their retries (SQS)
//! - `esm_gateway_records_visibility_capped_total`: SQS messages given back unprocessed at
//!   SQS's 12-hour visibility cap
//! - `esm_gateway_records_dead_lettered_total{condition}`: records parked in the on-failure destination
//! - `esm_gateway_destination_fallbacks_total`: failure records the destination refused for
//!   good, kept whole in its payload_dir instead (they count as dead-lettered too)
//! - `esm_gateway_invocations_total{outcome}`: invokes by outcome
//! - `esm_gateway_retries_total`: batches (or parts) put back for another attempt
//! - `esm_gateway_throttles_total`: invokes Lambda throttled (429)
//! - `esm_gateway_buffer_waits_total`: records that waited for room in their lane's byte
//!   budget (Kafka; `batch.buffer_bytes`)
//! - `esm_gateway_invoke_duration_seconds`, `esm_gateway_batch_records`: histograms
//! - `esm_gateway_batches_in_flight`: gauge, batches being delivered
//! - `esm_gateway_source_depth_messages`: gauge, messages waiting in the source
//! - `esm_gateway_mapping_failed`: gauge, 1 while the mapping cannot make progress
//! - `esm_gateway_mapping_enabled`: gauge, 1 while the mapping polls and invokes
//!
//! - `esm_gateway_records_dropped_total`: schedule fires that ran out of retries with no destination
//! - `esm_gateway_schedule_fires_total`, `esm_gateway_schedule_fire_delay_seconds`: fires this
//!   replica made, and the delay from scheduled time to invoke start
//! - `esm_gateway_schedule_resumed_fires_total`: unfinished fires (their replica died or
//!   stopped during the retries) that this replica took over and resumed
//!
//! Process-wide: `esm_gateway_config_reloads_total{outcome}`, `esm_gateway_build_info`,
//! and the standard `process_*` series (rendered from /proc at scrape time).

pub mod otlp;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
    // Colours only on a terminal: journald and log files would get escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Invoke outcomes, the values of `esm_gateway_invocations_total{outcome}`.
pub const INVOKE_OUTCOMES: [&str; 6] = [
    "success",
    "function_error",
    "throttled",
    "transient_error",
    "too_large",
    "fatal_error",
];

/// Failure conditions, the values of `esm_gateway_records_dead_lettered_total{condition}`.
pub const CONDITIONS: [&str; 4] = [
    "RetryAttemptsExhausted",
    "RecordAgeExceeded",
    "MaximumPayloadSizeExceeded",
    "UndecodableRecord",
];

/// Installs the Prometheus recorder (histograms with buckets, not summaries) and returns
/// the handle `/metrics` renders. Call once, before any mapping starts.
pub fn install_metrics() -> PrometheusHandle {
    // Invokes run from milliseconds up to Lambda's 15-minute limit.
    const SECONDS: [f64; 16] = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        900.0,
    ];
    // Batch sizes run from 1 to AWS's limit of 10,000.
    const RECORDS: [f64; 13] = [
        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("esm_gateway_invoke_duration_seconds".into()),
            &SECONDS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("esm_gateway_batch_records".into()), &RECORDS)
        })
        .expect("bucket lists are not empty")
        .install_recorder()
        .expect("the metrics recorder is installed once");
    describe();
    metrics::gauge!("esm_gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for outcome in ["success", "failure"] {
        metrics::counter!("esm_gateway_config_reloads_total", "outcome" => outcome).absolute(0);
    }
    handle
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "esm_gateway_records_received_total",
        "Records taken from the source, redeliveries included."
    );
    describe_counter!(
        "esm_gateway_records_filtered_total",
        "Records dropped by the mapping's filter criteria."
    );
    describe_counter!(
        "esm_gateway_records_delivered_total",
        "Records the function succeeded on."
    );
    describe_counter!(
        "esm_gateway_records_failed_total",
        "Records in an invoke the function failed on, counted at each attempt."
    );
    describe_counter!(
        "esm_gateway_records_released_total",
        "Records given back to the source for redelivery after their retries (SQS)."
    );
    describe_counter!(
        "esm_gateway_records_visibility_capped_total",
        "SQS messages given back to the queue unprocessed because their visibility reached SQS's 12-hour cap."
    );
    describe_counter!(
        "esm_gateway_records_dropped_total",
        "Schedule fires that ran out of retries with no on-failure destination."
    );
    describe_counter!(
        "esm_gateway_records_dead_lettered_total",
        "Records confirmed in the on-failure destination, by condition."
    );
    describe_counter!(
        "esm_gateway_destination_fallbacks_total",
        "Failure records the on-failure destination refused for good, kept whole in its payload_dir instead."
    );
    describe_counter!(
        "esm_gateway_invocations_total",
        "Lambda Invoke calls, by outcome."
    );
    describe_counter!(
        "esm_gateway_retries_total",
        "Batches or parts of batches put back for another attempt after a backoff."
    );
    describe_counter!(
        "esm_gateway_throttles_total",
        "Invokes Lambda throttled (HTTP 429); retried without spending retries."
    );
    describe_counter!(
        "esm_gateway_buffer_waits_total",
        "Records that waited for room in their lane's byte budget (batch.buffer_bytes)."
    );
    describe_histogram!(
        "esm_gateway_invoke_duration_seconds",
        metrics::Unit::Seconds,
        "Time of one Lambda Invoke call."
    );
    describe_histogram!(
        "esm_gateway_batch_records",
        metrics::Unit::Count,
        "Records per Lambda Invoke call."
    );
    describe_gauge!(
        "esm_gateway_batches_in_flight",
        "Batches being delivered (invoked, retried or parked), not yet acknowledged."
    );
    describe_gauge!(
        "esm_gateway_source_depth_messages",
        "Messages waiting in the source, as the source last reported it."
    );
    describe_gauge!(
        "esm_gateway_mapping_failed",
        "1 while the mapping cannot make progress (function missing, source unreachable)."
    );
    describe_gauge!(
        "esm_gateway_mapping_enabled",
        "1 while the mapping polls and invokes, 0 while it is disabled."
    );
    describe_counter!(
        "esm_gateway_config_reloads_total",
        "Configuration reloads (SIGHUP), by outcome."
    );
    describe_gauge!(
        "esm_gateway_build_info",
        "Always 1; the version is a label."
    );
}

/// A mapping's metric handles, registered once when the mapping starts so that every
/// series exists (at 0) from the first scrape.
#[derive(Debug)]
pub struct MappingMetrics {
    labels: [(&'static str, String); 2],
    pub received: Counter,
    pub filtered: Counter,
    pub delivered: Counter,
    pub failed: Counter,
    /// Records given back to the source after their retries (SQS).
    pub released: Counter,
    /// SQS messages given back unprocessed at SQS's 12-hour visibility cap.
    pub visibility_capped: Counter,
    /// Schedule fires that ran out of retries with no destination.
    pub dropped: Counter,
    /// Failure records kept in payload_dir because the destination refused them for good.
    pub fallbacks: Counter,
    pub retries: Counter,
    pub throttles: Counter,
    /// Records that waited for room in their lane's byte budget.
    pub buffer_waits: Counter,
    pub invoke_seconds: Histogram,
    pub batch_records: Histogram,
    pub in_flight: Gauge,
    pub depth: Gauge,
    pub failed_state: Gauge,
    pub enabled: Gauge,
}

impl MappingMetrics {
    pub fn new(mapping: &str, source: &'static str) -> MappingMetrics {
        let labels = [
            ("mapping", mapping.to_owned()),
            ("source", source.to_owned()),
        ];
        let m = MappingMetrics {
            received: metrics::counter!("esm_gateway_records_received_total", &labels),
            filtered: metrics::counter!("esm_gateway_records_filtered_total", &labels),
            delivered: metrics::counter!("esm_gateway_records_delivered_total", &labels),
            failed: metrics::counter!("esm_gateway_records_failed_total", &labels),
            released: metrics::counter!("esm_gateway_records_released_total", &labels),
            visibility_capped: metrics::counter!(
                "esm_gateway_records_visibility_capped_total",
                &labels
            ),
            dropped: metrics::counter!("esm_gateway_records_dropped_total", &labels),
            fallbacks: metrics::counter!("esm_gateway_destination_fallbacks_total", &labels),
            retries: metrics::counter!("esm_gateway_retries_total", &labels),
            throttles: metrics::counter!("esm_gateway_throttles_total", &labels),
            buffer_waits: metrics::counter!("esm_gateway_buffer_waits_total", &labels),
            invoke_seconds: metrics::histogram!("esm_gateway_invoke_duration_seconds", &labels),
            batch_records: metrics::histogram!("esm_gateway_batch_records", &labels),
            in_flight: metrics::gauge!("esm_gateway_batches_in_flight", &labels),
            depth: metrics::gauge!("esm_gateway_source_depth_messages", &labels),
            failed_state: metrics::gauge!("esm_gateway_mapping_failed", &labels),
            enabled: metrics::gauge!("esm_gateway_mapping_enabled", &labels),
            labels,
        };
        // Counters appear at 0 rather than only after their first event, so a rate()
        // over a fresh mapping is 0, not absent.
        for c in [
            &m.received,
            &m.filtered,
            &m.delivered,
            &m.failed,
            &m.released,
            &m.visibility_capped,
            &m.dropped,
            &m.fallbacks,
            &m.retries,
            &m.throttles,
            &m.buffer_waits,
        ] {
            c.increment(0);
        }
        for outcome in INVOKE_OUTCOMES {
            m.invocation(outcome).increment(0);
        }
        for condition in CONDITIONS {
            m.dead_lettered(condition).increment(0);
        }
        m
    }

    /// `esm_gateway_invocations_total{outcome}`; `outcome` is one of [`INVOKE_OUTCOMES`].
    pub fn invocation(&self, outcome: &'static str) -> Counter {
        let [(k1, v1), (k2, v2)] = &self.labels;
        metrics::counter!("esm_gateway_invocations_total", *k1 => v1.clone(), *k2 => v2.clone(), "outcome" => outcome)
    }

    /// `esm_gateway_records_dead_lettered_total{condition}`; one of [`CONDITIONS`].
    pub fn dead_lettered(&self, condition: &'static str) -> Counter {
        let [(k1, v1), (k2, v2)] = &self.labels;
        metrics::counter!("esm_gateway_records_dead_lettered_total", *k1 => v1.clone(), *k2 => v2.clone(), "condition" => condition)
    }
}

/// The standard Prometheus process series, read from /proc at scrape time. Rendered by
/// hand because `process_cpu_seconds_total` is a fractional counter, which the `metrics`
/// facade (integer counters) cannot express. Series that cannot be read are left out.
pub fn render_process_metrics(out: &mut String) {
    let start = *PROCESS_START;
    let _ = writeln!(
        out,
        "# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.\n\
         # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}"
    );
    if let Some((cpu, rss)) = proc_stat() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // The count includes the directory handle read_dir itself holds.
        let n = fds.count().saturating_sub(1);
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\nprocess_open_fds {n}"
        );
    }
    if let Some(max) = max_fds() {
        let _ = writeln!(
            out,
            "# HELP process_max_fds Maximum number of open file descriptors.\n\
             # TYPE process_max_fds gauge\nprocess_max_fds {max}"
        );
    }
}

/// Captured when metrics are first rendered or installed; `main` touches it at start-up.
pub static PROCESS_START: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
});

/// CPU seconds (user + system) and resident bytes from /proc/self/stat.
fn proc_stat() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat, clock_ticks()?, page_size()?)
}

fn parse_stat(stat: &str, ticks: f64, page: u64) -> Option<(f64, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0: utime is field 14, stime 15, rss 24.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss: u64 = fields.get(21)?.parse().ok()?;
    Some(((utime + stime) / ticks, rss * page))
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (p > 0).then_some(p as u64)
}

fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (esm gate) way) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 9 0 100 123456 789 18446744073709551615";
        assert_eq!(parse_stat(stat, 100.0, 4096), Some((3.0, 789 * 4096)));
        assert_eq!(parse_stat("garbage", 100.0, 4096), None);
    }

    #[test]
    fn process_metrics_render_from_proc() {
        let mut out = String::new();
        render_process_metrics(&mut out);
        for name in [
            "process_start_time_seconds",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(
                out.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing from:\n{out}"
            );
        }
    }
}
