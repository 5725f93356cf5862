//! A schedule's configuration: its TOML table, the types of its fields and its checks.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::event::ScheduleShape;
use crate::pipeline::retry::Exhausted;
use crate::source::{Defaults, Facts};

/// `[mapping.source]` with `type = "schedule"`: EventBridge-style schedule.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSource {
    /// `cron(min hour day-of-month month day-of-week year)`, `rate(N unit)` or
    /// `at(yyyy-mm-ddThh:mm:ss)`, as AWS writes them (plus `rate(N seconds)`).
    pub expression: ScheduleExpression,
    /// IANA zone the cron and at times are read in. Default: "UTC".
    #[serde(default)]
    pub timezone: TimeZoneName,
    /// No fire before this time (recurring schedules). Default: none.
    pub start: Option<ScheduleTime>,
    /// No fire after this time (recurring schedules). Default: none.
    pub end: Option<ScheduleTime>,
    /// Fire at a moment within this window after each scheduled time. Default: off.
    pub flexible_window: Option<FlexibleWindow>,
    /// JSON sent instead of the Scheduled Event, with `<aws.scheduler.…>` placeholders
    /// substituted. Default: EventBridge's Scheduled Event.
    pub input: Option<ScheduleInput>,
    /// What a gateway that was down does about the time it missed: "skip", or
    /// "fire_once" for the last one (needs `[schedules] store`). Default: "skip".
    #[serde(default)]
    pub missed: MissedFire,
}

/// The missed-fire policy of a schedule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MissedFire {
    #[default]
    Skip,
    FireOnce,
}

/// AWS EventBridge Scheduler's retry defaults and limits.
pub const MAX_RETRIES: u32 = 185;
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(86_400);

/// Scheduler's defaults: 185 retries within 24 hours, and an exhausted fire without a
/// dead-letter queue is dropped (the schedule fires again at its next time).
pub const DEFAULTS: Defaults = Defaults {
    // Unused (a fire is one record), kept as the other sources' for `status`.
    batch_size: 100,
    batch_window: Duration::from_millis(500),
    max_attempts: -1,
    forever: Some(MAX_RETRIES),
    forever_with_destination: Some(MAX_RETRIES),
    max_record_age: Some(MAX_EVENT_AGE),
    exhausted: Exhausted::Drop,
};

impl ScheduleSource {
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        let name = facts.mapping;
        if facts.max_attempts.is_some_and(|a| a > MAX_RETRIES as i32) {
            out.push(format!(
                "mapping {name:?}: retry.max_attempts of a schedule must be between 0 and {MAX_RETRIES}, got {}",
                facts.max_attempts.unwrap_or(-1)
            ));
        }
        if let Some(a) = facts.max_record_age
            && a > MAX_EVENT_AGE
        {
            out.push(format!(
                "mapping {name:?}: retry.max_record_age of a schedule must be between 60s and 24h, got {}",
                humantime::format_duration(a)
            ));
        }
        let tz = self.timezone.0;
        if let (Some(start), Some(end)) = (&self.start, &self.end)
            && start.resolve(tz) >= end.resolve(tz)
        {
            out.push(format!(
                "mapping {name:?}: source.start must be before source.end"
            ));
        }
        if self.missed == MissedFire::FireOnce && !facts.schedule_store {
            out.push(format!(
                "mapping {name:?}: source.missed = \"fire_once\" needs [schedules] store: without a ledger a restarted gateway cannot know what it missed"
            ));
        }
    }

    pub fn shape(&self, name: &str, region: &str, account: &str) -> ScheduleShape {
        ScheduleShape {
            name: name.to_owned(),
            arn: if self.input.is_some() {
                schedule_arn(name, region, account)
            } else {
                rule_arn(name, region, account)
            },
            expression: self.expression.0.to_string(),
        }
    }
}

/// The ARN a Scheduled Event names in `resources`: an EventBridge rule's.
pub fn rule_arn(name: &str, region: &str, account: &str) -> String {
    format!("arn:aws:events:{region}:{account}:rule/{name}")
}

/// The ARN `<aws.scheduler.schedule-arn>` stands for: a Scheduler schedule's, in the
/// default group.
pub fn schedule_arn(name: &str, region: &str, account: &str) -> String {
    format!("arn:aws:scheduler:{region}:{account}:schedule/default/{name}")
}

/// A schedule expression (`cron(…)`, `rate(…)`, `at(…)`), checked while parsing so that a
/// bad one is reported with its line, the expression and the field to blame.
/// Kept with its text, which is what a reload compares.
#[derive(Debug, Clone)]
pub struct ScheduleExpression(pub super::Expression, pub String);

