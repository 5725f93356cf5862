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
        dry.contains("replayed 100, removed 0, remaining 100 (dry run"),
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
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = unique("parked");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..10 {
        let record = parked(&format!("msg-{i:04}"), i);
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&record),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
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
