//! The SQS event, as Lambda's SQS trigger sends it: each message rendered once into its
//! element of `Records`, and the envelope around a batch.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::invoke::event::{Decoded, Shape, join, records_named, rfc3339};
use crate::record::Record;
use crate::trace::TraceContext;

/// `{"Records":[…]}`; each record carries its own queue ARN and region.
#[derive(Debug, Clone)]
pub struct SqsShape {
    pub queue_url: String,
    pub fifo: bool,
}

impl Shape for SqsShape {
    fn kind(&self) -> &'static str {
        "sqs"
    }

    /// From the second attempt on, each message's `ApproximateReceiveCount` is what it
    /// would be had the failed batch gone back to the queue and been received again
    /// (as on AWS): the count it arrived with, plus one per earlier attempt. The first
    /// attempt sends the fragments as rendered on arrival.
    fn render(&self, records: &[Record], attempt: u32) -> Vec<u8> {
        if attempt <= 1 || records.is_empty() {
            return join(br#"{"Records""#, records, b"}");
        }
        let bytes: usize = records.iter().map(Record::weight).sum();
        let mut out = Vec::with_capacity(bytes + records.len() + 16);
        out.extend_from_slice(br#"{"Records":["#);
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match received_again(&r.fragment, attempt - 1) {
                Some(fragment) => out.extend_from_slice(fragment.as_bytes()),
                None => out.extend_from_slice(r.fragment.as_bytes()),
            }
        }
        out.extend_from_slice(b"]}");
        out
    }

    fn item_indexes(&self, id: &Value, records: &[Record]) -> Vec<usize> {
        match id {
            Value::String(s) => records_named(s, records),
            _ => Vec::new(),
        }
    }

    /// FIFO: the later messages of each failed message's group fail with it.
    fn widen_failures(&self, mut failed: Vec<usize>, records: &[Record]) -> Vec<usize> {
        failed.sort_unstable();
        failed.dedup();
        let Some(&first) = failed.first().filter(|_| self.fifo) else {
            return failed;
        };
        let mut groups = HashSet::new();
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

    fn batch_info(&self, records: &[Record]) -> (&'static str, Value) {
        let (first, last) = (records.first(), records.last());
        let ts = |r: Option<&Record>| r.map(|r| rfc3339(r.received_at));
        (
            "SQSBatchInfo",
            json!({
                "queueUrl": self.queue_url,
                "batchSize": records.len(),
                "firstMessageId": first.and_then(|r| r.id.as_deref()),
                "lastMessageId": last.and_then(|r| r.id.as_deref()),
                "firstReceivedTime": ts(first),
                "lastReceivedTime": ts(last),
            }),
        )
    }

    fn decoded(&self) -> &'static [Decoded] {
        &[Decoded::Json("body")]
    }
}

/// A message's fragment with `attributes.ApproximateReceiveCount` raised by `more`;
/// None if it has no such count. Only retries pay for this parse: the fragment was
/// written by serde_json, so writing it again changes nothing but the count (every
/// value of an SQS element is a string, which reads back exactly).
fn received_again(fragment: &str, more: u32) -> Option<String> {
    let mut element: Value = serde_json::from_str(fragment).ok()?;
    let count = element.pointer_mut("/attributes/ApproximateReceiveCount")?;
    let n: u64 = count.as_str()?.parse().ok()?;
    *count = Value::from(n.saturating_add(u64::from(more)).to_string());
    Some(element.to_string())
}

