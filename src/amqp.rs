//! The AMQP 0-9-1 connection code shared by the RabbitMQ source, the RabbitMQ on-failure
//! destination and redrive: how a connection is opened (TLS with a custom CA), how its
//! errors are told without the password, and the process's [`Pool`] of shared
//! connections.
//!
//! Mappings that reach the same broker with the same URL (so the same credentials and
//! vhost) and the same CA file share one connection to consume on, and their on-failure
//! destinations another to publish on (see [`Key`]), each with a channel of its own, up
//! to [`CHANNELS_PER_CONNECTION`] channels (or the broker's `channel_max`, if lower); more
//! connections open beyond that. A channel that fails (a missing queue, a consumer
//! timeout) is closed by the broker alone and its mapping opens another on the same
//! connection; a connection that fails ends all its channels, and the first mapping to
//! ask again opens its replacement, which the others then share. A connection closes
//! when its last channel is given back.
//!
//! Nothing waits on a silent broker for long: opening a connection (TCP, TLS and the
//! AMQP handshake) is given up after [`CONNECT_DEADLINE`], and an open connection
//! heartbeats every [`DEFAULT_HEARTBEAT`] seconds unless its URL says otherwise
//! (`?heartbeat=N`), so one that hears nothing from the broker for two intervals ends,
//! with every channel and call on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::env::SecretUrl;

/// Why a connection could not be opened. No variant carries the password.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot read CA file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the AMQP client: {0}")]
    Runtime(String),
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot open a channel on the connection to {url}: {message}")]
    Channel { url: String, message: String },
}

/// How long opening a connection may take, TCP, TLS and AMQP handshake together: a
/// broker (or a load balancer in front of it) that accepts and then says nothing is given
/// up, and the caller's backoff tries again.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// The heartbeat interval, in seconds, asked of the broker when the URL does not set one
/// (RabbitMQ's own default is 60 s): a connection that hears nothing for two intervals
/// (20 s) is ended, its deliveries go back to the queue, and its mappings reconnect.
pub const DEFAULT_HEARTBEAT: u16 = 10;

/// `url` parsed, with the gateway's defaults where the URL's query sets none: the
/// heartbeat, and [`CONNECT_DEADLINE`] for the TCP connect.
fn amqp_uri(url: &SecretUrl) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.expose().parse()?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT);
    uri.query
        .connection_timeout
        .get_or_insert(CONNECT_DEADLINE.as_millis() as u64);
    Ok(uri)
}

/// Opens a connection named `name` (the broker shows it), with a custom CA when
/// `ca_file` is given, within [`CONNECT_DEADLINE`].
pub async fn connect(
    url: &SecretUrl,
    ca_file: Option<&Path>,
    name: &str,
) -> Result<Connection, AmqpError> {
    connect_within(url, ca_file, name, CONNECT_DEADLINE).await
}

async fn connect_within(
    url: &SecretUrl,
    ca_file: Option<&Path>,
    name: &str,
    deadline: Duration,
) -> Result<Connection, AmqpError> {
    let failed = |message: String| AmqpError::Connect {
        url: url.to_string(),
        message: message.replace(url.expose(), &url.to_string()),
    };
    let uri = amqp_uri(url).map_err(|e| failed(format!("invalid AMQP URL: {e}")))?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = match ca_file {
        None => lapin::tcp::OwnedTLSConfig::default(),
        Some(path) => lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|source| {
                AmqpError::CaFile {
                    path: path.to_owned(),
                    source,
                }
            })?),
        },
    };
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| AmqpError::Runtime(e.to_string()))?;
    // Dropping the attempt at the deadline ends it (patches/lapin): its socket closes.
    match tokio::time::timeout(
        deadline,
        Connection::connect_uri_with_config(uri, props, tls, runtime),
    )
    .await
    {
        Ok(connected) => connected.map_err(|e| failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {deadline:?}"))),
    }
}

/// At most this many channels share one connection (fewer if the broker's `channel_max`
/// is lower): 1,000 mappings on one broker take 4 connections, which spreads their
/// traffic over as many I/O threads and TCP streams while staying far inside the
/// broker's file descriptors.
pub const CHANNELS_PER_CONNECTION: usize = 256;

/// The process's shared AMQP connections, by broker URL and CA file. Cheap to clone:
/// clones share the connections.
#[derive(Clone, Default)]
pub struct Pool(Arc<Mutex<HashMap<Key, Arc<Broker>>>>);

/// What makes two connections interchangeable: the whole URL (host, port, credentials,
/// vhost, TLS parameters), the CA file, and what the connection is for. Consumers and
/// publishers never share one: a broker under a resource alarm (memory, disk) stops
/// reading from a connection as soon as it publishes, and every consumer's acks on it
/// would wait with the publish, holding their queues full while the broker needs them
/// drained (RabbitMQ's own advice: separate connections to publish and to consume).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    url: String,
    ca_file: Option<PathBuf>,
    purpose: String,
}

/// The connections to one broker. The async lock serialises opening connections, so
/// that a thousand mappings reconnecting after an outage open one connection, not a
/// thousand; it also orders giving a connection back against leasing it.
#[derive(Default)]
struct Broker {
    connections: tokio::sync::Mutex<Vec<Arc<Shared>>>,
    opened: AtomicU64,
}

/// One connection and the number of channels leased on it.
struct Shared {
    connection: Connection,
    leases: Mutex<usize>,
    capacity: usize,
}

