//! Destinations that reject a record for good: an SQS FIFO dead-letter queue (it needs a
//! message group and a deduplication id) and a Kafka producer whose `message.max.bytes`
//! is below the failure record. A permanent rejection must not block the mapping: the
//! record is kept whole in `payload_dir` and the mapping shows it is degraded. Also the
//! start-up warning for a dead-letter queue that keeps messages for less than 14 days.
//! Every record ends delivered, parked (in the destination or a fallback file), or still
//! in the RabbitMQ queue: nothing else.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);
const FALLBACK: &str = "kept the failure record in payload_dir instead";

/// The mapping keys of these tests: one record per batch, one retry, quick backoff.
fn keys(on_failure: &str) -> String {
    format!(
        "[mapping.batch]\nsize = 1\n\n[mapping.retry]\nmax_attempts = 1\nbackoff_min = \"10ms\"\nbackoff_max = \"100ms\"\n\n{on_failure}"
    )
}

/// A RabbitMQ queue holding msg-0000.., the recorder function deployed with `vars`, and
/// and a gateway on them whose `[mapping.on_failure]` is `on_failure` with a `payload_dir`
/// of its own.
struct Run {
    rabbit: Rabbit,
    queue: String,
    f: Function,
    payloads: PathBuf,
}

async fn start(
    prefix: &str,
    records: usize,
    vars: &[(&str, &str)],
    on_failure: &str,
) -> (Run, Gateway) {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue(prefix).await;
    let f = Function::deploy(prefix, vars).await;
    let payloads = f.dir.path().join("payloads");
    rabbit.publish(&queue, numbered(records)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &keys(&format!(
            "[mapping.on_failure]\n{on_failure}\npayload_dir = \"{}\"",
            payloads.display()
        )),
    ));
    (
        Run {
            rabbit,
            queue,
            f,
            payloads,
        },
        gw,
    )
}

impl Run {
    /// The rest of the count: msg-0002 was parked (checked by the caller), the other four
    /// were delivered, and none is left in the source.
    async fn all_but_the_poison_delivered(&self) {
        assert_eq!(
            self.f.delivered(),
            [0, 1, 3, 4].map(|i| format!("msg-{i:04}"))
        );
        assert_eq!(
            self.rabbit.ready(&self.queue).await,
            0,
            "nothing left in the source"
        );
        self.rabbit.delete(&self.queue).await;
    }
}

/// The whole failure records kept in `dir` by a fallback.
fn fallback_records(dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
        .collect()
}

/// Creates an SQS queue with one attribute set and returns its URL.
async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attribute: QueueAttributeName,
    value: &str,
) -> String {
    sqs.create_queue()
        .queue_name(name)
        .attributes(attribute, value)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

fn first_message_id(r: &Value) -> &str {
    r["RabbitMQBatchInfo"]["firstMessageId"].as_str().unwrap()
}

#[tokio::test]
async fn a_fifo_dead_letter_queue_gets_the_record_with_a_group_and_a_deduplication_id() {
    let sqs = sqs_client().await;
    let dlq = create_queue(
        &sqs,
        &format!("{}.fifo", unique("fdlq")),
        QueueAttributeName::FifoQueue,
        "true",
    )
    .await;
    let (r, gw) = start(
        "ffifo",
        5,
        &[("POISON", "msg-0002")],
        &format!("type = \"sqs\"\nqueue_url = \"{dlq}\""),
    )
    .await;
    // Batches of one run in order: msg-0003 is invoked only once msg-0002 is parked.
    r.f.wait_delivered(4, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let got = sqs
        .receive_message()
        .queue_url(&dlq)
        .max_number_of_messages(10)
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap();
    let in_dlq: Vec<Value> = got
        .messages()
        .iter()
        .map(|m| serde_json::from_str(m.body().unwrap()).unwrap())
        .collect();
    let fallen_back = fallback_records(&r.payloads);
    // Parked exactly once, in the FIFO queue (or, had it refused, in payload_dir).
    let parked: Vec<&str> = in_dlq
        .iter()
        .chain(&fallen_back)
        .map(first_message_id)
        .collect();
    assert_eq!(parked, ["id-msg-0002"]);
    assert_eq!(
        in_dlq.len(),
        1,
        "MiniStack takes FIFO messages with a group id"
    );
    r.all_but_the_poison_delivered().await;
}

#[tokio::test]
async fn a_record_above_the_kafka_producers_limit_is_kept_in_payload_dir_and_degrades_the_mapping()
{
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = unique("fbig");
    // The error message alone makes the failure record larger than the producer takes.
    let message = "e".repeat(3000);
    let (r, gw) = start(
        "fkafka",
        5,
        &[("POISON", "msg-0002"), ("ERROR_MESSAGE", &message)],
        &format!(
            "type = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\n\
             properties = {{ \"message.max.bytes\" = \"2000\" }}"
        ),
    )
    .await;
    r.f.wait_delivered(4, LONG).await;
    gw.wait_log(FALLBACK, LONG).await;
    let m = gw.mapping("test");
    assert!(
        m["degraded"]
            .as_str()
            .is_some_and(|d| d.contains(&*r.payloads.to_string_lossy())),
        "{m}"
    );
    let fallbacks = gw.metrics().value(
        "esm_gateway_destination_fallbacks_total",
        &[("mapping", "test")],
    );
    assert_eq!(fallbacks, 1.0);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .args(["status", "--admin", gw.admin.as_deref().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("running (degraded)"), "{table}");
    assert_eq!(gw.terminate().await.code(), Some(0));

    let kept = fallback_records(&r.payloads);
    assert_eq!(kept.len(), 1, "the record is kept whole, once");
    assert_eq!(first_message_id(&kept[0]), "id-msg-0002");
    assert_eq!(kept[0]["payload"]["eventSource"], "aws:rmq");
    assert!(kept[0]["error"].as_str().unwrap().ends_with(&message));
    r.all_but_the_poison_delivered().await;
}

#[tokio::test]
async fn a_dead_letter_queue_keeping_messages_for_a_minute_is_warned_about_at_start() {
    let dlq = create_queue(
        &sqs_client().await,
        &unique("fshort"),
        QueueAttributeName::MessageRetentionPeriod,
        "60",
    )
    .await;
    let (r, gw) = start(
        "fshort",
        1,
        &[],
        &format!("type = \"sqs\"\nqueue_url = \"{dlq}\""),
    )
    .await;
    gw.wait_log("keeps messages for less than 14 days", LONG)
        .await;
    let line = gw
        .logs
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("keeps messages for less than 14 days"))
        .cloned()
        .unwrap();
    assert!(
        line.contains(&dlq) && line.contains("retention_seconds=60"),
        "{line}"
    );
    r.f.wait_delivered(1, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(r.rabbit.ready(&r.queue).await, 0);
    assert!(fallback_records(&r.payloads).is_empty());
    r.rabbit.delete(&r.queue).await;
}
