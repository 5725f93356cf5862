//! Shared harness for the integration tests: the local stack's addresses, a Python test
//! function deployed into MiniStack, the gateway binary run as a child process, and
//! RabbitMQ helpers. Every wait is a bounded poll for an observable event.

#![allow(dead_code)]

pub mod amq;
pub mod freezer;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// The local PostgreSQL (`ESM_TEST_POSTGRES_URL`, default the stack's).
pub fn postgres_url() -> String {
    std::env::var("ESM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new schema of the local PostgreSQL, and a URL whose connections work in it (their
/// `search_path`), so that tests running at once keep their tables apart.
pub async fn postgres_schema(prefix: &str) -> (String, String) {
    let schema = unique(prefix).replace('-', "_");
    postgres_admin(&format!("CREATE SCHEMA {schema}")).await;
    let sep = if postgres_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{sep}options=-csearch_path%3D{schema}", postgres_url());
    (schema, url)
}

/// Drops a schema made by [`postgres_schema`], with what it holds.
pub async fn drop_schema(schema: &str) {
    postgres_admin(&format!("DROP SCHEMA {schema} CASCADE")).await;
}

/// Runs `sql` on a connection of its own to the local PostgreSQL.
async fn postgres_admin(sql: &str) {
    let (admin, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL (is `scripts/stack up` running?)");
    tokio::spawn(connection);
    admin.batch_execute(sql).await.unwrap();
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A TCP port that was free a moment ago (bound to :0, read, released), for a gateway's
/// admin listener: the config cannot ask for port 0.
pub fn free_port() -> u16 {
    // Below Linux's ephemeral range (32768-60999), so that no outgoing connection can
    // take the port between now and the gateway's bind, and never the same port twice in
    // one test process (two gateways of one test each get their own).
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut used = USED.lock().unwrap();
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if !used.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.push(port);
            return port;
        }
    }
}

/// The admin token of [`rabbit_config`]'s gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Polls `check` every 50 ms until it returns Some, or panics after `timeout` with `what`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ the function

/// A deployed copy of tests/functions/recorder.py with its own log and state.
pub struct Function {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl Function {
    /// Deploys the recorder with these extra environment variables.
    pub async fn deploy(prefix: &str, vars: &[(&str, &str)]) -> Function {
        let name = unique(prefix);
        let dir = tempfile::tempdir().unwrap();
        let mut env = aws_sdk_lambda::types::Environment::builder()
            .variables("LOG_FILE", dir.path().join("log.jsonl").to_str().unwrap())
            .variables("STATE_DIR", dir.path().to_str().unwrap());
        for (k, v) in vars {
            env = env.variables(*k, *v);
        }
        lambda_client()
            .await
            .create_function()
            .function_name(&name)
            .runtime(aws_sdk_lambda::types::Runtime::Python312)
            .role("arn:aws:iam::000000000000:role/esm-gateway-test")
            .handler("recorder.handler")
            .timeout(30)
            .environment(env.build())
            .code(
                aws_sdk_lambda::types::FunctionCode::builder()
                    .zip_file(recorder_zip().into())
                    .build(),
            )
            .send()
            .await
            .expect("create the test function in MiniStack (is `scripts/stack up` running?)");
        Function { name, dir }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log.jsonl")
    }

    /// One entry per invoke, in order.
    pub fn invocations(&self) -> Vec<Invocation> {
        let Ok(text) = std::fs::read_to_string(self.log_path()) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| l.ends_with('}'))
            .map(|l| serde_json::from_str(l).expect("log line"))
            .collect()
    }

    /// Bodies of successful invokes, in delivery order.
    pub fn delivered(&self) -> Vec<String> {
        self.invocations()
            .into_iter()
            .filter(|i| i.ok)
            .flat_map(|i| {
                // A failed item is named by its message id: SQS's own, or RabbitMQ's
                // "id-<body>" that the harness publishes with.
                let ids = if i.ids.is_empty() {
                    i.bodies.iter().map(|b| format!("id-{b}")).collect()
                } else {
                    i.ids
                };
                let failed = i.failed;
                i.bodies
                    .into_iter()
                    .zip(ids)
                    .filter(move |(_, id)| !failed.contains(id))
                    .map(|(b, _)| b)
            })
            .collect()
    }

    /// Waits until the function was invoked `n` times and returns the invocations.
    pub async fn wait_invocations(&self, n: usize, timeout: Duration) -> Vec<Invocation> {
        wait_for(&format!("{n} invocations"), timeout, || {
            let i = self.invocations();
            (i.len() >= n).then_some(i)
        })
        .await
    }

    /// Waits until `n` bodies were delivered successfully.
    pub async fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<String> {
        wait_for(&format!("{n} delivered messages"), timeout, || {
            let d = self.delivered();
            (d.len() >= n).then_some(d)
        })
        .await
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct Invocation {
    pub bodies: Vec<String>,
    pub redelivered: Vec<bool>,
    pub ok: bool,
    pub failed: Vec<String>,
    pub event: Option<Value>,
    /// SQS message ids and FIFO groups, in body order.
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub groups: Vec<Option<String>>,
}

fn recorder_zip() -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    zip.start_file("recorder.py", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(include_bytes!("../functions/recorder.py"))
        .unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

/// The SDK configuration of the test clients: MiniStack, dummy credentials.
async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(aws_endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await
}

pub async fn sqs_client() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&sdk_config().await)
}

/// A new standard SQS queue named after `prefix`; its URL.
pub async fn sqs_queue(client: &aws_sdk_sqs::Client, prefix: &str) -> String {
    client
        .create_queue()
        .queue_name(unique(prefix))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

pub async fn lambda_client() -> aws_sdk_lambda::Client {
    aws_sdk_lambda::Client::new(&sdk_config().await)
}

// ------------------------------------------------------------------ RabbitMQ

pub struct Rabbit {
    pub conn: Connection,
    pub channel: Channel,
}

impl Rabbit {
    pub async fn connect() -> Rabbit {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ (is `scripts/stack up` running?)");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Rabbit { conn, channel }
    }

    /// Declares a fresh durable queue and returns its name.
    pub async fn queue(&self, prefix: &str) -> String {
        let name = unique(prefix);
        self.declare(&name).await;
        name
    }

    /// Declares the durable queue `name`.
    pub async fn declare(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Publishes persistent messages with message id `id-<body>` and waits for confirms.
    pub async fn publish(&self, queue: &str, bodies: impl IntoIterator<Item = Vec<u8>>) {
        for body in bodies {
            let id = format!(
                "id-{}",
                String::from_utf8_lossy(&body[..body.len().min(64)])
            );
            self.channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_priority(0)
                        .with_message_id(id.as_str().into()),
                )
                .await
                .unwrap();
        }
        let returned = self.channel.wait_for_confirms().await.unwrap();
        assert!(returned.is_empty());
    }

    /// Ready (not unacknowledged) messages in `queue`.
    pub async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }

    pub async fn delete(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Runs `rabbitmqctl` on the local broker; panics with its stderr if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker's ids of the AMQP connections of the gateway process `pid`, which names
/// them "esm-gateway[<pid>] <purpose> #<n>" (`rabbitmqctl list_connections`: the
/// broker's count, not the gateway's).
pub fn gateway_connections(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl list_connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marker = format!("esm-gateway[{pid}] ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// `msg-0000` … as bodies.
pub fn numbered(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("msg-{i:04}").into_bytes()).collect()
}

pub fn numbered_strings(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("msg-{i:04}")).collect()
}

// ------------------------------------------------------------------ the gateway

/// The gateway binary running on a config file, with its stderr collected.
pub struct Gateway {
    child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    config: tempfile::NamedTempFile,
    /// `http://127.0.0.1:PORT` of its admin API, when the config has `[admin] listen`.
    pub admin: Option<String>,
}

impl Gateway {
    pub fn start(config: &str) -> Gateway {
        Self::start_with_env(config, &[])
    }

    /// Starts the gateway with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(config.as_bytes()).unwrap();
        let admin = toml::from_str::<toml::Table>(config)
            .ok()
            .and_then(|t| t.get("admin")?.get("listen")?.as_str().map(String::from))
            .map(|listen| format!("http://{listen}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
            .args(["run", "--config"])
            .arg(file.path())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,esm_gateway=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start esm-gateway");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("ESM_TEST_ECHO").is_some() {
                    eprintln!("gateway: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Gateway {
            child,
            logs,
            config: file,
            admin,
        }
    }

    /// Rewrites the config file (the gateway reads it again on SIGHUP).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.config.path(), config).unwrap();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the `n`th log line containing `needle` appears.
    pub async fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        wait_for(
            &format!("{n} gateway log line(s) containing {needle:?}"),
            timeout,
            || (self.log_count(needle) >= n).then_some(()),
        )
        .await;
    }

    pub fn admin_url(&self) -> &str {
        self.admin
            .as_deref()
            .expect("the gateway's config has no [admin] listen")
    }

    /// `GET` on the admin API: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = esm_gateway::admin::client::get(self.admin_url(), path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status, r.body)
    }

    /// `GET` on the admin API with an optional bearer token: status and body.
    pub fn get_as(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let r = esm_gateway::admin::client::get_with_token(self.admin_url(), path, token)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status, r.body)
    }

    /// `POST` on the admin API with an optional bearer token: status and body.
    pub fn post(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let r = esm_gateway::admin::client::post(self.admin_url(), path, token)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        (r.status, r.body)
    }

    /// Waits until the admin API answers `/healthz`.
    pub async fn wait_admin(&self) {
        let url = self.admin_url().to_owned();
        wait_for("the admin API to answer", LONG_WAIT, || {
            esm_gateway::admin::client::get(&url, "/healthz")
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
    }

    /// Waits until `/readyz` answers `status`; returns its body.
    pub async fn wait_ready_status(&self, status: u16) -> Value {
        let url = self.admin_url().to_owned();
        wait_for(&format!("/readyz to answer {status}"), LONG_WAIT, || {
            esm_gateway::admin::client::get(&url, "/readyz")
                .ok()
                .filter(|r| r.status == status)
                .map(|r| serde_json::from_str(&r.body).unwrap())
        })
        .await
    }

    /// `GET /mappings` parsed.
    pub fn mappings(&self) -> Vec<Value> {
        let (status, body) = self.get("/mappings");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// One mapping's row of `/mappings`.
    pub fn mapping(&self, name: &str) -> Value {
        self.mappings()
            .into_iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mapping {name} in /mappings"))
    }

    /// A scrape of `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics(body)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// The log lines so far that contain `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> Vec<String> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("gateway log line containing {needle:?}"),
            timeout,
            || self.log_contains(needle).then_some(()),
        )
        .await;
    }

    /// SIGKILL: no chance to acknowledge anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status and how long the exit took (bounded wait).
    pub async fn terminate_timed(self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let status = self.terminate().await;
        (status, started.elapsed())
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub async fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let child = &mut self.child;
        let status = wait_for(
            "the gateway to exit after SIGTERM",
            Duration::from_secs(60),
            || child.try_wait().unwrap(),
        )
        .await;
        if !status.success() {
            // Shown (by the test runner) only if the test then fails.
            let logs = self.logs.lock().unwrap();
            eprintln!("gateway exited with {status}; its last log lines:");
            for line in &logs[logs.len().saturating_sub(30)..] {
                eprintln!("gateway: {line}");
            }
        }
        status
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LONG_WAIT: Duration = Duration::from_secs(60);

/// A scrape of `/metrics` in Prometheus' text format.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the series `name` whose labels include every `labels` pair; panics
    /// if there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no series {name} with {labels:?} in:\n{}", self.0))
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.lines().find_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok())?
        })
    }
}

/// A gateway config header: `[aws]`, `[gateway]` and `[admin]` on a free port with
/// [`ADMIN_TOKEN`]; add `[[mapping]]`s with [`rabbit_mapping`].
pub fn gateway_header() -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"

[gateway]
shutdown_grace = "20s"

[admin]
listen = "127.0.0.1:{port}"
token = "{ADMIN_TOKEN}"
"#,
        endpoint = aws_endpoint(),
        port = free_port(),
    )
}

