//! The API's records in PostgreSQL (`[api] store`), for replicas that share one set of
//! mappings: a table per kind of record, one row per record (its key, its JSON body, a
//! version counted up by each change and the time of the last one). Each change is one
//! statement, so it is committed whole or not at all, and it notifies [`CHANNEL`] in
//! the same transaction: the other replicas hear of it once it is committed, and read
//! the table again.
//!
//! One connection for the queries, opened on first use and reopened after it breaks
//! (tokio-postgres pipelines concurrent queries over it); [`Db::listen`] opens another
//! that only listens. Connecting and each query have a deadline, so an unreachable
//! database turns a change request into an error instead of a hang.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, mpsc};

use crate::env::SecretUrl;
use crate::pg::{DEADLINE, Pg};

/// The channel every change notifies, with the table's name as payload.
pub const CHANNEL: &str = "esm_gateway_api";

/// The table of the API's event source mappings.
pub const MAPPINGS: &str = "esm_gateway_api_mappings";

/// The table of the Scheduler API's schedules.
pub const SCHEDULES: &str = "esm_gateway_api_schedules";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("the API's store {url} is unreachable: {message}")]
    Connect { url: String, message: String },
    #[error("the API's store {url}, table {table}: {message}")]
    Query {
        url: String,
        table: String,
        message: String,
    },
    #[error(
        "the API's store {url}, table {table}: the record {key:?} is not one the API wrote: {message}"
    )]
    Parse {
        url: String,
        table: String,
        key: String,
        message: String,
    },
}

/// The database of `[api] store`.
pub struct Db {
    url: SecretUrl,
    client: Mutex<Option<Arc<Pg>>>,
}

impl Db {
    /// Connects lazily: nothing happens until the first query.
    pub fn new(url: &SecretUrl) -> Db {
        Db {
            url: url.clone(),
            client: Mutex::new(None),
        }
    }

    /// The URL as logs may show it (no password).
    pub fn shown(&self) -> String {
        self.url.to_string()
    }

    /// A new connection (see [`crate::pg::connect`]): notifications it receives are sent
    /// to `notes` when given.
    async fn connect(&self, notes: Option<mpsc::UnboundedSender<String>>) -> Result<Pg, PgError> {
        crate::pg::connect(&self.url, notes)
            .await
            .map_err(|message| PgError::Connect {
                url: self.shown(),
                message,
            })
    }

    /// The shared query connection, reopened if it broke.
    async fn client(&self) -> Result<Arc<Pg>, PgError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let client = Arc::new(self.connect(None).await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `query` on the shared connection, within the [`DEADLINE`]; an error names
    /// `table`. A query that gets no answer drops the connection: it may be dead without
    /// knowing it (a peer that vanished sends no reset), and the next query opens another.
    async fn query<T, F>(&self, table: &str, query: impl FnOnce(Arc<Pg>) -> F) -> Result<T, PgError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        let failed = |message| PgError::Query {
            url: self.shown(),
            table: table.to_owned(),
            message,
        };
        match crate::pg::answered(&self.client, &client, query(client.clone())).await {
            Some(r) => r.map_err(|e| failed(describe(&e))),
            None => Err(failed(format!("no answer within {DEADLINE:?}"))),
        }
    }

    /// A connection that listens on [`CHANNEL`], and the payloads it hears (the names of
    /// the tables changed); the receiver ends when the connection does.
    pub async fn listen(&self) -> Result<(Pg, mpsc::UnboundedReceiver<String>), PgError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self.connect(Some(tx)).await?;
        let sql = format!("LISTEN {CHANNEL}");
        let listen = client.batch_execute(&sql);
        let failed = |message| PgError::Connect {
            url: self.shown(),
            message,
        };
        tokio::time::timeout(DEADLINE, listen)
            .await
            .map_err(|_| failed(format!("no answer within {DEADLINE:?}")))?
            .map_err(|e| failed(describe(&e)))?;
        Ok((client, rx))
    }
}

/// A query's error as text: the server's own message when it sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

/// One table of records in [`Db`].
pub struct Table {
    db: Arc<Db>,
    name: String,
}

impl Table {
    /// The table `name` of `db`, created if missing.
    pub async fn open(db: Arc<Db>, name: &str) -> Result<Table, PgError> {
        let table = Table {
            db,
            name: name.to_owned(),
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {name} (
                key     text        PRIMARY KEY,
                body    jsonb       NOT NULL,
                version bigint      NOT NULL DEFAULT 1,
                updated timestamptz NOT NULL DEFAULT now()
            )"
        );
        table
            .db
            .query(name, |c| async move {
                crate::pg::create_missing(&c, &ddl).await
            })
            .await?;
        Ok(table)
    }

    /// Every record of the table.
    pub async fn all<R: DeserializeOwned>(&self) -> Result<Vec<R>, PgError> {
        let sql = format!("SELECT key, body::text FROM {} ORDER BY key", self.name);
        let rows = self
            .db
            .query(&self.name, |c| async move { c.query(&sql, &[]).await })
            .await?;
        rows.iter()
            .map(|row| {
                let key: String = row.get(0);
                let body: String = row.get(1);
                serde_json::from_str(&body).map_err(|e| PgError::Parse {
                    url: self.db.shown(),
                    table: self.name.clone(),
                    key,
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Inserts or replaces the record of `key`, and notifies the other replicas.
    pub async fn put<R: Serialize>(&self, key: &str, record: &R) -> Result<(), PgError> {
        let body = serde_json::to_string(record).expect("records serialize");
        let sql = format!(
            "WITH w AS (
                INSERT INTO {t} AS r (key, body) VALUES ($1, $2::text::jsonb)
                ON CONFLICT (key) DO UPDATE
                    SET body = EXCLUDED.body, version = r.version + 1, updated = now()
                RETURNING 1
            )
            SELECT pg_notify('{CHANNEL}', '{t}') FROM w",
            t = self.name
        );
        self.db
            .query(&self.name, |c| async move {
                c.execute(&sql, &[&key, &body]).await
            })
            .await
            .map(drop)
    }

    /// Deletes the record of `key` (if there is one), and notifies the other replicas.
    pub async fn remove(&self, key: &str) -> Result<(), PgError> {
        let sql = format!(
            "WITH d AS (DELETE FROM {t} WHERE key = $1 RETURNING 1)
            SELECT pg_notify('{CHANNEL}', '{t}') FROM d",
            t = self.name
        );
        self.db
            .query(
                &self.name,
                |c| async move { c.execute(&sql, &[&key]).await },
            )
            .await
            .map(drop)
    }
}
