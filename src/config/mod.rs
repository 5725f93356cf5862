//! The TOML model of a gateway: one `[aws]` table and any number of `[[mapping]]`s.
//!
//! Owns parsing and validation and nothing else (no I/O beyond reading the file), so
//! `esm-gateway validate` and `esm-gateway run` share one code path. Range checks live in
//! the field types' deserializers, so the TOML parser reports them with the line and
//! column of the offending value; checks across fields run after parsing and name the
//! mapping and the field. Defaults are AWS's (see the README's configuration reference).

mod env;
mod types;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use env::{Secret, SecretUrl};
pub use types::{BatchSize, BatchWindow, ByteSize, MaxRecordAge, RetryAttempts};

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
    /// The event source mappings, each `[[mapping]]` one.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_admin_listen(),
            token: None,
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
    /// Parse `{"batchItemFailures":[...]}` from the function's result. Default: false.
    #[serde(default)]
    pub report_batch_item_failures: bool,
    /// Where records go when they cannot be delivered. Default: none.
    pub on_failure: Option<DestinationConfig>,
}

fn yes() -> bool {
    true
}

/// The closed set of sources.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Source {
    Rabbitmq(RabbitSource),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Rabbitmq(_) => "rabbitmq",
        }
    }
}

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
    /// Records per invoke, 1–10,000. Default: 100.
    pub size: Option<BatchSize>,
    /// Longest wait for a batch to fill, 0–300 s. Default: "500ms".
    pub window: Option<BatchWindow>,
    /// Largest event in bytes, at most 6 MB (6,291,456). Default: 6 MB.
    pub max_bytes: Option<ByteSize>,
}

impl Batching {
    pub fn size(&self) -> usize {
        self.size.map_or(100, |s| s.0 as usize)
    }
    pub fn window(&self) -> Duration {
        self.window.map_or(Duration::from_millis(500), |w| w.0)
    }
    pub fn max_bytes(&self) -> usize {
        self.max_bytes.map_or(types::MAX_PAYLOAD, |b| b.0)
    }
}

/// `[mapping.retry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt: -1 (forever) or 0–10,000. Default: -1; with an
    /// on-failure destination, -1 means 10 (as AWS does for streams).
    #[serde(default)]
    pub max_attempts: RetryAttempts,
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
            max_attempts: RetryAttempts::default(),
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
}

/// `on_failure = { type = "file", … }`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDestination {
    /// The JSON-lines file; created if missing (its directory must exist).
    #[serde(deserialize_with = "env::expand_path")]
    pub path: PathBuf,
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
    /// Retries allowed after the first attempt; None is forever.
    pub fn retries(&self) -> Option<u32> {
        match self.retry.max_attempts.0 {
            -1 if self.on_failure.is_some() => Some(10),
            -1 => None,
            n => Some(n as u32),
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
        let r = &self.retry;
        if r.backoff_min.is_zero() || r.backoff_min > r.backoff_max {
            out.push(format!(
                "mapping {name:?}: retry.backoff_min ({}) must be above zero and at most retry.backoff_max ({})",
                humantime::format_duration(r.backoff_min),
                humantime::format_duration(r.backoff_max)
            ));
        }
        let limited = r.max_attempts.0 >= 0 || r.max_record_age.is_some();
        if limited && self.on_failure.is_none() {
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
                    && (p as usize) < self.batch.size()
                {
                    out.push(format!(
                        "mapping {name:?}: source.prefetch ({p}) is smaller than batch.size ({}); a batch could never fill",
                        self.batch.size()
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
        }
        if let Some(DestinationConfig::Rabbitmq(d)) = &self.on_failure
            && let Err(e) = d.url.amqp()
        {
            out.push(format!(
                "mapping {name:?}: on_failure.url is not an AMQP URL: {e}"
            ));
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
        if let Some(t) = &config.admin.token
            && t.expose().len() < 16
        {
            problems.push(
                "admin.token is shorter than 16 characters; use a long random string".to_owned(),
            );
        }
        let mut names = HashSet::new();
        for m in &config.mappings {
            if !names.insert(m.name.as_str()) {
                problems.push(format!("mapping {:?} is defined twice", m.name));
            }
            m.problems(&mut problems);
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
