//! The timer under paused tokio time, flexible windows, start and end dates, payloads
//! (checked against aws_lambda_events) and the dry-run report.

use std::sync::Mutex;

use super::*;
use crate::record::Record;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn when(name: &str, expr: &str, tz: &str, window: Duration) -> When {
    When {
        name: name.into(),
        timing: Timing {
            expression: Expression::parse(expr).unwrap(),
            tz: tz.parse().unwrap(),
            start: None,
            end: None,
        },
        window,
    }
}

#[tokio::test(start_paused = true)]
async fn the_timer_fires_each_schedule_at_its_time_in_order() {
    let start = utc("2026-05-06T07:59:55Z");
    let clock = Clock::tokio_from(start);
    let schedules = [
        when("fast", "rate(2 seconds)", "UTC", Duration::ZERO),
        when("hourly", "cron(0 * * * ? *)", "UTC", Duration::ZERO),
        when(
            "once",
            "at(2026-05-06T10:00:03)",
            "Europe/Paris",
            Duration::ZERO,
        ),
        when("never", "at(2020-01-01T00:00:00)", "UTC", Duration::ZERO),
    ];
    let refs: Vec<&When> = schedules.iter().collect();
    let fired = Mutex::new(Vec::new());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop.cancel();
    });
    timer(&refs, clock, &shutdown, |i, scheduled| {
        fired
            .lock()
            .unwrap()
            .push((refs[i].name.clone(), rfc3339(scheduled), clock.now()));
    })
    .await;
    let fired = fired.into_inner().unwrap();
    let names: Vec<(&str, &str)> = fired
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("fast", "2026-05-06T07:59:56Z"),
            ("fast", "2026-05-06T07:59:58Z"),
            ("fast", "2026-05-06T08:00:00Z"),
            ("hourly", "2026-05-06T08:00:00Z"),
            ("fast", "2026-05-06T08:00:02Z"),
            ("once", "2026-05-06T08:00:03Z"),
            ("fast", "2026-05-06T08:00:04Z"),
        ]
    );
    // Under paused time the timer wakes exactly on time.
    for (_, scheduled, at) in &fired {
        assert_eq!(rfc3339(*at), *scheduled);
    }
}

#[tokio::test(start_paused = true)]
async fn a_flexible_window_delays_fires_within_it() {
    let clock = Clock::tokio_from(utc("2026-05-06T07:00:00Z"));
    let w = when("flex", "rate(1 minute)", "UTC", Duration::from_secs(300));
    let refs = [&w];
    let fired = Mutex::new(Vec::new());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        stop.cancel();
    });
    timer(&refs, clock, &shutdown, |_, scheduled| {
        fired.lock().unwrap().push((scheduled, clock.now()));
    })
    .await;
    let fired = fired.into_inner().unwrap();
    // An hour of minutes, less the last few whose window runs past the hour.
    assert!(fired.len() >= 54, "{}", fired.len());
    let mut offsets = std::collections::HashSet::new();
    for (scheduled, at) in &fired {
        let offset = *at - *scheduled;
        assert!(offset >= TimeDelta::zero() && offset < TimeDelta::minutes(5));
        assert_eq!(w.fire_at(*scheduled), *at, "the offset is a pure function");
        offsets.insert(offset);
    }
    assert!(offsets.len() > 40, "offsets are spread: {}", offsets.len());
}

#[test]
fn start_and_end_bound_recurring_schedules() {
    let mut t = when("b", "cron(0 12 * * ? *)", "Europe/London", Duration::ZERO).timing;
    t.start = Some(utc("2026-05-10T11:00:00Z"));
    t.end = Some(utc("2026-05-12T10:00:00Z"));
    let got: Vec<String> = t
        .upcoming(utc("2026-05-01T00:00:00Z"), 5)
        .into_iter()
        .map(rfc3339)
        .collect();
    assert_eq!(got, ["2026-05-10T11:00:00Z", "2026-05-11T11:00:00Z"]);
    assert_eq!(
        t.last_at_or_before(utc("2026-06-01T00:00:00Z")),
        Some(utc("2026-05-11T11:00:00Z"))
    );
    assert_eq!(t.last_at_or_before(utc("2026-05-09T00:00:00Z")), None);

    // A rate counts from its start.
    let mut r = when("r", "rate(7 minutes)", "UTC", Duration::ZERO).timing;
    r.start = Some(utc("2026-05-10T11:00:30Z"));
    let got: Vec<String> = r
        .upcoming(utc("2026-05-10T11:05:00Z"), 2)
        .into_iter()
        .map(rfc3339)
        .collect();
    assert_eq!(got, ["2026-05-10T11:07:30Z", "2026-05-10T11:14:30Z"]);
}

