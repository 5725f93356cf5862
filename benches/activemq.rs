//! ActiveMQ drain benchmark: how fast does esm-gateway empty an ActiveMQ queue into
//! Lambda, compared with a plain STOMP 1.2 consumer draining the same queue?
//!
//! ```text
//! cargo bench --bench activemq
//! BENCH_MESSAGES=100000 BENCH_SIZE=1024 BENCH_ACK=client BENCH_WARMUP=20000 BENCH_BATCH=100 \
//!   ESM_ACTIVEMQ_URL=stomp://… cargo bench --bench activemq
//! ```
//!
//! 0. Warms the broker's JVM up: fills and drains `BENCH_WARMUP` messages as below, untimed.
//! 1. Fills a fresh queue with `BENCH_MESSAGES` persistent messages of `BENCH_SIZE` bytes
//!    (STOMP SEND with `content-length`, so JMS bytes messages), a receipt awaited once per
//!    1,000 sends, and checks the queue's depth through the statistics plugin.
//! 2. Times a raw consumer on its own connection (`activemq.prefetchSize` 1000) from
//!    SUBSCRIBE until the last message is received and its acknowledgement confirmed by a
//!    receipt. `BENCH_ACK=client` (default) sends one cumulative ACK every 100 messages, as
//!    the gateway acks a delivered batch; `client-individual` acks every message (flushed
//!    every 100), as it must when one record of a batch is NACKed.
//! 3. Fills the queue again and times the release `esm-gateway` binary (built by `cargo
//!    bench`) draining it into an in-process Lambda API stub that answers `null` at once,
//!    from process start until the stub has counted every record (batches of
//!    `BENCH_BATCH`, prefetch 1000 or the batch if larger, cumulative acks).
//! 4. Checks the queue is empty, prints a Markdown table with each row's ratio to the raw
//!    consumer, and the CPU time per record of the gateway, this process and the broker's
//!    JVM (from `/proc`). The drained queue is removed by
//!    the broker once idle (`scripts/stack` configures that; STOMP cannot delete a queue).
//!
//! Needs a local ActiveMQ with the statistics plugin (`scripts/stack up`, whose `env` sets
//! `ESM_ACTIVEMQ_URL`, `ESM_ACTIVEMQ_USER`, `ESM_ACTIVEMQ_PASSWORD`) and Linux (`/proc`).

mod support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use support::Drain;
use support::lambda_stub::{self, EventKind};
use support::proc_stats;

/// Prefetch of the raw consumer (`activemq.prefetchSize`).
const PREFETCH: u64 = 1000;
/// The raw consumer acks every this many messages, and the last one.
const ACK_EVERY: u64 = 100;
/// While filling, a receipt is awaited once per this many sends.
const RECEIPT_EVERY: u64 = 1000;

#[derive(Clone, Copy, PartialEq)]
enum AckMode {
    /// One cumulative ACK per `ACK_EVERY` messages.
    Client,
    /// One ACK per message, written out once per `ACK_EVERY`.
    ClientIndividual,
}

