//! The observable state of each mapping: what `/readyz`, `/mappings`, logs and the
//! `esm_gateway_mapping_failed` gauge report. Written by the pipeline, read by anyone.

use std::sync::Mutex;
use std::time::SystemTime;

/// Where a mapping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting to its source.
    Starting,
    /// Connected and invoking.
    Running,
    /// Cannot make progress (function missing, permission denied, source unreachable):
    /// it keeps retrying slowly and acknowledges nothing meanwhile.
    Failed,
    /// `enabled = false`.
    Disabled,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
}

#[derive(Debug)]
pub struct MappingStatus {
    pub name: String,
    inner: Mutex<Snapshot>,
}

impl MappingStatus {
    pub fn new(name: &str) -> MappingStatus {
        MappingStatus {
            name: name.to_owned(),
            inner: Mutex::new(Snapshot {
                state: State::Starting,
                last_error: None,
                last_success: None,
            }),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    pub fn set(&self, state: State) {
        self.lock().state = state;
        self.gauge(state);
    }

    /// Marks the mapping failed with the reason an operator needs to fix it.
    pub fn fail(&self, error: impl ToString) {
        let mut s = self.lock();
        s.state = State::Failed;
        s.last_error = Some(error.to_string());
        drop(s);
        self.gauge(State::Failed);
    }

    /// Records an error that does not stop the mapping (a retried batch, a reconnect).
    pub fn error(&self, error: impl ToString) {
        self.lock().last_error = Some(error.to_string());
    }

    /// The function answered: a mapping that had failed is running again.
    pub fn reachable(&self) {
        let mut s = self.lock();
        if s.state == State::Failed {
            s.state = State::Running;
            drop(s);
            self.gauge(State::Running);
        }
    }

    /// A batch went through: the mapping is running.
    pub fn success(&self) {
        let mut s = self.lock();
        s.state = State::Running;
        s.last_success = Some(SystemTime::now());
        drop(s);
        self.gauge(State::Running);
    }

    fn gauge(&self, state: State) {
        metrics::gauge!("esm_gateway_mapping_failed", "mapping" => self.name.clone())
            .set(if state == State::Failed { 1.0 } else { 0.0 });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
