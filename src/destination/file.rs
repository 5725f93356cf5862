//! The local JSON-lines destination: one failure record per line, fsynced per write,
//! rotated by size (`path` → `path.1` → … → `path.<keep>`).

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::DestinationError;
use crate::config;

#[derive(Debug)]
pub struct FileDestination {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    keep: u32,
    /// Serialises writers so that lines never interleave.
    file: Mutex<Option<tokio::fs::File>>,
}

impl FileDestination {
    pub fn new(c: &config::FileDestination) -> Self {
        FileDestination {
            path: c.path.clone(),
            rotate_bytes: c.rotate_bytes,
            keep: c.keep.unwrap_or(5),
            file: Mutex::new(None),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let mut guard = self.file.lock().await;
        let result = async {
            if let (Some(limit), Some(f)) = (self.rotate_bytes, guard.as_ref())
                && f.metadata().await?.len() >= limit
            {
                *guard = None;
                self.rotate().await?;
            }
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

    async fn rotate(&self) -> std::io::Result<()> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let _ = tokio::fs::remove_file(numbered(self.keep.max(1))).await;
        for n in (1..self.keep.max(1)).rev() {
            let _ = tokio::fs::rename(numbered(n), numbered(n + 1)).await;
        }
        tokio::fs::rename(&self.path, numbered(1)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotates_by_size_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failed.jsonl");
        let d = FileDestination::new(&config::FileDestination {
            path: path.clone(),
            rotate_bytes: Some(20),
            keep: Some(2),
        });
        for i in 0..5 {
            d.write(format!("{{\"record\":{i:08}}}").as_bytes())
                .await
                .unwrap();
        }
        let read =
            |suffix: &str| std::fs::read_to_string(format!("{}{suffix}", path.display())).unwrap();
        assert_eq!(read(""), "{\"record\":00000004}\n");
        assert_eq!(read(".1"), "{\"record\":00000003}\n");
        assert_eq!(read(".2"), "{\"record\":00000002}\n");
        assert!(!std::path::Path::new(&format!("{}.3", path.display())).exists());
    }
}
