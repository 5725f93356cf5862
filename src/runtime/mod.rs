//! Runs the mappings of a configuration and owns their lifecycle: start, enable and
//! disable, reload, and shutdown.
//!
//! Each mapping has a supervisor task, kept here by name with the mapping's config. The
//! supervisor runs the mapping's source under its own child of the shutdown token and
//! takes commands one at a time, so that a mapping never has two consumers: to disable,
//! restart (its config changed) or stop it, the supervisor cancels the child token and
//! waits for the source to drain, that is to finish and acknowledge the batch in flight
//! (a batch waiting in a retry backoff is abandoned unacknowledged, and the broker
//! redelivers it), before it does anything else. Nothing is lost either way.
//!
//! A supervisor's command queue is bounded ([`COMMANDS`]), and the control loop never
//! waits on it (a draining mapping must not hold up the others, reloads or the systemd
//! watchdog): an enable or disable that finds it full is refused with
//! [`ControlError::Busy`], and the last [`RESERVED_FOR_RELOAD`] places are kept for
//! reloads, whose change to a mapping is likewise refused, by name, only when even those
//! are taken; the mapping then keeps its old configuration until the next reload. Nothing
//! is dropped without the requester being told.
//!
//! Shutdown cancels the root token: every mapping drains at once. Past the grace period
//! the remaining tasks are dropped, with nothing acknowledged that was not delivered.
//!
//! A reload (SIGHUP) reads the file through [`Config::load`], like start-up. An invalid
//! file is refused and the running configuration stays. Otherwise mappings whose config
//! changed restart with the new one, removed ones stop, added ones start, and unchanged
//! ones are not touched (an admin API enable/disable on them stays in force).
//!
//! Building a mapping from its configuration (its deliverer, its source's context) is
//! `build`'s; nothing here knows one kind of source from another.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod build;
mod extra;

pub use extra::Resolver;
mod supervise;

use crate::config::{AdminConfig, Config, Mapping, Secret};
use crate::notify::notify;
use crate::status::{MappingStatus, State};
use build::Env;
use supervise::{Command, Panicked, Refused, admit, supervise};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "shutdown grace period of {0:?} expired with batches still in flight; they were not acknowledged and the broker will redeliver them"
    )]
    GraceExpired(Duration),
    #[error("mapping task {0} panicked")]
    Panicked(String),
}

/// Why a control request (admin API, SIGHUP) was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("there is no mapping named {0:?}")]
    NotFound(String),
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    InvalidConfig(String),
    #[error(
        "mapping {0:?} already has {queued} enables and disables waiting while it drains, the most it queues; try again once it has applied them",
        queued = COMMANDS - RESERVED_FOR_RELOAD
    )]
    Busy(String),
    #[error(
        "configuration reloaded except for mappings {0:?}, whose queues of changes are full ({COMMANDS}) while they drain; \
         they keep their previous configuration until a later reload"
    )]
    ReloadIncomplete(Vec<String>),
}

/// Commands a supervisor's queue holds while it drains: it applies one at a time, and
/// each enable or disable request waits for its own.
pub const COMMANDS: usize = 16;
/// Places of [`COMMANDS`] that only reloads may use, so that a burst of enable and
/// disable requests cannot make a reload skip a mapping.
pub const RESERVED_FOR_RELOAD: usize = 4;

