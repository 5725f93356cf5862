//! The events a function receives, against AWS's published examples: rendered through
//! the crate's public API from inputs equivalent to each example's, compared by shape,
//! and parsed as `aws_lambda_events`' types.

use chrono::{TimeZone, Utc};
use esm_gateway::invoke::event::Shape;
use esm_gateway::source::kafka::event::{KafkaFragments, KafkaShape};
use esm_gateway::source::rabbitmq::event::{RabbitShape, rabbit_fragment};
use esm_gateway::source::schedule::Payload;
use esm_gateway::source::schedule::config::{rule_arn, schedule_arn};
use esm_gateway::source::schedule::event::ScheduleShape;
use esm_gateway::source::sqs::event::{SqsShape, sqs_fragment};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use serde_json::Value;

use crate::compare::Options;
use crate::support::{Allow, assert_conforms, fixture, json, record};

/// The message of `aws/example-rabbitmq-event.json`, as lapin hands it to the source.
pub fn rabbit_example_properties() -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("header1"),
        AMQPValue::LongString(LongString::from("value1")),
    );
    headers.insert(
        ShortString::from("header2"),
        AMQPValue::LongString(LongString::from("value2")),
    );
    headers.insert(ShortString::from("numberInHeader"), AMQPValue::LongInt(10));
    lapin::BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_headers(headers)
        .with_delivery_mode(1)
        .with_priority(34)
        .with_expiration("60000".into())
        .with_timestamp(2021)
        .with_user_id("AIDACKCEVSQ6C2EXAMPLE".into())
}

pub const RABBIT_BODY: &[u8] = br#"{"timeout":0,"data":"CZrmf0Gw8Ov4bqLQxD4E"}"#;

pub fn rabbit_shape() -> RabbitShape {
    RabbitShape::new(
        "arn:aws:mq:us-west-2:112556298976:broker:test:b-9bcfa592-423a-4942-879d-eb284b418fc8",
        "test",
        "/",
    )
}

#[test]
fn rabbitmq_event_has_the_shape_of_aws_example() {
    let r = record(
        rabbit_fragment(&rabbit_example_properties(), false, RABBIT_BODY),
        None,
        None,
        1,
    );
    let event = json(&rabbit_shape().render(&[r], 1));
    assert_conforms(
        "RabbitMQ event vs aws_lambda_events example-rabbitmq-event.json",
        &fixture("aws/example-rabbitmq-event.json"),
        &event,
        &Options::default(),
        &[],
    );
    let typed: aws_lambda_events::event::rabbitmq::RabbitMqEvent =
        serde_json::from_value(event).expect("aws_lambda_events RabbitMqEvent");
    let m = &typed.messages_by_queue["test::/"][0];
    assert_eq!(m.basic_properties.priority, 34);
    assert_eq!(m.basic_properties.body_size, RABBIT_BODY.len() as u64);
    assert_eq!(
        m.basic_properties.timestamp.as_deref(),
        Some("Jan 1, 1970, 12:33:41 AM")
    );
}

/// The record of the Developer Guide's self-managed Kafka example (offset 15 of
/// `mytopic-0`, key, value and one header).
pub fn kafka_example_message(offset: i64) -> OwnedMessage {
    let headers = OwnedHeaders::new().insert(Header {
        key: "headerKey",
        value: Some("headerValue"),
    });
    OwnedMessage::new(
        Some(b"Hello, this is a test.".to_vec()),
        Some(b"key".to_vec()),
        "mytopic".into(),
        Timestamp::CreateTime(1_545_084_650_987),
        0,
        offset,
        Some(headers),
    )
}

pub fn kafka_record(offset: i64) -> esm_gateway::record::Record {
    let (fragment, _trace) = KafkaFragments::new("mytopic", 0)
        .render(&kafka_example_message(offset), &mut |n| {
            panic!("{n:?} replaced")
        });
    record(fragment, None, Some(b"key"), offset as u64)
}

pub const KAFKA_SERVERS: &str = "b-2.demo-cluster-1.a1bcde.c1.kafka.us-east-1.amazonaws.com:9092,b-1.demo-cluster-1.a1bcde.c1.kafka.us-east-1.amazonaws.com:9092";

pub fn kafka_shape() -> KafkaShape {
    KafkaShape::new(KAFKA_SERVERS, "mytopic", 0)
        .with_event_source_arn("arn:aws:lambda:us-east-1:123456789012:event-source-mapping:orders")
}

#[test]
fn kafka_event_has_the_shape_of_the_developer_guides_self_managed_example() {
    let event = json(&kafka_shape().render(&[kafka_record(15)], 1));
    assert_conforms(
        "Kafka event vs the Developer Guide's self-managed Kafka example",
        &fixture("aws/dg-self-managed-kafka-event.json"),
        &event,
        &Options::default(),
        &[],
    );
}

