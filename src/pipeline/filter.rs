//! Event filtering with AWS's FilterCriteria syntax and semantics.
//!
//! A mapping has up to five patterns; a record passes if any pattern matches. A pattern is
//! a JSON object mirroring the record's shape, whose leaves are lists of matchers: literal
//! values (an or-list; `null` and `""` included), or objects naming an operator: `prefix`,
//! `suffix`, `equals-ignore-case`, `anything-but`, `numeric`, `exists`. All fields of a
//! pattern must match; a list in the record matches if any of its elements does. The
//! record's data field (RabbitMQ `data`, Kafka `value` and `key`, SQS `body`) is decoded
//! and, if it is JSON, matched as JSON, else as a plain string. A record no pattern
//! matches is acknowledged without an invoke.

use serde_json::{Map, Value};

use crate::invoke::event::Decoded;

/// At most this many patterns per mapping, as on AWS.
pub const MAX_PATTERNS: usize = 5;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Object(Vec<(String, Node)>),
    Leaf(Vec<Matcher>),
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    Equals(Value),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    AnythingBut(Vec<Value>),
    AnythingButPrefix(String),
    Numeric(Vec<(Cmp, f64)>),
    Exists(bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A mapping's compiled filter criteria.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    patterns: Vec<Node>,
}

/// Why a mapping's filter patterns were refused; each names the pattern.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("filters has {0} patterns; at most {MAX_PATTERNS} are allowed")]
    TooMany(usize),
    #[error("filters[{index}] is not JSON: {source}")]
    NotJson {
        index: usize,
        source: serde_json::Error,
    },
    #[error("filters[{0}] must be a non-empty JSON object")]
    NotAnObject(usize),
    /// A pattern that is JSON but not a valid pattern: where in it, and why.
    #[error("filters[{index}] at {path}: {reason}")]
    Invalid {
        index: usize,
        path: String,
        reason: String,
    },
}

impl Filter {
    /// Compiles patterns given as JSON text; an error names the pattern's index and the
    /// path inside it.
    pub fn parse(patterns: &[String]) -> Result<Filter, FilterError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(FilterError::TooMany(patterns.len()));
        }
        let mut out = Vec::with_capacity(patterns.len());
        for (index, text) in patterns.iter().enumerate() {
            let v: Value = serde_json::from_str(text)
                .map_err(|source| FilterError::NotJson { index, source })?;
            let node = match &v {
                Value::Object(o) if !o.is_empty() => {
                    object(o, "").map_err(|(path, reason)| FilterError::Invalid {
                        index,
                        path,
                        reason,
                    })?
                }
                _ => return Err(FilterError::NotAnObject(index)),
            };
            out.push(node);
        }
        Ok(Filter { patterns: out })
    }

    /// Whether a record (its event element, data decoded: see [`view`]) passes.
    pub fn matches(&self, record: &Value) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| node_matches(p, Some(record)))
    }
}

fn object(o: &Map<String, Value>, path: &str) -> Result<Node, (String, String)> {
    let mut fields = Vec::with_capacity(o.len());
    for (k, v) in o {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let node = match v {
            Value::Object(inner) if !inner.is_empty() => object(inner, &p)?,
            Value::Array(items) if !items.is_empty() => Node::Leaf(
                items
                    .iter()
                    .map(|m| matcher(m).map_err(|e| (p.clone(), e)))
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err((
                    p,
                    format!(
                        "expected a non-empty list of values or operators (or a nested object), got {other}"
                    ),
                ));
            }
        };
        fields.push((k.clone(), node));
    }
    Ok(Node::Object(fields))
}

fn matcher(m: &Value) -> Result<Matcher, String> {
    let o = match m {
        Value::Object(o) => o,
        Value::Array(_) => return Err("a list cannot be nested in a list".into()),
        literal => return Ok(Matcher::Equals(literal.clone())),
    };
    let (op, arg) = match o.iter().next() {
        Some(kv) if o.len() == 1 => kv,
        _ => return Err(format!("an operator object has exactly one key, got {m}")),
    };
    let string = |what: &str| {
        arg.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what} takes a string, got {arg}"))
    };
    Ok(match op.as_str() {
        "prefix" => Matcher::Prefix(string("prefix")?),
        "suffix" => Matcher::Suffix(string("suffix")?),
        "equals-ignore-case" => Matcher::EqualsIgnoreCase(string("equals-ignore-case")?),
        "exists" => Matcher::Exists(
            arg.as_bool()
                .ok_or_else(|| format!("exists takes true or false, got {arg}"))?,
        ),
        "anything-but" => match arg {
            Value::Array(vs)
                if vs.iter().all(|v| v.is_string() || v.is_number()) && !vs.is_empty() =>
            {
                Matcher::AnythingBut(vs.clone())
            }
            Value::String(_) | Value::Number(_) => Matcher::AnythingBut(vec![arg.clone()]),
            Value::Object(p) if p.len() == 1 && p.get("prefix").is_some_and(Value::is_string) => {
                Matcher::AnythingButPrefix(p["prefix"].as_str().unwrap_or_default().to_owned())
            }
            _ => {
                return Err(format!(
                    "anything-but takes a string, a number, a list of them, or {{\"prefix\": string}}, got {arg}"
                ));
            }
        },
        "numeric" => Matcher::Numeric(numeric(arg)?),
        other => {
            return Err(format!(
                "unknown operator {other:?}; expected prefix, suffix, equals-ignore-case, anything-but, numeric or exists"
            ));
        }
    })
}