impl AckMode {
    fn header(self) -> &'static str {
        match self {
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

#[derive(Clone)]
struct Params {
    /// `host:port` of the broker's plain STOMP connector.
    addr: String,
    user: String,
    password: String,
    messages: u64,
    /// Filled and drained untimed first (0: none).
    warmup: u64,
    size: usize,
    ack: AckMode,
    /// The gateway's batch size.
    batch: u64,
    /// The broker's URL as the gateway is given it.
    url: String,
}

impl Params {
    fn from_env() -> Result<Params> {
        use support::env_num as num;
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let url = var("ESM_ACTIVEMQ_URL", "stomp://127.0.0.1:61613");
        let addr = url
            .strip_prefix("stomp://")
            .with_context(|| {
                format!("ESM_ACTIVEMQ_URL={url:?}: only stomp://HOST:PORT is supported here")
            })?
            .trim_end_matches('/')
            .to_owned();
        let ack = match var("BENCH_ACK", "client").as_str() {
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => bail!("BENCH_ACK={other:?}: use client or client-individual"),
        };
        let p = Params {
            addr,
            user: var("ESM_ACTIVEMQ_USER", "esm"),
            password: var("ESM_ACTIVEMQ_PASSWORD", "esm-stack"),
            messages: num("BENCH_MESSAGES", 100_000)?,
            warmup: num("BENCH_WARMUP", 20_000)?,
            size: num("BENCH_SIZE", 1024)?,
            ack,
            batch: num("BENCH_BATCH", 100)?,
            url: url.clone(),
        };
        ensure!(p.messages > 0, "BENCH_MESSAGES must be positive");
        ensure!(
            (1..=10_000).contains(&p.batch),
            "BENCH_BATCH must be between 1 and 10000"
        );
        Ok(p)
    }
}

/// A multi-thread runtime, as a real consumer would use.
#[tokio::main]
async fn main() -> Result<()> {
    let params = Params::from_env()?;
    let ticks = proc_stats::clock_ticks();
    let queue = format!(
        "esm-gateway-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    eprintln!(
        "queue {queue}: {} messages of {} bytes, ack mode {}",
        params.messages,
        params.size,
        params.ack.header()
    );
    let broker = broker_pids();
    if broker.is_empty() {
        eprintln!("note: no local ActiveMQ JVM found; broker CPU will read 0");
    }

    if params.warmup > 0 {
        // The broker's JIT: a cold JVM drains markedly slower (first runs after a start
        // read 70+ µs of broker CPU per record, later ones ~42), so warm it up untimed.
        let warm = Params {
            messages: params.warmup,
            ..params.clone()
        };
        fill(&warm, &queue).await?;
        raw_drain(&warm, &queue).await?;
        eprintln!("warm-up: {} messages filled and drained", params.warmup);
    }
    fill(&params, &queue).await?;
    let (self_before, broker_before) = (
        proc_stats::cpu_time("self", ticks)?,
        proc_stats::total_cpu_time(&broker, ticks),
    );
    let raw = raw_drain(&params, &queue).await?;
    let raw_cpu = proc_stats::cpu_time("self", ticks)? - self_before;
    let raw_broker_cpu = proc_stats::total_cpu_time(&broker, ticks) - broker_before;
    eprintln!(
        "raw consumer: {} records in {:.2?}",
        raw.records, raw.elapsed
    );
    let left = queue_depth(&params, &queue).await?;
    ensure!(
        left == 0,
        "queue {queue} still holds {left} messages after the drain"
    );

    // The gateway, timed against the raw drain (it gets 20 times as long, at least 60 s).
    let (stub, stats) = lambda_stub::start_with(lambda_stub::Options::new(
        params.messages,
        EventKind::ActiveMq,
    ))
    .await?;
    fill(&params, &queue).await?;
    let limit = (raw.elapsed * 20).max(Duration::from_secs(60));
    let run = support::gateway::drain_into_stub(
        &gateway_config(&params, &queue, stub),
        &stats,
        params.messages,
        &broker,
        ticks,
        limit,
    )
    .await?;
    let gw = Drain {
        records: run.records,
        elapsed: run.reached - run.started,
    };
    let left = queue_depth(&params, &queue).await?;
    ensure!(
        left == 0,
        "queue {queue} still holds {left} messages after the gateway's drain"
    );

    let (rows, notes) = gateway_report(&params, &raw, &gw, &run, stats.invokes());
    print!(
        "{}{notes}",
        report(&params, &raw, raw_cpu, raw_broker_cpu, &rows)
    );
    // For scripts/bench: row | measured | raw | ratio | target.
    println!(
        "\nBENCH-ROW|ActiveMQ drain, {} × {} B: records/s|{:.0}|{:.0}|{:.2}|≥ 0.9",
        params.messages,
        params.size,
        gw.rate(),
        raw.rate(),
        gw.rate() / raw.rate()
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// Publishes `params.messages` persistent messages over one connection, pipelined: a
/// receipt is asked for and awaited once per `RECEIPT_EVERY` sends. Checks the queue then
/// holds exactly that many.
async fn fill(params: &Params, queue: &str) -> Result<()> {
    let started = Instant::now();
    let payload: Vec<u8> = (0..params.size).map(|i| b'a' + (i % 26) as u8).collect();
    let length = payload.len().to_string();
    let destination = format!("/queue/{queue}");
    let mut conn = stomp::Conn::connect(params).await?;
    let mut next = 0;
    while next < params.messages {
        let end = (next + RECEIPT_EVERY).min(params.messages);
        for i in next..end {
            let id = format!("m{i}");
            let mut headers = vec![
                ("destination", destination.as_str()),
                ("persistent", "true"),
                ("content-length", length.as_str()),
                ("correlation-id", id.as_str()),
            ];
            if i + 1 == end {
                headers.push(("receipt", "fill"));
            }
            conn.write_frame("SEND", &headers, &payload).await?;
        }
        conn.flush().await?;
        conn.expect_receipt("fill").await.context("publishing")?;
        next = end;
    }
    conn.disconnect().await?;
    let depth = queue_depth(params, queue).await?;
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

/// Drains `params.messages` messages with a plain STOMP consumer; times from SUBSCRIBE
/// until the receipt for the last acknowledgement.
async fn raw_drain(params: &Params, queue: &str) -> Result<Drain> {
    let n = params.messages;
    let mut conn = stomp::Conn::connect(params).await?;
    let destination = format!("/queue/{queue}");
    let prefetch = PREFETCH.to_string();
    let started = Instant::now();
    conn.write_frame(
        "SUBSCRIBE",
        &[
            ("destination", destination.as_str()),
            ("id", "bench-raw"),
            ("ack", params.ack.header()),
            ("activemq.prefetchSize", prefetch.as_str()),
        ],
        b"",
    )
    .await?;
    conn.flush().await?;
    let mut received = 0u64;
    while received < n {
        let frame = conn.read_frame().await?;
        match frame.command.as_str() {
            "MESSAGE" => {}
            "ERROR" => bail!("broker error: {}", frame.describe()),
            other => bail!("unexpected {other} frame while draining"),
        }
        std::hint::black_box(&frame.body);
        received += 1;
        let last = received == n;
        let batch_end = received.is_multiple_of(ACK_EVERY) || last;
        if params.ack == AckMode::ClientIndividual || batch_end {
            let ack = frame
                .header("ack")
                .context("MESSAGE without an ack header")?;
            let mut headers = vec![("id", ack)];
            if last {
                headers.push(("receipt", "drained"));
            }
            conn.write_frame("ACK", &headers, b"").await?;
        }
        if batch_end {
            conn.flush().await?;
        }
    }
    conn.expect_receipt("drained").await?;
    let elapsed = started.elapsed();
    conn.disconnect().await?;
    Ok(Drain {
        records: received,
        elapsed,
    })
}

/// The queue's depth, asked of the broker's statistics plugin: a message to
/// `ActiveMQ.Statistics.Destination.<queue>` is answered with a map message to its
/// `reply-to`, read here as JSON (`transformation: jms-map-json`).
async fn queue_depth(params: &Params, queue: &str) -> Result<u64> {
    let mut conn = stomp::Conn::connect(params).await?;
    conn.write_frame(
        "SUBSCRIBE",
        &[
            ("destination", "/temp-queue/stats"),
            ("id", "stats"),
            ("transformation", "jms-map-json"),
        ],
        b"",
    )
    .await?;
    let statistics = format!("/queue/ActiveMQ.Statistics.Destination.{queue}");
    conn.write_frame(
        "SEND",
        &[
            ("destination", statistics.as_str()),
            ("reply-to", "/temp-queue/stats"),
        ],
        b"",
    )
    .await?;
    conn.flush().await?;
    let frame = tokio::time::timeout(Duration::from_secs(10), conn.read_frame())
        .await
        .context(
            "no answer from the statistics plugin in 10 s (is statisticsBrokerPlugin on?)",
        )??;
    ensure!(
        frame.command == "MESSAGE",
        "statistics: {}",
        frame.describe()
    );
    conn.disconnect().await?;
    // XStream's JSON of a map: {"map":{"entry":[{"string":"size","long":4}, …]}}.
    let json: serde_json::Value =
        serde_json::from_slice(&frame.body).context("statistics reply is not JSON")?;
    json["map"]["entry"]
        .as_array()
        .and_then(|entries| {
            entries
                .iter()
                .find(|e| e["string"] == "size")
                .and_then(|e| e["long"].as_u64())
        })
        .with_context(|| format!("no size in the statistics reply {json}"))
}

fn gateway_config(params: &Params, queue: &str, stub: std::net::SocketAddr) -> String {
    // JSON strings are valid TOML basic strings.
    let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
    format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "http://{stub}"

[gateway]
shutdown_grace = "5s"

[[mapping]]
name = "bench"
function = "bench-fn"

[mapping.source]
type = "activemq"
url = {url}
username = {user}
password = {password}
queue = {queue}
prefetch = {prefetch}

[mapping.batch]
size = {batch}
window = "500ms"
"#,
        url = s(&params.url),
        user = s(&params.user),
        password = s(&params.password),
        queue = s(queue),
        prefetch = PREFETCH.max(params.batch),
        batch = params.batch,
    )
}

/// The gateway's table rows, with their ratio to the raw consumer, and a line of its
/// costs.
fn gateway_report(
    params: &Params,
    raw: &Drain,
    gw: &Drain,
    run: &support::gateway::StubDrain,
    invokes: u64,
) -> (String, String) {
    let per_record = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    let mut out = String::new();
    let mut row = |path: &str, d: &Drain| {
        let _ = writeln!(
            out,
            "| {path:<44} | {:>7} | {:>7.2} | {:>9.0} | {:>5.2} |",
            d.records,
            d.elapsed.as_secs_f64(),
            d.rate(),
            d.rate() / raw.rate()
        );
    };
    row(&format!("esm-gateway (batch {})", params.batch), gw);
    if run.reached > run.first {
        let steady = Drain {
            records: run.records - run.first_records,
            elapsed: run.reached - run.first,
        };
        row("esm-gateway, first→last invoke", &steady);
    }
    let mut notes = String::new();
    let _ = writeln!(
        notes,
        "gateway CPU: {:.1} µs/record, peak RSS: {:.1} MiB, invokes: {invokes}; \
         start → first invoke {:.3} s; lambda stub CPU {:.1} µs/record; broker CPU {:.1} µs/record",
        per_record(run.cpu, gw.records),
        run.peak_rss_kib as f64 / 1024.0,
        (run.first - run.started).as_secs_f64(),
        per_record(run.stub_cpu, gw.records),
        per_record(run.broker_cpu, gw.records),
    );
    (out, notes)
}

/// The local ActiveMQ JVM(s): `java` processes whose command line names activemq.jar.
fn broker_pids() -> Vec<String> {
    proc_stats::pids_named("java")
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(12).any(|w| w == b"activemq.jar"))
        })
        .collect()
}

fn report(
    params: &Params,
    raw: &Drain,
    raw_cpu: Duration,
    raw_broker_cpu: Duration,
    gateway_rows: &str,
) -> String {
    let per_record = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    let mut out = format!(
        "\n{} messages × {} B\n\n| {:<44} | records | seconds | records/s | ratio |\n|{}|---------|---------|-----------|-------|\n",
        params.messages,
        params.size,
        "path",
        "-".repeat(46)
    );
    let mut row = |path: &str, d: &Drain| {
        let _ = writeln!(
            out,
            "| {path:<44} | {:>7} | {:>7.2} | {:>9.0} | {:>5.2} |",
            d.records,
            d.elapsed.as_secs_f64(),
            d.rate(),
            d.rate() / raw.rate()
        );
    };
    row(
        &format!("raw STOMP consumer, ack {}", params.ack.header()),
        raw,
    );
    out.push_str(gateway_rows);
    let _ = writeln!(
        out,
        "\nraw consumer CPU: {:.1} µs/record; broker CPU: {:.1} µs/record",
        per_record(raw_cpu, raw.records),
        per_record(raw_broker_cpu, raw.records)
    );
    out
}

/// A minimal STOMP 1.2 client over plain TCP: what the raw consumer needs and no more
/// (no heart-beats, no TLS). The gateway's ActiveMQ source has its own.
mod stomp {
    use anyhow::{Context, Result, bail, ensure};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
    use tokio::net::TcpStream;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    pub struct Frame {
        pub command: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Frame {
        /// The first value of header `name` (STOMP 1.2: the first one wins).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        /// The command with an ERROR's message and body, for error texts.
        pub fn describe(&self) -> String {
            let body = String::from_utf8_lossy(&self.body);
            let body: String = body.chars().take(300).collect();
            format!(
                "{} {} {}",
                self.command,
                self.header("message").unwrap_or(""),
                body.trim()
            )
        }
    }

    pub struct Conn {
        reader: BufReader<OwnedReadHalf>,
        writer: BufWriter<OwnedWriteHalf>,
        line: Vec<u8>,
    }

    impl Conn {
        pub async fn connect(params: &super::Params) -> Result<Conn> {
            let tcp = TcpStream::connect(&params.addr).await.with_context(|| {
                format!(
                    "cannot connect to ActiveMQ's STOMP port at {} (set ESM_ACTIVEMQ_URL; \
                     is it running? `scripts/stack status`)",
                    params.addr
                )
            })?;
            tcp.set_nodelay(true)?;
            let (r, w) = tcp.into_split();
            let mut conn = Conn {
                reader: BufReader::with_capacity(256 * 1024, r),
                writer: BufWriter::with_capacity(256 * 1024, w),
                line: Vec::new(),
            };
            conn.write_frame(
                "CONNECT",
                &[
                    ("accept-version", "1.2"),
                    ("host", "localhost"),
                    ("login", &params.user),
                    ("passcode", &params.password),
                    ("heart-beat", "0,0"),
                ],
                b"",
            )
            .await?;
            conn.flush().await?;
            let reply = conn.read_frame().await?;
            ensure!(
                reply.command == "CONNECTED",
                "STOMP login refused: {}",
                reply.describe()
            );
            Ok(conn)
        }

        /// Buffers one frame; `flush` sends what is buffered.
        pub async fn write_frame(
            &mut self,
            command: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> Result<()> {
            let mut head = String::with_capacity(128);
            head.push_str(command);
            head.push('\n');
            for (k, v) in headers {
                // CONNECT's headers are not escaped (STOMP 1.2).
                if command == "CONNECT" {
                    head.push_str(k);
                    head.push(':');
                    head.push_str(v);
                } else {
                    escape_into(&mut head, k);
                    head.push(':');
                    escape_into(&mut head, v);
                }
                head.push('\n');
            }
            head.push('\n');
            self.writer.write_all(head.as_bytes()).await?;
            self.writer.write_all(body).await?;
            self.writer.write_all(b"\0").await?;
            Ok(())
        }

        pub async fn flush(&mut self) -> Result<()> {
            self.writer.flush().await?;
            Ok(())
        }

        /// Reads one frame, skipping heart-beat EOLs; the body is read by
        /// `content-length` when given, else up to the NUL.
        pub async fn read_frame(&mut self) -> Result<Frame> {
            let command = loop {
                let line = self.read_line().await?;
                if !line.is_empty() {
                    break line;
                }
            };
            let mut headers = Vec::new();
            loop {
                let line = self.read_line().await?;
                if line.is_empty() {
                    break;
                }
                let (k, v) = line
                    .split_once(':')
                    .with_context(|| format!("malformed header line {line:?}"))?;
                let unescape = command != "CONNECTED";
                headers.push(if unescape {
                    (unescape_str(k)?, unescape_str(v)?)
                } else {
                    (k.to_owned(), v.to_owned())
                });
            }
            let length = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse::<usize>())
                .transpose()
                .context("bad content-length")?;
            let body = match length {
                Some(n) => {
                    let mut body = vec![0; n + 1];
                    self.reader.read_exact(&mut body).await?;
                    ensure!(body.pop() == Some(0), "frame body not followed by NUL");
                    body
                }
                None => {
                    let mut body = Vec::new();
                    self.reader.read_until(0, &mut body).await?;
                    ensure!(body.pop() == Some(0), "connection closed inside a frame");
                    body
                }
            };
            Ok(Frame {
                command,
                headers,
                body,
            })
        }

        async fn read_line(&mut self) -> Result<String> {
            self.line.clear();
            let n = self.reader.read_until(b'\n', &mut self.line).await?;
            if n == 0 {
                bail!("the broker closed the connection");
            }
            self.line.pop();
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::str::from_utf8(&self.line).context("header line is not UTF-8")?;
            Ok(line.to_owned())
        }

        /// Waits for RECEIPT `id`; an ERROR (or anything else) is an error.
        pub async fn expect_receipt(&mut self, id: &str) -> Result<()> {
            let frame = self.read_frame().await?;
            if frame.command == "RECEIPT" && frame.header("receipt-id") == Some(id) {
                return Ok(());
            }
            bail!("expected RECEIPT {id}, got {}", frame.describe())
        }

        pub async fn disconnect(mut self) -> Result<()> {
            self.write_frame("DISCONNECT", &[("receipt", "bye")], b"")
                .await?;
            self.flush().await?;
            self.expect_receipt("bye").await
        }
    }

    fn escape_into(out: &mut String, s: &str) {
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                ':' => out.push_str("\\c"),
                c => out.push(c),
            }
        }
    }

    fn unescape_str(s: &str) -> Result<String> {
        if !s.contains('\\') {
            return Ok(s.to_owned());
        }
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            out.push(match chars.next() {
                Some('\\') => '\\',
                Some('n') => '\n',
                Some('r') => '\r',
                Some('c') => ':',
                other => bail!("undefined escape \\{other:?} in a header"),
            });
        }
        Ok(out)
    }
}
