//! The observable state of each mapping: what `/readyz`, `/mappings`, logs and the
//! per-mapping gauges report. Written by the runtime, the source and the pipeline; read
//! by anyone.

use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::telemetry::MappingMetrics;

/// Where a mapping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Connecting to its source (or restarting after a reload or an enable).
    Starting,
    /// Connected and invoking.
    Running,
    /// Cannot make progress (function missing, permission denied, source unreachable):
    /// it keeps retrying slowly and acknowledges nothing meanwhile.
    Failed,
    /// Not polling or invoking: `enabled = false`, or disabled through the admin API.
    Disabled,
    /// Finishing its batch in flight before it stops, restarts or is disabled.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Failed => "failed",
            State::Disabled => "disabled",
            State::Draining => "draining",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    /// Whether the mapping should poll and invoke (the file's `enabled`, or the admin
    /// API's override).
    pub enabled: bool,
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
    /// Messages waiting in the source, when the source reports it.
    pub depth: Option<u64>,
    /// Why the mapping is degraded: its on-failure destination refused a record for good
    /// and it was kept in a payload file instead. Kept until the process restarts (a
    /// reload keeps it too), so that an operator sees it and looks at those files.
    pub degraded: Option<String>,
}

#[derive(Debug)]
pub struct MappingStatus {
    pub name: String,
    /// The source kind (`rabbitmq`), a metric label.
    pub kind: &'static str,
    pub metrics: MappingMetrics,
    inner: Mutex<Snapshot>,
}

impl MappingStatus {
    pub fn new(name: &str, kind: &'static str) -> MappingStatus {
        let status = MappingStatus {
            name: name.to_owned(),
            kind,
            metrics: MappingMetrics::new(name, kind),
            inner: Mutex::new(Snapshot {
                state: State::Starting,
                enabled: true,
                last_error: None,
                last_success: None,
                depth: None,
                degraded: None,
            }),
        };
        status.gauges(State::Starting, true);
        status
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    pub fn set(&self, state: State) {
        let mut s = self.lock();
        s.state = state;
        let enabled = s.enabled;
        drop(s);
        self.gauges(state, enabled);
    }

    /// Records whether the mapping should run; the state follows when it starts or stops.
    pub fn set_enabled(&self, enabled: bool) {
        let mut s = self.lock();
        s.enabled = enabled;
        let state = s.state;
        drop(s);
        self.gauges(state, enabled);
    }

    /// Marks the mapping failed with the reason an operator needs to fix it.
    pub fn fail(&self, error: impl ToString) {
        let mut s = self.lock();
        s.state = State::Failed;
        s.last_error = Some(shown(&error.to_string()));
        let enabled = s.enabled;
        drop(s);
        self.gauges(State::Failed, enabled);
    }

    /// Records an error that does not stop the mapping (a retried batch, a reconnect).
    pub fn error(&self, error: impl ToString) {
        self.lock().last_error = Some(shown(&error.to_string()));
    }

    /// The destination refused a record for good and it was kept elsewhere: the mapping
    /// runs on, but needs an operator's look.
    pub fn degrade(&self, reason: impl ToString) {
        let reason = shown(&reason.to_string());
        let mut s = self.lock();
        s.last_error = Some(reason.clone());
        s.degraded = Some(reason);
    }

    /// The function answered: a mapping that had failed is running again.
    pub fn reachable(&self) {
        let mut s = self.lock();
        if s.state == State::Failed {
            s.state = State::Running;
            let enabled = s.enabled;
            drop(s);
            self.gauges(State::Running, enabled);
        }
    }

    /// A batch went through: the mapping is running (unless it is being drained).
    pub fn success(&self) {
        let mut s = self.lock();
        if s.state != State::Draining {
            s.state = State::Running;
        }
        s.last_success = Some(SystemTime::now());
        let (state, enabled) = (s.state, s.enabled);
        drop(s);
        self.gauges(state, enabled);
    }

    /// The source reported how many messages wait in it.
    pub fn depth(&self, messages: u64) {
        self.lock().depth = Some(messages);
        self.metrics.depth.set(messages as f64);
    }

    fn gauges(&self, state: State, enabled: bool) {
        self.metrics
            .failed_state
            .set(if state == State::Failed { 1.0 } else { 0.0 });
        self.metrics.enabled.set(if enabled { 1.0 } else { 0.0 });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Longest error text kept for display, in characters.
pub const SHOWN_CHARS: usize = 512;

/// Text as it may be shown to an operator (admin API, `status`): at most
/// [`SHOWN_CHARS`] characters, with control characters written as escapes. A function's
/// error message often holds record data, and an escape sequence in it must not reach an
/// operator's terminal.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(SHOWN_CHARS + 32));
    for (n, c) in text.chars().enumerate() {
        if n == SHOWN_CHARS {
            let rest = text.chars().count() - n;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        // Also the bidirectional overrides, which reorder what a terminal shows.
        if c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_text_is_bounded_and_has_no_control_characters() {
        assert_eq!(shown("plain text"), "plain text");
        assert_eq!(
            shown("red \u{1b}[31mtext\r\n\u{202e}"),
            "red \\u{1b}[31mtext\\u{d}\\u{a}\\u{202e}"
        );
        let long = "é".repeat(SHOWN_CHARS + 10);
        let s = shown(&long);
        assert!(s.starts_with(&"é".repeat(SHOWN_CHARS)));
        assert!(s.ends_with("… (10 more characters)"), "{s}");
    }
}