impl Shared {
    fn leases(&self) -> std::sync::MutexGuard<'_, usize> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A channel leased from the pool. Dropping it gives the channel's slot back; the
/// connection closes once no lease is left on it. Close the channel first
/// ([`Lease::close`]) to hand its unacknowledged deliveries back at once.
pub struct Lease {
    pub channel: Channel,
    shared: Arc<Shared>,
    broker: Arc<Broker>,
}

impl Pool {
    /// A new channel on a shared connection to `url`, opening a connection if none has
    /// room. `purpose` ("consumers", "on-failure") keeps connections of different uses
    /// apart and names new ones (the broker shows it).
    pub async fn channel(
        &self,
        url: &SecretUrl,
        ca_file: Option<&Path>,
        purpose: &str,
    ) -> Result<Lease, AmqpError> {
        let key = Key {
            url: url.expose().to_owned(),
            ca_file: ca_file.map(Path::to_owned),
            purpose: purpose.to_owned(),
        };
        let broker = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        let mut connections = broker.connections.lock().await;
        // Connections that failed stay out; their channels are failing with them.
        connections.retain(|s| s.connection.status().connected());
        let roomy = connections.iter().find(|s| *s.leases() < s.capacity);
        let shared = match roomy {
            Some(s) => s.clone(),
            None => {
                let n = broker.opened.fetch_add(1, Ordering::Relaxed) + 1;
                // The broker shows the name: which gateway process, what for, which one.
                let name = format!("esm-gateway[{}] {purpose} #{n}", std::process::id());
                let connection = connect(url, ca_file, &name).await?;
                let max = usize::from(connection.configuration().channel_max());
                let capacity = if max == 0 {
                    CHANNELS_PER_CONNECTION
                } else {
                    max.min(CHANNELS_PER_CONNECTION)
                };
                tracing::debug!(url = %url, connection = n, capacity, "AMQP connection opened");
                let s = Arc::new(Shared {
                    connection,
                    leases: Mutex::new(0),
                    capacity,
                });
                connections.push(s.clone());
                s
            }
        };
        // Counted before the channel opens, under the lock: a concurrent give-back
        // cannot close the connection under this lease.
        *shared.leases() += 1;
        drop(connections);
        let lease = |channel| Lease {
            channel,
            shared: shared.clone(),
            broker: broker.clone(),
        };
        match shared.connection.create_channel().await {
            Ok(channel) => Ok(lease(channel)),
            Err(e) => {
                // Gives the slot back (and closes an unused connection).
                give_back(shared.clone(), broker.clone()).await;
                Err(AmqpError::Channel {
                    url: url.to_string(),
                    message: e.to_string(),
                })
            }
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("amqp::Pool")
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Closes the channel: the broker requeues its unacknowledged deliveries, in order.
    pub async fn close(&self, reason: &str) {
        if let Err(e) = self.channel.close(200, reason.into()).await {
            tracing::debug!(error = %e, "closing the channel");
        }
    }
}

impl Drop for Lease {
    /// A channel still open is closed first, so that no consumer outlives its session
    /// on the shared connection (its deliveries go back to the queue).
    fn drop(&mut self) {
        let channel = self.channel.clone();
        let (shared, broker) = (self.shared.clone(), self.broker.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            *shared.leases() -= 1;
            return;
        };
        runtime.spawn(async move {
            if channel.status().connected()
                && let Err(e) = channel.close(200, "esm-gateway session ended".into()).await
            {
                tracing::debug!(error = %e, "closing a channel given back");
            }
            give_back(shared, broker).await;
        });
    }
}

/// Counts a lease off its connection; the last one closes it, under the broker's lock so
/// that no lease can take it meanwhile.
async fn give_back(shared: Arc<Shared>, broker: Arc<Broker>) {
    let mut connections = broker.connections.lock().await;
    let left = {
        let mut leases = shared.leases();
        *leases -= 1;
        *leases
    };
    if left > 0 {
        return;
    }
    connections.retain(|s| !Arc::ptr_eq(s, &shared));
    drop(connections);
    if shared.connection.status().connected()
        && let Err(e) = shared
            .connection
            .close(200, "esm-gateway: no mapping uses it".into())
            .await
    {
        tracing::debug!(error = %e, "closing an unused AMQP connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(url: &str) -> AMQPUri {
        amqp_uri(&SecretUrl::new(url.to_owned())).unwrap()
    }

    #[test]
    fn a_url_without_heartbeat_or_connect_timeout_gets_the_gateway_defaults() {
        let u = uri("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(u.query.heartbeat, Some(DEFAULT_HEARTBEAT));
        assert_eq!(u.query.connection_timeout, Some(10_000));
    }

    #[test]
    fn a_url_that_sets_them_keeps_its_own_even_zero() {
        let u = uri("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=0&connection_timeout=2500");
        assert_eq!(u.query.heartbeat, Some(0), "heartbeats turned off stay off");
        assert_eq!(u.query.connection_timeout, Some(2500));
    }

    #[tokio::test]
    async fn a_broker_that_never_answers_is_given_up_at_the_deadline_without_the_password() {
        // Accepted by the kernel, never answered.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = SecretUrl::new(format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"));
        let deadline = Duration::from_millis(200);
        let e = connect_within(&url, None, "test", deadline)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer within 200ms"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
