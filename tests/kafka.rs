//! End to end against the local stack's Kafka-protocol broker (Tansu): topics drained by
//! the gateway binary into a Python function in MiniStack. Faults that need a broker to
//! misbehave use librdkafka's own mock cluster.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const LONG: Duration = Duration::from_secs(180);

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn create_topic(bootstrap: &str, prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let r = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic (is `scripts/stack up` running?)");
    assert!(r[0].is_ok(), "{r:?}");
    name
}

/// One record to produce: partition, key, value, headers.
struct Rec {
    partition: i32,
    key: Option<String>,
    value: String,
    /// Names are bytes: a name need not be UTF-8.
    headers: Vec<(&'static [u8], Vec<u8>)>,
}

fn rec(partition: i32, key: &str, value: String) -> Rec {
    Rec {
        partition,
        key: Some(key.to_owned()),
        value,
        headers: Vec::new(),
    }
}

async fn produce(bootstrap: &str, topic: &str, records: Vec<Rec>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for r in &records {
        let headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            // rdkafka's `Header` only takes UTF-8 names; librdkafka takes any bytes.
            // SAFETY: an `&BorrowedHeaders` is the address of librdkafka's header list
            // (that is how rdkafka makes one), which `headers` owns and shares with no
            // one yet.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_header_add(
                    headers.as_borrowed() as *const _ as *mut rdkafka::bindings::rd_kafka_headers_t,
                    name.as_ptr().cast(),
                    name.len() as isize,
                    value.as_ptr().cast(),
                    value.len() as isize,
                )
            };
            assert_eq!(err, RD_KAFKA_RESP_ERR_NO_ERROR, "header added");
        }
        let mut fr = FutureRecord::to(topic)
            .partition(r.partition)
            .payload(&r.value)
            .headers(headers);
        if let Some(k) = &r.key {
            fr = fr.key(k);
        }
        pending.push(producer.send_result(fr).expect("queue record"));
        if pending.len() >= 5_000 {
            for f in pending.drain(..) {
                f.await.unwrap().expect("record delivered");
            }
        }
    }
    for f in pending {
        f.await.unwrap().expect("record delivered");
    }
}

fn kafka_config(bootstrap: &str, function: &str, topic: &str, group: &str, extra: &str) -> String {
    kafka_config_from(
        bootstrap,
        function,
        topic,
        group,
        extra,
        r#""trim_horizon""#,
    )
}

/// [`kafka_config`] with `start` as the value of `starting_position` (TOML, and any
/// further lines of the source table, such as `starting_timestamp`).
fn kafka_config_from(
    bootstrap: &str,
    function: &str,
    topic: &str,
    group: &str,
    extra: &str,
    start: &str,
) -> String {
    gateway_header()
        + &mapping(
            "test",
            function,
            extra,
            &format!(
                r#"type = "kafka"
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "{group}"
starting_position = {start}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}
"#
            ),
        )
}

/// A function `prefix` fed by a gateway draining `topic` from its start in batches of up
/// to 100 (100 ms window), once `n` records reached it and the gateway has stopped.
async fn drain_into(prefix: &str, b: &str, topic: &str, n: usize) -> Function {
    let f = Function::deploy(prefix, &[]).await;
    let gw = Gateway::start(&kafka_config(
        b,
        &f.name,
        topic,
        &unique("g"),
        "[mapping.batch]\nsize = 100\nwindow = \"100ms\"",
    ));
    f.wait_delivered(n, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    f
}

/// The successful deliveries of each partition, in delivery order, as offsets.
fn delivered_by_partition(f: &Function) -> BTreeMap<i64, Vec<i64>> {
    let mut out: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for line in std::fs::read_to_string(f.log_path())
        .unwrap_or_default()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["ok"] != true {
            continue;
        }
        let failed: Vec<String> = serde_json::from_value(v["failed"].clone()).unwrap();
        for (p, o) in v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .zip(v["offsets"].as_array().unwrap())
        {
            if !failed.contains(&o.to_string()) {
                out.entry(p.as_i64().unwrap())
                    .or_default()
                    .push(o.as_i64().unwrap());
            }
        }
    }
    out
}

