//! Starting and stopping the gateway binary under test the same way in every benchmark.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::lambda_stub::Stats;
use super::proc_stats;

/// The gateway binary; cargo builds it (same profile) before any benchmark that names it.
const BIN: &str = env!("CARGO_BIN_EXE_esm-gateway");

/// How long a gateway may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A running gateway on its own config file, killed if the bench bails out before
/// stopping it.
pub struct Gateway {
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl Gateway {
    /// `esm-gateway run` on `config`, with dummy credentials (the SDK signs requests;
    /// stubs and MiniStack ignore the signature) and `RUST_LOG` from `BENCH_GATEWAY_LOG`
    /// (default `warn`). `BENCH_GATEWAY_BIN` runs another build instead (an older
    /// commit's, to compare two in one session).
    pub fn start(config: &str) -> Result<Gateway> {
        let mut file = tempfile::Builder::new()
            .prefix("esm-gateway-bench-")
            .suffix(".toml")
            .tempfile()?;
        file.write_all(config.as_bytes())?;
        file.flush()?;
        let bin = std::env::var("BENCH_GATEWAY_BIN").unwrap_or_else(|_| BIN.into());
        let child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(file.path())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Gateway {
            child,
            _config: file,
        })
    }

    /// The exit status, if the gateway has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits until `stats` has counted `expected` records, failing if the gateway exits
    /// first or `limit` passes since `started`.
    pub async fn wait_for_stub(
        &mut self,
        stats: &Stats,
        expected: u64,
        started: Instant,
        limit: Duration,
    ) -> Result<()> {
        let done = stats.done();
        tokio::pin!(done);
        loop {
            tokio::select! {
                () = &mut done => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!("the gateway exited early ({status}) after {} records", stats.records());
                    }
                    if started.elapsed() > limit {
                        bail!(
                            "timed out after {limit:?}: the stub saw {} of {expected} records",
                            stats.records(),
                        );
                    }
                }
            }
        }
    }

    /// Stops the gateway the way an orchestrator would (SIGTERM) and waits for it to
    /// exit; warns if it does not exit cleanly. Returns how long the stop took.
    pub async fn stop(mut self) -> Result<Duration> {
        let pid = self.pid();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        let exit = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            ensure!(
                started.elapsed() < STOP_LIMIT,
                "the gateway did not stop within {STOP_LIMIT:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !exit.success() {
            eprintln!("warning: the gateway exited with {exit} after SIGTERM");
        }
        Ok(started.elapsed())
    }
}

/// What one gateway run against the Lambda stub measured.
pub struct StubDrain {
    /// When the process was started.
    pub started: Instant,
    /// When the stub had counted every expected record.
    pub reached: Instant,
    /// When the first invoke arrived, and its records.
    pub first: Instant,
    pub first_records: u64,
    /// Records the stub counted (more than expected if some were redelivered).
    pub records: u64,
    /// The gateway's CPU time and peak RSS, read before it was stopped.
    pub cpu: Duration,
    pub peak_rss_kib: u64,
    /// CPU time of this process (the stub) and of `broker` over the run.
    pub stub_cpu: Duration,
    pub broker_cpu: Duration,
}

/// Starts a gateway on `config`, waits until `stats` has counted `expected` records,
/// reads the gateway's counters, checks the stub's first event and stops the gateway.
pub async fn drain_into_stub(
    config: &str,
    stats: &Stats,
    expected: u64,
    broker: &[String],
    ticks: u64,
    limit: Duration,
) -> Result<StubDrain> {
    let (stub_before, broker_before) = (
        proc_stats::cpu_time("self", ticks)?,
        proc_stats::total_cpu_time(broker, ticks),
    );
    let started = Instant::now();
    let mut gateway = Gateway::start(config)?;
    let pid = gateway.pid();
    eprintln!("gateway pid {pid} draining");
    gateway
        .wait_for_stub(stats, expected, started, limit)
        .await?;
    // Read the gateway's counters at once, before it starts shutting down.
    let cpu = proc_stats::cpu_time(&pid, ticks)?;
    let peak_rss_kib = proc_stats::peak_rss_kib(&pid)?;
    let stub_cpu = proc_stats::cpu_time("self", ticks)? - stub_before;
    let broker_cpu = proc_stats::total_cpu_time(broker, ticks) - broker_before;

    let reached = stats
        .target_reached()
        .context("target reached without a time")?;
    let (first, first_records) = stats.first_invoke().context("no invoke seen")?;
    let records = stats.records();
    if let Some(e) = stats.bad_event() {
        bail!("the stub received a malformed event: {e}");
    }
    if records != expected {
        eprintln!("warning: the stub counted {records} records for {expected} (redeliveries?)");
    }
    let stopped_in = gateway.stop().await?;
    eprintln!("gateway stopped in {stopped_in:.2?}");
    Ok(StubDrain {
        started,
        reached,
        first,
        first_records,
        records,
        cpu,
        peak_rss_kib,
        stub_cpu,
        broker_cpu,
    })
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
