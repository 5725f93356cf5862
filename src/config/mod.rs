//! The TOML model of a gateway: one `[aws]` table and any number of `[[mapping]]`s.
//!
//! Owns parsing and validation and nothing else (no I/O beyond reading the file), so
//! `esm-gateway validate` and `esm-gateway run` share one code path. Range checks live in
//! the field types' deserializers, so the TOML parser reports them with the line and
//! column of the offending value; checks across fields run after parsing and name the
//! mapping and the field. Defaults are AWS's (see the README's configuration reference).

mod env;
mod types;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use env::{Expanded, Secret, SecretUrl};
pub use types::{
    BatchSize, BatchWindow, BufferBytes, ByteSize, FlexibleWindow, MaxRecordAge, RetryAttempts,
    ScheduleExpression, ScheduleInput, ScheduleTime, TimeZoneName,
};

/// Why a configuration file was refused. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach AWS (or an emulator). Credentials come from the SDK's standard chain.
    #[serde(default)]
    pub aws: AwsConfig,
    /// Process-wide settings.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// `[admin]`: the HTTP listener for health, metrics and mapping control.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Settings shared by every schedule mapping.
    #[serde(default)]
    pub schedules: SchedulesConfig,
    /// The event source mappings, each `[[mapping]]` one.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
}

/// `[schedules]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulesConfig {
    /// PostgreSQL URL of the fire ledger that lets several replicas fire each scheduled
    /// time once, e.g. "postgres://gateway:${PGPASSWORD}@db:5432/gateway" (`${ENV}` is
    /// expanded). Default: none; a single process needs none.
    pub store: Option<SecretUrl>,
    /// With a store: how long a claimed fire stays this replica's without a renewal (it
    /// is renewed every third of this while the fire retries). A fire whose replica died
    /// is resumed by another one this long after its last renewal. Default: "30s".
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        Self {
            store: None,
            lease: default_lease(),
        }
    }
}

fn default_lease() -> Duration {
    Duration::from_secs(30)
}

/// `[aws]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region. Default: the SDK's chain (AWS_REGION, profile), else us-east-1.
    pub region: Option<String>,
    /// Endpoint override for local emulators, e.g. "http://127.0.0.1:4566". Default: AWS.
    #[serde(default, deserialize_with = "env::expand_opt")]
    pub endpoint_url: Option<String>,
    /// Named profile from ~/.aws/config. Default: the SDK's chain.
    pub profile: Option<String>,
    /// Role to assume (STS AssumeRole) on top of the base credentials. Default: none.
    pub assume_role_arn: Option<String>,
    /// Account id used in the synthetic ARNs the gateway builds. Default: "000000000000".
    pub account_id: Option<String>,
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// How long shutdown waits for in-flight invokes before giving up. Default: "30s".
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: default_grace(),
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API at all. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address and port to listen on. Default: "127.0.0.1:9900" (loopback only: the API
    /// is not meant to face a network without a proxy in front).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token required by the endpoints that change state; `${ENV}` is expanded.
    /// Default: none, and those endpoints are refused.
    pub token: Option<Secret>,
    /// Bearer token required to read `/mappings` and `/metrics` (the admin token works
    /// too), and to see `/readyz`'s reasons; its status code stays open for probes, and
    /// `/healthz` stays open. Error texts in them can hold record data. Default: none,
    /// and reads are open.
    pub read_token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_admin_listen(),
            token: None,
            read_token: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9900))
}

/// One `[[mapping]]`: a source drained into a function.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Unique name; used in logs, metrics, the default consumer tag and synthetic ARNs.
    pub name: String,
    /// Function name, `name:alias`, `name:version`, full or partial ARN.
    #[serde(deserialize_with = "env::expand")]
    pub function: String,
    /// AWS's Enabled flag: false neither polls nor invokes. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where records come from, tagged by `type`.
    pub source: Source,
    /// `[mapping.batch]`: when a batch closes.
    #[serde(default)]
    pub batch: Batching,
    /// `[mapping.retry]`: what happens to a failed batch.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// "request_response" (synchronous: the function's result decides the batch) or
    /// "event" (asynchronous: Lambda accepting the event counts as delivered; 1 MB cap).
    /// Default: "request_response".
    #[serde(default)]
    pub invocation_type: InvocationType,
    /// Parse `{"batchItemFailures":[...]}` from the function's result. Default: false.
    #[serde(default)]
    pub report_batch_item_failures: bool,
    /// Longest wait for one Invoke to answer, 1 s–15 min; past it the attempt is abandoned
    /// and retried as a transient error (without spending a retry), so a connection that a
    /// firewall dropped silently cannot stall the mapping. Set it to the function's own
    /// timeout plus a margin. When set, an SQS source also checks at start-up that the
    /// queue's visibility timeout covers the batching window plus this. Default: "15m"
    /// (Lambda's maximum function timeout).
    #[serde(default, with = "humantime_serde")]
    pub function_timeout: Option<Duration>,
    /// Where records go when they cannot be delivered. Default: none.
    pub on_failure: Option<DestinationConfig>,
    /// Up to five AWS FilterCriteria patterns (JSON text); a record passes if any
    /// matches, and one that none matches is acknowledged without an invoke. Default:
    /// none (everything passes).
    #[serde(default)]
    pub filters: Vec<String>,
}

