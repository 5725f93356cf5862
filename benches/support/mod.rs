//! Helpers for the RabbitMQ drain benchmark: an in-process Lambda API stub and process
//! statistics read from `/proc`.

pub mod lambda_stub;
pub mod proc_stats;
