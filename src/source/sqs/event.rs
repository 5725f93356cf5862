//! The SQS event, as Lambda's SQS trigger sends it: each message rendered once into its
//! element of `Records`, and the envelope around a batch.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::invoke::event::{Decoded, Shape, join, records_named, rfc3339};
use crate::record::Record;

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

    fn render(&self, records: &[Record], _attempt: u32) -> Vec<u8> {
        join(br#"{"Records""#, records, b"}")
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
