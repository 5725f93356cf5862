//! Sources: where records come from. Each folder owns one kind of source whole: its
//! TOML table, checks and AWS defaults (`config.rs`), its event shape (`event.rs`, the
//! [`Shape`] the pipeline renders batches with) and its run loop, which turns the
//! broker's messages into [`Record`](crate::record::Record)s, runs them through the
//! pipeline in its ordering unit (queue, partition, message group) and acknowledges
//! what the pipeline resolved. Schedules make their records, one per fire.
//!
//! [`SourceConfig`] is the closed set of kinds: every function over it is one `match`
//! with one line per kind and no wildcard, so that adding a kind makes the compiler name
//! each place to extend (all in this file).

pub mod activemq;
pub mod kafka;
pub mod rabbitmq;
pub mod schedule;
pub mod sqs;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::invoke::event::Shape;
use crate::pipeline::batcher::BatchLimits;
use crate::pipeline::retry::{Deliverer, Exhausted};
use crate::status::MappingStatus;

/// `[mapping.source]`: the closed set of sources, tagged by `type` (deserialized by
/// hand, below).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Rabbitmq(rabbitmq::config::RabbitSource),
    Activemq(activemq::config::ActiveMqSource),
    Kafka(kafka::config::KafkaSource),
    Sqs(sqs::config::SqsSource),
    Schedule(schedule::config::ScheduleSource),
}

const SOURCE_TYPES: &[&str] = &["rabbitmq", "activemq", "kafka", "sqs", "schedule"];

/// The schema of [`SourceConfig`]: what its hand-written deserializer accepts, a table
/// tagged by `type`.
#[derive(schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(dead_code)]
enum SourceSchema {
    Activemq(activemq::config::ActiveMqSource),
    Rabbitmq(rabbitmq::config::RabbitSource),
    Kafka(kafka::config::KafkaSource),
    Sqs(sqs::config::SqsSource),
    Schedule(schedule::config::ScheduleSource),
}

/// Never called: its match makes the compiler name [`SourceSchema`] when a kind is added.
#[allow(dead_code)]
fn schema_of(source: SourceConfig) -> SourceSchema {
    match source {
        SourceConfig::Activemq(s) => SourceSchema::Activemq(s),
        SourceConfig::Rabbitmq(s) => SourceSchema::Rabbitmq(s),
        SourceConfig::Kafka(s) => SourceSchema::Kafka(s),
        SourceConfig::Sqs(s) => SourceSchema::Sqs(s),
        SourceConfig::Schedule(s) => SourceSchema::Schedule(s),
    }
}

impl schemars::JsonSchema for SourceConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SourceConfig".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        SourceSchema::json_schema(generator)
    }
}

/// AWS's defaults for a kind of source, and what becomes of its records that run out of
/// retries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub batch_size: usize,
    pub batch_window: Duration,
    /// Retries when `retry.max_attempts` is not set: -1 (forever) or a count.
    pub max_attempts: i32,
    /// What -1 (forever) means without an on-failure destination (None: forever).
    pub forever: Option<u32>,
    /// What -1 means with an on-failure destination (AWS's streams: 10).
    pub forever_with_destination: Option<u32>,
    /// Oldest a record may be when `retry.max_record_age` is not set.
    pub max_record_age: Option<Duration>,
    /// Where an exhausted record goes when there is no on-failure destination.
    pub exhausted: Exhausted,
}

/// The stream sources' defaults (RabbitMQ, Kafka): 100 records or 500 ms, retries
/// forever (10 with a destination), exhausted records parked.
pub const STREAM_DEFAULTS: Defaults = Defaults {
    batch_size: 100,
    batch_window: Duration::from_millis(500),
    max_attempts: -1,
    forever: None,
    forever_with_destination: Some(10),
    max_record_age: None,
    exhausted: Exhausted::Park,
};

