//! The function's answer to a batch: its error message, and which records a partial
//! batch response (`{"batchItemFailures":[…]}`) names as failed.

use serde_json::Value;

use crate::invoke::event::Shape;
use crate::record::Record;

/// The `errorType: errorMessage` of a function error body, or the body itself.
pub fn function_error_message(body: &[u8]) -> String {
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
/// [`Shape::item_indexes`] for what identifies an item in each source). AWS's rules: an
/// empty body, null, or an object with an empty or missing list is full success;
/// invalid JSON, JSON that is neither an object nor null (a string, a list, a number,
/// a bool), or an empty, null or unknown identifier is full failure (Err).
pub fn item_failures(
    body: &[u8],
    shape: &dyn Shape,
    records: &[Record],
) -> Result<Vec<usize>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the function's partial batch response is not JSON: {e}"))?;
    let object = match &v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(object) => object,
        // A function that meant to report failures and returned something else must
        // not have its records acknowledged.
        other => {
            let kind = match other {
                Value::String(_) => "a string",
                Value::Array(_) => "a list",
                Value::Number(_) => "a number",
                _ => "a bool",
            };
            return Err(format!(
                "the function's partial batch response is {kind}, not a JSON object"
            ));
        }
    };
    let items = match object.get("batchItemFailures") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("batchItemFailures is not a list: {other}")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let id = item.get("itemIdentifier").unwrap_or(&Value::Null);
        let named = shape.item_indexes(id, records);
        if named.is_empty() {
            return Err(format!("batchItemFailures names an unknown item: {item}"));
        }
        out.extend(named);
    }
    Ok(shape.widen_failures(out, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kafka::event::KafkaShape;
    use crate::source::rabbitmq::event::RabbitShape;
    use crate::source::sqs::event::SqsShape;

    fn recs(ids: &[&str]) -> Vec<Record> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Record::for_test((!id.is_empty()).then_some(*id), None, i as u64))
            .collect()
    }

    fn rabbit() -> RabbitShape {
        RabbitShape::new("arn", "q", "/")
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
        // Kafka: only the named record is retried (AWS's Kafka rule, not Kinesis's
        // checkpoint at the lowest failed record).
        let kafka = KafkaShape::new("b:9092", "t", 3);
        // SQS FIFO: a failure fails the later messages of its group too.
        let mut fifo = recs(&["a", "b", "c", "d"]);
        for (r, g) in fifo.iter_mut().zip(["g1", "g2", "g1", "g2"]) {
            r.key = Some(g.as_bytes().into());
        }
        let sqs = SqsShape {
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
            Ok(vec![2])
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
            // Valid JSON, but not a partial batch response: AWS fails the batch.
            "\"done\"",
            r#"[{"itemIdentifier":"a"}]"#,
            "[]",
            "0",
            "true",
            "false",
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
}
