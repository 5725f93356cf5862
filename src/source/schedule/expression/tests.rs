//! Next fire times for AWS's documented examples, L/W/#, rates, one-time schedules and
//! daylight saving in Europe/London and America/New_York. Expected values are worked out
//! from the calendar (2026-05-01 is a Friday), not copied from the code's output.

use super::*;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

/// The next `n` fire times after `from` in `tz`.
fn next(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
    let e = Expression::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    let tz: Tz = tz.parse().unwrap();
    let mut t = utc(from);
    let mut out = Vec::new();
    for _ in 0..n {
        match e.next_after(t, tz, epoch()) {
            Some(x) => {
                out.push(x.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                t = x;
            }
            None => break,
        }
    }
    out
}

const FROM: &str = "2026-05-06T07:00:00Z"; // a Wednesday

#[test]
fn aws_examples_and_special_characters() {
    let table: &[(&str, &str)] = &[
        // AWS's documented examples.
        ("cron(0 10 * * ? *)", "2026-05-06T10:00:00Z"),
        ("cron(15 12 * * ? *)", "2026-05-06T12:15:00Z"),
        ("cron(0 18 ? * MON-FRI *)", "2026-05-06T18:00:00Z"),
        ("cron(0 8 1 * ? *)", "2026-06-01T08:00:00Z"),
        ("cron(0/15 * * * ? *)", "2026-05-06T07:15:00Z"),
        ("cron(0/10 * ? * MON-FRI *)", "2026-05-06T07:10:00Z"),
        ("cron(0/5 8-17 ? * MON-FRI *)", "2026-05-06T08:00:00Z"),
        ("cron(0 9 ? * 2#1 *)", "2026-06-01T09:00:00Z"),
        // AWS weekdays are 1-7 = SUN-SAT.
        ("cron(0 12 ? * SUN *)", "2026-05-10T12:00:00Z"),
        ("cron(0 12 ? * 1 *)", "2026-05-10T12:00:00Z"),
        ("cron(0 12 ? * 7 *)", "2026-05-09T12:00:00Z"),
        ("cron(0 12 ? * 4 *)", "2026-05-06T12:00:00Z"),
        // L: last day of the month; alone in day-of-week, Saturday; 6L the last Friday.
        ("cron(0 12 L * ? *)", "2026-05-31T12:00:00Z"),
        ("cron(0 12 ? * L *)", "2026-05-09T12:00:00Z"),
        ("cron(0 12 ? * 6L *)", "2026-05-29T12:00:00Z"),
        // W: nearest weekday (the 16th is a Saturday, the 17th a Sunday).
        ("cron(0 12 15W * ? *)", "2026-05-15T12:00:00Z"),
        ("cron(0 12 16W * ? *)", "2026-05-15T12:00:00Z"),
        ("cron(0 12 17W * ? *)", "2026-05-18T12:00:00Z"),
        // #: nth weekday (second Tuesday; fifth Monday, which May lacks).
        ("cron(30 9 ? * 3#2 *)", "2026-05-12T09:30:00Z"),
        ("cron(0 0 ? * 2#5 *)", "2026-06-29T00:00:00Z"),
        // Lists, ranges, years, leap days.
        ("cron(0 6,18 ? * * *)", "2026-05-06T18:00:00Z"),
        ("cron(0 0 1 1 ? 2030)", "2030-01-01T00:00:00Z"),
        ("cron(0 0 29 2 ? *)", "2028-02-29T00:00:00Z"),
        ("cron(0 0 1 JAN,JUL ? 2027-2028)", "2027-01-01T00:00:00Z"),
        // Rates count from the epoch (no start given).
        ("rate(5 minutes)", "2026-05-06T07:05:00Z"),
        ("rate(1 minute)", "2026-05-06T07:01:00Z"),
        ("rate(1 hour)", "2026-05-06T08:00:00Z"),
        ("rate(1 day)", "2026-05-07T00:00:00Z"),
        ("rate(2 seconds)", "2026-05-06T07:00:02Z"),
        ("at(2026-05-06T09:30:00)", "2026-05-06T09:30:00Z"),
    ];
    for (expr, want) in table {
        assert_eq!(next(expr, "UTC", FROM, 1), vec![*want], "{expr}");
    }
}

#[test]
fn sequences() {
    assert_eq!(
        next("cron(0/20 9-10 ? * MON-FRI *)", "UTC", FROM, 7),
        [
            "2026-05-06T09:00:00Z",
            "2026-05-06T09:20:00Z",
            "2026-05-06T09:40:00Z",
            "2026-05-06T10:00:00Z",
            "2026-05-06T10:20:00Z",
            "2026-05-06T10:40:00Z",
            "2026-05-07T09:00:00Z",
        ]
    );
    // The last Friday of the next months.
    assert_eq!(
        next("cron(0 17 ? * 6L *)", "UTC", FROM, 3),
        [
            "2026-05-29T17:00:00Z",
            "2026-06-26T17:00:00Z",
            "2026-07-31T17:00:00Z"
        ]
    );
    // One-time: once, then never.
    assert_eq!(
        next("at(2026-05-06T09:30:00)", "Europe/London", FROM, 3),
        ["2026-05-06T08:30:00Z"]
    );
    // A year in the past never fires.
    assert!(next("cron(0 0 1 1 ? 2020)", "UTC", FROM, 1).is_empty());
}

#[test]
fn rates_count_from_their_anchor() {
    let e = Expression::parse("rate(90 minutes)").unwrap();
    let anchor = utc("2026-05-06T06:10:00Z");
    let tz = chrono_tz::UTC;
    assert_eq!(
        e.next_after(utc("2026-05-06T06:00:00Z"), tz, anchor),
        Some(anchor)
    );
    assert_eq!(
        e.next_after(anchor, tz, anchor),
        Some(utc("2026-05-06T07:40:00Z"))
    );
    assert_eq!(
        e.last_at_or_before(utc("2026-05-06T09:00:00Z"), tz, anchor),
        Some(utc("2026-05-06T07:40:00Z"))
    );
    assert_eq!(
        e.last_at_or_before(utc("2026-05-06T06:00:00Z"), tz, anchor),
        None
    );
}

#[test]
fn london_skips_the_missing_hour_and_fires_a_repeated_time_once() {
    // 2026-03-29: 01:00 GMT becomes 02:00 BST, so 01:30 does not exist that day.
    assert_eq!(
        next(
            "cron(30 1 * * ? *)",
            "Europe/London",
            "2026-03-27T12:00:00Z",
            3
        ),
        [
            "2026-03-28T01:30:00Z",
            "2026-03-30T00:30:00Z",
            "2026-03-31T00:30:00Z"
        ]
    );
    // 2026-10-25: 02:00 BST becomes 01:00 GMT, so 01:30 happens twice: it fires at the
    // first (00:30Z) only.
    assert_eq!(
        next(
            "cron(30 1 * * ? *)",
            "Europe/London",
            "2026-10-24T12:00:00Z",
            2
        ),
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
    );
    // Every half hour through the repeated hour: each local time once.
    assert_eq!(
        next(
            "cron(0/30 * * * ? *)",
            "Europe/London",
            "2026-10-24T23:00:00Z",
            5
        ),
        [
            "2026-10-24T23:30:00Z",
            "2026-10-25T00:00:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-25T02:00:00Z",
            "2026-10-25T02:30:00Z",
        ]
    );
    // Through the missing hour: 01:00 and 01:30 local do not exist.
    assert_eq!(
        next(
            "cron(0/30 * * * ? *)",
            "Europe/London",
            "2026-03-29T00:00:00Z",
            3
        ),
        [
            "2026-03-29T00:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:30:00Z"
        ]
    );
    // The last fire at or before a time in the repeated hour's second pass is the first pass.
    let e = Expression::parse("cron(30 1 * * ? *)").unwrap();
    let london: Tz = "Europe/London".parse().unwrap();
    assert_eq!(
        e.last_at_or_before(utc("2026-10-25T01:45:00Z"), london, epoch()),
        Some(utc("2026-10-25T00:30:00Z"))
    );
    assert_eq!(
        e.last_at_or_before(utc("2026-03-30T00:00:00Z"), london, epoch()),
        Some(utc("2026-03-28T01:30:00Z"))
    );
}

#[test]
fn new_york_skips_the_missing_hour_and_fires_a_repeated_time_once() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT.
    assert_eq!(
        next(
            "cron(30 2 * * ? *)",
            "America/New_York",
            "2026-03-06T12:00:00Z",
            3
        ),
        [
            "2026-03-07T07:30:00Z",
            "2026-03-09T06:30:00Z",
            "2026-03-10T06:30:00Z"
        ]
    );
    // 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 fires once, at 01:30 EDT.
    assert_eq!(
        next(
            "cron(30 1 * * ? *)",
            "America/New_York",
            "2026-10-31T12:00:00Z",
            2
        ),
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
    );
    // Noon stays noon local: 16:00Z in summer, 17:00Z in winter.
    assert_eq!(
        next(
            "cron(0 12 * * ? *)",
            "America/New_York",
            "2026-10-31T12:00:00Z",
            3
        ),
        [
            "2026-10-31T16:00:00Z",
            "2026-11-01T17:00:00Z",
            "2026-11-02T17:00:00Z"
        ]
    );
    // A rate is absolute time: DST does not move it.
    assert_eq!(
        next(
            "rate(1 hour)",
            "America/New_York",
            "2026-11-01T04:30:00Z",
            3
        ),
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T07:00:00Z"
        ]
    );
}

