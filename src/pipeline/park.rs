//! Failure records: what the on-failure destination receives for records that cannot be
//! delivered, in AWS's shape extended with the failed event as `payload` (so that a
//! redrive can replay it).

use std::time::SystemTime;

use opentelemetry::KeyValue;
use serde_json::json;

use tokio_util::sync::CancellationToken;

use super::retry::{Deliverer, Exhausted, Outcome, Piece};
use crate::destination::{Destination, DestinationError, Rendered};
use crate::invoke::event::{Shape, rfc3339};
use crate::invoke::lambda::Response;
use crate::record::{Record, Resolution};

/// Why records were parked (AWS's `requestContext.condition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    RetryAttemptsExhausted,
    RecordAgeExceeded,
    MaximumPayloadSizeExceeded,
    /// The record cannot be put in an event as it is (a RabbitMQ property or header name
    /// that is not UTF-8): parked without an invoke. Not one of AWS's conditions.
    UndecodableRecord,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Condition::RecordAgeExceeded => "RecordAgeExceeded",
            Condition::MaximumPayloadSizeExceeded => "MaximumPayloadSizeExceeded",
            Condition::UndecodableRecord => "UndecodableRecord",
        }
    }
}

/// Longest `error` text a failure record carries, in bytes: a function's error message
/// can be as large as its response, and would make the record too large to park.
pub const MAX_ERROR_BYTES: usize = 4096;

/// `error` cut to at most [`MAX_ERROR_BYTES`] (on a character boundary), and whether it
/// was cut.
fn bounded(error: &str) -> (&str, bool) {
    if error.len() <= MAX_ERROR_BYTES {
        return (error, false);
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    (&error[..end], true)
}

/// Everything a failure record says about the records it parks.
pub struct Failure<'a> {
    pub function_arn: &'a str,
    pub condition: Condition,
    /// Invokes spent on these records (AWS's approximateInvokeCount).
    pub invoke_count: u32,
    /// The last response of the function, when it answered.
    pub response: Option<&'a Response>,
    /// The last error, in words (function error message or invoke error).
    pub error: Option<&'a str>,
    pub shape: &'a dyn Shape,
    pub records: &'a [Record],
    /// A record of one record alone, for a destination that takes one per record: its
    /// info is the shape's `record_info`.
    pub single: bool,
}

impl Failure<'_> {
    /// The JSON failure record: AWS's shape, plus `error` (at most [`MAX_ERROR_BYTES`],
    /// with `errorTruncated` when cut) and the failed event as `payload`.
    pub fn render(&self) -> Rendered {
        let (info_key, info) = match self.records {
            [one] if self.single => self.shape.record_info(one),
            records => self.shape.batch_info(records),
        };
        let request_id = uuid::Uuid::new_v4().to_string();
        let (error, truncated) = match self.error.map(bounded) {
            Some((e, t)) => (Some(e), t),
            None => (None, false),
        };
        let mut meta = json!({
            "requestContext": {
                "requestId": request_id,
                "functionArn": self.function_arn,
                "condition": self.condition.as_str(),
                "approximateInvokeCount": self.invoke_count,
            },
            // Null, as AWS has it, when the function never answered for these records
            // (too large to invoke, or parked before an invoke).
            "responseContext": self.response.map(|r| json!({
                "statusCode": r.status,
                "executedVersion": r.executed_version.as_deref(),
                "functionError": r.function_error.as_deref(),
            })),
            "version": "1.0",
            "timestamp": rfc3339(SystemTime::now()),
            "error": error,
        });
        if truncated {
            meta["errorTruncated"] = true.into();
        }
        meta[info_key] = info;
        let mut out = serde_json::to_vec(&meta).expect("JSON value to bytes");
        // Append the event as it was sent, without parsing it again.
        out.pop();
        out.extend_from_slice(br#","payload":"#);
        // The event of the last attempt (only a schedule's input names its attempt).
        out.extend_from_slice(&self.shape.render(self.records, self.invoke_count.max(1)));
        out.push(b'}');
        Rendered {
            request_id,
            bytes: out,
        }
    }
}

