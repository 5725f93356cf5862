//! The PostgreSQL ledger of schedule fires: one row per (schedule, scheduled time).
//!
//! A row is a claim and a lease. A replica fires a tick only if its insert made the row
//! (or found a row of its own execution id and owner: a claim whose reply was lost is
//! still ours). The owner renews `lease_until` while the fire retries and sets
//! `finished_at` when the fire is delivered, parked or dropped; a row left unfinished
//! with its lease expired (the owner crashed, or released it on shutdown) is taken over
//! by the next replica that looks, which resumes the fire under the same execution id.
//! The rows are also the history the missed-fire policy reads at start-up. One
//! connection, opened on first use and reopened after it breaks; tokio-postgres
//! pipelines concurrent queries over it. The table is created if missing, and a table of
//! an earlier version gets the lease columns added (its rows, with no lease, count as
//! finished).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;

use crate::env::SecretUrl;
use crate::pg::{DEADLINE, Pg};

const TABLE: &str = "CREATE TABLE IF NOT EXISTS esm_gateway_schedule_fires (
    schedule       text        NOT NULL,
    scheduled_time timestamptz NOT NULL,
    fired_at       timestamptz NOT NULL DEFAULT now(),
    owner          text        NOT NULL,
    PRIMARY KEY (schedule, scheduled_time)
)";

/// The lease columns, added to a ledger created by an earlier version.
const MIGRATE: &str = "ALTER TABLE esm_gateway_schedule_fires
    ADD COLUMN IF NOT EXISTS execution_id text,
    ADD COLUMN IF NOT EXISTS lease_until  timestamptz,
    ADD COLUMN IF NOT EXISTS finished_at  timestamptz";

/// `now()` plus the lease (bound as float seconds).
const LEASE_END: &str = "now() + make_interval(secs => $LEASE::float8)";

/// A fire some replica claimed and did not finish, whose lease expired: now ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub scheduled: DateTime<Utc>,
    pub execution_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("schedule store {url} is unreachable: {message}")]
    Connect { url: String, message: String },
    #[error("schedule store {url}: {message}")]
    Query { url: String, message: String },
}

pub struct Store {
    url: SecretUrl,
    /// This replica (host:pid and a random suffix, since two containers may both run as
    /// pid 1 on hosts of one name): a lease is renewed, released or taken by owner.
    owner: String,
    /// How long a claim stays this replica's without a renewal.
    lease: Duration,
    /// Fires this process is delivering: a lease that expired while the store was
    /// unreachable comes back to this same owner, and must not start a second delivery.
    running: Arc<std::sync::Mutex<HashSet<FireKey>>>,
    client: Mutex<Option<Arc<Pg>>>,
}

/// (schedule, scheduled time): one fire.
type FireKey = (String, DateTime<Utc>);

