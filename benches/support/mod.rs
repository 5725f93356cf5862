//! Helpers for the drain benchmarks (RabbitMQ, Kafka): an in-process Lambda API stub and process
//! statistics read from `/proc`.

// Each bench compiles its own copy of these modules and uses only part of them.
#[allow(dead_code)]
pub mod gateway;
#[allow(dead_code)]
pub mod lambda_stub;
#[allow(dead_code)]
pub mod proc_stats;
