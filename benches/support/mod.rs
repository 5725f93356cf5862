//! Helpers for the benchmarks: starting and stopping the gateway, an in-process Lambda API
//! stub, process statistics read from `/proc`, and the knobs' parsing.

// Each bench compiles its own copy of these modules and uses only part of them.
#[allow(dead_code)]
pub mod gateway;
#[allow(dead_code)]
pub mod lambda_stub;
#[allow(dead_code)]
pub mod proc_stats;

use std::time::Duration;

use anyhow::{Context, Result};

/// A numeric knob from the environment: `default` when unset, an error naming it when
/// it is not a number.
#[allow(dead_code)]
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// A count of records over a span.
#[allow(dead_code)]
pub struct Drain {
    pub records: u64,
    pub elapsed: Duration,
}

#[allow(dead_code)]
impl Drain {
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}
