//! Files replaced so that a crash or a full disk leaves the old contents or the new,
//! never a part: the one way the gateway rewrites a file it must not lose (the API's
//! mapping store, a parked record's payload, a rotated failure file after a redrive).

use std::io::Write;
use std::path::Path;

/// Replaces `path` by `bytes` whole or not at all: writes them to `tmp` (beside `path`,
/// on the same file system), fsyncs it, renames it over `path` and fsyncs the directory,
/// each result checked (a failed write shows in `write_all` or `sync_all`, not later).
/// On failure `tmp` is removed, so that a full disk gets its space back for the retry;
/// `path` then holds its old contents (or, when only the directory's fsync failed, the
/// new ones, not yet known durable: the caller retries or reports as for any failure).
pub fn replace(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let written = std::fs::File::create(tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(tmp, path))
        .and_then(|()| sync_dir(path));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// fsyncs the directory holding `path`, so that a file created or renamed there survives
/// a crash.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(parent(path))?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_leaves_the_new_contents_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let tmp = dir.path().join("state.json.tmp");
        std::fs::write(&path, "old").unwrap();
        replace(&path, &tmp, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_replace_removes_its_temporary_file_and_leaves_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails after the write: a non-empty directory stands at the path.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "old").unwrap();
        let tmp = dir.path().join("state.json.tmp");
        let err = replace(&path, &tmp, b"new").unwrap_err();
        assert!(!tmp.exists(), "the temporary file is removed after {err}");
        assert_eq!(std::fs::read_to_string(path.join("inside")).unwrap(), "old");
    }
}
