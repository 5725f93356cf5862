//! The RabbitMQ event, as Amazon MQ's RabbitMQ trigger sends it: each message rendered
//! once into its element of `rmqMessagesByQueue`, and the envelope around a batch.

use std::fmt::Write as _;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};

use crate::invoke::event::{
    Decoded, Shape, join, push_base64, push_opt_num, push_opt_str, records_named, rfc3339,
};
use crate::record::Record;
use crate::trace::TraceContext;

/// `{"eventSource":"aws:rmq","eventSourceArn":…,"rmqMessagesByQueue":{"queue::vhost":[…]}}`
#[derive(Debug, Clone)]
pub struct RabbitShape {
    /// The envelope up to the opening of the queue's list.
    prefix: Vec<u8>,
    queue: String,
    vhost: String,
}

impl RabbitShape {
    pub fn new(event_source_arn: &str, queue: &str, vhost: &str) -> RabbitShape {
        let mut prefix = br#"{"eventSource":"aws:rmq","eventSourceArn":"#.to_vec();
        serde_json::to_writer(&mut prefix, event_source_arn).expect("string to JSON");
        prefix.extend_from_slice(br#","rmqMessagesByQueue":{"#);
        serde_json::to_writer(&mut prefix, &format!("{queue}::{vhost}")).expect("string to JSON");
        RabbitShape {
            prefix,
            queue: queue.to_owned(),
            vhost: vhost.to_owned(),
        }
    }
}

impl Shape for RabbitShape {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    /// From the second attempt on, every message says `"redelivered":true`, as the
    /// broker's redelivery of a failed batch does on AWS. The first attempt sends the
    /// fragments as rendered on arrival.
    fn render(&self, records: &[Record], attempt: u32) -> Vec<u8> {
        if attempt <= 1 || records.is_empty() {
            return join(&self.prefix, records, b"}}");
        }
        let bytes: usize = records.iter().map(Record::weight).sum();
        let mut out = Vec::with_capacity(self.prefix.len() + bytes + records.len() + 5);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b":[");
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_redelivered(&mut out, &r.fragment);
        }
        out.extend_from_slice(b"]}}");
        out
    }

    /// A message id (string) names every record that carries it; a number is a
    /// position in the event.
    fn item_indexes(&self, id: &Value, records: &[Record]) -> Vec<usize> {
        match id {
            Value::String(s) => records_named(s, records),
            Value::Number(n) => n
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| i < records.len())
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn batch_info(&self, records: &[Record]) -> (&'static str, Value) {
        let (first, last) = (records.first(), records.last());
        let ts = |r: Option<&Record>| r.map(|r| rfc3339(r.received_at));
        (
            "RabbitMQBatchInfo",
            json!({
                "queue": self.queue,
                "vhost": self.vhost,
                "batchSize": records.len(),
                "firstMessageId": first.and_then(|r| r.id.as_deref()),
                "lastMessageId": last.and_then(|r| r.id.as_deref()),
                "firstDeliveryTag": first.map(|r| r.position),
                "lastDeliveryTag": last.map(|r| r.position),
                "firstReceivedTime": ts(first),
                "lastReceivedTime": ts(last),
            }),
        )
    }

    fn decoded(&self) -> &'static [Decoded] {
        &[Decoded::Base64("data")]
    }
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

/// What [`rabbit_fragment`] writes between the basic properties and the body of a
/// message the broker delivered for the first time.
const FIRST_DELIVERY: &str = r#"},"redelivered":false,"data":""#;
const REDELIVERY: &str = r#"},"redelivered":true,"data":""#;

