//! RabbitMQ drain benchmark: how fast does esm-gateway empty a queue into Lambda, compared
//! with a plain lapin consumer draining the same queue on the same broker?
//!
//! ```text
//! cargo bench --bench rabbitmq
//! BENCH_MESSAGES=200000 BENCH_SIZE=1024 BENCH_BATCH=100 AMQP_URL=amqp://… cargo bench --bench rabbitmq
//! BENCH_FAIL_EVERY=100 BENCH_BACKOFF_MIN=100ms cargo bench --bench rabbitmq   # the retries' first backoff
//! ```
//!
//! 1. Fills a fresh durable queue with `BENCH_MESSAGES` persistent messages of `BENCH_SIZE`
//!    bytes, then times a raw lapin consumer (prefetch 1000, one `multiple` ack every 100
//!    deliveries) draining it.
//! 2. Fills it again and times the release `esm-gateway` binary draining it into an
//!    in-process Lambda API stub (200 `null` at once), from process start until the stub
//!    has counted every record.
//! 3. Unless `BENCH_FAIL_EVERY=0`, fills it again and drains it once more with
//!    `report_batch_item_failures`, the stub failing one invoke in `BENCH_FAIL_EVERY` (100:
//!    1 % of invokes) with a partial batch response naming all its records: its rate is
//!    compared with the error-free drain's, both over the first 97 % of the records (the
//!    last retries wait out their backoff, which is not throughput).
//! 4. Prints a Markdown table, the gateway's CPU time per record and peak RSS (from
//!    `/proc`, read before SIGTERM), and deletes the queue.
//!
//! Needs a local RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and Linux (`/proc`).

mod support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::{StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use support::Drain;
use support::{lambda_stub, proc_stats};

/// Prefetch of the raw consumer (and of the gateway, unless the batch is larger).
const PREFETCH: u16 = 1000;
/// The raw consumer acks (with `multiple`) every this many deliveries, and the last one.
const ACK_EVERY: u64 = 100;
/// Publisher confirms are awaited once per this many messages.
const CONFIRM_CHUNK: u64 = 5000;
/// Publishes in flight at once while filling the queue.
const PUBLISH_CONCURRENCY: usize = 64;

struct Params {
    amqp_url: String,
    messages: u64,
    size: usize,
    batch: u64,
    fail_every: u64,
    /// The mapping's `retry.backoff_min` (`BENCH_BACKOFF_MIN`, e.g. "100ms"); unset, the
    /// gateway's default (1 s).
    backoff_min: Option<String>,
}

impl Params {
    fn from_env() -> Result<Params> {
        use support::env_num as num;
        let p = Params {
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            messages: num("BENCH_MESSAGES", 200_000)?,
            size: num("BENCH_SIZE", 1024)?,
            batch: num("BENCH_BATCH", 100)?,
            fail_every: num("BENCH_FAIL_EVERY", 100)?,
            backoff_min: std::env::var("BENCH_BACKOFF_MIN").ok(),
        };
        ensure!(p.messages > 0, "BENCH_MESSAGES must be positive");
        ensure!(
            (1..=10_000).contains(&p.batch),
            "BENCH_BATCH must be between 1 and 10000"
        );
        Ok(p)
    }
}

/// What the gateway run measured besides its drain time.
struct GatewayRun {
    drain: Drain,
    /// From the first invoke to the one that completed the count.
    steady: Option<Drain>,
    /// From the first invoke until 97 % of the records were delivered.
    most: Option<Drain>,
    /// Invokes the stub failed.
    failed: u64,
    startup: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
    invokes: u64,
    stub_cpu: Duration,
    broker_cpu: Duration,
}

/// A multi-thread runtime, as a real consumer would use; the gateway runs in its own
/// process, so during its drain this process only serves the Lambda stub.
#[tokio::main]
async fn main() -> Result<()> {
    let params = Params::from_env()?;
    let ticks = proc_stats::clock_ticks();
    let conn = Connection::connect(&params.amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {} (set AMQP_URL; is it running? \
                 `rabbitmq-diagnostics -q ping`)",
                params.amqp_url
            )
        })?;
    let control = conn.create_channel().await?;
    let queue = format!(
        "esm-gateway-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    control
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .context("declaring the bench queue")?;
    eprintln!(
        "queue {queue}: {} messages of {} bytes, gateway batch {}",
        params.messages, params.size, params.batch
    );

    let result = run(&params, &conn, &control, &queue, ticks).await;

    // Always remove the queue, whatever happened.
    if let Err(e) = control
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        eprintln!("warning: could not delete queue {queue}: {e}");
    }
    let _ = conn.close(200, "bench done".into()).await;

    let (raw, raw_cpu, raw_broker_cpu, gw, failing) = result?;
    print!("{}", report(&params, &raw, raw_cpu, raw_broker_cpu, &gw));
    if let Some(failing) = failing {
        print!("{}", report_failures(&params, &gw, &failing));
    }
    std::io::stdout().flush()?;
    Ok(())
}

