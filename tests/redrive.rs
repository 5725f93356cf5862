//! `esm-gateway redrive`: parked failure records replayed into a MiniStack function;
//! only the ones that now succeed leave the destination.

mod common;

use common::*;
use serde_json::json;

/// A failure record in the gateway's shape for one RabbitMQ message with `body`.
fn parked(body: &str, i: usize) -> String {
    json!({
        "requestContext": {"requestId": format!("req-{i}"), "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f",
                           "condition": "RetryAttemptsExhausted", "approximateInvokeCount": 1},
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "version": "1.0", "timestamp": "2026-11-27T10:00:00.000Z",
        "RabbitMQBatchInfo": {"queue": "orders", "vhost": "/", "batchSize": 1},
        "payload": {"eventSource": "aws:rmq", "eventSourceArn": "arn:aws:mq:us-east-1:000000000000:broker:h:5672",
            "rmqMessagesByQueue": {"orders::/": [{
                "basicProperties": {"contentType": null, "contentEncoding": null, "headers": null, "deliveryMode": 2,
                    "priority": 0, "correlationId": null, "replyTo": null, "expiration": null, "messageId": format!("id-{body}"),
                    "timestamp": null, "type": null, "userId": null, "appId": null, "clusterId": null, "bodySize": body.len()},
                "redelivered": false,
                "data": base64_simd::STANDARD.encode_to_string(body)}]}}
    })
    .to_string()
}

/// Runs a redrive that skips records: asserts its exit code (65) and summary; its log.
fn redrive_skipping(config: &std::path::Path, extra: &[&str], summary: &str) -> String {
    let (code, out, log) = redrive_status(config, extra);
    assert_eq!(code, Some(65), "{out}\n{log}");
    assert!(out.contains(summary), "{out}\n{log}");
    log
}

/// A new topic holding `records` in its partition 0: the bootstrap servers and its name.
async fn kafka_topic_of(records: &[String]) -> (String, String) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = unique("parked");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for record in records {
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(record),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    (bootstrap, topic)
}

/// Writes the config of a mapping into `f` that parks in `on_failure` (a TOML table);
/// its path.
fn config_parking_in(f: &Function, on_failure: &str) -> std::path::PathBuf {
    let config = f.dir.path().join("gateway.toml");
    std::fs::write(&config, rabbit_config(&f.name, "unused", on_failure)).unwrap();
    config
}

#[tokio::test]
async fn redrive_removes_the_ninety_that_now_succeed_and_keeps_the_ten_that_do_not() {
    let still_bad: Vec<String> = (0..100)
        .step_by(10)
        .map(|i| format!("msg-{i:04}"))
        .collect();
    let f = Function::deploy("redrive", &[("POISON", &still_bad.join(","))]).await;
    let file = f.dir.path().join("parked.jsonl");
    let lines: Vec<String> = (0..100)
        .map(|i| parked(&format!("msg-{i:04}"), i))
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let config = config_parking_in(
        &f,
        &format!(
            "[mapping.on_failure]\ntype = \"file\"\npath = \"{}\"",
            file.display()
        ),
    );

    let dry = redrive(&config, &["--dry-run"]);
    assert_eq!(dry.matches("would replay").count(), 100, "{dry}");
    assert!(
        dry.contains("replayed 100, removed 0, remaining 100, skipped 0 (dry run"),
        "{dry}"
    );
    assert!(f.invocations().is_empty(), "a dry run invokes nothing");
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 100);

    let out = redrive(&config, &[]);
    assert!(
        out.contains("replayed 100, removed 90, remaining 10"),
        "{out}"
    );
    // The file was moved aside to parked.jsonl.1 (a running gateway would append to a
    // new parked.jsonl) and rewritten there with what remains.
    assert!(!file.exists());
    let left: Vec<String> = std::fs::read_to_string(format!("{}.1", file.display()))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["payload"]["rmqMessagesByQueue"]["orders::/"][0]["basicProperties"]["messageId"]
                .as_str()
                .unwrap()
                .trim_start_matches("id-")
                .to_owned()
        })
        .collect();
    assert_eq!(left, still_bad);
    let mut delivered = f.delivered();
    delivered.sort();
    let expected: Vec<String> = (0..100)
        .filter(|i| i % 10 != 0)
        .map(|i| format!("msg-{i:04}"))
        .collect();
    assert_eq!(delivered, expected);
}