#[test]
fn bad_expressions_name_the_field() {
    let field = |expr: &str| match Expression::parse(expr) {
        Err(ExpressionError::Field { field, .. }) => field,
        other => panic!("{expr}: {other:?}"),
    };
    assert_eq!(field("cron(0 10 * * * *)"), "day-of-week");
    assert_eq!(field("cron(0 10 ? * ? *)"), "day-of-week");
    assert_eq!(field("cron(0 25 * * ? *)"), "hours");
    assert_eq!(field("cron(61 1 * * ? *)"), "minutes");
    assert_eq!(field("cron(0 1 32 * ? *)"), "day-of-month");
    assert_eq!(field("cron(0 1 * 13 ? *)"), "month");
    assert_eq!(field("cron(0 1 ? * 8 *)"), "day-of-week");
    assert_eq!(field("cron(0 1 ? * 0 *)"), "day-of-week");
    assert_eq!(field("cron(0 1 * * ? 1969)"), "year");
    assert_eq!(field("cron(0 1 ? * * 2300)"), "year");
    assert_eq!(field("cron(0 ? * * ? *)"), "hours");
    assert_eq!(field("cron(0 1 * * ?)"), "cron");
    assert_eq!(field("cron(0 1 5X * ? *)"), "day-of-month");
    assert_eq!(field("rate(1 minutes)"), "unit");
    assert_eq!(field("rate(5 minute)"), "unit");
    assert_eq!(field("rate(0 minutes)"), "value");
    assert_eq!(field("rate(5 weeks)"), "unit");
    assert_eq!(field("rate(five minutes)"), "value");
    assert_eq!(field("at(2026-13-01T00:00:00)"), "date-time");
    assert!(matches!(
        Expression::parse("every 5 minutes"),
        Err(ExpressionError::Shape { .. })
    ));
    let msg = Expression::parse("cron(0 25 * * ? *)")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cron(0 25 * * ? *)") && msg.contains("hours") && msg.contains("\"25\""),
        "{msg}"
    );
}
