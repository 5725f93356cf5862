//! The AWS payload shapes: the event a function receives and the on-failure record.
//!
//! Records arrive pre-rendered (see `record.rs`); this module renders each source's
//! element once and wraps a batch of them in the source's envelope.

use std::fmt::Write as _;
use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};

use crate::record::Record;

/// Scheduler's placeholder for the attempt number, substituted at each invoke.
pub const ATTEMPT_NUMBER: &str = "<aws.scheduler.attempt-number>";

/// A source's event envelope, built once per mapping from its configuration.
#[derive(Debug, Clone)]
pub enum Envelope {
    /// `{"eventSource":"aws:rmq","eventSourceArn":…,"rmqMessagesByQueue":{"queue::vhost":[…]}}`
    Rabbit {
        event_source_arn: String,
        queue: String,
        vhost: String,
    },
    /// `{"Records":[…]}`; each record carries its own queue ARN and region.
    Sqs { queue_url: String, fifo: bool },
    /// `{"eventSource":"SelfManagedKafka","bootstrapServers":…,"records":{"topic-0":[…]}}`,
    /// one per partition: a batch never mixes partitions.
    Kafka {
        bootstrap_servers: String,
        topic: String,
        partition: i32,
    },
    /// A schedule's fire: the record's fragment is the whole event (a Scheduled Event or
    /// the configured input), rendered when it fired.
    Schedule {
        name: String,
        /// The rule ARN (Scheduled Event) or schedule ARN (input) the event names.
        arn: String,
        expression: String,
    },
}

