//! Fault injection on the RabbitMQ source, against the local stack: what the broker lets
//! through (short strings that are not UTF-8) and what it does to a consumer (closing
//! its connection in the middle of a batch's retries) and what the network does (a
//! connection that goes silent, before or after its handshake). Every test counts every
//! message at the end: delivered, parked, or still in the queue.

mod common;

use std::process::Command;
use std::time::Duration;

use common::freezer::Freezer;
use common::*;

const LONG: Duration = Duration::from_secs(120);

/// Publishes through pika (the stack's Python), which sends `bytes` short strings as they
/// are: lapin cannot, its short strings are Rust strings. Each message is
/// `(body, message_id, header_name)`, the last two hex-encoded bytes; publisher confirms
/// make the call return only once the broker holds them all.
fn publish_raw(queue: &str, messages: &[(String, String, Option<String>)]) {
    const SCRIPT: &str = r#"
import json, sys, pika
queue, messages = sys.argv[1], json.loads(sys.argv[2])
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[3]))
ch = conn.channel()
ch.confirm_delivery()
for body, message_id, header in messages:
    headers = {bytes.fromhex(header): "value"} if header else None
    props = pika.BasicProperties(message_id=bytes.fromhex(message_id), delivery_mode=2, headers=headers)
    ch.basic_publish(exchange="", routing_key=queue, body=body.encode(), properties=props, mandatory=True)
conn.close()
"#;
    let python = std::env::var("STACK_PYTHON")
        .expect("STACK_PYTHON names the stack's Python with pika (eval \"$(scripts/stack env)\")");
    let messages = serde_json::to_string(messages).unwrap();
    run(&python, &["-c", SCRIPT, queue, &messages, &amqp_url()]);
}

