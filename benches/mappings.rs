//! Many-mappings probe: what N idle mappings of one kind cost one gateway process.
//!
//! ```text
//! cargo bench --bench mappings
//! BENCH_PROBE_KINDS=sqs,schedule,rabbitmq BENCH_MAPPINGS=1000 BENCH_MAPPINGS_RABBITMQ=20 \
//!   BENCH_PROBE_IDLE_SECS=10 cargo bench --bench mappings
//! ```
//!
//! For each kind in `BENCH_PROBE_KINDS`: writes a config of N mappings of that kind
//! (`BENCH_MAPPINGS_<KIND>`, default `BENCH_MAPPINGS`, default 1,000), each on a source of
//! its own (RabbitMQ: a queue the gateway declares; SQS: a MiniStack queue this probe
//! creates; schedule: a cron in 2199; Kafka, only when named: a topic of one partition
//! this probe creates, each mapping its own consumer group), starts the release gateway, waits until the admin
//! API reports every mapping `running`, then reads from `/proc` its RSS, peak RSS, thread
//! count and CPU time over `BENCH_PROBE_IDLE_SECS` (default 10), and for RabbitMQ the
//! broker's connection count (`rabbitmqctl list_connections`). Deletes what it created.
//!
//! RabbitMQ: mappings share connections (256 channels each), so 1,000 mappings take 4 of
//! the broker's 1,024 file descriptors.
//!
//! Needs the local stack (RabbitMQ: `AMQP_URL`; SQS: MiniStack on 127.0.0.1:4566) and
//! Linux (`/proc`).

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;

use support::env_num as num;
use support::gateway::Gateway;
use support::proc_stats;

const SQS_ENDPOINT: &str = "http://127.0.0.1:4566";
/// How long every mapping may take to be running.
const START_LIMIT: Duration = Duration::from_secs(180);

struct Probe {
    kind: String,
    mappings: u64,
    rss_kib: u64,
    peak_kib: u64,
    threads: u64,
    idle_cpu: Duration,
    idle_secs: u64,
    startup: Duration,
    connections: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let kinds: Vec<String> = std::env::var("BENCH_PROBE_KINDS")
        .unwrap_or_else(|_| "sqs,schedule,rabbitmq".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let default_n: u64 = num("BENCH_MAPPINGS", 1000)?;
    let idle_secs: u64 = num("BENCH_PROBE_IDLE_SECS", 10)?;
    let mut probes = Vec::new();
    for kind in &kinds {
        let n: u64 = num(
            &format!("BENCH_MAPPINGS_{}", kind.to_uppercase()),
            default_n,
        )?;
        ensure!(n > 0, "{kind}: at least one mapping");
        let probe = match kind.as_str() {
            "schedule" => probe_schedule(n, idle_secs).await?,
            "sqs" => probe_sqs(n, idle_secs).await?,
            "rabbitmq" => probe_rabbitmq(n, idle_secs).await?,
            "kafka" => probe_kafka(n, idle_secs).await?,
            other => {
                bail!("BENCH_PROBE_KINDS: unknown kind {other:?} (rabbitmq, sqs, schedule, kafka)")
            }
        };
        probes.push(probe);
    }

    println!(
        "\n| mappings | all running after | RSS (peak) | threads | idle CPU | broker connections |"
    );
    println!("|---|---|---|---|---|---|");
    for p in &probes {
        println!(
            "| {} × {} | {:.1} s | {:.1} MiB ({:.1} MiB) | {} | {:.3} s over {} s ({:.2} % of a core) | {} |",
            p.mappings,
            p.kind,
            p.startup.as_secs_f64(),
            p.rss_kib as f64 / 1024.0,
            p.peak_kib as f64 / 1024.0,
            p.threads,
            p.idle_cpu.as_secs_f64(),
            p.idle_secs,
            p.idle_cpu.as_secs_f64() * 100.0 / p.idle_secs as f64,
            p.connections.map_or("–".to_owned(), |c| c.to_string()),
        );
    }
    // For scripts/bench: row | measured | raw | ratio | target.
    for p in &probes {
        println!(
            "BENCH-ROW|{} idle {} mappings: RSS / threads / CPU % of a core{}|{:.1} MiB / {} / {:.2} %|–|–|–",
            p.mappings,
            p.kind,
            p.connections
                .map_or(String::new(), |c| format!(" / broker connections {c}")),
            p.rss_kib as f64 / 1024.0,
            p.threads,
            p.idle_cpu.as_secs_f64() * 100.0 / p.idle_secs as f64,
        );
    }
    Ok(())
}

fn header(admin: &str) -> String {
    format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{SQS_ENDPOINT}\"\n\n\
         [gateway]\nshutdown_grace = \"5s\"\n\n[admin]\nlisten = \"{admin}\"\n"
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn stamp() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A field of `/proc/PID/status` (the number before any unit).
fn status_field(pid: &str, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Starts the gateway on `config`, waits until all `n` mappings are running, measures,
/// stops it.
async fn measure(kind: &str, n: u64, idle_secs: u64, config: &str, admin: &str) -> Result<Probe> {
    let started = Instant::now();
    let mut gw = Gateway::start(config)?;
    let pid = gw.pid();
    let base = format!("http://{admin}");
    let mut last = String::new();
    loop {
        if let Some(status) = gw.exited()? {
            bail!("{kind}: the gateway exited ({status}) before its mappings ran");
        }
        ensure!(
            started.elapsed() < START_LIMIT,
            "{kind}: not every mapping was running within {START_LIMIT:?}: {last}"
        );
        let b = base.clone();
        let reply =
            tokio::task::spawn_blocking(move || esm_gateway::admin::client::get(&b, "/mappings"))
                .await?;
        if let Ok(r) = reply
            && r.status == 200
        {
            let rows: Vec<serde_json::Value> = serde_json::from_str(&r.body)?;
            let running = rows.iter().filter(|m| m["state"] == "running").count() as u64;
            last = format!("{running} of {n} running");
            if running == n && rows.len() as u64 == n {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let startup = started.elapsed();
    eprintln!("{kind}: {n} mappings running after {startup:.2?}");
    let ticks = proc_stats::clock_ticks();
    let before = proc_stats::cpu_time(&pid, ticks)?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu = proc_stats::cpu_time(&pid, ticks)? - before;
    let rss_kib = status_field(&pid, "VmRSS:")?;
    let peak_kib = status_field(&pid, "VmHWM:")?;
    let threads = status_field(&pid, "Threads:")?;
    let connections = if kind == "rabbitmq" {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "list_connections", "name"])
            .output()
            .context("running rabbitmqctl")?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("name"))
                .count() as u64,
        )
    } else {
        None
    };
    gw.stop().await?;
    Ok(Probe {
        kind: kind.to_owned(),
        mappings: n,
        rss_kib,
        peak_kib,
        threads,
        idle_cpu,
        idle_secs,
        startup,
        connections,
    })
}

async fn probe_schedule(n: u64, idle_secs: u64) -> Result<Probe> {
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut config = header(&admin);
    for i in 0..n {
        config.push_str(&format!(
            "\n[[mapping]]\nname = \"probe-{i}\"\nfunction = \"probe\"\n\
             source = {{ type = \"schedule\", expression = \"cron({} {} 1 1 ? 2199)\" }}\n",
            i % 60,
            (i / 60) % 24
        ));
    }
    measure("schedule", n, idle_secs, &config, &admin).await
}

async fn probe_sqs(n: u64, idle_secs: u64) -> Result<Probe> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(SQS_ENDPOINT)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "probe",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let id = stamp();
    let urls: Vec<Result<String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let sqs = sqs.clone();
            let name = format!("esm-gateway-probe-{id}-{i}");
            async move {
                let out = sqs
                    .create_queue()
                    .queue_name(&name)
                    .send()
                    .await
                    .with_context(|| format!("creating queue {name} (is MiniStack running?)"))?;
                out.queue_url().map(str::to_owned).context("no queue URL")
            }
        })
        .buffered(8)
        .collect()
        .await;
    let created: Vec<String> = urls
        .iter()
        .filter_map(|u| u.as_ref().ok().cloned())
        .collect();
    let result = async {
        let urls: Vec<String> = urls.into_iter().collect::<Result<_>>()?;
        eprintln!("sqs: {} queues created", urls.len());
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut config = header(&admin);
        for (i, url) in urls.iter().enumerate() {
            config.push_str(&format!(
                "\n[[mapping]]\nname = \"probe-{i}\"\nfunction = \"probe\"\n\
                 source = {{ type = \"sqs\", queue_url = \"{url}\" }}\n"
            ));
        }
        measure("sqs", n, idle_secs, &config, &admin).await
    }
    .await;
    let deleted: Vec<_> = futures_util::stream::iter(created)
        .map(|url| {
            let sqs = sqs.clone();
            async move { sqs.delete_queue().queue_url(&url).send().await }
        })
        .buffered(8)
        .collect()
        .await;
    let failed = deleted.iter().filter(|d| d.is_err()).count();
    if failed > 0 {
        eprintln!("warning: {failed} probe queues could not be deleted");
    }
    result
}