fn numeric(arg: &Value) -> Result<Vec<(Cmp, f64)>, String> {
    let items = arg
        .as_array()
        .ok_or_else(|| format!("numeric takes a list like [\">\", 0, \"<=\", 5], got {arg}"))?;
    if items.is_empty() || items.len() % 2 != 0 || items.len() > 4 {
        return Err(format!(
            "numeric takes one or two (operator, number) pairs, got {arg}"
        ));
    }
    items
        .chunks(2)
        .map(|pair| {
            let op = match pair[0].as_str() {
                Some("=") => Cmp::Eq,
                Some("<") => Cmp::Lt,
                Some("<=") => Cmp::Le,
                Some(">") => Cmp::Gt,
                Some(">=") => Cmp::Ge,
                _ => {
                    return Err(format!(
                        "numeric operator must be one of = < <= > >=, got {}",
                        pair[0]
                    ));
                }
            };
            let n = pair[1]
                .as_f64()
                .ok_or_else(|| format!("numeric operand must be a number, got {}", pair[1]))?;
            Ok((op, n))
        })
        .collect()
}

fn node_matches(node: &Node, value: Option<&Value>) -> bool {
    match node {
        Node::Object(fields) => fields.iter().all(|(k, child)| {
            let v = value.and_then(|v| v.as_object()).and_then(|o| o.get(k));
            node_matches(child, v)
        }),
        Node::Leaf(matchers) => matchers.iter().any(|m| leaf_matches(m, value)),
    }
}

fn leaf_matches(m: &Matcher, value: Option<&Value>) -> bool {
    match (m, value) {
        (Matcher::Exists(want), v) => v.is_some() == *want,
        (_, None) => false,
        // A list in the record matches if any element does.
        (_, Some(Value::Array(items))) => items.iter().any(|i| scalar_matches(m, i)),
        (_, Some(v)) => scalar_matches(m, v),
    }
}

fn scalar_matches(m: &Matcher, v: &Value) -> bool {
    match m {
        Matcher::Equals(want) => match (want, v) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => want == v,
        },
        Matcher::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
        Matcher::Suffix(p) => v.as_str().is_some_and(|s| s.ends_with(p.as_str())),
        Matcher::EqualsIgnoreCase(p) => v.as_str().is_some_and(|s| s.eq_ignore_ascii_case(p)),
        Matcher::AnythingBut(not) => !not.iter().any(|n| match (n, v) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => n == v,
        }),
        Matcher::AnythingButPrefix(p) => v.as_str().is_some_and(|s| !s.starts_with(p.as_str())),
        Matcher::Numeric(conds) => v.as_f64().is_some_and(|x| {
            conds.iter().all(|&(op, n)| match op {
                Cmp::Eq => x == n,
                Cmp::Lt => x < n,
                Cmp::Le => x <= n,
                Cmp::Gt => x > n,
                Cmp::Ge => x >= n,
            })
        }),
        Matcher::Exists(_) => true,
    }
}