/// Runs a program to success and returns its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A message as the harness publishes it: body `msg-NNNN`, message id `id-msg-NNNN`.
fn good(i: usize) -> (String, String, Option<String>) {
    let body = format!("msg-{i:04}");
    let id = hex(format!("id-{body}").as_bytes());
    (body, id, None)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `{"bytes": [...]}` of signed (Java) bytes the events use.
fn signed(bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({ "bytes": bytes.iter().map(|&b| b as i8).collect::<Vec<_>>() })
}

#[tokio::test]
async fn a_non_utf8_message_id_or_header_name_is_parked_with_its_bytes_and_the_queue_flows() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("nonutf8").await;
    let f = Function::deploy("nonutf8", &[]).await;
    let parked = f.dir.path().join("parked.jsonl");

    // 5 good, one whose message id is ff fe, 5 good, one with a header named ff fe 'n',
    // 5 good.
    let mut messages: Vec<_> = (0..17).map(good).collect();
    messages[5].1 = "fffe".into();
    messages[11].2 = Some("fffe6e".into());
    publish_raw(&queue, &messages);

    let name = unique("nonutf8");
    let config = gateway_header()
        + &rabbit_mapping(
            &name,
            &f.name,
            &queue,
            &format!(
                r#"
[mapping.batch]
size = 4
window = "100ms"

[mapping.on_failure]
type = "file"
path = "{}"
"#,
                parked.display()
            ),
        );
    let gw = Gateway::start(&config);

    let mut expected = numbered_strings(0..17);
    expected.retain(|b| b != "msg-0005" && b != "msg-0011");
    let delivered = f.wait_delivered(15, LONG).await;
    assert_eq!(delivered, expected, "every good message once, in order");
    let records = wait_for("two failure records", LONG, || {
        let r = failure_records(&parked);
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert_eq!(records.len(), 2, "{records:#?}");

    // Each is parked alone, without an invoke, with the bytes the event cannot carry.
    let key = format!("{queue}::/");
    for (r, body, field, bytes) in [
        (
            &records[0],
            "msg-0005",
            "basicProperties.messageId",
            &[0xff, 0xfe][..],
        ),
        (
            &records[1],
            "msg-0011",
            "basicProperties.headers",
            &[0xff, 0xfe, b'n'][..],
        ),
    ] {
        assert_eq!(r["requestContext"]["condition"], "UndecodableRecord", "{r}");
        assert_eq!(r["requestContext"]["approximateInvokeCount"], 0, "{r}");
        let msgs = r["payload"]["rmqMessagesByQueue"][&key].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{r}");
        let data = base64_simd::STANDARD
            .decode_to_vec(msgs[0]["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(data, body.as_bytes());
        let raw = msgs[0]["undecodable"].as_array().unwrap();
        assert_eq!(raw.len(), 1, "{r}");
        assert_eq!(raw[0]["field"], field, "{r}");
        assert_eq!(raw[0]["raw"], signed(bytes), "{r}");
        assert!(
            r["error"].as_str().unwrap().contains("not valid UTF-8"),
            "{r}"
        );
    }
    let invoked: usize = f.invocations().iter().map(|i| i.bodies.len()).sum();
    assert_eq!(invoked, 15, "the undecodable messages were never invoked");
    let metrics = gw.metrics();
    let parked_metric = |condition| {
        metrics.value(
            "esm_gateway_records_dead_lettered_total",
            &[("mapping", &name), ("condition", condition)],
        )
    };
    assert_eq!(parked_metric("UndecodableRecord"), 2.0);
    assert_eq!(parked_metric("RetryAttemptsExhausted"), 0.0);

    assert_eq!(
        gw.log_count("RabbitMQ session ended"),
        0,
        "the connection was never dropped"
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    // 15 delivered + 2 parked + 0 in the queue = 17.
    assert_eq!(rabbit.ready(&queue).await, 0, "the queue ends empty");
    rabbit.delete(&queue).await;
}

/// The broker's id of the one connection of the gateway process `pid` (its connections
/// are named "esm-gateway[<pid>] <purpose> #<n>").
fn gateway_connection(pid: u32) -> Option<String> {
    let mut ids = gateway_connections(pid).into_iter();
    let id = ids.next()?;
    assert!(ids.next().is_none(), "one connection for one mapping");
    Some(id)
}

#[tokio::test]
async fn a_batch_whose_connection_the_broker_closed_is_not_invoked_again() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("chandeath").await;
    let f = Function::deploy("chandeath", &[("POISON", "msg-0000,msg-0001,msg-0002")]).await;
    rabbit.publish(&queue, numbered(3)).await;

    let name = unique("chandeath");
    let config = gateway_header()
        + &rabbit_mapping(
            &name,
            &f.name,
            &queue,
            r#"
[mapping.batch]
size = 10
window = "100ms"

[mapping.retry]
max_attempts = -1
backoff_min = "50ms"
backoff_max = "100ms"
"#,
        );
    let gw = Gateway::start(&config);
    // The first delivery is being retried. Its retries say `redelivered`, as the
    // broker's redelivery would (AWS's behaviour), so the sessions are told apart by the
    // gateway's log instead: each session logs "consuming" once it has its consumer.
    let sessions = |gw: &Gateway| {
        gw.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("consuming"))
            .count()
    };
    wait_for("three invokes of the first delivery", LONG, || {
        (f.invocations().len() >= 3).then_some(())
    })
    .await;
    let inv = f.invocations();
    assert!(inv[0].redelivered.iter().all(|r| !r), "a first delivery");
    assert!(
        inv[1..].iter().all(|i| i.redelivered.iter().all(|r| *r)),
        "its retries look like redeliveries"
    );
    assert_eq!(sessions(&gw), 1);

    let pid = wait_for("the gateway's connection in rabbitmqctl", LONG, || {
        gateway_connection(gw.pid())
    })
    .await;
    run(
        "rabbitmqctl",
        &[
            "close_connection",
            &pid,
            "fault test closes the gateway's connection",
        ],
    );

    // The batch is given up once its channel is gone: nothing is invoked between that
    // and the next session's consumer ...
    gw.wait_log("channel closed during the batch", LONG).await;
    let at_close = f.invocations().len();
    let at_reconnect = wait_for("the next session", LONG, || {
        (sessions(&gw) >= 2).then(|| f.invocations().len())
    })
    .await;
    assert_eq!(
        at_reconnect, at_close,
        "the first delivery was not invoked after its channel closed"
    );
    // ... and the broker's redelivery, on the next session, is what gets retried.
    wait_for("three invokes of the redelivery", LONG, || {
        (f.invocations().len() >= at_close + 3).then_some(())
    })
    .await;
    assert!(
        f.invocations()[at_close..]
            .iter()
            .all(|i| i.redelivered.iter().all(|r| *r)),
        "the broker redelivered them"
    );
    assert!(
        f.invocations().iter().all(|i| i.bodies.len() == 3),
        "one batch, whole, each time"
    );

    assert_eq!(gw.terminate().await.code(), Some(0));
    // Nothing delivered or parked (the function always fails, retries are forever):
    // all 3 are back in the queue.
    assert!(f.delivered().is_empty());
    assert_eq!(
        rabbit.ready(&queue).await,
        3,
        "every message is back in the queue"
    );
    rabbit.delete(&queue).await;
}

/// A proxy to the local broker that can silence connections, and the AMQP URL through it.
fn silencing_proxy() -> (Freezer, String) {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("an AMQP URL");
    let (credentials, rest) = rest.split_once('@').expect("credentials in the AMQP URL");
    let (upstream, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let proxy = Freezer::start(upstream, b"AMQP");
    let through = format!("{scheme}://{credentials}@127.0.0.1:{}/{vhost}", proxy.port);
    (proxy, through)
}

/// The messages came through a connection opened after the silenced one, and the
/// gateway closed the silenced one rather than leave it open.
async fn assert_reconnected_and_closed_the_silent_one(proxy: &Freezer) {
    assert!(
        proxy.accepted() >= 2,
        "delivered on a connection opened after"
    );
    wait_for("the gateway closed the silent connection", LONG, || {
        (proxy.silenced_still_open() == 0).then_some(())
    })
    .await;
}

/// Every one of `published` was delivered (a message whose ack the silence swallowed may
/// be delivered twice, marked redelivered) and none is left in the queue.
async fn assert_all_delivered_none_left(
    f: &Function,
    rabbit: &Rabbit,
    queue: &str,
    published: usize,
) {
    let mut delivered = f.delivered();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered, numbered_strings(0..published), "each delivered");
    assert_eq!(rabbit.ready(queue).await, 0, "nothing left in the queue");
}

#[tokio::test]
async fn a_broker_that_never_answers_the_handshake_is_given_up_and_the_queue_drains() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("silenthello").await;
    let f = Function::deploy("silenthello", &[]).await;
    let (proxy, url) = silencing_proxy();
    // The gateway's first connection reaches a peer that takes its bytes and never
    // answers, as behind a load balancer whose broker hangs.
    proxy.freeze_new(true);
    let config = gateway_header()
        + &rabbit_mapping(&unique("silenthello"), &f.name, &queue, "").replace(&amqp_url(), &url);
    let gw = Gateway::start(&config);
    wait_for("the gateway's first connection", LONG, || {
        (proxy.accepted() >= 1).then_some(())
    })
    .await;
    proxy.freeze_new(false);
    rabbit.publish(&queue, numbered(20)).await;

    f.wait_delivered(20, LONG).await;
    assert_reconnected_and_closed_the_silent_one(&proxy).await;
    // Giving up is routine, told once as the session's warning: not as errors of the
    // AMQP client, which an operator would read as a fault of their broker.
    assert!(
        gw.log_contains("no answer within 10s"),
        "the give-up is logged"
    );
    let errors = gw.log_lines_containing(" ERROR ");
    assert!(errors.is_empty(), "no error logged: {errors:?}");
    assert_eq!(gw.terminate().await.code(), Some(0));
    let delivered = f.delivered();
    assert_eq!(delivered.len(), 20, "each once: {delivered:?}");
    assert_all_delivered_none_left(&f, &rabbit, &queue, 20).await;
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_connection_gone_silent_is_given_up_on_its_heartbeat_and_the_queue_drains() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("silentlater").await;
    let f = Function::deploy("silentlater", &[]).await;
    let (proxy, url) = silencing_proxy();
    let config = gateway_header()
        + &rabbit_mapping(&unique("silentlater"), &f.name, &queue, "").replace(&amqp_url(), &url);
    let gw = Gateway::start(&config);
    rabbit.publish(&queue, numbered(10)).await;
    f.wait_delivered(10, LONG).await;

    // Neither side hears from the other from now on, and neither sees a close: the
    // broker keeps sending the next messages down the silent connection until it gives
    // up on it, the gateway waits on it until its heartbeat says it is gone.
    assert!(proxy.freeze_all() >= 1);
    rabbit.publish(&queue, numbered(20).split_off(10)).await;

    // Within two of the gateway's default heartbeat intervals (10 s) each, and well
    // before two of the broker's (60 s) would end it.
    f.wait_delivered(20, Duration::from_secs(60)).await;
    assert_reconnected_and_closed_the_silent_one(&proxy).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_all_delivered_none_left(&f, &rabbit, &queue, 20).await;
    rabbit.delete(&queue).await;
}

/// The messages in `queue`, ready and unacknowledged alike, as `rabbitmqctl` counts them
/// (it answers while publishers are blocked).
fn messages(queue: &str) -> Option<u32> {
    let out = run("rabbitmqctl", &["list_queues", "-q", "name", "messages"]);
    out.lines().find_map(|l| {
        let (name, count) = l.split_once(char::is_whitespace)?;
        (name == queue).then(|| count.trim().parse().ok())?
    })
}

/// RabbitMQ's memory alarm, raised (the broker blocks every publishing connection) until
/// dropped, a failed assertion included: then the watermark is set back as it was.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let now = run(
            "rabbitmqctl",
            &["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
        );
        let watermark = now.trim().to_owned();
        assert!(
            watermark.parse::<f64>().is_ok_and(|w| w > 0.0),
            "a relative watermark to restore: {watermark:?}"
        );
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        MemoryAlarm { watermark }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.watermark]);
    }
}

