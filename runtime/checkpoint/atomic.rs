//! Replacing a file atomically: write a temporary file in the same directory, sync it, rename
//! it over the destination, sync the directory.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes temporary files written at the same time by one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file unless the rename succeeded.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `path` through `write(file)`: the file is a new temporary file in the same
/// directory (so the rename is atomic), synced before the rename, and removed on any error.
pub(super) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |what: &str, p: &Path| {
        let context = format!("{what} `{}`", p.display());
        move |source| Error::Io { context, source }
    };
    let name = path.file_name().ok_or_else(|| Error::Io {
        context: format!("saving checkpoint `{}`", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{unique}.tmp", name.to_string_lossy(), std::process::id()));
    // A new name only: a stale file (or a link planted under that name) is never written through.
    let mut file =
        OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io("creating", &tmp))?;
    let mut guard = TempFile(Some(tmp.clone()));
    write(&mut file).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("renaming the temporary file onto", path))?;
    guard.0 = None;
    // The rename itself lives in the directory: sync it so the new name survives a crash.
    // Directories cannot be opened for syncing on every platform; the file is complete anyway.
    #[cfg(unix)]
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io("syncing directory", &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn atomic_write_leaves_no_temporary_file_on_error() {
        let dir = std::env::temp_dir().join(format!("caseopt-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("ckpt.safetensors");
        fs::write(&target, b"old").unwrap();
        let err = write_atomically(&target, |file| {
            file.write_all(b"half")?;
            Err(std::io::Error::other("simulated failure"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "the temporary file was removed");
        write_atomically(&target, |file| file.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
