//! The local JSON-lines destination: one failure record per line, fsynced per write,
//! rotated by size into `<path>.<n>` (n grows: the highest is the newest) and never
//! deleted. It also owns the file protocol `redrive` shares: the sidecar `<path>.lock`
//! that a writer holds while it appends or rotates and a redrive holds while it moves
//! the file aside, so that a record is never appended to a file a redrive already read.

use serde::Deserialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::DestinationError;
use crate::durable::parent;
pub(crate) use crate::durable::sync_dir;

/// `on_failure = { type = "file", … }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The JSON-lines file; created if missing (its directory must exist).
    #[serde(deserialize_with = "crate::env::expand_path")]
    pub path: PathBuf,
    /// Rotate when the file reaches this many bytes: it is renamed `<path>.<n>`, n one
    /// above the highest already there, and kept until an operator removes it (a
    /// redrive reads it too). Default: no rotation.
    pub rotate_bytes: Option<u64>,
    /// No longer accepted (refused at load): it removed the oldest rotated file, the only
    /// copy of records already acknowledged. Default: unset.
    pub keep: Option<u32>,
}

impl Config {
    pub fn problems(&self, mapping: &str, out: &mut Vec<String>) {
        if self.keep.is_some() {
            out.push(format!(
                "mapping {mapping:?}: on_failure.keep is no longer supported: rotated files are kept until an operator removes them \
                 (removing the oldest lost acknowledged records); remove keep"
            ));
        }
        if self.path.file_name().is_none() {
            out.push(format!(
                "mapping {mapping:?}: on_failure.path {} does not name a file",
                self.path.display()
            ));
        }
    }
}

#[derive(Debug)]
pub struct FileDestination {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    /// The open file; the async lock serialises writers so that lines never interleave,
    /// and the write itself runs on a blocking thread with every result checked (tokio's
    /// `File` reports a failed write only on the next call, after the record was acked).
    file: Arc<Mutex<Option<File>>>,
}

impl FileDestination {
    pub fn new(c: &Config) -> Self {
        FileDestination {
            path: c.path.clone(),
            rotate_bytes: c.rotate_bytes,
            file: Arc::new(Mutex::new(None)),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record);
        line.push(b'\n');
        let mut slot = self.file.clone().lock_owned().await;
        let path = self.path.clone();
        let rotate_bytes = self.rotate_bytes;
        tokio::task::spawn_blocking(move || {
            append(&path, rotate_bytes, &mut slot, &line).map_err(|source| {
                // Reopen next time: the file may have been moved or its disk remounted.
                *slot = None;
                DestinationError::File { path, source }
            })
        })
        .await
        .expect("the file write does not panic")
    }
}

/// Appends one line durably under the lock, rotating first when the file is full.
fn append(
    path: &Path,
    rotate_bytes: Option<u64>,
    slot: &mut Option<File>,
    line: &[u8],
) -> std::io::Result<()> {
    let _lock = lock(path)?;
    // A redrive (or an operator) moved the file away: append to the one at `path`.
    if let Some(f) = slot.as_ref()
        && !names(path, f)?
    {
        *slot = None;
    }
    if let (Some(limit), Some(f)) = (rotate_bytes, slot.as_ref())
        && f.metadata()?.len() >= limit
    {
        *slot = None;
        let to = rotate(path)?;
        tracing::info!(path = %path.display(), rotated_to = %to.display(),
            "failure record file rotated; the rotated file stays until an operator or a redrive removes it");
    }
    let f = match slot {
        Some(f) => f,
        None => slot.insert(open(path)?),
    };
    let before = f.metadata()?.len();
    if let Err(e) = f.write_all(line).and_then(|()| f.sync_data()) {
        // Cut off the part of the line that did land, so the next record starts on a
        // line of its own; if even that fails, the next open repairs the tail.
        let _ = f.set_len(before).and_then(|()| f.sync_data());
        return Err(e);
    }
    Ok(())
}

/// Whether `path` still names the open file `f` (false when it is gone or replaced).
fn names(path: &Path, f: &File) -> std::io::Result<bool> {
    let open = f.metadata()?;
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.dev() == open.dev() && m.ino() == open.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending, creating it durably, and drops a partial last line that
/// a failed write may have left (it was never acknowledged: a record is acked only after
/// its whole line, newline included, was fsynced).
fn open(path: &Path) -> std::io::Result<File> {
    let mut f = File::options()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    sync_dir(path)?;
    let len = f.metadata()?.len();
    let whole = whole_lines(&mut f, len)?;
    if whole < len {
        tracing::warn!(path = %path.display(), bytes = len - whole,
            "dropping the partial last line of a failure record file (a write that failed and was retried)");
        f.set_len(whole)?;
        f.sync_data()?;
    }
    Ok(f)
}

/// The length of `f` up to and including its last newline.
fn whole_lines(f: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The sidecar lock of `path`, held (exclusively) until the returned file is dropped.
pub(crate) fn lock(path: &Path) -> std::io::Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sibling(path, "lock"))?;
    f.lock()?;
    Ok(f)
}

/// `<path>.<suffix>`.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".");
    p.push(suffix);
    PathBuf::from(p)
}

/// The rotated files of `path` (`<path>.<n>`), oldest (lowest n) first.
pub(crate) fn rotated(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(parent(path))? {
        let entry = entry?;
        let n = entry
            .file_name()
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Renames `path` to the next `<path>.<n>` and returns that name; the caller holds the
/// lock. Nothing is shifted or removed: one rename, so no record is ever in no file.
pub(crate) fn rotate(path: &Path) -> std::io::Result<PathBuf> {
    let next = rotated(path)?.last().map_or(1, |(n, _)| n + 1);
    let to = sibling(path, &next.to_string());
    std::fs::rename(path, &to)?;
    sync_dir(path)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(path: &Path, rotate_bytes: Option<u64>) -> FileDestination {
        FileDestination::new(&Config {
            path: path.to_owned(),
            rotate_bytes,
            keep: None,
        })
    }

    #[tokio::test]
    async fn rotates_by_size_and_keeps_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failed.jsonl");
        let d = destination(&path, Some(20));
        for i in 0..5 {
            d.write(format!("{{\"record\":{i:08}}}").as_bytes())
                .await
                .unwrap();
        }
        let read =
            |suffix: &str| std::fs::read_to_string(format!("{}{suffix}", path.display())).unwrap();
        assert_eq!(read(""), "{\"record\":00000004}\n");
        for i in 0..4 {
            assert_eq!(
                read(&format!(".{}", i + 1)),
                format!("{{\"record\":{i:08}}}\n")
            );
        }
        assert_eq!(rotated(&path).unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_file_moved_away_is_not_appended_to_and_a_partial_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failed.jsonl");
        let d = destination(&path, None);
        d.write(b"{\"a\":1}").await.unwrap();
        // A redrive moves it aside; the next record goes to a new file at `path`.
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        d.write(b"{\"b\":2}").await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"b\":2}\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("aside")).unwrap(),
            "{\"a\":1}\n"
        );
        // The tail of a write that failed is cut off when the file is opened again.
        std::fs::write(&path, "{\"b\":2}\n{\"c\":").unwrap();
        let d = destination(&path, None);
        d.write(b"{\"c\":3}").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"b\":2}\n{\"c\":3}\n"
        );
    }
}
