//! The self-managed Kafka event, as AWS's trigger sends it: each record rendered once
//! into its element of `records`, and the envelope around one partition's batch.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::invoke::event::{Decoded, Shape, join, push_base64, push_json_str, rfc3339};
use crate::record::Record;
use crate::trace::TraceContext;

/// `{"eventSource":"SelfManagedKafka","bootstrapServers":…,"records":{"topic-0":[…]}}`,
/// one per partition: a batch never mixes partitions.
#[derive(Debug, Clone)]
pub struct KafkaShape {
    prefix: Vec<u8>,
    bootstrap_servers: String,
    topic: String,
    partition: i32,
    /// The failure records' `eventSourceArn` (see [`KafkaShape::with_event_source_arn`]).
    event_source_arn: String,
}

impl KafkaShape {
    pub fn new(bootstrap_servers: &str, topic: &str, partition: i32) -> KafkaShape {
        let mut prefix = br#"{"eventSource":"SelfManagedKafka","bootstrapServers":"#.to_vec();
        serde_json::to_writer(&mut prefix, bootstrap_servers).expect("string to JSON");
        prefix.extend_from_slice(br#","records":{"#);
        serde_json::to_writer(&mut prefix, &format!("{topic}-{partition}"))
            .expect("string to JSON");
        KafkaShape {
            prefix,
            bootstrap_servers: bootstrap_servers.to_owned(),
            topic: topic.to_owned(),
            partition,
            event_source_arn: String::new(),
        }
    }

    /// Names the mapping in failure records' `eventSourceArn`: a self-managed cluster has
    /// no ARN, so AWS's field carries the event source mapping's (synthetic here:
    /// `arn:aws:lambda:<region>:<account>:event-source-mapping:<mapping name>`).
    pub fn with_event_source_arn(mut self, arn: &str) -> KafkaShape {
        self.event_source_arn = arn.to_owned();
        self
    }

    /// The record's Kafka timestamp as AWS writes it in failure records (ISO 8601, ms),
    /// or when it arrived if it has none.
    fn timestamp(r: &Record) -> String {
        match record_timestamp(&r.fragment) {
            Some(ms) if ms >= 0 => {
                rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64))
            }
            _ => rfc3339(r.received_at),
        }
    }
}

