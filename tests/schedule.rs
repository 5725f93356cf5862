//! End to end against the local stack: schedules fired by the gateway binary into a
//! Python function running in MiniStack, and two gateways sharing a PostgreSQL ledger.
//!
//! `.config/nextest.toml` runs these with the other stack tests, one at a time.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use common::*;

const LONG: Duration = Duration::from_secs(120);

fn postgres_url() -> String {
    std::env::var("ESM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

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
    assert!(
        invocations
            .iter()
            .all(|i| i.event.as_ref().unwrap()["id"] == first["id"])
    );

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
    assert_eq!(info["executionId"], first["id"]);
    assert_eq!(r["payload"]["time"], first["time"]);
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
    tokio::time::sleep(Duration::from_secs(120)).await;
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

    let mut times = scheduled_times(&f);
    let fired = times.len();
    times.sort();
    times.dedup();
    assert_eq!(times.len(), fired, "a tick fired twice");
    assert!(fired >= 50, "two minutes of 2 s ticks, got {fired}");
    // Both computed every tick: what one won, the other lost.
    assert_eq!(won.iter().sum::<usize>(), fired, "fires logged {won:?}");
    assert!(
        lost.iter().sum::<usize>() >= fired - 2,
        "claims lost {lost:?}"
    );
    for w in times.windows(2) {
        assert_eq!(
            w[1] - w[0],
            TimeDelta::seconds(2),
            "a tick is missing after {}",
            w[0].to_rfc3339_opts(SecondsFormat::Secs, true)
        );
    }
}
