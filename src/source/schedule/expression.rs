//! AWS schedule expressions and when they fire: pure functions over chrono times.
//!
//! `cron(…)` is translated field by field into a pattern for `croner` (which implements
//! `L`, `W`, `#`, ranges, lists and steps) and evaluated on the schedule's local wall
//! clock; the mapping of each local time to an instant is done here, so that daylight
//! saving follows AWS rather than croner: a local time that does not exist that day is
//! skipped, and one that happens twice fires once, at its first occurrence. `rate(…)`
//! counts whole periods from an anchor (the schedule's start, else the Unix epoch), so
//! every replica computes the same instants. `at(…)` fires once.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Why an expression was refused: the expression and, where one is to blame, its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error(
        "schedule expression {expression:?} is not cron(minutes hours day-of-month month day-of-week year), rate(value unit) or at(yyyy-mm-ddThh:mm:ss)"
    )]
    Shape { expression: String },
    #[error("schedule expression {expression:?}: {field} field {value:?}: {message}")]
    Field {
        expression: String,
        field: &'static str,
        value: String,
        message: String,
    },
}

/// AWS's cron fields, in AWS's order.
const FIELDS: [&str; 6] = [
    "minutes",
    "hours",
    "day-of-month",
    "month",
    "day-of-week",
    "year",
];

/// A parsed schedule expression.
#[derive(Clone)]
pub enum Expression {
    /// `cron(…)`, evaluated on the local wall clock of the schedule's zone.
    Cron { text: String, cron: Box<Cron> },
    /// `rate(…)`: every `every`, counted from an anchor.
    Rate { text: String, every: Duration },
    /// `at(…)`: one local time.
    At { text: String, local: NaiveDateTime },
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

impl Expression {
    pub fn parse(expression: &str) -> Result<Expression, ExpressionError> {
        let text = expression.trim();
        let shape = || ExpressionError::Shape {
            expression: text.to_owned(),
        };
        let (kind, body) = text.split_once('(').ok_or_else(shape)?;
        let body = body.strip_suffix(')').ok_or_else(shape)?.trim();
        match kind.trim() {
            "cron" => Ok(Expression::Cron {
                text: text.to_owned(),
                cron: Box::new(parse_cron(text, body)?),
            }),
            "rate" => Ok(Expression::Rate {
                text: text.to_owned(),
                every: parse_rate(text, body)?,
            }),
            "at" => {
                let local =
                    NaiveDateTime::parse_from_str(body, "%Y-%m-%dT%H:%M:%S").map_err(|e| {
                        ExpressionError::Field {
                            expression: text.to_owned(),
                            field: "date-time",
                            value: body.to_owned(),
                            message: format!("{e}; write it as yyyy-mm-ddThh:mm:ss"),
                        }
                    })?;
                Ok(Expression::At {
                    text: text.to_owned(),
                    local,
                })
            }
            _ => Err(shape()),
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Expression::Cron { text, .. }
            | Expression::Rate { text, .. }
            | Expression::At { text, .. } => text,
        }
    }

    /// The first fire time strictly after `after`. `anchor` is where a rate counts from.
    pub fn next_after(
        &self,
        after: DateTime<Utc>,
        tz: Tz,
        anchor: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Expression::Cron { cron, .. } => {
                let mut local = after.with_timezone(&tz).naive_local();
                // Each round skips one local time that is missing (a gap) or already
                // past (the second pass of a repeated hour): at most a few hundred.
                for _ in 0..10_000 {
                    local = cron.find_next_occurrence(&local, false).ok()?;
                    if let Some(t) = instant(tz, local)
                        && t > after
                    {
                        return Some(t);
                    }
                }
                None
            }
            Expression::Rate { every, .. } => {
                if after < anchor {
                    return Some(anchor);
                }
                let every = every.as_millis() as i64;
                let periods = (after - anchor).num_milliseconds() / every;
                Some(anchor + TimeDelta::milliseconds((periods + 1) * every))
            }
            Expression::At { local, .. } => instant(tz, *local).filter(|&t| t > after),
        }
    }

    /// The last fire time at or before `t`.
    pub fn last_at_or_before(
        &self,
        t: DateTime<Utc>,
        tz: Tz,
        anchor: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Expression::Cron { cron, .. } => {
                let mut local = t.with_timezone(&tz).naive_local();
                let mut inclusive = true;
                for _ in 0..10_000 {
                    local = cron.find_previous_occurrence(&local, inclusive).ok()?;
                    inclusive = false;
                    if let Some(at) = instant(tz, local)
                        && at <= t
                    {
                        return Some(at);
                    }
                }
                None
            }
            Expression::Rate { every, .. } => {
                if t < anchor {
                    return None;
                }
                let every = every.as_millis() as i64;
                let periods = (t - anchor).num_milliseconds() / every;
                Some(anchor + TimeDelta::milliseconds(periods * every))
            }
            Expression::At { local, .. } => instant(tz, *local).filter(|&at| at <= t),
        }
    }

    /// Whether start and end dates apply (they do not to a one-time schedule, as AWS).
    pub fn recurring(&self) -> bool {
        !matches!(self, Expression::At { .. })
    }
}

/// The instant a local wall-clock time names in `tz`: None for a time that does not
/// exist (skipped, as AWS does), the first of two for a repeated one (it fires once).
pub fn instant(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
        LocalResult::None => None,
    }
}

