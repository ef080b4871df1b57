//! Where the run writes, checked before any data is read or any epoch trained: a path that
//! cannot be written should cost a second, not an epoch.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The files a run writes.
#[derive(Debug)]
pub struct Outputs {
    /// `<out>/metrics.jsonl`.
    pub metrics: PathBuf,
    /// `<out>/curves.png`.
    pub plot: PathBuf,
}

/// Why an output path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A directory could not be created.
    #[error("{option} {}: cannot create the directory {}: {source}", path.display(), dir.display())]
    CreateDir { option: &'static str, path: PathBuf, dir: PathBuf, source: io::Error },
    /// A file path names an existing directory.
    #[error("{option} {}: is a directory, not a file", path.display())]
    IsDirectory { option: &'static str, path: PathBuf },
    /// A file path ends in `..` or a separator.
    #[error("{option} {}: names no file", path.display())]
    NoFileName { option: &'static str, path: PathBuf },
    /// Nothing can be created in the directory.
    #[error("{option} {}: cannot write in {}: {source}", path.display(), dir.display())]
    NotWritable { option: &'static str, path: PathBuf, dir: PathBuf, source: io::Error },
}

/// Creates `out` and checks that its two files and `checkpoint` can be written.
pub fn prepare(out: &Path, checkpoint: Option<&Path>) -> Result<Outputs, OutputError> {
    fs::create_dir_all(out).map_err(|source| OutputError::CreateDir {
        option: "--out",
        path: out.to_path_buf(),
        dir: out.to_path_buf(),
        source,
    })?;
    let metrics = out.join("metrics.jsonl");
    let plot = out.join("curves.png");
    for path in [&metrics, &plot] {
        check_file("--out", path)?;
    }
    if let Some(path) = checkpoint {
        check_file("--checkpoint", path)?;
    }
    Ok(Outputs { metrics, plot })
}

/// Checks that `path` can be (re)written the way checkpoints and the metrics are: a file
/// created next to it, then renamed over it.
fn check_file(option: &'static str, path: &Path) -> Result<(), OutputError> {
    let owned = || path.to_path_buf();
    if path.is_dir() {
        return Err(OutputError::IsDirectory { option, path: owned() });
    }
    let Some(name) = path.file_name() else {
        return Err(OutputError::NoFileName { option, path: owned() });
    };
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|source| OutputError::CreateDir {
        option,
        path: owned(),
        dir: dir.clone(),
        source,
    })?;
    let probe = dir.join(format!(".{}.probe-{}", name.to_string_lossy(), std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|source| OutputError::NotWritable { option, path: owned(), dir, source })?;
    let _ = fs::remove_file(&probe);
    Ok(())
}
