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
//! unresolved (the source then leaves them to the broker). An unordered source may take
//! the retry after a function failure off its path (`deliver_deferring`, then `resume`).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;

use tokio_util::sync::CancellationToken;

use super::park::Condition;
use super::response::{function_error_message, item_failures};
use crate::destination::Destination;
use crate::invoke::event::Shape;
use crate::invoke::lambda::{InvokeError, Invoker, Response};
use crate::pipeline::filter::{self, Filter};
use crate::record::{Record, Resolution};
use crate::status::MappingStatus;
use crate::telemetry::otlp::Span;
use crate::trace;

pub use super::policy::{Exhausted, Policy};

/// How a batch ended: resolved records, and those left unresolved by a shutdown.
#[derive(Debug, Default)]
pub struct Outcome {
    pub resolved: Vec<(Record, Resolution)>,
    pub unresolved: Vec<Record>,
    /// The most invokes any unresolved record took part in: what a source that parks
    /// them itself (a schedule without a ledger) reports as the invoke count.
    pub unresolved_invokes: u32,
    /// The batch's span (none without an OTLP exporter), for the source's `ack` span
    /// ([`Span::into_ack`]); it ends when dropped.
    pub span: Span,
}

impl Outcome {
    pub(super) fn leave(&mut self, piece: Piece) {
        self.unresolved_invokes = self.unresolved_invokes.max(piece.invokes);
        self.unresolved.extend(piece.records);
    }
}

/// Everything needed to deliver a mapping's batches (cheap to clone: a partitioned
/// source clones it per partition with its own shape, [`Deliverer::with_shape`]).
#[derive(Clone)]
pub struct Deliverer {
    pub mapping: Arc<MappingStatus>,
    pub invoker: Invoker,
    pub function_arn: String,
    /// The source's event: how batches are rendered and failures identified.
    pub shape: Arc<dyn Shape>,
    pub policy: Policy,
    pub destination: Option<Arc<Destination>>,
    /// The mapping's filter criteria, if it has any.
    pub filter: Option<Arc<Filter>>,
}

/// Part of a batch still to deliver, with the invokes already spent on its records.
pub(super) struct Piece {
    pub(super) records: Vec<Record>,
    /// Failed invokes counted against the retry budget.
    pub(super) failures: u32,
    /// All invokes its records took part in (AWS's approximateInvokeCount).
    pub(super) invokes: u32,
}

/// A batch's work left over when its first retry after a function failure was deferred
/// ([`Deliverer::deliver_deferring`]): finish it with [`Deliverer::resume`].
pub struct Deferred {
    work: VecDeque<Piece>,
    delay: Duration,
}

impl Deferred {
    /// The records still to deliver.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.work.iter().flat_map(|p| &p.records)
    }
}

enum Step {
    Done,
    /// Retry the piece (or what is left of it) after this long. `deferrable`: a function
    /// failure, which an unordered source may retry beside its next batches (throttles
    /// and errors of the mapping itself hold the source back instead).
    Retry(Piece, Duration, bool),
    /// Replace the piece by these, worked in order, at once.
    Split(Piece, Piece),
    Park(Piece, Condition, Option<Response>, String),
}

impl Deliverer {
    /// The same deliverer for another event shape (a Kafka partition's).
    pub fn with_shape(&self, shape: Arc<dyn Shape>) -> Deliverer {
        Deliverer {
            shape,
            ..self.clone()
        }
    }

    /// Delivers `batch` and returns how each record ended; on shutdown the records not
    /// yet resolved come back unresolved. Keeps the mapping's in-flight gauge.
    pub async fn deliver(&self, batch: Vec<Record>, shutdown: &CancellationToken) -> Outcome {
        self.deliver_or_defer(batch, shutdown, false).await.0
    }

    /// Like [`deliver`](Self::deliver), but returns at the first retry after a function
    /// failure, with the work left (the failed records and any after them), so that an
    /// unordered source can go on with its next batches meanwhile.
    pub async fn deliver_deferring(
        &self,
        batch: Vec<Record>,
        shutdown: &CancellationToken,
    ) -> (Outcome, Option<Deferred>) {
        self.deliver_or_defer(batch, shutdown, true).await
    }

