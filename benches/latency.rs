//! Latency at light load: how long from publish to invoke does a record take through
//! esm-gateway with a batching window of 0, compared with a plain consumer tuned for
//! latency reading the same records at the same time?
//!
//! ```text
//! cargo bench --bench latency
//! BENCH_LATENCY_SOURCES=kafka,rabbitmq BENCH_RATE=50 BENCH_SECS=20 BENCH_BATCH=10 \
//!   BENCH_SIZE=1024 BENCH_RAW_FETCH_WAIT_MS=10 cargo bench --bench latency
//! ```
//!
//! For each source in `BENCH_LATENCY_SOURCES`:
//!
//! 1. Kafka: a fresh topic of one partition. RabbitMQ: a fresh fanout exchange with two
//!    queues bound, one per reader, so that both see every message.
//! 2. Starts the release `esm-gateway` binary (batch `BENCH_BATCH`, window 0) invoking an
//!    in-process Lambda API stub that decodes each record's sequence number and notes when
//!    it arrived, and a raw consumer on a thread of its own (Kafka: a `BaseConsumer` with
//!    `fetch.wait.max.ms = BENCH_RAW_FETCH_WAIT_MS`, default the gateway's own 10 ms at
//!    window 0, and `fetch.min.bytes = 1`; RabbitMQ: a lapin consumer, prefetch 100, one
//!    ack per message).
//! 3. Publishes one record every 1/`BENCH_RATE` s until both readers have seen one
//!    (warm-up, not counted), then `BENCH_RATE` × `BENCH_SECS` records at that rate, each
//!    stamped with the moment before its publish; waits for both readers to see them all.
//! 4. Prints publish → invoke (gateway) and publish → receive (raw) p50 / p99 / max, and
//!    what the gateway adds to the raw p99.
//!
//! Needs the local stack (`KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`; `AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use futures_util::StreamExt;

use support::env_num as num;
use support::gateway::Gateway;

/// What the gateway may add to the raw consumer's p99 (issue 15).
const TARGET_ADDED_P99_MS: f64 = 10.0;
/// The longest the warm-up (both readers joined) and the tail may take.
const LIMIT: Duration = Duration::from_secs(60);

struct Params {
    bootstrap: String,
    amqp_url: String,
    sources: Vec<String>,
    rate: u64,
    secs: u64,
    batch: u64,
    size: usize,
    raw_fetch_wait_ms: u64,
}

impl Params {
    fn from_env() -> Result<Params> {
        let p = Params {
            bootstrap: std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into()),
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            sources: std::env::var("BENCH_LATENCY_SOURCES")
                .unwrap_or_else(|_| "kafka,rabbitmq".into())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            rate: num("BENCH_RATE", 50)?,
            secs: num("BENCH_SECS", 20)?,
            batch: num("BENCH_BATCH", 10)?,
            size: num("BENCH_SIZE", 1024)?,
            raw_fetch_wait_ms: num("BENCH_RAW_FETCH_WAIT_MS", 10)?,
        };
        ensure!((1..=10_000).contains(&p.rate), "BENCH_RATE must be 1–10000");
        ensure!(p.secs > 0, "BENCH_SECS must be positive");
        ensure!(p.size >= 20, "BENCH_SIZE must be at least 20");
        for s in &p.sources {
            ensure!(
                s == "kafka" || s == "rabbitmq",
                "BENCH_LATENCY_SOURCES: unknown source {s:?} (kafka, rabbitmq)"
            );
        }
        Ok(p)
    }
}

/// When each sequence number was published, and when each reader first saw it.
#[derive(Default)]
struct Clock {
    sent: Mutex<HashMap<u64, Instant>>,
    gateway: Mutex<HashMap<u64, Instant>>,
    raw: Mutex<HashMap<u64, Instant>>,
}

impl Clock {
    fn saw(map: &Mutex<HashMap<u64, Instant>>, seq: u64, at: Instant) {
        map.lock().expect("clock").entry(seq).or_insert(at);
    }