impl Deliverer {
    /// Parks records that a shutdown interrupted, for a source with nowhere to leave
    /// them (a schedule without a ledger): like an exhausted piece, retrying the
    /// destination until it confirms or `give_up` is cancelled, when they stay unresolved.
    pub async fn park_interrupted(
        &self,
        records: Vec<Record>,
        invokes: u32,
        error: &str,
        give_up: &CancellationToken,
    ) -> Outcome {
        let mut out = Outcome::default();
        let piece = Piece {
            records,
            failures: 0,
            invokes,
        };
        if let Err(p) = self
            .park(
                piece,
                Condition::RetryAttemptsExhausted,
                None,
                error,
                &mut out,
                give_up,
            )
            .await
        {
            out.leave(p);
        }
        out
    }

    /// Parks records without invoking the function (their event would misrepresent them);
    /// on shutdown first they come back unresolved.
    pub async fn park_uninvoked(
        &self,
        records: Vec<Record>,
        condition: Condition,
        error: &str,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let mut out = Outcome::default();
        let piece = Piece {
            records,
            failures: 0,
            invokes: 0,
        };
        if let Err(p) = self
            .park(piece, condition, None, error, &mut out, shutdown)
            .await
        {
            out.unresolved.extend(p.records);
        }
        out
    }

    /// Writes the failure record, retrying the destination until it confirms; Err gives
    /// the piece back unresolved when shutdown comes first.
    pub(super) async fn park(
        &self,
        piece: Piece,
        condition: Condition,
        response: Option<&Response>,
        error: &str,
        out: &mut Outcome,
        shutdown: &CancellationToken,
    ) -> Result<(), Piece> {
        let name = &self.mapping.name;
        let span = out.span.child(
            "park",
            || {
                vec![
                    KeyValue::new("esm_gateway.mapping", name.clone()),
                    KeyValue::new("esm_gateway.condition", condition.as_str()),
                    KeyValue::new("esm_gateway.batch.records", piece.records.len() as i64),
                ]
            },
            None,
        );
        span.fail(error);
        let Some(destination) = &self.destination else {
            if self.policy.exhausted == Exhausted::Release {
                tracing::warn!(mapping = %name, condition = condition.as_str(), records = piece.records.len(),
                    error, "records released to the source for redelivery");
                self.mapping
                    .metrics
                    .released
                    .increment(piece.records.len() as u64);
                out.resolved
                    .extend(piece.records.into_iter().map(|r| (r, Resolution::Released)));
                return Ok(());
            }
            if self.policy.exhausted == Exhausted::Drop {
                // Scheduler without a dead-letter queue drops an exhausted fire: the
                // schedule fires again at its next time, and a missed tick cannot wait.
                tracing::error!(mapping = %name, condition = condition.as_str(), error,
                    "schedule fire exhausted its retries and there is no on_failure destination; dropped");
                self.mapping
                    .metrics
                    .dropped
                    .increment(piece.records.len() as u64);
                out.resolved
                    .extend(piece.records.into_iter().map(|r| (r, Resolution::Dropped)));
                return Ok(());
            }
            // Only a record too large for any invoke gets here (configuration requires a
            // destination for limited retries). It blocks the mapping until shutdown:
            // skipping it would lose it.
            let e = format!(
                "{error}; no on_failure destination is configured, so it stays in the source and blocks the mapping"
            );
            tracing::error!(mapping = %name, condition = condition.as_str(), "{e}");
            self.mapping.fail(e);
            shutdown.cancelled().await;
            return Err(piece);
        };
        // A Kafka topic takes one failure record per record, keyed by its own key; the
        // others one per piece.
        let groups: Vec<&[Record]> = if destination.one_per_record() {
            piece.records.chunks(1).collect()
        } else {
            vec![&piece.records[..]]
        };
        let mut written = 0;
        for records in groups {
            let record = Failure {
                function_arn: &self.function_arn,
                condition,
                invoke_count: piece.invokes,
                response,
                error: Some(error),
                shape: self.shape.as_ref(),
                records,
                single: destination.one_per_record(),
            }
            .render();
            let key = match records {
                [one] => one.key.as_deref(),
                _ => None,
            };
            if !self
                .write_until_confirmed(destination, &record, key, shutdown)
                .await
            {
                // Those written are parked; the rest stay in the source.
                let mut piece = piece;
                let rest = piece.records.split_off(written);
                self.parked(condition, destination, piece.records, out);
                return Err(Piece {
                    records: rest,
                    ..piece
                });
            }
            written += records.len();
        }
        self.parked(condition, destination, piece.records, out);
        Ok(())
    }

