//! The `esm-gateway` command: parse the command line, load and validate the
//! configuration, run until a signal, and exit with a documented code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use esm_gateway::admin::{self, MappingView, client};
use esm_gateway::config::Config;
use esm_gateway::runtime;
use esm_gateway::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Exit codes (also in the README).
const EXIT_CONFIG: u8 = 78; // EX_CONFIG: the configuration file is unreadable or invalid.
const EXIT_RUNTIME: u8 = 70; // EX_SOFTWARE: failure while running (e.g. shutdown grace expired).
const EXIT_DATAERR: u8 = 65; // EX_DATAERR: `redrive` skipped records it cannot read (kept).
const EXIT_UNAVAILABLE: u8 = 69; // EX_UNAVAILABLE: `status`/`health` cannot reach the admin API.

/// Where `status` and `health` find the admin API by default (`[admin] listen`'s default).
const DEFAULT_ADMIN: &str = "http://127.0.0.1:9900";

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
    /// Replay parked failure records into the mapping's function; remove from the
    /// destination only those that now succeed. Exit 0, or 65 when records that cannot
    /// be read as they are were skipped (kept, and named in the log).
    Redrive {
        #[arg(long, short)]
        config: PathBuf,
        /// The mapping whose function gets the records.
        #[arg(long)]
        mapping: String,
        /// Where the parked records are: file:PATH, sqs:QUEUE_URL, rabbitmq:QUEUE or
        /// kafka:TOPIC. Default: the mapping's file, SQS or Kafka on_failure destination.
        #[arg(long)]
        from: Option<esm_gateway::redrive::From>,
        /// List what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the mappings of a running gateway (its admin API's /mappings) as a table.
    Status {
        /// Base URL of the admin API.
        #[arg(long, env = "ESM_GATEWAY_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Bearer token for reads, when the gateway sets `[admin] read_token` (its admin
        /// token works too).
        #[arg(long, env = "ESM_GATEWAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Probe a running gateway: exit 0 if /healthz (or with --ready, /readyz) answers 200,
    /// 1 if it answers otherwise, 69 if it cannot be reached. For container health checks.
    Health {
        /// Base URL of the admin API.
        #[arg(long, env = "ESM_GATEWAY_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Check readiness (every enabled mapping running) instead of liveness.
        #[arg(long)]
        ready: bool,
    },
    /// Print the JSON Schema of the configuration file (what config/esm-gateway.schema.json
    /// holds), for editors that complete and check TOML (Taplo, Even Better TOML).
    ConfigSchema,
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

/// The API listener's TLS configuration, when `[api]` names a certificate: read by
/// `validate` and `run` alike, so that a file `validate` accepts also starts.
fn api_tls(
    config: &Config,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, esm_gateway::api::tls::TlsError> {
    match (&config.api.cert_file, &config.api.key_file) {
        (Some(cert), Some(key)) if config.api.enabled => {
            esm_gateway::api::tls::server_config(cert, key).map(Some)
        }
        _ => Ok(None),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::ConfigSchema => {
            println!("{}", esm_gateway::config::schema());
            ExitCode::SUCCESS
        }
        Command::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                if let Err(e) = api_tls(&c) {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
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
                let schedules = c.mappings.iter().filter_map(|m| {
                    m.source
                        .as_schedule()
                        .map(|s| (m.name.as_str(), s, m.enabled))
                });
                print!(
                    "{}",
                    esm_gateway::source::schedule::dry_run(schedules, from, next)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Redrive {
            config,
            mapping,
            from,
            dry_run,
        } => {
            telemetry::init(cli.log_format);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(esm_gateway::redrive::run(&config, &mapping, from, dry_run)) {
                Ok(r) => {
                    println!(
                        "replayed {}, removed {}, remaining {}, skipped {}{}",
                        r.replayed,
                        r.removed,
                        r.remaining,
                        r.skipped,
                        if dry_run {
                            " (dry run: nothing changed)"
                        } else {
                            ""
                        }
                    );
                    if r.skipped > 0 {
                        // The skipped records are kept but need an operator: a script
                        // must not take this run for a clean one.
                        ExitCode::from(EXIT_DATAERR)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Status { admin, token } => status(&admin, token.as_deref()),
        Command::Health { admin, ready } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            match client::get(&admin, path) {
                Ok(r) if r.status == 200 => ExitCode::SUCCESS,
                Ok(r) => {
                    eprintln!("{path}: HTTP {}: {}", r.status, r.body.trim_end());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            }
        }
        Command::Run { config: path } => {
            let _ = *telemetry::PROCESS_START;
            telemetry::init(cli.log_format);
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let metrics = telemetry::install_metrics();
            match esm_gateway::listen::raise_descriptor_limit() {
                Ok(limit) => tracing::debug!(limit, "open file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
            }
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let exporter = match telemetry::otlp::install(&config.telemetry, rt.handle().clone()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let code = rt.block_on(async {
                let shutdown = CancellationToken::new();
                let (handle, controls) = runtime::handle(&config);
                // Signals are handled before anything else starts: SIGHUP's default
                // action would otherwise kill the process.
                tokio::spawn(on_signal(shutdown.clone(), handle.clone()));
                if config.admin.enabled {
                    let listener = match tokio::net::TcpListener::bind(config.admin.listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listen = %config.admin.listen, error = %e, "cannot start the admin listener");
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    };
                    tracing::info!(listen = %config.admin.listen, "admin API listening");
                    tokio::spawn(admin::serve(listener, handle.clone(), metrics));
                }
                let mut extra = Vec::new();
                if config.api.enabled {
                    let tls = match api_tls(&config) {
                        Ok(tls) => tls,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot serve the API over TLS");
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    };
                    let listener = match tokio::net::TcpListener::bind(config.api.listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listen = %config.api.listen, error = %e, "cannot start the API listener");
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    };
                    let api = match esm_gateway::api::Api::open(handle.clone(), &config.api, path.clone()).await {
                        Ok(api) => api,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot open the API's state");
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    };
                    extra = api.mappings();
                    let resolver = api.clone();
                    handle.set_resolver(std::sync::Arc::new(move || resolver.mappings()));
                    tracing::info!(listen = %config.api.listen, tls = tls.is_some(), mappings = extra.len(), "event source mapping API listening");
                    tokio::spawn(esm_gateway::api::serve(listener, api, tls));
                }
                match runtime::run(config, extra, path, handle, controls, shutdown).await {
                    Ok(()) => {
                        tracing::info!("stopped");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "stopped with an error");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            });
            // The spans not yet exported, on the runtime that is still up.
            if let Some(exporter) = exporter {
                exporter.shutdown();
            }
            code
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; reloads the configuration on
/// every SIGHUP (the outcome is logged by the runtime).
async fn on_signal(shutdown: CancellationToken, handle: runtime::Handle) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration");
                let _ = handle.reload().await;
                continue;
            }
        }
        break;
    }
    shutdown.cancel();
}

/// `esm-gateway status`: /mappings as a table.
fn status(admin: &str, token: Option<&str>) -> ExitCode {
    let reply = match client::get_with_token(admin, "/mappings", token) {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            eprintln!("error: /mappings: HTTP {}: {}", r.status, r.body.trim_end());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let rows: Vec<MappingView> = match serde_json::from_str(&reply.body) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("error: /mappings is not the expected JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table: Vec<[String; 7]> = rows
        .into_iter()
        .map(|m| {
            [
                m.name,
                m.source,
                // The last error then says which record was kept where.
                match m.degraded {
                    Some(_) => format!("{} (degraded)", m.state),
                    None => m.state,
                },
                if m.enabled { "yes" } else { "no" }.to_owned(),
                m.depth.map_or("-".into(), |d| d.to_string()),
                m.last_success.unwrap_or_else(|| "-".into()),
                m.last_error.unwrap_or_else(|| "-".into()),
            ]
            // The gateway sanitises what it records; this also covers another one's.
            .map(|cell| esm_gateway::status::shown(&cell))
        })
        .collect();
    print!("{}", format_table(&table));
    ExitCode::SUCCESS
}

/// Left-aligned columns under a header; the last column (the error) is not padded.
fn format_table(rows: &[[String; 7]]) -> String {
    let header = [
        "NAME",
        "SOURCE",
        "STATE",
        "ENABLED",
        "DEPTH",
        "LAST SUCCESS",
        "LAST ERROR",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 6 {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
