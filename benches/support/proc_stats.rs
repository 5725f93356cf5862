//! CPU time and peak RSS of a process, from `/proc` (Linux only).

use std::time::Duration;

use anyhow::{Context, Result};

/// Clock ticks per second of the `utime`/`stime` fields (`getconf CLK_TCK`, 100 if unknown).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// User plus system CPU time of `pid` ("self" for this process) so far.
pub fn cpu_time(pid: &str, ticks: u64) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is parenthesised and may contain spaces: count fields
    // from the last ')'. Field 3 (state) is then the first, utime (14) the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short stat")?
            .parse()
            .context("non-numeric stat field")
    };
    let total_ticks = field(11)? + field(12)?;
    Ok(Duration::from_micros(total_ticks * 1_000_000 / ticks))
}

/// Peak resident set size (`VmHWM`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in status")
}

/// Pids of the local RabbitMQ node (the Erlang VM, `beam.smp`); empty if it runs elsewhere.
pub fn broker_pids() -> Vec<String> {
    pids_named("beam.smp")
}

/// Pids of the local processes whose command name (`/proc/PID/comm`) is `comm`.
pub fn pids_named(comm: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Total CPU time of `pids`; processes that vanished count as zero.
pub fn total_cpu_time(pids: &[String], ticks: u64) -> Duration {
    pids.iter().filter_map(|p| cpu_time(p, ticks).ok()).sum()
}
