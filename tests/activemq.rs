//! End to end against the local stack: ActiveMQ queues (STOMP) drained by the gateway
//! binary into a Python function running in MiniStack. Every test counts every message
//! at the end: delivered, parked, or still in the broker (queue or DLQ).
//!
//! The client (`common::amq`) is the gateway's own STOMP client; one test
//! restarts the broker, so `.config/nextest.toml` runs these one at a time.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::amq::*;
use common::*;
use esm_gateway::source::activemq::config::broker;

const LONG: Duration = Duration::from_secs(120);

fn amq_config(function: &str, queue: &str, extra: &str) -> String {
    gateway_header()
        + &mapping(
            "test",
            function,
            extra,
            &format!(
                "type = \"activemq\"\nurl = \"{}\"\nusername = \"${{ESM_ACTIVEMQ_USER}}\"\n\
                 password = \"${{ESM_ACTIVEMQ_PASSWORD}}\"\nqueue = \"{queue}\"\n",
                amq_url()
            ),
        )
}

/// Starts the gateway with the stack's login in its environment.
fn start(config: &str) -> Gateway {
    Gateway::start_with_env(
        config,
        &[
            ("ESM_ACTIVEMQ_USER", &var("ESM_ACTIVEMQ_USER", "esm")),
            (
                "ESM_ACTIVEMQ_PASSWORD",
                &var("ESM_ACTIVEMQ_PASSWORD", "esm-stack"),
            ),
        ],
    )
}

fn counts(delivered: &[String]) -> HashMap<&str, usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for b in delivered {
        *counts.entry(b.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_thousand_text_and_bytes_messages_arrive_once_in_order_in_bounded_batches() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-order");
    let f = Function::deploy("amq-order", &[("LOG_EVENT", "1")]).await;
    amq.publish(&queue, &numbered(1000)).await;

    let gw = start(&amq_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 50\nwindow = \"200ms\"",
    ));
    let delivered = f.wait_delivered(1000, LONG).await;
    assert_eq!(
        delivered,
        numbered_strings(0..1000),
        "exactly once, in order"
    );
    let invocations = f.invocations();
    assert!(invocations.iter().all(|i| i.bodies.len() <= 50));
    let mut types = Vec::new();
    for i in &invocations {
        let e: aws_lambda_events::event::activemq::ActiveMqEvent =
            serde_json::from_value(i.event.clone().unwrap()).unwrap();
        assert_eq!(e.event_source.as_deref(), Some("aws:mq"));
        let b = broker(&amq_url()).unwrap();
        let arn = format!(
            "arn:aws:mq:us-east-1:000000000000:broker:{}:{}",
            b.host, b.port
        );
        assert_eq!(e.event_source_arn, Some(arn));
        assert_eq!(e.messages.len(), i.bodies.len());
        for m in &e.messages {
            assert_eq!(m.destination.physical_name.as_deref(), Some(queue.as_str()));
            assert_eq!(m.delivery_mode, 2);
            assert!(!m.redelivered && m.timestamp > 0);
            types.push((m.properties["seq"].clone(), m.message_type.clone().unwrap()));
        }
    }
    let expected: Vec<_> = (0..1000)
        .map(|n| {
            let t = if n % 2 == 0 { "text" } else { "bytes" };
            (n.to_string(), format!("jms/{t}-message"))
        })
        .collect();
    assert_eq!(types, expected);
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(amq.depth(&queue).await, 0, "everything was acknowledged");
    assert_eq!(f.delivered().len(), 1000, "no redelivery after shutdown");
}

#[tokio::test]
async fn tls_with_the_stacks_ca_file_delivers() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-tls");
    let f = Function::deploy("amq-tls", &[]).await;
    amq.publish(&queue, &numbered(20)).await;
    let url = var("ESM_ACTIVEMQ_TLS_URL", "stomp+ssl://localhost:61614");
    let ca = var(
        "ESM_ACTIVEMQ_CA_FILE",
        &format!(
            "{}/.cache/esm-gateway-stack/activemq-tls/ca.pem",
            var("HOME", "/root")
        ),
    );
    let config = amq_config(&f.name, &queue, "[mapping.batch]\nwindow = \"100ms\"").replace(
        &format!("url = \"{}\"", amq_url()),
        &format!("url = \"{url}\"\nca_file = \"{ca}\""),
    );
    assert!(config.contains("stomp+ssl://"), "{config}");
    let gw = start(&config);
    assert_eq!(f.wait_delivered(20, LONG).await, numbered_strings(0..20));
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(amq.depth(&queue).await, 0);
}

