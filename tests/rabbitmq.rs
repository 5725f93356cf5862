//! End to end against the local stack: RabbitMQ queues drained by the gateway binary into
//! a Python function running in MiniStack.
//!
//! These tests share one RabbitMQ (and one restarts it), so `.config/nextest.toml` runs
//! them one at a time.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_thousand_messages_arrive_once_in_order_in_bounded_batches() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("order").await;
    let f = Function::deploy("order", &[("LOG_EVENT", "1")]).await;
    rabbit.publish(&queue, numbered(1000)).await;

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 50\nwindow = \"200ms\"",
    ));
    let delivered = f.wait_delivered(1000, LONG).await;
    assert_eq!(
        delivered,
        numbered_strings(0..1000),
        "exactly once, in publish order"
    );

    let invocations = f.invocations();
    assert!(invocations.iter().all(|i| i.bodies.len() <= 50));
    for i in &invocations {
        // The event parses as the aws_lambda_events type, with AWS's queue key.
        let e: aws_lambda_events::event::rabbitmq::RabbitMqEvent =
            serde_json::from_value(i.event.clone().unwrap()).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("aws:rmq"));
        let msgs = &e.messages_by_queue[&format!("{queue}::/")];
        assert_eq!(msgs.len(), i.bodies.len());
        assert_eq!(msgs[0].basic_properties.delivery_mode, 2);
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0, "everything was acknowledged");
    assert_eq!(f.delivered().len(), 1000, "no redelivery after shutdown");
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_poison_message_is_isolated_by_bisection_and_parked_alone() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("poison").await;
    let f = Function::deploy("poison", &[("POISON", "msg-0137")]).await;
    let parked = f.dir.path().join("parked.jsonl");
    rabbit.publish(&queue, numbered(200)).await;

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            r#"
[mapping.batch]
size = 20
window = "100ms"

[mapping.retry]
max_attempts = 2
backoff_min = "10ms"
backoff_max = "50ms"
bisect_on_error = true

[mapping.on_failure]
type = "file"
path = "{}"
"#,
            parked.display()
        ),
    ));
    let mut expected = numbered_strings(0..200);
    expected.retain(|b| b != "msg-0137");
    let delivered = f.wait_delivered(199, LONG).await;
    assert_eq!(delivered, expected, "all others delivered once, in order");

    let records = wait_for("the failure record", LONG, || {
        let r = failure_records(&parked);
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    // Every invoke that carried it counts: the bisection steps, then the lone record's
    // first attempt and its two retries.
    let carrying: Vec<_> = f
        .invocations()
        .into_iter()
        .filter(|i| i.bodies.iter().any(|b| b == "msg-0137"))
        .collect();
    assert_eq!(
        r["requestContext"]["approximateInvokeCount"],
        carrying.len()
    );
    assert_eq!(carrying.iter().filter(|i| i.bodies.len() == 1).count(), 3);
    assert!(carrying.len() > 3, "bisection narrowed it down");
    assert_eq!(r["responseContext"]["functionError"], "Unhandled");
    assert_eq!(r["RabbitMQBatchInfo"]["batchSize"], 1);
    assert_eq!(r["RabbitMQBatchInfo"]["firstMessageId"], "id-msg-0137");
    let msgs = r["payload"]["rmqMessagesByQueue"][format!("{queue}::/")]
        .as_array()
        .unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["data"], "bXNnLTAxMzc="); // base64("msg-0137")
    assert!(r["error"].as_str().unwrap().contains("poison"), "{r}");

    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0, "the queue ends empty");
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_partial_batch_response_retries_only_the_reported_messages() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("partial").await;
    let f = Function::deploy("partial", &[("FAIL_ONCE", "msg-0003,msg-0007")]).await;
    rabbit.publish(&queue, numbered(10)).await;

    let gw = Gateway::start(&rabbit_config(&f.name, &queue, PARTIAL_BATCH));
    f.wait_invocations(2, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let inv = f.invocations();
    assert_eq!(inv.len(), 2, "one batch, one retry: {inv:?}");
    assert_eq!(inv[0].bodies, numbered_strings(0..10));
    assert_eq!(inv[0].failed, ["id-msg-0003", "id-msg-0007"]);
    assert_eq!(inv[1].bodies, ["msg-0003", "msg-0007"]);
    assert!(inv[1].failed.is_empty());
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

/// Partial batch responses: 30 messages in batches of 10, `msg-0003` reported failed
/// once, with a long backoff.
fn unordered_config(function: &str, queue: &str, backoff: &str) -> String {
    rabbit_config(
        function,
        queue,
        &format!(
            r#"
report_batch_item_failures = true

[mapping.batch]
size = 10
window = "100ms"

[mapping.retry]
backoff_min = "{backoff}"
backoff_max = "{backoff}"
"#
        ),
    )
}

#[tokio::test]
async fn with_partial_batch_responses_a_failed_record_does_not_hold_the_queue_back() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("unordered").await;
    let f = Function::deploy("unordered", &[("FAIL_ONCE", "msg-0003")]).await;
    rabbit.publish(&queue, numbered(30)).await;

    // The retry waits 5–10 s; the next two batches do not wait for it.
    let gw = Gateway::start(&unordered_config(&f.name, &queue, "10s"));
    let inv = f.wait_invocations(4, LONG).await;
    assert_eq!(inv[0].bodies, numbered_strings(0..10));
    assert_eq!(inv[0].failed, ["id-msg-0003"]);
    assert_eq!(inv[1].bodies, numbered_strings(10..20), "{inv:?}");
    assert_eq!(inv[2].bodies, numbered_strings(20..30), "{inv:?}");
    assert_eq!(inv[3].bodies, ["msg-0003"], "the retry came after them");
    assert_eq!(inv[3].redelivered, [true]);
    assert_eq!(
        gw.log_count("RabbitMQ session ended"),
        0,
        "no ack was refused"
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, numbered_strings(0..30), "each once");
    assert_eq!(rabbit.ready(&queue).await, 0, "all acknowledged");
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_shutdown_leaves_a_pending_retry_in_the_queue_and_acks_the_rest() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("pending").await;
    let f = Function::deploy("pending", &[("FAIL_ONCE", "msg-0003")]).await;
    rabbit.publish(&queue, numbered(30)).await;

    let gw = Gateway::start(&unordered_config(&f.name, &queue, "10min"));
    f.wait_invocations(3, LONG).await;
    assert_eq!(
        gw.terminate().await.code(),
        Some(0),
        "the pending retry did not hold the shutdown"
    );
    let inv = f.invocations();
    assert_eq!(inv.len(), 3, "no retry was invoked: {inv:?}");
    // 29 delivered + 1 back in the queue = 30.
    let mut delivered = f.delivered();
    delivered.sort();
    let mut expected = numbered_strings(0..30);
    expected.retain(|b| b != "msg-0003");
    assert_eq!(delivered, expected);
    assert_eq!(
        rabbit.ready(&queue).await,
        1,
        "msg-0003 is back in the queue"
    );
    rabbit.delete(&queue).await;
}