async fn run(
    params: &Params,
    conn: &Connection,
    control: &Channel,
    queue: &str,
    ticks: u64,
) -> Result<(Drain, Duration, Duration, GatewayRun, Option<GatewayRun>)> {
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let broker = proc_stats::broker_pids();
    if broker.is_empty() {
        eprintln!("note: no local beam.smp process found; broker CPU will read 0");
    }

    // 1. Raw lapin consumer.
    fill(&publisher, control, queue, params).await?;
    let (self_before, broker_before) = (
        proc_stats::cpu_time("self", ticks)?,
        proc_stats::total_cpu_time(&broker, ticks),
    );
    let raw = raw_drain(conn, queue, params.messages).await?;
    let raw_cpu = proc_stats::cpu_time("self", ticks)? - self_before;
    let raw_broker_cpu = proc_stats::total_cpu_time(&broker, ticks) - broker_before;
    eprintln!(
        "raw consumer: {} records in {:.2?}",
        raw.records, raw.elapsed
    );

    // 2. The gateway, timed against the raw drain (it gets 20 times as long, at least 60 s).
    let limit = (raw.elapsed * 20).max(Duration::from_secs(60));
    let gw = gateway_drain(params, 0, &publisher, control, queue, &broker, ticks, limit).await?;

    // 3. The same with failing invokes.
    let failing = if params.fail_every > 0 {
        let run = gateway_drain(
            params,
            params.fail_every,
            &publisher,
            control,
            queue,
            &broker,
            ticks,
            limit,
        )
        .await?;
        Some(run)
    } else {
        None
    };
    Ok((raw, raw_cpu, raw_broker_cpu, gw, failing))
}

/// Publishes `params.messages` persistent messages with confirms, pipelined: confirms are
/// awaited once per chunk, not per message. Checks the queue then holds exactly that many.
async fn fill(publisher: &Channel, control: &Channel, queue: &str, params: &Params) -> Result<()> {
    let started = Instant::now();
    let payload: Vec<u8> = (0..params.size).map(|i| b'a' + (i % 26) as u8).collect();
    let publish = |i: u64| {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/octet-stream".into())
            .with_message_id(format!("m{i}").as_str().into());
        publisher.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            props,
        )
    };
    let mut next = 0;
    while next < params.messages {
        let end = (next + CONFIRM_CHUNK).min(params.messages);
        // Up to PUBLISH_CONCURRENCY publishes in flight; their confirms are left pending
        // (dropping a PublisherConfirm does not cancel it) and awaited once per chunk.
        futures_util::stream::iter(next..end)
            .map(publish)
            .buffered(PUBLISH_CONCURRENCY)
            .try_for_each(|_confirm| async { Ok(()) })
            .await
            .context("publishing")?;
        let returned = publisher.wait_for_confirms().await?;
        ensure!(returned.is_empty(), "{} messages returned", returned.len());
        next = end;
    }
    let depth = control
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count() as u64;
    ensure!(
        depth == params.messages,
        "queue {queue} holds {depth} messages, expected {}",
        params.messages
    );
    eprintln!(
        "published {} messages in {:.2?}",
        params.messages,
        started.elapsed()
    );
    Ok(())
}