/// Lambda's longest function timeout, and the default `function_timeout`.
pub const MAX_FUNCTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn yes() -> bool {
    true
}

/// How the function is invoked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationType {
    #[default]
    RequestResponse,
    Event,
}

/// The closed set of sources, tagged by `type` (deserialized by hand, below).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Rabbitmq(RabbitSource),
    Kafka(KafkaSource),
    Sqs(SqsSource),
    Schedule(ScheduleSource),
}

const SOURCE_TYPES: &[&str] = &["rabbitmq", "kafka", "sqs", "schedule"];

/// Like `#[serde(tag = "type")]`, except that when `type` comes first (as in every
/// example) the rest of the table goes straight to the variant's deserializer, so an
/// error in a field keeps that field's line; serde's tagged enums buffer the table and
/// lose it. Otherwise the table is buffered and errors point at the table.
impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SourceVisitor)
    }
}

struct SourceVisitor;

impl<'de> serde::de::Visitor<'de> for SourceVisitor {
    type Value = Source;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a source table with a `type`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Source, A::Error> {
        use serde::de::Error as _;
        use serde::de::value::MapAccessDeserializer;
        let Some(first) = map.next_key::<String>()? else {
            return Err(A::Error::missing_field("type"));
        };
        if first == "type" {
            let kind: String = map.next_value()?;
            let rest = MapAccessDeserializer::new(map);
            return match kind.as_str() {
                "rabbitmq" => RabbitSource::deserialize(rest).map(Source::Rabbitmq),
                "kafka" => KafkaSource::deserialize(rest).map(Source::Kafka),
                "sqs" => SqsSource::deserialize(rest).map(Source::Sqs),
                "schedule" => ScheduleSource::deserialize(rest).map(Source::Schedule),
                other => Err(A::Error::unknown_variant(other, SOURCE_TYPES)),
            };
        }
        let mut table = toml::Table::new();
        let value: toml::Value = map.next_value()?;
        table.insert(first, value);
        while let Some((k, v)) = map.next_entry::<String, toml::Value>()? {
            table.insert(k, v);
        }
        let Some(toml::Value::String(kind)) = table.remove("type") else {
            return Err(A::Error::missing_field("type"));
        };
        let rest = toml::Value::Table(table);
        let r = match kind.as_str() {
            "rabbitmq" => rest.try_into().map(Source::Rabbitmq),
            "kafka" => rest.try_into().map(Source::Kafka),
            "sqs" => rest.try_into().map(Source::Sqs),
            "schedule" => rest.try_into().map(Source::Schedule),
            other => return Err(A::Error::unknown_variant(other, SOURCE_TYPES)),
        };
        r.map_err(|e| A::Error::custom(e.message()))
    }
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Rabbitmq(_) => "rabbitmq",
            Source::Kafka(_) => "kafka",
            Source::Sqs(_) => "sqs",
            Source::Schedule(_) => "schedule",
        }
    }
}

/// `[mapping.source]` with `type = "kafka"`: a self-managed Kafka cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// "host1:9092,host2:9092".
    pub bootstrap_servers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group. Default: "esm-gateway-<mapping name>". Changing it starts the
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
    pub properties: std::collections::BTreeMap<String, env::Expanded>,
}

