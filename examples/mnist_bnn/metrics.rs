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

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What one epoch measured, one line of `metrics.jsonl`.
///
/// serde's derive writes the fields in this order and `null` for a non-finite number (JSON has
/// no NaN). It reads back every line written so far: the hand-written lines of earlier versions
/// (`"key": value`, with a space) parse the same, `null` in a plain number is NaN, and a missing
/// `flip_ratio` (lines from before it existed) is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Mean training loss.
    #[serde(deserialize_with = "nan_for_null")]
    pub train_loss: f64,
    /// Training accuracy, a fraction.
    #[serde(deserialize_with = "nan_for_null")]
    pub train_acc: f64,
    /// Test accuracy with the running statistics as trained, a fraction.
    #[serde(deserialize_with = "nan_for_null")]
    pub test_acc: f64,
    /// Test accuracy after re-estimating the batch norms' statistics, when measured.
    pub test_acc_precise_bn: Option<f64>,
    /// With a binary optimizer (`--recipe bop`): the fraction of binary weights whose sign
    /// flipped per step, averaged over the epoch's steps (larq's `FlipRatio`, a mean over the
    /// epoch's batches).
    #[serde(default)]
    pub flip_ratio: Option<f64>,
    /// Wall-clock seconds of the training loop alone, to the millisecond.
    #[serde(serialize_with = "milliseconds", deserialize_with = "nan_for_null")]
    pub seconds: f64,
}

impl EpochRecord {
    /// The JSON line.
    pub fn to_json(self) -> String {
        serde_json::to_string(&self).expect("a struct of numbers always serializes")
    }

    /// Parses a line written by [`to_json`](Self::to_json) or by earlier versions; `None` for
    /// anything else (a line cut short by a crash, for one).
    pub fn parse(line: &str) -> Option<EpochRecord> {
        serde_json::from_str(line).ok()
    }
}

/// A number that was written as `null` because it was not finite reads back as NaN.
fn nan_for_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Seconds rounded to the millisecond: a timing's noise is not worth a line's width.
fn milliseconds<S: Serializer>(seconds: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((seconds * 1000.0).round() / 1000.0)
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
    fn lines_keep_their_field_order_and_old_lines_still_parse() {
        let r = EpochRecord { flip_ratio: Some(0.25), seconds: 10.81234, ..record(2, 0.5) };
        assert_eq!(
            r.to_json(),
            "{\"epoch\":2,\"train_loss\":0.5,\"train_acc\":0.5,\"test_acc\":0.25,\
             \"test_acc_precise_bn\":null,\"flip_ratio\":0.25,\"seconds\":10.812}"
        );
        // Lines as the hand-written serializer wrote them, with NaN as null, and from before
        // `flip_ratio` existed.
        let old = "{\"epoch\": 3, \"train_loss\": null, \"train_acc\": 0.75, \"test_acc\": 0.5, \
                   \"test_acc_precise_bn\": 0.625, \"flip_ratio\": 0.001, \"seconds\": 1.500}";
        let parsed = EpochRecord::parse(old).unwrap();
        assert!(parsed.train_loss.is_nan());
        assert_eq!(
            (parsed.epoch, parsed.train_acc, parsed.test_acc_precise_bn, parsed.flip_ratio),
            (3, 0.75, Some(0.625), Some(0.001))
        );
        let older = "{\"epoch\": 1, \"train_loss\": 0.5, \"train_acc\": 0.5, \"test_acc\": 0.25, \
                     \"test_acc_precise_bn\": null, \"seconds\": 1.500}";
        assert_eq!(EpochRecord::parse(older), Some(record(1, 0.5)));
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