/// Drains `n` messages with a plain consumer; times from basic.consume until the last
/// delivery is received and acked.
async fn raw_drain(conn: &Connection, queue: &str, n: u64) -> Result<Drain> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0u64;
    while received < n {
        let delivery = consumer
            .next()
            .await
            .context("the consumer ended early")??;
        std::hint::black_box(&delivery.data);
        received += 1;
        if received.is_multiple_of(ACK_EVERY) || received == n {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let elapsed = started.elapsed();
    channel
        .basic_cancel("bench-raw".into(), BasicCancelOptions::default())
        .await?;
    channel.close(200, "drained".into()).await?;
    Ok(Drain {
        records: received,
        elapsed,
    })
}

/// Fills the queue and drains it with the gateway into a fresh stub that fails one invoke
/// in `fail_every` (0: none).
#[allow(clippy::too_many_arguments)]
async fn gateway_drain(
    params: &Params,
    fail_every: u64,
    publisher: &Channel,
    control: &Channel,
    queue: &str,
    broker: &[String],
    ticks: u64,
    limit: Duration,
) -> Result<GatewayRun> {
    let milestone = params.messages * 97 / 100;
    let (stub, stats) = lambda_stub::start_with(lambda_stub::Options {
        fail_every,
        milestone,
        ..lambda_stub::Options::new(params.messages, lambda_stub::EventKind::RabbitMq)
    })
    .await?;
    fill(publisher, control, queue, params).await?;
    let run = support::gateway::drain_into_stub(
        &gateway_config(params, queue, stub, fail_every > 0),
        &stats,
        params.messages,
        broker,
        ticks,
        limit,
    )
    .await?;
    Ok(GatewayRun {
        drain: Drain {
            records: run.records,
            elapsed: run.reached - run.started,
        },
        // The first invoke's records were all there at `first`: count the rest over the span.
        steady: (run.reached > run.first).then(|| Drain {
            records: run.records - run.first_records,
            elapsed: run.reached - run.first,
        }),
        most: stats.milestone_reached().map(|at| Drain {
            records: milestone.saturating_sub(run.first_records),
            elapsed: at.saturating_duration_since(run.first),
        }),
        failed: stats.failed(),
        startup: run.first - run.started,
        cpu: run.cpu,
        peak_rss_kib: run.peak_rss_kib,
        invokes: stats.invokes(),
        stub_cpu: run.stub_cpu,
        broker_cpu: run.broker_cpu,
    })
}

fn gateway_config(
    params: &Params,
    queue: &str,
    stub: std::net::SocketAddr,
    partial: bool,
) -> String {
    // JSON strings are valid TOML basic strings.
    let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
    let prefetch = u64::from(PREFETCH).max(params.batch);
    format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "http://{stub}"

[gateway]
shutdown_grace = "5s"

[[mapping]]
name = "bench"
function = "bench-fn"
report_batch_item_failures = {partial}

[mapping.source]
type = "rabbitmq"
url = {url}
queue = {queue}
prefetch = {prefetch}

[mapping.batch]
size = {batch}
window = "500ms"
{retry}"#,
        url = s(&params.amqp_url),
        queue = s(queue),
        batch = params.batch,
        retry = params
            .backoff_min
            .as_deref()
            .map(|b| format!("\n[mapping.retry]\nbackoff_min = {}\n", s(b)))
            .unwrap_or_default(),
    )
}