#[tokio::test]
async fn a_kafka_topic_is_redriven_up_to_each_partitions_first_failure() {
    let records: Vec<String> = (0..10).map(|i| parked(&format!("msg-{i:04}"), i)).collect();
    let (bootstrap, topic) = kafka_topic_of(&records).await;
    let f = Function::deploy("kredrive", &[("POISON", "msg-0005")]).await;
    let config = config_parking_in(
        &f,
        &format!(
            "[mapping.on_failure]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\""
        ),
    );
    // Everything before the failure is committed past; the failure and what follows it
    // are read again next time.
    let out = redrive(&config, &[]);
    assert!(out.contains("replayed 10, removed 5, remaining 5"), "{out}");
    let again = redrive(&config, &[]);
    assert!(
        again.contains("replayed 5, removed 0, remaining 5"),
        "{again}"
    );
}

/// A failure record whose payload was moved to the file `location` names.
fn parked_at(location: &str, i: usize) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&parked("moved", i)).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("payload");
    o.insert("payloadLocation".into(), location.into());
    v.to_string()
}

#[tokio::test]
async fn redrive_keeps_unreadable_and_refused_records_and_replays_the_good_ones() {
    let f = Function::deploy("rbad", &[]).await;
    let payloads = f.dir.path().join("payloads");
    std::fs::create_dir(&payloads).unwrap();
    // A whole record kept in payload_dir, and one outside it reached through a symlink
    // inside it: only the first may be read.
    let kept = payloads.join("req-3.json");
    std::fs::write(&kept, parked("msg-0003", 3)).unwrap();
    let outside = f.dir.path().join("outside.json");
    std::fs::write(&outside, parked("msg-secret", 90)).unwrap();
    let escape = payloads.join("escape.json");
    std::os::unix::fs::symlink(&outside, &escape).unwrap();

    let file = f.dir.path().join("parked.jsonl");
    let lines = [
        parked("msg-0000", 0),
        "this is not JSON {".to_owned(),
        parked_at("file:///dev/zero", 2),
        parked_at(&format!("file://{}", kept.display()), 3),
        parked_at(&format!("file://{}", escape.display()), 4),
        parked("msg-0005", 5),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    // The records came from an SQS destination (its payload_dir is where payloads are
    // allowed), exported to a file.
    let config = config_parking_in(
        &f,
        &format!(
            "[mapping.on_failure]\ntype = \"sqs\"\nqueue_url = \"{}/000000000000/unused\"\npayload_dir = \"{}\"",
            aws_endpoint(),
            payloads.display()
        ),
    );
    let from = format!("file:{}", file.display());

    // 65: the run finished, and some records could not be replayed as they are.
    let log = redrive_skipping(
        &config,
        &["--from", &from],
        "replayed 3, removed 3, remaining 3, skipped 3",
    );
    for at in ["parked.jsonl.1:2", "parked.jsonl.1:3", "parked.jsonl.1:5"] {
        assert!(log.contains(at), "the log names {at}: {log}");
    }
    assert!(log.contains("req-2") && log.contains("req-4"), "{log}");
    // Delivered: the three good ones (one read from payload_dir), never the file outside.
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, ["msg-0000", "msg-0003", "msg-0005"]);
    // Kept: the three bad lines, unchanged and in order; nothing else.
    let left = std::fs::read_to_string(format!("{}.1", file.display())).unwrap();
    assert_eq!(
        left.lines().collect::<Vec<_>>(),
        [&lines[1], &lines[2], &lines[4]]
    );
    assert!(!file.exists());
}

#[tokio::test]
async fn an_sqs_redrive_leaves_the_bad_and_failing_messages_visible_again_at_once() {
    let client = sqs_client().await;
    let url = sqs_queue(&client, "rparked").await;
    let f = Function::deploy("rsqs", &[("POISON", "msg-0004")]).await;
    let payloads = f.dir.path().join("payloads");
    std::fs::create_dir(&payloads).unwrap();
    let bodies = [
        parked("msg-0000", 0),
        "this is not JSON {".to_owned(),
        parked_at("file:///dev/zero", 2),
        parked("msg-0003", 3),
        parked("msg-0004", 4),
    ];
    for b in &bodies {
        client
            .send_message()
            .queue_url(&url)
            .message_body(b)
            .send()
            .await
            .unwrap();
    }
    let config = config_parking_in(
        &f,
        &format!(
            "[mapping.on_failure]\ntype = \"sqs\"\nqueue_url = \"{url}\"\npayload_dir = \"{}\"",
            payloads.display()
        ),
    );

    let log = redrive_skipping(
        &config,
        &[],
        "replayed 3, removed 2, remaining 3, skipped 2",
    );
    assert_eq!(log.matches("at=\"SQS message ").count(), 2, "{log}");
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, ["msg-0000", "msg-0003"]);
    // The three kept are in the queue and visible now, not after the redrive's
    // visibility timeout.
    let mut left = Vec::new();
    loop {
        let got = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if got.messages().is_empty() {
            break;
        }
        left.extend(got.messages().iter().map(|m| m.body().unwrap().to_owned()));
    }
    left.sort();
    let mut kept = vec![bodies[1].clone(), bodies[2].clone(), bodies[4].clone()];
    kept.sort();
    assert_eq!(left, kept);
}