#[tokio::test]
async fn heart_beats_keep_an_idle_connection_open() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-idle");
    let f = Function::deploy("amq-idle", &[]).await;
    let config = amq_config(&f.name, &queue, "[mapping.batch]\nwindow = \"100ms\"")
        + "heart_beat = \"1s\"\n";
    let gw = start(&config);
    gw.wait_log("consuming", LONG).await;
    amq.publish(&queue, &numbered(1)).await;
    assert_eq!(f.wait_delivered(1, LONG).await, numbered_strings(0..1));
    // Idle for many heart-beat intervals, both ways: the broker drops a connection
    // silent past its interval, and the gateway one whose broker is.
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(6) {
        assert!(!gw.log_contains("ActiveMQ session ended"), "{:?}", gw.logs);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    amq.publish(&queue, &numbered(2)[1..]).await;
    assert_eq!(f.wait_delivered(2, LONG).await, numbered_strings(0..2));
    assert!(!gw.log_contains("ActiveMQ session ended"));
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(amq.depth(&queue).await, 0);
}

#[tokio::test]
async fn a_poison_message_is_isolated_by_bisection_and_parked_alone() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-poison");
    let f = Function::deploy("amq-poison", &[("POISON", "msg-0137")]).await;
    let parked = f.dir.path().join("parked.jsonl");
    amq.publish(&queue, &numbered(200)).await;

    let gw = start(&amq_config(
        &f.name,
        &queue,
        &format!(
            "[mapping.batch]\nsize = 20\nwindow = \"100ms\"\n\n[mapping.retry]\nmax_attempts = 2\n\
             backoff_min = \"10ms\"\nbackoff_max = \"50ms\"\nbisect_on_error = true\n\n\
             [mapping.on_failure]\ntype = \"file\"\npath = \"{}\"\n",
            parked.display()
        ),
    ));
    let mut expected = numbered_strings(0..200);
    expected.retain(|b| b != "msg-0137");
    assert_eq!(f.wait_delivered(199, LONG).await, expected);
    let records = wait_for("the failure record", LONG, || {
        let r = failure_records(&parked);
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    let carrying = f
        .invocations()
        .into_iter()
        .filter(|i| i.bodies.iter().any(|b| b == "msg-0137"))
        .count();
    assert!(carrying > 3, "bisection narrowed it down: {carrying}");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], carrying);
    assert_eq!(r["ActiveMQBatchInfo"]["batchSize"], 1);
    assert_eq!(r["ActiveMQBatchInfo"]["queue"], queue.as_str());
    let msgs = r["payload"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["data"], "bXNnLTAxMzc="); // base64("msg-0137")
    assert_eq!(gw.terminate().await.code(), Some(0));
    // 199 delivered + 1 parked = 200, and none left in the broker.
    assert_eq!(amq.depth(&queue).await, 0);
}

#[tokio::test]
async fn without_a_destination_a_failing_message_is_redelivered_by_the_broker_then_dead_lettered() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-nack");
    let dlq = format!("{}{queue}", var("ESM_ACTIVEMQ_DLQ_PREFIX", "DLQ."));
    let redeliveries: usize = var("ESM_ACTIVEMQ_MAX_REDELIVERIES", "6").parse().unwrap();
    let f = Function::deploy("amq-nack", &[("POISON", "msg-0002")]).await;
    amq.publish(&queue, &numbered(5)).await;

    // No gateway retries: each failure goes straight back to the broker.
    let gw = start(&amq_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 5\nwindow = \"100ms\"\n\n[mapping.retry]\nmax_attempts = 0\nbisect_on_error = true\n",
    ));
    amq.wait_depth(&dlq, 1, LONG).await;
    let lone: Vec<_> = f
        .invocations()
        .into_iter()
        .filter(|i| i.bodies == ["msg-0002"])
        .collect();
    assert_eq!(lone.len(), 1 + redeliveries, "{lone:?}");
    assert!(!lone[0].redelivered[0]);
    assert!(lone[1..].iter().all(|i| i.redelivered[0] && !i.ok));
    let mut others = numbered_strings(0..5);
    others.retain(|b| b != "msg-0002");
    assert_eq!(f.delivered(), others, "the others once, in order");
    assert_eq!(gw.terminate().await.code(), Some(0));

    assert_eq!(amq.depth(&queue).await, 0);
    let dead = amq.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"msg-0002");
    assert_eq!(
        dead[0].header("original-destination"),
        Some(format!("/queue/{queue}").as_str())
    );
    // 4 delivered + 1 dead-lettered = 5.
}

