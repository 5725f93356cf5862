//! Where the API's mappings live between restarts: one JSON file in `[api] state_dir`,
//! replaced atomically on every change (written to a temporary file, fsynced, renamed
//! over the old one, and the directory fsynced), so that a crash leaves the old set or
//! the new one, never a torn file. It holds the mappings' AWS fields and tags only:
//! credentials are named (`[[broker]]`), never stored.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::wire::Record;

/// The file's name in the state directory.
pub const FILE: &str = "api-mappings.json";

/// What a store holds: records with a key.
pub trait Keyed: Clone + Serialize + DeserializeOwned {
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
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File<R> {
    version: u32,
    mappings: Vec<R>,
}

/// The API's mappings by UUID, mirrored in the state file.
pub struct Store<R = Record> {
    path: PathBuf,
    records: Mutex<BTreeMap<String, R>>,
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
                file.mappings
                    .into_iter()
                    .map(|r| (r.key().to_owned(), r))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(Store {
            path,
            records: Mutex::new(records),
        })
    }

    pub fn all(&self) -> Vec<R> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, uuid: &str) -> Option<R> {
        self.lock().get(uuid).cloned()
    }

    /// Adds or replaces a record; returns once the file holds it.
    pub fn put(&self, record: R) -> Result<(), StoreError> {
        let mut records = self.lock();
        let mut next = records.clone();
        next.insert(record.key().to_owned(), record);
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    /// Removes a record; returns it once the file no longer holds it.
    pub fn remove(&self, uuid: &str) -> Result<Option<R>, StoreError> {
        let mut records = self.lock();
        let mut next = records.clone();
        let removed = next.remove(uuid);
        if removed.is_some() {
            self.write(&next)?;
            *records = next;
        }
        Ok(removed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, R>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the file: temporary file, fsync, rename, directory fsync.
    fn write(&self, records: &BTreeMap<String, R>) -> Result<(), StoreError> {
        let failed = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let file = File {
            version: 1,
            mappings: records.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("records serialize");
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(failed)?;
        f.write_all(&bytes).map_err(failed)?;
        f.sync_all().map_err(failed)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(failed)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(failed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::Spec;

    #[test]
    fn records_survive_a_reopen_and_removals_too() {
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
        store.put(record("a")).unwrap();
        store.put(record("b")).unwrap();
        assert_eq!(store.remove("a").unwrap(), Some(record("a")));
        assert_eq!(store.remove("a").unwrap(), None);
        let again: Store = Store::open(dir.path()).unwrap();
        assert_eq!(again.all(), vec![record("b")]);
        assert!(!dir.path().join("api-mappings.json.tmp").exists());
    }
}
