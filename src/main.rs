//! The `esm-gateway` command: parse the command line, load and validate the
//! configuration, run until a signal, and exit with a documented code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use esm_gateway::config::Config;
use esm_gateway::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Exit codes (also in the README).
const EXIT_CONFIG: u8 = 78; // EX_CONFIG: the configuration file is unreadable or invalid.
const EXIT_RUNTIME: u8 = 70; // EX_SOFTWARE: failure while running (e.g. shutdown grace expired).

#[derive(Parser)]
#[command(
    name = "esm-gateway",
    version,
    about = "AWS Lambda event source mappings for RabbitMQ, Kafka and schedules, outside AWS"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ESM_GATEWAY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mappings of a configuration file until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit: 0 if valid, 78 if not.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the next fire times of every schedule, in UTC and in its zone.
    Schedules {
        #[arg(long, short)]
        config: PathBuf,
        /// How many fire times per schedule.
        #[arg(long, default_value_t = 5)]
        next: usize,
        /// Count from this RFC 3339 time instead of now.
        #[arg(long, value_parser = parse_time)]
        from: Option<chrono::DateTime<chrono::Utc>>,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}; write an RFC 3339 time such as 2026-03-29T00:00:00Z"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} mapping(s))", config.display(), c.mappings.len());
                for m in &c.mappings {
                    println!(
                        "  {} ({}): {} -> {}{}",
                        m.name,
                        if m.enabled { "enabled" } else { "disabled" },
                        m.source.kind(),
                        m.function,
                        m.on_failure
                            .as_ref()
                            .map_or(String::new(), |_| ", with on-failure destination".into())
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Schedules { config, next, from } => match Config::load(&config) {
            Ok(c) => {
                let from = from.unwrap_or_else(chrono::Utc::now);
                print!("{}", esm_gateway::source::schedule::dry_run(&c, from, next));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            telemetry::init(cli.log_format);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(on_signal(shutdown.clone()));
                match esm_gateway::runtime::run(config, shutdown).await {
                    Ok(_) => {
                        tracing::info!("stopped");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "stopped with an error");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