/// One `[[mapping]]` on a RabbitMQ queue; `extra` goes inside the mapping, before its
/// source table (mapping keys first, then batch, retry and on_failure tables).
pub fn rabbit_mapping(name: &str, function: &str, queue: &str, extra: &str) -> String {
    mapping(
        name,
        function,
        extra,
        &format!(
            "type = \"rabbitmq\"\nurl = \"{amqp}\"\nqueue = \"{queue}\"\n",
            amqp = amqp_url()
        ),
    )
}

/// One `[[mapping]]`: its keys, then `extra` (mapping keys first, then batch, retry and
/// on_failure tables), then `[mapping.source]` with the lines of `source`.
pub fn mapping(name: &str, function: &str, extra: &str, source: &str) -> String {
    format!(
        r#"
[[mapping]]
name = "{name}"
function = "{function}"

{extra}

[mapping.source]
{source}"#
    )
}

/// Mapping keys for the partial batch tests: one batch of up to 10, quick retries.
pub const PARTIAL_BATCH: &str = r#"
report_batch_item_failures = true

[mapping.batch]
size = 10
window = "1s"

[mapping.retry]
backoff_min = "10ms"
"#;

/// A config for one RabbitMQ mapping named "test"; see [`rabbit_mapping`] for `extra`.
pub fn rabbit_config(function: &str, queue: &str, extra: &str) -> String {
    gateway_header() + &rabbit_mapping("test", function, queue, extra)
}

