//! Where the API's mappings live between restarts. By default one JSON file in
//! `[api] state_dir`, replaced atomically on every change (written to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced), so that a crash leaves
//! the old set or the new one, never a torn file. With `[api] store`, a PostgreSQL table
//! (`postgres.rs`) that several replicas share. Either holds the mappings' AWS fields and
//! tags only: credentials are named (`[[broker]]`), never stored.
//!
//! The records are also held in memory: reads never wait on the disk or the database, and
//! a change is in memory only once the backend holds it. A shared table changes under
//! this replica too: [`Store::reload`] reads it again and says what another replica
//! changed.

pub mod postgres;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::wire::Record;

/// The file's name in the state directory.
pub const FILE: &str = "api-mappings.json";

/// What a store holds: records with a key.
pub trait Keyed: Clone + PartialEq + Serialize + DeserializeOwned {
    fn key(&self) -> &str;
}

impl Keyed for Record {
    fn key(&self) -> &str {
        &self.uuid
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the API's mappings from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a file of API mappings: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write the API's mappings to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
}

/// A store that cannot be read or written fails the request as AWS's 500
/// `ServiceException`, naming what failed.
impl From<StoreError> for super::wire::AwsError {
    fn from(e: StoreError) -> Self {
        super::wire::AwsError::service(e.to_string())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File<R> {
    version: u32,
    mappings: Vec<R>,
}

/// Where the records are kept.
enum Backend {
    /// The state file at this path, rewritten whole on each change.
    File(PathBuf),
    /// A table of the shared database, one row per record.
    Postgres(postgres::Table),
}

/// One record another replica changed: `before` and `after` it (none: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<R> {
    pub key: String,
    pub before: Option<R>,
    pub after: Option<R>,
}

/// The API's records by key, mirrored in the backend.
pub struct Store<R = Record> {
    backend: Backend,
    records: Mutex<BTreeMap<String, R>>,
    /// Held across a change, so that two changes reach the backend and memory in one
    /// order (the file is rewritten from the set in memory).
    writing: tokio::sync::Mutex<()>,
}

impl<R: Keyed> Store<R> {
    /// Opens the store of `dir` (created if missing), reading the mappings it holds.
    pub fn open(dir: &Path) -> Result<Store<R>, StoreError> {
        Self::open_file(dir, FILE)
    }

    /// Opens the store kept in `dir`/`file`.
    pub fn open_file(dir: &Path, file: &str) -> Result<Store<R>, StoreError> {
        let path = dir.join(file);
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let records = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: File<R> =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                by_key(file.mappings)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(Self::with(Backend::File(path), records))
    }

    /// Opens the store kept in `table` of `db` (created if missing), reading its records.
    pub async fn open_postgres(db: Arc<postgres::Db>, table: &str) -> Result<Store<R>, StoreError> {
        let table = postgres::Table::open(db, table).await?;
        let records = by_key(table.all().await?);
        Ok(Self::with(Backend::Postgres(table), records))
    }

    fn with(backend: Backend, records: BTreeMap<String, R>) -> Store<R> {
        Store {
            backend,
            records: Mutex::new(records),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn all(&self) -> Vec<R> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, uuid: &str) -> Option<R> {
        self.lock().get(uuid).cloned()
    }

    /// Adds or replaces a record; returns once the backend holds it. On an error
    /// nothing changed.
    pub async fn put(&self, record: R) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        match &self.backend {
            Backend::File(path) => {
                let mut next = self.lock().clone();
                next.insert(record.key().to_owned(), record.clone());
                write(path, &next)?;
            }
            Backend::Postgres(table) => table.put(record.key(), &record).await?,
        }
        self.lock().insert(record.key().to_owned(), record);
        Ok(())
    }

    /// Removes a record; returns it once the backend no longer holds it. On an error
    /// nothing changed.
    pub async fn remove(&self, uuid: &str) -> Result<Option<R>, StoreError> {
        let _writing = self.writing.lock().await;
        let Some(removed) = self.get(uuid) else {
            return Ok(None);
        };
        match &self.backend {
            Backend::File(path) => {
                let mut next = self.lock().clone();
                next.remove(uuid);
                write(path, &next)?;
            }
            Backend::Postgres(table) => table.remove(uuid).await?,
        }
        self.lock().remove(uuid);
        Ok(Some(removed))
    }

    /// Reads a shared store again and returns what changed since this replica last
    /// looked (nothing for a file, which only this process writes).
    pub async fn reload(&self) -> Result<Vec<Change<R>>, StoreError> {
        let Backend::Postgres(table) = &self.backend else {
            return Ok(Vec::new());
        };
        let _writing = self.writing.lock().await;
        let fresh = by_key(table.all().await?);
        let mut records = self.lock();
        let mut changes: Vec<Change<R>> = fresh
            .iter()
            .filter(|(k, r)| records.get(*k) != Some(*r))
            .map(|(k, r)| Change {
                key: k.clone(),
                before: records.get(k).cloned(),
                after: Some(r.clone()),
            })
            .collect();
        changes.extend(
            records
                .iter()
                .filter(|(k, _)| !fresh.contains_key(*k))
                .map(|(k, r)| Change {
                    key: k.clone(),
                    before: Some(r.clone()),
                    after: None,
                }),
        );
        *records = fresh;
        Ok(changes)
    }

    /// Puts `change` back as not yet seen, so that the next [`Store::reload`] reports it
    /// again: the runtime could not apply it.
    pub fn unsee(&self, change: Change<R>) {
        let mut records = self.lock();
        match change.before {
            Some(r) => records.insert(change.key, r),
            None => records.remove(&change.key),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, R>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn by_key<R: Keyed>(records: Vec<R>) -> BTreeMap<String, R> {
    records
        .into_iter()
        .map(|r| (r.key().to_owned(), r))
        .collect()
}

/// Replaces the file at `path`: temporary file, fsync, rename, directory fsync.
fn write<R: Keyed>(path: &Path, records: &BTreeMap<String, R>) -> Result<(), StoreError> {
    let failed = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let file = File {
        version: 1,
        mappings: records.values().cloned().collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("records serialize");
    crate::durable::replace(path, &path.with_extension("json.tmp"), &bytes).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::Spec;

    #[tokio::test]
    async fn records_survive_a_reopen_and_removals_too() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store = Store::open(dir.path()).unwrap();
        let record = |uuid: &str| Record {
            uuid: uuid.into(),
            spec: Spec {
                function_name: "f".into(),
                batch_size: Some(7),
                ..Spec::default()
            },
            last_modified: 1.5,
            tags: [("team".to_owned(), "a".to_owned())].into(),
        };
        store.put(record("a")).await.unwrap();
        store.put(record("b")).await.unwrap();
        assert_eq!(store.remove("a").await.unwrap(), Some(record("a")));
        assert_eq!(store.remove("a").await.unwrap(), None);
        let again: Store = Store::open(dir.path()).unwrap();
        assert_eq!(again.all(), vec![record("b")]);
        assert!(!dir.path().join("api-mappings.json.tmp").exists());
    }
}
