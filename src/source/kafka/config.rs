//! A Kafka source's configuration: its TOML table, its checks and its librdkafka
//! client configuration.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use serde::Deserialize;

use super::event::KafkaShape;
use crate::pipeline::batcher::BatchLimits;
use crate::source::Facts;

/// `[mapping.source]` with `type = "kafka"`: a self-managed Kafka cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// "host1:9092,host2:9092".
    pub bootstrap_servers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group. Default: `esm-gateway-<mapping name>`. Changing it starts the
    /// mapping over from `starting_position`: never change it lightly.
    pub group_id: Option<String>,
    /// Where a partition with no committed offset starts; committed offsets always win.
    /// Default: "latest".
    #[serde(default)]
    pub starting_position: StartingPosition,
    /// With `starting_position = "at_timestamp"`: RFC 3339 time to start from.
    pub starting_timestamp: Option<String>,
    /// SASL authentication. Default: none.
    pub sasl: Option<KafkaSasl>,
    /// TLS (`tls = {}` for the system's trust store). Default: plaintext.
    pub tls: Option<KafkaTls>,
    /// Batches of one partition in flight at once, 1–10, keeping order per record key.
    /// Default: 1 (strict partition order, as AWS).
    pub parallelization_factor: Option<u8>,
    /// Most batches in flight across all partitions. Default: no limit.
    pub max_concurrency: Option<u32>,
    /// Extra librdkafka properties, passed through (`${ENV}` is expanded). The gateway
    /// manages group.id, bootstrap.servers, offsets, commits and security itself.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, crate::env::Expanded>,
}

/// Where a partition without a committed offset starts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartingPosition {
    TrimHorizon,
    #[default]
    Latest,
    AtTimestamp,
}

/// `sasl = { mechanism = "scram-sha-512", username = "…", password = "${PASS}" }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// "plain", "scram-sha-256" or "scram-sha-512".
    pub mechanism: SaslMechanism,
    pub username: crate::env::Expanded,
    /// `${ENV}` is expanded; never logged.
    pub password: crate::env::Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "plain")]
    Plain,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
}

/// `tls = { ca_file = "…", cert_file = "…", key_file = "…" }`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// PEM CA bundle. Default: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mTLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), for mTLS.
    pub key_file: Option<PathBuf>,
    /// Password of the client key, if it is encrypted.
    pub key_password: Option<crate::env::Secret>,
}

/// librdkafka properties the gateway sets itself.
const MANAGED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
];

/// AWS's defaults for self-managed Kafka mappings.
pub const DEFAULTS: crate::source::Defaults = crate::source::STREAM_DEFAULTS;

impl KafkaSource {
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        let name = facts.mapping;
        if self.bootstrap_servers.trim().is_empty() {
            out.push(format!(
                "mapping {name:?}: source.bootstrap_servers is empty"
            ));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.is_empty()) {
            out.push(format!(
                "mapping {name:?}: source.topics must name at least one topic, none empty"
            ));
        }
        match (self.starting_position, &self.starting_timestamp) {
            (StartingPosition::AtTimestamp, None) => out.push(format!(
                "mapping {name:?}: source.starting_position = \"at_timestamp\" needs source.starting_timestamp"
            )),
            (StartingPosition::AtTimestamp, Some(t)) => {
                if let Err(e) = humantime::parse_rfc3339_weak(t) {
                    out.push(format!(
                        "mapping {name:?}: source.starting_timestamp {t:?} is not an RFC 3339 time: {e}"
                    ));
                }
            }
            (_, Some(_)) => out.push(format!(
                "mapping {name:?}: source.starting_timestamp is only used with starting_position = \"at_timestamp\""
            )),
            (_, None) => {}
        }
        if let Some(p) = self.parallelization_factor
            && !(1..=10).contains(&p)
        {
            out.push(format!(
                "mapping {name:?}: source.parallelization_factor must be between 1 and 10, got {p}"
            ));
        }
        if self.max_concurrency == Some(0) {
            out.push(format!(
                "mapping {name:?}: source.max_concurrency must be at least 1"
            ));
        }
        for key in self.properties.keys() {
            if MANAGED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                out.push(format!(
                    "mapping {name:?}: source.properties.\"{key}\" is set by the gateway; use the source's own settings"
                ));
            }
        }
    }

    /// The mapping's shape: a placeholder, since each partition renders its own.
    pub fn shape(&self, name: &str, region: &str, account: &str) -> KafkaShape {
        KafkaShape::new(&self.bootstrap_servers, "", -1)
            .with_event_source_arn(&event_source_arn(name, region, account))
    }
}