/// Failure records in a JSON-lines destination file.
pub fn failure_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("failure record line"))
        .collect()
}

/// Runs `esm-gateway redrive` for the mapping "test" of `config` with `extra` arguments;
/// asserts that it succeeded and returns its output.
pub fn redrive(config: &Path, extra: &[&str]) -> String {
    let (code, out, err) = redrive_status(config, extra);
    assert_eq!(code, Some(0), "{err}");
    out
}

/// Runs `esm-gateway redrive` like [`redrive`]; its exit code, output and log (stderr).
pub fn redrive_status(config: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .args(["redrive", "--config"])
        .arg(config)
        .args(["--mapping", "test"])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Creates a uniquely named queue (FIFO with content-based deduplication when `fifo`)
/// with this visibility timeout in seconds; returns its URL.
pub async fn create_queue(
    client: &aws_sdk_sqs::Client,
    prefix: &str,
    fifo: bool,
    visibility: u32,
) -> String {
    let mut name = unique(prefix);
    let mut req = client.create_queue().attributes(
        aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
        visibility.to_string(),
    );
    if fifo {
        name.push_str(".fifo");
        req = req
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::ContentBasedDeduplication,
                "true",
            );
    }
    req.queue_name(name)
        .send()
        .await
        .expect("create queue (is `scripts/stack up` running?)")
        .queue_url
        .unwrap()
}

