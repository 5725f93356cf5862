//! A schedule's event: one fire is one record whose fragment is the whole event (a
//! Scheduled Event or the configured input), rendered when it fired; only the attempt
//! number is substituted per invoke.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::invoke::event::{Decoded, Shape, rfc3339};
use crate::record::Record;

/// Scheduler's placeholder for the attempt number, substituted at each invoke.
pub const ATTEMPT_NUMBER: &str = "<aws.scheduler.attempt-number>";

#[derive(Debug, Clone)]
pub struct ScheduleShape {
    pub name: String,
    /// The rule ARN (Scheduled Event) or schedule ARN (input) the event names.
    pub arn: String,
    pub expression: String,
}

impl Shape for ScheduleShape {
    fn kind(&self) -> &'static str {
        "schedule"
    }

    fn render(&self, records: &[Record], attempt: u32) -> Vec<u8> {
        match records {
            [] => b"{}".to_vec(),
            [r, ..] => r
                .fragment
                .replace(ATTEMPT_NUMBER, itoa::Buffer::new().format(attempt))
                .into_bytes(),
        }
    }

    /// A fire has no partial batch response.
    fn item_indexes(&self, _id: &Value, _records: &[Record]) -> Vec<usize> {
        Vec::new()
    }

    fn batch_info(&self, records: &[Record]) -> (&'static str, Value) {
        let first = records.first();
        (
            "ScheduleInfo",
            json!({
                "scheduleName": self.name,
                "scheduleArn": self.arn,
                "expression": self.expression,
                "scheduledTime": first.map(|r| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(r.position))),
                "executionId": first.and_then(|r| r.id.as_deref()),
                "firedTime": first.map(|r| rfc3339(r.received_at)),
            }),
        )
    }

    fn decoded(&self) -> &'static [Decoded] {
        &[]
    }
}
