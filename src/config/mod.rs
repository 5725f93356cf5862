//! The TOML model of a gateway: one `[aws]` table and any number of `[[mapping]]`s.
//!
//! Owns parsing and validation and nothing else (no I/O beyond reading the file), so
//! `esm-gateway validate` and `esm-gateway run` share one code path. Range checks live in
//! the field types' deserializers, so the TOML parser reports them with the line and
//! column of the offending value; checks across fields run after parsing and name the
//! mapping and the field. Defaults are AWS's (see the README's configuration reference).

mod api;
mod mapping;
mod types;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::aws::AwsConfig;
pub use crate::destination::DestinationConfig;
pub use crate::env::{Expanded, Secret, SecretUrl};
pub use crate::source::SourceConfig;
pub use crate::telemetry::otlp::TelemetryConfig;
pub use api::{ApiConfig, ApiKey, BrokerConfig, NamedDestination, SecretConfig};
pub use mapping::{Batching, Checked, InvocationType, MAX_FUNCTION_TIMEOUT, Mapping, RetryPolicy};
pub use types::{BatchSize, BatchWindow, BufferBytes, ByteSize, MaxRecordAge, RetryAttempts};

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
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
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
    /// `[api]`: the Lambda-compatible event source mapping API.
    #[serde(default)]
    pub api: ApiConfig,
    /// `[[broker]]`: RabbitMQ brokers that API requests name by Amazon MQ ARN.
    #[serde(default, rename = "broker")]
    pub brokers: Vec<BrokerConfig>,
    /// `[[secret]]`: credentials that API requests name in SourceAccessConfigurations.
    #[serde(default, rename = "secret")]
    pub secrets: Vec<SecretConfig>,
    /// `[[destination]]`: on-failure destinations that API requests name.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<NamedDestination>,
    /// Settings shared by every schedule mapping.
    #[serde(default)]
    pub schedules: SchedulesConfig,
    /// `[telemetry]`: export of the gateway's own spans.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The event source mappings, each `[[mapping]]` one.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
}

/// `[schedules]`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
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
    #[schemars(with = "String")]
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

/// `[gateway]`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// How long shutdown waits for in-flight invokes before giving up. Default: "30s".
    #[serde(default = "default_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
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
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
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

fn yes() -> bool {
    true
}

/// The JSON Schema (draft 7, which TOML editors read) of the file, generated from the
/// types that parse it; `esm-gateway config-schema` prints it and
/// `config/esm-gateway.schema.json` is a copy (a test keeps them equal). It describes the
/// shape and the per-field ranges; the checks across fields are `Config::parse`'s.
pub fn schema() -> String {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<Config>();
    schema.insert("title".into(), "esm-gateway configuration".into());
    serde_json::to_string_pretty(&schema).expect("a schema is JSON")
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
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
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
        api_problems(&config, &mut problems);
        let mut names = HashSet::new();
        // Two writers rotating one file would each rotate the other's records, and a
        // redrive would replay them into the wrong function.
        let mut files: HashMap<PathBuf, &str> = HashMap::new();
        let mut checked = Vec::with_capacity(config.mappings.len());
        for m in &config.mappings {
            if !names.insert(m.name.as_str()) {
                problems.push(format!("mapping {:?} is defined twice", m.name));
            }
            if let Some(path) = m
                .on_failure
                .as_ref()
                .and_then(DestinationConfig::exclusive_path)
            {
                let key = std::path::absolute(path)
                    .unwrap_or_else(|_| path.to_owned())
                    .components()
                    .collect();
                match files.get(&key) {
                    Some(other) if *other != m.name => problems.push(format!(
                        "mappings {other:?} and {:?} both park into the file {}; give each mapping its own on_failure.path",
                        m.name,
                        path.display()
                    )),
                    _ => {
                        files.insert(key, &m.name);
                    }
                }
            }
            checked.push(m.problems(config.schedules.store.is_some(), &mut problems));
        }
        if config.schedules.lease < Duration::from_secs(1) {
            problems.push(format!(
                "[schedules] lease must be at least 1s, got {}",
                humantime::format_duration(config.schedules.lease)
            ));
        }
        for (table, store) in [
            ("[schedules]", &config.schedules.store),
            ("[api]", &config.api.store),
        ] {
            if let Some(store) = store
                && let Err(e) = store.expose().parse::<tokio_postgres::Config>()
            {
                problems.push(format!(
                    "{table} store {store} is not a PostgreSQL URL: {}",
                    e.to_string().replace(store.expose(), &store.to_string())
                ));
            }
        }
        if config.api.store.is_some() && config.api.store_refresh < Duration::from_secs(1) {
            problems.push(format!(
                "[api] store_refresh must be at least 1s, got {}",
                humantime::format_duration(config.api.store_refresh)
            ));
        }
        problems.extend(config.telemetry.problem());
        for (m, c) in config.mappings.iter_mut().zip(checked) {
            m.checked = c;
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
        self.aws.account_id()
    }

    /// Checks one mapping made outside the file (by the API) as [`Config::parse`] checks
    /// the file's, and records what the checks parsed; Err lists the problems.
    pub fn check_mapping(&self, m: &mut Mapping) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        m.checked = m.problems(self.schedules.store.is_some(), &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The checks of `[api]`, `[[broker]]`, `[[secret]]` and `[[destination]]`.
fn api_problems(config: &Config, problems: &mut Vec<String>) {
    let mut ids = HashSet::new();
    for k in &config.api.keys {
        if k.access_key_id.is_empty() || !ids.insert(k.access_key_id.as_str()) {
            problems.push(format!(
                "[[api.key]] access_key_id {:?} is empty or listed twice",
                k.access_key_id
            ));
        }
        if k.secret_access_key.expose().len() < 16 {
            problems.push(format!(
                "[[api.key]] {}: secret_access_key is shorter than 16 characters; use a long random string",
                k.access_key_id
            ));
        }
    }
    if config.api.cert_file.is_some() != config.api.key_file.is_some() {
        problems.push(
            "[api] cert_file and key_file go together: give both for HTTPS, or neither".into(),
        );
    }
    let mut brokers = HashSet::new();
    for b in &config.brokers {
        if !brokers.insert(b.name.as_str()) {
            problems.push(format!("broker {:?} is defined twice", b.name));
        }
        if let Some(e) = b.url_problem() {
            problems.push(format!("broker {:?}: {e}", b.name));
        }
    }
    let mut secrets = HashSet::new();
    for s in &config.secrets {
        if !secrets.insert(s.name.as_str()) {
            problems.push(format!("secret {:?} is defined twice", s.name));
        }
        if let Some(e) = s.problem() {
            problems.push(format!("secret {:?}: {e}", s.name));
        }
    }
    let mut destinations = HashSet::new();
    for d in &config.destinations {
        if !destinations.insert(d.name.as_str()) {
            problems.push(format!("destination {:?} is defined twice", d.name));
        }
        // The destination's own checks speak of a mapping's on_failure table.
        let mut own = Vec::new();
        d.destination.problems(&d.name, &mut own);
        let said = format!("mapping {:?}: on_failure.", d.name);
        problems.extend(
            own.into_iter()
                .map(|p| p.replace(&said, &format!("destination {:?}: ", d.name))),
        );
    }
}

#[cfg(test)]
mod tests;