async fn probe_rabbitmq(n: u64, idle_secs: u64) -> Result<Probe> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let id = stamp();
    let queues: Vec<String> = (0..n)
        .map(|i| format!("esm-gateway-probe-{id}-{i}"))
        .collect();
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut config = header(&admin);
    let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
    for (i, q) in queues.iter().enumerate() {
        config.push_str(&format!(
            "\n[[mapping]]\nname = \"probe-{i}\"\nfunction = \"probe\"\n\
             source = {{ type = \"rabbitmq\", url = {}, queue = {}, declare = true }}\n",
            s(&url),
            s(q)
        ));
    }
    let result = measure("rabbitmq", n, idle_secs, &config, &admin).await;
    // The gateway declared the queues: remove them over one connection.
    match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
        Ok(conn) => {
            let ch = conn.create_channel().await?;
            for q in &queues {
                let _ = ch
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        Err(e) => eprintln!("warning: cannot connect to delete the probe queues: {e}"),
    }
    result
}

async fn probe_kafka(n: u64, idle_secs: u64) -> Result<Probe> {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let admin_client: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let id = stamp();
    let topics: Vec<String> = (0..n)
        .map(|i| format!("esm-gateway-probe-{id}-{i}"))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    for r in admin_client
        .create_topics(&new, &opts)
        .await
        .context("creating the probe topics (is the broker running?)")?
    {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut config = header(&admin);
    let s = |v: &str| serde_json::to_string(v).expect("string to JSON");
    for (i, t) in topics.iter().enumerate() {
        config.push_str(&format!(
            "\n[[mapping]]\nname = \"probe-{i}\"\nfunction = \"probe\"\n\
             source = {{ type = \"kafka\", bootstrap_servers = {}, topics = [{}] }}\n",
            s(&bootstrap),
            s(t)
        ));
    }
    let result = measure("kafka", n, idle_secs, &config, &admin).await;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    if let Err(e) = admin_client.delete_topics(&names, &opts).await {
        eprintln!("warning: could not delete the probe topics: {e}");
    }
    result
}
