//! `metrics.jsonl`: one JSON object per finished epoch, each epoch exactly once.
//!
//! A run appends an epoch's line before it writes that epoch's checkpoint, so a run stopped
//! between the two leaves a line the checkpoint does not have. Resuming therefore rewrites the
//! file (atomically: a temporary file renamed over it) keeping only the epochs the checkpoint
//! holds, the last line of each, and then appends the epochs it trains.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What one epoch measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy, a fraction.
    pub train_acc: f64,
    /// Test accuracy with the running statistics as trained, a fraction.
    pub test_acc: f64,
    /// Test accuracy after re-estimating the batch norms' statistics, when measured.
    pub test_acc_precise_bn: Option<f64>,
    /// With a binary optimizer (`--recipe bop`): the fraction of binary weights whose sign
    /// flipped per step, averaged over the epoch's steps (larq's `FlipRatio`, a mean over the
    /// epoch's batches).
    pub flip_ratio: Option<f64>,
    /// Wall-clock seconds of the training loop alone.
    pub seconds: f64,
}

impl EpochRecord {
    /// The JSON line, written by hand to keep the fields in this order (serde_json would sort
    /// them); non-finite numbers become `null` (JSON has no NaN).
    pub fn to_json(self) -> String {
        format!(
            "{{\"epoch\": {}, \"train_loss\": {}, \"train_acc\": {}, \"test_acc\": {}, \"test_acc_precise_bn\": {}, \"flip_ratio\": {}, \"seconds\": {:.3}}}",
            self.epoch,
            json_number(self.train_loss),
            json_number(self.train_acc),
            json_number(self.test_acc),
            self.test_acc_precise_bn.map_or("null".into(), json_number),
            self.flip_ratio.map_or("null".into(), json_number),
            self.seconds
        )
    }

    /// Parses a line written by [`to_json`](Self::to_json); `None` for anything else (a line
    /// cut short by a crash, for one).
    pub fn parse(line: &str) -> Option<EpochRecord> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let number = |key: &str| match v.get(key)? {
            serde_json::Value::Null => Some(f64::NAN),
            n => n.as_f64(),
        };
        Some(EpochRecord {
            epoch: u32::try_from(v.get("epoch")?.as_u64()?).ok()?,
            train_loss: number("train_loss")?,
            train_acc: number("train_acc")?,
            test_acc: number("test_acc")?,
            test_acc_precise_bn: v.get("test_acc_precise_bn")?.as_f64(),
            // Absent from lines written before the field existed.
            flip_ratio: v.get("flip_ratio").and_then(serde_json::Value::as_f64),
            seconds: number("seconds")?,
        })
    }
}

/// A finite number as JSON, `null` otherwise.
fn json_number(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        "null".into()
    }
}

/// Why the metrics file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct MetricsError {
    path: PathBuf,
    source: io::Error,
}

/// The open metrics file, appending.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

/// What [`MetricsLog::resume`] kept of an earlier run's file.
#[derive(Debug, Default)]
pub struct Kept {
    /// The kept epochs, in order.
    pub records: Vec<EpochRecord>,
    /// Lines left out: epochs after the checkpoint's, repeats and unreadable lines.
    pub dropped: usize,
}

impl MetricsLog {
    /// Starts an empty file at `path` (replacing any earlier one).
    pub fn create(path: &Path) -> Result<MetricsLog, MetricsError> {
        let err = |source| MetricsError { path: path.to_path_buf(), source };
        let file = File::create(path).map_err(err)?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    /// Continues the file at `path` after `epochs_done` epochs: keeps each epoch up to
    /// `epochs_done` once (its last line, as written), drops everything else, and replaces the
    /// file atomically with the result.
    pub fn resume(path: &Path, epochs_done: u32) -> Result<(MetricsLog, Kept), MetricsError> {
        let err = |source| MetricsError { path: path.to_path_buf(), source };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e)),
        };
        let mut by_epoch: BTreeMap<u32, (&str, EpochRecord)> = BTreeMap::new();
        let mut lines = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            lines += 1;
            if let Some(record) = EpochRecord::parse(line) {
                if (1..=epochs_done).contains(&record.epoch) {
                    by_epoch.insert(record.epoch, (line, record));
                }
            }
        }
        let mut kept = String::new();
        for (line, _) in by_epoch.values() {
            kept.push_str(line);
            kept.push('\n');
        }
        write_atomically(path, kept.as_bytes()).map_err(err)?;
        let file = OpenOptions::new().append(true).open(path).map_err(err)?;
        let records: Vec<EpochRecord> = by_epoch.into_values().map(|(_, r)| r).collect();
        let dropped = lines - records.len();
        Ok((MetricsLog { path: path.to_path_buf(), file }, Kept { records, dropped }))
    }

    /// Appends one epoch's line.
    pub fn append(&mut self, record: &EpochRecord) -> Result<(), MetricsError> {
        writeln!(self.file, "{}", record.to_json())
            .map_err(|source| MetricsError { path: self.path.clone(), source })
    }
}

/// Writes `bytes` to a temporary file next to `path`, flushes it to disk and renames it over
/// `path`: a crash leaves the old file or the new one, never a mix.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("the path names no file"))?;
    let tmp =
        path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u32, loss: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: loss,
            train_acc: 0.5,
            test_acc: 0.25,
            test_acc_precise_bn: None,
            flip_ratio: None,
            seconds: 1.5,
        }
    }

    #[test]
    fn lines_round_trip() {
        let r = EpochRecord {
            test_acc_precise_bn: Some(0.125),
            flip_ratio: Some(3.5e-4),
            ..record(3, 0.1 + 0.2)
        };
        assert_eq!(EpochRecord::parse(&r.to_json()), Some(r));
        let nan = EpochRecord::parse(&record(1, f64::NAN).to_json()).unwrap();
        assert!(nan.train_loss.is_nan());
        assert_eq!(EpochRecord::parse("{\"epoch\": 2, \"train_lo"), None);
    }

    #[test]
    fn resume_keeps_each_checkpointed_epoch_once() {
        let dir = std::env::temp_dir().join(format!("caseopt-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        // Epoch 2 twice (an earlier resume), epoch 3 beyond the checkpoint, a torn last line.
        let lines = [record(1, 1.0), record(2, 2.0), record(2, 2.5), record(3, 3.0)]
            .map(|r| r.to_json())
            .join("\n");
        fs::write(&path, format!("{lines}\n{{\"epoch\": 4, \"tr")).unwrap();
        let (mut log, kept) = MetricsLog::resume(&path, 2).unwrap();
        assert_eq!(kept.records, [record(1, 1.0), record(2, 2.5)]);
        assert_eq!(kept.dropped, 3);
        log.append(&record(3, 3.5)).unwrap();
        let epochs: Vec<u32> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| EpochRecord::parse(l).unwrap().epoch)
            .collect();
        assert_eq!(epochs, [1, 2, 3]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