#[tokio::test]
async fn eight_partitions_of_keyed_records_arrive_in_partition_order() {
    let b = bootstrap();
    let topic = create_topic(&b, "order", 8).await;
    let records = (0..40_000)
        .map(|i| rec(i % 8, &format!("key-{}", i % 97), format!("r-{i}")))
        .collect();
    produce(&b, &topic, records).await;
    let f = drain_into("korder", &b, &topic, 40_000).await;

    let by_partition = delivered_by_partition(&f);
    assert_eq!(by_partition.len(), 8);
    for (p, offsets) in &by_partition {
        // First deliveries in strictly increasing offset order, every offset present.
        let mut firsts = offsets.clone();
        let mut seen = std::collections::HashSet::new();
        firsts.retain(|o| seen.insert(*o));
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of order"
        );
        assert_eq!(
            firsts,
            (0..5_000).collect::<Vec<_>>(),
            "partition {p} incomplete"
        );
    }
    assert!(f.invocations().iter().all(|i| i.bodies.len() <= 100));
}

#[tokio::test]
async fn record_batches_larger_than_a_fetch_response_arrive_whole_and_in_order() {
    // The gateway asks for fetch responses of at most 256 KiB; the producer packs these
    // 300 KB records into record batches of up to 1 MB (its `batch.size`), which the
    // broker must send whole, alone in a response, or the partition would never move.
    let b = bootstrap();
    let topic = create_topic(&b, "bigbatch", 1).await;
    let value = |i: usize| format!("big-{i}-") + &"x".repeat(300_000);
    produce(&b, &topic, (0..8).map(|i| rec(0, "k", value(i))).collect()).await;
    let f = drain_into("kbigbatch", &b, &topic, 8).await;
    let delivered = f.delivered();
    assert_eq!(delivered.len(), 8, "each record once");
    for (i, v) in delivered.iter().enumerate() {
        assert!(v == &value(i), "record {i} whole and in order");
    }
}

