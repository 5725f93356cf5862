//! Replicas sharing one `[api] store`: each follows the changes the others make through
//! their APIs and applies them to its own runtime as its own API would (a new or
//! changed record is put, a deleted one removed), so that every replica runs the same
//! set of mappings and the sources' own rules (Kafka consumer groups, RabbitMQ's single
//! active consumer, SQS's competing consumers) decide who reads what.
//!
//! A replica hears of a change by the notification its commit sends, and also reads the
//! whole set every `[api] store_refresh`, since a notification sent while its listening
//! connection was down is lost. A lost connection is opened again with backoff; until
//! then the mappings keep running as they were, and only changes wait.

use std::sync::Arc;
use std::time::Duration;

use super::store::postgres::Db;
use super::store::{Keyed, Store, StoreError};
use super::{Api, convert, handlers, scheduler};
use crate::config::Mapping;
use crate::runtime::ControlError;

/// Follows the store of `db` for as long as the process runs.
pub async fn follow(api: Api, db: Arc<Db>, every: Duration) {
    let mut failures = 0u32;
    loop {
        match db.listen().await {
            Ok((_client, mut notes)) => {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        // A replica committed a change (or this one did: reading finds
                        // nothing new then).
                        note = notes.recv() => if note.is_none() { break },
                        // The safety net; its first tick is at once, which also catches
                        // up on changes made while this connection was down.
                        _ = tick.tick() => {}
                    }
                    // A failed read most likely means the listening connection is
                    // gone too, though it may not know yet (a peer that vanished sends
                    // no reset): open it again.
                    if let Err(e) = sync(&api).await {
                        tracing::warn!(store = %db.shown(), error = %e, "cannot read the API's store; the mappings keep running as they are");
                        break;
                    }
                    // Counted afresh only once a read succeeds, so that a store that
                    // listens but cannot be read is not retried in a tight loop.
                    if failures > 0 {
                        tracing::info!(store = %db.shown(), "the API's store is reachable again");
                        failures = 0;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(store = %db.shown(), error = %e, "cannot listen to the API's store; the mappings keep running as they are");
            }
        }
        failures += 1;
        let delay = crate::source::reconnect_delay(failures);
        tracing::warn!(store = %db.shown(), retry_in = ?delay, "reconnecting to the API's store");
        tokio::time::sleep(delay).await;
    }
}

/// Reads both tables again and applies what other replicas changed; in the order of
/// the API's own changes, which hold the same lock.
pub async fn sync(api: &Api) -> Result<(), StoreError> {
    let _guard = api.changes.lock().await;
    catch_up(api).await
}

/// [`sync`] for a caller that holds [`Api::changes`].
pub async fn catch_up(api: &Api) -> Result<(), StoreError> {
    let env = handlers::context(&api.runtime.config());
    let cx = env.as_context();
    apply(
        api,
        &api.store,
        |r| convert::mapping(&r.uuid, &r.spec, &cx).map_err(|e| e.to_string()),
        str::to_owned,
    )
    .await?;
    apply(
        api,
        &api.schedules,
        |r| scheduler::mapping(api, &r.name, &r.request).map_err(|e| e.message),
        scheduler::mapping_name,
    )
    .await
}

/// Applies the changes `store` has seen to the runtime: `make` is the mapping of a
/// record, `name` the runtime's name for a key. A change the runtime cannot take now is
/// kept as unseen, and tried again at the next read.
async fn apply<R: Keyed>(
    api: &Api,
    store: &Store<R>,
    make: impl Fn(&R) -> Result<Mapping, String>,
    name: impl Fn(&str) -> String,
) -> Result<(), StoreError> {
    for change in store.reload().await? {
        let applied = match &change.after {
            Some(record) => match make(record) {
                Ok(m) => {
                    tracing::info!(key = %change.key, "mapping created or changed by another replica; running it here too");
                    api.runtime.put_mapping(m).await
                }
                // As at a reload: a record that does not convert here leaves what runs.
                Err(e) => {
                    tracing::error!(key = %change.key, error = %e, "a mapping another replica stored does not fit this replica's configuration; it does not run here");
                    Ok(())
                }
            },
            None => {
                tracing::info!(key = %change.key, "mapping deleted by another replica; stopping it here");
                match api.runtime.remove_mapping(&name(&change.key)).await {
                    Err(ControlError::NotFound(_)) => Ok(()),
                    r => r,
                }
            }
        };
        if let Err(e) = applied {
            tracing::warn!(key = %change.key, error = %e, "cannot apply a change another replica made yet; trying again at the next read");
            store.unsee(change);
        }
    }
    Ok(())
}
