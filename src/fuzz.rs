//! Property tests over the gateway's untrusted inputs: configuration text, FilterCriteria
//! patterns with the records they are matched on, and functions' responses (partial
//! batch responses and error bodies). Each only asserts that nothing panics: a bad input
//! must come back as an error. Case counts keep the whole module well under 30 s in a
//! debug build on two cores, so it runs in every `cargo nextest run`.

use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;

use crate::config::Config;
use crate::invoke::event::{Decoded, Shape};
use crate::pipeline::filter::{Filter, view};
use crate::pipeline::response::{function_error_message, item_failures};
use crate::record::Record;
use crate::source::kafka::event::KafkaShape;
use crate::source::rabbitmq::event::RabbitShape;
use crate::source::schedule::event::ScheduleShape;
use crate::source::sqs::event::SqsShape;

/// A valid file touching every source and destination kind, filters and schedules: the
/// seed the mutations start from.
const SEED: &str = r#"[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:4566"
account_id = "123456789012"

[gateway]
shutdown_grace = "30s"

[admin]
listen = "127.0.0.1:9900"
token = "0123456789abcdef0123"

[[mapping]]
name = "orders"
function = "process-orders:live"
report_batch_item_failures = true
function_timeout = "15m"
filters = ['{"data":{"kind":["order"],"n":[{"numeric":[">",1,"<=",5]}]}}']

[mapping.source]
type = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "orders"
prefetch = 200

[mapping.batch]
size = 100
window = "500ms"
max_bytes = 6291456

[mapping.retry]
max_attempts = 3
max_record_age = "1h"
backoff_min = "1s"
backoff_max = "60s"
bisect_on_error = true

[mapping.on_failure]
type = "sqs"
queue_url = "http://127.0.0.1:4566/000000000000/parked"
max_message_bytes = 262144
payload_dir = "/tmp/payloads"

[[mapping]]
name = "events"
function = "arn:aws:lambda:us-east-1:123456789012:function:events"

[mapping.source]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topics = ["events"]
starting_position = "at_timestamp"
starting_timestamp = "2026-11-01T00:00:00Z"
parallelization_factor = 2

[mapping.on_failure]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topic = "parked"

[[mapping]]
name = "queue"
function = "q"

[mapping.source]
type = "sqs"
queue_url = "http://127.0.0.1:4566/000000000000/in.fifo"

[mapping.on_failure]
type = "file"
path = "/tmp/failed.jsonl"
rotate_bytes = 1048576

[[mapping]]
name = "nightly"
function = "report"

[mapping.source]
type = "schedule"
expression = "cron(30 1 * * ? *)"
timezone = "Europe/London"
start = "2026-01-01T00:00:00"
flexible_window = "15m"
input = '{"at":"<aws.scheduler.scheduled-time>"}'

[mapping.retry]
max_attempts = 185
max_record_age = "24h"
"#;

/// Integers, many at or beyond a field's range.
fn int() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-2i64..20_000).prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            0i64,
            1,
            5,
            10,
            185,
            186,
            10_000,
            10_001,
            6_291_457,
            1 << 32
        ])
        .prop_map(|n| n.to_string()),
    ]
}

/// TOML values of every shape, many of them at or beyond a field's range.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        int(),
        Just("-0".to_owned()),
        Just("nan".to_owned()),
        Just("true".to_owned()),
        "\"[0-9]{0,3}(ns|ms|s|m|h|d|w|y)?\"",
        "\"[0-9]{15,25}(s|h)\"",
        "\"(cron|rate|at)\\([ -~]{0,30}\\)\"",
        "\"[a-z]{0,8}://[ -~]{0,30}\"",
        "\"\\$\\{[A-Z_]{0,8}\\}?\"",
        "'\\{[ -~]{0,40}'",
        "\"[ -~]{0,30}\"",
        Just("\"\"".to_owned()),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec(("[a-z_]{1,10}", inner), 0..3).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// An edit of the seed: at a position (a fraction of its length), delete some
/// characters, or insert text.
#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    /// Replace the value of the nth `key = value` line: by one of the same kind as the
    /// one there (so that the file still deserializes and reaches validation), or by
    /// any value.
    Value(prop::sample::Index, Kinds, bool),
    /// Drop the nth line.
    Line(prop::sample::Index),
}

/// A replacement value of each kind; `apply` picks the kind of the value it replaces.
#[derive(Debug, Clone)]
struct Kinds {
    int: String,
    duration: String,
    string: String,
    any: String,
}