/// The record as filters see it: its event element with the source's data fields
/// (`decoded`: RabbitMQ `data`, Kafka `value` and `key`, SQS `body`) decoded (from base64
/// where they are) and parsed as JSON when they are JSON (else left as a string).
pub fn view(fragment: &str, decoded: &[Decoded]) -> Value {
    let mut v: Value = serde_json::from_str(fragment).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        for d in decoded {
            let (field, base64) = match *d {
                Decoded::Base64(f) => (f, true),
                Decoded::Json(f) => (f, false),
            };
            let Some(Value::String(raw)) = o.get(field) else {
                continue;
            };
            let text = if base64 {
                match base64_simd::STANDARD.decode_to_vec(raw) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(_) => continue,
                }
            } else {
                raw.clone()
            };
            let decoded = serde_json::from_str(&text).unwrap_or(Value::String(text));
            o.insert(field.to_owned(), decoded);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(patterns: &[&str]) -> Filter {
        Filter::parse(&patterns.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    /// (pattern, record, matches) — AWS's documented examples and edge cases.
    #[test]
    fn every_operator_against_aws_examples() {
        let sqs = |body: Value| json!({"messageId": "m", "attributes": {"ApproximateReceiveCount": "1"}, "body": body});
        let cases: Vec<(&str, Value, bool)> = vec![
            // equals, or-list
            (
                r#"{"body":{"RetailCategory":["Shoes"]}}"#,
                sqs(json!({"RetailCategory": "Shoes"})),
                true,
            ),
            (
                r#"{"body":{"RetailCategory":["Shoes","Hats"]}}"#,
                sqs(json!({"RetailCategory": "Hats"})),
                true,
            ),
            (
                r#"{"body":{"RetailCategory":["Shoes"]}}"#,
                sqs(json!({"RetailCategory": "Socks"})),
                false,
            ),
            // null and empty
            (
                r#"{"body":{"UserID":[null]}}"#,
                sqs(json!({"UserID": null})),
                true,
            ),
            (r#"{"body":{"UserID":[null]}}"#, sqs(json!({})), false),
            (
                r#"{"body":{"LastName":[""]}}"#,
                sqs(json!({"LastName": ""})),
                true,
            ),
            (
                r#"{"body":{"LastName":[""]}}"#,
                sqs(json!({"LastName": "x"})),
                false,
            ),
            // prefix, suffix, equals-ignore-case
            (
                r#"{"body":{"Region":[{"prefix":"us-"}]}}"#,
                sqs(json!({"Region": "us-east-1"})),
                true,
            ),
            (
                r#"{"body":{"Region":[{"prefix":"us-"}]}}"#,
                sqs(json!({"Region": "eu-west-1"})),
                false,
            ),
            (
                r#"{"body":{"File":[{"suffix":".png"}]}}"#,
                sqs(json!({"File": "a.png"})),
                true,
            ),
            (
                r#"{"body":{"Name":[{"equals-ignore-case":"alice"}]}}"#,
                sqs(json!({"Name": "ALICE"})),
                true,
            ),
            // anything-but
            (
                r#"{"body":{"Weather":[{"anything-but":["Raining"]}]}}"#,
                sqs(json!({"Weather": "Sunny"})),
                true,
            ),
            (
                r#"{"body":{"Weather":[{"anything-but":["Raining"]}]}}"#,
                sqs(json!({"Weather": "Raining"})),
                false,
            ),
            (
                r#"{"body":{"Weather":[{"anything-but":"Raining"}]}}"#,
                sqs(json!({})),
                false,
            ),
            (
                r#"{"body":{"Id":[{"anything-but":{"prefix":"test-"}}]}}"#,
                sqs(json!({"Id": "prod-1"})),
                true,
            ),
            (
                r#"{"body":{"Id":[{"anything-but":{"prefix":"test-"}}]}}"#,
                sqs(json!({"Id": "test-1"})),
                false,
            ),
            // numeric: equals, ranges, edge values, non-numbers
            (
                r#"{"body":{"Price":[{"numeric":["=",100]}]}}"#,
                sqs(json!({"Price": 100.0})),
                true,
            ),
            (
                r#"{"body":{"Price":[{"numeric":[">",0,"<=",5]}]}}"#,
                sqs(json!({"Price": 5})),
                true,
            ),
            (
                r#"{"body":{"Price":[{"numeric":[">",0,"<=",5]}]}}"#,
                sqs(json!({"Price": 0})),
                false,
            ),
            (
                r#"{"body":{"Price":[{"numeric":[">",0,"<=",5]}]}}"#,
                sqs(json!({"Price": 5.0001})),
                false,
            ),
            (
                r#"{"body":{"Price":[{"numeric":["<",-1.5]}]}}"#,
                sqs(json!({"Price": -2})),
                true,
            ),
            (
                r#"{"body":{"Price":[{"numeric":[">",0]}]}}"#,
                sqs(json!({"Price": "10"})),
                false,
            ),
            (
                r#"{"body":{"Price":[100]}}"#,
                sqs(json!({"Price": 1e2})),
                true,
            ),
            // exists
            (
                r#"{"body":{"Address":[{"exists":true}]}}"#,
                sqs(json!({"Address": {"City": "x"}})),
                true,
            ),
            (
                r#"{"body":{"Address":[{"exists":false}]}}"#,
                sqs(json!({"Name": "x"})),
                true,
            ),
            (
                r#"{"body":{"Address":[{"exists":false}]}}"#,
                sqs(json!({"Address": null})),
                false,
            ),
            // nested objects, arrays in the record, several fields (all must match)
            (
                r#"{"body":{"a":{"b":["c"]}}}"#,
                sqs(json!({"a": {"b": "c"}})),
                true,
            ),
            (
                r#"{"body":{"tags":["blue"]}}"#,
                sqs(json!({"tags": ["red", "blue"]})),
                true,
            ),
            (
                r#"{"body":{"x":[1],"y":[2]}}"#,
                sqs(json!({"x": 1, "y": 3})),
                false,
            ),
            // metadata fields beside the body
            (
                r#"{"attributes":{"ApproximateReceiveCount":["1"]}}"#,
                sqs(json!("plain")),
                true,
            ),
            // a body that is not JSON is matched as a plain string
            (r#"{"body":["plain text"]}"#, sqs(json!("plain text")), true),
            (r#"{"body":{"a":["b"]}}"#, sqs(json!("plain text")), false),
        ];
        for (pattern, record, want) in cases {
            assert_eq!(
                filter(&[pattern]).matches(&record),
                want,
                "{pattern} on {record}"
            );
        }
    }

    #[test]
    fn any_pattern_passes_and_none_means_everything() {
        let f = filter(&[r#"{"body":{"k":["a"]}}"#, r#"{"body":{"k":["b"]}}"#]);
        assert!(f.matches(&json!({"body": {"k": "b"}})));
        assert!(!f.matches(&json!({"body": {"k": "c"}})));
        assert!(filter(&[]).matches(&json!({})));
    }

    #[test]
    fn the_data_field_is_decoded_for_each_source() {
        let rmq = r#"{"basicProperties":{"messageId":"m"},"redelivered":false,"data":"eyJ0eXBlIjoib3JkZXIifQ=="}"#;
        let rabbit = [Decoded::Base64("data")];
        assert_eq!(view(rmq, &rabbit)["data"], json!({"type": "order"}));
        let kafka = r#"{"topic":"t","key":"a2V5","value":"bm90IGpzb24="}"#;
        let kafka_fields = [Decoded::Base64("value"), Decoded::Base64("key")];
        let v = view(kafka, &kafka_fields);
        assert_eq!(
            (v["key"].clone(), v["value"].clone()),
            (json!("key"), json!("not json"))
        );
        let sqs = r#"{"messageId":"m","body":"{\"n\": 5}"}"#;
        assert_eq!(view(sqs, &[Decoded::Json("body")])["body"], json!({"n": 5}));
        // A field is decoded only for the source that has it so.
        assert_eq!(view(sqs, &kafka_fields)["body"], "{\"n\": 5}");
        let f = filter(&[r#"{"value":[{"prefix":"not"}],"key":["key"]}"#]);
        assert!(f.matches(&view(kafka, &kafka_fields)));
    }

    #[test]
    fn invalid_patterns_name_index_and_path() {
        let cases = [
            (
                r#"{"body":{"a":"b"}}"#,
                "filters[0] at body.a: expected a non-empty list",
            ),
            (
                r#"{"body":{"a":[{"numerik":[">",1]}]}}"#,
                "filters[0] at body.a: unknown operator \"numerik\"",
            ),
            (
                r#"{"body":{"a":[{"numeric":[">","x"]}]}}"#,
                "numeric operand must be a number",
            ),
            (
                r#"{"body":{"a":[{"numeric":["~",1]}]}}"#,
                "numeric operator must be one of",
            ),
            (
                r#"{"body":{"a":[{"exists":"yes"}]}}"#,
                "exists takes true or false",
            ),
            (r#"{"body":{"a":[{"prefix":1}]}}"#, "prefix takes a string"),
            (r#"{"body":{"a":[["x"]]}}"#, "a list cannot be nested"),
            (r#"["x"]"#, "filters[0] must be a non-empty JSON object"),
            (r#"{"body": "#, "filters[0] is not JSON"),
        ];
        for (pattern, want) in cases {
            let err = Filter::parse(&[pattern.to_owned()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{pattern}: {err}");
        }
        let six = vec![r#"{"a":["b"]}"#.to_owned(); 6];
        assert!(
            Filter::parse(&six)
                .unwrap_err()
                .to_string()
                .contains("at most 5")
        );
        let second = Filter::parse(&[r#"{"a":["b"]}"#.to_owned(), r#"{"a":{"b":1}}"#.to_owned()])
            .unwrap_err()
            .to_string();
        assert!(second.starts_with("filters[1] at a.b"), "{second}");
    }
}
