//! What the pipeline needs of a source's event ([`Shape`]), and the JSON helpers the
//! sources render their elements with.
//!
//! Records arrive pre-rendered (see `record.rs`): each source renders its element of the
//! AWS event once, when a message arrives, and its [`Shape`] wraps a batch of them in the
//! source's envelope for each invoke. A bisection re-renders nothing but the envelope; a
//! retry also rewrites what AWS's redelivery would change (RabbitMQ's `redelivered`, SQS's
//! `ApproximateReceiveCount`, a schedule's attempt number and execution id), and only then.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::Value;

use crate::record::Record;

/// A source's event, as the pipeline sees it: one value per mapping (Kafka: per
/// partition), shared by every batch. The implementations live with their sources.
pub trait Shape: std::fmt::Debug + Send + Sync {
    /// The source's name in failure records and metrics.
    fn kind(&self) -> &'static str;

    /// The event for the `attempt`th invoke (from 1) of `records`, in their order.
    fn render(&self, records: &[Record], attempt: u32) -> Vec<u8>;

    /// Bytes of an empty event: what a batch has before its first record.
    fn overhead(&self) -> usize {
        self.render(&[], 1).len()
    }

    /// Which records a partial batch response's `itemIdentifier` names (empty: none). A
    /// message id names every record that carries it: publishers reuse ids, and acking
    /// one copy of a reported failure loses it.
    fn item_indexes(&self, id: &Value, records: &[Record]) -> Vec<usize>;

    /// What fails with the records a function reported failed (indexes, sorted and
    /// without duplicates on return). By default just the reported ones.
    fn widen_failures(&self, mut failed: Vec<usize>, _records: &[Record]) -> Vec<usize> {
        failed.sort_unstable();
        failed.dedup();
        failed
    }

    /// The `…BatchInfo` member of a failure record: where the records came from.
    fn batch_info(&self, records: &[Record]) -> (&'static str, Value);

    /// The same for a failure record of one record alone (for destinations that take
    /// one per record). By default the batch info of a batch of one.
    fn record_info(&self, record: &Record) -> (&'static str, Value) {
        self.batch_info(std::slice::from_ref(record))
    }

    /// The fields of a record's element that filters see decoded.
    fn decoded(&self) -> &'static [Decoded];
}

/// A field of a record's element that filter patterns match decoded: parsed as JSON
/// when it is JSON, else as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Base64 of the bytes (RabbitMQ `data`, Kafka `key` and `value`).
    Base64(&'static str),
    /// Text (SQS `body`).
    Json(&'static str),
}

/// `prefix`, then `:[`, the records' elements separated by commas, `]` and `suffix`.
pub fn join(prefix: &[u8], records: &[Record], suffix: &[u8]) -> Vec<u8> {
    let bytes: usize = records.iter().map(Record::weight).sum();
    let mut out = Vec::with_capacity(prefix.len() + bytes + suffix.len() + 3);
    out.extend_from_slice(prefix);
    out.extend_from_slice(b":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r.fragment.as_bytes());
    }
    out.push(b']');
    out.extend_from_slice(suffix);
    out
}

/// The indexes of the records whose id is `id` (none for an empty id).
pub fn records_named(id: &str, records: &[Record]) -> Vec<usize> {
    if id.is_empty() {
        return Vec::new();
    }
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.id.as_deref() == Some(id))
        .map(|(i, _)| i)
        .collect()
}

/// ISO 8601 in UTC with milliseconds, as AWS writes timestamps.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Appends `s` as a JSON string.
pub fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&Value::from(s).to_string());
    }
}

/// Appends `bytes` base64-encoded (SIMD; base64 needs no JSON escaping).
pub fn push_base64(out: &mut String, bytes: &[u8]) {
    base64_simd::STANDARD.encode_append(bytes, out);
}

pub fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

pub fn push_opt_num(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str("null"),
    }
}
