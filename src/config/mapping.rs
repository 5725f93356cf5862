//! One `[[mapping]]`: its keys, its batching and retry tables, the defaults it takes from
//! its source, and the checks of the mapping as a whole (the source's and the
//! destination's own checks are theirs).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{
    BatchSize, BatchWindow, BufferBytes, ByteSize, MaxRecordAge, RetryAttempts, types, yes,
};
use crate::destination::DestinationConfig;
use crate::invoke::lambda::FunctionRef;
use crate::pipeline::filter::Filter;
use crate::pipeline::retry::Exhausted;
use crate::source::{Facts, SourceConfig};

/// One `[[mapping]]`: a source drained into a function.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Unique name; used in logs, metrics, the default consumer tag and synthetic ARNs.
    pub name: String,
    /// Function name, `name:alias`, `name:version`, full or partial ARN.
    #[serde(deserialize_with = "crate::env::expand")]
    pub function: String,
    /// AWS's Enabled flag: false neither polls nor invokes. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where records come from, tagged by `type`.
    pub source: SourceConfig,
    /// `[mapping.batch]`: when a batch closes.
    #[serde(default)]
    pub batch: Batching,
    /// `[mapping.retry]`: what happens to a failed batch.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// "request_response" (synchronous: the function's result decides the batch) or
    /// "event" (asynchronous: Lambda accepting the event counts as delivered; 1 MB cap).
    /// Default: "request_response".
    #[serde(default)]
    pub invocation_type: InvocationType,
    /// Parse `{"batchItemFailures":[...]}` from the function's result. Default: false.
    #[serde(default)]
    pub report_batch_item_failures: bool,
    /// Longest wait for one Invoke to answer, 1 s–15 min; past it the attempt is abandoned
    /// and retried as a transient error (without spending a retry), so a connection that a
    /// firewall dropped silently cannot stall the mapping. Set it to the function's own
    /// timeout plus a margin. When set, an SQS source also checks at start-up that the
    /// queue's visibility timeout covers the batching window plus this. Default: "15m"
    /// (Lambda's maximum function timeout).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub function_timeout: Option<Duration>,
    /// Where records go when they cannot be delivered. Default: none.
    pub on_failure: Option<DestinationConfig>,
    /// Up to five AWS FilterCriteria patterns (JSON text); a record passes if any
    /// matches, and one that none matches is acknowledged without an invoke. Default:
    /// none (everything passes).
    #[serde(default)]
    pub filters: Vec<String>,
    /// What validation made of `function` and `filters`, kept so that nothing parses
    /// them again (set by [`Config::parse`]; compares equal whatever it holds).
    #[serde(skip)]
    pub checked: Checked,
}

/// A mapping's values as validation parsed them.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub function: Option<FunctionRef>,
    /// The compiled filter criteria; None when there are none.
    pub filter: Option<Arc<Filter>>,
}

/// Derived from fields that are compared themselves.
impl PartialEq for Checked {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Lambda's longest function timeout, and the default `function_timeout`.
pub const MAX_FUNCTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How the function is invoked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvocationType {
    #[default]
    RequestResponse,
    Event,
}

/// `[mapping.batch]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Records per invoke, 1–10,000 (SQS FIFO: 1–10). Default: 100 (SQS: 10).
    pub size: Option<BatchSize>,
    /// Longest wait for a batch to fill, 0–300 s. Default: "500ms" (SQS: 0).
    pub window: Option<BatchWindow>,
    /// Largest event in bytes, at most 6 MB (6,291,456). Default: 6 MB.
    pub max_bytes: Option<ByteSize>,
    /// Bytes of records (as rendered into the event) each lane of a Kafka partition
    /// may hold, waiting or in its batch in flight, 1 MiB–4 GiB; reading the partition
    /// waits while it is full. Default: twice the largest event (12 MiB).
    pub buffer_bytes: Option<BufferBytes>,
}

/// `[mapping.retry]`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt: -1 (forever) or 0–10,000. Default: -1 (SQS: 0,
    /// the queue redelivers); with an on-failure destination, -1 means 10 (as AWS does
    /// for streams).
    pub max_attempts: Option<RetryAttempts>,
    /// Oldest a record may be before it is parked, 60 s–7 days. Default: no limit.
    pub max_record_age: Option<MaxRecordAge>,
    /// First backoff after a failure. Default: "1s".
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub backoff_min: Duration,
    /// Longest backoff (doubling from backoff_min; each wait is drawn between half and all of
    /// its length, so that replicas do not retry in step). Default: "60s".
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub backoff_max: Duration,
    /// Split a failing batch in two and retry the halves; a split is not a retry.
    /// Default: false.
    #[serde(default)]
    pub bisect_on_error: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: None,
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

impl Mapping {
    /// A lane's buffer budget: batch.buffer_bytes, else twice the largest event.
    pub fn buffer_bytes(&self) -> usize {
        self.batch
            .buffer_bytes
            .map_or(2 * self.max_payload(), |b| b.0)
    }

