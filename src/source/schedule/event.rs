//! A schedule's event: one fire is one record whose fragment is the whole event (a
//! Scheduled Event or the configured input), rendered when it fired; only the attempt
//! number and the execution id are substituted per invoke.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::invoke::event::{Decoded, Shape, rfc3339};
use crate::record::Record;

/// Scheduler's placeholder for the attempt number, substituted at each invoke.
pub const ATTEMPT_NUMBER: &str = "<aws.scheduler.attempt-number>";

/// Scheduler's placeholder for the execution id, substituted at each invoke: AWS gives
/// every attempted invocation its own.
pub const EXECUTION_ID: &str = "<aws.scheduler.execution-id>";

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

    /// The fire's event with the attempt number and an execution id: the fire's own
    /// (the record's id, which its failure record's `executionId` keeps) on the first
    /// attempt, a fresh one on each later attempt.
    fn render(&self, records: &[Record], attempt: u32) -> Vec<u8> {
        let Some(r) = records.first() else {
            return b"{}".to_vec();
        };
        let mut event = r
            .fragment
            .replace(ATTEMPT_NUMBER, itoa::Buffer::new().format(attempt));
        if event.contains(EXECUTION_ID) {
            let id = match (attempt, r.id.as_deref()) {
                (0 | 1, Some(id)) => id.to_owned(),
                _ => uuid::Uuid::new_v4().to_string(),
            };
            event = event.replace(EXECUTION_ID, &id);
        }
        event.into_bytes()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ScheduleShape {
        ScheduleShape {
            name: "s".into(),
            arn: "arn:aws:scheduler:us-east-1:0:schedule/default/s".into(),
            expression: "rate(1 minute)".into(),
        }
    }

    fn fire(fragment: &str) -> Record {
        Record {
            fragment: fragment.into(),
            ..Record::for_test(Some("9f1c0f4e-8d9b-4a51-a0a4-6f7f1d1b3e2a"), None, 0)
        }
    }

    #[test]
    fn each_attempt_gets_its_own_execution_id_and_the_first_the_fires() {
        let r = fire(
            r#"{"id":"<aws.scheduler.execution-id>","again":"<aws.scheduler.execution-id>","n":<aws.scheduler.attempt-number>,"t":"2026-01-01T00:00:00Z"}"#,
        );
        let event = |attempt| -> Value {
            serde_json::from_slice(&shape().render(std::slice::from_ref(&r), attempt)).unwrap()
        };
        let first = event(1);
        assert_eq!(
            first,
            json!({"id": "9f1c0f4e-8d9b-4a51-a0a4-6f7f1d1b3e2a",
                   "again": "9f1c0f4e-8d9b-4a51-a0a4-6f7f1d1b3e2a",
                   "n": 1, "t": "2026-01-01T00:00:00Z"})
        );
        let mut ids = std::collections::HashSet::from([first["id"].to_string()]);
        for attempt in 2..=5 {
            let e = event(attempt);
            assert_eq!(e["n"], attempt);
            assert_eq!(e["t"], "2026-01-01T00:00:00Z");
            // One id per invoke, wherever the placeholder appears in it.
            assert_eq!(e["again"], e["id"]);
            let id = uuid::Uuid::parse_str(e["id"].as_str().unwrap()).unwrap();
            assert_eq!(id.get_version_num(), 4);
            assert!(
                ids.insert(e["id"].to_string()),
                "attempt {attempt} reused an id"
            );
        }
        // The failure record correlates by the fire's id, whatever the attempt.
        assert_eq!(
            shape().batch_info(std::slice::from_ref(&r)).1["executionId"],
            "9f1c0f4e-8d9b-4a51-a0a4-6f7f1d1b3e2a"
        );
    }

    #[test]
    fn an_event_without_the_placeholder_is_sent_as_fired() {
        let text = r#"{"version":"0","id":"53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa","detail-type":"Scheduled Event"}"#;
        let r = fire(text);
        for attempt in [1, 2, 3] {
            assert_eq!(
                shape().render(std::slice::from_ref(&r), attempt),
                text.as_bytes()
            );
        }
    }
}