/// `[mapping.source]` with `type = "sqs"`: a standard or FIFO queue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSource {
    /// The queue URL (a FIFO queue's ends in ".fifo").
    #[serde(deserialize_with = "env::expand")]
    pub queue_url: String,
    /// Most batches in flight at once, 2–1,000 (AWS's MaximumConcurrency). Default: 5.
    pub max_concurrency: Option<u32>,
    /// Kept for configurations written before the mapping's own `function_timeout`
    /// (which is preferred): the same start-up check of the queue's visibility timeout.
    /// Default: the mapping's `function_timeout` when set, else no check.
    #[serde(default, with = "humantime_serde")]
    pub function_timeout: Option<Duration>,
}

impl SqsSource {
    pub fn is_fifo(&self) -> bool {
        self.queue_url.ends_with(".fifo")
    }
}

/// Where a partition without a committed offset starts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartingPosition {
    TrimHorizon,
    #[default]
    Latest,
    AtTimestamp,
}

/// `sasl = { mechanism = "scram-sha-512", username = "…", password = "${PASS}" }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// "plain", "scram-sha-256" or "scram-sha-512".
    pub mechanism: SaslMechanism,
    pub username: env::Expanded,
    /// `${ENV}` is expanded; never logged.
    pub password: env::Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "plain")]
    Plain,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
}

/// `tls = { ca_file = "…", cert_file = "…", key_file = "…" }`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// PEM CA bundle. Default: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mTLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), for mTLS.
    pub key_file: Option<PathBuf>,
    /// Password of the client key, if it is encrypted.
    pub key_password: Option<env::Secret>,
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

/// `[mapping.source]` with `type = "schedule"`: EventBridge-style schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSource {
    /// `cron(min hour day-of-month month day-of-week year)`, `rate(N unit)` or
    /// `at(yyyy-mm-ddThh:mm:ss)`, as AWS writes them (plus `rate(N seconds)`).
    pub expression: ScheduleExpression,
    /// IANA zone the cron and at times are read in. Default: "UTC".
    #[serde(default)]
    pub timezone: TimeZoneName,
    /// No fire before this time (recurring schedules). Default: none.
    pub start: Option<ScheduleTime>,
    /// No fire after this time (recurring schedules). Default: none.
    pub end: Option<ScheduleTime>,
    /// Fire at a moment within this window after each scheduled time. Default: off.
    pub flexible_window: Option<FlexibleWindow>,
    /// JSON sent instead of the Scheduled Event, with `<aws.scheduler.…>` placeholders
    /// substituted. Default: EventBridge's Scheduled Event.
    pub input: Option<ScheduleInput>,
    /// What a gateway that was down does about the time it missed: "skip", or
    /// "fire_once" for the last one (needs `[schedules] store`). Default: "skip".
    #[serde(default)]
    pub missed: MissedFire,
}

/// The missed-fire policy of a schedule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedFire {
    #[default]
    Skip,
    FireOnce,
}

/// AWS EventBridge Scheduler's retry defaults and limits.
pub const SCHEDULE_MAX_RETRIES: u32 = 185;
pub const SCHEDULE_MAX_EVENT_AGE: Duration = Duration::from_secs(86_400);

/// `[mapping.source]` with `type = "rabbitmq"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSource {
    /// `amqp://user:pass@host:5672/vhost` or `amqps://…`; `${ENV}` is expanded.
    pub url: SecretUrl,
    /// Queue to consume from.
    pub queue: String,
    /// basic.qos prefetch count. Default: twice the batch size, at least 100, at most 65,535.
    pub prefetch: Option<u16>,
    /// Declare the queue (durable) instead of requiring it to exist. Default: false.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`, declare it with `x-single-active-consumer` so that several gateway
    /// replicas keep the queue's order (one consumes, the others stand by). Default: false.
    #[serde(default)]
    pub single_active_consumer: bool,
    /// PEM file with the CA(s) that sign the broker's certificate (amqps). Default: the
    /// platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// Override the synthetic `eventSourceArn`. Default: built from host and vhost.
    pub event_source_arn: Option<String>,
}

/// `[mapping.batch]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Records per invoke, 1–10,000 (SQS FIFO: 1–10). Default: 100 (SQS: 10).
    pub size: Option<BatchSize>,
    /// Longest wait for a batch to fill, 0–300 s. Default: "500ms" (SQS: 0).
    pub window: Option<BatchWindow>,
    /// Largest event in bytes, at most 6 MB (6,291,456). Default: 6 MB.
    pub max_bytes: Option<ByteSize>,
    /// Bytes of records (as rendered into the event) each lane of a Kafka partition
    /// may hold, waiting or in its batch in flight, 1 MiB–4 GiB; reading the partition
    /// waits while it is full. Default: twice the largest event (12 MiB).
    pub buffer_bytes: Option<BufferBytes>,
}

