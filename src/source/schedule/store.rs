//! The PostgreSQL ledger of schedule fires: one row per (schedule, scheduled time).
//!
//! A replica fires a tick only if its `INSERT … ON CONFLICT DO NOTHING` inserted the row,
//! so each tick fires once however many replicas compute it. The rows are also the
//! history the missed-fire policy reads at start-up. One connection, opened on first use
//! and reopened after it breaks; tokio-postgres pipelines concurrent claims over it. The
//! table is created if missing.

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::config::SecretUrl;

const TABLE: &str = "CREATE TABLE IF NOT EXISTS esm_gateway_schedule_fires (
    schedule       text        NOT NULL,
    scheduled_time timestamptz NOT NULL,
    fired_at       timestamptz NOT NULL DEFAULT now(),
    owner          text        NOT NULL,
    PRIMARY KEY (schedule, scheduled_time)
)";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("schedule store {url} is unreachable: {message}")]
    Connect { url: String, message: String },
    #[error("schedule store {url}: {message}")]
    Query { url: String, message: String },
}

pub struct Store {
    url: SecretUrl,
    /// Who claimed a row (host:pid), for people reading the table.
    owner: String,
    client: Mutex<Option<std::sync::Arc<Client>>>,
}

impl Store {
    /// Connects lazily: nothing happens until the first claim.
    pub fn new(url: &SecretUrl) -> Store {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Store {
            url: url.clone(),
            owner: format!("{host}:{}", std::process::id()),
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<std::sync::Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let (client, connection) = tokio_postgres::connect(self.url.expose(), NoTls)
            .await
            .map_err(|e| StoreError::Connect {
                url: self.url.to_string(),
                message: e.to_string(),
            })?;
        let url = self.url.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(store = %url, error = %e, "schedule store connection lost");
            }
        });
        if let Err(e) = client.batch_execute(TABLE).await {
            // Two replicas creating the table at once: one loses the race on the
            // catalog's unique index, and the table exists all the same.
            let raced = e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                || e.code() == Some(&SqlState::DUPLICATE_TABLE);
            if !raced {
                return Err(self.query_error(e));
            }
        }
        let client = std::sync::Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    fn query_error(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Query {
            url: self.url.to_string(),
            message: e.to_string(),
        }
    }

    /// True if this process won the tick and must fire it.
    pub async fn claim(&self, schedule: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "INSERT INTO esm_gateway_schedule_fires (schedule, scheduled_time, owner) \
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&schedule, &at, &self.owner],
            )
            .await
            .map_err(|e| self.query_error(e))?;
        Ok(n == 1)
    }

    /// The latest scheduled time fired for `schedule`, if any.
    pub async fn last_fired(&self, schedule: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT max(scheduled_time) FROM esm_gateway_schedule_fires WHERE schedule = $1",
                &[&schedule],
            )
            .await
            .map_err(|e| self.query_error(e))?;
        Ok(row.get(0))
    }

    /// Deletes rows scheduled before `before`; returns how many.
    pub async fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM esm_gateway_schedule_fires WHERE scheduled_time < $1",
            &[&before],
        )
        .await
        .map_err(|e| self.query_error(e))
    }
}
