//! No configured secret appears in anything the gateway shows: its logs (errors
//! included), the admin endpoints, `/metrics`, `status` and `validate`. Passwords here
//! hold the characters that break naive redaction ('/', '@', '?').
//!
//! Creates a RabbitMQ user and uses the stack's PostgreSQL, so `.config/nextest.toml`
//! runs it in the one-at-a-time `stack` group.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);

/// A RabbitMQ user of its own, deleted again when the test ends.
struct RabbitUser(String);

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .args(args)
        .output()
        .expect("run esm-gateway");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn no_secret_appears_in_logs_admin_endpoints_metrics_or_status() {
    let user = RabbitUser(unique("esm-secret"));
    let rabbit_password = format!("rb/{}@x?y", unique("pw"));
    rabbitmqctl(&["add_user", &user.0, &rabbit_password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    let amqp = |vhost: &str| {
        format!(
            "amqp://{}:{}@127.0.0.1:5672/{vhost}",
            user.0,
            percent_encode(&rabbit_password)
        )
    };
    // A literal '/' in the password, which tokio-postgres (like libpq) accepts. Nothing
    // listens on port 9: the store's errors (logged, and in the schedule's status) are
    // where its URL is shown.
    let ledger_password = format!("pg/{}", unique("ledger"));
    let ledger = format!("postgres://postgres:{ledger_password}@127.0.0.1:9/postgres");

    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("secrets").await;
    rabbit.publish(&queue, numbered(5)).await;
    let f = Function::deploy("secrets", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{header}
[schedules]
store = "{ledger}"

[[mapping]]
name = "drain"
function = "{function}"
[mapping.source]
type = "rabbitmq"
url = "{drain_url}"
queue = "{queue}"
[mapping.on_failure]
type = "rabbitmq"
url = "{drain_url}"
exchange = "amq.direct"

[[mapping]]
name = "denied"
function = "{function}"
[mapping.source]
type = "rabbitmq"
url = "{denied_url}"
queue = "{queue}"

[[mapping]]
name = "tick"
function = "{function}"
[mapping.source]
type = "schedule"
expression = "rate(2 seconds)"
[mapping.on_failure]
type = "file"
path = "{parked}"
"#,
        header = gateway_header(),
        function = f.name,
        drain_url = amqp("%2f"),
        // A vhost the user may not open: the connection error is logged, again and again.
        denied_url = amqp("no-such-vhost"),
        parked = dir.path().join("parked.jsonl").display(),
    );
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, &config).unwrap();

    let gw = Gateway::start(&config);
    gw.wait_admin().await;
    f.wait_delivered(5, LONG).await;
    gw.wait_log("no-such-vhost", LONG).await;
    gw.wait_log("schedule store", LONG).await;

    let mut shown = Vec::new();
    for path in ["/healthz", "/readyz", "/mappings", "/metrics"] {
        shown.push(gw.get(path).1);
    }
    let admin = gw.admin.clone().unwrap();
    shown.push(cli(&["status", "--admin", &admin]));
    shown.push(cli(&[
        "validate",
        "--config",
        config_file.to_str().unwrap(),
    ]));
    let logs = gw.logs.clone();
    assert_eq!(gw.terminate().await.code(), Some(0));
    shown.extend(logs.lock().unwrap().iter().cloned());
    let shown = shown.join("\n");
    assert!(
        shown.contains("no-such-vhost") && shown.contains("schedule store"),
        "the error paths were exercised"
    );

    for secret in [
        rabbit_password.clone(),
        percent_encode(&rabbit_password),
        ledger_password.clone(),
        ADMIN_TOKEN.to_owned(),
    ] {
        assert!(
            !shown.contains(&secret),
            "{secret:?} appears in the gateway's output:\n{}",
            shown
                .lines()
                .filter(|l| l.contains(&secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    rabbit.delete(&queue).await;
}
