//! SQS drain benchmark (issue 4): in one run on MiniStack, the time to drain the same
//! number of messages from a standard queue into the same Python function through
//! MiniStack's own SQS event source mapping and through esm-gateway, and the queue's raw
//! receive+delete drain rate. Both mappings run twice: batches of 10 (no window), and
//! batches of `BENCH_LARGE_BATCH` with a 1 s window (MiniStack's own mapping caps its
//! batches at 10 whatever it is given; AWS honours up to 10,000). Then, unless
//! `BENCH_FAIL_PERCENT=0`, the gateway drains batches of 10 once more into a function that
//! fails that percentage (1) of its first-attempt invokes: its rate over the first 97 % of
//! the messages against an error-free batch-10 drain's (the last retries wait out their
//! backoff, which is not throughput); every message must still be delivered. It fails
//! them in each of `BENCH_FAIL_MODES` (`raise,report`): `raise` raises an exception, and
//! MiniStack then kills the function's worker process, so that its next invoke is a cold
//! start; `report` returns a partial batch response naming every record of the batch
//! (the mapping sets `report_batch_item_failures`), which SQS treats alike (the messages
//! come back after their visibility timeout) without the restart. Each failing drain
//! is compared with an error-free one run just before it.
//!
//! ```text
//! cargo bench --bench sqs   # BENCH_MESSAGES (10000), BENCH_CONCURRENCY (10), BENCH_LARGE_BATCH (100),
//!                           # BENCH_FAIL_PERCENT (1), BENCH_FAIL_MODES (raise,report)
//! ```
//! Needs the local stack (`scripts/stack up`): MiniStack on 127.0.0.1:4566.

mod support;

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, QueueAttributeName, SendMessageBatchRequestEntry,
};

use support::env_num;

const ENDPOINT: &str = "http://127.0.0.1:4566";
const FUNCTION: &str =
    "def handler(event, context):\n    print(len(event['Records']))\n    return None\n";
/// Fails `PERCENT` % of first-attempt invokes, picked by the first message's id (a retry
/// carries `ApproximateReceiveCount` above 1, and succeeds).
/// `FAIL` is a statement: the raise, or the return of a partial batch response.
const FAILING_FUNCTION: &str = "import zlib\n\
def handler(event, context):\n    \
first = event['Records'][0]\n    \
if first['attributes']['ApproximateReceiveCount'] == '1' and zlib.crc32(first['messageId'].encode()) % 100 < PERCENT:\n        \
FAIL\n    \
return None\n";
const RAISE: &str = "raise Exception('bench: a failing invoke')";
const REPORT: &str =
    "return {'batchItemFailures': [{'itemIdentifier': r['messageId']} for r in event['Records']]}";

async fn sdk() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| ENDPOINT.into()))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await
}

async fn fill(sqs: &aws_sdk_sqs::Client, name: &str, n: usize) -> Result<String> {
    let url = sqs
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::VisibilityTimeout, "60")
        .send()
        .await?
        .queue_url
        .context("queue url")?;
    let body = "x".repeat(256);
    let mut sends = tokio::task::JoinSet::new();
    for chunk in 0..n.div_ceil(10) {
        let (sqs, url, body) = (sqs.clone(), url.clone(), body.clone());
        let count = 10.min(n - chunk * 10);
        sends.spawn(async move {
            let entries = (0..count).map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&body)
                    .build()
                    .unwrap()
            });
            sqs.send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries.collect()))
                .send()
                .await
        });
        if sends.len() >= 32 {
            sends.join_next().await.unwrap()??;
        }
    }
    while let Some(r) = sends.join_next().await {
        r??;
    }
    Ok(url)
}

