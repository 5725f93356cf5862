//! esm-gateway: AWS Lambda event source mappings for brokers AWS cannot reach.
//!
//! # Layout
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! source (rabbitmq | kafka | sqs | schedule)   source/ (schedule: one record per fire)
//!    -> Record { event element, id, key, position, ack handle }   record.rs
//!    -> batcher (size / bytes / window)         pipeline/batcher.rs
//!    -> one batch in flight per ordering unit   source/ (queue, partition or lane, receive)
//!    -> deliver: filter, invoke, retry, bisect  pipeline/filter.rs, pipeline/retry.rs
//!         -> Lambda Invoke, AWS event           invoke/lambda.rs, invoke/event.rs
//!    -> ack / commit / delete                   source/ (Kafka: pipeline/offsets.rs)
//!       | on-failure destination                destination/
//! ```
//!
//! - `admin`: the admin API (health, readiness, metrics, mapping status and control).
//! - `config`: the TOML model, defaults and validation (shared by `run` and `validate`).
//! - `runtime`: one supervised task per mapping; enable/disable, reload, shutdown.
//! - `notify`: systemd readiness, reload and watchdog notifications.
//! - `redrive`: replays parked failure records (`esm-gateway redrive`).
//! - `status`: each mapping's observable state (running, failed and why).
//! - `telemetry`: logging setup and the catalogue of metrics.

pub mod admin;
pub mod config;
pub mod destination;
#[cfg(test)]
mod fuzz;
pub mod invoke;
pub mod notify;
pub mod pipeline;
pub mod record;
pub mod redrive;
pub mod runtime;
pub mod source;
pub mod status;
pub mod telemetry;
