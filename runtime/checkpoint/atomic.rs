//! Replacing a file atomically: write a temporary file in the same directory, sync it, rename
//! it over the destination, sync the directory; and removing the temporaries of writers that
//! died before their rename.
//!
//! # Temporaries and when they are stale
//!
//! The temporary file of a destination `<name>` is `.<name>.<pid>.<n>.tmp` in the same
//! directory (`<pid>` the writer's process id, `<n>` a per-process counter, both decimal), so
//! that concurrent writers, threads or processes, never share one. Its writer holds an
//! exclusive lock on it ([`File::lock`]: `flock` on Unix) from its creation until it has been
//! renamed onto the destination.
//!
//! A process killed during a save (`kill -9`, a crash, a power cut) leaves its temporary
//! behind. Every save first removes the stale temporaries of its own destination: files named
//! exactly as above for that `<name>` (nothing else is touched) that no process holds a lock
//! on. The kernel drops a dead process's locks, so a temporary is stale exactly when its writer
//! is gone; a live writer's temporary, in this process or another, is left alone, whatever its
//! process id (which another process may reuse, or which may belong to another pid namespace or
//! machine sharing the directory). A cleaner may lock a new temporary in the instant between
//! its creation and its writer's lock; the writer sees it gone once it has the lock and starts
//! over with a new name. Removing stale temporaries is best effort: a failure to list, lock or
//! remove one never fails the save. It is done on Unix only; elsewhere they are left.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes temporary files written at the same time by one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// New names tried when one is taken (a stale temporary of an earlier process with the same
/// process id) or was removed by a concurrent cleaner before its lock was taken.
const CREATE_ATTEMPTS: usize = 8;

/// Removes the temporary file unless the rename succeeded.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// `.<name>.<pid>.<n>.tmp`.
fn temporary_name(name: &OsStr, pid: u32, n: u64) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{pid}.{n}.tmp"));
    tmp
}

/// Whether `file` is named as a temporary of `name` is: exactly `.<name>.<digits>.<digits>.tmp`.
fn is_temporary_of(file: &OsStr, name: &OsStr) -> bool {
    let middle = file
        .as_encoded_bytes()
        .strip_prefix(b".")
        .and_then(|rest| rest.strip_prefix(name.as_encoded_bytes()))
        .and_then(|rest| rest.strip_prefix(b"."))
        .and_then(|rest| rest.strip_suffix(b".tmp"));
    let Some(middle) = middle else {
        return false;
    };
    let digits = |part: &[u8]| !part.is_empty() && part.iter().all(u8::is_ascii_digit);
    let mut parts = middle.split(|&b| b == b'.');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(pid), Some(n), None) if digits(pid) && digits(n)
    )
}

/// Removes the temporaries of `name` in `dir` that no writer holds (see the module
/// documentation); best effort.
#[cfg(unix)]
fn remove_stale_temporaries(dir: &Path, name: &OsStr) {
    use std::os::unix::fs::MetadataExt;

    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_temporary_of(&entry.file_name(), name) {
            continue;
        }
        let path = entry.path();
        // Regular files only: opening a FIFO planted under that name would block.
        let Ok(before) = fs::symlink_metadata(&path) else { continue };
        if !before.file_type().is_file() {
            continue;
        }
        // Opened for writing: NFS emulates `flock` with byte-range locks, whose exclusive kind
        // needs a writable descriptor. Nothing is written.
        let Ok(file) = OpenOptions::new().write(true).open(&path) else { continue };
        if file.try_lock().is_err() {
            continue; // held by a live writer (or locks unsupported here: leave it)
        }
        // Still the same file under that name (its writer may have renamed it meanwhile).
        let same = |m: &fs::Metadata| m.dev() == before.dev() && m.ino() == before.ino();
        let still_there = fs::symlink_metadata(&path).is_ok_and(|now| same(&now));
        if still_there && file.metadata().is_ok_and(|m| same(&m)) {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(not(unix))]
fn remove_stale_temporaries(_dir: &Path, _name: &OsStr) {}

/// Creates a new temporary file for `name` in `dir` and takes its lock; returns it with its
/// path. Only a new name is ever opened: a stale file, or a link planted under that name, is
/// never written through.
fn create_temporary(dir: &Path, name: &OsStr) -> Result<(File, PathBuf)> {
    let mut last_error = (dir.to_path_buf(), std::io::Error::from(ErrorKind::AlreadyExists));
    for _ in 0..CREATE_ATTEMPTS {
        let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(temporary_name(name, std::process::id(), unique));
        let file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                last_error = (tmp, e);
                continue;
            }
            Err(source) => return Err(io_error("creating", &tmp, source)),
        };
        match file.lock() {
            Ok(()) => {}
            // Without locks the temporary cannot be told from a stale one; so none is removed
            // on such platforms (see `remove_stale_temporaries`).
            Err(e) if e.kind() == ErrorKind::Unsupported => return Ok((file, tmp)),
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_error("locking", &tmp, source));
            }
        }
        // A concurrent cleaner that locked the file first has removed it: start over.
        if fs::symlink_metadata(&tmp).is_ok() {
            return Ok((file, tmp));
        }
        last_error = (tmp, std::io::Error::from(ErrorKind::NotFound));
    }
    let (tmp, source) = last_error;
    Err(io_error("creating", &tmp, source))
}

