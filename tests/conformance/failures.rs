//! Failure records. Kafka's against the Lambda Developer Guide's (the batch record of an
//! SQS, SNS or S3 destination; the per-record one of a Kafka topic destination); the
//! others, which AWS does not publish, against golden files of the gateway's own shape.

use esm_gateway::invoke::event::Shape;
use esm_gateway::invoke::lambda::Response;
use esm_gateway::pipeline::park::{Condition, Failure};
use esm_gateway::record::Record;
use esm_gateway::source::rabbitmq::event::{
    Undecodable, rabbit_fragment, rabbit_undecodable, with_undecodable,
};
use esm_gateway::source::schedule::Payload;
use esm_gateway::source::schedule::config::schedule_arn;
use esm_gateway::source::schedule::event::ScheduleShape;
use lapin::types::ShortString;
use serde_json::Value;

use crate::compare::Options;
use crate::events::{
    RABBIT_BODY, kafka_record, kafka_shape, rabbit_example_properties, rabbit_shape, sqs_record,
    sqs_shape,
};
use crate::support::{Allow, assert_conforms, assert_golden, fixture, json, record};

const FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:myfunction";

fn unhandled() -> Response {
    Response {
        status: 200,
        function_error: Some("Unhandled".into()),
        executed_version: Some("$LATEST".into()),
        payload: br#"{"errorMessage":"boom","errorType":"ValueError"}"#.to_vec(),
    }
}

/// The failure record of `records` after `invokes` invokes whose last answer was
/// `response` (None: nothing was invoked).
fn failure(
    shape: &dyn Shape,
    records: &[Record],
    condition: Condition,
    invokes: u32,
    response: Option<&Response>,
    single: bool,
) -> Value {
    let rendered = Failure {
        function_arn: FUNCTION_ARN,
        condition,
        invoke_count: invokes,
        response,
        error: Some("ValueError: boom"),
        shape,
        records,
        single,
    }
    .render();
    let v = json(&rendered.bytes);
    assert_eq!(v["requestContext"]["requestId"], rendered.request_id);
    v
}

/// The gateway's addition to every failure record: the last error in words.
const ERROR: Allow = Allow {
    path: "$.error",
    what: "extra",
    why: "the gateway's own: the last error in words",
};

/// AWS's S3 record carries the event as an escaped JSON string; the gateway's carries
/// it as JSON, in every destination, so that a redrive replays it as it was sent.
const PAYLOAD_AS_JSON: Allow = Allow {
    path: "$.payload",
    what: "type: expected string (Other), found object",
    why: "AWS's S3 record has the event as an escaped JSON string; the gateway's is JSON",
};

#[test]
fn kafka_failure_record_has_the_shape_of_the_developer_guides() {
    let records = [kafka_record(15), kafka_record(16)];
    let shape = kafka_shape();
    let response = unhandled();
    let v = failure(
        &shape,
        &records,
        Condition::RetryAttemptsExhausted,
        3,
        Some(&response),
        false,
    );
    assert_conforms(
        "Kafka failure record vs the Developer Guide's (S3 destination example)",
        &fixture("aws/dg-kafka-failure-record.json"),
        &v,
        &Options {
            maps: &["$.KafkaBatchInfo.recordsInfo"],
        },
        &[ERROR, PAYLOAD_AS_JSON],
    );
    let info = &v["KafkaBatchInfo"]["recordsInfo"]["mytopic-0"];
    assert_eq!(info["firstRecordOffset"], "15");
    assert_eq!(info["lastRecordOffset"], "16");
    assert_eq!(info["firstRecordTimestamp"], "2018-12-17T22:10:50.987Z");
    assert_eq!(v["KafkaBatchInfo"]["batchSize"], 2);
    // The payload is the event those records were sent in.
    assert_conforms(
        "Kafka failure record's payload vs the Developer Guide's self-managed event",
        &fixture("aws/dg-self-managed-kafka-event.json"),
        &v["payload"],
        &Options {
            maps: &["$.records"],
        },
        &[Allow {
            path: "$.records.*",
            what: "length: expected 1, found 2",
            why: "two records in this batch, one in the example",
        }],
    );
    assert_eq!(
        v["KafkaBatchInfo"]["payloadSize"],
        shape.render(&records, 1).len()
    );
}

#[test]
fn kafka_failure_record_of_a_batch_never_invoked_has_a_null_response_context() {
    let records = [kafka_record(15)];
    let v = failure(
        &kafka_shape(),
        &records,
        Condition::MaximumPayloadSizeExceeded,
        0,
        None,
        false,
    );
    assert_conforms(
        "Kafka failure record (MaximumPayloadSizeExceeded) vs the Developer Guide's",
        &fixture("aws/dg-kafka-failure-record-not-invoked.json"),
        &v,
        &Options {
            maps: &["$.KafkaBatchInfo.recordsInfo"],
        },
        &[ERROR, PAYLOAD_AS_JSON],
    );
}