#[tokio::test]
async fn a_poison_record_stalls_only_its_partition_then_is_parked() {
    let b = bootstrap();
    let topic = create_topic(&b, "poison", 4).await;
    let records = (0..400)
        .map(|i| rec(i % 4, "k", format!("p{}-{}", i % 4, i / 4)))
        .collect();
    produce(&b, &topic, records).await;
    let f = Function::deploy("kpoison", &[("POISON", "p3-50")]).await;
    let parked = f.dir.path().join("parked.jsonl");
    let gw = Gateway::start(&kafka_config(
        &b,
        &f.name,
        &topic,
        &unique("g"),
        &format!(
            r#"
[mapping.batch]
size = 10
window = "100ms"

[mapping.retry]
max_attempts = 3
backoff_min = "1s"
backoff_max = "1s"

[mapping.on_failure]
type = "file"
path = "{}"
"#,
            parked.display()
        ),
    ));
    wait_for("the parked batch", LONG, || {
        let r = failure_records(&parked);
        (!r.is_empty()).then_some(())
    })
    .await;
    f.wait_delivered(390, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let records = failure_records(&parked);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 4);
    // AWS's KafkaBatchInfo: offsets as strings, under recordsInfo by topic-partition.
    let info = &r["KafkaBatchInfo"];
    assert_eq!(info["batchSize"], 10);
    assert_eq!(info["bootstrapServers"], b);
    assert!(info["payloadSize"].as_u64().unwrap() > 0, "{info}");
    assert!(
        info["eventSourceArn"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:lambda:"),
        "{info}"
    );
    let ranges = &info["recordsInfo"][format!("{topic}-3")];
    assert_eq!(ranges["firstRecordOffset"], "50");
    assert_eq!(ranges["lastRecordOffset"], "59");
    assert!(ranges["firstRecordTimestamp"].is_string(), "{ranges}");
    assert_eq!(
        r["payload"]["records"][format!("{topic}-3")]
            .as_array()
            .unwrap()
            .len(),
        10
    );

    // The other partitions never waited on partition 3: whatever of them was still to
    // deliver when its retries began went on while it retried.
    let inv = f.invocations();
    let is_other = |i: &Invocation| i.bodies.iter().any(|b| !b.starts_with("p3-"));
    let first_poison = inv.iter().position(|i| !i.ok).unwrap();
    let last_poison = inv.iter().rposition(|i| !i.ok).unwrap();
    let others_left = inv[first_poison..].iter().filter(|i| is_other(i)).count();
    let others_during = inv[first_poison..last_poison]
        .iter()
        .filter(|i| is_other(i))
        .count();
    assert!(
        others_left == 0 || others_during > 0,
        "partitions 0-2 waited for partition 3's retries ({first_poison}..{last_poison})"
    );
    let by_partition = delivered_by_partition(&f);
    assert_eq!(
        by_partition[&3],
        (0..50).chain(60..100).collect::<Vec<_>>(),
        "partition 3 resumed after the parked batch"
    );
    for p in 0..3 {
        assert_eq!(by_partition[&p], (0..100).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn kill_9_and_restart_loses_nothing() {
    let b = bootstrap();
    let topic = create_topic(&b, "kill", 2).await;
    let records = (0..2_000)
        .map(|i| rec(i % 2, "k", format!("r-{i}")))
        .collect();
    produce(&b, &topic, records).await;
    let f = Function::deploy("kkill", &[("SLEEP_MS", "20")]).await;
    let group = unique("g");
    let config = kafka_config(
        &b,
        &f.name,
        &topic,
        &group,
        "[mapping.batch]\nsize = 20\nwindow = \"100ms\"",
    );
    let gw = Gateway::start(&config);
    f.wait_delivered(300, LONG).await;
    gw.kill9();
    let gw = Gateway::start(&config);
    let delivered = wait_for("every record at least once", LONG, || {
        let d = f.delivered();
        let mut u = d.clone();
        u.sort();
        u.dedup();
        (u.len() == 2_000).then_some(d)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for d in delivered {
        *counts.entry(d).or_default() += 1;
    }
    let dups = counts.values().filter(|&&n| n > 1).count();
    // At most the batch in flight on each partition, plus what was delivered after the
    // last commit (commits follow every batch, within 10 ms).
    assert!(dups <= 2 * 20 * 2, "{dups} duplicates");
}

#[tokio::test]
async fn headers_with_non_ascii_bytes_arrive_as_signed_byte_arrays() {
    let b = bootstrap();
    let topic = create_topic(&b, "headers", 1).await;
    produce(
        &b,
        &topic,
        vec![Rec {
            partition: 0,
            key: None,
            value: "with-headers".into(),
            headers: vec![
                (b"accent", "ë".as_bytes().to_vec()),
                (b"raw", vec![0, 127, 128, 255]),
            ],
        }],
    )
    .await;
    let f = Function::deploy("kheaders", &[("LOG_EVENT", "1")]).await;
    let gw = Gateway::start(&kafka_config(&b, &f.name, &topic, &unique("g"), ""));
    f.wait_delivered(1, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let event = f.invocations()[0].event.clone().unwrap();
    let r = &event["records"][format!("{topic}-0")][0];
    assert_eq!(
        r["headers"],
        serde_json::json!([{"accent": [-61, -85]}, {"raw": [0, 127, -128, -1]}])
    );
    assert!(r.get("key").is_none(), "a null key is left out: {r}");
    assert_eq!(event["bootstrapServers"], b);
    // And it parses as aws_lambda_events' type.
    let parsed: aws_lambda_events::event::kafka::KafkaEvent =
        serde_json::from_value(event).unwrap();
    assert_eq!(
        parsed.records[&format!("{topic}-0")][0].headers[0]["accent"],
        vec![-61i8, -85]
    );
}

#[tokio::test]
async fn two_gateways_split_the_partitions_and_one_takes_over_when_the_other_dies() {
    let b = bootstrap();
    let topic = create_topic(&b, "group", 4).await;
    let records = (0..2_000)
        .map(|i| rec(i % 4, "k", format!("r-{i}")))
        .collect();
    produce(&b, &topic, records).await;
    let f = Function::deploy("kgroup", &[("SLEEP_MS", "20")]).await;
    let group = unique("g");
    // Each gateway gets its own config, and so its own admin port.
    let config = || member_config(&b, &f, &topic, &group, 10);

    let first = Gateway::start(&config());
    first.wait_log("partition assigned", LONG).await;
    let second = Gateway::start(&config());
    // Cooperative rebalancing hands some partitions to the second member.
    second.wait_log("partition assigned", LONG).await;
    let assigned = |gw: &Gateway| {
        gw.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("partition assigned"))
            .count()
    };
    assert!(
        assigned(&second) < 4,
        "the second member took only part of the topic"
    );
    f.wait_delivered(400, LONG).await;

    first.kill9();
    // After the dead member's session times out, the survivor owns all four.
    wait_for("the survivor to own every partition", LONG, || {
        (assigned(&second) >= 4).then_some(())
    })
    .await;
    wait_for("every record at least once", LONG, || {
        let mut d = f.delivered();
        d.sort();
        d.dedup();
        (d.len() == 2_000).then_some(())
    })
    .await;
    assert_eq!(second.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn the_gateway_waits_out_a_broker_outage_and_resumes() {
    let (mock, b, topic) = mock_topic("outage", 1);
    produce(
        &b,
        &topic,
        (0..50)
            .map(|i| rec(0, "k", format!("before-{i}")))
            .collect(),
    )
    .await;
    let f = Function::deploy("koutage", &[]).await;
    let gw = start_draining(&b, &f, &topic, &unique("g"), r#""trim_horizon""#);
    f.wait_delivered(50, LONG).await;

    mock.broker_down(-1).unwrap();
    // The outage itself is the scenario: thirty seconds without a broker.
    tokio::time::sleep(Duration::from_secs(30)).await;
    mock.broker_up(-1).unwrap();
    produce(
        &b,
        &topic,
        (0..50).map(|i| rec(0, "k", format!("after-{i}"))).collect(),
    )
    .await;

    let delivered = wait_for("all 100 records at least once", LONG, || {
        let d = f.delivered();
        let unique: std::collections::HashSet<&String> = d.iter().collect();
        (unique.len() == 100).then_some(d.clone())
    })
    .await;
    let mut expected: Vec<String> = (0..50).map(|i| format!("before-{i}")).collect();
    expected.extend((0..50).map(|i| format!("after-{i}")));
    // At least once, in order: a rebalance during the outage may replay what was
    // delivered after the last commit that reached the broker.
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<String> = delivered
        .into_iter()
        .filter(|d| seen.insert(d.clone()))
        .collect();
    assert_eq!(firsts, expected);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// A topic on a fresh librdkafka mock broker (for what Tansu does not do as Kafka
/// does), and the broker's bootstrap address. The cluster lives as long as the guard.
fn mock_topic(
    prefix: &str,
    partitions: i32,
) -> (
    rdkafka::mocking::MockCluster<'static, DefaultProducerContext>,
    String,
    String,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = unique(prefix);
    mock.create_topic(&topic, partitions, 1).unwrap();
    let b = mock.bootstrap_servers();
    (mock, b, topic)
}

/// `n` records `{prefix}-{i}`, spread over `partitions` round robin.
async fn produce_numbered(b: &str, topic: &str, partitions: i32, prefix: &str, n: i32) {
    let records = (0..n)
        .map(|i| rec(i % partitions, "k", format!("{prefix}-{i}")))
        .collect();
    produce(b, topic, records).await;
}

/// The gateway draining `topic` into `f`, in batches gathered for at most 100 ms.
fn start_draining(b: &str, f: &Function, topic: &str, group: &str, start: &str) -> Gateway {
    Gateway::start(&kafka_config_from(
        b,
        &f.name,
        topic,
        group,
        "[mapping.batch]\nwindow = \"100ms\"",
        start,
    ))
}

/// The config of one member of `group`, with batches of `size` gathered for at most
/// 100 ms (each call gets its own admin port).
fn member_config(b: &str, f: &Function, topic: &str, group: &str, size: usize) -> String {
    kafka_config(
        b,
        &f.name,
        topic,
        group,
        &format!("[mapping.batch]\nsize = {size}\nwindow = \"100ms\""),
    )
}

/// The records' values, each once, sorted.
fn delivered_once(f: &Function) -> Vec<String> {
    let mut d = f.delivered();
    d.sort();
    d.dedup();
    d
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_header_name_that_is_not_utf8_neither_kills_nor_stalls_its_partition() {
    let b = bootstrap();
    let topic = create_topic(&b, "rawname", 1).await;
    let mut records: Vec<Rec> = (0..11).map(|i| rec(0, "k", format!("r-{i}"))).collect();
    records[5].headers = vec![(b"\xff\xfe", b"v".to_vec()), (b"ok", b"v".to_vec())];
    produce(&b, &topic, records).await;
    let f = Function::deploy("krawname", &[("LOG_EVENT", "1")]).await;
    let gw = start_draining(&b, &f, &topic, &unique("g"), r#""trim_horizon""#);
    // Before the fix the partition's task panicked on this record: the first five
    // arrived and then nothing, with the mapping still "running".
    f.wait_delivered(11, Duration::from_secs(60)).await;
    let metrics = gw.metrics();
    // The operator gets the raw bytes, and where they are.
    let warned = gw.log_contains("header_name_hex=fffe");
    let at = gw.log_contains("offset=5 header_name_hex");
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Every record delivered once; nothing parked (there is no destination) and
    // nothing left behind.
    assert_eq!(delivered_once(&f), values("r", 11));
    let element = f
        .invocations()
        .iter()
        .filter_map(|i| i.event.clone())
        .flat_map(|e| {
            e["records"][format!("{topic}-0")]
                .as_array()
                .cloned()
                .unwrap()
        })
        .find(|r| r["offset"] == 5)
        .expect("offset 5 in an event");
    // The name as AWS's (Java) trigger decodes it, every invalid byte replaced; the
    // value untouched.
    assert_eq!(
        element["headers"],
        serde_json::json!([{"\u{fffd}\u{fffd}": [118]}, {"ok": [118]}])
    );
    assert_eq!(
        metrics.value(
            "esm_gateway_kafka_header_names_replaced_total",
            &[("mapping", "test")]
        ),
        1.0
    );
    assert!(
        warned && at,
        "a warning names the raw header name and its record"
    );
}

#[tokio::test]
async fn an_out_of_range_committed_offset_resumes_at_the_earliest_record_not_the_end() {
    // Tansu 0.6 answers a fetch past the end with no records rather than
    // OFFSET_OUT_OF_RANGE; librdkafka's mock broker answers as Kafka does.
    let (_mock, b, topic) = mock_topic("range", 1);
    produce_numbered(&b, &topic, 1, "r", 20).await;
    // The group's committed offset lies past the end of the log, as after an outage
    // longer than the topic's retention.
    let group = unique("g");
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(1_000))
        .unwrap();
    committer.commit(&tpl, CommitMode::Sync).unwrap();
    drop(committer);

    let f = Function::deploy("krange", &[]).await;
    // `latest` is for a group without a committed offset: this one has one.
    let gw = start_draining(&b, &f, &topic, &group, r#""latest""#);
    // Before the fix the reset went to the end: nothing arrived.
    f.wait_delivered(20, Duration::from_secs(60)).await;
    let metrics = gw.metrics();
    let logged = gw.log_contains("committed offset out of range");
    assert_eq!(gw.terminate().await.code(), Some(0));

    assert_eq!(delivered_once(&f), values("r", 20));
    assert_eq!(
        metrics.value(
            "esm_gateway_kafka_offset_resets_total",
            &[("mapping", "test")]
        ),
        1.0
    );
    assert!(logged, "the reset is logged");
}

#[tokio::test]
async fn at_timestamp_after_the_last_record_starts_at_the_end_without_a_gap_or_a_loop() {
    // Tansu 0.6 answers every time query with offset 0; librdkafka's mock broker finds
    // no record for any time, as Kafka does for a time after the last record.
    let (_mock, b, topic) = mock_topic("future", 2);
    // Older than the starting timestamp: these stay in the broker.
    produce_numbered(&b, &topic, 2, "old", 10).await;
    let f = Function::deploy("kfuture", &[]).await;
    let at = humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(3_600));
    let gw = start_draining(
        &b,
        &f,
        &topic,
        &unique("g"),
        &format!("\"at_timestamp\"\nstarting_timestamp = \"{at}\""),
    );
    // Before the fix the consumer failed and reconnected forever: nothing was assigned.
    gw.wait_log_count("partition assigned", 2, Duration::from_secs(60))
        .await;
    // Produced after the seek (and so before the timestamp, too): each is delivered.
    produce_numbered(&b, &topic, 2, "new", 10).await;
    f.wait_delivered(10, LONG).await;
    let failures = gw.log_count("Kafka consumer failed");
    assert_eq!(gw.terminate().await.code(), Some(0));

    // The ten new records delivered, the ten old ones still in the broker.
    assert_eq!(delivered_once(&f), values("new", 10));
    assert_eq!(failures, 0, "the consumer never failed and reconnected");
}

#[tokio::test]
async fn a_partition_revoked_during_a_slow_invoke_never_commits_behind_its_new_owner() {
    let b = bootstrap();
    let topic = create_topic(&b, "revoke", 2).await;
    produce_numbered(&b, &topic, 2, "r", 40).await;
    // Each partition's first batch takes 12 s, far past the revoke deadline (3 s, half
    // the session timeout); every other invoke is quick.
    let f = Function::deploy("krevoke", &[("SLOW_ONCE", "r-0,r-1"), ("SLOW_MS", "12000")]).await;
    let group = unique("g");
    let config = || member_config(&b, &f, &topic, &group, 5);
    let first = Gateway::start(&config());
    for marker in ["slow-r-0", "slow-r-1"] {
        let path = f.dir.path().join(marker);
        wait_for("both slow batches in flight", LONG, || {
            path.exists().then_some(())
        })
        .await;
    }
    // A second member: one partition leaves the first while its slow batch runs on.
    let second = Gateway::start(&config());
    second.wait_log("partition assigned", LONG).await;
    // Everything delivered, and the first member has finished both slow batches (and
    // the three quick ones of the partition it kept): the revoked one's late position
    // is what must not reach the broker.
    wait_for("every record, and the revoked batch finished", LONG, || {
        (delivered_once(&f).len() == 40 && first.log_count("batch delivered") >= 5).then_some(())
    })
    .await;
    assert_eq!(first.terminate().await.code(), Some(0));

    // Both partitions committed at their end, the new owner's position: nothing left in
    // the broker to deliver, nothing moved back.
    let (_, offsets) = committed(&b, &group, &topic, 2);
    assert_eq!(offsets, vec![Offset::Offset(20), Offset::Offset(20)]);
    assert_eq!(second.terminate().await.code(), Some(0));
    assert_eq!(delivered_once(&f), values("r", 40));
}

#[tokio::test]
async fn a_lane_that_panics_fails_the_mapping_and_its_partition_restarts_where_it_was() {
    let b = bootstrap();
    let topic = create_topic(&b, "panic", 1).await;
    produce_numbered(&b, &topic, 1, "r", 20).await;
    let f = Function::deploy("kpanic", &[]).await;
    // The lane that takes the batch holding offset 7 panics (debug builds only).
    let gw = Gateway::start_with_env(
        &member_config(&b, &f, &topic, &unique("g"), 5),
        &[("ESM_GATEWAY_TEST_PANIC_AT", "7")],
    );
    gw.wait_log("partition task panicked", LONG).await;
    f.wait_delivered(20, LONG).await;
    let metrics = gw.metrics();
    let mapping = gw.mapping("test");
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Every record delivered: the batch the panic abandoned was read again.
    assert_eq!(delivered_once(&f), values("r", 20));
    assert_eq!(
        metrics.value(
            "esm_gateway_kafka_partition_restarts_total",
            &[("mapping", "test")]
        ),
        1.0
    );
    assert!(
        mapping["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("panicked")),
        "the mapping reports the panic: {mapping}"
    );
}

#[tokio::test]
async fn a_partition_whose_queue_cannot_be_split_fails_the_mapping_and_the_consumer_rejoins() {
    let b = bootstrap();
    let topic = create_topic(&b, "split", 2).await;
    produce_numbered(&b, &topic, 2, "r", 20).await;
    let f = Function::deploy("ksplit", &[]).await;
    // The first split of the process fails, as `split_partition_queue` returning None
    // would (debug builds only): one partition of the first assignment has no task.
    let gw = Gateway::start_with_env(
        &member_config(&b, &f, &topic, &unique("g"), 5),
        &[("ESM_GATEWAY_TEST_SPLIT_FAILURES", "1")],
    );
    // Before the fix that partition stayed assigned and silent: 10 records, forever.
    f.wait_delivered(20, Duration::from_secs(60)).await;
    let failed = gw.log_contains("assignment failed");
    let metrics = gw.metrics();
    let mapping = gw.mapping("test");
    let rejoined = gw.log_contains("consumer rejoined the group");
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Every record delivered, each partition's from its first offset.
    assert_eq!(delivered_once(&f), values("r", 20));
    assert!(failed, "the failed split is logged as an error");
    assert!(rejoined, "the consumer left and rejoined the group");
    assert_eq!(
        metrics.value(
            "esm_gateway_kafka_assignment_errors_total",
            &[("mapping", "test"), ("kind", "split")]
        ),
        1.0
    );
    assert!(
        mapping["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot split the queue")),
        "the mapping reports the failed split: {mapping}"
    );
    assert_eq!(mapping["state"], "running", "and runs again: {mapping}");
}

#[tokio::test]
async fn latest_applies_once_so_records_produced_while_the_gateway_was_down_arrive() {
    // The mock broker, because Tansu 0.6 reports a wrong end offset for a topic.
    let (_mock, b, topic) = mock_topic("once", 1);
    produce_numbered(&b, &topic, 1, "old", 5).await;
    let f = Function::deploy("konce", &[]).await;
    let group = unique("g");
    let gw = start_draining(&b, &f, &topic, &group, r#""latest""#);
    gw.wait_log("partition assigned", LONG).await;
    // Stopped before anything reached it: before the fix nothing was committed, and
    // the next start began at the end again, past what was produced meanwhile.
    assert_eq!(gw.terminate().await.code(), Some(0));
    produce_numbered(&b, &topic, 1, "down", 5).await;
    let gw = start_draining(&b, &f, &topic, &group, r#""latest""#);
    f.wait_delivered(5, Duration::from_secs(60)).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    // The five produced while it was down delivered; the five older than its first
    // start still in the broker.
    assert_eq!(delivered_once(&f), values("down", 5));
}

/// A consumer of `group` (assigned nothing), and the group's committed offsets of the
/// first `partitions` partitions of `topic`.
fn committed(b: &str, group: &str, topic: &str, partitions: i32) -> (BaseConsumer, Vec<Offset>) {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let offsets = committed.elements().iter().map(|e| e.offset()).collect();
    (reader, offsets)
}

/// The gateway's resident memory in bytes (`VmRSS` of /proc/<pid>/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

#[tokio::test]
async fn a_blocked_partition_of_large_records_holds_memory_within_its_byte_budget() {
    const RECORDS: usize = 2_000;
    const VALUE: usize = 100 * 1024;
    // The documented bound for one partition of one lane (README, Guarantees): the
    // lane's buffer budget (12 MiB, batch in flight included), librdkafka's prefetch
    // (a batch's bytes, 6 MB, and its fetch in progress), the batch's rendered event
    // and its HTTP request (6 MB each), and the process itself (about 50 MiB in a
    // debug build); with a margin for the allocator. 2,000 records of 100 KB are 270 MB
    // once rendered (base64): a buffer bounded by count (here 20,000 records) holds all
    // of them.
    const BOUND: u64 = 160 << 20;
    let b = bootstrap();
    let topic = create_topic(&b, "memory", 1).await;
    let records = (0..RECORDS)
        .map(|i| {
            let mut v = format!("m-{i}-");
            v.extend(std::iter::repeat_n('x', VALUE - v.len()));
            rec(0, "k", v)
        })
        .collect();
    produce(&b, &topic, records).await;
    let f = Function::deploy("kmemory", &[("FAIL_ALL", "1")]).await;
    let group = unique("g");
    let gw = Gateway::start(&kafka_config(
        &b,
        &f.name,
        &topic,
        &group,
        r#"
[mapping.batch]
size = 10000
window = "1s"

[mapping.retry]
max_attempts = -1
backoff_min = "1s"
backoff_max = "1s""#,
    ));
    // The partition is blocked behind its first batch, failing forever. Its reader
    // either took every record (a buffer bounded by count) or waits for the budget;
    // sampled meanwhile, the process never grows past the bound.
    gw.wait_admin().await;
    let pid = gw.pid();
    let mut peak = 0;
    wait_for(
        "the reader to take everything or wait for its budget",
        LONG,
        || {
            peak = peak.max(rss_bytes(pid));
            let m = gw.metrics();
            let received = m
                .find("esm_gateway_records_received_total", &[("mapping", "test")])
                .unwrap_or(0.0);
            let waited = m
                .find("esm_gateway_buffer_waits_total", &[("mapping", "test")])
                .unwrap_or(0.0);
            let failed = f.invocations().len();
            (failed >= 3 && (received >= RECORDS as f64 || waited >= 1.0)).then_some(())
        },
    )
    .await;
    peak = peak.max(rss_bytes(pid));
    let invocations = f.invocations();
    assert_eq!(gw.terminate().await.code(), Some(0));

    eprintln!("peak resident memory: {} MiB", peak >> 20);
    assert!(
        peak < BOUND,
        "resident memory reached {} MiB, above the bound of {} MiB",
        peak >> 20,
        BOUND >> 20
    );
    // Every record accounted for: none delivered, none parked (no destination), so all
    // still in the topic, uncommitted.
    assert!(
        invocations.iter().all(|i| !i.ok),
        "the function never succeeded"
    );
    let (reader, offsets) = committed(&b, &group, &topic, 1);
    let offset = offsets[0];
    assert!(
        matches!(offset, Offset::Invalid | Offset::Offset(0)),
        "nothing committed, got {offset:?}"
    );
    // What is left to read from there: every record, once.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    reader.assign(&tpl).unwrap();
    let mut left = std::collections::BTreeSet::new();
    wait_for("every record read back from the topic", LONG, || {
        while let Some(m) = reader.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            assert_eq!(rdkafka::Message::payload(&m).map(<[u8]>::len), Some(VALUE));
            left.insert(rdkafka::Message::offset(&m));
        }
        (left.len() == RECORDS).then_some(())
    })
    .await;
    assert_eq!(
        left,
        (0..RECORDS as i64).collect(),
        "every record still in the topic"
    );
}

/// AWS's Kafka rule (Lambda Developer Guide, "Configuring error handling controls for
/// Kafka event sources"): a partial batch response retries only the records it names,
/// not everything after the first of them as a stream checkpoint would, and the
/// partition commits only past records that are resolved.
#[tokio::test]
async fn a_partial_batch_response_retries_only_the_named_records() {
    let b = bootstrap();
    let topic = create_topic(&b, "partial", 1).await;
    produce(
        &b,
        &topic,
        (0..10).map(|i| rec(0, "k", format!("r-{i}"))).collect(),
    )
    .await;
    let f = Function::deploy("kpartial", &[("FAIL_ONCE", "r-3,r-6")]).await;
    let group = unique("g");
    let gw = Gateway::start(&kafka_config(&b, &f.name, &topic, &group, PARTIAL_BATCH));
    let inv = wait_for("the retry of the named records", LONG, || {
        let inv = f.invocations();
        (inv.len() >= 2).then_some(inv)
    })
    .await;
    assert_eq!(inv[0].bodies, values("r", 10), "one batch of all ten first");
    assert_eq!(inv[0].failed, ["3", "6"], "named by offset");
    assert_eq!(
        inv[1].bodies,
        ["r-3", "r-6"],
        "only the named records come back"
    );
    // Committed past all ten once the retry succeeded, and nothing invoked again.
    wait_for("the commit past the last record", LONG, || {
        let (_, offsets) = committed(&b, &group, &topic, 1);
        (offsets[0] == Offset::Offset(10)).then_some(())
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(f.invocations().len(), 2);
}

/// To a Kafka topic, AWS writes one failure record per failed record, produced with that
/// record's own key bytes (unaltered, even when they are not UTF-8), `batchSize` 1,
/// `recordInfo` and a payload holding that one record.
#[tokio::test]
async fn a_kafka_topic_destination_gets_one_record_per_failed_record_keyed_by_its_raw_key() {
    let b = bootstrap();
    let topic = create_topic(&b, "perrec", 1).await;
    let dlt = create_topic(&b, "perrec-dlt", 1).await;
    let keys: [&[u8]; 3] = [b"plain", b"\xff\xfebin", b"k3"];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    for (i, k) in keys.iter().enumerate() {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(*k)
                    .payload(&format!("bad{i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("record produced");
    }
    let f = Function::deploy("kperrec", &[("FAIL_ALL", "1")]).await;
    let gw = Gateway::start(&kafka_config(
        &b,
        &f.name,
        &topic,
        &unique("g"),
        &format!(
            "[mapping.batch]\nsize = 10\nwindow = \"1s\"\n\n[mapping.retry]\nmax_attempts = 0\n\n\
             [mapping.on_failure]\ntype = \"kafka\"\nbootstrap_servers = \"{b}\"\ntopic = \"{dlt}\""
        ),
    ));
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", unique("dlt-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    reader.subscribe(&[&dlt]).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(LONG, reader.recv())
            .await
            .expect("a failure record on the topic")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        got.push((m.key().map(<[u8]>::to_vec), v));
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
    for (i, (key, v)) in got.iter().enumerate() {
        assert_eq!(
            key.as_deref(),
            Some(keys[i]),
            "record {i} keyed by its own bytes"
        );
        let info = &v["KafkaBatchInfo"];
        assert_eq!(info["batchSize"], 1);
        assert_eq!(info["recordInfo"]["offset"], i.to_string());
        assert!(info["recordInfo"]["timestamp"].is_string(), "{info}");
        assert_eq!(info["bootstrapServers"], b);
        assert!(info.get("recordsInfo").is_none(), "{info}");
        let records = v["payload"]["records"][format!("{topic}-0")]
            .as_array()
            .unwrap();
        assert_eq!(records.len(), 1, "one record per failure record");
        assert_eq!(records[0]["offset"], i);
        assert_eq!(v["requestContext"]["condition"], "RetryAttemptsExhausted");
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
    }
}