#[test]
fn kafka_event_has_the_shape_of_aws_lambda_events_example_but_the_msk_arn() {
    let event = json(&kafka_shape().render(&[kafka_record(15)], 1));
    assert_conforms(
        "Kafka event vs aws_lambda_events example-kafka-event.json (an MSK event)",
        &fixture("aws/example-kafka-event.json"),
        &event,
        &Options {
            maps: &["$.records"],
        },
        &[Allow {
            path: "$.eventSourceArn",
            what: "missing",
            why: "the example is Amazon MSK's (aws:kafka); a self-managed event has no ARN",
        }],
    );
    let event_json = event.clone();
    let typed: aws_lambda_events::event::kafka::KafkaEvent =
        serde_json::from_value(event).expect("aws_lambda_events KafkaEvent");
    let r = &typed.records["mytopic-0"][0];
    assert_eq!(r.offset, 15);
    // The JSON carries the exact milliseconds (aws_lambda_events' own parse of them
    // comes out 1 ms low, so the value is checked in the JSON).
    assert_eq!(
        event_json["records"]["mytopic-0"][0]["timestamp"],
        1_545_084_650_987_i64
    );
    assert_eq!(r.headers[0]["headerKey"], b"headerValue".map(|b| b as i8));
}

pub fn sqs_example_message() -> aws_sdk_sqs::types::Message {
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName as A};
    let attribute = |data_type: &str| MessageAttributeValue::builder().data_type(data_type);
    Message::builder()
        .message_id("MessageID_1")
        .receipt_handle("MessageReceiptHandle")
        .body("Message Body")
        .md5_of_body("fce0ea8dd236ccb3ed9b37dae260836f")
        .md5_of_message_attributes("582c92c5c5b6ac403040a4f3ab3115c9")
        .attributes(A::ApproximateReceiveCount, "2")
        .attributes(A::SentTimestamp, "1520621625029")
        .attributes(A::SenderId, "AROAIWPX5BD2BHG722MW4:sender")
        .attributes(A::ApproximateFirstReceiveTimestamp, "1520621634884")
        .message_attributes(
            "Attribute3",
            attribute("Binary")
                .binary_value(Blob::new("1100"))
                .string_list_values("abc")
                .string_list_values("123")
                .binary_list_values(Blob::new("0"))
                .binary_list_values(Blob::new("1"))
                .binary_list_values(Blob::new("0"))
                .build()
                .unwrap(),
        )
        .message_attributes(
            "Attribute2",
            attribute("Number")
                .string_value("123")
                .binary_list_values(Blob::new("1"))
                .binary_list_values(Blob::new("0"))
                .build()
                .unwrap(),
        )
        .message_attributes(
            "Attribute1",
            attribute("String")
                .string_value("AttributeValue1")
                .build()
                .unwrap(),
        )
        .build()
}

pub const SQS_ARN: &str = "arn:aws:sqs:us-west-2:123456789012:SQSQueue";

pub fn sqs_shape() -> SqsShape {
    SqsShape {
        queue_url: "https://sqs.us-west-2.amazonaws.com/123456789012/SQSQueue".into(),
        fifo: false,
    }
}

pub fn sqs_record() -> esm_gateway::record::Record {
    let fragment = sqs_fragment(&sqs_example_message(), SQS_ARN, "us-west-2");
    record(fragment, Some("MessageID_1"), None, 0)
}

#[test]
fn sqs_event_has_the_shape_of_aws_example() {
    let event = json(&sqs_shape().render(&[sqs_record()], 1));
    assert_conforms(
        "SQS event vs aws_lambda_events example-sqs-event.json",
        &fixture("aws/example-sqs-event.json"),
        &event,
        &Options::default(),
        &[],
    );
}

#[test]
fn sqs_event_parses_as_aws_lambda_events_type() {
    let event = json(&sqs_shape().render(&[sqs_record()], 1));
    let typed: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_value(event).expect("aws_lambda_events SqsEvent");
    let m = &typed.records[0];
    assert_eq!(m.message_id.as_deref(), Some("MessageID_1"));
    assert_eq!(m.attributes["ApproximateReceiveCount"], "2");
    assert_eq!(
        m.message_attributes["Attribute1"].data_type.as_deref(),
        Some("String")
    );
    assert_eq!(
        m.message_attributes["Attribute3"].binary_list_values.len(),
        3
    );
}

