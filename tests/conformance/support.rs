//! Fixtures, records and the assertion every conformance test ends with.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use esm_gateway::record::{Ack, Hold, Record};
use serde_json::Value;

use crate::compare::{Diff, Options, differences};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/fixtures")
}

/// A committed fixture, `fixtures/<name>` (`aws/…` or `gateway/…`), parsed.
pub fn fixture(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A difference that is known and deliberate: the gateway's own field, or a documented
/// departure from AWS. Each one must still occur (a stale one fails the test), so the
/// list is exactly what the README names.
#[derive(Debug, Clone, Copy)]
pub struct Allow {
    pub path: &'static str,
    /// The start of the difference's text: "extra", "missing", "type", "length".
    pub what: &'static str,
    pub why: &'static str,
}

impl Allow {
    fn covers(&self, d: &Diff) -> bool {
        d.path == self.path && d.what.starts_with(self.what)
    }
}

/// Asserts that `actual` has `expected`'s shape but for `allowed`, and that each of
/// `allowed` is used.
pub fn assert_conforms(
    what: &str,
    expected: &Value,
    actual: &Value,
    options: &Options,
    allowed: &[Allow],
) {
    let diffs = differences(expected, actual, options);
    let unexpected: Vec<&Diff> = diffs
        .iter()
        .filter(|d| !allowed.iter().any(|a| a.covers(d)))
        .collect();
    let stale: Vec<&Allow> = allowed
        .iter()
        .filter(|a| !diffs.iter().any(|d| a.covers(d)))
        .collect();
    if unexpected.is_empty() && stale.is_empty() {
        return;
    }
    let mut msg = format!("{what}: the gateway's shape differs from the reference\n");
    for d in &unexpected {
        msg.push_str(&format!("  {d}\n"));
    }
    for a in &stale {
        msg.push_str(&format!(
            "  allowed difference no longer occurs (remove it): {} {} ({})\n",
            a.path, a.what, a.why
        ));
    }
    msg.push_str(&format!(
        "the gateway rendered:\n{}",
        serde_json::to_string_pretty(actual).expect("JSON")
    ));
    panic!("{msg}");
}

/// Parses rendered bytes, which must be JSON.
pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "rendered bytes are not JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// The wall-clock moment records are received at: AWS's example's first record time,
/// 2019-11-14T00:38:04.835Z.
pub const RECEIVED_AT_MS: u64 = 1_573_691_884_835;

/// A record as a source hands it to the pipeline (built by hand: `Record::for_test` is
/// the crate's own unit tests' only).
pub fn record(fragment: String, id: Option<&str>, key: Option<&[u8]>, position: u64) -> Record {
    Record {
        fragment,
        id: id.map(Into::into),
        key: key.map(Into::into),
        position,
        received: tokio::time::Instant::now(),
        received_at: SystemTime::UNIX_EPOCH + Duration::from_millis(RECEIVED_AT_MS),
        trace: None,
        ack: Ack::NONE,
        hold: Hold::default(),
    }
}

/// The gateway's own shapes: `fixtures/gateway/<name>` is the golden file; with
/// `CONFORMANCE_BLESS=1` the test writes it from `actual` instead (review the diff, then
/// commit it: a change of shape is a deliberate act).
pub fn assert_golden(name: &str, actual: &Value, options: &Options) {
    let path = fixtures().join("gateway").join(name);
    if std::env::var_os("CONFORMANCE_BLESS").is_some_and(|v| v == "1") {
        let mut text = serde_json::to_string_pretty(actual).expect("JSON");
        text.push('\n');
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = fixture(&format!("gateway/{name}"));
    assert_conforms(
        &format!("golden file gateway/{name} (CONFORMANCE_BLESS=1 rewrites it)"),
        &expected,
        actual,
        options,
        &[],
    );
}
