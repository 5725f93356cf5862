//! The ActiveMQ event, as Amazon MQ's ActiveMQ trigger sends it: each STOMP MESSAGE
//! rendered once into its element of `messages`, and the envelope around a batch.
//!
//! STOMP carries the JMS header fields as frame headers (`message-id`, `timestamp`,
//! `expires`, `priority`, `persistent`, `correlation-id`, `reply-to`, `type`,
//! `redelivered`) and the message's properties as the other headers, all as strings.
//! What it does not carry, the element fills in as the README says: `brokerInTime` is the
//! message's `timestamp`, `brokerOutTime` the moment the gateway received it, and
//! `connectionId` the id of the gateway's connection (CONNECTED's `session`).

use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::stomp::Frame;
use crate::invoke::event::{
    Decoded, Shape, join, push_base64, push_json_str, push_opt_str, records_named, rfc3339,
};
use crate::record::Record;

/// `{"eventSource":"aws:mq","eventSourceArn":…,"messages":[…]}`
#[derive(Debug, Clone)]
pub struct AmqShape {
    /// The envelope up to the opening of `messages`.
    prefix: Vec<u8>,
    queue: String,
}

impl AmqShape {
    pub fn new(event_source: &str, event_source_arn: &str, queue: &str) -> AmqShape {
        let mut prefix = br#"{"eventSource":"#.to_vec();
        serde_json::to_writer(&mut prefix, event_source).expect("string to JSON");
        prefix.extend_from_slice(br#","eventSourceArn":"#);
        serde_json::to_writer(&mut prefix, event_source_arn).expect("string to JSON");
        prefix.extend_from_slice(br#","messages""#);
        AmqShape {
            prefix,
            queue: queue.to_owned(),
        }
    }
}

impl Shape for AmqShape {
    fn kind(&self) -> &'static str {
        "activemq"
    }

    fn render(&self, records: &[Record], _attempt: u32) -> Vec<u8> {
        join(&self.prefix, records, b"}")
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
            "ActiveMQBatchInfo",
            json!({
                "queue": self.queue,
                "batchSize": records.len(),
                "firstMessageId": first.and_then(|r| r.id.as_deref()),
                "lastMessageId": last.and_then(|r| r.id.as_deref()),
                "firstReceivedTime": ts(first),
                "lastReceivedTime": ts(last),
            }),
        )
    }

    fn decoded(&self) -> &'static [Decoded] {
        &[Decoded::Base64("data")]
    }
}

/// The STOMP headers that are the frame's or JMS header fields (shown in their own
/// members), not message properties.
const NOT_PROPERTIES: &[&str] = &[
    "message-id",
    "destination",
    "subscription",
    "ack",
    "content-length",
    "content-type",
    "expires",
    "priority",
    "timestamp",
    "persistent",
    "correlation-id",
    "reply-to",
    "type",
    "redelivered",
    "amq-msg-type",
];

/// `/queue/q` as JMS names it (`queue://q`), as a JMS consumer's `replyTo` shows.
fn jms_destination(stomp: &str) -> String {
    for (prefix, jms) in [
        ("/queue/", "queue://"),
        ("/topic/", "topic://"),
        ("/temp-queue/", "temp-queue://"),
        ("/temp-topic/", "temp-topic://"),
        ("/remote-temp-queue/", "temp-queue://"),
        ("/remote-temp-topic/", "temp-topic://"),
    ] {
        if let Some(name) = stomp.strip_prefix(prefix) {
            return format!("{jms}{name}");
        }
    }
    stomp.to_owned()
}

/// `jms/text-message` or `jms/bytes-message`: ActiveMQ's `amq-msg-type` when it is
/// there, else a body with `content-length` is bytes (how ActiveMQ types both STOMP
/// sends and JMS messages over STOMP) and one without is text.
pub fn message_type(frame: &Frame) -> &'static str {
    match frame.header("amq-msg-type") {
        Some("bytes") => "jms/bytes-message",
        Some("text") => "jms/text-message",
        _ if frame.header("content-length").is_some() => "jms/bytes-message",
        _ => "jms/text-message",
    }
}