fn parse_rate(text: &str, body: &str) -> Result<Duration, ExpressionError> {
    let field = |field, value: &str, message: String| ExpressionError::Field {
        expression: text.to_owned(),
        field,
        value: value.to_owned(),
        message,
    };
    let mut parts = body.split_whitespace();
    let (Some(value), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(field(
            "rate",
            body,
            "write rate(value unit), e.g. rate(5 minutes)".into(),
        ));
    };
    let n: u64 = value
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| field("value", value, "must be a whole number above zero".into()))?;
    let seconds = match unit {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3_600,
        "day" | "days" => 86_400,
        // An extension for tests and demos: AWS's finest rate is one minute.
        "second" | "seconds" => 1,
        _ => {
            return Err(field(
                "unit",
                unit,
                "must be minute(s), hour(s) or day(s) (or second(s), an esm-gateway extension)"
                    .into(),
            ));
        }
    };
    // AWS's rule: singular for 1, plural above.
    if (n == 1) == unit.ends_with('s') {
        let want = if n == 1 {
            unit.trim_end_matches('s').to_owned()
        } else {
            format!("{unit}s")
        };
        return Err(field(
            "unit",
            unit,
            format!("with a value of {n} write {want:?}, as AWS does"),
        ));
    }
    n.checked_mul(seconds)
        .filter(|&s| s <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| field("value", value, "is longer than a hundred years".into()))
}

fn parser() -> CronParser {
    // AWS's cron is Quartz's without seconds: weekdays 1-7 = SUN-SAT, steps written
    // `0/15`, and a year field. A "0" seconds field is put in front.
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Required)
        .alternative_weekdays(true)
        .sloppy_ranges(true)
        .build()
}

fn parse_cron(text: &str, body: &str) -> Result<Cron, ExpressionError> {
    let fields: Vec<&str> = body.split_whitespace().collect();
    let err = |i: usize, message: String| ExpressionError::Field {
        expression: text.to_owned(),
        field: FIELDS[i],
        value: fields[i].to_owned(),
        message,
    };
    if fields.len() != 6 {
        return Err(ExpressionError::Field {
            expression: text.to_owned(),
            field: "cron",
            value: body.to_owned(),
            message: format!(
                "has {} fields; AWS cron has six: minutes hours day-of-month month day-of-week year",
                fields.len()
            ),
        });
    }
    for (i, f) in fields.iter().enumerate() {
        if f.contains('?') && (*f != "?" || (i != 2 && i != 4)) {
            return Err(err(
                i,
                "? stands alone, and only in day-of-month or day-of-week".into(),
            ));
        }
    }
    match (fields[2] == "?", fields[4] == "?") {
        (true, false) | (false, true) => {}
        (false, false) => {
            return Err(err(
                4,
                "one of day-of-month and day-of-week must be ?, as AWS requires".into(),
            ));
        }
        (true, true) => {
            return Err(err(
                4,
                "only one of day-of-month and day-of-week may be ?".into(),
            ));
        }
    }
    // Ranges are checked here for messages that name the value (croner's do not); the
    // weekday and year bounds are AWS's, not croner's.
    for (i, (min, max)) in [(0, 59), (0, 23), (1, 31), (1, 12), (1, 7), (1970, 2199)]
        .into_iter()
        .enumerate()
    {
        check_numbers(fields[i], min, max, |m| err(i, m), i == 4)?;
    }
    // A lone L in day-of-week is the week's last day: Saturday.
    let dow = if fields[4].eq_ignore_ascii_case("L") {
        "7"
    } else {
        fields[4]
    };
    let pattern = |f: [&str; 6]| format!("0 {} {} {} {} {} {}", f[0], f[1], f[2], f[3], f[4], f[5]);
    let mut all = [fields[0], fields[1], fields[2], fields[3], dow, fields[5]];
    match parser().parse(&pattern(all)) {
        Ok(cron) => Ok(cron),
        Err(whole) => {
            // croner names no field: try each alone among harmless defaults to find
            // the one to blame.
            for i in 0..6 {
                let mut probe = ["0", "0", "1", "1", "?", "*"];
                probe[i] = all[i];
                if i == 4 {
                    probe[2] = "?";
                }
                if let Err(e) = parser().parse(&pattern(probe)) {
                    return Err(err(i, croner_message(&e)));
                }
            }
            all[4] = fields[4];
            Err(ExpressionError::Field {
                expression: text.to_owned(),
                field: "cron",
                value: pattern(all),
                message: croner_message(&whole),
            })
        }
    }
}

fn croner_message(e: &croner::errors::CronError) -> String {
    e.to_string()
}

/// Checks the numbers of a field that croner reads with other bounds (AWS's weekdays
/// are 1-7 and its years 1970-2199). In day-of-week, what follows `#` is an nth.
fn check_numbers(
    field: &str,
    min: u32,
    max: u32,
    err: impl Fn(String) -> ExpressionError,
    weekday: bool,
) -> Result<(), ExpressionError> {
    for item in field.split(',') {
        let item = if weekday {
            item.split('#').next().unwrap_or(item)
        } else {
            item
        };
        // Step sizes are not values.
        let values = item.split('/').next().unwrap_or(item);
        for v in values.split('-') {
            let v = v.trim_end_matches(['L', 'l', 'W', 'w']);
            if let Ok(n) = v.parse::<u32>()
                && !(min..=max).contains(&n)
            {
                return Err(err(format!("{n} is outside {min}-{max}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