impl PartialEq for ScheduleExpression {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}

impl<'de> Deserialize<'de> for ScheduleExpression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        super::Expression::parse(&s)
            .map(|e| ScheduleExpression(e, s))
            .map_err(serde::de::Error::custom)
    }
}

/// An IANA time zone name, e.g. "Europe/London". Default: UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct TimeZoneName(#[schemars(with = "String")] pub chrono_tz::Tz);

impl Default for TimeZoneName {
    fn default() -> Self {
        TimeZoneName(chrono_tz::UTC)
    }
}

impl<'de> Deserialize<'de> for TimeZoneName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<chrono_tz::Tz>().map(TimeZoneName).map_err(|_| {
            serde::de::Error::custom(format!(
                "unknown time zone {s:?}; use an IANA name such as \"UTC\", \"Europe/London\" or \"America/New_York\""
            ))
        })
    }
}

/// A schedule's flexible window, 1 minute–24 hours (AWS's 1–1,440 minutes); "0s" is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct FlexibleWindow(#[schemars(with = "String")] pub Duration);

impl<'de> Deserialize<'de> for FlexibleWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w: Duration = humantime_serde::deserialize(d)?;
        if w.is_zero() || (Duration::from_secs(60)..=Duration::from_secs(86_400)).contains(&w) {
            Ok(FlexibleWindow(w))
        } else {
            Err(serde::de::Error::custom(format!(
                "flexible_window must be \"0s\" (off) or between 1m and 24h, got {}",
                humantime::format_duration(w)
            )))
        }
    }
}

/// A schedule's start or end: RFC 3339 with an offset ("2026-01-01T00:00:00Z"), or a
/// local time without one ("2026-01-01T00:00:00"), read in the schedule's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleTime {
    Instant(chrono::DateTime<chrono::Utc>),
    Local(chrono::NaiveDateTime),
}

impl ScheduleTime {
    /// The instant, in `tz` for a local time (one that does not exist there is read
    /// as UTC, one that repeats as its first occurrence).
    pub fn resolve(&self, tz: chrono_tz::Tz) -> chrono::DateTime<chrono::Utc> {
        match self {
            ScheduleTime::Instant(t) => *t,
            ScheduleTime::Local(l) => {
                super::expression::instant(tz, *l).unwrap_or_else(|| l.and_utc())
            }
        }
    }
}

impl<'de> Deserialize<'de> for ScheduleTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&s) {
            return Ok(ScheduleTime::Instant(t.with_timezone(&chrono::Utc)));
        }
        chrono::NaiveDateTime::parse_from_str(&s, "%Y-%m-%dT%H:%M:%S")
            .map(ScheduleTime::Local)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid time {s:?}; write \"2026-01-01T09:00:00Z\" (RFC 3339) or \"2026-01-01T09:00:00\" (in the schedule's time zone)"
                ))
            })
    }
}

/// A schedule's input: JSON, once Scheduler's placeholders are substituted.
#[derive(Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
pub struct ScheduleInput(pub String);

impl<'de> Deserialize<'de> for ScheduleInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use super::{EXECUTION_ID, SCHEDULE_ARN, SCHEDULED_TIME};
        let s = String::deserialize(d)?;
        let sample = s
            .replace(SCHEDULED_TIME, "2026-01-01T00:00:00Z")
            .replace(EXECUTION_ID, "00000000-0000-0000-0000-000000000000")
            .replace(super::event::ATTEMPT_NUMBER, "1")
            .replace(
                SCHEDULE_ARN,
                "arn:aws:scheduler:us-east-1:0:schedule/default/x",
            );
        match serde_json::from_str::<serde_json::Value>(&sample) {
            Ok(_) => Ok(ScheduleInput(s)),
            Err(e) => Err(serde::de::Error::custom(format!(
                "input must be JSON (after placeholders are substituted): {e}"
            ))),
        }
    }
}

/// Written as a string in TOML.
impl schemars::JsonSchema for ScheduleExpression {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ScheduleExpression".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "cron(min hour day-of-month month day-of-week year), rate(N unit) or at(yyyy-mm-ddThh:mm:ss)",
            "pattern": "^(cron|rate|at)\\(.*\\)$"
        })
    }
}

/// Written as a string in TOML.
impl schemars::JsonSchema for ScheduleTime {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ScheduleTime".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "RFC 3339 (2026-01-01T09:00:00Z) or a local time in the schedule's zone (2026-01-01T09:00:00)"
        })
    }
}