/// The `timestamp` (epoch milliseconds) of a record's element: its first such key,
/// right after `offset` (the topic before it is a JSON string, whose quotes are escaped).
fn record_timestamp(fragment: &str) -> Option<i64> {
    let at = fragment.find(r#""timestamp":"#)? + r#""timestamp":"#.len();
    let digits: &str = &fragment[at..];
    let end = digits
        .find(|c: char| c != '-' && !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

impl Shape for KafkaShape {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn render(&self, records: &[Record], _attempt: u32) -> Vec<u8> {
        join(&self.prefix, records, b"}}")
    }

    /// AWS's `{"partition":"topic-0","offset":N}`.
    fn item_indexes(&self, id: &Value, records: &[Record]) -> Vec<usize> {
        let named = id
            .get("partition")
            .and_then(Value::as_str)
            .zip(id.get("offset").and_then(Value::as_u64));
        match named {
            Some((key, offset)) if key == format!("{}-{}", self.topic, self.partition) => records
                .iter()
                .position(|r| r.position == offset)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    // Only the named records fail (AWS's Kafka rule, unlike the Kinesis checkpoint): the
    // default `widen_failures`. Offsets still advance only past resolved records.

    /// AWS's `KafkaBatchInfo`: offsets as strings and record timestamps, under
    /// `recordsInfo` by "topic-partition".
    fn batch_info(&self, records: &[Record]) -> (&'static str, Value) {
        let mut info = json!({
            "batchSize": records.len(),
            "eventSourceArn": self.event_source_arn,
            "bootstrapServers": self.bootstrap_servers,
            "payloadSize": self.render(records, 1).len(),
        });
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            info["recordsInfo"] = json!({
                format!("{}-{}", self.topic, self.partition): {
                    "firstRecordOffset": first.position.to_string(),
                    "lastRecordOffset": last.position.to_string(),
                    "firstRecordTimestamp": KafkaShape::timestamp(first),
                    "lastRecordTimestamp": KafkaShape::timestamp(last),
                }
            });
        }
        ("KafkaBatchInfo", info)
    }

    /// What AWS writes to a Kafka topic destination for each failed record: `batchSize`
    /// 1 and `recordInfo`.
    fn record_info(&self, record: &Record) -> (&'static str, Value) {
        (
            "KafkaBatchInfo",
            json!({
                "batchSize": 1,
                "eventSourceArn": self.event_source_arn,
                "bootstrapServers": self.bootstrap_servers,
                "payloadSize": self.render(std::slice::from_ref(record), 1).len(),
                "recordInfo": {
                    "offset": record.position.to_string(),
                    "timestamp": KafkaShape::timestamp(record),
                },
            }),
        )
    }

    fn decoded(&self) -> &'static [Decoded] {
        &[Decoded::Base64("value"), Decoded::Base64("key")]
    }
}

/// Renders one partition's records as elements of `records`, as AWS's self-managed
/// Kafka trigger sends them: key and value base64 (left out when null), headers as a
/// list of one-key objects whose values are signed (Java) byte arrays.
#[derive(Debug, Clone)]
pub struct KafkaFragments {
    /// `{"topic":…,"partition":N,"offset":`, the same for every record of the partition.
    prefix: String,
}

impl KafkaFragments {
    pub fn new(topic: &str, partition: i32) -> Self {
        let mut prefix = String::from(r#"{"topic":"#);
        push_json_str(&mut prefix, topic);
        prefix.push_str(r#","partition":"#);
        prefix.push_str(itoa::Buffer::new().format(partition));
        prefix.push_str(r#","offset":"#);
        KafkaFragments { prefix }
    }

    /// `m`'s element; `m` must come from this renderer's partition. A header name that
    /// is not UTF-8 (Kafka allows any bytes; a JSON key cannot carry them) is decoded as
    /// AWS's Java-based trigger decodes it, each invalid sequence replaced by U+FFFD,
    /// and handed to `replaced` raw so that the source can report it. With it, the
    /// trace context of its `X-Amzn-Trace-Id` or `traceparent` header, if valid.
    pub fn render<M>(
        &self,
        m: &M,
        replaced: &mut dyn FnMut(&[u8]),
    ) -> (String, Option<TraceContext>)
    where
        M: rdkafka::Message,
        M::Headers: NativeHeaders,
    {
        use rdkafka::message::Timestamp;
        let (timestamp, kind) = match m.timestamp() {
            Timestamp::CreateTime(t) => (t, "CREATE_TIME"),
            Timestamp::LogAppendTime(t) => (t, "LOG_APPEND_TIME"),
            Timestamp::NotAvailable => (-1, "NO_TIMESTAMP_TYPE"),
        };
        // librdkafka parses headers out of the record on every call: once only.
        let headers: Vec<(&[u8], Option<&[u8]>)> = m.headers().map(raw_headers).unwrap_or_default();
        let trace = TraceContext::find(|name| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
                .and_then(|(_, v)| *v)
        });
        let b64_len = |b: Option<&[u8]>| b.map_or(0, |b| b.len().div_ceil(3) * 4);
        let headers_len: usize = headers
            .iter()
            .map(|(name, value)| name.len() * 3 + 8 + value.map_or(0, <[u8]>::len) * 5)
            .sum();
        // Sized once, so that base64 of a large value never reallocates.
        let mut out = String::with_capacity(
            self.prefix.len() + 100 + b64_len(m.key()) + b64_len(m.payload()) + headers_len,
        );
        out.push_str(&self.prefix);
        let mut num = itoa::Buffer::new();
        out.push_str(num.format(m.offset()));
        out.push_str(r#","timestamp":"#);
        out.push_str(num.format(timestamp));
        out.push_str(r#","timestampType":""#);
        out.push_str(kind);
        out.push('"');
        if let Some(k) = m.key() {
            out.push_str(r#","key":""#);
            push_base64(&mut out, k);
            out.push('"');
        }
        if let Some(v) = m.payload() {
            out.push_str(r#","value":""#);
            push_base64(&mut out, v);
            out.push('"');
        }
        out.push_str(r#","headers":["#);
        for (i, (name, value)) in headers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('{');
            let decoded = String::from_utf8_lossy(name);
            if let std::borrow::Cow::Owned(_) = decoded {
                replaced(name);
            }
            push_json_str(&mut out, &decoded);
            out.push_str(":[");
            for (j, b) in value.unwrap_or_default().iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(num.format(*b as i8));
            }
            out.push_str("]}");
        }
        out.push_str("]}");
        (out, trace)
    }
}

/// Headers whose librdkafka list can be read directly. rdkafka's own accessors return
/// each name as `&str` and panic on one that is not UTF-8 (`Headers::get`), so headers
/// are read through librdkafka's C API instead, names as raw bytes.
pub trait NativeHeaders {
    fn native(&self) -> *const rdkafka::bindings::rd_kafka_headers_t;
}

impl NativeHeaders for rdkafka::message::BorrowedHeaders {
    fn native(&self) -> *const rdkafka::bindings::rd_kafka_headers_t {
        // rdkafka makes an `&BorrowedHeaders` by casting the list's address (it is a
        // zero-sized view of it), so the address is the list.
        (self as *const Self).cast()
    }
}

impl NativeHeaders for rdkafka::message::OwnedHeaders {
    fn native(&self) -> *const rdkafka::bindings::rd_kafka_headers_t {
        self.as_borrowed().native()
    }
}

/// Each header's name (raw bytes, up to a NUL byte: librdkafka hands names out as C
/// strings) and value, in order.
fn raw_headers<H: NativeHeaders>(h: &H) -> Vec<(&[u8], Option<&[u8]>)> {
    use rdkafka::bindings as rd;
    let native = h.native();
    // SAFETY: `native` is a live header list borrowed from `h`; every pointer
    // librdkafka returns points into it, so the slices live as long as `h`.
    unsafe {
        let count = rd::rd_kafka_header_cnt(native);
        let mut out = Vec::with_capacity(count);
        for idx in 0..count {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut size = 0;
            let err = rd::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes();
            let value =
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
            out.push((name, value));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_trace_header_is_read_case_insensitively() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let message = |headers: OwnedHeaders| {
            OwnedMessage::new(
                None,
                None,
                "t".into(),
                Timestamp::NotAvailable,
                0,
                1,
                Some(headers),
            )
        };
        let fragments = KafkaFragments::new("t", 0);
        let m = message(OwnedHeaders::new().insert(Header {
            key: "TraceParent",
            value: Some(tp),
        }));
        let (_, trace) = fragments.render(&m, &mut |n| panic!("{n:?} replaced"));
        assert_eq!(trace, TraceContext::from_traceparent(tp));
        let m = message(OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-nope"),
        }));
        assert_eq!(fragments.render(&m, &mut |_| ()).1, None);
    }

    #[test]
    fn kafka_records_match_aws_shape() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "headerKey",
                value: Some("headerValue"),
            })
            .insert(Header {
                key: "accent",
                value: Some("ë"),
            });
        let m = OwnedMessage::new(
            Some(b"value".to_vec()),
            None,
            "AWSKafkaTopic".into(),
            Timestamp::CreateTime(1_595_035_749_700),
            0,
            15,
            Some(headers),
        );
        let fragments = KafkaFragments::new("AWSKafkaTopic", 0);
        let v: Value =
            serde_json::from_str(&fragments.render(&m, &mut |n| panic!("{n:?} replaced")).0)
                .unwrap();
        assert_eq!(
            v,
            json!({"topic":"AWSKafkaTopic","partition":0,"offset":15,"timestamp":1_595_035_749_700_i64,
                   "timestampType":"CREATE_TIME","value":"dmFsdWU=",
                   "headers":[{"headerKey":[104,101,97,100,101,114,86,97,108,117,101]},{"accent":[-61,-85]}]})
        );
        let r = Record {
            fragment: fragments.render(&m, &mut |n| panic!("{n:?} replaced")).0,
            ..Record::for_test(None, None, 15)
        };
        let env = KafkaShape::new("b1:9092,b2:9092", "AWSKafkaTopic", 0);
        let e: aws_lambda_events::event::kafka::KafkaEvent =
            serde_json::from_slice(&env.render(std::slice::from_ref(&r), 1)).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("SelfManagedKafka"));
        let recs = &e.records["AWSKafkaTopic-0"];
        assert_eq!(recs[0].offset, 15);
        assert_eq!(recs[0].key, None);
        let id = json!({"partition":"AWSKafkaTopic-0","offset":15});
        assert_eq!(env.item_indexes(&id, std::slice::from_ref(&r)), vec![0]);
        let wrong = json!({"partition":"AWSKafkaTopic-1","offset":15});
        assert!(
            env.item_indexes(&wrong, std::slice::from_ref(&r))
                .is_empty()
        );
    }
}
