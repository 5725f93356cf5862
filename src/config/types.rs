//! Field types that check their own range while being deserialized, so that a bad value
//! is reported by the TOML parser with its line and column.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Lambda's synchronous invoke payload limit: 6 MB.
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// Records per batch, 1–10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize(pub u32);

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=10_000).contains(&n) {
            Ok(BatchSize(n as u32))
        } else {
            Err(serde::de::Error::custom(format!(
                "batch size must be between 1 and 10000, got {n}"
            )))
        }
    }
}

/// Batching window, 0–300 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWindow(pub Duration);

impl<'de> Deserialize<'de> for BatchWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = duration(d)?;
        if w <= Duration::from_secs(300) {
            Ok(BatchWindow(w))
        } else {
            Err(serde::de::Error::custom(format!(
                "batching window must be at most 300s, got {}",
                humantime::format_duration(w)
            )))
        }
    }
}

/// Batch byte cap, 1 KiB–6 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1024..=MAX_PAYLOAD as i64).contains(&n) {
            Ok(ByteSize(n as usize))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_bytes must be between 1024 and {MAX_PAYLOAD} (6 MB, Lambda's payload limit), got {n}"
            )))
        }
    }
}

/// A lane's buffer budget in bytes, 1 MiB–4 GiB (less one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferBytes(pub usize);

impl<'de> Deserialize<'de> for BufferBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1 << 20..=i64::from(u32::MAX)).contains(&n) {
            Ok(BufferBytes(n as usize))
        } else {
            Err(serde::de::Error::custom(format!(
                "buffer_bytes must be between 1048576 (1 MiB) and {} (4 GiB less one byte), got {n}",
                u32::MAX
            )))
        }
    }
}

/// AWS's MaximumRetryAttempts: -1 (forever) or 0–10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAttempts(pub i32);

impl<'de> Deserialize<'de> for RetryAttempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if n == -1 || (0..=10_000).contains(&n) {
            Ok(RetryAttempts(n as i32))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_attempts must be -1 (forever) or between 0 and 10000, got {n}"
            )))
        }
    }
}

/// AWS's MaximumRecordAgeInSeconds: 60 s–604,800 s (leave it out for no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxRecordAge(pub Duration);

impl<'de> Deserialize<'de> for MaxRecordAge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let a = duration(d)?;
        if (Duration::from_secs(60)..=Duration::from_secs(604_800)).contains(&a) {
            Ok(MaxRecordAge(a))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_record_age must be between 60s and 7days, got {}",
                humantime::format_duration(a)
            )))
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write it like \"500ms\", \"30s\" or \"5m\""
        ))
    })
}

/// A schedule expression (`cron(…)`, `rate(…)`, `at(…)`), checked while parsing so that a
/// bad one is reported with its line, the expression and the field to blame.
/// Kept with its text, which is what a reload compares.
#[derive(Debug, Clone)]
pub struct ScheduleExpression(pub crate::source::schedule::Expression, pub String);

impl PartialEq for ScheduleExpression {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}

impl<'de> Deserialize<'de> for ScheduleExpression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::source::schedule::Expression::parse(&s)
            .map(|e| ScheduleExpression(e, s))
            .map_err(serde::de::Error::custom)
    }
}

/// An IANA time zone name, e.g. "Europe/London". Default: UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZoneName(pub chrono_tz::Tz);

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlexibleWindow(pub Duration);

impl<'de> Deserialize<'de> for FlexibleWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = duration(d)?;
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
                crate::source::schedule::expression::instant(tz, *l).unwrap_or_else(|| l.and_utc())
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleInput(pub String);

impl<'de> Deserialize<'de> for ScheduleInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::source::schedule::{EXECUTION_ID, SCHEDULE_ARN, SCHEDULED_TIME};
        let s = String::deserialize(d)?;
        let sample = s
            .replace(SCHEDULED_TIME, "2026-01-01T00:00:00Z")
            .replace(EXECUTION_ID, "00000000-0000-0000-0000-000000000000")
            .replace(crate::invoke::event::ATTEMPT_NUMBER, "1")
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
