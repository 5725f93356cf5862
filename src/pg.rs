//! What the gateway's two PostgreSQL stores share (the API's records, the schedules'
//! fires): creating their tables when several replicas start at once, and giving up a
//! connection that leaves a query unanswered.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc};
use tokio::task::AbortHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::env::SecretUrl;

/// Longest wait for a connection to open or a query to be answered.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Opens a connection to `url` within the [`DEADLINE`] (also tokio-postgres's own
/// connect timeout, unless the URL sets one) and spawns its driver, which sends the
/// payload of each notification the connection receives to `notes`, when given. An error
/// is text without the password.
pub async fn connect(
    url: &SecretUrl,
    notes: Option<mpsc::UnboundedSender<String>>,
) -> Result<Pg, String> {
    let mut config: tokio_postgres::Config =
        url.expose().parse().map_err(|e: tokio_postgres::Error| {
            e.to_string().replace(url.expose(), &url.to_string())
        })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEADLINE);
    }
    let (client, mut connection) = tokio::time::timeout(DEADLINE, config.connect(NoTls))
        .await
        .map_err(|_| format!("no answer within {DEADLINE:?}"))?
        .map_err(|e| e.to_string())?;
    let shown = url.to_string();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Some(notes) = &notes {
                        let _ = notes.send(n.payload().to_owned());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(store = %shown, error = %e, "PostgreSQL store connection lost");
                    return;
                }
            }
        }
    });
    Ok(Pg {
        client,
        driver: driver.abort_handle(),
    })
}

/// A store's connection: its client, and its driver task. Derefs to the client.
/// Dropping it ends the driver, which closes the socket: a driver left alone after its
/// client is gone waits for any unanswered reply for as long as the socket lives.
pub struct Pg {
    client: Client,
    driver: AbortHandle,
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl std::ops::Deref for Pg {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Runs `query`, sent on `client`, the store's shared connection in `slot`, within the
/// [`DEADLINE`]. None when no answer came: the connection may be dead without knowing it
/// (a peer that vanished sends no reset, and a middlebox may keep answering TCP
/// keepalive), so `slot` is emptied if it still holds `client`, and the next query opens
/// another connection. The given-up connection's driver is ended at once, which closes
/// its socket, whoever else still holds it.
pub async fn answered<T>(
    slot: &Mutex<Option<Arc<Pg>>>,
    client: &Arc<Pg>,
    query: impl Future<Output = T>,
) -> Option<T> {
    match tokio::time::timeout(DEADLINE, query).await {
        Ok(r) => Some(r),
        Err(_) => {
            client.driver.abort();
            let mut slot = slot.lock().await;
            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
                *slot = None;
            }
            None
        }
    }
}

/// Runs `ddl`, statements that create what is missing (`CREATE TABLE IF NOT EXISTS`,
/// `ADD COLUMN IF NOT EXISTS`). Two replicas running them at once can both find the table
/// missing; one then loses the race on the catalog's unique index, and what it was to
/// create exists all the same: that error counts as success.
pub async fn create_missing(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    match client.batch_execute(ddl).await {
        Err(e)
            if [
                SqlState::UNIQUE_VIOLATION,
                SqlState::DUPLICATE_TABLE,
                SqlState::DUPLICATE_COLUMN,
            ]
            .iter()
            .any(|c| e.code() == Some(c)) =>
        {
            Ok(())
        }
        r => r,
    }
}
