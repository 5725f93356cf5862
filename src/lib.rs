//! esm-gateway: AWS Lambda event source mappings for brokers AWS cannot reach.
//!
//! # Layout
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! source (rabbitmq | activemq | kafka | sqs | schedule)
//!                                              source/<kind>/ (schedule: one record per fire)
//!    -> Record { event element, id, key, position, trace, ack }   record.rs, trace.rs
//!    -> batcher (size / bytes / window)         pipeline/batcher.rs, pipeline/budget.rs
//!    -> one batch in flight per ordering unit   source/<kind>/ (queue, partition or lane, receive)
//!    -> deliver: filter, invoke, retry, bisect  pipeline/filter.rs, pipeline/retry.rs
//!         -> Lambda Invoke                      invoke/lambda.rs
//!         -> the source's event (a Shape)       invoke/event.rs, source/<kind>/event.rs
//!         -> its answer                         pipeline/response.rs
//!    -> ack / commit / delete                   source/<kind>/ (Kafka: pipeline/offsets.rs)
//!       | failure record -> on-failure destination   pipeline/park.rs, destination/
//! ```
//!
//! Each kind of source is one folder, `source/<kind>/`: its TOML table, checks and AWS
//! defaults (`config.rs`), its event shape (`event.rs`) and its run loop. The pipeline
//! knows a source only through its [`Shape`](invoke::event::Shape) and what its
//! exhausted records become ([`Exhausted`](pipeline::retry::Exhausted));
//! [`SourceConfig`](source::SourceConfig) is the one place that lists the kinds. Each
//! destination owns its config in `destination/<kind>.rs`.
//!
//! The module graph has no cycle (`tests/layout.rs` checks it), bottom to top:
//! `env`, `trace`, `record`, `status`, `telemetry`, `notify`, `aws` -> `invoke` -> `amqp` ->
//! `destination` -> `pipeline` -> `source` -> `config` -> `runtime`, `redrive`,
//! `admin`, `api`, `main`.
//!
//! - `env`: `${ENV}` expansion and secret-bearing values (`Secret`, `SecretUrl`).
//! - `aws`: the `[aws]` table and the SDK configuration every AWS client shares.
//! - `amqp`: the AMQP connection code shared by the RabbitMQ source, destination and
//!   redrive, and the process's pool of shared connections (one channel per user).
//! - `source::activemq`: ActiveMQ over STOMP 1.2, with the gateway's own small client
//!   (`source/activemq/stomp.rs`; TLS through tokio-rustls).
//! - `config`: the TOML file, composed of each component's config; cross-cutting checks
//!   (shared by `run` and `validate`).
//! - `runtime`: one supervised task per mapping (`supervise.rs`), built from its config
//!   (`build.rs`); enable/disable, reload, shutdown.
//! - `admin`: the admin API (health, readiness, metrics, mapping status and control).
//! - `api`: the Lambda-compatible event source mapping API (SigV4-signed; the AWS CLI,
//!   SDKs and Terraform manage mappings through it), and where it keeps the mappings it
//!   creates: a state file, or PostgreSQL shared by replicas.
//! - `listen`: the bound on connections each of the gateway's listeners holds open, and
//!   the raised file descriptor limit.
//! - `notify`: systemd readiness, reload and watchdog notifications.
//! - `redrive`: replays parked failure records (`esm-gateway redrive`).
//! - `durable`: the atomic file replace (temporary file, fsync, rename, directory fsync).
//! - `pg`: what the PostgreSQL stores (the API's, the schedules') share.
//! - `trace`: a message's trace context (W3C `traceparent`, X-Ray `X-Amzn-Trace-Id`) and
//!   the `X-Amzn-Trace-Id` the invoke carries.
//! - `status`: each mapping's observable state (running, failed and why).
//! - `telemetry`: logging setup, the catalogue of metrics, and the OTLP span exporter
//!   (`telemetry/otlp.rs`).

pub mod admin;
pub mod amqp;
pub mod api;
pub mod aws;
pub mod config;
pub mod destination;
pub mod durable;
pub mod env;
#[cfg(test)]
mod fuzz;
pub mod invoke;
pub mod listen;
pub mod notify;
pub mod pg;
pub mod pipeline;
pub mod record;
pub mod redrive;
pub mod runtime;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod trace;