fn kinds() -> impl Strategy<Value = Kinds> {
    let int = int();
    let duration = prop_oneof![
        "\"[0-9]{1,3} ?(ns|ms|s|m|min|h|d|w)\"",
        "\"[0-9]{15,25}(s|h)\"",
        "\"[0-9a-z -]{0,8}\"",
    ];
    let string = prop_oneof![
        "\"(cron|rate|at)\\([0-9a-zA-Z*?/,:#L W-]{0,30}\\)\"",
        "\"[a-z]{0,8}://[a-z0-9:@/%.-]{0,30}\"",
        "\"[A-Za-z/_]{0,20}\"",
        "\"[0-9T:Z+.-]{0,25}\"",
        "\"\\$\\{[A-Z_]{0,8}\\}?\"",
        "'[ -~&&[^']]{0,40}'",
    ];
    (int, duration, string, toml_value()).prop_map(|(int, duration, string, any)| Kinds {
        int,
        duration,
        string,
        any,
    })
}

fn edit() -> impl Strategy<Value = Edit> {
    let index = any::<prop::sample::Index>;
    // Mostly replaced values: text edits seldom leave valid TOML, values reach validation.
    prop_oneof![
        1 => (index(), 1usize..20).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (index(), "[\\[\\]{}=\"'.,#\\\\\n a-z0-9_-]{1,12}").prop_map(|(i, s)| Edit::Insert(i, s)),
        6 => (index(), kinds(), prop::bool::weighted(0.8)).prop_map(|(i, k, kind)| Edit::Value(i, k, kind)),
        1 => index().prop_map(Edit::Line),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let lines: Vec<&str> = text.lines().collect();
    match e {
        Edit::Delete(i, n) => {
            let at = i.index(chars.len().max(1));
            let end = (at + n).min(chars.len());
            chars[..at].iter().chain(&chars[end..]).collect()
        }
        Edit::Insert(i, s) => {
            let at = i.index(chars.len() + 1);
            let mut out: String = chars[..at].iter().collect();
            out.push_str(s);
            out.extend(&chars[at..]);
            out
        }
        Edit::Value(i, kinds, same_kind) => {
            let keyed: Vec<usize> = (0..lines.len())
                .filter(|&n| lines[n].contains(" = "))
                .collect();
            let n = keyed[i.index(keyed.len())];
            let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            let (key, old) = lines[n].split_once(" = ").unwrap_or_default();
            let is_duration = |v: &str| {
                v.len() > 2
                    && v.starts_with('"')
                    && v[1..].starts_with(|c: char| c.is_ascii_digit())
                    && v.ends_with('"')
                    && v[1..v.len() - 1].ends_with(|c: char| c.is_ascii_alphabetic())
            };
            let v = match old {
                _ if !same_kind => &kinds.any,
                o if is_duration(o) => &kinds.duration,
                o if o.starts_with(['"', '\'']) => &kinds.string,
                o if o.starts_with(|c: char| c.is_ascii_digit() || c == '-') => &kinds.int,
                _ => &kinds.any,
            };
            out[n] = format!("{key} = {v}");
            out.join("\n")
        }
        Edit::Line(i) => {
            let n = i.index(lines.len());
            let mut out = lines.clone();
            out.remove(n);
            out.join("\n")
        }
    }
}

/// The words FilterCriteria gives a meaning to (operators' names, numeric comparisons,
/// the data fields), or a few random characters.
fn word(random: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "prefix",
            "suffix",
            "equals-ignore-case",
            "anything-but",
            "numeric",
            "exists",
            "=",
            "<",
            ">=",
            "data",
            "body",
        ])
        .prop_map(String::from),
        random,
    ]
}

/// Any JSON value, with the strings and keys FilterCriteria operators look at.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word(".{0,6}").prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(word("[a-z]{1,3}"), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names shared by patterns and records, so that paths meet.
fn field() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "data", "body", "prefix"]).prop_map(String::from)
}

/// A scalar a pattern or a record holds.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-5i64..5).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[aAbB]{0,3}".prop_map(Value::String),
    ]
}

/// One matcher of a pattern's leaf: a literal or an operator, mostly well formed.
fn matcher() -> impl Strategy<Value = Value> {
    let op = prop::sample::select(vec!["=", "<", "<=", ">", ">=", "!"]);
    let s = "[aAbB]{0,3}";
    prop_oneof![
        3 => scalar(),
        1 => s.prop_map(|s| serde_json::json!({"prefix": s})),
        1 => s.prop_map(|s| serde_json::json!({"suffix": s})),
        1 => s.prop_map(|s| serde_json::json!({"equals-ignore-case": s})),
        1 => proptest::collection::vec(scalar(), 0..3)
            .prop_map(|v| serde_json::json!({"anything-but": v})),
        1 => scalar().prop_map(|v| serde_json::json!({"anything-but": v})),
        1 => s.prop_map(|s| serde_json::json!({"anything-but": {"prefix": s}})),
        1 => any::<bool>().prop_map(|b| serde_json::json!({"exists": b})),
        2 => (op.clone(), scalar()).prop_map(|(o, n)| serde_json::json!({"numeric": [o, n]})),
        2 => (op.clone(), -5i64..5, op, -5i64..5)
            .prop_map(|(o, n, p, m)| serde_json::json!({"numeric": [o, n, p, m]})),
        1 => json(),
    ]
}

