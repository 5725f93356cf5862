//! The configuration's JSON Schema: the committed copy is the one the types generate,
//! every configuration file in the repository validates against it with an independent
//! validator (Python's `jsonschema`, from the stack's tools virtualenv), and the README's
//! configuration reference names every field of every source and destination.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn committed() -> Value {
    let text = std::fs::read_to_string(repo().join("config/esm-gateway.schema.json"))
        .expect("config/esm-gateway.schema.json");
    serde_json::from_str(&text).expect("the committed schema is JSON")
}

#[test]
fn the_committed_schema_is_the_one_the_config_types_generate() {
    let out = Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .arg("config-schema")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let generated: Value = serde_json::from_slice(&out.stdout).expect("config-schema prints JSON");
    assert!(
        generated == committed(),
        "config/esm-gateway.schema.json is stale: run `esm-gateway config-schema > config/esm-gateway.schema.json`"
    );
}

/// Validates each TOML file against the schema with Python's jsonschema (draft 7);
/// returns each file's errors, empty for a valid one.
fn validate(files: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let python =
        std::env::var("TOOLS_PYTHON").expect("TOOLS_PYTHON (eval \"$(scripts/stack env)\")");
    let script = r#"
import json, sys, tomllib, jsonschema
validator = jsonschema.Draft7Validator(json.load(open(sys.argv[1])))
for path in sys.argv[2:]:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    errors = ["/".join(map(str, e.path)) + ": " + e.message for e in validator.iter_errors(doc)]
    print(json.dumps([path, "; ".join(errors)]))
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(repo().join("config/esm-gateway.schema.json"))
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<(PathBuf, String)>(l).unwrap())
        .collect()
}

#[test]
fn every_config_file_validates_and_bad_ones_do_not() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.push(repo().join("docker/config.toml"));
    files.push(repo().join("packaging/config.toml"));
    assert!(files.len() >= 2, "{files:?}");
    for (path, errors) in validate(&files) {
        assert!(errors.is_empty(), "{}: {errors}", path.display());
    }
    // The validator refuses what the gateway refuses, each for its own reason.
    let dir = tempfile::tempdir().unwrap();
    let base = "[[mapping]]\nname = \"m\"\nfunction = \"f\"\n";
    let cases = [
        (
            "unknown_key",
            format!(
                "{base}sauce = 1\n[mapping.source]\ntype = \"sqs\"\nqueue_url = \"http://q\"\n"
            ),
            "sauce",
        ),
        (
            "batch_size",
            format!(
                "{base}[mapping.batch]\nsize = 0\n[mapping.source]\ntype = \"sqs\"\nqueue_url = \"http://q\"\n"
            ),
            "size",
        ),
        (
            "source_type",
            format!("{base}[mapping.source]\ntype = \"carrier-pigeon\"\n"),
            "source",
        ),
        (
            "missing_queue",
            format!("{base}[mapping.source]\ntype = \"rabbitmq\"\nurl = \"amqp://h\"\n"),
            "source",
        ),
    ];
    let bad: Vec<PathBuf> = cases
        .iter()
        .map(|(name, text, _)| {
            let p = dir.path().join(format!("{name}.toml"));
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    for ((path, errors), (name, _, field)) in validate(&bad).into_iter().zip(&cases) {
        assert!(
            !errors.is_empty(),
            "{name}: {} was accepted",
            path.display()
        );
        assert!(errors.contains(field), "{name}: {errors}");
    }
}

/// The property names of a schema node (following `$ref`, `allOf` and `oneOf`).
fn fields(node: &Value, root: &Value, out: &mut BTreeSet<String>) {
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/definitions/");
        fields(&root["definitions"][name], root, out);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for n in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            fields(n, root, out);
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        out.extend(props.keys().cloned());
    }
}

/// Every field of each source and destination kind is a key (`name =`, maybe commented
/// out) in the README's reference, within the block that starts at that kind's
/// `type = "<kind>"`; every other table's fields anywhere in the README's TOML.
#[test]
fn the_readme_reference_names_every_field_of_every_source_and_destination() {
    let schema = committed();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let key = |line: &str, field: &str| {
        let l = line.trim_start_matches(['#', ' ']);
        l.starts_with(&format!("{field} ="))
            || l.contains(&format!(" {field} = "))
            || l.contains(&format!("{{ {field} = "))
    };
    let mut missing = Vec::new();
    for (kinds, table) in [
        ("SourceConfig", "[mapping.source]"),
        ("DestinationConfig", "[mapping.on_failure]"),
    ] {
        // Each kind's block is searched from its table's first line on.
        let from = lines
            .iter()
            .position(|l| l.trim_start_matches(['#', ' ']).starts_with(table))
            .unwrap_or_else(|| panic!("the README has no {table}"));
        for variant in schema["definitions"][kinds]["oneOf"].as_array().unwrap() {
            let kind = variant["properties"]["type"]["const"]
                .as_str()
                .or_else(|| variant["properties"]["type"]["enum"][0].as_str())
                .unwrap_or_else(|| panic!("{kinds} variant without a type: {variant}"));
            let mut names = BTreeSet::new();
            fields(variant, &schema, &mut names);
            // The block of this kind: from its `type = "<kind>"` line to the next `type =`.
            let start = lines[from..]
                .iter()
                .position(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l == format!("type = \"{kind}\"")
                        || l.starts_with(&format!("type = \"{kind}\" "))
                })
                .map(|i| from + i);
            let Some(start) = start else {
                missing.push(format!("{kinds} {kind}: no `type = \"{kind}\"` block"));
                continue;
            };
            let end = lines[start + 1..]
                .iter()
                .position(|l| {
                    l.trim_start_matches(['#', ' ']).starts_with("type =") || l.starts_with("```")
                })
                .map_or(lines.len(), |i| start + 1 + i);
            for name in names.iter().filter(|n| n.as_str() != "type") {
                // A nested table's fields (sasl, tls) are keys of an inline table.
                if !lines[start..end].iter().any(|l| key(l, name)) {
                    missing.push(format!("{kinds} {kind}: {name}"));
                }
            }
        }
    }
    for table in [
        "Config",
        "AwsConfig",
        "GatewayConfig",
        "AdminConfig",
        "SchedulesConfig",
        "Mapping",
        "Batching",
        "RetryPolicy",
    ] {
        let node = if table == "Config" {
            schema.clone()
        } else {
            schema["definitions"][table].clone()
        };
        let mut names = BTreeSet::new();
        fields(&node, &schema, &mut names);
        for name in names {
            let table_form = [
                format!("[{name}]"),
                format!("[[{name}]]"),
                format!("[mapping.{name}]"),
            ];
            if !lines.iter().any(|l| {
                key(l, &name)
                    || table_form
                        .iter()
                        .any(|t| l.trim_start().starts_with(t.as_str()))
            }) {
                missing.push(format!("{table}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields of the configuration the README's reference does not name:\n  {}",
        missing.join("\n  ")
    );
}
