//! End to end against the local stack: schedules fired by the gateway binary into a
//! Python function running in MiniStack, and two gateways sharing a PostgreSQL ledger.
//!
//! `.config/nextest.toml` runs these with the other stack tests, one at a time.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use common::freezer::Freezer;
use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);

/// A config with one schedule mapping; `source` goes inside its source table, `extra`
/// after it (retry and on_failure tables), `head` before the mapping.
fn schedule_config(name: &str, function: &str, head: &str, source: &str, extra: &str) -> String {
    gateway_header()
        + &format!(
            r#"
{head}

[[mapping]]
name = "{name}"
function = "{function}"

[mapping.source]
type = "schedule"
{source}

{extra}
"#,
        )
}

fn scheduled_times(f: &Function) -> Vec<DateTime<Utc>> {
    f.invocations()
        .iter()
        .map(|i| {
            DateTime::parse_from_rfc3339(&i.bodies[0])
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect()
}

#[tokio::test]
async fn a_schedule_fires_eventbridge_scheduled_events_into_a_function() {
    let f = Function::deploy("sched", &[]).await;
    let name = unique("every2s");
    let gw = Gateway::start(&schedule_config(
        &name,
        &f.name,
        "",
        r#"expression = "rate(2 seconds)""#,
        "",
    ));
    let invocations = wait_for("three scheduled events", LONG, || {
        let i = f.invocations();
        (i.len() >= 3).then_some(i)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let mut ids = HashSet::new();
    for i in &invocations {
        let event = i.event.clone().unwrap();
        let e: aws_lambda_events::event::eventbridge::EventBridgeEvent =
            serde_json::from_value(event.clone()).unwrap();
        assert_eq!(e.detail_type, "Scheduled Event");
        assert_eq!(e.source, "aws.events");
        assert_eq!(e.version.as_deref(), Some("0"));
        assert_eq!(e.account.as_deref(), Some("000000000000"));
        assert_eq!(e.region.as_deref(), Some("us-east-1"));
        assert_eq!(
            e.resources.unwrap(),
            [format!("arn:aws:events:us-east-1:000000000000:rule/{name}")]
        );
        assert_eq!(e.detail, serde_json::json!({}));
        let time = e.time.unwrap();
        assert_eq!(
            time.timestamp() % 2,
            0,
            "on the rate's even seconds: {time}"
        );
        assert!(
            event["time"].as_str().unwrap().ends_with('Z'),
            "AWS's format: {event}"
        );
        assert!(ids.insert(e.id.unwrap()), "a fresh id per fire");
    }
    // Consecutive fires, two seconds apart.
    let times = scheduled_times(&f);
    for w in times.windows(2) {
        assert_eq!(w[1] - w[0], TimeDelta::seconds(2), "{times:?}");
    }
}

#[tokio::test]
async fn a_failing_fire_is_retried_as_configured_then_parked() {
    let f = Function::deploy("schedfail", &[("FAIL_SCHEDULE", "1")]).await;
    let parked = f.dir.path().join("parked.jsonl");
    let name = unique("once");
    // A one-time schedule a few seconds from now (at() is local time, here UTC).
    let at = (Utc::now() + TimeDelta::seconds(4)).format("%Y-%m-%dT%H:%M:%S");
    let gw = Gateway::start(&schedule_config(
        &name,
        &f.name,
        "",
        &format!(
            r#"expression = "at({at})"
input = '{{"time":"<aws.scheduler.scheduled-time>","attempt":<aws.scheduler.attempt-number>,"id":"<aws.scheduler.execution-id>","arn":"<aws.scheduler.schedule-arn>"}}'"#
        ),
        &format!(
            r#"
[mapping.retry]
max_attempts = 2
backoff_min = "10ms"
backoff_max = "50ms"

[mapping.on_failure]
type = "file"
path = "{}"
"#,
            parked.display()
        ),
    ));
    let records = wait_for("the failure record", LONG, || {
        let r = failure_records(&parked);
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    // The first attempt and two retries, each numbered, all of the same fire.
    let invocations = f.invocations();
    let attempts: Vec<i64> = invocations
        .iter()
        .map(|i| i.event.as_ref().unwrap()["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let first = invocations[0].event.clone().unwrap();
    assert_eq!(first["time"], format!("{at}Z"));
    assert_eq!(
        first["arn"],
        format!("arn:aws:scheduler:us-east-1:000000000000:schedule/default/{name}")
    );
    // Each attempt has its own execution id, as on AWS.
    let ids: HashSet<String> = invocations
        .iter()
        .map(|i| i.event.as_ref().unwrap()["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");

    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(r["responseContext"]["functionError"], "Unhandled");
    assert!(
        r["error"].as_str().unwrap().contains("failed on purpose"),
        "{r}"
    );
    let info = &r["ScheduleInfo"];
    assert_eq!(info["scheduleName"], name.as_str());
    assert_eq!(info["expression"], format!("at({at})"));
    assert!(
        info["scheduledTime"]
            .as_str()
            .unwrap()
            .starts_with(&at.to_string()),
        "{info}"
    );
    // The failure record correlates by the fire's (first attempt's) id.
    assert_eq!(info["executionId"], first["id"]);
    assert_eq!(r["payload"]["time"], first["time"]);
    assert_eq!(r["payload"]["attempt"], 3, "the last attempt's event");
}

/// Scheduler gives every attempted invocation its own `<aws.scheduler.execution-id>`:
/// a fire failing once is invoked twice, with two ids.
#[tokio::test]
async fn each_attempt_of_a_fire_has_its_own_execution_id() {
    let f = Function::deploy("schedexec", &[("FAIL_SCHEDULE_TIMES", "1")]).await;
    let name = unique("execid");
    let at = (Utc::now() + TimeDelta::seconds(4)).format("%Y-%m-%dT%H:%M:%S");
    let gw = Gateway::start(&schedule_config(
        &name,
        &f.name,
        "",
        &format!(
            r#"expression = "at({at})"
input = '{{"time":"<aws.scheduler.scheduled-time>","attempt":<aws.scheduler.attempt-number>,"id":"<aws.scheduler.execution-id>"}}'"#
        ),
        "[mapping.retry]\nbackoff_min = \"10ms\"\nbackoff_max = \"50ms\"",
    ));
    let invocations = wait_for("the failed attempt and its retry", LONG, || {
        let i = f.invocations();
        i.iter().any(|i| i.ok).then_some(i)
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let events: Vec<&Value> = invocations
        .iter()
        .map(|i| i.event.as_ref().unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events
            .iter()
            .map(|e| e["attempt"].clone())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(
        events.iter().all(|e| e["time"] == format!("{at}Z")),
        "one fire: {events:?}"
    );
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    for id in &ids {
        assert_eq!(
            uuid::Uuid::parse_str(id).unwrap().get_version_num(),
            4,
            "{id}"
        );
    }
    assert_ne!(ids[0], ids[1], "a retry has its own execution id");
}

#[tokio::test]
async fn two_gateways_sharing_postgres_fire_every_tick_exactly_once() {
    let f = Function::deploy("schedpg", &[]).await;
    let name = unique("shared");
    // Each process gets its own config, and so its own admin port.
    let config = || {
        schedule_config(
            &name,
            &f.name,
            &format!("[schedules]\nstore = \"{}\"", postgres_url()),
            r#"expression = "rate(2 seconds)""#,
            "",
        )
    };
    let a = Gateway::start(&config());
    let b = Gateway::start(&config());
    // Fifty ticks (100 s), each fired by one replica or the other.
    wait_for("fifty ticks fired", Duration::from_secs(200), || {
        (scheduled_times(&f).len() >= 50).then_some(())
    })
    .await;
    let logs = [a.logs.clone(), b.logs.clone()];
    assert_eq!(a.terminate().await.code(), Some(0));
    assert_eq!(b.terminate().await.code(), Some(0));
    let count = |needle: &str| -> Vec<usize> {
        logs.iter()
            .map(|l| {
                l.lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .collect()
    };
    let won = count("schedule fired");
    let lost = count("another replica fired this time");

    let fired = assert_every_tick_once(&scheduled_times(&f), TimeDelta::seconds(2));
    assert!(fired >= 50, "fifty 2 s ticks, got {fired}");
    // Both computed every tick: what one won, the other lost.
    assert_eq!(won.iter().sum::<usize>(), fired, "fires logged {won:?}");
    assert!(
        lost.iter().sum::<usize>() >= fired - 2,
        "claims lost {lost:?}"
    );
}

/// Asserts that `times` hold each tick `step` apart from the first to the last, each
/// once; returns how many.
fn assert_every_tick_once(times: &[DateTime<Utc>], step: TimeDelta) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), times.len(), "a tick fired twice");
    for w in sorted.windows(2) {
        assert_eq!(
            w[1] - w[0],
            step,
            "a tick is missing after {}",
            w[0].to_rfc3339_opts(SecondsFormat::Secs, true)
        );
    }
    times.len()
}

/// A rate schedule with one tick a few seconds from now (its start; its end is before the
/// next), a function failing its first `fails` invokes of that tick, retries every 1-2 s
/// and a file destination; `head` goes before the mapping.
fn one_tick_config(
    name: &str,
    f: &Function,
    parked: &std::path::Path,
    head: &str,
) -> (String, DateTime<Utc>) {
    let start = DateTime::from_timestamp(Utc::now().timestamp() + 4, 0).unwrap();
    let config = schedule_config(
        name,
        &f.name,
        head,
        &format!(
            "expression = \"rate(1 hour)\"\nstart = \"{}\"\nend = \"{}\"",
            start.to_rfc3339_opts(SecondsFormat::Secs, true),
            (start + TimeDelta::seconds(30)).to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        &format!(
            r#"
[mapping.retry]
backoff_min = "2s"
backoff_max = "2s"

[mapping.on_failure]
type = "file"
path = "{}"
"#,
            parked.display()
        ),
    );
    (config, start)
}

/// Every invoke was of the one tick and one fire (one execution id); returns how many
/// succeeded.
fn successes_of_one_fire(f: &Function, tick: DateTime<Utc>) -> usize {
    let invocations = f.invocations();
    let ids: HashSet<String> = invocations
        .iter()
        .map(|i| i.event.as_ref().unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one fire, one execution id: {ids:?}");
    assert!(scheduled_times(f).iter().all(|t| *t == tick));
    invocations.iter().filter(|i| i.ok).count()
}

/// One tick of a fresh function (deployed with `vars`), with a 2 s lease on the shared
/// ledger or (`store` false) no store.
struct OneTick {
    f: Function,
    parked: std::path::PathBuf,
    name: String,
    config: String,
    tick: DateTime<Utc>,
}

impl OneTick {
    async fn new(prefix: &str, vars: &[(&str, &str)], store: bool) -> OneTick {
        let f = Function::deploy(prefix, vars).await;
        let parked = f.dir.path().join("parked.jsonl");
        let name = unique(prefix);
        let head = if store {
            format!(
                "[schedules]\nstore = \"{}\"\nlease = \"2s\"",
                postgres_url()
            )
        } else {
            String::new()
        };
        let (config, tick) = one_tick_config(&name, &f, &parked, &head);
        OneTick {
            f,
            parked,
            name,
            config,
            tick,
        }
    }

    /// Starts a gateway on the config and waits for the fire's first (failed) attempt.
    async fn start_until_first_attempt(&self) -> Gateway {
        let gw = Gateway::start(&self.config);
        wait_for("the first failed attempt", LONG, || {
            (!self.f.invocations().is_empty()).then_some(())
        })
        .await;
        gw
    }

    async fn wait_delivered(&self) {
        wait_for("the fire delivered", LONG, || {
            self.f.invocations().iter().any(|i| i.ok).then_some(())
        })
        .await;
    }

    /// The count: the one fire delivered once, nothing parked.
    fn assert_delivered_once(&self) {
        assert_eq!(
            successes_of_one_fire(&self.f, self.tick),
            1,
            "delivered once"
        );
        assert_eq!(failure_records(&self.parked).len(), 0, "nothing parked");
    }
}

/// A gateway stopped (`kill9`, else SIGTERM) while its fire retries; a second one on the
/// same ledger resumes it: the fire ends delivered exactly once, nothing parked.
async fn a_fire_interrupted_during_retries_is_resumed(kill9: bool) {
    // Three failures: the first gateway sees at least one, the second the rest.
    let t = OneTick::new("schedresume", &[("FAIL_SCHEDULE_TIMES", "3")], true).await;
    let a = t.start_until_first_attempt().await;
    if kill9 {
        a.kill9();
    } else {
        let logs = a.logs.clone();
        assert_eq!(a.terminate().await.code(), Some(0));
        let released = logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("its lease is released"));
        assert!(released, "the stopped gateway released its lease");
    }
    let b = Gateway::start(&t.config);
    t.wait_delivered().await;
    b.wait_log("resuming a fire", LONG).await;
    assert_eq!(b.terminate().await.code(), Some(0));

    t.assert_delivered_once();
    assert!(
        t.f.invocations().len() >= 4,
        "three failures, then the success"
    );
}

#[tokio::test]
async fn a_fire_killed_during_its_retries_is_resumed_by_another_gateway() {
    a_fire_interrupted_during_retries_is_resumed(true).await;
}

#[tokio::test]
async fn a_fire_stopped_during_its_retries_is_resumed_by_another_gateway() {
    a_fire_interrupted_during_retries_is_resumed(false).await;
}

/// Without a ledger nothing can resume a fire: shutdown during its retries parks it.
#[tokio::test]
async fn without_a_store_shutdown_during_retries_parks_the_fire() {
    let t = OneTick::new("schedstop", &[("FAIL_SCHEDULE", "1")], false).await;
    let gw = t.start_until_first_attempt().await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let (f, parked, tick) = (&t.f, &t.parked, t.tick);

    assert_eq!(successes_of_one_fire(f, tick), 0);
    let records = failure_records(parked);
    assert_eq!(records.len(), 1, "the fire is parked: {records:?}");
    let r = &records[0];
    assert_eq!(
        r["ScheduleInfo"]["executionId"],
        f.invocations()[0].event.as_ref().unwrap()["id"]
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("stopped during the fire's retries"),
        "{r}"
    );
    assert_eq!(
        r["requestContext"]["approximateInvokeCount"],
        f.invocations().len()
    );
}

/// The ledger, driven directly in a schema of its own that starts with the table of an
/// earlier version: the lease columns are added, its old rows count as finished, a claim
/// retried after a lost reply is still ours, and an expired lease is taken over once.
#[tokio::test]
async fn the_ledger_migrates_an_old_table_and_keeps_a_lost_claim_reply_ours() {
    use esm_gateway::config::SecretUrl;
    use esm_gateway::source::schedule::store::{Orphan, Store};

    let (schema, url) = postgres_schema("ledger").await;
    let (admin, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "CREATE TABLE {schema}.esm_gateway_schedule_fires (
                 schedule text NOT NULL, scheduled_time timestamptz NOT NULL,
                 fired_at timestamptz NOT NULL DEFAULT now(), owner text NOT NULL,
                 PRIMARY KEY (schedule, scheduled_time));
             INSERT INTO {schema}.esm_gateway_schedule_fires VALUES ('s', '2026-01-01T00:00:00Z', now(), 'old')"
        ))
        .await
        .unwrap();
    let url = SecretUrl::new(url);
    let a = Store::new(&url, Duration::from_secs(1));
    let b = Store::new(&url, Duration::from_secs(1));
    let tick: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();

    assert!(a.claim("s", tick, "exec-1").await.unwrap());
    // The reply to that insert was lost and it is tried again: still ours.
    assert!(a.claim("s", tick, "exec-1").await.unwrap());
    assert!(
        !b.claim("s", tick, "exec-2").await.unwrap(),
        "another replica's"
    );
    assert!(b.take_over("s").await.unwrap().is_empty(), "a live lease");

    // `a` dies; once its lease expires `b` takes the fire over, and only once.
    assert!(a.renew("s", tick).await.unwrap());
    // The lease is a time in the database: poll for it, as wait_for does.
    let orphans = tokio::time::timeout(LONG, async {
        loop {
            let o = b.take_over("s").await.unwrap();
            if !o.is_empty() {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the lease to expire");
    assert!(
        b.take_over("s").await.unwrap().is_empty(),
        "taken over once"
    );
    assert_eq!(
        orphans,
        [Orphan {
            scheduled: tick,
            execution_id: "exec-1".into()
        }],
        "the old row, with no lease, is not resumed"
    );
    assert!(!a.renew("s", tick).await.unwrap(), "no longer a's");
    b.finish("s", tick).await.unwrap();
    assert!(!b.renew("s", tick).await.unwrap(), "finished");
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Disabling a schedule during its fire's retries releases the fire; enabling it again
/// resumes it in the same process: delivered once, nothing parked.
#[tokio::test]
async fn a_fire_disabled_during_its_retries_is_resumed_when_enabled() {
    let t = OneTick::new("scheddisable", &[("FAIL_SCHEDULE_TIMES", "2")], true).await;
    let gw = t.start_until_first_attempt().await;
    // Returns once the mapping's fires stopped.
    let (status, body) = gw.post(&format!("/mappings/{}/disable", t.name), Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    assert!(gw.log_contains("its lease is released"));
    let (status, body) = gw.post(&format!("/mappings/{}/enable", t.name), Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    t.wait_delivered().await;
    assert!(gw.log_contains("resuming a fire"));
    assert_eq!(gw.terminate().await.code(), Some(0));

    t.assert_delivered_once();
}

#[tokio::test]
async fn a_silent_store_connection_is_given_up_and_every_tick_still_fires_once() {
    let f = Function::deploy("schedfrozen", &[]).await;
    let (schema, url) = postgres_schema("frozen").await;
    let pg: tokio_postgres::Config = url.parse().unwrap();
    let upstream = match (&pg.get_hosts()[0], pg.get_ports().first()) {
        (tokio_postgres::config::Host::Tcp(host), port) => {
            format!("{host}:{}", port.copied().unwrap_or(5432))
        }
        _ => panic!("the test needs PostgreSQL over TCP: {url}"),
    };
    let proxy = Freezer::start(&upstream, b"esm_gateway_schedule_fires");
    let proxied = url.replacen(&upstream, &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(proxied, url, "the store's URL names {upstream}");
    let config = schedule_config(
        &unique("frozen"),
        &f.name,
        &format!("[schedules]\nstore = \"{proxied}\""),
        r#"expression = "rate(1 second)""#,
        "",
    );
    let gw = Gateway::start(&config);
    wait_for("three ticks fired", LONG, || {
        (scheduled_times(&f).len() >= 3).then_some(())
    })
    .await;
    // The store's connection goes silent: claims sent on it get no answer.
    assert!(proxy.freeze_all() >= 1);
    let before = scheduled_times(&f).len();
    // Five ticks more, and none missing between them: the claims sent on the silent
    // connection are given up and made again on a new one.
    let contiguous = |times: &[DateTime<Utc>]| {
        let mut t = times.to_vec();
        t.sort();
        t.dedup();
        t.windows(2).all(|w| w[1] - w[0] == TimeDelta::seconds(1))
    };
    wait_for("every tick fired through a new connection", LONG, || {
        let times = scheduled_times(&f);
        (times.len() >= before + 5 && contiguous(&times)).then_some(())
    })
    .await;
    assert!(proxy.accepted() > 1, "the store connected again");
    // And the silent connection was closed, not left to wait on its peer for good.
    wait_for(
        "the gateway closed the silent connection",
        Duration::from_secs(30),
        || (proxy.silenced_still_open() == 0).then_some(()),
    )
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    // The count: every tick from the first to the last fired once, none lost to the
    // silent connection.
    assert_every_tick_once(&scheduled_times(&f), TimeDelta::seconds(1));
    drop_schema(&schema).await;
}