#[tokio::test]
async fn a_partial_batch_response_by_message_id_retries_only_the_reported_messages() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-partial");
    let f = Function::deploy("amq-partial", &[("FAIL_ONCE", "msg-0003,msg-0007")]).await;
    amq.publish(&queue, &numbered(10)).await;

    let gw = start(&amq_config(&f.name, &queue, PARTIAL_BATCH));
    f.wait_invocations(2, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let inv = f.invocations();
    assert_eq!(inv.len(), 2, "one batch, one retry: {inv:?}");
    assert_eq!(inv[0].bodies, numbered_strings(0..10));
    // Reported by messageID, the broker's ID:… of those two.
    assert_eq!(
        inv[0].failed,
        [inv[0].ids[3].clone(), inv[0].ids[7].clone()]
    );
    assert!(inv[0].failed[0].starts_with("ID:"), "{:?}", inv[0].failed);
    assert_eq!(inv[1].bodies, ["msg-0003", "msg-0007"]);
    assert!(inv[1].failed.is_empty());
    assert_eq!(f.delivered().len(), 10);
    assert_eq!(amq.depth(&queue).await, 0);
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_only_the_batch_in_flight() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-kill");
    let f = Function::deploy("amq-kill", &[("SLEEP_MS", "20")]).await;
    amq.publish(&queue, &numbered(600)).await;
    let config = amq_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    );

    let gw = start(&config);
    f.wait_delivered(150, LONG).await;
    gw.kill9();
    let gw = start(&config);
    let delivered = wait_for("every message at least once", LONG, || {
        let d = f.delivered();
        (counts(&d).len() == 600).then_some(d)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let counts = counts(&delivered);
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.len() <= 10, "{duplicates:?}");
    assert!(counts.values().all(|&n| n <= 2));
    assert_eq!(amq.depth(&queue).await, 0);
}

/// The stack's broker, killed and started again; started again on drop too, so a
/// failing test never leaves it stopped.
struct BrokerRestart {
    pid: u32,
}

impl BrokerRestart {
    fn kill9() -> BrokerRestart {
        let pidfile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack/activemq.pid");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(12).any(|w| w == b"activemq.jar"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no broker of this checkout at {} (run `scripts/stack up` here)",
                    pidfile.display()
                )
            });
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        BrokerRestart { pid }
    }

    async fn start(self) {
        let proc = format!("/proc/{}", self.pid);
        wait_for("the broker to exit", LONG, || {
            (!std::path::Path::new(&proc).exists()).then_some(())
        })
        .await;
        // Drop starts it (`scripts/stack up` waits until it answers STOMP).
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack");
        let up = std::process::Command::new(script)
            .arg("up")
            .stdout(std::process::Stdio::null())
            .status();
        assert!(up.is_ok_and(|s| s.success()), "scripts/stack up failed");
    }
}

#[tokio::test]
async fn a_broker_restart_mid_stream_is_survived_without_loss() {
    let mut amq = Amq::connect().await;
    let queue = unique("esm-test-restart");
    let f = Function::deploy("amq-restart", &[("SLEEP_MS", "20")]).await;
    amq.publish(&queue, &numbered(400)).await;
    drop(amq);

    let gw = start(&amq_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    ));
    f.wait_delivered(50, LONG).await;
    BrokerRestart::kill9().start().await;
    gw.wait_log("ActiveMQ session ended", LONG).await;
    let delivered = wait_for("every message after the restart", LONG, || {
        let d = f.delivered();
        (counts(&d).len() == 400).then_some(d)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert!(counts(&delivered).values().all(|&n| n <= 2));
    let mut amq = Amq::connect().await;
    assert_eq!(amq.depth(&queue).await, 0);
}
