//! An SQS source's configuration: its TOML table and its checks.

use std::time::Duration;

use serde::Deserialize;

use super::event::SqsShape;
use crate::pipeline::retry::Exhausted;
use crate::source::{Defaults, Facts};

/// `[mapping.source]` with `type = "sqs"`: a standard or FIFO queue.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqsSource {
    /// The queue URL (a FIFO queue's ends in ".fifo").
    #[serde(deserialize_with = "crate::env::expand")]
    pub queue_url: String,
    /// Most batches in flight at once, 2–1,000 (AWS's MaximumConcurrency). Default: 5.
    pub max_concurrency: Option<u32>,
    /// Kept for configurations written before the mapping's own `function_timeout`
    /// (which is preferred): the same start-up check of the queue's visibility timeout.
    /// Default: the mapping's `function_timeout` when set, else no check.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub function_timeout: Option<Duration>,
}

impl SqsSource {
    pub fn is_fifo(&self) -> bool {
        self.queue_url.ends_with(".fifo")
    }
}

/// AWS's defaults for SQS mappings: 10 records, no window, no retries inside the
/// gateway (a failed message waits out its visibility timeout in the queue), and an
/// exhausted message goes back to the queue and its redrive policy.
pub const DEFAULTS: Defaults = Defaults {
    batch_size: 10,
    batch_window: Duration::ZERO,
    max_attempts: 0,
    forever: None,
    forever_with_destination: Some(10),
    max_record_age: None,
    exhausted: Exhausted::Release,
};

impl SqsSource {
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        let name = facts.mapping;
        if !self.queue_url.starts_with("http://") && !self.queue_url.starts_with("https://") {
            out.push(format!(
                "mapping {name:?}: source.queue_url {:?} is not a queue URL (https://sqs.<region>.amazonaws.com/<account>/<queue>)",
                self.queue_url
            ));
        }
        if let Some(c) = self.max_concurrency
            && !(2..=1000).contains(&c)
        {
            out.push(format!(
                "mapping {name:?}: source.max_concurrency must be between 2 and 1000, got {c}"
            ));
        }
        if self.is_fifo() && facts.batch_size > 10 {
            out.push(format!(
                "mapping {name:?}: batch.size must be at most 10 for a FIFO queue, got {}",
                facts.batch_size
            ));
        }
        // Without a destination an exhausted half goes back to the queue, while the half
        // after it may already be delivered and deleted: the group's order would be lost.
        if self.is_fifo() && facts.bisect && !facts.on_failure {
            out.push(format!(
                "mapping {name:?}: retry.bisect_on_error on a FIFO queue needs an on_failure destination: \
                 without one, a failed first half returns to the queue after the second half was deleted, \
                 which reorders the message group; set on_failure or remove retry.bisect_on_error"
            ));
        }
    }

    pub fn shape(&self) -> SqsShape {
        SqsShape {
            queue_url: self.queue_url.clone(),
            fifo: self.is_fifo(),
        }
    }
}
