//! A mapping's supervisor: runs its source while it is enabled and applies its
//! commands (enable, disable, replace) one at a time, each change preceded by a drain,
//! so that a mapping never has two consumers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ControlError;
use super::build::{Env, deliverer, run_mapping};
use crate::config::Mapping;
use crate::status::{MappingStatus, State};

/// A supervisor's commands, worked one at a time.
/// A mapping whose source task panicked (named), reported when its supervisor ends.
#[derive(Debug, thiserror::Error)]
#[error("mapping task {0} panicked")]
pub(super) struct Panicked(pub(super) String);

pub(super) enum Command {
    SetEnabled(bool, oneshot::Sender<Result<(), ControlError>>),
    Replace(Box<Mapping>, Arc<Env>),
}

/// Why a command was not queued.
#[derive(Debug, PartialEq)]
pub(super) enum Refused {
    /// The queue has no more than `reserve` places left.
    Full,
    /// The supervisor has ended (shutdown).
    Closed,
}

/// Queues `command` unless that would leave fewer than `reserve` free places; never
/// waits. The refused command comes back, so that its reply can be answered.
pub(super) fn admit<T>(
    queue: &mpsc::Sender<T>,
    command: T,
    reserve: usize,
) -> Result<(), (Refused, T)> {
    if queue.is_closed() {
        return Err((Refused::Closed, command));
    }
    if queue.capacity() <= reserve {
        return Err((Refused::Full, command));
    }
    queue.try_send(command).map_err(|e| match e {
        mpsc::error::TrySendError::Full(c) => (Refused::Full, c),
        mpsc::error::TrySendError::Closed(c) => (Refused::Closed, c),
    })
}

/// Runs one mapping: its source task while enabled, commands one at a time, each change
/// preceded by a drain. Returns when its command channel closes (removed) or on
/// shutdown; Err names a source task that panicked.
pub(super) async fn supervise(
    mut mapping: Mapping,
    mut env: Arc<Env>,
    status: Arc<MappingStatus>,
    mut commands: mpsc::Receiver<Command>,
    previous: Option<JoinHandle<Result<(), Panicked>>>,
    shutdown: CancellationToken,
) -> Result<(), Panicked> {
    if let Some(p) = previous {
        let _ = p.await;
    }
    let mut enabled = mapping.enabled;
    let mut panicked = None;
    loop {
        status.set_enabled(enabled);
        let token = shutdown.child_token();
        let mut task = if enabled {
            status.set(State::Starting);
            let deliverer = deliverer(&mapping, &env, status.clone());
            let span = tracing::info_span!("mapping", name = %mapping.name, source = mapping.source.kind());
            Some(tokio::spawn(
                run_mapping(mapping.clone(), deliverer, env.clone(), token.clone())
                    .instrument(span),
            ))
        } else {
            tracing::info!(mapping = %mapping.name, "mapping disabled");
            status.set(State::Disabled);
            None
        };

        // Wait for a command that changes something (or shutdown).
        let (next, reply) = loop {
            let command = tokio::select! {
                // Shutdown first: it also ends the source (its token is a child), and an
                // unbiased select could see that end first and call it a panic (exit 70).
                biased;
                () = shutdown.cancelled() => None,
                c = commands.recv() => c,
                // A source runs until cancelled; ending on its own means it panicked.
                r = async { task.as_mut().expect("guarded").await }, if task.is_some() => {
                    task = None;
                    let e = r.err().map_or_else(|| "the source task ended".to_owned(), |e| e.to_string());
                    tracing::error!(mapping = %mapping.name, error = %e, "mapping task ended unexpectedly");
                    status.fail(format!("mapping task ended unexpectedly: {e}"));
                    panicked = Some(mapping.name.clone());
                    continue;
                }
            };
            match command {
                None => break (None, None),
                Some(Command::SetEnabled(e, reply)) if e == enabled => {
                    let _ = reply.send(Ok(()));
                }
                Some(Command::SetEnabled(e, reply)) => break (Some(Err(e)), Some(reply)),
                Some(Command::Replace(m, new_env)) => break (Some(Ok((m, new_env))), None),
            }
        };

        // Drain: stop taking batches, finish and acknowledge the one in flight.
        token.cancel();
        if let Some(task) = task {
            status.set(State::Draining);
            if let Err(e) = task.await {
                tracing::error!(mapping = %mapping.name, error = %e, "mapping task panicked");
                panicked = Some(mapping.name.clone());
            }
        }
        match next {
            None => {
                status.set(State::Disabled);
                status.metrics.in_flight.set(0.0);
                return panicked.map_or(Ok(()), |name| Err(Panicked(name)));
            }
            Some(Err(e)) => {
                tracing::info!(mapping = %mapping.name, enabled = e, "mapping {} through the admin API", if e { "enabled" } else { "disabled" });
                enabled = e;
            }
            Some(Ok((m, new_env))) => {
                enabled = m.enabled;
                mapping = *m;
                env = new_env;
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }
}

/// Sends READY=1 once every enabled mapping has made its first connection attempt
/// (it is running or failed), or after 10 s: a broker that is down at boot must not keep
/// the unit in "activating" (readiness is `/readyz`'s job).
pub(super) async fn notify_ready(handle: super::Handle, shutdown: CancellationToken) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = handle
            .mappings()
            .iter()
            .filter(|m| {
                let s = m.snapshot();
                s.enabled && matches!(s.state, State::Starting | State::Draining)
            })
            .count();
        if waiting == 0 || tokio::time::Instant::now() >= deadline {
            let n = handle.mappings().len();
            crate::notify::notify(&format!(
                "READY=1\nSTATUS=running {n} mapping(s), {waiting} still connecting"
            ));
            tracing::info!(mappings = n, connecting = waiting, "started");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{COMMANDS, RESERVED_FOR_RELOAD};

    #[test]
    fn a_full_command_queue_refuses_and_hands_the_command_back_keeping_places_for_reloads() {
        let (tx, mut rx) = mpsc::channel::<usize>(COMMANDS);
        // Enables and disables stop short of the reloads' reserve...
        let mut sent = 0;
        while admit(&tx, sent, RESERVED_FOR_RELOAD).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, COMMANDS - RESERVED_FOR_RELOAD);
        assert_eq!(
            admit(&tx, 99, RESERVED_FOR_RELOAD),
            Err((Refused::Full, 99))
        );
        // ...which reloads may still use, up to the bound, and no further.
        while admit(&tx, sent, 0).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, COMMANDS);
        assert_eq!(admit(&tx, 99, 0), Err((Refused::Full, 99)));
        // Nothing queued was lost, in order; a place taken frees one.
        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(admit(&tx, COMMANDS, 0), Ok(()));
        let rest: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(rest, (1..=COMMANDS).collect::<Vec<_>>());
        drop(rx);
        assert_eq!(admit(&tx, 7, 0), Err((Refused::Closed, 7)));
    }
}