#[test]
fn scheduled_event_has_the_shape_of_aws_example() {
    let payload = Payload::Event {
        account: "123456789012".into(),
        region: "us-east-1".into(),
        rule_arn: rule_arn("my-scheduled-rule", "us-east-1", "123456789012"),
    };
    let at = Utc.with_ymd_and_hms(2015, 10, 8, 16, 53, 6).unwrap();
    let text = payload.render(at, "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa");
    let event = json(text.as_bytes());
    let expected = fixture("aws/example-eventbridge-schedule.json");
    assert_conforms(
        "Scheduled Event vs aws_lambda_events example-eventbridge-schedule.json",
        &expected,
        &event,
        &Options::default(),
        &[],
    );
    // Same inputs, same event: every value, not only the shape.
    assert_eq!(event, expected);
    let typed: aws_lambda_events::event::eventbridge::EventBridgeEvent =
        serde_json::from_value(event).expect("aws_lambda_events EventBridgeEvent");
    assert_eq!(typed.detail_type, "Scheduled Event");
}

#[test]
fn scheduler_input_substitutes_the_context_attributes_as_scheduler_documents() {
    let f = fixture("aws/scheduler-context-attributes.json");
    let template = f["template"].as_str().expect("template").to_owned();
    let arn = schedule_arn("your-schedule", "us-west-2", "123456789012");
    let payload = Payload::Input {
        template,
        schedule_arn: arn.clone(),
    };
    let at = Utc.with_ymd_and_hms(2022, 3, 22, 18, 59, 43).unwrap();
    let fired = payload.render(at, "d32c5kddcf5bb8c3");
    let shape = ScheduleShape {
        name: "your-schedule".into(),
        arn,
        expression: "rate(5 minutes)".into(),
    };
    let r = record(fired, Some("d32c5kddcf5bb8c3"), None, at.timestamp() as u64);
    let first = json(&shape.render(std::slice::from_ref(&r), 1));
    assert_conforms(
        "Scheduler input vs Scheduler's documented context attributes",
        &f["substituted"],
        &first,
        &Options::default(),
        &[],
    );
    // The documented example values, with the same inputs.
    assert_eq!(first, f["substituted"]);
    let second = json(&shape.render(std::slice::from_ref(&r), 2));
    assert_eq!(second["attempt"], "2");
}

/// A retried batch is a redelivery: Amazon MQ's trigger gets it back from the broker
/// with `redelivered: true`.
#[test]
fn a_retried_rabbitmq_batch_is_marked_redelivered() {
    let r = record(
        rabbit_fragment(&rabbit_example_properties(), false, RABBIT_BODY),
        None,
        None,
        1,
    );
    let shape = rabbit_shape();
    let first = json(&shape.render(std::slice::from_ref(&r), 1));
    let second = json(&shape.render(std::slice::from_ref(&r), 2));
    let redelivered = |v: &Value| v["rmqMessagesByQueue"]["test::/"][0]["redelivered"].clone();
    assert_eq!(redelivered(&first), false);
    assert_eq!(redelivered(&second), true, "attempt 2 must say redelivered");
}

/// A retried SQS message is a new receive on AWS: its `ApproximateReceiveCount` grows by
/// one per attempt.
#[test]
fn a_retried_sqs_batch_counts_each_attempt_as_a_receive() {
    let r = sqs_record();
    let shape = sqs_shape();
    let count = |attempt: u32| {
        json(&shape.render(std::slice::from_ref(&r), attempt))["Records"][0]["attributes"]
            ["ApproximateReceiveCount"]
            .clone()
    };
    assert_eq!(count(1), "2");
    assert_eq!(count(2), "3", "attempt 2 is the message's third receive");
    assert_eq!(count(3), "4");
}

/// Header value types AWS's example does not show (a timestamp, a float, a boolean, a
/// nested table, an array, a byte array, void): the gateway's own rendering, kept as a
/// golden file.
#[test]
fn rabbitmq_header_types_aws_does_not_show_keep_the_gateways_own_shape() {
    use lapin::types::{ByteArray, FieldArray};
    let mut inner = FieldTable::default();
    inner.insert(ShortString::from("n"), AMQPValue::LongLongInt(-1));
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("timestamp"),
        AMQPValue::Timestamp(1_700_000_000),
    );
    headers.insert(ShortString::from("double"), AMQPValue::Double(1.5));
    headers.insert(ShortString::from("bool"), AMQPValue::Boolean(true));
    headers.insert(ShortString::from("table"), AMQPValue::FieldTable(inner));
    headers.insert(
        ShortString::from("array"),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString(LongString::from("x")),
        ])),
    );
    headers.insert(
        ShortString::from("bytes"),
        AMQPValue::ByteArray(ByteArray::from(vec![0xffu8, 0x00])),
    );
    headers.insert(ShortString::from("void"), AMQPValue::Void);
    let props = lapin::BasicProperties::default().with_headers(headers);
    let element: Value =
        serde_json::from_str(&rabbit_fragment(&props, true, b"")).expect("element JSON");
    crate::support::assert_golden("rabbitmq-header-types.json", &element, &Options::default());
}
