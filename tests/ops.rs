//! Operating the gateway, end to end against the local stack: the metrics page, the
//! admin API (readiness, enable/disable, its token), reload on SIGHUP and a SIGTERM in
//! the middle of a stream.
//!
//! They share RabbitMQ with tests/rabbitmq.rs, so `.config/nextest.toml` runs them in the
//! same one-at-a-time group.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(120);

/// Asserts that `check` holds at every poll for `period` (the only way to observe that
/// something does not happen).
async fn assert_stays(what: &str, period: Duration, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert!(check(), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("metrics").await;
    let f = Function::deploy("metrics", &[("POISON", "msg-0042")]).await;
    let parked = f.dir.path().join("parked.jsonl");
    rabbit.publish(&queue, numbered(100)).await;

    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        &format!(
            r#"
[mapping.batch]
size = 10
window = "100ms"

[mapping.retry]
max_attempts = 0
bisect_on_error = true

[mapping.on_failure]
type = "file"
path = "{}"
"#,
            parked.display()
        ),
    ));
    f.wait_delivered(99, LONG).await;
    wait_for("the failure record", LONG, || {
        (!failure_records(&parked).is_empty()).then_some(())
    })
    .await;
    gw.wait_admin().await;
    // The last ack follows the last invoke: wait for the in-flight gauge to settle.
    let labels = [("mapping", "test"), ("source", "rabbitmq")];
    let m = wait_for("no batch in flight", LONG, || {
        let m = gw.metrics();
        (m.value("esm_gateway_batches_in_flight", &labels) == 0.0).then_some(m)
    })
    .await;

    let inv = f.invocations();
    let ok = inv.iter().filter(|i| i.ok).count() as f64;
    let failed_invokes = inv.iter().filter(|i| !i.ok).count() as f64;
    let failed_records: usize = inv.iter().filter(|i| !i.ok).map(|i| i.bodies.len()).sum();
    let all_records: usize = inv.iter().map(|i| i.bodies.len()).sum();
    let v = |name: &str| m.value(name, &labels);
    assert_eq!(v("esm_gateway_records_received_total"), 100.0);
    assert_eq!(v("esm_gateway_records_filtered_total"), 0.0);
    assert_eq!(v("esm_gateway_records_delivered_total"), 99.0);
    assert_eq!(v("esm_gateway_records_failed_total"), failed_records as f64);
    assert_eq!(
        m.value(
            "esm_gateway_records_dead_lettered_total",
            &[("mapping", "test"), ("condition", "RetryAttemptsExhausted")]
        ),
        1.0
    );
    let outcome = |o: &str| {
        m.value(
            "esm_gateway_invocations_total",
            &[("mapping", "test"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("success"), ok);
    assert_eq!(outcome("function_error"), failed_invokes);
    assert_eq!(outcome("throttled"), 0.0);
    // Splits are free and max_attempts = 0 parks the lone poison without a retry.
    assert_eq!(v("esm_gateway_retries_total"), 0.0);
    assert_eq!(v("esm_gateway_throttles_total"), 0.0);
    assert_eq!(v("esm_gateway_batch_records_count"), inv.len() as f64);
    assert_eq!(v("esm_gateway_batch_records_sum"), all_records as f64);
    assert_eq!(
        v("esm_gateway_invoke_duration_seconds_count"),
        inv.len() as f64
    );
    assert_eq!(v("esm_gateway_mapping_failed"), 0.0);
    assert_eq!(v("esm_gateway_mapping_enabled"), 1.0);
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(m.value(name, &[]) > 0.0, "{name}");
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_disabled_mapping_does_not_invoke_and_resumes_without_loss_when_enabled() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("disable").await;
    let f = Function::deploy("disable", &[("SLEEP_MS", "50")]).await;
    rabbit.publish(&queue, numbered(300)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    ));
    f.wait_delivered(50, LONG).await;

    // Returns once the batch in flight is delivered and acknowledged.
    let (status, body) = gw.post("/mappings/test/disable", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let row = gw.mapping("test");
    assert_eq!(
        (row["state"].as_str(), row["enabled"].as_bool()),
        (Some("disabled"), Some(false))
    );
    let invoked = f.invocations().len();
    let delivered = f.delivered().len();
    // Its prefetched messages went back to the queue: everything not delivered is ready.
    let deadline = Instant::now() + LONG;
    while rabbit.ready(&queue).await as usize != 300 - delivered {
        assert!(
            Instant::now() < deadline,
            "the undelivered messages never went back to the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_stays(
        "no invocation while the mapping is disabled",
        Duration::from_secs(2),
        || f.invocations().len() == invoked,
    )
    .await;
    // A disabled mapping does not make the gateway unready.
    gw.wait_ready_status(200).await;
    assert_eq!(
        gw.metrics()
            .value("esm_gateway_mapping_enabled", &[("mapping", "test")]),
        0.0
    );

    let (status, body) = gw.post("/mappings/test/enable", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let all = f.wait_delivered(300, LONG).await;
    assert_eq!(all, numbered_strings(0..300), "once each, in order");
    assert_eq!(gw.mapping("test")["enabled"], true);
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn admin_state_changes_need_the_token() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("auth").await;
    let config = rabbit_config("not-invoked", &queue, "");
    let gw = Gateway::start(&config);
    gw.wait_admin().await;
    for path in ["/mappings/test/disable", "/mappings/test/enable"] {
        let (status, _) = gw.post(path, None);
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = gw.post(path, Some("not-the-token-at-all"));
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    assert_eq!(gw.mapping("test")["enabled"], true, "nothing changed");
    let (status, _) = gw.post("/mappings/nope/disable", Some(ADMIN_TOKEN));
    assert_eq!(status, 404);
    // Reading needs no token.
    assert_eq!(gw.get("/mappings").0, 200);
    assert_eq!(gw.get("/metrics").0, 200);

    // The CLI's view of the same API.
    let admin = gw.admin.clone().unwrap();
    gw.wait_ready_status(200).await;
    let status = cli(&["status", "--admin", &admin]);
    assert_eq!(status.status.code(), Some(0));
    let table = String::from_utf8_lossy(&status.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("LAST ERROR"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("test ")
            && lines[1].contains("rabbitmq")
            && lines[1].contains("running"),
        "{table}"
    );
    assert_eq!(cli(&["health", "--admin", &admin]).status.code(), Some(0));
    assert_eq!(
        cli(&["health", "--ready", "--admin", &admin]).status.code(),
        Some(0)
    );
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    assert_eq!(
        cli(&["health", "--admin", &unreachable]).status.code(),
        Some(69)
    );
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Without a configured token, state changes are refused outright, token or not.
    let no_token = config.replace(&format!("token = \"{ADMIN_TOKEN}\"\n"), "");
    assert_ne!(no_token, config);
    let gw = Gateway::start(&no_token);
    gw.wait_admin().await;
    let (status, body) = gw.post("/mappings/test/disable", Some(ADMIN_TOKEN));
    assert_eq!(status, 403);
    assert!(body.contains("admin] token"), "{body}");
    assert_eq!(gw.mapping("test")["enabled"], true);
    assert_eq!(gw.terminate().await.code(), Some(0));
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn reads_need_the_read_token_and_error_texts_are_bounded_and_escaped() {
    const READ_TOKEN: &str = "test-read-token-0123456789";
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("read-token").await;
    rabbit.publish(&queue, vec![b"evil".to_vec()]).await;
    // An error message that retitles a terminal and turns its text red, and is long.
    let message = format!("\u{1b}]0;pwned\u{7}\u{1b}[31mred{}", "x".repeat(2000));
    let f = Function::deploy(
        "read-token",
        &[("POISON", "evil"), ("ERROR_MESSAGE", message.as_str())],
    )
    .await;
    let config = rabbit_config(
        &f.name,
        &queue,
        "[mapping.retry]\nbackoff_min = \"10ms\"\nbackoff_max = \"100ms\"",
    )
    .replace(
        &format!("token = \"{ADMIN_TOKEN}\"\n"),
        &format!("token = \"{ADMIN_TOKEN}\"\nread_token = \"{READ_TOKEN}\"\n"),
    );
    assert!(config.contains(READ_TOKEN));
    let gw = Gateway::start(&config);
    gw.wait_admin().await;
    let error = wait_for("the function's error in /mappings", LONG, || {
        let (status, body) = gw.get_as("/mappings", Some(READ_TOKEN));
        assert_eq!(status, 200, "{body}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        rows[0]["last_error"]
            .as_str()
            .filter(|e| e.contains("red"))
            .map(str::to_owned)
    })
    .await;
    assert!(!error.chars().any(char::is_control), "{error:?}");
    assert!(error.contains("\\u{1b}[31mred"), "{error:?}");
    assert!(error.chars().count() < 600, "bounded: {error}");

    for path in ["/mappings", "/metrics"] {
        assert_eq!(gw.get_as(path, None).0, 401, "{path} without a token");
        assert_eq!(
            gw.get_as(path, Some("wrong-token-0123456789")).0,
            401,
            "{path}"
        );
        assert_eq!(gw.get_as(path, Some(READ_TOKEN)).0, 200, "{path}");
        assert_eq!(gw.get_as(path, Some(ADMIN_TOKEN)).0, 200, "{path}");
    }
    // Probes keep /healthz and /readyz's status code; only the token sees the reasons.
    assert_eq!(gw.get("/healthz").0, 200);
    let open: serde_json::Value = serde_json::from_str(&gw.get("/readyz").1).unwrap();
    assert!(open.get("reasons").is_none(), "{open}");
    let full: serde_json::Value =
        serde_json::from_str(&gw.get_as("/readyz", Some(READ_TOKEN)).1).unwrap();
    assert!(full.get("reasons").is_some(), "{full}");

    let admin = gw.admin.clone().unwrap();
    assert_eq!(cli(&["status", "--admin", &admin]).status.code(), Some(1));
    let status = cli(&["status", "--admin", &admin, "--token", READ_TOKEN]);
    assert_eq!(status.status.code(), Some(0));
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("red") && !table.contains('\u{1b}'),
        "{table}"
    );

    assert_eq!(gw.terminate().await.code(), Some(0));
    // The count: the poison message was never acked, so it is back in the queue.
    assert_eq!(rabbit.ready(&queue).await, 1);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn readyz_is_503_for_a_failed_mapping_and_200_when_healthy() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("ready").await;
    // More than the prefetch (200: twice the batch size), so that some stay ready.
    rabbit.publish(&queue, numbered(250)).await;
    let missing = unique("not-deployed");
    let config = rabbit_config(
        &missing,
        &queue,
        "[mapping.retry]\nbackoff_min = \"10ms\"\nbackoff_max = \"200ms\"",
    );
    let gw = Gateway::start(&config);
    gw.wait_admin().await;
    // It is 503 while connecting too; wait for the failure itself.
    let body = wait_for("/readyz to report the failed mapping", LONG, || {
        let (status, body) = gw.get("/readyz");
        (status == 503 && body.contains("failed")).then_some(body)
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("mapping test: failed") && reasons.contains("ResourceNotFound"),
        "{body}"
    );
    assert_eq!(gw.mapping("test")["state"], "failed");
    assert_eq!(
        gw.metrics()
            .value("esm_gateway_mapping_failed", &[("mapping", "test")]),
        1.0
    );
    // The source reports its depth: the messages beyond the prefetch wait in the queue.
    wait_for("the queue depth in /mappings", LONG, || {
        (gw.mapping("test")["depth"] == 50).then_some(())
    })
    .await;
    assert_eq!(
        gw.metrics()
            .value("esm_gateway_source_depth_messages", &[("mapping", "test")]),
        50.0
    );
    assert_eq!(gw.terminate().await.code(), Some(0));

    let f = Function::deploy("ready", &[]).await;
    let gw = Gateway::start(&config.replace(&missing, &f.name));
    gw.wait_ready_status(200).await;
    f.wait_delivered(250, LONG).await;
    assert_eq!(gw.get("/readyz").0, 200);
    assert_eq!(gw.terminate().await.code(), Some(0));
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn sighup_applies_a_changed_mapping_and_keeps_the_old_config_when_the_new_is_broken() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("reload").await;
    let other_queue = rabbit.queue("reload-other").await;
    let f = Function::deploy("reload", &[]).await;
    let g = Function::deploy("reload-other", &[]).await;
    let header = gateway_header();
    let other = rabbit_mapping("other", &g.name, &other_queue, "");
    let config = |size: u32| {
        format!(
            "{header}{}{other}",
            rabbit_mapping(
                "test",
                &f.name,
                &queue,
                &format!("[mapping.batch]\nsize = {size}\nwindow = \"1s\"")
            )
        )
    };
    let gw = Gateway::start(&config(5));
    gw.wait_ready_status(200).await;
    rabbit.publish(&queue, numbered(40)).await;
    f.wait_delivered(40, LONG).await;
    assert!(f.invocations().iter().all(|i| i.bodies.len() <= 5));
    let before = f.invocations().len();
    assert_eq!(gw.log_count("consuming mapping=other"), 1);

    gw.rewrite_config(&config(40));
    gw.signal("HUP");
    gw.wait_log("configuration reloaded", LONG).await;
    assert!(gw.log_contains("changed=1"));
    gw.wait_ready_status(200).await;
    let more: Vec<Vec<u8>> = (40..80)
        .map(|i| format!("msg-{i:04}").into_bytes())
        .collect();
    rabbit.publish(&queue, more).await;
    f.wait_delivered(80, LONG).await;
    let after: Vec<_> = f.invocations().into_iter().skip(before).collect();
    assert!(
        after.iter().any(|i| i.bodies.len() > 5),
        "the new batch size applies: {:?}",
        after.iter().map(|i| i.bodies.len()).collect::<Vec<_>>()
    );
    assert_eq!(f.delivered(), numbered_strings(0..80));
    // The unchanged mapping was not restarted, and still works.
    assert_eq!(gw.log_count("consuming mapping=other"), 1);
    rabbit.publish(&other_queue, numbered(3)).await;
    g.wait_delivered(3, LONG).await;

    // A broken file is refused; the running configuration stays.
    gw.rewrite_config(&config(40).replace("size = 40", "size = 0"));
    gw.signal("HUP");
    gw.wait_log("configuration reload refused", LONG).await;
    assert!(gw.log_contains("batch size must be between 1 and 10000"));
    gw.wait_ready_status(200).await;
    let more: Vec<Vec<u8>> = (80..120)
        .map(|i| format!("msg-{i:04}").into_bytes())
        .collect();
    rabbit.publish(&queue, more).await;
    f.wait_delivered(120, LONG).await;
    assert_eq!(f.delivered(), numbered_strings(0..120));
    let m = gw.metrics();
    assert_eq!(
        m.value(
            "esm_gateway_config_reloads_total",
            &[("outcome", "success")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "esm_gateway_config_reloads_total",
            &[("outcome", "failure")]
        ),
        1.0
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    for q in [&queue, &other_queue] {
        rabbit.delete(q).await;
    }
}

#[tokio::test]
async fn sigterm_mid_stream_exits_0_within_the_grace_and_a_restart_delivers_the_rest() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("sigterm").await;
    let f = Function::deploy("sigterm", &[("SLEEP_MS", "200")]).await;
    rabbit.publish(&queue, numbered(200)).await;
    let config = rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    );
    let gw = Gateway::start(&config);
    f.wait_delivered(30, LONG).await;
    let (status, took) = gw.terminate_timed().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        took < Duration::from_secs(20),
        "exit took {took:?}, grace is 20s"
    );
    let before = f.delivered().len();
    assert!(before < 200, "stopped mid-stream");

    let gw = Gateway::start(&config);
    let all = f.wait_delivered(200, LONG).await;
    // The batch in flight finished and was acknowledged: no loss and no duplicate.
    assert_eq!(all, numbered_strings(0..200));
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .args(args)
        .output()
        .expect("run esm-gateway")
}

#[tokio::test]
async fn systemd_hears_ready_reloading_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("notify").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let heard = std::cell::RefCell::new(Vec::<String>::new());
    let hear = |what: &str| {
        let mut buf = [0u8; 512];
        while let Ok(n) = listener.recv(&mut buf) {
            heard
                .borrow_mut()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        heard.borrow().iter().filter(|m| m.contains(what)).count()
    };
    let gw = Gateway::start_with_env(
        &rabbit_config("not-invoked", &queue, ""),
        &[
            ("NOTIFY_SOCKET", socket.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    wait_for("READY=1", LONG, || (hear("READY=1") == 1).then_some(())).await;
    assert_eq!(
        gw.mapping("test")["state"],
        "running",
        "ready after the mapping started"
    );
    wait_for("two WATCHDOG=1", LONG, || {
        (hear("WATCHDOG=1") >= 2).then_some(())
    })
    .await;
    gw.signal("HUP");
    wait_for("RELOADING=1 then READY=1", LONG, || {
        (hear("READY=1") == 2 && hear("RELOADING=1") == 1).then_some(())
    })
    .await;
    let order: Vec<String> = heard
        .borrow()
        .iter()
        .filter(|m| !m.contains("WATCHDOG"))
        .cloned()
        .collect();
    assert!(
        order[1].contains("RELOADING=1") && order[2].contains("READY=1"),
        "{order:?}"
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(hear("STOPPING=1"), 1);
    rabbit.delete(&queue).await;
}