fn number(frame: &Frame, name: &str) -> u64 {
    frame
        .header(name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One MESSAGE frame as an element of `messages`, with every member of AWS's example.
pub fn amq_fragment(frame: &Frame, queue: &str, connection: &str, now: SystemTime) -> String {
    let body = &frame.body;
    let mut out = String::with_capacity(512 + body.len().div_ceil(3) * 4);
    out.push_str(r#"{"messageID":"#);
    push_json_str(&mut out, frame.header("message-id").unwrap_or_default());
    let _ = write!(out, r#","messageType":"{}""#, message_type(frame));
    let timestamp = number(frame, "timestamp");
    let persistent = frame.header("persistent") == Some("true");
    let _ = write!(
        out,
        r#","timestamp":{timestamp},"deliveryMode":{}"#,
        if persistent { 2 } else { 1 }
    );
    out.push_str(r#","correlationID":"#);
    push_opt_str(&mut out, frame.header("correlation-id"));
    out.push_str(r#","replyTo":"#);
    push_opt_str(
        &mut out,
        frame.header("reply-to").map(jms_destination).as_deref(),
    );
    out.push_str(r#","destination":{"physicalName":"#);
    let physical = frame
        .header("destination")
        .map(|d| d.strip_prefix("/queue/").unwrap_or(d))
        .unwrap_or(queue);
    push_json_str(&mut out, physical);
    let redelivered = frame.header("redelivered") == Some("true");
    let _ = write!(out, r#"}},"redelivered":{redelivered},"type":"#);
    push_opt_str(&mut out, frame.header("type"));
    let _ = write!(
        out,
        r#","expiration":{},"priority":{},"data":""#,
        number(frame, "expires"),
        number(frame, "priority")
    );
    push_base64(&mut out, body);
    let _ = write!(
        out,
        r#"","brokerInTime":{timestamp},"brokerOutTime":{},"properties":{{"#,
        millis(now)
    );
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &frame.headers {
        if NOT_PROPERTIES.contains(&k.as_str()) || seen.contains(&k.as_str()) {
            continue;
        }
        if !seen.is_empty() {
            out.push(',');
        }
        seen.push(k);
        push_json_str(&mut out, k);
        out.push(':');
        push_json_str(&mut out, v);
    }
    out.push_str(r#"},"connectionId":"#);
    push_json_str(&mut out, connection);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::activemq::ActiveMqEvent;

    fn message(headers: &[(&str, &str)], body: &[u8]) -> Frame {
        Frame {
            body: body.to_vec(),
            ..Frame::new("MESSAGE", headers)
        }
    }

    fn element(frame: &Frame) -> Value {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_599_863_938_944);
        serde_json::from_str(&amq_fragment(frame, "testQueue", "ID:conn-1", now)).unwrap()
    }

    #[test]
    fn a_text_message_has_every_member_of_aws_fixture() {
        let frame = message(
            &[
                ("message-id", "ID:b-1-34859-1598944546501-4:12:1:1:3"),
                ("destination", "/queue/testQueue"),
                ("subscription", "s"),
                ("ack", "ID:a:1"),
                ("timestamp", "1599863938941"),
                ("expires", "0"),
                ("priority", "4"),
                ("persistent", "true"),
                ("correlation-id", "corr \"1\""),
                ("reply-to", "/queue/replies"),
                ("type", "order"),
                ("redelivered", "true"),
                ("testKey", "testValue"),
                ("weird:key", "a\nb"),
                ("testKey", "shadowed"),
            ],
            "Enter some text here for the message body...".as_bytes(),
        );
        let v = element(&frame);
        let aws = aws_fixture();
        let mut ours: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut theirs: Vec<_> = aws["messages"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        theirs.push("connectionId".into()); // Powertools reads it; the fixture lacks it.
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
        assert_eq!(v["data"], aws["messages"][0]["data"]);
        assert_eq!(v["messageType"], "jms/text-message");
        assert_eq!(v["deliveryMode"], 2);
        assert_eq!(v["correlationID"], "corr \"1\"");
        assert_eq!(v["replyTo"], "queue://replies");
        assert_eq!(v["destination"]["physicalName"], "testQueue");
        assert_eq!(v["redelivered"], true);
        assert_eq!(v["priority"], 4);
        assert_eq!(v["brokerInTime"], 1_599_863_938_941u64);
        assert_eq!(v["brokerOutTime"], 1_599_863_938_944u64);
        assert_eq!(
            v["properties"],
            json!({"testKey": "testValue", "weird:key": "a\nb"})
        );
        assert_eq!(v["connectionId"], "ID:conn-1");
    }

    /// aws_lambda_events' `example-activemq-event.json` (captured from AWS).
    fn aws_fixture() -> Value {
        json!({
            "eventSource": "aws:mq",
            "eventSourceArn": "arn:aws:mq:us-west-2:533019413397:broker:shask-test:b-0f5b7522-2b41-4f85-a615-735a4e6d96b5",
            "messages": [{
                "messageID": "ID:b-0f5b7522-2b41-4f85-a615-735a4e6d96b5-2.mq.us-west-2.amazonaws.com-34859-1598944546501-4:12:1:1:3",
                "messageType": "jms/text-message",
                "timestamp": 1599863938941u64,
                "deliveryMode": 1,
                "correlationID": "",
                "replyTo": "null",
                "destination": {"physicalName": "testQueue"},
                "redelivered": false,
                "type": "",
                "expiration": 0,
                "priority": 0,
                "data": "RW50ZXIgc29tZSB0ZXh0IGhlcmUgZm9yIHRoZSBtZXNzYWdlIGJvZHkuLi4=",
                "brokerInTime": 1599863938943u64,
                "brokerOutTime": 1599863938944u64,
                "properties": {"testKey": "testValue"}
            }]
        })
    }

    #[test]
    fn bytes_and_bare_messages_parse_as_aws_lambda_events_type() {
        let bytes = message(
            &[("message-id", "m-1"), ("content-length", "3")],
            b"\x00\xff\n",
        );
        let bare = message(&[("message-id", "m-2")], b"");
        let typed = message(&[("amq-msg-type", "bytes")], b"abc");
        assert_eq!(message_type(&typed), "jms/bytes-message");
        let now = SystemTime::now();
        let records: Vec<Record> = [&bytes, &bare]
            .iter()
            .map(|f| Record {
                fragment: amq_fragment(f, "q", "c", now),
                ..Record::for_test(f.header("message-id"), None, 1)
            })
            .collect();
        let shape = AmqShape::new("aws:mq", "arn:aws:mq:us-east-1:0:broker:h:61613", "q");
        let e: ActiveMqEvent = serde_json::from_slice(&shape.render(&records, 1)).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("aws:mq"));
        assert_eq!(e.messages.len(), 2);
        let m = &e.messages[0];
        assert_eq!(m.message_type.as_deref(), Some("jms/bytes-message"));
        assert_eq!(m.data.as_deref(), Some("AP8K"));
        assert_eq!(m.delivery_mode, 1);
        assert_eq!(m.destination.physical_name.as_deref(), Some("q"));
        assert!(m.correlation_id.is_none() && m.reply_to.is_none());
        assert_eq!(
            e.messages[1].message_type.as_deref(),
            Some("jms/text-message")
        );
        assert_eq!(shape.item_indexes(&json!("m-2"), &records), [1]);
        assert_eq!(shape.overhead(), shape.render(&[], 1).len());
        let empty: Value = serde_json::from_slice(&shape.render(&[], 1)).unwrap();
        assert_eq!(empty["messages"], json!([]));
    }
}