    fn count(map: &Mutex<HashMap<u64, Instant>>, from: u64) -> usize {
        map.lock()
            .expect("clock")
            .keys()
            .filter(|&&s| s >= from)
            .count()
    }

    /// Latencies (ms) of sequence numbers `from..to` as `map` saw them, sorted; the number
    /// it never saw.
    fn latencies(&self, map: &Mutex<HashMap<u64, Instant>>, from: u64, to: u64) -> (Vec<f64>, u64) {
        let sent = self.sent.lock().expect("clock");
        let seen = map.lock().expect("clock");
        let mut out = Vec::new();
        let mut missing = 0;
        for seq in from..to {
            match (sent.get(&seq), seen.get(&seq)) {
                (Some(s), Some(r)) => out.push(r.saturating_duration_since(*s).as_secs_f64() * 1e3),
                _ => missing += 1,
            }
        }
        out.sort_by(f64::total_cmp);
        (out, missing)
    }
}

/// A record's payload: its sequence number in 20 ASCII digits, then filler.
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{seq:020}").into_bytes();
    p.resize(size, b'x');
    p
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..20)?).ok()?.parse().ok()
}

/// The sequence numbers of the records of one event (base64 `value` or `data`).
fn event_seqs(body: &[u8]) -> Result<Vec<u64>> {
    let v: serde_json::Value = serde_json::from_slice(body).context("event is not JSON")?;
    let (groups, field) = if v["eventSource"] == "SelfManagedKafka" {
        (&v["records"], "value")
    } else {
        (&v["rmqMessagesByQueue"], "data")
    };
    let mut out = Vec::new();
    for records in groups.as_object().context("no records object")?.values() {
        for r in records.as_array().context("records are not an array")? {
            let b64 = r[field].as_str().context("record without a payload")?;
            let bytes = base64_simd::STANDARD
                .decode_to_vec(b64)
                .context("payload is not base64")?;
            out.push(seq_of(&bytes).context("payload without a sequence number")?);
        }
    }
    Ok(out)
}

async fn start_stub(clock: Arc<Clock>) -> Result<SocketAddr> {
    async fn invoke(State(clock): State<Arc<Clock>>, body: Bytes) -> &'static str {
        let at = Instant::now();
        match event_seqs(&body) {
            Ok(seqs) => seqs
                .into_iter()
                .for_each(|s| Clock::saw(&clock.gateway, s, at)),
            Err(e) => eprintln!("stub: bad event: {e:#}"),
        }
        "null"
    }
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .layer(DefaultBodyLimit::disable())
        .with_state(clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("lambda stub stopped: {e}");
        }
    });
    Ok(addr)
}

/// One source's publisher.
enum Publisher {
    Kafka(rdkafka::producer::FutureProducer, String),
    Rabbit(lapin::Channel, String),
}

impl Publisher {
    async fn publish(&self, clock: &Clock, seq: u64, size: usize) -> Result<()> {
        let body = payload(seq, size);
        clock
            .sent
            .lock()
            .expect("clock")
            .insert(seq, Instant::now());
        match self {
            Publisher::Kafka(p, topic) => {
                let key = seq.to_string();
                let record = rdkafka::producer::FutureRecord::to(topic)
                    .key(&key)
                    .payload(&body);
                // Not awaited: the delivery report comes after the record is readable.
                drop(
                    p.send_result(record)
                        .map_err(|(e, _)| e)
                        .context("queueing a record")?,
                );
            }
            Publisher::Rabbit(ch, exchange) => {
                ch.basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    lapin::options::BasicPublishOptions::default(),
                    &body,
                    lapin::BasicProperties::default()
                        .with_message_id(format!("m{seq}").as_str().into()),
                )
                .await
                .context("publishing")?;
            }
        }
        Ok(())
    }
}