    /// Finishes deferred work after its backoff, retries and all, as `deliver` would have.
    pub async fn resume(&self, deferred: Deferred, shutdown: &CancellationToken) -> Outcome {
        let _in_flight = InFlight::new(&self.mapping);
        let mut out = Outcome {
            span: Span::batch(
                &self.mapping.name,
                self.mapping.kind,
                deferred.records().count(),
                deferred.records().map(|r| &r.trace),
            ),
            ..Outcome::default()
        };
        tokio::select! {
            () = tokio::time::sleep(deferred.delay) => {
                self.work_through(deferred.work, &mut out, shutdown, false).await;
            }
            () = shutdown.cancelled() => deferred.work.into_iter().for_each(|p| out.leave(p)),
        }
        out
    }

    async fn deliver_or_defer(
        &self,
        batch: Vec<Record>,
        shutdown: &CancellationToken,
        defer: bool,
    ) -> (Outcome, Option<Deferred>) {
        let _in_flight = InFlight::new(&self.mapping);
        let mut out = Outcome {
            span: Span::batch(
                &self.mapping.name,
                self.mapping.kind,
                batch.len(),
                batch.iter().map(|r| &r.trace),
            ),
            ..Outcome::default()
        };
        let batch = match &self.filter {
            None => batch,
            Some(filter) => {
                let (pass, drop): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| {
                    filter.matches(&filter::view(&r.fragment, self.shape.decoded()))
                });
                self.mapping.metrics.filtered.increment(drop.len() as u64);
                out.resolved
                    .extend(drop.into_iter().map(|r| (r, Resolution::Filtered)));
                if pass.is_empty() {
                    return (out, None);
                }
                pass
            }
        };
        let work = VecDeque::from([Piece {
            records: batch,
            failures: 0,
            invokes: 0,
        }]);
        let deferred = self.work_through(work, &mut out, shutdown, defer).await;
        (out, deferred)
    }

    /// Works the pieces front to back until all are resolved, a shutdown, or (with
    /// `defer`) the first deferrable retry, whose work it returns.
    async fn work_through(
        &self,
        mut work: VecDeque<Piece>,
        out: &mut Outcome,
        shutdown: &CancellationToken,
        defer: bool,
    ) -> Option<Deferred> {
        // Consecutive failures that spend no retries (throttles, transient, fatal), for
        // their own backoff.
        let mut free_failures = 0u32;
        while let Some(piece) = work.pop_front() {
            let piece = match self.park_expired(piece, out, shutdown).await {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(p) => {
                    out.leave(p);
                    break;
                }
            };
            let step = self.attempt(piece, out, &mut free_failures).await;
            match step {
                Step::Done => {}
                Step::Split(a, b) => {
                    work.push_front(b);
                    work.push_front(a);
                }
                Step::Retry(piece, delay, deferrable) => {
                    self.mapping.metrics.retries.increment(1);
                    if defer && deferrable {
                        work.push_front(piece);
                        return Some(Deferred { work, delay });
                    }
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
                        .park(piece, condition, response.as_ref(), &error, out, shutdown)
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
        None
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
        let event = self.shape.render(&piece.records, piece.invokes + 1);
        let name = &self.mapping.name;
        let n = piece.records.len();
        let trace = trace::of_batch(piece.records.iter().map(|r| &r.trace));
        let span = out.span.child(
            "invoke",
            || {
                vec![
                    KeyValue::new("esm_gateway.mapping", name.clone()),
                    KeyValue::new("esm_gateway.function", self.invoker.function().to_owned()),
                    KeyValue::new("esm_gateway.batch.records", n as i64),
                    KeyValue::new("esm_gateway.attempt", i64::from(piece.invokes) + 1),
                ]
            },
            trace.as_ref(),
        );
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
            let r = self.invoker.invoke(event, trace).await;
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
        span.set(KeyValue::new("esm_gateway.outcome", outcome));
        match &result {
            Err(e) => span.fail(e.to_string()),
            Ok(r) if r.function_error.is_some() => span.fail("function error"),
            Ok(_) => {}
        }
        drop(span);
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
                return Step::Retry(piece, self.policy.backoff(*free_failures), false);
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
                    false,
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
            item_failures(&response.payload, self.shape.as_ref(), &piece.records)
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
                Step::Retry(piece, delay, true)
            }
        }
    }
}

/// One batch in `esm_gateway_batches_in_flight`, for as long as it lives.
struct InFlight<'a>(&'a MappingStatus);

impl<'a> InFlight<'a> {
    fn new(status: &'a MappingStatus) -> Self {
        status.metrics.in_flight.increment(1.0);
        InFlight(status)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.decrement(1.0);
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