/// On AWS a failed batch comes back from the broker with `redelivered: true`; the
/// gateway's own retry of it says the same.
#[tokio::test]
async fn a_retried_message_arrives_redelivered() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("redelivered").await;
    let f = Function::deploy("redelivered", &[("FAIL_ONCE", "msg-0001")]).await;
    rabbit.publish(&queue, numbered(3)).await;

    let gw = Gateway::start(&rabbit_config(&f.name, &queue, PARTIAL_BATCH));
    f.wait_invocations(2, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let inv = f.invocations();
    assert_eq!(inv.len(), 2, "one batch, one retry: {inv:?}");
    assert_eq!(inv[0].bodies, numbered_strings(0..3));
    assert_eq!(inv[0].redelivered, [false, false, false], "first delivery");
    assert_eq!(inv[1].bodies, ["msg-0001"]);
    assert_eq!(inv[1].redelivered, [true], "the retry is a redelivery");
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_only_the_batch_in_flight() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("kill").await;
    let f = Function::deploy("kill", &[("SLEEP_MS", "20")]).await;
    rabbit.publish(&queue, numbered(600)).await;
    let config = rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    );

    let gw = Gateway::start(&config);
    f.wait_delivered(150, LONG).await;
    gw.kill9();
    let before = f.delivered().len();

    let gw = Gateway::start(&config);
    let delivered = wait_for("every message at least once", LONG, || {
        let d = f.delivered();
        let mut seen: Vec<_> = d.clone();
        seen.sort();
        seen.dedup();
        (seen.len() == 600).then_some(d)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for b in &delivered {
        *counts.entry(b.as_str()).or_default() += 1;
    }
    let duplicates: Vec<_> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(b, _)| *b)
        .collect();
    assert!(
        duplicates.len() <= 10,
        "duplicates beyond the in-flight batch ({} delivered before the kill): {duplicates:?}",
        before
    );
    assert!(counts.values().all(|&n| n <= 2));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_rabbitmq_restart_mid_stream_is_survived_without_loss() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("restart").await;
    let f = Function::deploy("restart", &[("SLEEP_MS", "20")]).await;
    rabbit.publish(&queue, numbered(400)).await;
    drop(rabbit);

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    ));
    f.wait_delivered(50, LONG).await;
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    gw.wait_log("RabbitMQ session ended", LONG).await;

    wait_for("every message after the restart", LONG, || {
        let mut d = f.delivered();
        d.sort();
        d.dedup();
        (d.len() == 400).then_some(())
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let rabbit = Rabbit::connect().await;
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn empty_non_utf8_and_oversized_bodies_are_delivered_or_parked_not_crashed_on() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("baddata").await;
    let f = Function::deploy("baddata", &[]).await;
    let parked = f.dir.path().join("parked.jsonl");
    let huge = vec![b'x'; 7 * 1024 * 1024];
    rabbit
        .publish(
            &queue,
            [
                b"first".to_vec(),
                Vec::new(),
                vec![0xff, 0xfe, 0x00],
                huge,
                b"last".to_vec(),
            ],
        )
        .await;

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            "[mapping.batch]\nwindow = \"200ms\"\n\n[mapping.on_failure]\ntype = \"file\"\npath = \"{}\"",
            parked.display()
        ),
    ));
    let delivered = f.wait_delivered(4, LONG).await;
    assert_eq!(delivered, ["first", "", "\u{fffd}\u{fffd}\u{0}", "last"]);
    let records = failure_records(&parked);
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["requestContext"]["condition"],
        "MaximumPayloadSizeExceeded"
    );
    assert_eq!(records[0]["requestContext"]["approximateInvokeCount"], 0);
    let msgs = records[0]["payload"]["rmqMessagesByQueue"][format!("{queue}::/")]
        .as_array()
        .unwrap();
    assert_eq!(msgs[0]["basicProperties"]["bodySize"], 7 * 1024 * 1024);
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn dead_letters_go_to_a_rabbitmq_exchange_with_confirms() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("dlx-src").await;
    let parked_queue = rabbit.queue("dlx-parked").await;
    let exchange = unique("esm-test-dlx");
    rabbit
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    rabbit
        .channel
        .queue_bind(
            parked_queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let f = Function::deploy("dlx", &[("POISON", "msg-0002")]).await;
    rabbit.publish(&queue, numbered(5)).await;

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            r#"
[mapping.batch]
size = 1

[mapping.retry]
max_attempts = 0

[mapping.on_failure]
type = "rabbitmq"
url = "{}"
exchange = "{exchange}"
"#,
            amqp_url()
        ),
    ));
    // Batches of one run in order: msg-0002 is parked before msg-0003 is invoked.
    f.wait_delivered(4, LONG).await;
    assert_eq!(
        gateway_connections(gw.pid()).len(),
        2,
        "the source consumes on one connection, its on-failure destination publishes on another"
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    let got = rabbit
        .channel
        .basic_get(parked_queue.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("one dead letter");
    let r: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(r["RabbitMQBatchInfo"]["firstMessageId"], "id-msg-0002");
    assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(rabbit.ready(&queue).await, 0);
    for q in [&queue, &parked_queue] {
        rabbit.delete(q).await;
    }
}

#[tokio::test]
async fn a_missing_function_fails_the_mapping_and_acknowledges_nothing() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("missing").await;
    rabbit.publish(&queue, numbered(5)).await;
    let name = unique("not-deployed");
    let config = rabbit_config(
        &name,
        &queue,
        "[mapping.retry]\nbackoff_min = \"10ms\"\nbackoff_max = \"200ms\"",
    );

    let gw = Gateway::start(&config);
    gw.wait_log("mapping failed; records stay in the source", LONG)
        .await;
    assert!(gw.log_contains("ResourceNotFoundException"));
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 5, "nothing was acknowledged");

    // Once the function exists, the same records go through.
    let f = Function::deploy("missing", &[]).await;
    let gw = Gateway::start(&rabbit_config(&f.name, &queue, ""));
    assert_eq!(f.wait_delivered(5, LONG).await, numbered_strings(0..5));
    assert_eq!(gw.terminate().await.code(), Some(0));
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn records_no_filter_matches_are_acknowledged_without_an_invoke() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("filter").await;
    let f = Function::deploy("filter", &[]).await;
    let bodies = (0..40).map(|i| {
        let kind = if i % 4 == 0 { "order" } else { "noise" };
        format!(r#"{{"kind":"{kind}","n":{i}}}"#).into_bytes()
    });
    rabbit.publish(&queue, bodies).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        r#"filters = ['{"data":{"kind":["order"],"n":[{"numeric":[">=",8]}]}}']

[mapping.batch]
size = 10
window = "100ms""#,
    ));
    let expected: Vec<String> = (8..40)
        .step_by(4)
        .map(|i| format!(r#"{{"kind":"order","n":{i}}}"#))
        .collect();
    let delivered = f.wait_delivered(expected.len(), LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(delivered, expected);
    assert_eq!(
        rabbit.ready(&queue).await,
        0,
        "filtered messages were acknowledged too"
    );
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn asynchronous_invokes_count_as_delivered_once_lambda_accepts_them() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("async").await;
    let f = Function::deploy("async", &[]).await;
    rabbit.publish(&queue, numbered(30)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        "invocation_type = \"event\"\n\n[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    ));
    // Lambda runs the function after accepting the event; its log shows every message.
    let mut delivered = f.wait_delivered(30, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    delivered.sort();
    assert_eq!(delivered, numbered_strings(0..30));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}