/// An object of `inner` values under the shared field names.
fn object(
    inner: impl Strategy<Value = Value>,
    fields: std::ops::Range<usize>,
) -> impl Strategy<Value = Value> {
    proptest::collection::btree_map(field(), inner, fields)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A pattern: fields (nested objects, or leaves of matchers).
fn pattern() -> impl Strategy<Value = Value> {
    // Empty objects and lists are refused; json() matchers and the "!" operator are
    // enough ill-formed input.
    let leaf = proptest::collection::vec(matcher(), 1..3).prop_map(Value::Array);
    object(
        leaf.prop_recursive(1, 6, 2, |inner| object(inner, 1..3)),
        1..3,
    )
}

/// A record: nested objects, lists and scalars under the patterns' field names, some of
/// them base64 of JSON text as the sources send `data`.
fn record() -> impl Strategy<Value = Value> {
    let value = scalar().prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            object(inner.clone(), 0..4),
            inner
                .prop_map(|v| Value::String(base64_simd::STANDARD.encode_to_string(v.to_string()))),
        ]
    });
    object(value, 1..4)
}

/// A partial batch response's item identifier: one naming a record of `records(n)` in
/// some source's way, or anything.
fn identifier() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0usize..8).prop_map(|i| Value::String(format!("m{i}"))),
        (0u64..8).prop_map(Value::from),
        (prop::sample::select(vec!["t-0", "t-1", ""]), 0u64..8)
            .prop_map(|(p, o)| serde_json::json!({"partition": p, "offset": o})),
        json(),
    ]
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            Record::for_test(
                Some(&format!("m{i}")),
                Some(&format!("g{}", i % 2)),
                i as u64,
            )
        })
        .collect()
}

fn shapes() -> [Box<dyn Shape>; 4] {
    [
        Box::new(RabbitShape::new("arn", "q", "/")),
        Box::new(SqsShape {
            queue_url: "q.fifo".into(),
            fifo: true,
        }),
        Box::new(KafkaShape::new("b:9092", "t", 0)),
        Box::new(ScheduleShape {
            name: "s".into(),
            arn: "arn".into(),
            expression: "rate(1 minute)".into(),
        }),
    ]
}

/// Every field any source decodes for filters.
const ALL_DECODED: &[Decoded] = &[
    Decoded::Base64("data"),
    Decoded::Base64("value"),
    Decoded::Base64("key"),
    Decoded::Json("body"),
];

/// Parses `text`; a refusal must say why, naming the file.
fn config(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = Config::parse(Path::new("fuzz.toml"), text) {
        prop_assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
    Ok(())
}

proptest! {
    // 1,500 cases by default (seconds each); PROPTEST_CASES searches longer.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(text in "[\\[\\]{}=\"'.,#\\\\\n a-z0-9_:/${}-]{0,300}") {
        config(&text)?;
    }

    #[test]
    fn config_parse_never_panics_on_a_mutated_valid_file(edits in proptest::collection::vec(edit(), 1..4)) {
        let text = edits.iter().fold(SEED.to_owned(), |t, e| apply(&t, e));
        config(&text)?;
    }

    #[test]
    fn filters_never_panic_on_arbitrary_patterns_and_records(
        patterns in proptest::collection::vec(pattern(), 0..6),
        text in ".{0,40}",
        records in proptest::collection::vec(record(), 1..4),
    ) {
        let mut patterns: Vec<String> = patterns.iter().map(Value::to_string).collect();
        patterns.push(text);
        // Each pattern alone (one bad pattern refuses the whole set), and all of them.
        for set in patterns.chunks(1).chain([&patterns[..]]) {
            if let Ok(f) = Filter::parse(set) {
                for r in &records {
                    let _ = f.matches(r);
                    let _ = f.matches(&view(&r.to_string(), ALL_DECODED));
                }
            }
        }
    }

    #[test]
    fn partial_batch_responses_never_panic_on_arbitrary_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..200),
        items in proptest::collection::vec(identifier(), 0..4),
        n in 0usize..6,
    ) {
        let structured = serde_json::json!({
            "batchItemFailures": items.iter().map(|i| serde_json::json!({"itemIdentifier": i})).collect::<Vec<_>>()
        })
        .to_string();
        let records = records(n);
        for e in &shapes() {
            for b in [&body[..], structured.as_bytes()] {
                if let Ok(failed) = item_failures(b, e.as_ref(), &records) {
                    prop_assert!(failed.iter().all(|&i| i < records.len()), "{failed:?}");
                }
                let _ = function_error_message(b);
            }
        }
    }
}

#[test]
fn the_seed_is_a_valid_file() {
    Config::parse(Path::new("seed.toml"), SEED).unwrap();
}