/// What the admin API and the signal handler can ask of a running gateway.
enum Control {
    SetEnabled {
        name: String,
        enabled: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    Reload {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// Adds or changes a mapping made outside the file (the API's).
    Put {
        mapping: Box<Mapping>,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// Removes a mapping that [`Control::Put`] made.
    Remove {
        name: String,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
}

/// A running gateway as seen from outside: its mappings' status and a way to control
/// them. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    mappings: Arc<RwLock<BTreeMap<String, Arc<MappingStatus>>>>,
    admin_token: Arc<RwLock<Option<Secret>>>,
    read_token: Arc<RwLock<Option<Secret>>>,
    /// The configuration file as last loaded (it follows reloads).
    config: Arc<RwLock<Arc<Config>>>,
    control: mpsc::Sender<Control>,
    /// Re-makes the API's mappings on reload ([`Handle::set_resolver`]).
    resolver: Arc<RwLock<Option<extra::Resolver>>>,
}

/// The receiving end of a [`Handle`], consumed by [`run`].
pub struct Controls(mpsc::Receiver<Control>);

/// A handle for the gateway that [`run`] will run with `controls`. The mappings are
/// registered at once, so that the admin API never reports an empty (and so "ready")
/// gateway while it starts. Install the metrics recorder first.
pub fn handle(config: &Config) -> (Handle, Controls) {
    let (tx, rx) = mpsc::channel(16);
    let mappings = config
        .mappings
        .iter()
        .map(|m| {
            let status = Arc::new(MappingStatus::new(&m.name, m.source.kind()));
            status.set_enabled(m.enabled);
            if !m.enabled {
                status.set(State::Disabled);
            }
            (m.name.clone(), status)
        })
        .collect();
    let handle = Handle {
        mappings: Arc::new(RwLock::new(mappings)),
        admin_token: Arc::new(RwLock::new(config.admin.token.clone())),
        read_token: Arc::new(RwLock::new(config.admin.read_token.clone())),
        config: Arc::new(RwLock::new(Arc::new(config.clone()))),
        control: tx,
        resolver: Arc::default(),
    };
    (handle, Controls(rx))
}

impl Handle {
    /// Every configured mapping's status, by name.
    pub fn mappings(&self) -> Vec<Arc<MappingStatus>> {
        read(&self.mappings).values().cloned().collect()
    }

    /// The admin token currently configured (it follows reloads).
    pub fn admin_token(&self) -> Option<Secret> {
        read(&self.admin_token).clone()
    }

    /// The read token currently configured (it follows reloads).
    pub fn read_token(&self) -> Option<Secret> {
        read(&self.read_token).clone()
    }

    /// AWS's Enabled flag, at run time only (the file is not written). Returns once the
    /// change is made: a disabled mapping has drained its batch in flight.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.request(Control::SetEnabled {
            name: name.to_owned(),
            enabled,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// The configuration file as last loaded: its mappings are the file's only.
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    /// Re-reads the configuration file (what SIGHUP does).
    pub async fn reload(&self) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.request(Control::Reload { reply }).await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    async fn request(&self, c: Control) -> Result<(), ControlError> {
        self.control
            .send(c)
            .await
            .map_err(|_| ControlError::ShuttingDown)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// A running mapping: its config (to compare on reload) and its supervisor. Dropping
/// `commands` tells the supervisor to drain and stop.
struct Slot {
    config: Mapping,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<Result<(), Panicked>>,
}

/// Runs every mapping of `config`, and `extra` ones made outside the file (the API's),
/// until `shutdown` is cancelled, taking enable, disable, reload and put requests from
/// `controls` (`path` is re-read on reload).
pub async fn run(
    config: Config,
    extra: Vec<Mapping>,
    path: PathBuf,
    handle: Handle,
    controls: Controls,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let mut controls = controls.0;
    // One pool for the process: the connections outlive an `[aws]` change.
    let amqp = crate::amqp::Pool::default();
    let mut env = Env::new(&config, &amqp).await;
    let mut gateway = Gateway {
        slots: BTreeMap::new(),
        stopping: HashMap::new(),
        handle: handle.clone(),
        shutdown: shutdown.clone(),
        extra: BTreeMap::new(),
    };
    for m in config.mappings.clone() {
        gateway.start(m, &env);
    }
    for m in extra {
        if let Err(e) = gateway.put(m, &env) {
            tracing::error!(error = %e, "an API mapping did not start");
        }
    }
    let mut current = config;
    tracing::info!(mappings = gateway.slots.len(), "gateway running");
    tokio::spawn(supervise::notify_ready(handle.clone(), shutdown.clone()));

    let mut watchdog = crate::notify::watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(c) = controls.recv() => match c {
                Control::SetEnabled { name, enabled, reply } => match gateway.slots.get(&name) {
                    // The supervisor replies once the mapping has drained or started.
                    Some(slot) => {
                        let command = Command::SetEnabled(enabled, reply);
                        if let Err((e, Command::SetEnabled(_, reply))) =
                            admit(&slot.commands, command, RESERVED_FOR_RELOAD)
                        {
                            let _ = reply.send(Err(match e {
                                Refused::Full => ControlError::Busy(name),
                                Refused::Closed => ControlError::ShuttingDown,
                            }));
                        }
                    }
                    None => {
                        let _ = reply.send(Err(ControlError::NotFound(name)));
                    }
                },
                Control::Reload { reply } => {
                    notify("RELOADING=1");
                    let r = gateway.reload(&path, &mut current, &mut env).await;
                    let outcome = if r.is_ok() { "success" } else { "failure" };
                    metrics::counter!("esm_gateway_config_reloads_total", "outcome" => outcome)
                        .increment(1);
                    notify("READY=1");
                    let _ = reply.send(r);
                }
                Control::Put { mapping, reply } => {
                    let _ = reply.send(gateway.put(*mapping, &env));
                }
                Control::Remove { name, reply } => {
                    let _ = reply.send(gateway.remove(name));
                }
            },
            // Sent from this loop, so a wedged control loop stops the pings and systemd
            // restarts the service.
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notify("WATCHDOG=1");
            }
        }
    }

    notify("STOPPING=1");
    let grace = current.gateway.shutdown_grace;
    tracing::info!(grace = ?grace, "shutting down");
    let tasks: Vec<_> = gateway
        .slots
        .into_values()
        .map(|s| s.task)
        .chain(gateway.stopping.into_values())
        .collect();
    let drain = async {
        let mut panicked = None;
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(Panicked(name))) => panicked = Some(name),
                Err(e) => panicked = Some(e.to_string()),
            }
        }
        panicked.map_or(Ok(()), |p| Err(RuntimeError::Panicked(p)))
    };
    match tokio::time::timeout(grace, drain).await {
        Ok(r) => r,
        Err(_) => Err(RuntimeError::GraceExpired(grace)),
    }
}