    /// The largest event: batch.max_bytes, else Lambda's limit for the invocation type
    /// (6 MB synchronous, 1 MB asynchronous).
    pub fn max_payload(&self) -> usize {
        match (self.batch.max_bytes, self.invocation_type) {
            (Some(b), _) => b.0,
            (None, InvocationType::Event) => crate::invoke::lambda::MAX_ASYNC_PAYLOAD,
            (None, InvocationType::RequestResponse) => types::MAX_PAYLOAD,
        }
    }

    /// How long one Invoke may take: the configured `function_timeout` or 15 minutes.
    pub fn function_timeout(&self) -> Duration {
        self.function_timeout.unwrap_or(MAX_FUNCTION_TIMEOUT)
    }

    /// Records per batch: the configured size or AWS's default for the source.
    pub fn batch_size(&self) -> usize {
        self.batch
            .size
            .map_or(self.source.defaults().batch_size, |s| s.0 as usize)
    }

    /// The batching window: the configured one or AWS's default for the source.
    pub fn batch_window(&self) -> Duration {
        self.batch
            .window
            .map_or(self.source.defaults().batch_window, |w| w.0)
    }

    /// Retries allowed after the first attempt; None is forever.
    pub fn retries(&self) -> Option<u32> {
        let defaults = self.source.defaults();
        let attempts = self
            .retry
            .max_attempts
            .map_or(defaults.max_attempts, |a| a.0);
        match attempts {
            -1 if self.on_failure.is_some() => defaults.forever_with_destination,
            -1 => defaults.forever,
            n => Some(n as u32),
        }
    }

    /// Oldest a record may be before it is parked (a schedule's default: 24 hours).
    pub fn max_record_age(&self) -> Option<Duration> {
        self.retry
            .max_record_age
            .map(|a| a.0)
            .or(self.source.defaults().max_record_age)
    }

    /// Checks the mapping, adding a sentence per problem to `out`, and returns what the
    /// checks parsed.
    pub(super) fn problems(&self, schedule_store: bool, out: &mut Vec<String>) -> Checked {
        let mut checked = Checked::default();
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
        match FunctionRef::parse(&self.function) {
            Ok(f) => checked.function = Some(f),
            Err(e) => out.push(format!("mapping {name:?}: function: {e}")),
        }
        if self.invocation_type == InvocationType::Event {
            if self.report_batch_item_failures {
                out.push(format!(
                    "mapping {name:?}: report_batch_item_failures needs invocation_type = \"request_response\": an asynchronous invoke returns no result"
                ));
            }
            if let Some(b) = self.batch.max_bytes
                && b.0 > crate::invoke::lambda::MAX_ASYNC_PAYLOAD
            {
                out.push(format!(
                    "mapping {name:?}: batch.max_bytes ({}) is above the 1 MB limit of asynchronous invokes",
                    b.0
                ));
            }
        }
        if let Some(b) = self.batch.buffer_bytes
            && b.0 < self.max_payload()
        {
            out.push(format!(
                "mapping {name:?}: batch.buffer_bytes ({}) is smaller than the largest event ({}, batch.max_bytes); a batch could never fill",
                b.0,
                self.max_payload()
            ));
        }
        if let Some(t) = self.function_timeout
            && !(Duration::from_secs(1)..=MAX_FUNCTION_TIMEOUT).contains(&t)
        {
            out.push(format!(
                "mapping {name:?}: function_timeout ({}) must be between 1s and 15m, Lambda's longest function timeout",
                humantime::format_duration(t)
            ));
        }
        match Filter::parse(&self.filters) {
            Ok(f) => checked.filter = (!self.filters.is_empty()).then(|| Arc::new(f)),
            Err(e) => out.push(format!("mapping {name:?}: {e}")),
        }
        let r = &self.retry;
        if r.backoff_min.is_zero() || r.backoff_min > r.backoff_max {
            out.push(format!(
                "mapping {name:?}: retry.backoff_min ({}) must be above zero and at most retry.backoff_max ({})",
                humantime::format_duration(r.backoff_min),
                humantime::format_duration(r.backoff_max)
            ));
        }
        // Where exhausted records go back to the source (SQS: the queue and its redrive
        // policy) or are dropped (a schedule's fire, as Scheduler does without a DLQ), no
        // destination is needed.
        let limited = r.max_attempts.is_some_and(|a| a.0 >= 0) || r.max_record_age.is_some();
        let parks = self.source.defaults().exhausted == Exhausted::Park;
        if limited && self.on_failure.is_none() && parks {
            out.push(format!(
                "mapping {name:?}: retry.max_attempts or retry.max_record_age limits retries but there is no on_failure destination; \
                 exhausted records would be lost, so set on_failure"
            ));
        }
        let facts = Facts {
            mapping: name,
            batch_size: self.batch_size(),
            max_attempts: r.max_attempts.map(|a| a.0),
            max_record_age: r.max_record_age.map(|a| a.0),
            bisect: r.bisect_on_error,
            on_failure: self.on_failure.is_some(),
            schedule_store,
        };
        self.source.problems(&facts, out);
        if let Some(d) = &self.on_failure {
            d.problems(name, out);
        }
        checked
    }
}
