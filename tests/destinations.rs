//! On-failure destinations against the local stack's real services: a poison RabbitMQ
//! message parked in an SQS queue (MiniStack), a Kafka topic (Tansu), another function
//! (MiniStack), and a destination that is down until it comes back.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};

const LONG: Duration = Duration::from_secs(120);

/// Publishes msg-0000..msg-0004 (msg-0002 poisons the function) and runs the gateway
/// with `on_failure` until the four good ones are delivered; returns the function.
async fn park_poison(prefix: &str, on_failure: &str) -> (Function, Rabbit, String) {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue(prefix).await;
    let f = Function::deploy(prefix, &[("POISON", "msg-0002")]).await;
    rabbit.publish(&queue, numbered(5)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            "[mapping.batch]\nsize = 1\n\n[mapping.retry]\nmax_attempts = 1\nbackoff_min = \"10ms\"\n\n{on_failure}"
        ),
    ));
    // Batches of one run in order: msg-0002 is parked before msg-0003 is invoked.
    f.wait_delivered(4, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0, "the source moved on");
    (f, rabbit, queue)
}

fn check_record(r: &serde_json::Value, queue: &str) {
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 2);
    assert_eq!(r["RabbitMQBatchInfo"]["firstMessageId"], "id-msg-0002");
    assert_eq!(r["RabbitMQBatchInfo"]["queue"], queue);
    let msgs = r["payload"]["rmqMessagesByQueue"][format!("{queue}::/")]
        .as_array()
        .unwrap();
    assert_eq!(msgs[0]["data"], "bXNnLTAwMDI="); // base64("msg-0002")
}

#[tokio::test]
async fn a_poison_message_is_parked_in_an_sqs_queue() {
    let sqs = sqs_client().await;
    let url = sqs_queue(&sqs, "dlq").await;
    let (_f, rabbit, queue) = park_poison(
        "dsqs",
        &format!("[mapping.on_failure]\ntype = \"sqs\"\nqueue_url = \"{url}\""),
    )
    .await;
    let got = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap();
    let messages = got.messages();
    assert_eq!(messages.len(), 1);
    let r: serde_json::Value = serde_json::from_str(messages[0].body().unwrap()).unwrap();
    check_record(&r, &queue);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_poison_message_is_parked_in_a_kafka_topic() {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = unique("dlt");
    let (_f, rabbit, queue) = park_poison(
        "dkafka",
        &format!("[mapping.on_failure]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\""),
    )
    .await;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("dlt-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let m = tokio::time::timeout(LONG, consumer.recv())
        .await
        .expect("a record on the topic")
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
    check_record(&r, &queue);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_poison_message_is_parked_with_another_function() {
    let sink = Function::deploy("dsink", &[]).await;
    let (_f, rabbit, queue) = park_poison(
        "dlambda",
        &format!(
            "[mapping.on_failure]\ntype = \"lambda\"\nfunction = \"{}\"",
            sink.name
        ),
    )
    .await;
    let record = wait_for("the failure record at the other function", LONG, || {
        sink.invocations().into_iter().find_map(|i| i.event)
    })
    .await;
    check_record(&record, &queue);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_destination_that_is_down_stalls_the_mapping_until_it_comes_back() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("ddown").await;
    let f = Function::deploy("ddown", &[("POISON", "msg-0002")]).await;
    // The destination's directory does not exist yet: every write fails.
    let dir = f.dir.path().join("not-yet");
    let parked = dir.join("parked.jsonl");
    rabbit.publish(&queue, numbered(5)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            "[mapping.batch]\nsize = 1\n\n[mapping.retry]\nmax_attempts = 0\nbackoff_min = \"10ms\"\nbackoff_max = \"200ms\"\n\n\
             [mapping.on_failure]\ntype = \"file\"\npath = \"{}\"",
            parked.display()
        ),
    ));
    gw.wait_log("on-failure destination unavailable", LONG)
        .await;
    // Stalled: nothing after the poison message was invoked, nothing acked past it.
    assert_eq!(f.delivered(), numbered_strings(0..2));
    // The destination comes back: the dead letter is written and the mapping goes on.
    std::fs::create_dir_all(&dir).unwrap();
    f.wait_delivered(4, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let records = failure_records(&parked);
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["RabbitMQBatchInfo"]["firstMessageId"],
        "id-msg-0002"
    );
    assert_eq!(f.delivered(), [0, 1, 3, 4].map(|i| format!("msg-{i:04}")));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}