impl Envelope {
    /// The source's name in failure records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Envelope::Rabbit { .. } => "rabbitmq",
            Envelope::Kafka { .. } => "kafka",
            Envelope::Sqs { .. } => "sqs",
            Envelope::Schedule { .. } => "schedule",
        }
    }

    /// Renders the event for the `attempt`th invoke (from 1) of `records`: only a
    /// schedule's input names its attempt.
    pub fn render_attempt(&self, records: &[Record], attempt: u32) -> Vec<u8> {
        match (self, records) {
            (Envelope::Schedule { .. }, [r, ..]) => r
                .fragment
                .replace(ATTEMPT_NUMBER, &attempt.to_string())
                .into_bytes(),
            _ => self.render(records),
        }
    }

    /// Renders the event for `records`, in their order.
    pub fn render(&self, records: &[Record]) -> Vec<u8> {
        if let Envelope::Schedule { .. } = self {
            // One fire is one record, and its fragment is the event (as first sent).
            return match records {
                [] => b"{}".to_vec(),
                _ => self.render_attempt(&records[..1], 1),
            };
        }
        let bytes: usize = records.iter().map(Record::weight).sum();
        let mut out = Vec::with_capacity(256 + bytes);
        match self {
            Envelope::Rabbit {
                event_source_arn,
                queue,
                vhost,
            } => {
                out.extend_from_slice(br#"{"eventSource":"aws:rmq","eventSourceArn":"#);
                serde_json::to_writer(&mut out, event_source_arn).expect("string to JSON");
                out.extend_from_slice(br#","rmqMessagesByQueue":{"#);
                serde_json::to_writer(&mut out, &format!("{queue}::{vhost}"))
                    .expect("string to JSON");
            }
            Envelope::Kafka {
                bootstrap_servers,
                topic,
                partition,
            } => {
                out.extend_from_slice(br#"{"eventSource":"SelfManagedKafka","bootstrapServers":"#);
                serde_json::to_writer(&mut out, bootstrap_servers).expect("string to JSON");
                out.extend_from_slice(br#","records":{"#);
                serde_json::to_writer(&mut out, &format!("{topic}-{partition}"))
                    .expect("string to JSON");
            }
            Envelope::Sqs { .. } => out.extend_from_slice(br#"{"Records""#),
            Envelope::Schedule { .. } => unreachable!("rendered above"),
        }
        out.extend_from_slice(b":[");
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(r.fragment.as_bytes());
        }
        out.extend_from_slice(match self {
            Envelope::Sqs { .. } => b"]}",
            _ => b"]}}",
        });
        out
    }

    /// Which records a partial batch response's `itemIdentifier` names (empty: none).
    /// RabbitMQ: a message id (string) or a position in the event (number). Kafka: AWS's
    /// `{"partition":"topic-0","offset":N}`. A message id names every record that carries
    /// it: publishers reuse ids, and acking one copy of a reported failure loses it.
    pub fn item_indexes(&self, id: &Value, records: &[Record]) -> Vec<usize> {
        match (self, id) {
            (Envelope::Rabbit { .. } | Envelope::Sqs { .. }, Value::String(s)) if !s.is_empty() => {
                records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.id.as_deref() == Some(s.as_str()))
                    .map(|(i, _)| i)
                    .collect()
            }
            (Envelope::Rabbit { .. }, Value::Number(n)) => n
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| i < records.len())
                .into_iter()
                .collect(),
            (
                Envelope::Kafka {
                    topic, partition, ..
                },
                Value::Object(o),
            ) => {
                let named = o
                    .get("partition")
                    .and_then(Value::as_str)
                    .zip(o.get("offset").and_then(Value::as_u64));
                match named {
                    Some((key, offset)) if key == format!("{topic}-{partition}") => records
                        .iter()
                        .position(|r| r.position == offset)
                        .into_iter()
                        .collect(),
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }

    /// What else fails with the records a function reported failed (indexes, sorted
    /// and without duplicates on return). Kafka: everything from the lowest failed
    /// offset on (a stream checkpoints at it). SQS FIFO: the later messages of each
    /// failed message's group. Otherwise just the reported ones.
    pub fn widen_failures(&self, mut failed: Vec<usize>, records: &[Record]) -> Vec<usize> {
        failed.sort_unstable();
        failed.dedup();
        match self {
            Envelope::Kafka { .. } => match failed.first() {
                Some(&lowest) => (lowest..records.len()).collect(),
                None => failed,
            },
            Envelope::Sqs { fifo: true, .. } => {
                let Some(&first) = failed.first() else {
                    return failed;
                };
                let mut groups = std::collections::HashSet::new();
                (first..records.len())
                    .filter(|&i| {
                        let group = records[i].key.as_deref();
                        if failed.binary_search(&i).is_ok() {
                            groups.insert(group);
                            true
                        } else {
                            groups.contains(&group)
                        }
                    })
                    .collect()
            }
            _ => failed,
        }
    }

    /// Bytes of an empty event: what a batch has before its first record.
    pub fn overhead(&self) -> usize {
        self.render(&[]).len()
    }

    /// The `…BatchInfo` member of a failure record: where the records came from.
    pub fn batch_info(&self, records: &[Record]) -> (&'static str, Value) {
        let first = records.first();
        let last = records.last();
        let ts = |r: Option<&Record>| r.map(|r| rfc3339(r.received_at));
        match self {
            Envelope::Rabbit { queue, vhost, .. } => (
                "RabbitMQBatchInfo",
                json!({
                    "queue": queue,
                    "vhost": vhost,
                    "batchSize": records.len(),
                    "firstMessageId": first.and_then(|r| r.id.as_deref()),
                    "lastMessageId": last.and_then(|r| r.id.as_deref()),
                    "firstDeliveryTag": first.map(|r| r.position),
                    "lastDeliveryTag": last.map(|r| r.position),
                    "firstReceivedTime": ts(first),
                    "lastReceivedTime": ts(last),
                }),
            ),
            Envelope::Sqs { queue_url, .. } => (
                "SQSBatchInfo",
                json!({
                    "queueUrl": queue_url,
                    "batchSize": records.len(),
                    "firstMessageId": first.and_then(|r| r.id.as_deref()),
                    "lastMessageId": last.and_then(|r| r.id.as_deref()),
                    "firstReceivedTime": ts(first),
                    "lastReceivedTime": ts(last),
                }),
            ),
            Envelope::Kafka {
                topic, partition, ..
            } => (
                "KafkaBatchInfo",
                json!({
                    "batchSize": records.len(),
                    "topic": topic,
                    "partition": partition,
                    "firstOffset": first.map(|r| r.position),
                    "lastOffset": last.map(|r| r.position),
                    "firstRecordTime": ts(first),
                    "lastRecordTime": ts(last),
                }),
            ),
            Envelope::Schedule {
                name,
                arn,
                expression,
            } => (
                "ScheduleInfo",
                json!({
                    "scheduleName": name,
                    "scheduleArn": arn,
                    "expression": expression,
                    "scheduledTime": first.map(|r| rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(r.position))),
                    "executionId": first.and_then(|r| r.id.as_deref()),
                    "firedTime": ts(first),
                }),
            ),
        }
    }
}

/// ISO 8601 in UTC with milliseconds, as AWS writes timestamps.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One RabbitMQ message as an element of `rmqMessagesByQueue`, exactly as Amazon MQ
/// triggers send it: every basic property present (null when absent), string headers as
/// `{"bytes":[…]}` of signed (Java) bytes, the body base64 in `data`.
pub fn rabbit_fragment(
    properties: &lapin::BasicProperties,
    redelivered: bool,
    body: &[u8],
) -> String {
    // Written straight into one buffer: this runs for every message, and building a
    // serde_json map first costs more than the rest of the path together.
    let p = properties;
    let mut out = String::with_capacity(420 + body.len().div_ceil(3) * 4);
    let short = short_properties(p);
    let push_short = |out: &mut String, from: usize, to: usize| {
        for (key, value) in &short[from..to] {
            let _ = write!(out, r#","{key}":"#);
            push_opt_str(out, value.as_ref().map(|s| s.as_str()));
        }
    };
    out.push_str(r#"{"basicProperties":{"contentType":"#);
    push_opt_str(&mut out, p.content_type().as_ref().map(|s| s.as_str()));
    push_short(&mut out, 1, 2);
    out.push_str(r#","headers":"#);
    match p.headers() {
        Some(t) => out.push_str(&table_json(t).to_string()),
        None => out.push_str("null"),
    }
    out.push_str(r#","deliveryMode":"#);
    push_opt_num(&mut out, p.delivery_mode().map(u64::from));
    out.push_str(r#","priority":"#);
    push_opt_num(&mut out, p.priority().map(u64::from));
    push_short(&mut out, 2, 6);
    out.push_str(r#","timestamp":"#);
    push_opt_str(&mut out, p.timestamp().map(java_date).as_deref());
    push_short(&mut out, 6, 10);
    let _ = write!(
        out,
        r#","bodySize":{}}},"redelivered":{redelivered},"data":""#,
        body.len()
    );
    push_base64(&mut out, body);
    out.push_str("\"}");
    out
}

/// The short-string basic properties by their event names, in the event's order.
fn short_properties(p: &lapin::BasicProperties) -> [(&'static str, &Option<ShortString>); 10] {
    [
        ("contentType", p.content_type()),
        ("contentEncoding", p.content_encoding()),
        ("correlationId", p.correlation_id()),
        ("replyTo", p.reply_to()),
        ("expiration", p.expiration()),
        ("messageId", p.message_id()),
        ("type", p.kind()),
        ("userId", p.user_id()),
        ("appId", p.app_id()),
        ("clusterId", p.cluster_id()),
    ]
}

/// A short string of a RabbitMQ message that is not UTF-8 where the event needs text (a
/// basic property or a header name): the event could only show it altered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// Where it is: `basicProperties.messageId`, or for a header name the table holding
    /// it, `basicProperties.headers[.<parent>…]`.
    pub field: String,
    /// Its bytes as received.
    pub raw: Vec<u8>,
}

/// The short strings of a message that its event cannot carry as they are. Header
/// values are rendered as bytes, so only their names count.
pub fn rabbit_undecodable(properties: &lapin::BasicProperties) -> Vec<Undecodable> {
    let mut out: Vec<Undecodable> = short_properties(properties)
        .into_iter()
        .filter_map(|(key, value)| {
            let s = value.as_ref().filter(|s| !s.is_utf8())?;
            Some(Undecodable {
                field: format!("basicProperties.{key}"),
                raw: s.as_bytes().to_vec(),
            })
        })
        .collect();
    if let Some(headers) = properties.headers() {
        undecodable_names(headers, "basicProperties.headers", &mut out);
    }
    out
}

fn undecodable_names(table: &FieldTable, at: &str, out: &mut Vec<Undecodable>) {
    for (name, value) in table.inner() {
        if !name.is_utf8() {
            out.push(Undecodable {
                field: at.to_owned(),
                raw: name.as_bytes().to_vec(),
            });
        }
        undecodable_in_value(value, &format!("{at}.{name}"), out);
    }
}

fn undecodable_in_value(value: &AMQPValue, at: &str, out: &mut Vec<Undecodable>) {
    match value {
        AMQPValue::FieldTable(t) => undecodable_names(t, at, out),
        AMQPValue::FieldArray(a) => {
            for v in a.as_slice() {
                undecodable_in_value(v, at, out);
            }
        }
        _ => {}
    }
}

/// Adds to a message's element (for its failure record, never for an invoke) the bytes
/// of its undecodable short strings, as `"undecodable":[{"field":…,"raw":{"bytes":[…]}}]`
/// of signed bytes like the headers.
pub fn with_undecodable(mut fragment: String, undecodable: &[Undecodable]) -> String {
    let list: Vec<Value> = undecodable
        .iter()
        .map(|u| json!({ "field": u.field, "raw": signed_bytes(&u.raw) }))
        .collect();
    debug_assert!(fragment.ends_with('}'));
    fragment.pop();
    let _ = write!(fragment, r#","undecodable":{}}}"#, Value::Array(list));
    fragment
}

/// One SQS message as an element of `Records`, exactly as Lambda's SQS trigger sends
/// it: system attributes by name, message attributes with camelCase keys, binary values
/// base64.
pub fn sqs_fragment(
    m: &aws_sdk_sqs::types::Message,
    event_source_arn: &str,
    region: &str,
) -> String {
    let b64 =
        |b: &aws_sdk_sqs::primitives::Blob| base64_simd::STANDARD.encode_to_string(b.as_ref());
    let attributes: serde_json::Map<String, Value> = m
        .attributes()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.as_str())))
        .collect();
    let message_attributes: serde_json::Map<String, Value> = m
        .message_attributes()
        .into_iter()
        .flatten()
        .map(|(k, a)| {
            let v = json!({
                "stringValue": a.string_value(),
                "binaryValue": a.binary_value().map(b64),
                "stringListValues": a.string_list_values(),
                "binaryListValues": a.binary_list_values().iter().map(b64).collect::<Vec<_>>(),
                "dataType": a.data_type(),
            });
            (k.clone(), v)
        })
        .collect();
    json!({
        "messageId": m.message_id(),
        "receiptHandle": m.receipt_handle(),
        "body": m.body().unwrap_or_default(),
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": m.md5_of_body(),
        "md5OfMessageAttributes": m.md5_of_message_attributes(),
        "eventSource": "aws:sqs",
        "eventSourceARN": event_source_arn,
        "awsRegion": region,
    })
    .to_string()
}

/// Appends `s` as a JSON string.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&Value::from(s).to_string());
    }
}

/// Appends `bytes` base64-encoded (SIMD; base64 needs no JSON escaping).
fn push_base64(out: &mut String, bytes: &[u8]) {
    base64_simd::STANDARD.encode_append(bytes, out);
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn push_opt_num(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str("null"),
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
    /// and handed to `replaced` raw so that the source can report it.
    pub fn render<M>(&self, m: &M, replaced: &mut dyn FnMut(&[u8])) -> String
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
        out
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

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
            .collect(),
    )
}

fn signed_bytes(b: &[u8]) -> Value {
    json!({ "bytes": b.iter().map(|&x| x as i8).collect::<Vec<i8>>() })
}

fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => signed_bytes(s.as_bytes()),
        AMQPValue::LongString(s) => signed_bytes(s.as_bytes()),
        AMQPValue::ByteArray(b) => signed_bytes(b.as_slice()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::Void => Value::Null,
    }
}

/// Java's default `DateFormat` rendering that Amazon MQ events carry, in UTC:
/// "Jan 1, 1970, 12:33:41 AM".
pub fn java_date(epoch_seconds: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (epoch_seconds / 86_400) as i64;
    let secs = epoch_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let (h12, half) = match h {
        0 => (12, "AM"),
        1..=11 => (h, "AM"),
        12 => (12, "PM"),
        _ => (h - 12, "PM"),
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "{} {day}, {year}, {h12}:{m:02}:{s:02} {half}",
        MONTHS[month as usize - 1]
    );
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    #[test]
    fn undecodable_short_strings_are_found_with_their_bytes_and_values_stay_exact() {
        let bad = |b: &[u8]| ShortString::from_bytes(b.to_vec()).unwrap();
        let mut inner = FieldTable::default();
        inner.insert(bad(b"\xffin"), AMQPValue::LongInt(1));
        let mut headers = FieldTable::default();
        headers.insert("outer".into(), AMQPValue::FieldTable(inner));
        headers.insert("value".into(), AMQPValue::ShortString(bad(b"\xfe")));
        let props = lapin::BasicProperties::default()
            .with_message_id(bad(b"\xff\xfe"))
            .with_app_id("fine".into())
            .with_headers(headers);
        assert_eq!(
            rabbit_undecodable(&props),
            [
                Undecodable {
                    field: "basicProperties.messageId".into(),
                    raw: b"\xff\xfe".to_vec()
                },
                Undecodable {
                    field: "basicProperties.headers.outer".into(),
                    raw: b"\xffin".to_vec()
                },
            ]
        );
        let fragment = with_undecodable(
            rabbit_fragment(&props, false, b""),
            &rabbit_undecodable(&props),
        );
        let v: Value = serde_json::from_str(&fragment).unwrap();
        // A short-string header value is rendered as bytes: exact, not undecodable.
        assert_eq!(
            v["basicProperties"]["headers"]["value"]["bytes"],
            json!([-2])
        );
        assert_eq!(v["undecodable"][0]["raw"]["bytes"], json!([-1, -2]));
        assert_eq!(
            v["undecodable"][1]["field"],
            "basicProperties.headers.outer"
        );
    }

    #[test]
    fn java_dates_match_amazon_mq() {
        assert_eq!(java_date(2021), "Jan 1, 1970, 12:33:41 AM");
        assert_eq!(java_date(1_700_000_000), "Nov 14, 2023, 10:13:20 PM");
        assert_eq!(java_date(951_825_600), "Feb 29, 2000, 12:00:00 PM");
    }

    #[test]
    fn fragment_has_every_property_and_signed_header_bytes() {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("header1"),
            AMQPValue::LongString(LongString::from("value1")),
        );
        headers.insert(ShortString::from("numberInHeader"), AMQPValue::LongInt(10));
        headers.insert(
            ShortString::from("accent"),
            AMQPValue::LongString(LongString::from("ë")),
        );
        let props = lapin::BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers)
            .with_delivery_mode(1)
            .with_priority(34)
            .with_expiration("60000".into())
            .with_timestamp(2021)
            .with_user_id("AIDACKCEVSQ6C2EXAMPLE".into())
            .with_correlation_id("needs \"escaping\"\n".into());
        let body = br#"{"timeout":0,"data":"CZrmf0Gw8Ov4bqLQxD4E"}"#;
        let v: Value = serde_json::from_str(&rabbit_fragment(&props, false, body)).unwrap();
        let bp = &v["basicProperties"];
        assert_eq!(bp["contentType"], "text/plain");
        assert_eq!(bp["contentEncoding"], Value::Null);
        assert_eq!(
            bp["headers"]["header1"]["bytes"],
            json!([118, 97, 108, 117, 101, 49])
        );
        assert_eq!(bp["headers"]["accent"]["bytes"], json!([-61, -85]));
        assert_eq!(bp["headers"]["numberInHeader"], 10);
        assert_eq!(bp["deliveryMode"], 1);
        assert_eq!(bp["priority"], 34);
        assert_eq!(bp["messageId"], Value::Null);
        assert_eq!(bp["correlationId"], "needs \"escaping\"\n");
        assert_eq!(bp["timestamp"], "Jan 1, 1970, 12:33:41 AM");
        assert_eq!(bp["type"], Value::Null);
        assert_eq!(bp["bodySize"], body.len());
        assert_eq!(v["redelivered"], false);
        assert_eq!(
            v["data"],
            "eyJ0aW1lb3V0IjowLCJkYXRhIjoiQ1pybWYwR3c4T3Y0YnFMUXhENEUifQ=="
        );
        // Every key of AWS's own example is present, no more and no fewer.
        let keys: Vec<_> = bp.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 15, "{keys:?}");
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
            serde_json::from_str(&fragments.render(&m, &mut |n| panic!("{n:?} replaced"))).unwrap();
        assert_eq!(
            v,
            json!({"topic":"AWSKafkaTopic","partition":0,"offset":15,"timestamp":1_595_035_749_700_i64,
                   "timestampType":"CREATE_TIME","value":"dmFsdWU=",
                   "headers":[{"headerKey":[104,101,97,100,101,114,86,97,108,117,101]},{"accent":[-61,-85]}]})
        );
        let r = Record {
            fragment: fragments.render(&m, &mut |n| panic!("{n:?} replaced")),
            id: None,
            key: None,
            position: 15,
            received: tokio::time::Instant::now(),
            received_at: SystemTime::now(),
            ack: crate::record::Ack::None,
            hold: crate::record::Hold::default(),
        };
        let env = Envelope::Kafka {
            bootstrap_servers: "b1:9092,b2:9092".into(),
            topic: "AWSKafkaTopic".into(),
            partition: 0,
        };
        let e: aws_lambda_events::event::kafka::KafkaEvent =
            serde_json::from_slice(&env.render(std::slice::from_ref(&r))).unwrap();
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

    #[test]
    fn envelope_parses_as_aws_lambda_events_type() {
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(0)
            .with_message_id("m-1".into());
        let record = || Record {
            fragment: rabbit_fragment(&props, true, b"hello"),
            id: Some("m-1".into()),
            key: None,
            position: 1,
            received: tokio::time::Instant::now(),
            received_at: SystemTime::now(),
            ack: crate::record::Ack::None,
            hold: crate::record::Hold::default(),
        };
        let env = Envelope::Rabbit {
            event_source_arn: "arn:aws:mq:us-east-1:000000000000:broker:b".into(),
            queue: "orders".into(),
            vhost: "/".into(),
        };
        let bytes = env.render(&[record(), record()]);
        let e: aws_lambda_events::event::rabbitmq::RabbitMqEvent =
            serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("aws:rmq"));
        let msgs = &e.messages_by_queue["orders::/"];
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].basic_properties.message_id.as_deref(), Some("m-1"));
        assert!(msgs[0].redelivered);
        assert_eq!(env.overhead(), env.render(&[]).len());
    }
}