/// The control loop's state: the mappings by name.
struct Gateway {
    slots: BTreeMap<String, Slot>,
    /// Supervisors of removed mappings, still draining; a mapping added back under the
    /// same name waits for its predecessor so that there is never a second consumer.
    stopping: HashMap<String, JoinHandle<Result<(), Panicked>>>,
    handle: Handle,
    shutdown: CancellationToken,
    /// The mappings made outside the file (the API's), by name: kept across reloads.
    extra: BTreeMap<String, Mapping>,
}

impl Gateway {
    fn start(&mut self, mapping: Mapping, env: &Arc<Env>) {
        let name = mapping.name.clone();
        let kind = mapping.source.kind();
        let status = write(&self.handle.mappings)
            .entry(name.clone())
            .or_insert_with(|| Arc::new(MappingStatus::new(&name, kind)))
            .clone();
        let (tx, rx) = mpsc::channel(COMMANDS);
        let previous = self.stopping.remove(&name);
        let task = tokio::spawn(supervise(
            mapping.clone(),
            env.clone(),
            status,
            rx,
            previous,
            self.shutdown.clone(),
        ));
        self.slots.insert(
            name,
            Slot {
                config: mapping,
                commands: tx,
                task,
            },
        );
    }

    fn stop(&mut self, name: &str) {
        if let Some(slot) = self.slots.remove(name) {
            write(&self.handle.mappings).remove(name);
            // Dropping the sender is the stop command.
            drop(slot.commands);
            self.stopping.insert(name.to_owned(), slot.task);
        }
    }