/// `[mapping.retry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt: -1 (forever) or 0–10,000. Default: -1 (SQS: 0,
    /// the queue redelivers); with an on-failure destination, -1 means 10 (as AWS does
    /// for streams).
    pub max_attempts: Option<RetryAttempts>,
    /// Oldest a record may be before it is parked, 60 s–7 days. Default: no limit.
    pub max_record_age: Option<MaxRecordAge>,
    /// First backoff after a failure. Default: "1s".
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest backoff (doubling from backoff_min, with full jitter). Default: "60s".
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Split a failing batch in two and retry the halves; a split is not a retry.
    /// Default: false.
    #[serde(default)]
    pub bisect_on_error: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: None,
            max_record_age: None,
            backoff_min: default_backoff_min(),
            backoff_max: default_backoff_max(),
            bisect_on_error: false,
        }
    }
}

fn default_backoff_min() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

/// The closed set of on-failure destinations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DestinationConfig {
    /// Append one JSON failure record per line, fsynced before the source is acked.
    File(FileDestination),
    /// Publish to an exchange with publisher confirms (and `mandatory`).
    Rabbitmq(RabbitDestination),
    /// Send to an SQS queue.
    Sqs(SqsDestination),
    /// Produce to a Kafka topic, keyed by the original record's key.
    Kafka(KafkaDestination),
    /// Invoke another function asynchronously with the failure record.
    Lambda(LambdaDestination),
}

/// `on_failure = { type = "sqs", queue_url = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsDestination {
    #[serde(deserialize_with = "env::expand")]
    pub queue_url: String,
    /// Largest message the queue takes. Default: 262,144 (256 KiB).
    pub max_message_bytes: Option<usize>,
    /// Where a failure record too large for a message is kept; the message then carries
    /// its metadata and `payloadLocation`. A record the queue refuses for good is kept
    /// here whole. Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

/// `on_failure = { type = "kafka", bootstrap_servers = "…", topic = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaDestination {
    pub bootstrap_servers: String,
    pub topic: String,
    /// Extra librdkafka producer properties (`${ENV}` is expanded); `acks` other than
    /// `all` is refused. Default: none.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, env::Expanded>,
    /// Where a failure record the topic refuses for good (larger than the producer's
    /// `message.max.bytes` or the topic's `max.message.bytes`) is kept whole.
    /// Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

/// `on_failure = { type = "lambda", function = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambdaDestination {
    #[serde(deserialize_with = "env::expand")]
    pub function: String,
    /// Where a failure record above the 1 MB asynchronous limit is kept; the function then
    /// gets its metadata and `payloadLocation`. A record Lambda refuses for good is kept
    /// here whole. Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

/// `on_failure = { type = "file", … }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDestination {
    /// The JSON-lines file; created if missing (its directory must exist).
    #[serde(deserialize_with = "env::expand_path")]
    pub path: PathBuf,
    /// Rotate when the file reaches this many bytes: it is renamed `<path>.<n>`, n one
    /// above the highest already there, and kept until an operator removes it (a
    /// redrive reads it too). Default: no rotation.
    pub rotate_bytes: Option<u64>,
    /// No longer accepted (refused at load): it removed the oldest rotated file, the only
    /// copy of records already acknowledged. Default: unset.
    pub keep: Option<u32>,
}

/// `on_failure = { type = "rabbitmq", … }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitDestination {
    /// Broker URL; `${ENV}` is expanded.
    pub url: SecretUrl,
    /// Exchange to publish to ("" is the default exchange).
    pub exchange: String,
    /// Routing key. Default: the mapping's name.
    pub routing_key: Option<String>,
    /// PEM CA file for amqps. Default: the platform's trust store.
    pub ca_file: Option<PathBuf>,
}

impl Mapping {
    /// A lane's buffer budget: batch.buffer_bytes, else twice the largest event.
    pub fn buffer_bytes(&self) -> usize {
        self.batch
            .buffer_bytes
            .map_or(2 * self.max_payload(), |b| b.0)
    }