/// The result of one source.
struct Measured {
    source: String,
    raw: Vec<f64>,
    gateway: Vec<f64>,
    missing: (u64, u64),
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    let params = Params::from_env()?;
    let mut results = Vec::new();
    for source in &params.sources {
        results.push(run_source(&params, source).await?);
    }
    println!(
        "\npublish → invoke at {} records/s for {} s, {} B, batch {}, window 0\n",
        params.rate, params.secs, params.size, params.batch
    );
    println!("| path | records | p50 ms | p99 ms | max ms | unseen |");
    println!("|---|---|---|---|---|---|");
    for m in &results {
        let raw_name = if m.source == "kafka" {
            format!(
                "raw rdkafka BaseConsumer (fetch.wait.max.ms {})",
                params.raw_fetch_wait_ms
            )
        } else {
            "raw lapin consumer".to_owned()
        };
        for (name, l, missing) in [
            (raw_name, &m.raw, m.missing.0),
            (
                format!("esm-gateway, {}", m.source),
                &m.gateway,
                m.missing.1,
            ),
        ] {
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} | {missing} |",
                l.len(),
                percentile(l, 0.5),
                percentile(l, 0.99),
                percentile(l, 1.0),
            );
        }
    }
    println!();
    for m in &results {
        let (g, r) = (percentile(&m.gateway, 0.99), percentile(&m.raw, 0.99));
        let added = g - r;
        println!(
            "{}: the gateway adds {added:.1} ms to the raw p99 (target ≤ {TARGET_ADDED_P99_MS} ms): {}",
            m.source,
            if added <= TARGET_ADDED_P99_MS {
                "met"
            } else {
                "**not met**"
            }
        );
        // For scripts/bench: row | measured | raw | ratio | target.
        println!(
            "BENCH-ROW|{} latency p99 at {}/s, window 0, batch {} (p50 {:.1} ms)|{g:.1} ms|{r:.1} ms|{added:+.1} ms|added p99 ≤ {TARGET_ADDED_P99_MS} ms",
            m.source,
            params.rate,
            params.batch,
            percentile(&m.gateway, 0.5)
        );
    }
    Ok(())
}

async fn run_source(params: &Params, source: &str) -> Result<Measured> {
    let clock = Arc::new(Clock::default());
    let stub = start_stub(clock.clone()).await?;
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measured = match source {
        "kafka" => kafka(params, &clock, stub, &stamp, &stop).await,
        _ => rabbitmq(params, &clock, stub, &stamp, &stop).await,
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (from, to) = measured?;
    let (raw, raw_missing) = clock.latencies(&clock.raw, from, to);
    let (gateway, gw_missing) = clock.latencies(&clock.gateway, from, to);
    Ok(Measured {
        source: source.to_owned(),
        raw,
        gateway,
        missing: (raw_missing, gw_missing),
    })
}

/// Warm-up, then the measured records; returns their sequence numbers `from..to`.
async fn publish_all(
    params: &Params,
    publisher: &Publisher,
    clock: &Clock,
    gateway: &mut Gateway,
) -> Result<(u64, u64)> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / params.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut seq = 0;
    while Clock::count(&clock.raw, 0) == 0 || Clock::count(&clock.gateway, 0) == 0 {
        ensure!(
            started.elapsed() < LIMIT,
            "warm-up: raw saw {}, gateway {} records within {LIMIT:?}",
            Clock::count(&clock.raw, 0),
            Clock::count(&clock.gateway, 0)
        );
        if let Some(status) = gateway.exited()? {
            bail!("the gateway exited during warm-up ({status})");
        }
        tick.tick().await;
        publisher.publish(clock, seq, params.size).await?;
        seq += 1;
    }
    // Let the warm-up records drain before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = seq;
    let to = from + params.rate * params.secs;
    eprintln!(
        "warm-up: {from} records in {:.2?}; measuring {} records",
        started.elapsed(),
        to - from
    );
    for s in from..to {
        tick.tick().await;
        publisher.publish(clock, s, params.size).await?;
    }
    let tail = Instant::now();
    let n = (to - from) as usize;
    while (Clock::count(&clock.raw, from) < n || Clock::count(&clock.gateway, from) < n)
        && tail.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((from, to))
}