#[test]
fn kafka_topic_destination_record_is_one_record_with_record_info() {
    let records = [kafka_record(15)];
    let response = unhandled();
    let v = failure(
        &kafka_shape(),
        &records,
        Condition::RetryAttemptsExhausted,
        3,
        Some(&response),
        true,
    );
    assert_conforms(
        "Kafka topic destination record vs the Developer Guide's field list",
        &fixture("aws/dg-kafka-topic-destination-record.json"),
        &v,
        &Options::default(),
        &[ERROR],
    );
    assert_eq!(v["KafkaBatchInfo"]["recordInfo"]["offset"], "15");
    assert_eq!(
        v["KafkaBatchInfo"]["recordInfo"]["timestamp"],
        "2018-12-17T22:10:50.987Z"
    );
}

/// Whatever the source: a record parked before any invoke answered has
/// `"responseContext": null` (present, null), as AWS's.
#[test]
fn every_failure_record_never_invoked_has_a_null_response_context() {
    let (sched, sched_records) = schedule();
    let cases: [(&str, &dyn Shape, Vec<Record>); 4] = [
        ("kafka", &kafka_shape(), vec![kafka_record(15)]),
        ("rabbitmq", &rabbit_shape(), vec![rabbit_record()]),
        ("sqs", &sqs_shape(), vec![sqs_record()]),
        ("schedule", &sched, sched_records),
    ];
    for (kind, shape, records) in cases {
        let v = failure(
            shape,
            &records,
            Condition::MaximumPayloadSizeExceeded,
            0,
            None,
            false,
        );
        let rc = v
            .as_object()
            .unwrap()
            .get("responseContext")
            .unwrap_or_else(|| panic!("{kind}: responseContext is absent, AWS has null"));
        assert_eq!(rc, &Value::Null, "{kind}");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 0, "{kind}");
    }
}

fn rabbit_record() -> Record {
    let mut r = record(
        rabbit_fragment(&rabbit_example_properties(), false, RABBIT_BODY),
        Some("m-1"),
        None,
        7,
    );
    r.id = Some("m-1".into());
    r
}

fn schedule() -> (ScheduleShape, Vec<Record>) {
    use chrono::{TimeZone, Utc};
    let arn = schedule_arn("nightly-report", "us-east-1", "123456789012");
    let payload = Payload::Input {
        template: r#"{"job":"report","at":"<aws.scheduler.scheduled-time>","attempt":"<aws.scheduler.attempt-number>"}"#.into(),
        schedule_arn: arn.clone(),
    };
    let at = Utc.with_ymd_and_hms(2026, 3, 30, 0, 30, 0).unwrap();
    let id = "0b8c9a62-5f3e-4c1e-9d0a-2f4b6c8d0e1f";
    let shape = ScheduleShape {
        name: "nightly-report".into(),
        arn,
        expression: "cron(30 1 * * ? *)".into(),
    };
    let r = record(
        payload.render(at, id),
        Some(id),
        None,
        at.timestamp() as u64,
    );
    (shape, vec![r])
}

#[test]
fn rabbitmq_failure_record_keeps_the_gateways_own_shape() {
    let response = unhandled();
    let v = failure(
        &rabbit_shape(),
        &[rabbit_record(), rabbit_record()],
        Condition::RetryAttemptsExhausted,
        3,
        Some(&response),
        false,
    );
    assert_golden("rabbitmq-failure-record.json", &v, &Options::default());
}

#[test]
fn rabbitmq_undecodable_record_keeps_the_gateways_own_shape() {
    let props = rabbit_example_properties()
        .with_message_id(ShortString::from_bytes(b"\xff\xfe".to_vec()).unwrap());
    let undecodable: Vec<Undecodable> = rabbit_undecodable(&props);
    assert_eq!(undecodable.len(), 1);
    let r = record(
        with_undecodable(rabbit_fragment(&props, false, RABBIT_BODY), &undecodable),
        None,
        None,
        7,
    );
    let v = failure(
        &rabbit_shape(),
        &[r],
        Condition::UndecodableRecord,
        0,
        None,
        false,
    );
    assert_golden("rabbitmq-undecodable-record.json", &v, &Options::default());
}

#[test]
fn sqs_failure_record_keeps_the_gateways_own_shape() {
    let response = unhandled();
    let v = failure(
        &sqs_shape(),
        &[sqs_record()],
        Condition::RetryAttemptsExhausted,
        3,
        Some(&response),
        false,
    );
    assert_golden("sqs-failure-record.json", &v, &Options::default());
}

#[test]
fn schedule_failure_record_keeps_the_gateways_own_shape() {
    let (shape, records) = schedule();
    let response = unhandled();
    let v = failure(
        &shape,
        &records,
        Condition::RetryAttemptsExhausted,
        185,
        Some(&response),
        false,
    );
    // The payload is the last attempt's event.
    assert_eq!(v["payload"]["attempt"], "185");
    assert_golden("schedule-failure-record.json", &v, &Options::default());
}