    /// The largest event: batch.max_bytes, else Lambda's limit for the invocation type
    /// (6 MB synchronous, 1 MB asynchronous).
    pub fn max_payload(&self) -> usize {
        match (self.batch.max_bytes, self.invocation_type) {
            (Some(b), _) => b.0,
            (None, InvocationType::Event) => crate::invoke::lambda::MAX_ASYNC_PAYLOAD,
            (None, InvocationType::RequestResponse) => types::MAX_PAYLOAD,
        }
    }

    /// How long one Invoke may take: the configured `function_timeout` or 15 minutes.
    pub fn function_timeout(&self) -> Duration {
        self.function_timeout.unwrap_or(MAX_FUNCTION_TIMEOUT)
    }

    /// Records per batch: the configured size or AWS's default for the source.
    pub fn batch_size(&self) -> usize {
        match (self.batch.size, &self.source) {
            (Some(s), _) => s.0 as usize,
            (None, Source::Sqs(_)) => 10,
            (None, _) => 100,
        }
    }

    /// The batching window: the configured one or AWS's default for the source.
    pub fn batch_window(&self) -> Duration {
        match (self.batch.window, &self.source) {
            (Some(w), _) => w.0,
            (None, Source::Sqs(_)) => Duration::ZERO,
            (None, _) => Duration::from_millis(500),
        }
    }

    /// Retries allowed after the first attempt; None is forever.
    /// A schedule's -1 (the default) is Scheduler's default, 185.
    pub fn retries(&self) -> Option<u32> {
        if let Source::Schedule(_) = self.source {
            return Some(
                self.retry
                    .max_attempts
                    .and_then(|a| u32::try_from(a.0).ok())
                    .unwrap_or(SCHEDULE_MAX_RETRIES),
            );
        }
        let attempts = match (self.retry.max_attempts, &self.source) {
            (Some(a), _) => a.0,
            // SQS, as on AWS: no retries inside the gateway unless asked for; a failed
            // message waits out its visibility timeout in the queue.
            (None, Source::Sqs(_)) => 0,
            (None, _) => -1,
        };
        match attempts {
            -1 if self.on_failure.is_some() => Some(10),
            -1 => None,
            n => Some(n as u32),
        }
    }

    /// Oldest a record may be before it is parked; a schedule's default is 24 hours.
    pub fn max_record_age(&self) -> Option<Duration> {
        let configured = self.retry.max_record_age.map(|a| a.0);
        match self.source {
            Source::Schedule(_) => Some(configured.unwrap_or(SCHEDULE_MAX_EVENT_AGE)),
            _ => configured,
        }
    }