#[test]
fn the_default_payload_is_eventbridges_scheduled_event() {
    let p = Payload::Event {
        account: "123456789012".into(),
        region: "eu-west-1".into(),
        rule_arn: "arn:aws:events:eu-west-1:123456789012:rule/nightly".into(),
    };
    let text = p.render(
        utc("2015-10-08T16:53:06Z"),
        "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
    );
    let e: aws_lambda_events::event::eventbridge::EventBridgeEvent =
        serde_json::from_str(&text).unwrap();
    assert_eq!(e.detail_type, "Scheduled Event");
    assert_eq!(e.source, "aws.events");
    assert_eq!(e.version.as_deref(), Some("0"));
    assert_eq!(e.account.as_deref(), Some("123456789012"));
    assert_eq!(e.region.as_deref(), Some("eu-west-1"));
    assert_eq!(e.time, Some(utc("2015-10-08T16:53:06Z")));
    assert_eq!(
        e.resources.unwrap(),
        ["arn:aws:events:eu-west-1:123456789012:rule/nightly"]
    );
    assert_eq!(e.detail, serde_json::json!({}));
    assert!(text.contains(r#""time":"2015-10-08T16:53:06Z""#), "{text}");
}

#[test]
fn an_input_gets_schedulers_placeholders() {
    let p = Payload::Input {
        template: r#"{"at":"<aws.scheduler.scheduled-time>","id":"<aws.scheduler.execution-id>","arn":"<aws.scheduler.schedule-arn>","n":<aws.scheduler.attempt-number>}"#.into(),
        schedule_arn: "arn:aws:scheduler:us-east-1:0:schedule/default/s".into(),
    };
    let text = p.render(utc("2026-01-02T03:04:05Z"), "exec-1");
    assert_eq!(
        text,
        r#"{"at":"2026-01-02T03:04:05Z","id":"<aws.scheduler.execution-id>","arn":"arn:aws:scheduler:us-east-1:0:schedule/default/s","n":<aws.scheduler.attempt-number>}"#
    );
    // The attempt number and execution id are the envelope's, per invoke.
    let env = super::event::ScheduleShape {
        name: "s".into(),
        arn: "arn".into(),
        expression: "rate(1 minute)".into(),
    };
    let record = Record {
        fragment: text,
        ..Record::for_test(Some("exec-1"), None, 0)
    };
    let third: serde_json::Value = serde_json::from_slice(&crate::invoke::event::Shape::render(
        &env,
        std::slice::from_ref(&record),
        3,
    ))
    .unwrap();
    assert_eq!(third["n"], 3);
    let first: serde_json::Value = serde_json::from_slice(&crate::invoke::event::Shape::render(
        &env,
        std::slice::from_ref(&record),
        1,
    ))
    .unwrap();
    assert_eq!(first["id"], "exec-1");
    assert_eq!(first["n"], 1);
}

#[test]
fn the_dry_run_lists_times_in_utc_and_local() {
    let config = crate::config::Config::parse(
        std::path::Path::new("t.toml"),
        r#"
[[mapping]]
name = "london"
function = "f"
source = { type = "schedule", expression = "cron(30 1 * * ? *)", timezone = "Europe/London" }

[[mapping]]
name = "rmq"
function = "f"
source = { type = "rabbitmq", url = "amqp://h", queue = "q" }
"#,
    )
    .unwrap();
    let schedules = config.mappings.iter().filter_map(|m| {
        m.source
            .as_schedule()
            .map(|s| (m.name.as_str(), s, m.enabled))
    });
    let out = dry_run(schedules, utc("2026-03-27T12:00:00Z"), 3);
    assert_eq!(
        out,
        "london  cron(30 1 * * ? *)  Europe/London\n\
         \x20 2026-03-28T01:30:00Z  2026-03-28T01:30:00+00:00 GMT\n\
         \x20 2026-03-30T00:30:00Z  2026-03-30T01:30:00+01:00 BST\n\
         \x20 2026-03-31T00:30:00Z  2026-03-31T01:30:00+01:00 BST\n"
    );
}

/// The process's one timer: schedules of different mappings register with it and each
/// hears only its own fires; one taken off (its mapping stopped) fires no more while the
/// other goes on.
#[tokio::test(start_paused = true)]
async fn one_timer_serves_every_registered_schedule_and_forgets_a_removed_one() {
    let timer = Timer::start(Clock::tokio_from(utc("2026-05-06T07:59:59Z")));
    let (a_tx, mut a) = tokio::sync::mpsc::unbounded_channel();
    let (b_tx, mut b) = tokio::sync::mpsc::unbounded_channel();
    let a_reg = timer.register(0, when("a", "rate(1 minute)", "UTC", Duration::ZERO), a_tx);
    let _b_reg = timer.register(7, when("b", "rate(1 minute)", "UTC", Duration::ZERO), b_tx);
    let (index, first) = a.recv().await.unwrap();
    assert_eq!((index, rfc3339(first)), (0, "2026-05-06T08:00:00Z".into()));
    let (index, first) = b.recv().await.unwrap();
    assert_eq!((index, rfc3339(first)), (7, "2026-05-06T08:00:00Z".into()));
    drop(a_reg);
    let (_, next) = b.recv().await.unwrap();
    assert_eq!(rfc3339(next), "2026-05-06T08:01:00Z");
    let (_, next) = b.recv().await.unwrap();
    assert_eq!(rfc3339(next), "2026-05-06T08:02:00Z");
    // Taken off after its first fire: nothing more for it (its sender is gone with it).
    assert!(a.try_recv().is_err());
}
