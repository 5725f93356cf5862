//! The local JSON-lines destination: one failure record per line, fsynced per write.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::DestinationError;
use crate::config;

#[derive(Debug)]
pub struct FileDestination {
    path: PathBuf,
    /// Serialises writers so that lines never interleave.
    file: Mutex<Option<tokio::fs::File>>,
}

impl FileDestination {
    pub fn new(c: &config::FileDestination) -> Self {
        FileDestination {
            path: c.path.clone(),
            file: Mutex::new(None),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let mut guard = self.file.lock().await;
        let result = async {
            if guard.is_none() {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?;
                *guard = Some(f);
            }
            let f = guard.as_mut().expect("opened above");
            let mut line = Vec::with_capacity(record.len() + 1);
            line.extend_from_slice(record);
            line.push(b'\n');
            f.write_all(&line).await?;
            f.sync_data().await
        }
        .await;
        result.map_err(|source| {
            // Reopen next time: the file may have been moved or its disk remounted.
            *guard = None;
            DestinationError::File {
                path: self.path.clone(),
                source,
            }
        })
    }
}