fn io_error(what: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io { context: format!("{what} `{}`", path.display()), source }
}

/// Writes `path` through `write(file)`: the file is a new temporary file in the same
/// directory (so the rename is atomic), synced before the rename, and removed on any error.
/// Stale temporaries of `path` are removed first (see the module documentation).
pub(super) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| io_error(what, &p, source)
    };
    let name = path.file_name().ok_or_else(|| Error::Io {
        context: format!("saving checkpoint `{}`", path.display()),
        source: std::io::Error::new(ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    remove_stale_temporaries(&dir, name);
    let (mut file, tmp) = create_temporary(&dir, name)?;
    let mut guard = TempFile(Some(tmp.clone()));
    write(&mut file).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming the temporary file onto", path))?;
    guard.0 = None;
    // Only now is the lock released: until its rename the temporary is live.
    drop(file);
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

    #[test]
    fn only_the_exact_temporary_pattern_of_the_target_matches() {
        let name = OsStr::new("ckpt.safetensors");
        let is = |file: &str| is_temporary_of(OsStr::new(file), name);
        assert!(is(".ckpt.safetensors.123.0.tmp"));
        assert!(is(&temporary_name(name, 7, 42).to_string_lossy()));
        for other in [
            "ckpt.safetensors",
            "ckpt.safetensors.1.2.tmp",
            ".ckpt.safetensors.1.tmp",
            ".ckpt.safetensors.1.2.3.tmp",
            ".ckpt.safetensors..2.tmp",
            ".ckpt.safetensors.1.x.tmp",
            ".ckpt.safetensors.-1.2.tmp",
            ".ckpt.safetensors.1.2.tmp.bak",
            ".ckpt.safetensors.1.2.TMP",
            ".other.safetensors.1.2.tmp",
            // The temporaries of `ckpt.safetensors.1` and of `ckpt`.
            ".ckpt.safetensors.1.123.0.tmp",
            ".ckpt.123.0.tmp",
        ] {
            assert!(!is(other), "{other}");
        }
    }

    #[test]
    fn a_concurrent_save_leaves_a_live_writer_s_temporary_alone() {
        let dir = std::env::temp_dir().join(format!("caseopt-atomic-live-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("ckpt.safetensors");
        let (started, wait_started) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let slow = {
            let target = target.clone();
            std::thread::spawn(move || {
                write_atomically(&target, |file| {
                    file.write_all(b"slow")?;
                    started.send(()).unwrap();
                    wait_go.recv().unwrap();
                    Ok(())
                })
            })
        };
        wait_started.recv().unwrap();
        // Its temporary is half written and locked: the second save must not take it for stale.
        write_atomically(&target, |file| file.write_all(b"fast")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"fast");
        go.send(()).unwrap();
        slow.join().unwrap().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"slow");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