    async fn reload(
        &mut self,
        path: &std::path::Path,
        current: &mut Config,
        env: &mut Arc<Env>,
    ) -> Result<(), ControlError> {
        let mut new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
                return Err(ControlError::InvalidConfig(e.to_string()));
            }
        };
        *write(&self.handle.config) = Arc::new(new.clone());
        // Made again from the new file: its brokers, secrets and destinations changed.
        self.resolve_extra();
        // The API's mappings are not the file's to remove (a file mapping of the same
        // name wins).
        for m in self.extra.values() {
            if !new.mappings.iter().any(|n| n.name == m.name) {
                new.mappings.push(m.clone());
            }
        }
        // Drop the handles of removed mappings that have finished draining.
        self.stopping.retain(|_, t| !t.is_finished());
        let aws_changed = new.aws != current.aws || new.schedules != current.schedules;
        if aws_changed {
            tracing::info!("[aws] changed; every mapping restarts with the new settings");
            *env = Env::new(&new, env.amqp()).await;
        }
        if new.telemetry != current.telemetry {
            tracing::warn!("[telemetry] takes effect at the next start, not on reload");
        }
        if new.admin.listen != current.admin.listen || new.admin.enabled != current.admin.enabled {
            tracing::warn!(
                "[admin] listen and enabled take effect at the next start, not on reload"
            );
        }
        *write(&self.handle.admin_token) = new.admin.token.clone();
        *write(&self.handle.read_token) = new.admin.read_token.clone();

        let (mut added, mut changed, mut removed, mut unchanged) = (0, 0, 0, 0);
        let mut busy = Vec::new();
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in names {
            if !new.mappings.iter().any(|m| m.name == name) {
                tracing::info!(mapping = %name, "mapping removed; draining it");
                self.stop(&name);
                removed += 1;
            }
        }
        for m in &new.mappings {
            match self.slots.get_mut(&m.name) {
                None => {
                    tracing::info!(mapping = %m.name, "mapping added");
                    self.start(m.clone(), env);
                    added += 1;
                }
                Some(slot) if slot.config.source.kind() != m.source.kind() => {
                    tracing::info!(mapping = %m.name, "mapping changed its source kind; replacing it");
                    let name = m.name.clone();
                    self.stop(&name);
                    self.start(m.clone(), env);
                    changed += 1;
                }
                Some(slot) if slot.config != *m || aws_changed => {
                    let command = Command::Replace(Box::new(m.clone()), env.clone());
                    match admit(&slot.commands, command, 0) {
                        Ok(()) => {
                            tracing::info!(mapping = %m.name, "mapping changed; draining it and restarting with the new configuration");
                            slot.config = m.clone();
                            changed += 1;
                        }
                        // Its old config stays recorded, so the next reload tries again.
                        Err((Refused::Full, _)) => {
                            tracing::error!(mapping = %m.name, "mapping changed but still has reloads waiting; it keeps its previous configuration");
                            busy.push(m.name.clone());
                        }
                        // Only at shutdown: the supervisor is gone.
                        Err((Refused::Closed, _)) => {}
                    }
                }
                Some(_) => unchanged += 1,
            }
        }
        current.aws = new.aws;
        current.gateway = new.gateway;
        current.admin = AdminConfig {
            // The listener itself is not rebound (see the warning above).
            listen: current.admin.listen,
            enabled: current.admin.enabled,
            token: new.admin.token,
            read_token: new.admin.read_token,
        };
        tracing::info!(
            added,
            changed,
            removed,
            unchanged,
            busy = busy.len(),
            "configuration reloaded"
        );
        if busy.is_empty() {
            Ok(())
        } else {
            Err(ControlError::ReloadIncomplete(busy))
        }
    }
}
