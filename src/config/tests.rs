//! Every bad file gets an error that names the field and, where the parser knows it,
//! the line.

use super::*;
use crate::source::kafka::config::StartingPosition;
use crate::source::schedule::config::MissedFire;

const GOOD: &str = r#"
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:4566"

[[mapping]]
name = "orders"
function = "process-orders:live"

[mapping.source]
type = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "orders"

[mapping.batch]
size = 50
window = "2s"

[mapping.retry]
max_attempts = 3
bisect_on_error = true

[mapping.on_failure]
type = "file"
path = "/tmp/failed.jsonl"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(Path::new("test.toml"), text).map_err(|e| e.to_string())
}

fn with(replace: &str, by: &str) -> String {
    assert!(GOOD.contains(replace), "{replace}");
    GOOD.replacen(replace, by, 1)
}

#[test]
fn good_file_and_aws_defaults() {
    let c = parse(GOOD).unwrap();
    let m = &c.mappings[0];
    assert_eq!(m.batch_size(), 50);
    assert_eq!(m.batch_window(), Duration::from_secs(2));
    assert_eq!(m.retries(), Some(3));
    assert!(m.enabled);

    let minimal = parse(
        r#"
[[mapping]]
name = "m"
function = "f"
source = { type = "rabbitmq", url = "amqp://h", queue = "q" }
"#,
    )
    .unwrap();
    let m = &minimal.mappings[0];
    assert_eq!(m.batch_size(), 100);
    assert_eq!(m.batch_window(), Duration::from_millis(500));
    assert_eq!(m.max_payload(), 6 * 1024 * 1024);
    assert_eq!(m.buffer_bytes(), 12 * 1024 * 1024);
    assert_eq!(m.retries(), None);
    assert_eq!(m.retry.max_record_age, None);
    assert!(!m.retry.bisect_on_error && !m.report_batch_item_failures);
    assert_eq!(minimal.gateway.shutdown_grace, Duration::from_secs(30));
    assert_eq!(m.function_timeout(), Duration::from_secs(15 * 60));
}