/// The default consumer group of a mapping.
pub fn group_id(source: &KafkaSource, mapping: &str) -> String {
    source
        .group_id
        .clone()
        .unwrap_or_else(|| format!("esm-gateway-{mapping}"))
}

/// The librdkafka configuration of a source whose batches close at `limits`.
pub fn client_config(source: &KafkaSource, mapping: &str, limits: &BatchLimits) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &source.bootstrap_servers)
        .set("group.id", group_id(source, mapping))
        .set("client.id", format!("esm-gateway-{mapping}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "10000")
        // When a partition's queue is full librdkafka postpones its next fetch by this
        // much (default 1 s): a draining partition would idle most of the time.
        .set("fetch.queue.backoff.ms", "10")
        // Only reached by a partition without a committed offset that is not seeded (see
        // `Context::seed`), or whose committed offset is out of range (an outage longer
        // than retention, a partition blocked behind a failing record): both resume at
        // the earliest record still in the log, never past records not yet delivered.
        .set("auto.offset.reset", "earliest");
    let lanes = usize::from(source.parallelization_factor.unwrap_or(1).max(1));
    for (key, value) in fetch_properties(limits, lanes) {
        c.set(key, value);
    }
    // librdkafka requires `fetch.max.bytes` ≥ `message.max.bytes` once either is set:
    // a mapping that sets one of them decides both.
    if !["fetch.max.bytes", "message.max.bytes"]
        .iter()
        .any(|k| source.properties.contains_key(*k))
    {
        let fetch = FETCH_RESPONSE_BYTES.to_string();
        c.set("fetch.max.bytes", &fetch)
            .set("message.max.bytes", fetch);
    }
    // The out-of-range reset is only reported as a librdkafka warning (see
    // `Context::log`): let warnings through whatever the global log level.
    if (c.log_level as i32) < (RDKafkaLogLevel::Warning as i32) {
        c.set_log_level(RDKafkaLogLevel::Warning);
    }
    let tls = source.tls.is_some();
    let protocol = match (&source.sasl, tls) {
        (None, false) => "plaintext",
        (None, true) => "ssl",
        (Some(_), false) => "sasl_plaintext",
        (Some(_), true) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(sasl) = &source.sasl {
        c.set(
            "sasl.mechanisms",
            match sasl.mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        )
        .set("sasl.username", &sasl.username.0)
        .set("sasl.password", sasl.password.expose());
    }
    if let Some(t) = &source.tls {
        let path = |p: &std::path::Path| p.display().to_string();
        if let Some(p) = &t.ca_file {
            c.set("ssl.ca.location", path(p));
        }
        if let Some(p) = &t.cert_file {
            c.set("ssl.certificate.location", path(p));
        }
        if let Some(p) = &t.key_file {
            c.set("ssl.key.location", path(p));
        }
        if let Some(p) = &t.key_password {
            c.set("ssl.key.password", p.expose());
        }
    }
    for (k, v) in &source.properties {
        c.set(k, &v.0);
    }
    c
}

/// Fewest records librdkafka keeps queued per partition: ten fetches of 1 KiB records at
/// `max.partition.fetch.bytes` (1 MiB). With 1,000, a drain of 1 KiB records into an
/// instant function ran at 0.30 of a raw consumer, with 10,000 at 0.43 (16 MiB and
/// 100,000: 0.49, at twice the peak RSS), in one sitting of `cargo bench --bench kafka`.
const PREFETCH_RECORDS_MIN: usize = 10_000;
/// librdkafka's `max.partition.fetch.bytes` (1 MiB), in KiB.
const FETCH_KBYTES: usize = 1024;
/// Largest fetch response (`fetch.max.bytes`; a record batch larger than this still
/// comes whole, alone in its response). librdkafka keeps a response's buffer until the
/// last of its records is consumed, and one response spans partitions, so a partition
/// whose queue moves slowly keeps whole every response it has records in. At
/// librdkafka's own size here (1 MiB, its prefetch per partition) a drain of 8
/// partitions of 1 KiB records peaked at 29 MiB of responses (heaptrack), at 256 KiB
/// at 20 MiB, and the release gateway's peak RSS fell from 75–77 to 63–65 MiB at the
/// same rate (2026-12-07, `cargo bench --bench kafka`, alternating builds). A consumer
/// sends no produce requests, so the `message.max.bytes` that librdkafka requires to be
/// no larger is set to the same.
const FETCH_RESPONSE_BYTES: usize = 256 * 1024;
/// Shortest and longest a fetch waits at the broker for records. librdkafka sends one
/// fetch at a time to a broker, so a fetch that holds only partitions already read to
/// their end (the others' queues being full when it was built) keeps the others from
/// being fetched for as long as it waits: at librdkafka's default of 500 ms a drain of 8
/// partitions into an instant function ran at about 179,000 records/s in 7 of 9 runs,
/// at 100 ms at 249,000–273,000 in 5 of 5 (`cargo bench --bench kafka`, 2026-12-07).
const FETCH_WAIT_MIN: Duration = Duration::from_millis(10);
const FETCH_WAIT_MAX: Duration = Duration::from_millis(100);

/// What librdkafka prefetches for each partition, and how long a fetch waits, sized to
/// the mapping's batches (each can be overridden through `properties`).
///
/// Each partition has its own queue (split off), so librdkafka's limits apply per
/// partition: it fetches while the queue holds fewer than `queued.min.messages` records
/// and `queued.max.messages.kbytes`. Its defaults (100,000 records, 64 MiB) make a
/// backlogged mapping hold up to 64 MiB per partition; a lane needs far less ahead of
/// it, since it holds up to two batches itself (`batch.buffer_bytes`): two batches per
/// lane (at least ten fetches of 1 KiB records), and one fetch's bytes per lane
/// (`max.partition.fetch.bytes`, 1 MiB). A batch's bytes (6 MB) per lane held 158 MiB at
/// peak in a drain of 8 partitions of 1 KiB records into an instant function; one
/// fetch's held 76 MiB, at the same rate within the sitting's noise (2026-12-06,
/// `BENCH_GATEWAY_PROPERTIES` in `cargo bench --bench kafka`).
///
/// A fetch waits at the broker at most as long as the batching window (between 10 and
/// 100 ms), and returns as soon as one byte is there: with a window of 0 a record is
/// fetched as soon as it is written (on a broker that answers a waiting fetch early;
/// one that does not answers within 10 ms), as AWS's low-latency mode promises.
fn fetch_properties(limits: &BatchLimits, lanes: usize) -> [(&'static str, String); 4] {
    let records = (2 * limits.size * lanes).clamp(PREFETCH_RECORDS_MIN, 10_000_000);
    let kbytes = (lanes * FETCH_KBYTES).clamp(FETCH_KBYTES, 64 * 1024);
    let wait = limits.window.clamp(FETCH_WAIT_MIN, FETCH_WAIT_MAX);
    [
        ("queued.min.messages", records.to_string()),
        ("queued.max.messages.kbytes", kbytes.to_string()),
        ("fetch.wait.max.ms", wait.as_millis().to_string()),
        ("fetch.min.bytes", "1".to_owned()),
    ]
}

/// The synthetic ARN of mapping `name` that Kafka failure records carry as
/// `eventSourceArn` (an event source mapping's ARN, named rather than numbered).
pub fn event_source_arn(name: &str, region: &str, account: &str) -> String {
    format!("arn:aws:lambda:{region}:{account}:event-source-mapping:{name}")
}
