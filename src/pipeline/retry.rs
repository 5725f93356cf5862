//! Delivers one batch with AWS's failure semantics and returns how each record ended.
//!
//! The batch is a queue of pieces, worked front to back so that order is kept: a piece
//! is invoked; on success its records are delivered; on a function error it is retried
//! after a backoff (spending one retry) or, with bisection, split in two (free); with a
//! partial batch response only the reported records are retried. Throttles, transient
//! errors and a broken mapping (missing function, denied permission) are retried without
//! spending retries. When retries or record age run out, or a lone record is too large,
//! the piece is parked in the on-failure destination. Nothing else leaves the queue:
//! `deliver` returns when every record is resolved, or on shutdown with the rest
//! unresolved (the source then leaves them to the broker).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::destination::{Condition, Destination, DestinationError, Failure, Rendered};
use crate::invoke::event::Envelope;
use crate::invoke::lambda::{InvokeError, Invoker, Response};
use crate::pipeline::filter::{self, Filter};
use crate::record::{Record, Resolution};
use crate::status::MappingStatus;

/// A mapping's retry settings, resolved from its configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Retries after the first attempt; None is forever.
    pub retries: Option<u32>,
    pub max_age: Option<Duration>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub bisect: bool,
    pub report_item_failures: bool,
    /// Largest event the function accepts.
    pub max_payload: usize,
    /// Without an on-failure destination, give exhausted records back to the source
    /// (SQS: they reappear after their visibility timeout) instead of blocking on them.
    pub release_exhausted: bool,
}

