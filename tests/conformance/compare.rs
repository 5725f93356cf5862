//! The structural comparer: walks an expected (AWS's) and an actual (the gateway's) JSON
//! value and reports every difference of field set, JSON type, nesting, array length,
//! null versus absent, and the format class of strings (ISO 8601 with milliseconds or
//! seconds, digits only, other text). Values themselves may differ.

use serde_json::Value;

/// What a string looks like, where AWS's examples fix it: a timestamp's precision, an
/// offset written as digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// `2019-11-14T00:38:06.021Z`
    IsoMillis,
    /// `2015-10-08T16:53:06Z`
    IsoSeconds,
    /// `"49601189658422359378836298521827638475320189012309704722"`, `"2"`
    Digits,
    Other,
}

impl Text {
    pub fn of(s: &str) -> Text {
        let b = s.as_bytes();
        let iso_prefix = b.len() >= 20
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':';
        if iso_prefix && b.len() == 20 && b[19] == b'Z' {
            Text::IsoSeconds
        } else if iso_prefix
            && b.len() == 24
            && b[19] == b'.'
            && b[20..23].iter().all(u8::is_ascii_digit)
            && b[23] == b'Z'
        {
            Text::IsoMillis
        } else if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
            Text::Digits
        } else {
            Text::Other
        }
    }
}

/// A JSON value's kind, as far as the shape is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Integer,
    Float,
    String(Text),
    Array,
    Object,
}