    fn problems(&self, out: &mut Vec<String>) {
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            out.push(format!(
                "mapping {name:?}: name must be 1-64 characters of letters, digits, '-' or '_'"
            ));
        }
        if let Err(e) = crate::invoke::lambda::FunctionRef::parse(&self.function) {
            out.push(format!("mapping {name:?}: function: {e}"));
        }
        if self.invocation_type == InvocationType::Event {
            if self.report_batch_item_failures {
                out.push(format!(
                    "mapping {name:?}: report_batch_item_failures needs invocation_type = \"request_response\": an asynchronous invoke returns no result"
                ));
            }
            if let Some(b) = self.batch.max_bytes
                && b.0 > crate::invoke::lambda::MAX_ASYNC_PAYLOAD
            {
                out.push(format!(
                    "mapping {name:?}: batch.max_bytes ({}) is above the 1 MB limit of asynchronous invokes",
                    b.0
                ));
            }
        }
        if let Some(b) = self.batch.buffer_bytes
            && b.0 < self.max_payload()
        {
            out.push(format!(
                "mapping {name:?}: batch.buffer_bytes ({}) is smaller than the largest event ({}, batch.max_bytes); a batch could never fill",
                b.0,
                self.max_payload()
            ));
        }
        if let Some(t) = self.function_timeout
            && !(Duration::from_secs(1)..=MAX_FUNCTION_TIMEOUT).contains(&t)
        {
            out.push(format!(
                "mapping {name:?}: function_timeout ({}) must be between 1s and 15m, Lambda's longest function timeout",
                humantime::format_duration(t)
            ));
        }
        if let Err(e) = crate::pipeline::filter::Filter::parse(&self.filters) {
            out.push(format!("mapping {name:?}: {e}"));
        }
        let r = &self.retry;
        if r.backoff_min.is_zero() || r.backoff_min > r.backoff_max {
            out.push(format!(
                "mapping {name:?}: retry.backoff_min ({}) must be above zero and at most retry.backoff_max ({})",
                humantime::format_duration(r.backoff_min),
                humantime::format_duration(r.backoff_max)
            ));
        }
        // An SQS message that runs out of retries goes back to its queue (and its redrive
        // policy), and a schedule's exhausted fire is logged and dropped, as Scheduler does
        // without a DLQ: neither needs a destination.
        let limited = r.max_attempts.is_some_and(|a| a.0 >= 0) || r.max_record_age.is_some();
        let releases = matches!(self.source, Source::Sqs(_) | Source::Schedule(_));
        if limited && self.on_failure.is_none() && !releases {
            out.push(format!(
                "mapping {name:?}: retry.max_attempts or retry.max_record_age limits retries but there is no on_failure destination; \
                 exhausted records would be lost, so set on_failure"
            ));
        }
        match &self.source {
            Source::Rabbitmq(s) => {
                if s.queue.is_empty() {
                    out.push(format!("mapping {name:?}: source.queue is empty"));
                }
                if let Some(p) = s.prefetch
                    && (p as usize) < self.batch_size()
                {
                    out.push(format!(
                        "mapping {name:?}: source.prefetch ({p}) is smaller than batch.size ({}); a batch could never fill",
                        self.batch_size()
                    ));
                }
                if s.single_active_consumer && !s.declare {
                    out.push(format!(
                        "mapping {name:?}: source.single_active_consumer needs source.declare = true \
                         (it is a property of the queue, set when it is declared)"
                    ));
                }
                if let Err(e) = s.url.amqp() {
                    out.push(format!(
                        "mapping {name:?}: source.url is not an AMQP URL: {e}"
                    ));
                }
            }
            Source::Sqs(q) => {
                if !q.queue_url.starts_with("http://") && !q.queue_url.starts_with("https://") {
                    out.push(format!(
                        "mapping {name:?}: source.queue_url {:?} is not a queue URL (https://sqs.<region>.amazonaws.com/<account>/<queue>)",
                        q.queue_url
                    ));
                }
                if let Some(c) = q.max_concurrency
                    && !(2..=1000).contains(&c)
                {
                    out.push(format!(
                        "mapping {name:?}: source.max_concurrency must be between 2 and 1000, got {c}"
                    ));
                }
                if q.is_fifo() && self.batch_size() > 10 {
                    out.push(format!(
                        "mapping {name:?}: batch.size must be at most 10 for a FIFO queue, got {}",
                        self.batch_size()
                    ));
                }
                // Without a destination an exhausted half goes back to the queue, while
                // the half after it may already be delivered and deleted: the group's
                // order would be lost.
                if q.is_fifo() && r.bisect_on_error && self.on_failure.is_none() {
                    out.push(format!(
                        "mapping {name:?}: retry.bisect_on_error on a FIFO queue needs an on_failure destination: \
                         without one, a failed first half returns to the queue after the second half was deleted, \
                         which reorders the message group; set on_failure or remove retry.bisect_on_error"
                    ));
                }
            }
            Source::Schedule(s) => {
                if r.max_attempts
                    .is_some_and(|a| a.0 > SCHEDULE_MAX_RETRIES as i32)
                {
                    out.push(format!(
                        "mapping {name:?}: retry.max_attempts of a schedule must be between 0 and {SCHEDULE_MAX_RETRIES}, got {}",
                        r.max_attempts.map_or(-1, |a| a.0)
                    ));
                }
                if let Some(a) = r.max_record_age
                    && a.0 > SCHEDULE_MAX_EVENT_AGE
                {
                    out.push(format!(
                        "mapping {name:?}: retry.max_record_age of a schedule must be between 60s and 24h, got {}",
                        humantime::format_duration(a.0)
                    ));
                }
                let tz = s.timezone.0;
                if let (Some(start), Some(end)) = (&s.start, &s.end)
                    && start.resolve(tz) >= end.resolve(tz)
                {
                    out.push(format!(
                        "mapping {name:?}: source.start must be before source.end"
                    ));
                }
            }
            Source::Kafka(k) => {
                if k.bootstrap_servers.trim().is_empty() {
                    out.push(format!(
                        "mapping {name:?}: source.bootstrap_servers is empty"
                    ));
                }
                if k.topics.is_empty() || k.topics.iter().any(|t| t.is_empty()) {
                    out.push(format!(
                        "mapping {name:?}: source.topics must name at least one topic, none empty"
                    ));
                }
                match (k.starting_position, &k.starting_timestamp) {
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
                if let Some(p) = k.parallelization_factor
                    && !(1..=10).contains(&p)
                {
                    out.push(format!(
                        "mapping {name:?}: source.parallelization_factor must be between 1 and 10, got {p}"
                    ));
                }
                if k.max_concurrency == Some(0) {
                    out.push(format!(
                        "mapping {name:?}: source.max_concurrency must be at least 1"
                    ));
                }
                for key in k.properties.keys() {
                    if MANAGED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                        out.push(format!(
                            "mapping {name:?}: source.properties.\"{key}\" is set by the gateway; use the source's own settings"
                        ));
                    }
                }
            }
        }
        if let Some(DestinationConfig::Rabbitmq(d)) = &self.on_failure
            && let Err(e) = d.url.amqp()
        {
            out.push(format!(
                "mapping {name:?}: on_failure.url is not an AMQP URL: {e}"
            ));
        }
        if let Some(DestinationConfig::Kafka(k)) = &self.on_failure {
            for key in ["acks", "request.required.acks"] {
                if let Some(v) = k.properties.get(key)
                    && !matches!(v.0.as_str(), "all" | "-1")
                {
                    out.push(format!(
                        "mapping {name:?}: on_failure.properties.\"{key}\" = {:?} would let the broker confirm a failure record \
                         before every in-sync replica has it; the gateway always produces with acks = all, so remove it",
                        v.0
                    ));
                }
            }
        }
        if let Some(DestinationConfig::File(f)) = &self.on_failure {
            if f.keep.is_some() {
                out.push(format!(
                    "mapping {name:?}: on_failure.keep is no longer supported: rotated files are kept until an operator removes them \
                     (removing the oldest lost acknowledged records); remove keep"
                ));
            }
            if f.path.file_name().is_none() {
                out.push(format!(
                    "mapping {name:?}: on_failure.path {} does not name a file",
                    f.path.display()
                ));
            }
        }
    }
}

