//! End to end against MiniStack's SQS and Lambda: queues drained by the gateway binary
//! into a Python function that parses its event with Powertools' SqsModel.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(180);

#[tokio::test]
async fn five_thousand_messages_all_arrive_and_the_queue_ends_empty() {
    let client = sqs_client().await;
    let url = create_queue(&client, "std", false, 30).await;
    let bodies: Vec<_> = (0..5_000).map(|i| (None, format!("m-{i}"))).collect();
    send(&client, &url, &bodies).await;
    let f = Function::deploy("sqsstd", &[("LOG_EVENT", "1")]).await;
    let gw = Gateway::start(&sqs_config(
        &f.name,
        &url,
        "[mapping.batch]\nsize = 100\nwindow = \"500ms\"",
    ));
    let delivered = f.wait_delivered(5_000, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let mut unique_bodies = delivered.clone();
    unique_bodies.sort();
    unique_bodies.dedup();
    assert_eq!(unique_bodies.len(), 5_000);
    assert_eq!(depth(&client, &url).await, (0, 0), "every message deleted");
    let invocations = f.invocations();
    assert!(invocations.iter().all(|i| i.bodies.len() <= 100));
    // The event is AWS's, and parses as aws_lambda_events' type too.
    let event = invocations[0].event.clone().unwrap();
    let parsed: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_value(event.clone()).unwrap();
    let r = &parsed.records[0];
    assert_eq!(r.event_source.as_deref(), Some("aws:sqs"));
    assert_eq!(r.aws_region.as_deref(), Some("us-east-1"));
    assert!(r.md5_of_body.is_some());
    assert_eq!(
        event["Records"][0]["messageAttributes"]["origin"]["stringValue"],
        "test"
    );
    assert_eq!(
        event["Records"][0]["messageAttributes"]["origin"]["dataType"],
        "String"
    );
    assert!(event["Records"][0]["attributes"]["SentTimestamp"].is_string());
}

#[tokio::test]
async fn a_partial_batch_response_returns_exactly_the_reported_messages() {
    let client = sqs_client().await;
    let url = create_queue(&client, "partial", false, 3).await;
    let bodies: Vec<_> = (0..10).map(|i| (None, format!("m-{i}"))).collect();
    send(&client, &url, &bodies).await;
    let f = Function::deploy("sqspartial", &[("FAIL_ONCE", "m-3,m-7")]).await;
    let gw = Gateway::start(&sqs_config(
        &f.name,
        &url,
        "report_batch_item_failures = true\n\n[mapping.batch]\nsize = 10\nwindow = \"200ms\"",
    ));
    f.wait_delivered(10, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let inv = f.invocations();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in &inv {
        for b in &i.bodies {
            *counts.entry(b.clone()).or_default() += 1;
        }
    }
    for i in 0..10 {
        let want = if i == 3 || i == 7 { 2 } else { 1 };
        assert_eq!(counts[&format!("m-{i}")], want, "m-{i}: {inv:?}");
    }
    assert_eq!(depth(&client, &url).await, (0, 0));
}

/// On AWS a failed message is received again with a higher `ApproximateReceiveCount`;
/// a retry inside the gateway (same receipt, the message never went back) says the same.
#[tokio::test]
async fn a_gateway_retry_raises_the_approximate_receive_count() {
    let client = sqs_client().await;
    let url = create_queue(&client, "receivecount", false, 30).await;
    send(&client, &url, &[(None, "m-0".into()), (None, "m-1".into())]).await;
    let f = Function::deploy("sqscount", &[("FAIL_ONCE", "m-1"), ("LOG_EVENT", "1")]).await;
    let gw = Gateway::start(&sqs_config(
        &f.name,
        &url,
        "report_batch_item_failures = true\n\n[mapping.batch]\nsize = 10\nwindow = \"1s\"\n\n\
         [mapping.retry]\nmax_attempts = 2\nbackoff_min = \"10ms\"",
    ));
    f.wait_delivered(2, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let inv = f.invocations();
    assert_eq!(inv.len(), 2, "one batch, one retry: {inv:?}");
    let record = |i: usize, body: &str| {
        let event = inv[i].event.clone().unwrap();
        let records = event["Records"].as_array().unwrap().clone();
        records.into_iter().find(|r| r["body"] == body).unwrap()
    };
    let (first, retried) = (record(0, "m-1"), record(1, "m-1"));
    assert_eq!(inv[1].bodies, ["m-1"]);
    assert_eq!(first["attributes"]["ApproximateReceiveCount"], "1");
    assert_eq!(retried["attributes"]["ApproximateReceiveCount"], "2");
    assert_eq!(inv[1].redelivered, [true]);
    // The gateway's retry, not a second receive; nothing else changed.
    assert_eq!(retried["receiptHandle"], first["receiptHandle"]);
    let mut expected = first.clone();
    expected["attributes"]["ApproximateReceiveCount"] = "2".into();
    assert_eq!(retried, expected);
    assert_eq!(
        record(0, "m-0")["attributes"]["ApproximateReceiveCount"],
        "1"
    );
    assert_eq!(depth(&client, &url).await, (0, 0));
}

#[tokio::test]
async fn fifo_groups_keep_their_order_and_a_failure_holds_back_only_its_group() {
    let client = sqs_client().await;
    let url = create_queue(&client, "fifo", true, 3).await;
    let mut messages = Vec::new();
    for i in 0..200 {
        for g in 0..10 {
            messages.push((Some(format!("g{g}")), format!("g{g}-{i:03}")));
        }
    }
    send(&client, &url, &messages).await;
    let f = Function::deploy("sqsfifo", &[("FAIL_ONCE", "g3-050")]).await;
    let gw = Gateway::start(&sqs_config(
        &f.name,
        &url,
        "report_batch_item_failures = true\n\n[mapping.batch]\nsize = 10",
    ));
    f.wait_delivered(2_000, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let delivered = f.delivered();
    for g in 0..10 {
        let prefix = format!("g{g}-");
        let mut firsts: Vec<&String> = Vec::new();
        for b in delivered.iter().filter(|b| b.starts_with(&prefix)) {
            if !firsts.contains(&b) {
                firsts.push(b);
            }
        }
        let expected: Vec<String> = (0..200).map(|i| format!("g{g}-{i:03}")).collect();
        assert_eq!(
            firsts,
            expected.iter().collect::<Vec<_>>(),
            "group {g} in order"
        );
    }
    // While g3-050 waited out its visibility timeout, other groups went on.
    let inv = f.invocations();
    let failed_at = inv.iter().position(|i| !i.failed.is_empty()).unwrap();
    let retried_at = inv
        .iter()
        .rposition(|i| i.bodies.contains(&"g3-050".to_string()))
        .unwrap();
    assert!(retried_at > failed_at);
    let others_between = inv[failed_at + 1..retried_at]
        .iter()
        .flat_map(|i| &i.bodies)
        .filter(|b| !b.starts_with("g3-"))
        .count();
    assert!(others_between > 0, "other groups were held back too");
    assert_eq!(depth(&client, &url).await, (0, 0));
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing() {
    let client = sqs_client().await;
    let url = create_queue(&client, "kill", false, 3).await;
    let bodies: Vec<_> = (0..1_000).map(|i| (None, format!("m-{i}"))).collect();
    send(&client, &url, &bodies).await;
    let f = Function::deploy("sqskill", &[("SLEEP_MS", "20")]).await;
    let config = sqs_config(&f.name, &url, "[mapping.batch]\nsize = 10");
    let gw = Gateway::start(&config);
    f.wait_delivered(200, LONG).await;
    gw.kill9();
    let gw = Gateway::start(&config);
    wait_for("every message at least once", LONG, || {
        let mut d = f.delivered();
        d.sort();
        d.dedup();
        (d.len() == 1_000).then_some(())
    })
    .await;
    // What the killed process had received comes back after its visibility timeout,
    // is delivered again and deleted: the queue drains.
    wait_sqs_empty(&client, &url, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn a_visibility_timeout_shorter_than_window_plus_function_timeout_is_refused() {
    let client = sqs_client().await;
    let url = create_queue(&client, "vt", false, 5).await;
    send(&client, &url, &[(None, "m-0".into())]).await;
    let config = sqs_config("unused-function", &url, "").replace(
        &format!("queue_url = \"{url}\""),
        &format!("queue_url = \"{url}\"\nfunction_timeout = \"30s\""),
    );
    let gw = Gateway::start(&config);
    gw.wait_log("SQS source not started", LONG).await;
    assert!(gw.log_contains("its visibility timeout (5s) is shorter than the batching window plus the function timeout (30s)"));
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(depth(&client, &url).await, (1, 0), "nothing was received");
}