/// Appends a message's fragment with `"redelivered":true`. The last occurrence of
/// [`FIRST_DELIVERY`] is the message's own: JSON strings cannot hold its unescaped
/// quotes, header values are never strings, and `data` (base64) is the last field of an
/// element that is invoked.
fn push_redelivered(out: &mut Vec<u8>, fragment: &str) {
    match fragment.rfind(FIRST_DELIVERY) {
        Some(at) => {
            out.extend_from_slice(&fragment.as_bytes()[..at]);
            out.extend_from_slice(REDELIVERY.as_bytes());
            out.extend_from_slice(&fragment.as_bytes()[at + FIRST_DELIVERY.len()..]);
        }
        // Already redelivered by the broker.
        None => out.extend_from_slice(fragment.as_bytes()),
    }
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

/// The trace context of a message's `X-Amzn-Trace-Id` or `traceparent` header (names
/// compared case-insensitively; string values only), if valid.
pub fn rabbit_trace(properties: &lapin::BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?;
    TraceContext::find(|name| {
        headers
            .inner()
            .iter()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|(_, v)| match v {
                AMQPValue::LongString(s) => Some(s.as_bytes()),
                AMQPValue::ShortString(s) => Some(s.as_bytes()),
                AMQPValue::ByteArray(b) => Some(b.as_slice()),
                _ => None,
            })
    })
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
    fn a_retry_says_redelivered_and_changes_nothing_else() {
        // A header named like the fields, with values that look like them: only the
        // message's own flag changes.
        let mut headers = FieldTable::default();
        headers.insert("redelivered".into(), AMQPValue::Boolean(false));
        headers.insert(
            "data".into(),
            AMQPValue::LongString(LongString::from(r#"},"redelivered":false,"data":""#)),
        );
        let props = lapin::BasicProperties::default()
            .with_message_id(r#"},"redelivered":false,"data":""#.into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers);
        let fresh = Record {
            fragment: rabbit_fragment(&props, false, b"hello"),
            ..Record::for_test(Some("m-1"), None, 1)
        };
        let again = Record {
            fragment: rabbit_fragment(&props, true, b"bye"),
            ..Record::for_test(Some("m-2"), None, 2)
        };
        let env = RabbitShape::new("arn:aws:mq:us-east-1:000000000000:broker:b", "orders", "/");
        let records = [fresh, again];
        let first = env.render(&records, 1);
        // The first attempt sends the fragments exactly as rendered on arrival.
        let expected = [
            &env.prefix[..],
            b":[",
            records[0].fragment.as_bytes(),
            b",",
            records[1].fragment.as_bytes(),
            b"]}}",
        ]
        .concat();
        assert_eq!(first, expected);
        for attempt in [2, 3, 186] {
            let retried = env.render(&records, attempt);
            let mut a: Value = serde_json::from_slice(&first).unwrap();
            let b: Value = serde_json::from_slice(&retried).unwrap();
            let msgs = &b["rmqMessagesByQueue"]["orders::/"];
            assert_eq!(msgs[0]["redelivered"], true, "attempt {attempt}");
            assert_eq!(msgs[1]["redelivered"], true, "attempt {attempt}");
            // Everything else is as on the first attempt.
            a["rmqMessagesByQueue"]["orders::/"][0]["redelivered"] = json!(true);
            assert_eq!(a, b, "attempt {attempt}");
            assert_eq!(retried.len(), first.len() - 1, "one false became true");
            let e: aws_lambda_events::event::rabbitmq::RabbitMqEvent =
                serde_json::from_slice(&retried).unwrap();
            assert!(
                e.messages_by_queue["orders::/"]
                    .iter()
                    .all(|m| m.redelivered)
            );
        }
        assert_eq!(env.render(&[], 2), env.render(&[], 1));
    }

    #[test]
    fn envelope_parses_as_aws_lambda_events_type() {
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(0)
            .with_message_id("m-1".into());
        let record = || Record {
            fragment: rabbit_fragment(&props, true, b"hello"),
            ..Record::for_test(Some("m-1"), None, 1)
        };
        let env = RabbitShape::new("arn:aws:mq:us-east-1:000000000000:broker:b", "orders", "/");
        let bytes = env.render(&[record(), record()], 1);
        let e: aws_lambda_events::event::rabbitmq::RabbitMqEvent =
            serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("aws:rmq"));
        let msgs = &e.messages_by_queue["orders::/"];
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].basic_properties.message_id.as_deref(), Some("m-1"));
        assert!(msgs[0].redelivered);
        assert_eq!(env.overhead(), env.render(&[], 1).len());
    }
}