/// A message's trace context: its `AWSTraceHeader` system attribute (what AWS's SDKs
/// and X-Ray set, and Lambda's SQS trigger reads), else a string message attribute
/// named `X-Amzn-Trace-Id` or `traceparent` (case-insensitively); the first valid one.
pub fn sqs_trace(m: &aws_sdk_sqs::types::Message) -> Option<TraceContext> {
    use aws_sdk_sqs::types::MessageSystemAttributeName::AwsTraceHeader;
    m.attributes()
        .and_then(|a| a.get(&AwsTraceHeader))
        .and_then(|v| TraceContext::from_xray(v))
        .or_else(|| {
            let attributes = m.message_attributes()?;
            TraceContext::find(|name| {
                attributes
                    .iter()
                    .find(|(k, a)| {
                        k.eq_ignore_ascii_case(name) && a.data_type().starts_with("String")
                    })
                    .and_then(|(_, a)| a.string_value())
                    .map(str::as_bytes)
            })
        })
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
            // As Lambda's SQS trigger has them: the list values always, a string or
            // binary value only when the attribute has one (AWS leaves the key out).
            let mut v = json!({
                "stringListValues": a.string_list_values(),
                "binaryListValues": a.binary_list_values().iter().map(b64).collect::<Vec<_>>(),
                "dataType": a.data_type(),
            });
            if let Some(s) = a.string_value() {
                v["stringValue"] = s.into();
            }
            if let Some(b) = a.binary_value() {
                v["binaryValue"] = b64(b).into();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName as A};

    fn message(id: &str, receive_count: &str) -> Message {
        Message::builder()
            .message_id(id)
            .receipt_handle(format!("rh-{id}"))
            // A body that names the attribute, in JSON and in escapes.
            .body(r#"{"ApproximateReceiveCount":"1","attributes":{"ApproximateReceiveCount":"1"}} é \u00e9"#)
            .md5_of_body("md5")
            .attributes(A::ApproximateReceiveCount, receive_count)
            .attributes(A::ApproximateFirstReceiveTimestamp, "1545082649185")
            .attributes(A::SentTimestamp, "1545082649183")
            .attributes(A::SenderId, "AIDAIENQZJOLO23YVJ4VO")
            .message_attributes(
                "ApproximateReceiveCount",
                MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value("1")
                    .build()
                    .unwrap(),
            )
            .build()
    }

    #[test]
    fn an_sqs_trace_comes_from_aws_trace_header_first() {
        use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let x = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let attr = |t: &str, v: &str| {
            MessageAttributeValue::builder()
                .data_type(t)
                .string_value(v)
                .build()
                .unwrap()
        };
        let with_attr = Message::builder()
            .message_attributes("TRACEPARENT", attr("String", tp))
            .build();
        assert_eq!(sqs_trace(&with_attr), TraceContext::from_traceparent(tp));
        let both = Message::builder()
            .message_attributes("traceparent", attr("String", tp))
            .attributes(MessageSystemAttributeName::AwsTraceHeader, x)
            .build();
        assert_eq!(sqs_trace(&both), TraceContext::from_xray(x));
        // A malformed AWSTraceHeader falls back to the attribute; a number is no string.
        let bad = Message::builder()
            .message_attributes("traceparent", attr("String", tp))
            .attributes(MessageSystemAttributeName::AwsTraceHeader, "Root=bad")
            .build();
        assert_eq!(sqs_trace(&bad), TraceContext::from_traceparent(tp));
        let number = Message::builder()
            .message_attributes("traceparent", attr("Number", tp))
            .build();
        assert_eq!(sqs_trace(&number), None);
        assert_eq!(sqs_trace(&Message::builder().build()), None);
    }

    fn record(m: &Message) -> Record {
        Record {
            fragment: sqs_fragment(m, "arn:aws:sqs:us-east-1:000000000000:q", "us-east-1"),
            ..Record::for_test(m.message_id(), None, 0)
        }
    }

    fn counts(event: &[u8]) -> Vec<String> {
        let e: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_slice(event).unwrap();
        e.records
            .iter()
            .map(|r| r.attributes["ApproximateReceiveCount"].clone())
            .collect()
    }

    #[test]
    fn a_retry_counts_one_more_receive_per_attempt_and_changes_nothing_else() {
        let shape = SqsShape {
            queue_url: "q".into(),
            fifo: false,
        };
        // One received for the first time, one the queue had already handed out thrice.
        let records = [record(&message("m-1", "1")), record(&message("m-2", "4"))];
        let first = shape.render(&records, 1);
        // The first attempt sends the fragments exactly as rendered on arrival.
        let expected = [
            &br#"{"Records":["#[..],
            records[0].fragment.as_bytes(),
            b",",
            records[1].fragment.as_bytes(),
            b"]}",
        ]
        .concat();
        assert_eq!(first, expected);
        assert_eq!(counts(&first), ["1", "4"]);
        for (attempt, want) in [(2, ["2", "5"]), (3, ["3", "6"]), (186, ["186", "189"])] {
            let retried = shape.render(&records, attempt);
            assert_eq!(counts(&retried), want, "attempt {attempt}");
            // Byte for byte the first attempt's event, but for the two counts.
            let text = String::from_utf8(first.clone())
                .unwrap()
                .replacen(
                    r#""ApproximateReceiveCount":"1""#,
                    &format!(r#""ApproximateReceiveCount":"{}""#, want[0]),
                    1,
                )
                .replacen(
                    r#""ApproximateReceiveCount":"4""#,
                    &format!(r#""ApproximateReceiveCount":"{}""#, want[1]),
                    1,
                );
            assert_eq!(
                String::from_utf8(retried).unwrap(),
                text,
                "attempt {attempt}"
            );
        }
        assert_eq!(shape.render(&[], 2), shape.render(&[], 1));
    }

    #[test]
    fn a_fragment_without_a_receive_count_is_sent_as_it_is() {
        let m = Message::builder().message_id("m").body("b").build();
        let r = record(&m);
        assert_eq!(received_again(&r.fragment, 1), None);
        let shape = SqsShape {
            queue_url: "q".into(),
            fifo: false,
        };
        assert_eq!(
            shape.render(std::slice::from_ref(&r), 2),
            shape.render(std::slice::from_ref(&r), 1)
        );
    }
}