#[tokio::test]
async fn a_rabbitmq_redrive_requeues_the_bad_and_failing_messages() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("rparked").await;
    let f = Function::deploy("rrabbit", &[("POISON", "msg-0002")]).await;
    let bodies = [
        parked("msg-0000", 0),
        "this is not JSON {".to_owned(),
        parked("msg-0002", 2),
    ];
    rabbit
        .publish(&queue, bodies.iter().map(|b| b.clone().into_bytes()))
        .await;
    let config = config_parking_in(&f, "");
    let log = redrive_skipping(
        &config,
        &["--from", &format!("rabbitmq:{queue}")],
        "replayed 2, removed 1, remaining 2, skipped 1",
    );
    assert!(
        log.contains("delivery 2"),
        "the log names the delivery: {log}"
    );
    assert_eq!(f.delivered(), ["msg-0000"]);
    // Requeued before the redrive closed its connection.
    assert_eq!(rabbit.ready(&queue).await, 2);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_kafka_redrive_does_not_commit_past_an_unreadable_record() {
    let (bootstrap, topic) = kafka_topic_of(&[
        parked("msg-0000", 0),
        "this is not JSON {".to_owned(),
        parked("msg-0002", 2),
    ])
    .await;
    let f = Function::deploy("rkbad", &[]).await;
    let config = config_parking_in(
        &f,
        &format!(
            "[mapping.on_failure]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\""
        ),
    );
    // msg-0002 was replayed, but it is behind the unreadable record: not committed.
    let log = redrive_skipping(
        &config,
        &[],
        "replayed 2, removed 1, remaining 2, skipped 1",
    );
    assert!(log.contains(&format!("{topic}/0@1")), "{log}");
    let again = redrive_skipping(
        &config,
        &[],
        "replayed 1, removed 0, remaining 2, skipped 1",
    );
    assert!(again.contains(&format!("{topic}/0@1")), "{again}");
    // Delivered: msg-0000 once, msg-0002 at each run (at least once); the unreadable
    // record and msg-0002 stay in the topic past the group's committed offset.
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, ["msg-0000", "msg-0002", "msg-0002"]);
}

#[tokio::test]
async fn an_sqs_redrive_longer_than_the_visibility_timeout_holds_every_message_until_replayed() {
    use aws_sdk_sqs::types::QueueAttributeName;
    let client = sqs_client().await;
    let url = client
        .create_queue()
        .queue_name(unique("rslow"))
        .attributes(QueueAttributeName::VisibilityTimeout, "2")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    // Four replays of 1.5 s each, all received in one batch: without extensions the
    // last ones would be visible again (to any consumer) long before their replay.
    let f = Function::deploy("rslow", &[("SLEEP_MS", "1500")]).await;
    for i in 0..4 {
        client
            .send_message()
            .queue_url(&url)
            .message_body(parked(&format!("msg-{i:04}"), i))
            .send()
            .await
            .unwrap();
    }
    let config = config_parking_in(
        &f,
        &format!("[mapping.on_failure]\ntype = \"sqs\"\nqueue_url = \"{url}\""),
    );
    let run = tokio::task::spawn_blocking(move || redrive_status(&config, &[]));
    // Once the redrive holds all four, another consumer polls the queue until the
    // redrive ends: it must never get one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let attrs = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        let hidden = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
            .cloned();
        if hidden.as_deref() == Some("4") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !run.is_finished(),
            "the redrive never held the four messages"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut stolen = Vec::new();
    while !run.is_finished() {
        let got = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        stolen.extend(
            got.messages()
                .iter()
                .map(|m| m.message_id().unwrap().to_owned()),
        );
    }
    let (code, out, log) = run.await.unwrap();
    assert!(
        stolen.is_empty(),
        "received during the redrive: {stolen:?}\n{log}"
    );
    assert_eq!(code, Some(0), "{out}\n{log}");
    assert!(
        out.contains("replayed 4, removed 4, remaining 0, skipped 0"),
        "{out}\n{log}"
    );
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, numbered_strings(0..4));
}