async fn kafka(
    params: &Params,
    clock: &Arc<Clock>,
    stub: SocketAddr,
    stamp: &str,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<(u64, u64)> {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;

    let topic = format!("esm-gateway-latency-{stamp}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &params.bootstrap)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .context("creating the topic (is the broker running?)")?
    {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    let result = async {
        let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &params.bootstrap)
            .set("linger.ms", "0")
            .set("socket.nagle.disable", "true")
            .create()?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &params.bootstrap)
            .set("group.id", format!("latency-raw-{stamp}"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", params.raw_fetch_wait_ms.to_string())
            .set("fetch.min.bytes", "1")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let raw = {
            let (clock, stop) = (clock.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                        let at = Instant::now();
                        if let Some(seq) = m.payload().and_then(seq_of) {
                            Clock::saw(&clock.raw, seq, at);
                        }
                    }
                }
            })
        };
        let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
        let config = format!(
            r#"[aws]
region = "us-east-1"
endpoint_url = "http://{stub}"

[gateway]
shutdown_grace = "5s"

[[mapping]]
name = "latency"
function = "bench-fn"

[mapping.source]
type = "kafka"
bootstrap_servers = {bootstrap}
topics = [{topic}]
group_id = {group}
starting_position = "trim_horizon"
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}

[mapping.batch]
size = {batch}
window = "0s"
"#,
            bootstrap = s(&params.bootstrap),
            topic = s(&topic),
            group = s(&format!("latency-gw-{stamp}")),
            batch = params.batch,
        );
        let mut gateway = Gateway::start(&config)?;
        let publisher = Publisher::Kafka(producer, topic.clone());
        let span = publish_all(params, &publisher, clock, &mut gateway).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        gateway.stop().await?;
        let _ = tokio::task::spawn_blocking(move || raw.join()).await;
        span
    }
    .await;
    if let Err(e) = admin.delete_topics(&[&topic], &opts).await {
        eprintln!("warning: could not delete topic {topic}: {e}");
    }
    result
}

async fn rabbitmq(
    params: &Params,
    clock: &Arc<Clock>,
    stub: SocketAddr,
    stamp: &str,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<(u64, u64)> {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;

    let conn = lapin::Connection::connect(&params.amqp_url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", params.amqp_url))?;
    let ch = conn.create_channel().await?;
    let exchange = format!("esm-gateway-latency-{stamp}");
    let (raw_q, gw_q) = (format!("{exchange}-raw"), format!("{exchange}-gw"));
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for q in [&raw_q, &gw_q] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let result = async {
        let consumer_ch = conn.create_channel().await?;
        consumer_ch
            .basic_qos(100, BasicQosOptions::default())
            .await?;
        let mut consumer = consumer_ch
            .basic_consume(
                raw_q.as_str().into(),
                "latency-raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let raw = {
            let (clock, stop) = (clock.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(Some(Ok(d))) =
                        tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
                    else {
                        continue;
                    };
                    let at = Instant::now();
                    if let Some(seq) = seq_of(&d.data) {
                        Clock::saw(&clock.raw, seq, at);
                    }
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                }
            })
        };
        let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
        let config = format!(
            r#"[aws]
region = "us-east-1"
endpoint_url = "http://{stub}"

[gateway]
shutdown_grace = "5s"

[[mapping]]
name = "latency"
function = "bench-fn"

[mapping.source]
type = "rabbitmq"
url = {url}
queue = {queue}
prefetch = 100

[mapping.batch]
size = {batch}
window = "0s"
"#,
            url = s(&params.amqp_url),
            queue = s(&gw_q),
            batch = params.batch,
        );
        let mut gateway = Gateway::start(&config)?;
        let publisher = Publisher::Rabbit(conn.create_channel().await?, exchange.clone());
        let span = publish_all(params, &publisher, clock, &mut gateway).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        gateway.stop().await?;
        let _ = raw.await;
        span
    }
    .await;
    for q in [&raw_q, &gw_q] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    result
}
