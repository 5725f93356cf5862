//! Starting the gateway binary under test the same way in every benchmark.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// The gateway binary; cargo builds it (same profile) before any benchmark that names it.
const BIN: &str = env!("CARGO_BIN_EXE_esm-gateway");

/// `esm-gateway run --config <config>` with dummy credentials (the SDK signs requests;
/// stubs and MiniStack ignore the signature) and `RUST_LOG` from `BENCH_GATEWAY_LOG`
/// (default `warn`). `BENCH_GATEWAY_BIN` runs another build instead (an older commit's,
/// to compare two in one session).
pub fn spawn(config: &Path) -> Result<Child> {
    let bin = std::env::var("BENCH_GATEWAY_BIN").unwrap_or_else(|_| BIN.into());
    Command::new(&bin)
        .arg("run")
        .arg("--config")
        .arg(config)
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
        .with_context(|| format!("starting {bin}"))
}