#[test]
fn the_function_timeout_is_between_one_second_and_fifteen_minutes() {
    let set = |t: &str| {
        with(
            "function = \"process-orders:live\"",
            &format!("function = \"process-orders:live\"\nfunction_timeout = \"{t}\""),
        )
    };
    assert_eq!(
        parse(&set("90s")).unwrap().mappings[0].function_timeout(),
        Duration::from_secs(90)
    );
    for bad in ["500ms", "16m"] {
        let err = parse(&set(bad)).unwrap_err();
        assert!(
            err.contains("function_timeout") && err.contains("between 1s and 15m"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn the_buffer_budget_is_between_one_mebibyte_and_four_gibibytes() {
    let set = |n: &str| {
        with(
            "[mapping.batch]",
            &format!("[mapping.batch]\nbuffer_bytes = {n}"),
        )
    };
    assert_eq!(
        parse(&set("67108864")).unwrap().mappings[0].buffer_bytes(),
        64 << 20
    );
    let err = parse(&set("1048576")).unwrap_err();
    assert!(
        err.contains("batch.buffer_bytes (1048576) is smaller than the largest event (6291456"),
        "{err}"
    );
    for bad in ["1000", "4294967296"] {
        let err = parse(&set(bad)).unwrap_err();
        assert!(
            err.contains("buffer_bytes must be between 1048576") && err.contains("line 16"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn unlimited_retries_become_ten_with_a_destination() {
    let c = parse(&with("max_attempts = 3", "max_attempts = -1")).unwrap();
    assert_eq!(c.mappings[0].retries(), Some(10));
}

/// Each case: the replacement, and what the error must say (field and line).
#[test]
fn bad_files_name_the_field_and_line() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "size = 50",
            "size = 0",
            &["line 16", "batch size must be between 1 and 10000, got 0"],
        ),
        ("size = 50", "size = 10001", &["line 16", "got 10001"]),
        (
            "window = \"2s\"",
            "window = \"301s\"",
            &["line 17", "at most 300s"],
        ),
        (
            "window = \"2s\"",
            "window = \"2 parsecs\"",
            &["line 17", "invalid duration \"2 parsecs\""],
        ),
        (
            "bisect_on_error = true",
            "bisect_on_eror = true",
            &["line 21", "unknown field `bisect_on_eror`"],
        ),
        (
            "function = \"process-orders:live\"\n",
            "",
            &["missing field `function`"],
        ),
        (
            "max_attempts = 3",
            "max_attempts = 10001",
            &["line 20", "max_attempts"],
        ),
        (
            "[mapping.batch]",
            "[mapping.batch",
            &["line 15", "TOML parse error"],
        ),
        (
            "queue = \"orders\"",
            "queue = \"orders\"\nprefetch = 10",
            &["prefetch (10) is smaller than batch.size (50)"],
        ),
        (
            "function = \"process-orders:live\"",
            "function = \"a b\"",
            &["mapping \"orders\": function", "contains ' '"],
        ),
        (
            "name = \"orders\"",
            "name = \"bad name\"",
            &["name must be"],
        ),
    ];
    for (from, to, wants) in cases {
        let err = parse(&with(from, to)).unwrap_err();
        assert!(err.starts_with("config file test.toml"), "{err}");
        for want in *wants {
            assert!(
                err.contains(want),
                "replacing {from:?} by {to:?}: {err:?} lacks {want:?}"
            );
        }
    }
}

#[test]
fn limited_retries_need_a_destination() {
    let text = GOOD.split("[mapping.on_failure]").next().unwrap();
    let err = parse(text).unwrap_err();
    assert!(err.contains("no on_failure destination"), "{err}");
}

#[test]
fn duplicate_names_are_refused() {
    let second = GOOD.split("[[mapping]]").nth(1).unwrap();
    let err = parse(&format!("{GOOD}\n[[mapping]]{second}")).unwrap_err();
    assert!(err.contains("\"orders\" is defined twice"), "{err}");
}

#[test]
fn secrets_are_expanded_and_never_shown() {
    // SAFETY: tests in this module are the only users of this variable.
    unsafe { std::env::set_var("ESM_TEST_RABBIT_PASSWORD", "hunter2") };
    let text = with("guest:guest@", "guest:${ESM_TEST_RABBIT_PASSWORD}@");
    let c = parse(&text).unwrap();
    let SourceConfig::Rabbitmq(s) = &c.mappings[0].source else {
        panic!("rabbitmq source")
    };
    assert_eq!(s.url.expose(), "amqp://guest:hunter2@127.0.0.1:5672/%2f");
    assert!(!format!("{c:?}").contains("hunter2"));
    // An error elsewhere in the file quotes raw text, never the expanded value.
    let err = parse(&text.replace("size = 50", "size = 0")).unwrap_err();
    assert!(!err.contains("hunter2"), "{err}");
    let err = parse(&with("guest:guest@", "guest:${ESM_TEST_UNSET_VARIABLE}@")).unwrap_err();
    assert!(
        err.contains("environment variable ESM_TEST_UNSET_VARIABLE is not set"),
        "{err}"
    );
}

const KAFKA: &str = r#"
[[mapping]]
name = "events"
function = "f"

[mapping.source]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topics = ["events"]
starting_position = "trim_horizon"
sasl = { mechanism = "scram-sha-512", username = "app", password = "${ESM_TEST_KAFKA_PASSWORD}" }
tls = { ca_file = "/etc/ca.pem" }
parallelization_factor = 4
properties = { "session.timeout.ms" = "6000" }
"#;

#[test]
fn kafka_sources_parse_and_hide_their_password() {
    // SAFETY: only this test uses this variable.
    unsafe { std::env::set_var("ESM_TEST_KAFKA_PASSWORD", "kafka-secret") };
    let c = parse(KAFKA).unwrap();
    let SourceConfig::Kafka(k) = &c.mappings[0].source else {
        panic!("kafka source")
    };
    assert_eq!(k.starting_position, StartingPosition::TrimHorizon);
    assert_eq!(k.sasl.as_ref().unwrap().password.expose(), "kafka-secret");
    assert!(!format!("{c:?}").contains("kafka-secret"));
    let limits = crate::pipeline::batcher::BatchLimits {
        size: 100,
        window: Duration::from_millis(500),
        max_bytes: 6_000_000,
        buffer_bytes: 12 << 20,
    };
    let conf = crate::source::kafka::client_config(k, "events", &limits);
    assert_eq!(conf.get("group.id"), Some("esm-gateway-events"));
    assert_eq!(conf.get("security.protocol"), Some("sasl_ssl"));
    assert_eq!(conf.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
    assert_eq!(conf.get("enable.auto.commit"), Some("false"));
    assert_eq!(conf.get("session.timeout.ms"), Some("6000"));
    // Prefetch per partition: two batches per lane (4 lanes, at least 10,000 records),
    // one fetch's bytes (1 MiB) per lane.
    assert_eq!(conf.get("queued.min.messages"), Some("10000"));
    assert_eq!(conf.get("queued.max.messages.kbytes"), Some("4096"));
    // The window (500 ms), capped: a fetch of caught-up partitions must not hold up the
    // fetching of backlogged ones for long.
    assert_eq!(conf.get("fetch.wait.max.ms"), Some("100"));
    // Small fetch responses, so that a slow partition pins little besides its own.
    assert_eq!(conf.get("fetch.max.bytes"), Some("262144"));
    assert_eq!(conf.get("message.max.bytes"), Some("262144"));

    // A window of 0 fetches for latency; large batches prefetch more, within bounds.
    let fast = crate::pipeline::batcher::BatchLimits {
        size: 10_000,
        window: Duration::ZERO,
        ..limits
    };
    let conf = crate::source::kafka::client_config(k, "events", &fast);
    assert_eq!(conf.get("fetch.wait.max.ms"), Some("10"));
    assert_eq!(conf.get("fetch.min.bytes"), Some("1"));
    assert_eq!(conf.get("queued.min.messages"), Some("80000"));
    // `properties` still win.
    let mut k = k.clone();
    k.properties.insert(
        "fetch.wait.max.ms".into(),
        crate::env::Expanded("100".into()),
    );
    let conf = crate::source::kafka::client_config(&k, "events", &fast);
    assert_eq!(conf.get("fetch.wait.max.ms"), Some("100"));
    // librdkafka refuses a `fetch.max.bytes` below `message.max.bytes`: a mapping that
    // sets one of them gets neither of the gateway's.
    k.properties.insert(
        "message.max.bytes".into(),
        crate::env::Expanded("2000000".into()),
    );
    let conf = crate::source::kafka::client_config(&k, "events", &fast);
    assert_eq!(conf.get("message.max.bytes"), Some("2000000"));
    assert_eq!(conf.get("fetch.max.bytes"), None);
}

#[test]
fn bad_kafka_sources_are_named() {
    unsafe { std::env::set_var("ESM_TEST_KAFKA_PASSWORD", "x") };
    let cases: &[(&str, &str, &str)] = &[
        (
            "parallelization_factor = 4",
            "parallelization_factor = 11",
            "between 1 and 10, got 11",
        ),
        (
            "\"session.timeout.ms\"",
            "\"group.id\"",
            "source.properties.\"group.id\" is set by the gateway",
        ),
        (
            "starting_position = \"trim_horizon\"",
            "starting_position = \"at_timestamp\"",
            "needs source.starting_timestamp",
        ),
        ("topics = [\"events\"]", "topics = []", "at least one topic"),
        ("scram-sha-512", "gssapi", "unknown variant `gssapi`"),
    ];
    for (from, to, want) in cases {
        assert!(KAFKA.contains(from), "{from}");
        let err = parse(&KAFKA.replacen(from, to, 1)).unwrap_err();
        assert!(err.contains(want), "{from} -> {to}: {err}");
    }
}

#[test]
fn the_admin_listener_defaults_to_loopback_without_a_token() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.admin, AdminConfig::default());
    assert!(c.admin.enabled);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9900");
    assert!(c.admin.token.is_none());
}

#[test]
fn the_admin_token_is_expanded_checked_and_never_shown() {
    let text = format!(
        "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"${{PATH}}-and-some-padding\"\n{GOOD}"
    );
    let c = parse(&text).unwrap();
    let token = c.admin.token.as_ref().unwrap();
    assert!(token.expose().starts_with(&std::env::var("PATH").unwrap()));
    assert!(!format!("{c:?}").contains("and-some-padding"));
    let short = parse(&format!("[admin]\ntoken = \"short\"\n{GOOD}")).unwrap_err();
    assert!(short.contains("admin.token is shorter than 16"), "{short}");
    let bad = parse(&format!("[admin]\nlisten = \"localhost\"\n{GOOD}")).unwrap_err();
    assert!(bad.contains("listen"), "{bad}");
}

#[test]
fn reload_compares_mappings_by_value() {
    let a = parse(GOOD).unwrap();
    let b = parse(GOOD).unwrap();
    assert_eq!(a.mappings, b.mappings);
    let c = parse(&with("size = 50", "size = 51")).unwrap();
    assert_ne!(a.mappings[0], c.mappings[0]);
    assert_eq!(a.mappings[0].source, c.mappings[0].source);
}

#[test]
fn asynchronous_invokes_cap_events_at_one_megabyte_and_return_no_result() {
    let c = parse(&with(
        "name = \"orders\"",
        "name = \"orders\"\ninvocation_type = \"event\"",
    ))
    .unwrap();
    assert_eq!(c.mappings[0].max_payload(), 1024 * 1024);
    let err = parse(&with(
        "name = \"orders\"",
        "name = \"orders\"\ninvocation_type = \"event\"\nreport_batch_item_failures = true",
    ))
    .unwrap_err();
    assert!(
        err.contains("report_batch_item_failures needs invocation_type"),
        "{err}"
    );
}
const SCHEDULE: &str = r#"
[schedules]
store = "postgres://postgres@127.0.0.1:5432/postgres"

[[mapping]]
name = "nightly"
function = "report"

[mapping.source]
type = "schedule"
expression = "cron(0 2 * * ? *)"
timezone = "Europe/London"
start = "2026-01-01T00:00:00"
end = "2027-01-01T00:00:00Z"
flexible_window = "5m"
input = '{"at":"<aws.scheduler.scheduled-time>","try":<aws.scheduler.attempt-number>}'
missed = "fire_once"
"#;

#[test]
fn schedules_parse_with_scheduler_defaults() {
    let c = parse(SCHEDULE).unwrap();
    let m = &c.mappings[0];
    let SourceConfig::Schedule(s) = &m.source else {
        panic!("not a schedule")
    };
    assert_eq!(s.timezone.0, chrono_tz::Europe::London);
    assert_eq!(s.missed, MissedFire::FireOnce);
    assert_eq!(
        s.start.unwrap().resolve(s.timezone.0).to_rfc3339(),
        "2026-01-01T00:00:00+00:00"
    );
    // Scheduler's retry defaults, and no destination needed.
    assert_eq!(m.retries(), Some(185));
    assert_eq!(m.max_record_age(), Some(Duration::from_secs(86_400)));
    let c = parse(&SCHEDULE.replace(
        "missed = \"fire_once\"",
        "missed = \"fire_once\"\n\n[mapping.retry]\nmax_attempts = 0\nmax_record_age = \"60s\"",
    ))
    .unwrap();
    assert_eq!(c.mappings[0].retries(), Some(0));
    assert_eq!(
        c.mappings[0].max_record_age(),
        Some(Duration::from_secs(60))
    );
}

#[test]
fn bad_schedules_name_the_expression_field_and_line() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "cron(0 2 * * ? *)",
            "cron(0 2 * * * *)",
            &["line 11", "cron(0 2 * * * *)", "day-of-week", "must be ?"],
        ),
        (
            "cron(0 2 * * ? *)",
            "cron(0 24 * * ? *)",
            &["line 11", "hours field \"24\": 24 is outside 0-23"],
        ),
        (
            "cron(0 2 * * ? *)",
            "rate(1 minutes)",
            &["line 11", "unit field", "write \"minute\""],
        ),
        (
            "\"Europe/London\"",
            "\"Europe/Londres\"",
            &["line 12", "unknown time zone \"Europe/Londres\""],
        ),
        ("\"5m\"", "\"25h\"", &["line 15", "flexible_window must be"]),
        (
            "\"2026-01-01T00:00:00\"",
            "\"tomorrow\"",
            &["line 13", "invalid time \"tomorrow\""],
        ),
        (
            "\"fire_once\"",
            "\"catch_up\"",
            &["line 17", "unknown variant `catch_up`"],
        ),
        (
            "\"try\":<aws.scheduler.attempt-number>}",
            "\"try\":}",
            &["line 16", "input must be JSON"],
        ),
    ];
    for (from, to, needles) in cases {
        assert!(SCHEDULE.contains(from), "{from}");
        let err = parse(&SCHEDULE.replacen(from, to, 1)).unwrap_err();
        for n in *needles {
            assert!(err.contains(n), "{to}: {n:?} not in:\n{err}");
        }
    }
}

#[test]
fn schedule_rules_across_fields() {
    let err = parse(&SCHEDULE.replace(
        "missed = \"fire_once\"",
        "missed = \"fire_once\"\n\n[mapping.retry]\nmax_attempts = 186",
    ))
    .unwrap_err();
    assert!(err.contains("between 0 and 185, got 186"), "{err}");
    let err = parse(&SCHEDULE.replace(
        "missed = \"fire_once\"",
        "missed = \"fire_once\"\n\n[mapping.retry]\nmax_record_age = \"25h\"",
    ))
    .unwrap_err();
    assert!(err.contains("between 60s and 24h"), "{err}");
    let err = parse(&SCHEDULE.replace("2027-01-01T00:00:00Z", "2025-01-01T00:00:00Z")).unwrap_err();
    assert!(err.contains("start must be before source.end"), "{err}");
    let err = parse(&SCHEDULE.replace(
        "[schedules]\nstore = \"postgres://postgres@127.0.0.1:5432/postgres\"",
        "",
    ))
    .unwrap_err();
    assert!(err.contains("needs [schedules] store"), "{err}");
    let err = parse(&SCHEDULE.replace(
        "postgres://postgres@127.0.0.1:5432/postgres",
        "postgres://u:hunter2@h:notaport/db",
    ))
    .unwrap_err();
    assert!(err.contains("not a PostgreSQL URL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(
        parse(SCHEDULE).unwrap().schedules.lease,
        Duration::from_secs(30)
    );
    let err = parse(&SCHEDULE.replace(
        "postgres://postgres@127.0.0.1:5432/postgres\"",
        "postgres://postgres@127.0.0.1:5432/postgres\"\nlease = \"500ms\"",
    ))
    .unwrap_err();
    assert!(
        err.contains("[schedules] lease must be at least 1s, got 500ms"),
        "{err}"
    );
}

/// Bisection halves a FIFO batch and retries the halves in order; without a destination
/// a half that runs out of retries goes back to the queue while the later half was
/// already delivered and deleted, so the group would be reordered.
#[test]
fn a_fifo_queue_refuses_bisection_without_a_destination() {
    let fifo = |url: &str, extra: &str| {
        format!(
            "[[mapping]]\nname = \"fifo-orders\"\nfunction = \"f\"\n\
             source = {{ type = \"sqs\", queue_url = \"{url}\" }}\n\
             retry = {{ bisect_on_error = true }}\n{extra}"
        )
    };
    let err = parse(&fifo("http://127.0.0.1:4566/000000000000/q.fifo", "")).unwrap_err();
    for want in [
        "mapping \"fifo-orders\"",
        "retry.bisect_on_error",
        "on_failure",
        "FIFO",
    ] {
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    parse(&fifo("http://127.0.0.1:4566/000000000000/q", "")).unwrap();
    parse(&fifo(
        "http://127.0.0.1:4566/000000000000/q.fifo",
        "on_failure = { type = \"file\", path = \"/tmp/p.jsonl\" }\n",
    ))
    .unwrap();
}

#[test]
fn two_mappings_parking_into_one_file_are_refused_by_name() {
    let second = GOOD.split("[[mapping]]").nth(1).unwrap();
    let second = second
        .replacen("name = \"orders\"", "name = \"refunds\"", 1)
        .replacen("/tmp/failed.jsonl", "/tmp/./failed.jsonl", 1);
    let err = parse(&format!("{GOOD}\n[[mapping]]{second}")).unwrap_err();
    assert!(
        err.contains(
            "mappings \"orders\" and \"refunds\" both park into the file /tmp/./failed.jsonl"
        ),
        "{err}"
    );
    let own = second.replacen("/tmp/./failed.jsonl", "/tmp/refunds.jsonl", 1);
    parse(&format!("{GOOD}\n[[mapping]]{own}")).unwrap();
}

#[test]
fn a_file_destination_refuses_keep_which_deleted_parked_records() {
    let err = parse(&with(
        "path = \"/tmp/failed.jsonl\"",
        "path = \"/tmp/failed.jsonl\"\nrotate_bytes = 1000\nkeep = 5",
    ))
    .unwrap_err();
    assert!(
        err.contains("mapping \"orders\": on_failure.keep is no longer supported"),
        "{err}"
    );
}

#[test]
fn a_kafka_destination_refuses_acks_weaker_than_all() {
    let kafka = |props: &str| {
        with(
            "type = \"file\"\npath = \"/tmp/failed.jsonl\"",
            &format!(
                "type = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\ntopic = \"dlt\"\nproperties = {{ {props} }}"
            ),
        )
    };
    for (key, value) in [("acks", "1"), ("acks", "0"), ("request.required.acks", "1")] {
        let err = parse(&kafka(&format!("\"{key}\" = \"{value}\""))).unwrap_err();
        assert!(
            err.contains(&format!(
                "mapping \"orders\": on_failure.properties.\"{key}\" = \"{value}\" would let the broker confirm"
            )),
            "{err}"
        );
    }
    // all (or its number) says what the gateway does anyway.
    for ok in [
        "\"acks\" = \"all\"",
        "\"acks\" = \"-1\"",
        "\"linger.ms\" = \"5\"",
    ] {
        parse(&kafka(ok)).unwrap();
    }
}

#[test]
fn named_destinations_take_on_failure_fields_and_their_checks() {
    let c = parse(
        "[[destination]]\nname = \"parked\"\ntype = \"file\"\npath = \"/tmp/parked.jsonl\"\nrotate_bytes = 1000\n\n\
         [[destination]]\nname = \"dlx\"\ntype = \"rabbitmq\"\nurl = \"amqp://127.0.0.1:5672\"\nexchange = \"dead\"\n",
    )
    .unwrap();
    assert_eq!(c.destinations.len(), 2);
    assert_eq!(c.destinations[0].name, "parked");
    assert_eq!(
        c.destinations[0].destination.exclusive_path(),
        Some(Path::new("/tmp/parked.jsonl"))
    );
    assert!(matches!(
        c.destinations[1].destination,
        DestinationConfig::Rabbitmq(_)
    ));
    let err = parse(
        "[[destination]]\nname = \"d\"\ntype = \"rabbitmq\"\nurl = \"http://x\"\nexchange = \"\"\n\n\
         [[destination]]\nname = \"d\"\ntype = \"file\"\npath = \"/tmp/d.jsonl\"\n",
    )
    .unwrap_err();
    assert!(err.contains("destination \"d\" is defined twice"), "{err}");
    assert!(
        err.contains("destination \"d\": url is not an AMQP URL"),
        "{err}"
    );
    let err =
        parse("[[destination]]\nname = \"d\"\ntype = \"file\"\npath = \"/tmp/d\"\nmode = 1\n")
            .unwrap_err();
    assert!(err.contains("mode"), "an unknown key is refused: {err}");
}

#[test]
fn a_secret_holds_a_login_certificates_or_both() {
    for (text, problem) in [
        ("name = \"s\"\n", "give username and password"),
        (
            "name = \"s\"\nusername = \"u\"\n",
            "give exactly one of password",
        ),
        (
            "name = \"s\"\ncert_file = \"/c.pem\"\n",
            "cert_file and key_file go together",
        ),
        (
            "name = \"s\"\nca_file = \"/ca.pem\"\nkey_password = \"p\"\n",
            "key_password is set without key_file",
        ),
    ] {
        let err = parse(&format!("[[secret]]\n{text}")).unwrap_err();
        assert!(
            err.contains(&format!("secret \"s\": {problem}")),
            "{text}: {err}"
        );
    }
    let c = parse("[[secret]]\nname = \"s\"\nca_file = \"/ca.pem\"\n").unwrap();
    assert!(c.secrets[0].username.is_none());
}

#[test]
fn an_api_store_is_a_postgres_url_whose_password_stays_out_of_errors() {
    let api = |store: &str| format!("{GOOD}\n[api]\nstore = \"{store}\"\n");
    let c = parse(&api("postgres://postgres@127.0.0.1:5432/postgres")).unwrap();
    assert_eq!(
        c.api.store.as_ref().map(|s| s.expose()),
        Some("postgres://postgres@127.0.0.1:5432/postgres")
    );
    assert_eq!(c.api.store_refresh, Duration::from_secs(10));
    let err = parse(&api("postgres://u:hunter2@h:notaport/db")).unwrap_err();
    assert!(err.contains("[api] store"), "{err}");
    assert!(err.contains("not a PostgreSQL URL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = parse(&(api("postgres://h/db") + "store_refresh = \"100ms\"\n")).unwrap_err();
    assert!(
        err.contains("[api] store_refresh must be at least 1s, got 100ms"),
        "{err}"
    );
}