/// The drain with failing invokes against the error-free one, over 97 % of the records.
fn report_failures(params: &Params, ok: &GatewayRun, failing: &GatewayRun) -> String {
    let rate = |run: &GatewayRun| run.most.as_ref().map_or(f64::NAN, Drain::rate);
    let (ok_rate, failing_rate) = (rate(ok), rate(failing));
    let mut out = format!(
        "\n1 invoke in {} failing ({} failed, every record named in a partial batch response): \
         {failing_rate:.0} records/s over the first 97 %, error-free {ok_rate:.0} ({:.2}); \
         all {} delivered in {:.2} s\n",
        params.fail_every,
        failing.failed,
        failing_rate / ok_rate,
        failing.drain.records,
        failing.drain.elapsed.as_secs_f64(),
    );
    let per_record =
        |d: Duration, run: &GatewayRun| d.as_secs_f64() * 1e6 / run.drain.records as f64;
    let _ = writeln!(
        out,
        "CPU µs/record, failing / error-free: gateway {:.1} / {:.1}, broker {:.1} / {:.1}",
        per_record(failing.cpu, failing),
        per_record(ok.cpu, ok),
        per_record(failing.broker_cpu, failing),
        per_record(ok.broker_cpu, ok)
    );
    let _ = writeln!(
        out,
        "\nBENCH-ROW|RabbitMQ drain, partial batch responses, 1 invoke in {} failing: records/s vs error-free (first 97 %)|{failing_rate:.0}|{ok_rate:.0}|{:.2}|≥ 0.9",
        params.fail_every,
        failing_rate / ok_rate
    );
    out
}

fn report(
    params: &Params,
    raw: &Drain,
    raw_cpu: Duration,
    raw_broker_cpu: Duration,
    gw: &GatewayRun,
) -> String {
    let per_record = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    let mut out = format!(
        "\n{} messages × {} B\n\n| {:<40} | records | seconds | records/s | ratio |\n|{}|---------|---------|-----------|-------|\n",
        params.messages,
        params.size,
        "path",
        "-".repeat(42)
    );
    let mut row = |path: &str, d: &Drain| {
        let _ = writeln!(
            out,
            "| {path:<40} | {:>7} | {:>7.2} | {:>9.0} | {:>5.2} |",
            d.records,
            d.elapsed.as_secs_f64(),
            d.rate(),
            d.rate() / raw.rate()
        );
    };
    row("raw lapin consumer", raw);
    row(&format!("esm-gateway (batch {})", params.batch), &gw.drain);
    if let Some(steady) = &gw.steady {
        row("esm-gateway, first→last invoke", steady);
    }
    let _ = writeln!(
        out,
        "\ngateway CPU: {:.1} µs/record, peak RSS: {:.1} MiB, invokes: {}",
        per_record(gw.cpu, gw.drain.records),
        gw.peak_rss_kib as f64 / 1024.0,
        gw.invokes
    );
    let _ = writeln!(
        out,
        "gateway start → first invoke: {:.3} s",
        gw.startup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "raw consumer CPU: {:.1} µs/record; lambda stub CPU: {:.1} µs/record",
        per_record(raw_cpu, raw.records),
        per_record(gw.stub_cpu, gw.drain.records)
    );
    let _ = writeln!(
        out,
        "broker CPU: {:.1} µs/record (raw drain), {:.1} µs/record (gateway drain)",
        per_record(raw_broker_cpu, raw.records),
        per_record(gw.broker_cpu, gw.drain.records)
    );
    // For scripts/bench: row | measured | raw | ratio | target.
    let gw_rate = gw.steady.as_ref().unwrap_or(&gw.drain).rate();
    let _ = writeln!(
        out,
        "\nBENCH-ROW|RabbitMQ drain, {} × {} B: records/s|{gw_rate:.0}|{:.0}|{:.2}|≥ 0.9",
        params.messages,
        params.size,
        raw.rate(),
        gw_rate / raw.rate()
    );
    let (gw_cpu, raw_cpu) = (
        per_record(gw.cpu, gw.drain.records),
        per_record(raw_cpu, raw.records),
    );
    let _ = writeln!(
        out,
        "BENCH-ROW|RabbitMQ drain: CPU µs/record|{gw_cpu:.1}|{raw_cpu:.1}|{:.2}|–",
        gw_cpu / raw_cpu
    );
    out
}