/// A fire this process is delivering (see [`Store::deliver_once`]).
pub struct Running {
    set: Arc<std::sync::Mutex<HashSet<FireKey>>>,
    key: FireKey,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

impl Store {
    /// Connects lazily: nothing happens until the first claim.
    pub fn new(url: &SecretUrl, lease: Duration) -> Store {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Store {
            url: url.clone(),
            owner: format!(
                "{host}:{}:{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease,
            running: Arc::default(),
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<Pg>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let failed = |message| StoreError::Connect {
            url: self.url.to_string(),
            message,
        };
        let client = crate::pg::connect(&self.url, None).await.map_err(failed)?;
        for ddl in [TABLE, MIGRATE] {
            tokio::time::timeout(DEADLINE, crate::pg::create_missing(&client, ddl))
                .await
                .map_err(|_| failed(format!("no answer within {DEADLINE:?}")))?
                .map_err(|e| self.query_error(e))?;
        }
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `query` on the shared connection within the [`DEADLINE`]; a query left
    /// unanswered drops the connection (see [`crate::pg::answered`]).
    async fn run<T, F>(&self, query: impl FnOnce(Arc<Pg>) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match crate::pg::answered(&self.client, &client, query(client.clone())).await {
            Some(r) => r.map_err(|e| self.query_error(e)),
            None => Err(StoreError::Query {
                url: self.url.to_string(),
                message: format!("no answer within {DEADLINE:?}"),
            }),
        }
    }

    fn query_error(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Query {
            url: self.url.to_string(),
            message: e.to_string(),
        }
    }

    /// Marks a fire as being delivered by this process until the guard drops; None if it
    /// already is.
    pub fn deliver_once(&self, schedule: &str, at: DateTime<Utc>) -> Option<Running> {
        let key = (schedule.to_owned(), at);
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(key.clone()).then(|| Running {
            set: self.running.clone(),
            key,
        })
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    /// True if this process won the tick and must fire it. Claiming again with the same
    /// execution id (the reply to the first try was lost) finds our own row: true again.
    pub async fn claim(
        &self,
        schedule: &str,
        at: DateTime<Utc>,
        execution_id: &str,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO esm_gateway_schedule_fires AS f (schedule, scheduled_time, owner, execution_id, lease_until) \
             VALUES ($1, $2, $3, $4, {}) \
             ON CONFLICT (schedule, scheduled_time) DO UPDATE SET lease_until = EXCLUDED.lease_until \
             WHERE f.execution_id = EXCLUDED.execution_id AND f.owner = EXCLUDED.owner AND f.finished_at IS NULL",
            LEASE_END.replace("$LEASE", "$5")
        );
        let lease = self.lease_secs();
        let params: [&(dyn ToSql + Sync); 5] = [&schedule, &at, &self.owner, &execution_id, &lease];
        let n = self
            .run(|c| async move { c.execute(&sql, &params).await })
            .await?;
        Ok(n == 1)
    }

    /// Extends our lease on a fire still retrying; false if it is no longer ours
    /// (another replica took it over after the lease expired) or already finished.
    pub async fn renew(&self, schedule: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE esm_gateway_schedule_fires SET lease_until = {} \
             WHERE schedule = $1 AND scheduled_time = $2 AND owner = $3 AND finished_at IS NULL",
            LEASE_END.replace("$LEASE", "$4")
        );
        let lease = self.lease_secs();
        let params: [&(dyn ToSql + Sync); 4] = [&schedule, &at, &self.owner, &lease];
        let n = self
            .run(|c| async move { c.execute(&sql, &params).await })
            .await?;
        Ok(n == 1)
    }

    /// Marks a fire delivered, parked or dropped: nobody resumes it.
    pub async fn finish(&self, schedule: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.run(|c| async move {
            c.execute(
                "UPDATE esm_gateway_schedule_fires SET finished_at = now() \
                 WHERE schedule = $1 AND scheduled_time = $2 AND finished_at IS NULL",
                &[&schedule, &at],
            )
            .await
        })
        .await?;
        Ok(())
    }

    /// Ends our lease at once on a fire we stop before it finished (shutdown, reload,
    /// disable), so that the next replica to look resumes it without waiting.
    pub async fn release(&self, schedule: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.run(|c| async move {
            c.execute(
                "UPDATE esm_gateway_schedule_fires SET lease_until = now() \
                 WHERE schedule = $1 AND scheduled_time = $2 AND owner = $3 AND finished_at IS NULL",
                &[&schedule, &at, &self.owner],
            )
            .await
        })
        .await?;
        Ok(())
    }

    /// Takes over the unfinished fires of `schedule` whose lease expired, oldest first.
    /// Rows without a lease (written by an earlier version) count as finished.
    pub async fn take_over(&self, schedule: &str) -> Result<Vec<Orphan>, StoreError> {
        // Two replicas taking over at once: the row lock makes the second re-check the
        // lease after the first's update, and it no longer matches.
        let sql = format!(
            "UPDATE esm_gateway_schedule_fires SET owner = $2, lease_until = {} \
             WHERE schedule = $1 AND finished_at IS NULL AND lease_until IS NOT NULL AND lease_until <= now() \
             RETURNING scheduled_time, execution_id",
            LEASE_END.replace("$LEASE", "$3")
        );
        let lease = self.lease_secs();
        let params: [&(dyn ToSql + Sync); 3] = [&schedule, &self.owner, &lease];
        let rows = self
            .run(|c| async move { c.query(&sql, &params).await })
            .await?;
        let mut orphans: Vec<Orphan> = rows
            .iter()
            .map(|r| Orphan {
                scheduled: r.get(0),
                execution_id: r
                    .get::<_, Option<String>>(1)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            })
            .collect();
        orphans.sort_by_key(|o| o.scheduled);
        Ok(orphans)
    }

    /// The latest scheduled time fired for `schedule`, if any.
    pub async fn last_fired(&self, schedule: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .run(|c| async move {
                c.query_one(
                    "SELECT max(scheduled_time) FROM esm_gateway_schedule_fires WHERE schedule = $1",
                    &[&schedule],
                )
                .await
            })
            .await?;
        Ok(row.get(0))
    }

    /// Deletes rows scheduled before `before`; returns how many.
    pub async fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.run(|c| async move {
            c.execute(
                "DELETE FROM esm_gateway_schedule_fires WHERE scheduled_time < $1",
                &[&before],
            )
            .await
        })
        .await
    }
}
