//! One reader per format version ever written. Each turns its version's metadata into the
//! records this build works with (`format::Meta`, the newest version's), migrating as it goes,
//! as burn's versioned records and torch.optim's `__setstate__` do; the planner, the loader
//! and `checkpoint_info` see only current records.
//!
//! Each new version adds a module with its records, `impl From<previous::Meta> for
//! new::Meta` (the migration: defaults for what the older version did not store, renamed
//! states renamed), a line in [`READERS`], and moves `format`'s re-export and
//! [`FORMAT_VERSION`] to it. Older versions' records and parsers stay as they are; their
//! readers apply the migrations.
//!
//! Version 2 (issues 23 and 24) added plateau schedules' states and the gradient scaler's state
//! (`v2.rs`); version 1 migrates to it with neither.

use super::format::{Meta, FORMAT_VERSION};
use super::{v1, v2};
use crate::error::CheckpointError;

/// A version's reader: its metadata JSON to current records.
type Reader = fn(&str) -> Result<Meta, CheckpointError>;

/// Every version this build reads, oldest first, with its reader.
const READERS: &[(u32, Reader)] = &[(1, read_v1), (2, read_v2)];

/// Version 1's reader: its records, migrated to version 2's (no plateau, no scaler).
fn read_v1(json: &str) -> Result<Meta, CheckpointError> {
    v1::parse(json).map(v2::Meta::from)
}

/// Version 2's reader: its records are the current ones.
fn read_v2(json: &str) -> Result<Meta, CheckpointError> {
    v2::parse(json)
}

/// The metadata of a file that says it is of `version`, as current records; a version with no
/// reader (one written by a newer build, or none ever written) is
/// [`CheckpointError::UnsupportedVersion`], naming it and the newest this build reads.
pub(super) fn read(version: u64, json: &str) -> Result<Meta, CheckpointError> {
    let reader = READERS.iter().find(|(v, _)| u64::from(*v) == version);
    match reader {
        Some((_, read)) => read(json),
        None => {
            Err(CheckpointError::UnsupportedVersion { found: version, supported: FORMAT_VERSION })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_up_to_the_current_one_has_a_reader() {
        let versions: Vec<u32> = READERS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=FORMAT_VERSION).collect::<Vec<_>>());
    }

    #[test]
    fn versions_without_a_reader_name_the_newest_this_build_reads() {
        for found in [0, u64::from(FORMAT_VERSION) + 1, u64::MAX] {
            assert_eq!(
                read(found, "{}").err(),
                Some(CheckpointError::UnsupportedVersion { found, supported: FORMAT_VERSION })
            );
        }
    }

    #[test]
    fn version_1_migrates_with_no_scaler_and_version_2_fields_are_not_version_1s() {
        let v1 = r#"{"format":"caseopt-checkpoint","version":1,"fingerprint":"0000000000000001",
            "rules":[],"routes":[],"optimizers":[],"model":null,"tensors":{}}"#;
        let meta = read(1, v1).unwrap();
        assert!(meta.scaler.is_none());
        // A version-1 file that carries version 2's field is damaged or forged.
        let forged = v1.replace(r#""tensors":{}"#, r#""tensors":{},"scaler":null"#);
        assert!(matches!(read(1, &forged), Err(CheckpointError::Malformed(_))));
        assert!(read(2, &forged).unwrap().scaler.is_none());
    }
}
