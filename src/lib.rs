//! esm-gateway: AWS Lambda event source mappings for brokers AWS cannot reach.
//!
//! # Layout
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! source (rabbitmq | kafka | schedule)  source/ (schedule: one timer task, one record per fire)
//!    -> Record { event element, id, position, ack handle }   record.rs
//!    -> batcher (size / bytes / window)   pipeline/batcher.rs
//!    -> one batch in flight per queue     source/ (the source owns ordering)
//!    -> deliver: invoke, retry, bisect    pipeline/retry.rs
//!         -> Lambda Invoke, AWS event     invoke/lambda.rs, invoke/event.rs
//!    -> ack | on-failure destination      destination/
//! ```
//!
//! - `admin`: the admin API (health, readiness, metrics, mapping status and control).
//! - `config`: the TOML model, defaults and validation (shared by `run` and `validate`).
//! - `runtime`: one supervised task per mapping; enable/disable, reload, shutdown.
//! - `notify`: systemd readiness, reload and watchdog notifications.
//! - `status`: each mapping's observable state (running, failed and why).
//! - `telemetry`: logging setup and the catalogue of metrics.

pub mod admin;
pub mod config;
pub mod destination;
pub mod invoke;
pub mod notify;
pub mod pipeline;
pub mod record;
pub mod redrive;
pub mod runtime;
pub mod source;
pub mod status;
pub mod telemetry;