#[tokio::test]
async fn a_memory_alarm_blocking_a_parking_publish_does_not_stop_other_mappings_acking() {
    let rabbit = Rabbit::connect().await;
    let failing = rabbit.queue("alarmpark").await;
    let healthy = rabbit.queue("alarmflow").await;
    let parked = rabbit.queue("alarmparked").await;
    let fa = Function::deploy("alarmpark", &[("POISON", "msg-0000")]).await;
    let fb = Function::deploy("alarmflow", &[]).await;
    rabbit.publish(&failing, numbered(1)).await;
    rabbit.publish(&healthy, numbered(300)).await;

    // From now on the broker blocks a connection as soon as it publishes, and stops
    // reading from it: acks sent on it wait too.
    let alarm = MemoryAlarm::raise();
    let config = gateway_header()
        + &rabbit_mapping(
            &unique("alarmpark"),
            &fa.name,
            &failing,
            &format!(
                r#"
[mapping.batch]
size = 1

[mapping.retry]
max_attempts = 0

[mapping.on_failure]
type = "rabbitmq"
url = "{}"
exchange = ""
routing_key = "{parked}"
"#,
                amqp_url()
            ),
        )
        + &rabbit_mapping(
            &unique("alarmflow"),
            &fb.name,
            &healthy,
            "[mapping.batch]\nsize = 10\nwindow = \"50ms\"",
        );
    let gw = Gateway::start(&config);
    // The failing record's parking waits for the alarm to end; the healthy queue, whose
    // mapping publishes nothing, drains meanwhile, its acks landing.
    fb.wait_delivered(300, Duration::from_secs(60)).await;
    // Bounded well inside the test's time limit, so that a failure still lowers the alarm.
    wait_for(
        "the healthy queue acknowledged",
        Duration::from_secs(60),
        || (messages(&healthy) == Some(0)).then_some(()),
    )
    .await;
    drop(alarm);

    // The count, once the alarm is over: the failing record parked, the rest delivered
    // once, no queue holding anything but the parked one.
    wait_for("the failing record parked", Duration::from_secs(60), || {
        (messages(&parked) == Some(1)).then_some(())
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert!(fa.delivered().is_empty());
    let mut delivered = fb.delivered();
    delivered.sort();
    assert_eq!(delivered, numbered_strings(0..300), "each delivered once");
    assert_eq!(rabbit.ready(&failing).await, 0);
    assert_eq!(rabbit.ready(&healthy).await, 0);
    for q in [&failing, &healthy, &parked] {
        rabbit.delete(q).await;
    }
}