    /// Writes one failure record, retrying the destination until it confirms; false
    /// when shutdown comes first.
    async fn write_until_confirmed(
        &self,
        destination: &Destination,
        record: &Rendered,
        key: Option<&[u8]>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut tries = 0;
        loop {
            let written = match destination.write(record, key).await {
                Err(e) if e.is_permanent() => self.fall_back(destination, record, &e).await,
                other => other,
            };
            match written {
                Ok(()) => return true,
                Err(e) => {
                    tries += 1;
                    tracing::error!(mapping = %self.mapping.name, error = %e, "on-failure destination unavailable; the mapping waits for it");
                    self.mapping.fail(&e);
                    tokio::select! {
                        () = tokio::time::sleep(self.policy.backoff(tries)) => {}
                        () = shutdown.cancelled() => return false,
                    }
                }
            }
        }
    }

    /// Resolves records whose failure records the destination confirmed.
    fn parked(
        &self,
        condition: Condition,
        destination: &Destination,
        records: Vec<Record>,
        out: &mut Outcome,
    ) {
        if records.is_empty() {
            return;
        }
        tracing::warn!(mapping = %self.mapping.name, condition = condition.as_str(), records = records.len(),
            destination = destination.kind(), "records parked in the on-failure destination");
        self.mapping
            .metrics
            .dead_lettered(condition.as_str())
            .increment(records.len() as u64);
        out.resolved
            .extend(records.into_iter().map(|r| (r, Resolution::DeadLettered)));
    }
}

impl Deliverer {
    /// Keeps a record the destination refused for good in its payload directory: the
    /// mapping goes on (and says it is degraded) rather than retrying it for ever. Err
    /// (the write of that file failed) is retried like an unavailable destination.
    async fn fall_back(
        &self,
        destination: &Destination,
        record: &Rendered,
        refused: &DestinationError,
    ) -> Result<(), DestinationError> {
        let path = destination.fall_back(record, refused).await?;
        let name = &self.mapping.name;
        tracing::error!(mapping = %name, destination = destination.kind(), path = %path.display(), error = %refused,
            "the on-failure destination refuses this record for good; kept the failure record in payload_dir instead");
        self.mapping.metrics.fallbacks.increment(1);
        self.mapping.degrade(format!(
            "{refused}; the record was kept in {} instead",
            path.display()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::sqs::event::SqsShape;

    fn failure_with(error: &str) -> serde_json::Value {
        let shape = SqsShape {
            queue_url: "q".into(),
            fifo: false,
        };
        let records = [Record::for_test(Some("m1"), None, 0)];
        let rendered = Failure {
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f",
            condition: Condition::RetryAttemptsExhausted,
            invoke_count: 1,
            response: None,
            error: Some(error),
            shape: &shape,
            records: &records,
            single: false,
        }
        .render();
        let v: serde_json::Value = serde_json::from_slice(&rendered.bytes).unwrap();
        assert_eq!(v["requestContext"]["requestId"], rendered.request_id);
        v
    }

    #[test]
    fn a_long_error_message_is_cut_to_four_kib_and_marked() {
        let short = failure_with("ValueError: boom");
        assert_eq!(short["error"], "ValueError: boom");
        assert!(short.get("errorTruncated").is_none());
        // Multi-byte characters across the limit: the cut stays on a character boundary.
        let long = format!("ValueError: {}", "é".repeat(1_000_000));
        let v = failure_with(&long);
        let error = v["error"].as_str().unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES, "{}", error.len());
        assert!(error.len() > MAX_ERROR_BYTES - 4);
        assert!(long.starts_with(error));
        assert_eq!(v["errorTruncated"], true);
    }
}