impl Config {
    /// Reads, parses and validates a file: the one loading path of `run` and `validate`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates text read from `path` (named in errors only).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut problems = Vec::new();
        for (key, token) in [
            ("admin.token", &config.admin.token),
            ("admin.read_token", &config.admin.read_token),
        ] {
            if let Some(t) = token
                && t.expose().len() < 16
            {
                problems.push(format!(
                    "{key} is shorter than 16 characters; use a long random string"
                ));
            }
        }
        let mut names = HashSet::new();
        // Two writers rotating one file would each rotate the other's records, and a
        // redrive would replay them into the wrong function.
        let mut files: HashMap<PathBuf, &str> = HashMap::new();
        for m in &config.mappings {
            if !names.insert(m.name.as_str()) {
                problems.push(format!("mapping {:?} is defined twice", m.name));
            }
            if let Some(DestinationConfig::File(f)) = &m.on_failure {
                let key = std::path::absolute(&f.path)
                    .unwrap_or_else(|_| f.path.clone())
                    .components()
                    .collect();
                match files.get(&key) {
                    Some(other) if *other != m.name => problems.push(format!(
                        "mappings {other:?} and {:?} both park into the file {}; give each mapping its own on_failure.path",
                        m.name,
                        f.path.display()
                    )),
                    _ => {
                        files.insert(key, &m.name);
                    }
                }
            }
            m.problems(&mut problems);
            if let Source::Schedule(s) = &m.source
                && s.missed == MissedFire::FireOnce
                && config.schedules.store.is_none()
            {
                problems.push(format!(
                    "mapping {:?}: source.missed = \"fire_once\" needs [schedules] store: without a ledger a restarted gateway cannot know what it missed",
                    m.name
                ));
            }
        }
        if config.schedules.lease < Duration::from_secs(1) {
            problems.push(format!(
                "[schedules] lease must be at least 1s, got {}",
                humantime::format_duration(config.schedules.lease)
            ));
        }
        if let Some(store) = &config.schedules.store
            && let Err(e) = store.expose().parse::<tokio_postgres::Config>()
        {
            problems.push(format!(
                "[schedules] store {store} is not a PostgreSQL URL: {}",
                e.to_string().replace(store.expose(), &store.to_string())
            ));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    pub fn account_id(&self) -> &str {
        self.aws.account_id.as_deref().unwrap_or("000000000000")
    }
}

#[cfg(test)]
mod tests;
