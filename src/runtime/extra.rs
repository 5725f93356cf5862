//! Mappings made outside the file (the API's): put beside the file's, changed, and
//! removed at run time; the control loop keeps them across reloads, made again from the
//! reloaded file by the [`Resolver`] when one is set.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::build::Env;
use super::supervise::{Command, Refused, admit};
use super::{Control, ControlError, Gateway, Handle, RESERVED_FOR_RELOAD, read, write};
use crate::config::Mapping;

/// Makes the mappings made outside the file again from the configuration as the handle
/// holds it (the API's, from their stored requests): called on every reload, after the
/// new file is in place. A mapping it leaves out (it no longer converts; the resolver
/// logs why) keeps its running configuration.
pub type Resolver = Arc<dyn Fn() -> Vec<Mapping> + Send + Sync>;

impl Handle {
    /// Has every reload make the API's mappings again with `resolve`, so that a changed
    /// `[[broker]]`, `[[secret]]` or `[[destination]]` reaches them.
    pub fn set_resolver(&self, resolve: Resolver) {
        *write(&self.resolver) = Some(resolve);
    }

    /// Runs `mapping` (checked by [`Config::check_mapping`]) beside the file's, or
    /// restarts it with this configuration; it survives reloads until removed. Returns
    /// once the change is queued.
    pub async fn put_mapping(&self, mapping: Mapping) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.request(Control::Put {
            mapping: Box::new(mapping),
            reply,
        })
        .await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// Stops and forgets a mapping that [`Handle::put_mapping`] made.
    pub async fn remove_mapping(&self, name: &str) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.request(Control::Remove {
            name: name.to_owned(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }
}

impl Gateway {
    /// The outside mappings made again by the resolver; only those already put (one
    /// being created is put by its own request).
    pub(super) fn resolve_extra(&mut self) {
        let Some(resolve) = read(&self.handle.resolver).clone() else {
            return;
        };
        for m in resolve() {
            if let Some(old) = self.extra.get_mut(&m.name) {
                *old = m;
            }
        }
    }

    /// Starts a mapping made outside the file, or has it restart with this config.
    pub(super) fn put(&mut self, m: Mapping, env: &Arc<Env>) -> Result<(), ControlError> {
        self.extra.insert(m.name.clone(), m.clone());
        match self.slots.get_mut(&m.name) {
            None => {
                tracing::info!(mapping = %m.name, "mapping created through the API");
                self.start(m, env);
            }
            Some(slot) if slot.config.source.kind() != m.source.kind() => {
                let name = m.name.clone();
                self.stop(&name);
                self.start(m, env);
            }
            Some(slot) if slot.config != m => {
                let name = m.name.clone();
                match admit(
                    &slot.commands,
                    Command::Replace(Box::new(m.clone()), env.clone()),
                    RESERVED_FOR_RELOAD,
                ) {
                    Ok(()) => {
                        tracing::info!(mapping = %name, "mapping updated through the API; draining it and restarting with the new configuration");
                        slot.config = m;
                    }
                    Err((Refused::Full, _)) => return Err(ControlError::Busy(name)),
                    Err((Refused::Closed, _)) => return Err(ControlError::ShuttingDown),
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Stops and forgets a mapping that [`Gateway::put`] made.
    pub(super) fn remove(&mut self, name: String) -> Result<(), ControlError> {
        if self.extra.remove(&name).is_none() {
            return Err(ControlError::NotFound(name));
        }
        tracing::info!(mapping = %name, "mapping deleted through the API; draining it");
        self.stop(&name);
        Ok(())
    }
}