/// Sends (group, body) messages in batches of ten, in order.
pub async fn send(client: &aws_sdk_sqs::Client, url: &str, messages: &[(Option<String>, String)]) {
    for chunk in messages.chunks(10) {
        let entries = chunk.iter().enumerate().map(|(i, (group, body))| {
            let mut e = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .message_attributes(
                    "origin",
                    aws_sdk_sqs::types::MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value("test")
                        .build()
                        .unwrap(),
                );
            if let Some(g) = group {
                e = e.message_group_id(g).message_deduplication_id(body);
            }
            e.build().unwrap()
        });
        let out = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries.collect()))
            .send()
            .await
            .unwrap();
        assert!(out.failed().is_empty(), "{:?}", out.failed());
    }
}

/// (visible, in flight) messages of a queue.
pub async fn depth(client: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let a = out.attributes().unwrap();
    let n = |k| a.get(&k).and_then(|v: &String| v.parse().ok()).unwrap_or(0);
    (
        n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages),
        n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// Waits until `url` holds no message, visible or in flight (polling every 200 ms).
pub async fn wait_sqs_empty(client: &aws_sdk_sqs::Client, url: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while depth(client, url).await != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue {url} never drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A gateway configuration with one SQS mapping named "test"; `extra` goes into the
/// mapping before its source.
pub fn sqs_config(function: &str, url: &str, extra: &str) -> String {
    gateway_header()
        + &mapping(
            "test",
            function,
            extra,
            &format!("type = \"sqs\"\nqueue_url = \"{url}\"\n"),
        )
}