/// What a source's checks need to know of the rest of its mapping.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The mapping's name, for the messages.
    pub mapping: &'a str,
    /// Records per batch, configured or default.
    pub batch_size: usize,
    /// `retry.max_attempts` and `retry.max_record_age` as configured.
    pub max_attempts: Option<i32>,
    pub max_record_age: Option<Duration>,
    pub bisect: bool,
    /// Whether the mapping has an on-failure destination.
    pub on_failure: bool,
    /// Whether `[schedules] store` (the fire ledger) is configured.
    pub schedule_store: bool,
}

/// What the process shares with every source: AWS settings and clients, the
/// schedules' ledger.
pub struct Env {
    pub sdk: aws_config::SdkConfig,
    pub region: String,
    pub account: String,
    /// The schedules' fire ledger, shared by every schedule mapping.
    pub schedule_store: Option<Arc<schedule::store::Store>>,
    /// The one timer every schedule mapping registers with.
    pub schedule_timer: Arc<schedule::Timer>,
    /// The process's shared AMQP connections (RabbitMQ sources and destinations).
    pub amqp: crate::amqp::Pool,
}

/// What a source runs with.
pub struct Context {
    pub limits: BatchLimits,
    pub deliverer: Arc<Deliverer>,
    pub env: Arc<Env>,
    /// The mapping's `function_timeout`, when configured.
    pub function_timeout: Option<Duration>,
    /// Cancelled to drain: stop taking batches, finish the one in flight.
    pub shutdown: CancellationToken,
}

impl SourceConfig {
    /// Its `type`, as in metrics and failure records.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Rabbitmq(_) => "rabbitmq",
            SourceConfig::Activemq(_) => "activemq",
            SourceConfig::Kafka(_) => "kafka",
            SourceConfig::Sqs(_) => "sqs",
            SourceConfig::Schedule(_) => "schedule",
        }
    }

    pub fn defaults(&self) -> Defaults {
        match self {
            SourceConfig::Rabbitmq(_) => rabbitmq::config::DEFAULTS,
            SourceConfig::Activemq(_) => activemq::config::DEFAULTS,
            SourceConfig::Kafka(_) => kafka::config::DEFAULTS,
            SourceConfig::Sqs(_) => sqs::config::DEFAULTS,
            SourceConfig::Schedule(_) => schedule::config::DEFAULTS,
        }
    }

    /// What is wrong with it, each problem naming the mapping and the field.
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        match self {
            SourceConfig::Rabbitmq(s) => s.problems(facts, out),
            SourceConfig::Activemq(s) => s.problems(facts, out),
            SourceConfig::Kafka(s) => s.problems(facts, out),
            SourceConfig::Sqs(s) => s.problems(facts, out),
            SourceConfig::Schedule(s) => s.problems(facts, out),
        }
    }

    /// The event shape of mapping `name` (Kafka: a placeholder; each partition has its
    /// own).
    pub fn shape(&self, name: &str, region: &str, account: &str) -> Arc<dyn Shape> {
        match self {
            SourceConfig::Rabbitmq(s) => Arc::new(s.shape(region, account)),
            SourceConfig::Activemq(s) => Arc::new(s.shape(region, account)),
            SourceConfig::Kafka(s) => Arc::new(s.shape(name, region, account)),
            SourceConfig::Sqs(s) => Arc::new(s.shape()),
            SourceConfig::Schedule(s) => Arc::new(s.shape(name, region, account)),
        }
    }

    /// The RabbitMQ broker it reads from, where a redrive may read parked records back.
    pub fn rabbitmq_url(&self) -> Option<&crate::env::SecretUrl> {
        match self {
            SourceConfig::Rabbitmq(s) => Some(&s.url),
            SourceConfig::Activemq(_)
            | SourceConfig::Kafka(_)
            | SourceConfig::Sqs(_)
            | SourceConfig::Schedule(_) => None,
        }
    }

    /// The schedule it is, if it is one (for `esm-gateway schedules`).
    pub fn as_schedule(&self) -> Option<&schedule::config::ScheduleSource> {
        match self {
            SourceConfig::Schedule(s) => Some(s),
            SourceConfig::Rabbitmq(_)
            | SourceConfig::Activemq(_)
            | SourceConfig::Kafka(_)
            | SourceConfig::Sqs(_) => None,
        }
    }

    /// Runs the source until `context.shutdown`, having drained its batch in flight.
    pub async fn run(&self, context: Context) {
        match self {
            SourceConfig::Rabbitmq(s) => rabbitmq::run(s, context).await,
            SourceConfig::Activemq(s) => activemq::run(s, context).await,
            SourceConfig::Kafka(s) => kafka::run(s, context).await,
            SourceConfig::Sqs(s) => sqs::run(s, context).await,
            SourceConfig::Schedule(s) => schedule::run_source(s, context).await,
        }
    }
}