impl Policy {
    /// `min * 2^(n-1)` capped at max, with equal jitter (half fixed, half random) so
    /// that replicas retrying the same failure do not stay in step.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff_min
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// How a batch ended: resolved records, and those left unresolved by a shutdown.
#[derive(Debug, Default)]
pub struct Outcome {
    pub resolved: Vec<(Record, Resolution)>,
    pub unresolved: Vec<Record>,
    /// The most invokes any unresolved record took part in: what a source that parks
    /// them itself (a schedule without a ledger) reports as the invoke count.
    pub unresolved_invokes: u32,
}

impl Outcome {
    fn leave(&mut self, piece: Piece) {
        self.unresolved_invokes = self.unresolved_invokes.max(piece.invokes);
        self.unresolved.extend(piece.records);
    }
}

/// Everything needed to deliver a mapping's batches (cheap to clone: a partitioned
/// source clones it per partition with its own envelope).
#[derive(Clone)]
pub struct Deliverer {
    pub mapping: Arc<MappingStatus>,
    pub invoker: Invoker,
    pub function_arn: String,
    pub envelope: Envelope,
    pub policy: Policy,
    pub destination: Option<Arc<Destination>>,
    /// The mapping's filter criteria, if it has any.
    pub filter: Option<Arc<Filter>>,
}

/// Part of a batch still to deliver, with the invokes already spent on its records.
struct Piece {
    records: Vec<Record>,
    /// Failed invokes counted against the retry budget.
    failures: u32,
    /// All invokes its records took part in (AWS's approximateInvokeCount).
    invokes: u32,
}

enum Step {
    Done,
    /// Retry the piece (or what is left of it) after this long.
    Retry(Piece, Duration),
    /// Replace the piece by these, worked in order, at once.
    Split(Piece, Piece),
    Park(Piece, Condition, Option<Response>, String),
}

impl Deliverer {
    pub async fn deliver(&self, batch: Vec<Record>, shutdown: &CancellationToken) -> Outcome {
        let mut out = Outcome::default();
        let batch = match &self.filter {
            None => batch,
            Some(filter) => {
                let (pass, drop): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|r| filter.matches(&filter::view(&r.fragment)));
                self.mapping.metrics.filtered.increment(drop.len() as u64);
                out.resolved
                    .extend(drop.into_iter().map(|r| (r, Resolution::Filtered)));
                if pass.is_empty() {
                    return out;
                }
                pass
            }
        };
        let mut work = VecDeque::from([Piece {
            records: batch,
            failures: 0,
            invokes: 0,
        }]);
        // Consecutive failures that spend no retries (throttles, transient, fatal), for
        // their own backoff.
        let mut free_failures = 0u32;
        while let Some(piece) = work.pop_front() {
            let piece = match self.park_expired(piece, &mut out, shutdown).await {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(p) => {
                    out.leave(p);
                    break;
                }
            };
            let step = self.attempt(piece, &mut out, &mut free_failures).await;
            match step {
                Step::Done => {}
                Step::Split(a, b) => {
                    work.push_front(b);
                    work.push_front(a);
                }
                Step::Retry(piece, delay) => {
                    self.mapping.metrics.retries.increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => work.push_front(piece),
                        () = shutdown.cancelled() => {
                            out.leave(piece);
                            break;
                        }
                    }
                }
                Step::Park(piece, condition, response, error) => {
                    if let Err(p) = self
                        .park(
                            piece,
                            condition,
                            response.as_ref(),
                            &error,
                            &mut out,
                            shutdown,
                        )
                        .await
                    {
                        out.leave(p);
                        break;
                    }
                }
            }
        }
        // What the shutdown left behind.
        for piece in work {
            out.leave(piece);
        }
        out
    }

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

    /// Parks the records of `piece` that are older than max_record_age (a prefix: they
    /// arrived in order) and returns the rest.
    async fn park_expired(
        &self,
        mut piece: Piece,
        out: &mut Outcome,
        shutdown: &CancellationToken,
    ) -> Result<Option<Piece>, Piece> {
        let Some(max_age) = self.policy.max_age else {
            return Ok(Some(piece));
        };
        let expired = piece
            .records
            .iter()
            .take_while(|r| r.received.elapsed() > max_age)
            .count();
        if expired == 0 {
            return Ok(Some(piece));
        }
        let rest = piece.records.split_off(expired);
        let old = Piece {
            records: std::mem::replace(&mut piece.records, rest),
            ..piece
        };
        let error = format!("records older than {}", humantime::format_duration(max_age));
        self.park(
            old,
            Condition::RecordAgeExceeded,
            None,
            &error,
            out,
            shutdown,
        )
        .await?;
        Ok((!piece.records.is_empty()).then_some(piece))
    }

    async fn attempt(&self, mut piece: Piece, out: &mut Outcome, free_failures: &mut u32) -> Step {
        let event = self
            .envelope
            .render_attempt(&piece.records, piece.invokes + 1);
        let name = &self.mapping.name;
        let n = piece.records.len();
        let result = if event.len() > self.policy.max_payload {
            Err(InvokeError::TooLarge {
                function: self.invoker.function().to_owned(),
                bytes: event.len(),
            })
        } else {
            piece.invokes += 1;
            let m = &self.mapping.metrics;
            m.batch_records.record(n as f64);
            let started = tokio::time::Instant::now();
            let r = self.invoker.invoke(event).await;
            m.invoke_seconds.record(started.elapsed().as_secs_f64());
            r
        };
        let outcome = match &result {
            Ok(r) if r.function_error.is_some() => "function_error",
            Ok(_) => "success",
            Err(InvokeError::Throttled { .. }) => "throttled",
            Err(InvokeError::Transient { .. }) => "transient_error",
            Err(InvokeError::TooLarge { .. }) => "too_large",
            Err(InvokeError::Fatal { .. }) => "fatal_error",
        };
        self.mapping.metrics.invocation(outcome).increment(1);
        if outcome == "throttled" {
            self.mapping.metrics.throttles.increment(1);
        }

        let response = match result {
            Ok(r) => r,
            Err(InvokeError::TooLarge { bytes, .. }) => {
                *free_failures = 0;
                if n > 1 {
                    tracing::debug!(mapping = %name, records = n, bytes, "event too large; splitting the batch");
                    return split(piece);
                }
                let error = format!(
                    "a single record makes an event of {bytes} bytes, above the function's limit"
                );
                return Step::Park(piece, Condition::MaximumPayloadSizeExceeded, None, error);
            }
            Err(e @ (InvokeError::Throttled { .. } | InvokeError::Transient { .. })) => {
                *free_failures += 1;
                tracing::warn!(mapping = %name, error = %e, "invoke failed; retrying without spending a retry");
                self.mapping.error(&e);
                return Step::Retry(piece, self.policy.backoff(*free_failures));
            }
            Err(e @ InvokeError::Fatal { .. }) => {
                *free_failures += 1;
                tracing::error!(mapping = %name, error = %e, "mapping failed; records stay in the source until the function can be invoked");
                self.mapping.fail(&e);
                return Step::Retry(
                    piece,
                    self.policy
                        .backoff(*free_failures)
                        .max(self.policy.backoff_max / 2),
                );
            }
        };
        *free_failures = 0;
        self.mapping.reachable();

        let failed = if let Some(kind) = &response.function_error {
            let message = function_error_message(&response.payload);
            tracing::warn!(mapping = %name, records = n, function_error = %kind, error = %message, "function failed on the batch");
            self.mapping.metrics.failed.increment(n as u64);
            None.ok_or(message)
        } else if self.policy.report_item_failures {
            item_failures(&response.payload, &self.envelope, &piece.records)
        } else {
            Ok(Vec::new())
        };
        match failed {
            Ok(failed) if failed.is_empty() => {
                tracing::debug!(mapping = %name, records = n, "batch delivered");
                self.mapping.success();
                self.mapping.metrics.delivered.increment(n as u64);
                out.resolved.extend(
                    piece
                        .records
                        .into_iter()
                        .map(|r| (r, Resolution::Delivered)),
                );
                Step::Done
            }
            Ok(failed) => {
                // Only the reported records are retried; the rest are delivered.
                let failed: HashSet<usize> = failed.into_iter().collect();
                let mut retry = Vec::with_capacity(failed.len());
                for (i, r) in piece.records.into_iter().enumerate() {
                    if failed.contains(&i) {
                        retry.push(r);
                    } else {
                        self.mapping.metrics.delivered.increment(1);
                        out.resolved.push((r, Resolution::Delivered));
                    }
                }
                piece.records = retry;
                self.mapping
                    .metrics
                    .failed
                    .increment(piece.records.len() as u64);
                let error = format!(
                    "the function reported {} failed item(s)",
                    piece.records.len()
                );
                self.retry_or_park(piece, Some(response), error, false)
            }
            Err(error) => self.retry_or_park(piece, Some(response), error, self.policy.bisect),
        }
    }

    /// A piece the function failed on: split it (free), retry it (one retry spent), or
    /// park it when retries are exhausted.
    fn retry_or_park(
        &self,
        mut piece: Piece,
        response: Option<Response>,
        error: String,
        bisect: bool,
    ) -> Step {
        if bisect && piece.records.len() > 1 {
            return split(piece);
        }
        piece.failures += 1;
        match self.policy.retries {
            Some(max) if piece.failures > max => {
                Step::Park(piece, Condition::RetryAttemptsExhausted, response, error)
            }
            _ => {
                self.mapping.error(&error);
                let delay = self.policy.backoff(piece.failures);
                Step::Retry(piece, delay)
            }
        }
    }

    /// Writes the failure record, retrying the destination until it confirms; Err gives
    /// the piece back unresolved when shutdown comes first.
    async fn park(
        &self,
        piece: Piece,
        condition: Condition,
        response: Option<&Response>,
        error: &str,
        out: &mut Outcome,
        shutdown: &CancellationToken,
    ) -> Result<(), Piece> {
        let name = &self.mapping.name;
        let Some(destination) = &self.destination else {
            if self.policy.release_exhausted {
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
            if let Envelope::Schedule { .. } = self.envelope {
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
        let record = Failure {
            function_arn: &self.function_arn,
            condition,
            invoke_count: piece.invokes,
            response,
            error: Some(error),
            envelope: &self.envelope,
            records: &piece.records,
        }
        .render();
        // Kafka destinations are keyed by the original record's key.
        let key = piece.records.first().and_then(|r| r.key.as_deref());
        let mut tries = 0;
        loop {
            let written = match destination.write(&record, key).await {
                Err(e) if e.is_permanent() => self.fall_back(destination, &record, &e).await,
                other => other,
            };
            match written {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    tracing::error!(mapping = %name, error = %e, "on-failure destination unavailable; the mapping waits for it");
                    self.mapping.fail(&e);
                    tokio::select! {
                        () = tokio::time::sleep(self.policy.backoff(tries)) => {}
                        () = shutdown.cancelled() => return Err(piece),
                    }
                }
            }
        }
        tracing::warn!(mapping = %name, condition = condition.as_str(), records = piece.records.len(),
            destination = destination.kind(), "records parked in the on-failure destination");
        self.mapping
            .metrics
            .dead_lettered(condition.as_str())
            .increment(piece.records.len() as u64);
        out.resolved.extend(
            piece
                .records
                .into_iter()
                .map(|r| (r, Resolution::DeadLettered)),
        );
        Ok(())
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

fn split(mut piece: Piece) -> Step {
    let back = piece.records.split_off(piece.records.len() / 2);
    let second = Piece {
        records: back,
        failures: piece.failures,
        invokes: piece.invokes,
    };
    Step::Split(piece, second)
}

/// The `errorType: errorMessage` of a function error body, or the body itself.
pub(crate) fn function_error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("errorMessage").is_some() => format!(
            "{}: {}",
            v["errorType"].as_str().unwrap_or("Error"),
            v["errorMessage"].as_str().unwrap_or_default()
        ),
        _ => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

/// The indexes (into `records`) a partial batch response names (see
/// `Envelope::item_indexes` for what identifies an item in each source). AWS's rules: an empty body, null, or an empty or missing list is full success;
/// invalid JSON or an empty, null or unknown identifier is full failure (Err).
pub(crate) fn item_failures(
    body: &[u8],
    envelope: &Envelope,
    records: &[Record],
) -> Result<Vec<usize>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the function's partial batch response is not JSON: {e}"))?;
    let items = match v.get("batchItemFailures") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("batchItemFailures is not a list: {other}")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let id = item.get("itemIdentifier").unwrap_or(&Value::Null);
        let named = envelope.item_indexes(id, records);
        if named.is_empty() {
            return Err(format!("batchItemFailures names an unknown item: {item}"));
        }
        out.extend(named);
    }
    Ok(envelope.widen_failures(out, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(ids: &[&str]) -> Vec<Record> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Record::for_test((!id.is_empty()).then_some(*id), None, i as u64))
            .collect()
    }

    fn rabbit() -> Envelope {
        Envelope::Rabbit {
            event_source_arn: "arn".into(),
            queue: "q".into(),
            vhost: "/".into(),
        }
    }

    #[test]
    fn partial_batch_responses_follow_aws_rules() {
        let r = recs(&["a", "b", "", "d"]);
        for ok in [
            "",
            "  ",
            "null",
            "{}",
            r#"{"batchItemFailures":[]}"#,
            r#"{"batchItemFailures":null}"#,
            "\"done\"",
        ] {
            assert_eq!(
                item_failures(ok.as_bytes(), &rabbit(), &r),
                Ok(vec![]),
                "{ok}"
            );
        }
        assert_eq!(
            item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":"d"},{"itemIdentifier":2}]}"#,
                &rabbit(),
                &r
            ),
            Ok(vec![2, 3])
        );
        // Every record that carries a reported id is retried, not just the first one
        // (a publisher may reuse a message id).
        let dup = recs(&["a", "x", "a", "b", "x"]);
        assert_eq!(
            item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":"a"},{"itemIdentifier":"x"}]}"#,
                &rabbit(),
                &dup
            ),
            Ok(vec![0, 1, 2, 4])
        );
        // Kafka: everything from the lowest failed offset on is retried.
        let kafka = Envelope::Kafka {
            bootstrap_servers: "b:9092".into(),
            topic: "t".into(),
            partition: 3,
        };
        // SQS FIFO: a failure fails the later messages of its group too.
        let mut fifo = recs(&["a", "b", "c", "d"]);
        for (r, g) in fifo.iter_mut().zip(["g1", "g2", "g1", "g2"]) {
            r.key = Some(g.into());
        }
        let sqs = Envelope::Sqs {
            queue_url: "q".into(),
            fifo: true,
        };
        assert_eq!(
            item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":"a"}]}"#,
                &sqs,
                &fifo
            ),
            Ok(vec![0, 2])
        );
        assert_eq!(
            item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":{"partition":"t-3","offset":2}}]}"#,
                &kafka,
                &r
            ),
            Ok(vec![2, 3])
        );
        assert!(
            item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":{"partition":"t-4","offset":2}}]}"#,
                &kafka,
                &r
            )
            .is_err()
        );
        for bad in [
            "{not json",
            r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":"zz"}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":4}]}"#,
            r#"{"batchItemFailures":[{"id":"a"}]}"#,
            r#"{"batchItemFailures":"a"}"#,
        ] {
            assert!(
                item_failures(bad.as_bytes(), &rabbit(), &r).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn function_errors_are_summarised() {
        assert_eq!(
            function_error_message(
                br#"{"errorMessage":"boom","errorType":"ValueError","stackTrace":[]}"#
            ),
            "ValueError: boom"
        );
        assert_eq!(function_error_message(b"plain"), "plain");
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        let p = Policy {
            retries: None,
            max_age: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            bisect: false,
            report_item_failures: false,
            max_payload: 1,
            release_exhausted: false,
        };
        for (n, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = p.backoff(n).as_millis() as u64;
            assert!(
                d >= full / 2 && d <= full,
                "attempt {n}: {d}ms not in [{}, {full}]",
                full / 2
            );
        }
    }
}