async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<u64> {
    let a = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await?;
    let attrs = a.attributes().context("attributes")?;
    let n = |k| {
        attrs
            .get(&k)
            .and_then(|v: &String| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(n(QueueAttributeName::ApproximateNumberOfMessages)
        + n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
}

async fn wait_empty(sqs: &aws_sdk_sqs::Client, url: &str, limit: Duration) -> Result<Duration> {
    wait_depth(sqs, url, 0, limit).await
}

/// Waits until the queue holds at most `left` messages (visible or in flight).
async fn wait_depth(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    left: u64,
    limit: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    while depth(sqs, url).await? > left {
        ensure!(
            start.elapsed() < limit,
            "queue {url} not down to {left} messages within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(start.elapsed())
}

async fn raw_drain(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    n: usize,
    concurrency: usize,
) -> Result<Duration> {
    let start = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (sqs, url, done) = (sqs.clone(), url.to_owned(), done.clone());
        workers.spawn(async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await?;
                let msgs = out.messages();
                if msgs.is_empty() {
                    continue;
                }
                let entries = msgs.iter().enumerate().map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .unwrap()
                });
                sqs.delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries.collect()))
                    .send()
                    .await?;
                done.fetch_add(msgs.len(), std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(start.elapsed())
}

async fn deploy(lambda: &aws_sdk_lambda::Client, name: &str, code: &str) -> Result<()> {
    let mut zip = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut zip);
        w.start_file("noop.py", zip::write::SimpleFileOptions::default())?;
        w.write_all(code.as_bytes())?;
        w.finish()?;
    }
    lambda
        .create_function()
        .function_name(name)
        .runtime(aws_sdk_lambda::types::Runtime::Python312)
        .role("arn:aws:iam::000000000000:role/bench")
        .handler("noop.handler")
        .code(
            aws_sdk_lambda::types::FunctionCode::builder()
                .zip_file(zip.into_inner().into())
                .build(),
        )
        .send()
        .await?;
    Ok(())
}

/// Starts `concurrency` of the function's workers (MiniStack starts one per concurrent
/// invoke, a Python process each), so that a drain into a newly deployed function does
/// not pay their cold starts. The event is a retry's, which the failing functions let
/// through.
async fn warm(lambda: &aws_sdk_lambda::Client, name: &str, concurrency: usize) -> Result<()> {
    let event = r#"{"Records":[{"messageId":"warm-up","body":"","attributes":{"ApproximateReceiveCount":"2"}}]}"#;
    let invokes = (0..concurrency).map(|_| {
        lambda
            .invoke()
            .function_name(name)
            .payload(aws_sdk_lambda::primitives::Blob::new(event))
            .send()
    });
    for r in futures_util::future::join_all(invokes).await {
        let r = r?;
        ensure!(
            r.function_error().is_none(),
            "warm-up invoke of {name} failed: {:?}",
            r.payload()
                .map(|p| String::from_utf8_lossy(p.as_ref()).into_owned())
        );
    }
    Ok(())
}

/// What one gateway drain took, and what it cost the gateway.
struct Drain {
    drained: Duration,
    /// Until 3 % of the messages were left.
    most: Duration,
    cpu: Duration,
    rss_kib: u64,
}

/// MiniStack's own SQS event source mapping, `batch` per invoke, `window` seconds.
#[allow(clippy::too_many_arguments)]
async fn esm_drain(
    sqs: &aws_sdk_sqs::Client,
    lambda: &aws_sdk_lambda::Client,
    function: &str,
    id: &str,
    n: usize,
    batch: i32,
    window: i32,
    limit: Duration,
) -> Result<Duration> {
    let url = fill(sqs, &format!("bench-esm{batch}-{id}"), n).await?;
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .context("queue arn")?;
    let start = Instant::now();
    let esm = lambda
        .create_event_source_mapping()
        .function_name(function)
        .event_source_arn(&arn)
        .batch_size(batch)
        .maximum_batching_window_in_seconds(window)
        .send()
        .await?;
    wait_empty(sqs, &url, limit).await?;
    let drained = start.elapsed();
    if let Some(uuid) = esm.uuid() {
        let _ = lambda.delete_event_source_mapping().uuid(uuid).send().await;
    }
    sqs.delete_queue().queue_url(&url).send().await?;
    Ok(drained)
}

/// esm-gateway into the same function, `batch` per invoke, `window` seconds,
/// `concurrency` batches in flight.
#[allow(clippy::too_many_arguments)]
async fn gateway_drain(
    sqs: &aws_sdk_sqs::Client,
    function: &str,
    id: &str,
    n: usize,
    batch: i32,
    window: i32,
    concurrency: usize,
    report: bool,
    limit: Duration,
) -> Result<Drain> {
    let url = fill(sqs, &format!("bench-gw{batch}-{id}"), n).await?;
    let config = format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{ENDPOINT}\"\n\n[admin]\nenabled = false\n\n[[mapping]]\nname = \"bench\"\nfunction = \"{function}\"\nreport_batch_item_failures = {report}\n\n\
             [mapping.batch]\nsize = {batch}\nwindow = \"{window}s\"\n\n[mapping.source]\ntype = \"sqs\"\nqueue_url = \"{url}\"\nmax_concurrency = {}\n",
        concurrency.max(2)
    );
    let start = Instant::now();
    let gw = support::gateway::Gateway::start(&config)?;
    let most = wait_depth(sqs, &url, n as u64 * 3 / 100, limit).await;
    let drained = wait_empty(sqs, &url, limit).await;
    let elapsed = start.elapsed();
    let pid = gw.pid();
    let ticks = support::proc_stats::clock_ticks();
    let cpu = support::proc_stats::cpu_time(&pid, ticks)?;
    let rss_kib = support::proc_stats::peak_rss_kib(&pid)?;
    gw.stop().await?;
    let most = most?;
    drained?;
    sqs.delete_queue().queue_url(&url).send().await?;
    Ok(Drain {
        drained: elapsed,
        most,
        cpu,
        rss_kib,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = env_num("BENCH_MESSAGES", 10_000)?;
    let concurrency = env_num("BENCH_CONCURRENCY", 10)?;
    let batch_large = env_num("BENCH_LARGE_BATCH", 100)?;
    let fail_percent: u32 = env_num("BENCH_FAIL_PERCENT", 1)?;
    let sdk = sdk().await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let lambda = aws_sdk_lambda::Client::new(&sdk);
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let function = format!("bench-noop-{id}");
    deploy(&lambda, &function, FUNCTION).await?;
    let limit = Duration::from_secs(900);

    // 1. Raw receive + delete, and what it cost this process (nothing else runs in it
    // meanwhile): the same SDK making two of the gateway's three calls per ten messages.
    let url = fill(&sqs, &format!("bench-raw-{id}"), n).await?;
    let ticks = support::proc_stats::clock_ticks();
    let cpu_before = support::proc_stats::cpu_time("self", ticks)?;
    let raw = raw_drain(&sqs, &url, n, concurrency).await?;
    let raw_cpu = support::proc_stats::cpu_time("self", ticks)? - cpu_before;
    sqs.delete_queue().queue_url(&url).send().await?;

    // 2 and 3, for each batch shape: MiniStack's own event source mapping, then the
    // gateway, each on a fresh queue of the same messages into the same function.
    let mut rows = Vec::new();
    for (batch, window) in [(10, 0), (batch_large, 1)] {
        let esm = esm_drain(&sqs, &lambda, &function, &id, n, batch, window, limit).await?;
        let gw = gateway_drain(
            &sqs,
            &function,
            &id,
            n,
            batch,
            window,
            concurrency,
            false,
            limit,
        )
        .await?;
        rows.push((batch, window, esm, gw));
    }

    // 4. Batches of 10 into a function that fails some of them, in each mode, each
    // right after an error-free drain of its own: MiniStack's rate drifts between drains,
    // so each failing drain is compared with the one next to it.
    let modes = match fail_percent {
        0 => String::new(),
        _ => std::env::var("BENCH_FAIL_MODES").unwrap_or_else(|_| "raise,report".into()),
    };
    let mut failing = Vec::new();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let (fail, report) = match mode {
            "raise" => (RAISE, false),
            "report" => (REPORT, true),
            other => anyhow::bail!("BENCH_FAIL_MODES: unknown mode {other:?} (raise, report)"),
        };
        let name = format!("bench-{mode}-{id}");
        let code = FAILING_FUNCTION
            .replace("PERCENT", &fail_percent.to_string())
            .replace("FAIL", fail);
        deploy(&lambda, &name, &code).await?;
        warm(&lambda, &name, concurrency).await?;
        let base = gateway_drain(
            &sqs,
            &function,
            &format!("b{mode}{id}"),
            n,
            10,
            0,
            concurrency,
            false,
            limit,
        )
        .await?;
        let run = gateway_drain(
            &sqs,
            &name,
            &format!("{mode}{id}"),
            n,
            10,
            0,
            concurrency,
            report,
            limit,
        )
        .await;
        let _ = lambda.delete_function().function_name(&name).send().await;
        failing.push((mode.to_owned(), base, run?));
    }
    let _ = lambda
        .delete_function()
        .function_name(&function)
        .send()
        .await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("\n{n} messages × 256 B, concurrency {concurrency}, MiniStack on 127.0.0.1\n");
    println!(
        "| path                                            | seconds | messages/s | vs MiniStack ESM |"
    );
    println!(
        "|-------------------------------------------------|---------|------------|------------------|"
    );
    let (_, _, esm10, _) = rows[0];
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / n as f64;
    println!(
        "| raw receive + delete ({concurrency:>2} workers, 10 per call)  | {:>7.2} | {:>10.0} | {:>16.2} |",
        raw.as_secs_f64(),
        rate(raw),
        esm10.as_secs_f64() / raw.as_secs_f64()
    );
    for (batch, window, esm, gw) in &rows {
        let shape = format!("batch {batch}, window {window} s");
        println!(
            "| MiniStack's own ESM, {shape:<26} | {:>7.2} | {:>10.0} | {:>16.2} |",
            esm.as_secs_f64(),
            rate(*esm),
            1.0
        );
        println!(
            "| esm-gateway, {shape:<34} | {:>7.2} | {:>10.0} | {:>16.2} |",
            gw.drained.as_secs_f64(),
            rate(gw.drained),
            esm.as_secs_f64() / gw.drained.as_secs_f64()
        );
    }
    println!(
        "\nraw receive + delete: CPU {:.1} µs/message (two SDK calls per ten messages)",
        per_message(raw_cpu)
    );
    for (batch, window, _, gw) in &rows {
        println!(
            "\ngateway, batch {batch}, window {window} s: / raw drain rate {:.2}; CPU {:.1} µs/message; peak RSS {:.1} MiB",
            rate(gw.drained) / rate(raw),
            per_message(gw.cpu),
            gw.rss_kib as f64 / 1024.0
        );
    }
    // For scripts/bench: row | measured | raw | ratio | target (issue 15).
    let (_, _, _, gw10) = &rows[0];
    println!(
        "\nBENCH-ROW|SQS drain, batch 10, {n} × 256 B: messages/s vs raw receive+delete|{:.0}|{:.0}|{:.2}|≥ 0.95",
        rate(gw10.drained),
        rate(raw),
        rate(gw10.drained) / rate(raw)
    );
    println!(
        "BENCH-ROW|SQS drain, batch 10: gateway CPU µs/message (raw: receive + delete, same SDK)|{:.1}|{:.1}|{:.2}|≤ 30 µs",
        per_message(gw10.cpu),
        per_message(raw_cpu),
        gw10.cpu.as_secs_f64() / raw_cpu.as_secs_f64()
    );
    for (mode, base, failing) in &failing {
        let most = |d: &Drain| (n - n * 3 / 100) as f64 / d.most.as_secs_f64();
        let how = match mode.as_str() {
            "raise" => "raising; MiniStack restarts the function's process after each",
            _ => "a partial batch response naming every record",
        };
        println!(
            "\ngateway, batch 10, {fail_percent} % of first invokes failing ({how}): {:.0} messages/s over the first 97 % \
             (error-free, just before: {:.0}); all {n} drained in {:.2} s",
            most(failing),
            most(base),
            failing.drained.as_secs_f64()
        );
        println!(
            "BENCH-ROW|SQS drain, batch 10, {fail_percent} % of invokes failing ({how}): messages/s vs error-free (first 97 %)|{:.0}|{:.0}|{:.2}|≥ 0.9",
            most(failing),
            most(base),
            most(failing) / most(base)
        );
    }
    Ok(())
}