/// Like `#[serde(tag = "type")]`, except that when `type` comes first (as in every
/// example) the rest of the table goes straight to the variant's deserializer, so an
/// error in a field keeps that field's line; serde's tagged enums buffer the table and
/// lose it. Otherwise the table is buffered and errors point at the table.
impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SourceVisitor)
    }
}

/// Deserializes the variant named `kind` from `rest`, the table without its `type`.
fn variant<'de, D: serde::Deserializer<'de>>(
    kind: &str,
    rest: D,
) -> Result<SourceConfig, D::Error> {
    use serde::de::Error as _;
    match kind {
        "rabbitmq" => Deserialize::deserialize(rest).map(SourceConfig::Rabbitmq),
        "activemq" => Deserialize::deserialize(rest).map(SourceConfig::Activemq),
        "kafka" => Deserialize::deserialize(rest).map(SourceConfig::Kafka),
        "sqs" => Deserialize::deserialize(rest).map(SourceConfig::Sqs),
        "schedule" => Deserialize::deserialize(rest).map(SourceConfig::Schedule),
        other => Err(D::Error::unknown_variant(other, SOURCE_TYPES)),
    }
}

struct SourceVisitor;

impl<'de> serde::de::Visitor<'de> for SourceVisitor {
    type Value = SourceConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a source table with a `type`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<SourceConfig, A::Error> {
        use serde::de::Error as _;
        use serde::de::value::MapAccessDeserializer;
        let Some(first) = map.next_key::<String>()? else {
            return Err(A::Error::missing_field("type"));
        };
        if first == "type" {
            let kind: String = map.next_value()?;
            return variant(&kind, MapAccessDeserializer::new(map));
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
        variant(&kind, toml::Value::Table(table)).map_err(|e| A::Error::custom(e.message()))
    }
}

/// Runs a broker session after another until one ends cleanly (shutdown) or `shutdown`
/// comes: after each that ends in an error, logs it as "`<broker>` session ended",
/// reports it on `status` (as a failure of the mapping when `fatal` says so, else as an
/// error) and waits [`reconnect_delay`], counted afresh after a session that lasted 30 s.
pub async fn reconnect_loop<E, F, Fut>(
    broker: &str,
    status: &MappingStatus,
    shutdown: &CancellationToken,
    mut session: F,
    fatal: impl Fn(&E) -> bool,
) where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        let Err(e) = session().await else { break };
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        failures += 1;
        let delay = reconnect_delay(failures);
        tracing::warn!(mapping = %status.name, error = %e, retry_in = ?delay, "{broker} session ended");
        if fatal(&e) {
            status.fail(&e);
        } else {
            status.error(&e);
        }
        pause(delay, shutdown).await;
    }
}

/// How long a source waits before reconnecting after `failures` consecutive failures:
/// 0.5 s, doubling, at most 30 s.
pub fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(250 * (1u64 << failures.clamp(1, 7))).min(Duration::from_secs(30))
}

/// Sleeps for `delay`, or until shutdown if that comes first.
pub async fn pause(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = shutdown.cancelled() => {}
    }
}