impl Kind {
    pub fn of(v: &Value) -> Kind {
        match v {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Bool,
            Value::Number(n) if n.is_f64() => Kind::Float,
            Value::Number(_) => Kind::Integer,
            Value::String(s) => Kind::String(Text::of(s)),
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    fn name(self) -> String {
        match self {
            Kind::String(t) => format!("string ({t:?})"),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

/// One difference, at a path like `$.KafkaBatchInfo.recordsInfo.*.firstRecordOffset`
/// (`*` stands for any key of a map, `[i]` for an array element).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub path: String,
    pub what: String,
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

/// How to read the expected value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Paths of objects whose keys are data (`topic-partition`, `queue::vhost`): every
    /// entry of the actual map is compared with the expected map's first entry, and
    /// neither may be empty.
    pub maps: &'a [&'a str],
}

/// Every difference between `expected` and `actual`, in document order.
pub fn differences(expected: &Value, actual: &Value, options: &Options) -> Vec<Diff> {
    let mut out = Vec::new();
    walk("$", expected, actual, options, &mut out);
    out
}

fn walk(path: &str, expected: &Value, actual: &Value, options: &Options, out: &mut Vec<Diff>) {
    let (ek, ak) = (Kind::of(expected), Kind::of(actual));
    if ek != ak {
        out.push(Diff {
            path: path.to_owned(),
            what: format!("type: expected {}, found {}", ek.name(), ak.name()),
        });
        return;
    }
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) if options.maps.contains(&path) => {
            let child = format!("{path}.*");
            match (e.values().next(), a.is_empty()) {
                (None, _) => out.push(Diff {
                    path: path.to_owned(),
                    what: "map: the expected map is empty, nothing to compare with".into(),
                }),
                (Some(_), true) => out.push(Diff {
                    path: path.to_owned(),
                    what: "map: empty, expected at least one entry".into(),
                }),
                (Some(template), false) => {
                    for v in a.values() {
                        walk(&child, template, v, options, out);
                    }
                }
            }
        }
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let child = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => walk(&child, ev, av, options, out),
                    None => out.push(Diff {
                        path: child,
                        what: format!("missing (expected {})", Kind::of(ev).name()),
                    }),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(Diff {
                        path: format!("{path}.{k}"),
                        what: format!("extra ({})", Kind::of(av).name()),
                    });
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                out.push(Diff {
                    path: path.to_owned(),
                    what: format!("length: expected {}, found {}", e.len(), a.len()),
                });
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                walk(&format!("{path}[{i}]"), ev, av, options, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diffs(e: Value, a: Value) -> Vec<String> {
        differences(&e, &a, &Options::default())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn equal_shapes_with_other_values_do_not_differ() {
        let e = json!({"a": 1, "b": "x", "c": [true, null], "d": {"e": 1.5}});
        let a = json!({"d": {"e": 2.5}, "c": [false, null], "b": "y", "a": 7});
        assert_eq!(diffs(e, a), Vec::<String>::new());
    }

    #[test]
    fn a_missing_field_is_reported_with_its_path() {
        let d = diffs(json!({"a": {"b": 1, "c": 2}}), json!({"a": {"b": 1}}));
        assert_eq!(d, ["$.a.c: missing (expected integer)"]);
    }

    #[test]
    fn an_extra_field_is_reported_with_its_path() {
        let d = diffs(json!({"a": [{"b": 1}]}), json!({"a": [{"b": 1, "z": "q"}]}));
        assert_eq!(d, ["$.a[0].z: extra (string (Other))"]);
    }

    #[test]
    fn a_type_change_is_reported_and_not_descended_into() {
        let d = diffs(json!({"a": "1", "b": {"c": 1}}), json!({"a": 1, "b": [1]}));
        assert_eq!(
            d,
            [
                "$.a: type: expected string (Digits), found integer",
                "$.b: type: expected object, found array",
            ]
        );
        // An integer where AWS has a float is a type change too.
        assert_eq!(
            diffs(json!({"n": 1.5}), json!({"n": 1})),
            ["$.n: type: expected float, found integer"]
        );
    }

    #[test]
    fn null_and_absent_are_different_both_ways() {
        assert_eq!(
            diffs(json!({"r": null}), json!({})),
            ["$.r: missing (expected null)"]
        );
        assert_eq!(diffs(json!({}), json!({"r": null})), ["$.r: extra (null)"]);
        assert_eq!(
            diffs(json!({"r": null}), json!({"r": {"statusCode": 200}})),
            ["$.r: type: expected null, found object"]
        );
        assert_eq!(
            diffs(json!({"r": {"statusCode": 200}}), json!({"r": null})),
            ["$.r: type: expected object, found null"]
        );
    }

    #[test]
    fn array_lengths_and_elements_are_compared() {
        assert_eq!(
            diffs(json!([1, 2]), json!([1])),
            ["$: length: expected 2, found 1"]
        );
        assert_eq!(
            diffs(json!([{"a": 1}]), json!([{"a": "1"}])),
            ["$[0].a: type: expected integer, found string (Digits)"]
        );
    }

    #[test]
    fn string_formats_are_compared() {
        assert_eq!(Text::of("2019-11-14T00:38:06.021Z"), Text::IsoMillis);
        assert_eq!(Text::of("2015-10-08T16:53:06Z"), Text::IsoSeconds);
        assert_eq!(Text::of("0015"), Text::Digits);
        assert_eq!(Text::of("Jan 1, 1970, 12:33:41 AM"), Text::Other);
        assert_eq!(Text::of(""), Text::Other);
        assert_eq!(
            diffs(
                json!({"t": "2019-11-14T00:38:06.021Z"}),
                json!({"t": "2019-11-14T00:38:06Z"})
            ),
            ["$.t: type: expected string (IsoMillis), found string (IsoSeconds)"]
        );
    }

    #[test]
    fn maps_compare_every_actual_entry_with_the_expected_template() {
        let options = Options { maps: &["$.m"] };
        let e = json!({"m": {"Topic-0": {"o": "1"}, "Topic-1": {"o": "2"}}});
        let same = json!({"m": {"orders-3": {"o": "9"}}});
        assert!(differences(&e, &same, &options).is_empty());
        let wrong = json!({"m": {"orders-3": {"o": 9}, "orders-4": {}}});
        let d: Vec<String> = differences(&e, &wrong, &options)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            d,
            [
                "$.m.*.o: type: expected string (Digits), found integer",
                "$.m.*.o: missing (expected string (Digits))",
            ]
        );
        let empty = json!({"m": {}});
        assert_eq!(differences(&e, &empty, &options).len(), 1);
        // Without the option, the keys are fields and must match.
        assert_eq!(differences(&e, &same, &Options::default()).len(), 3);
    }
}
