//! What flows from a source through the pipeline: a [`Record`] and how it ends.
//!
//! A record is rendered into its element of the AWS event once, when it arrives, so the
//! batcher can count bytes exactly and a first attempt or a bisection re-renders nothing
//! but the envelope (a retry rewrites only what a redelivery would change). Every record ends with one [`Resolution`]; a source acknowledges it only
//! then, and a record dropped unresolved is left to the broker to redeliver.

use std::any::Any;
use std::time::SystemTime;

use tokio::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use crate::trace::TraceContext;

/// One message from a source.
#[derive(Debug)]
pub struct Record {
    /// This record's element of the function event, as JSON text.
    pub fragment: String,
    /// What a partial batch response names it by (message id), when it has one.
    pub id: Option<Box<str>>,
    /// Its key within the source, as bytes: the Kafka record's key exactly as
    /// produced, the SQS FIFO message group. Orders records (FIFO groups) and keys
    /// the failure records a Kafka topic destination receives.
    pub key: Option<Box<[u8]>>,
    /// Position in its stream (delivery tag, offset); used in failure records.
    pub position: u64,
    /// When the gateway received it: the clock max_record_age runs on.
    pub received: Instant,
    /// The same moment on the wall clock, for failure records.
    pub received_at: SystemTime,
    /// The producer's trace, read from its headers or attributes when it arrived
    /// (`trace`); the invoke continues the batch's first.
    pub trace: Option<TraceContext>,
    /// How the source acknowledges it.
    pub ack: Ack,
    /// The bytes of its lane's budget it holds until it is dropped (see
    /// `pipeline::budget`); none for sources that bound their buffers otherwise.
    pub hold: Hold,
}

#[cfg(test)]
impl Record {
    /// A record for unit tests: an empty `{}` element received now, acknowledged by
    /// nothing, holding no budget.
    pub fn for_test(id: Option<&str>, key: Option<&str>, position: u64) -> Record {
        Record {
            fragment: "{}".into(),
            id: id.map(Into::into),
            key: key.map(|k| k.as_bytes().into()),
            position,
            received: Instant::now(),
            received_at: SystemTime::now(),
            trace: None,
            ack: Ack::NONE,
            hold: Hold::default(),
        }
    }
}

/// The source's handle for acknowledging one record (a RabbitMQ delivery's acker, an
/// SQS receipt handle), of a type only its source knows; none for sources that
/// acknowledge by position alone.
pub struct Ack(Option<Box<dyn Any + Send + Sync>>);

impl Ack {
    /// No handle: acknowledged by position (and records built by tests).
    pub const NONE: Ack = Ack(None);

    pub fn new<T: Any + Send + Sync>(handle: T) -> Ack {
        Ack(Some(Box::new(handle)))
    }

    /// The handle, if it is a `T`.
    pub fn take<T: Any>(self) -> Option<T> {
        self.0?.downcast().ok().map(|b| *b)
    }

    /// The handle, if it is a `T`, left in place.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_ref()?.downcast_ref()
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Ack(..)"
        } else {
            "Ack(none)"
        })
    }
}

/// Bytes of a lane's budget held by one record (`pipeline::budget`); returned when
/// dropped.
#[derive(Debug, Default)]
pub struct Hold {
    // Never read: holding it is the point.
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Hold {
    pub fn of(permit: OwnedSemaphorePermit) -> Hold {
        Hold {
            _bytes: Some(permit),
        }
    }
}

impl Record {
    /// Bytes the record adds to an event: its fragment and a separating comma.
    pub fn weight(&self) -> usize {
        self.fragment.len() + 1
    }
}

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The function succeeded on it.
    Delivered,
    /// Its failure record is confirmed in the on-failure destination.
    DeadLettered,
    /// No filter pattern matched it: acknowledged without an invoke.
    Filtered,
    /// It failed and is left to the source to redeliver (SQS: after its visibility
    /// timeout, subject to the queue's redrive policy).
    Released,
    /// A schedule's fire that ran out of retries with no destination (as Scheduler
    /// drops it without a dead-letter queue).
    Dropped,
}
