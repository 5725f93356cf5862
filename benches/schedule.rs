//! Schedule benchmark: what idle schedules cost, and how close to their time fires are.
//!
//! ```text
//! cargo bench --bench schedule
//! BENCH_IDLE_SCHEDULES=10000 BENCH_IDLE_SECS=60 BENCH_FIRES=500 BENCH_FIRE_SPAN=50 cargo bench --bench schedule
//! ```
//!
//! 1. Idle: the gateway binary runs `BENCH_IDLE_SCHEDULES` cron schedules whose times are
//!    all in 2199; after a 5 s settle, its CPU time and RSS are read from `/proc` over
//!    `BENCH_IDLE_SECS`.
//! 2. Accuracy: it runs `BENCH_FIRES` one-time `at()` schedules spread over
//!    `BENCH_FIRE_SPAN` seconds (about ten per second), firing into an in-process Lambda
//!    API stub that notes when each request arrives; the error of a fire is its arrival
//!    minus the event's scheduled `time` (so it includes the SDK's request to the stub).
//! 3. Prints a Markdown table.
//!
//! Needs Linux (`/proc`); no broker, no MiniStack.

#[allow(dead_code)]
mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use chrono::{DateTime, TimeDelta, Utc};

use support::env_num as num;
use support::gateway::Gateway;
use support::proc_stats;

fn config(stub: SocketAddr, schedules: impl Iterator<Item = (String, String)>) -> String {
    let mut out = format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"http://{stub}\"\n\n[gateway]\nshutdown_grace = \"5s\"\n"
    );
    for (name, expression) in schedules {
        out.push_str(&format!(
            "\n[[mapping]]\nname = \"{name}\"\nfunction = \"bench\"\nsource = {{ type = \"schedule\", expression = \"{expression}\" }}\n"
        ));
    }
    out
}

/// Resident set size now (`VmRSS`), in KiB.
fn rss_kib(pid: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Fire errors seen by the stub, in milliseconds.
type Errors = Arc<Mutex<Vec<f64>>>;

async fn stub() -> Result<(SocketAddr, Errors)> {
    let errors: Errors = Arc::default();
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .with_state(errors.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("lambda stub stopped: {e}");
        }
    });
    Ok((addr, errors))
}

async fn invoke(State(errors): State<Errors>, body: Bytes) -> &'static str {
    let arrived: DateTime<Utc> = SystemTime::now().into();
    let scheduled = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["time"].as_str().map(str::to_owned))
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok());
    if let Some(s) = scheduled {
        let ms = (arrived - s.with_timezone(&Utc))
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e3;
        errors.lock().unwrap().push(ms);
    }
    "null"
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    let idle_n = num("BENCH_IDLE_SCHEDULES", 10_000)?;
    let idle_secs = num("BENCH_IDLE_SECS", 60)?;
    let fires = num("BENCH_FIRES", 500)?;
    let span = num("BENCH_FIRE_SPAN", 50)?.max(1);
    let ticks = proc_stats::clock_ticks();
    let (addr, errors) = stub().await?;

    // 1. Idle schedules.
    let idle = config(
        addr,
        (0..idle_n).map(|i| {
            (
                format!("idle-{i}"),
                format!("cron({} {} 1 1 ? 2199)", i % 60, (i / 60) % 24),
            )
        }),
    );
    let gw = Gateway::start(&idle)?;
    let pid = gw.pid();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_before = proc_stats::cpu_time(&pid, ticks)?;
    let startup_cpu = cpu_before;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu = proc_stats::cpu_time(&pid, ticks)? - cpu_before;
    let idle_rss = rss_kib(&pid)?;
    let idle_peak = proc_stats::peak_rss_kib(&pid)?;
    gw.stop().await?;
    if !errors.lock().unwrap().is_empty() {
        bail!("an idle schedule fired");
    }

    // 2. Fire accuracy: at() schedules from 10 s ahead, spread over the span.
    let start = Utc::now() + TimeDelta::seconds(10);
    let at = |i: u64| {
        (start + TimeDelta::seconds((i % span) as i64))
            .format("at(%Y-%m-%dT%H:%M:%S)")
            .to_string()
    };
    let gw = Gateway::start(&config(
        addr,
        (0..fires).map(|i| (format!("fire-{i}"), at(i))),
    ))?;
    let pid = gw.pid();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(span + 40);
    while (errors.lock().unwrap().len() as u64) < fires {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {fires} fires arrived",
                errors.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fire_peak = proc_stats::peak_rss_kib(&pid)?;
    gw.stop().await?;
    let mut e = errors.lock().unwrap().clone();
    e.sort_by(f64::total_cmp);

    println!("| measure | value |");
    println!("|---|---|");
    println!("| idle schedules | {idle_n} (cron in 2199), one process |");
    println!(
        "| start-up CPU (first 5 s: parse, build {idle_n} mappings) | {:.2} s |",
        startup_cpu.as_secs_f64()
    );
    println!(
        "| idle CPU over {idle_secs} s | {:.3} s ({:.3} % of one core) |",
        idle_cpu.as_secs_f64(),
        idle_cpu.as_secs_f64() * 100.0 / idle_secs as f64
    );
    println!(
        "| idle RSS (peak) | {:.1} MiB ({:.1} MiB) |",
        idle_rss as f64 / 1024.0,
        idle_peak as f64 / 1024.0
    );
    println!(
        "| fires measured | {} over {span} s (at() schedules) |",
        e.len()
    );
    println!(
        "| fire error p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        percentile(&e, 0.5),
        percentile(&e, 0.99),
        e.last().copied().unwrap_or_default()
    );
    println!(
        "| fire error min (never early) | {:.1} ms |",
        e.first().copied().unwrap_or_default()
    );
    println!(
        "| peak RSS while firing | {:.1} MiB |",
        fire_peak as f64 / 1024.0
    );
    // For scripts/bench: row | measured | raw | ratio | target.
    println!(
        "\nBENCH-ROW|schedules: fire error p99 ({} fires)|{:.1} ms|–|–|≤ 1000 ms",
        e.len(),
        percentile(&e, 0.99)
    );
    println!(
        "BENCH-ROW|schedules: {idle_n} idle, RSS / CPU over {idle_secs} s|{:.1} MiB / {:.3} s|–|–|–",
        idle_rss as f64 / 1024.0,
        idle_cpu.as_secs_f64()
    );
    Ok(())
}
