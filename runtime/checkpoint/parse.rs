//! Reading a checkpoint file: the container, the metadata's checksum, format and version, and
//! every tensor's dtype, shape and checksum against the metadata. Nothing here knows routers.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use safetensors::tensor::{SafeTensorError, SafeTensors};
use serde::Deserialize;
use tch::Kind;

use super::container::precheck;
use super::format::{
    parse_fingerprint, Meta, FORMAT, FORMAT_VERSION, METADATA_CRC_KEY, METADATA_KEY,
};
use super::versions;
use crate::error::{CheckpointError, Error, Result};
use crate::predicate::dtype_name;

/// `problem` with the file it was found in.
pub(super) fn bad(path: &Path, problem: CheckpointError) -> Error {
    Error::BadCheckpoint { path: path.to_path_buf(), problem }
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| Error::Io {
        context: format!("reading checkpoint `{}`", path.display()),
        source,
    })
}

/// A parsed file whose metadata is consistent with itself and whose checksums hold.
pub(super) struct Parsed<'a> {
    /// The file's format version (its records are migrated to the current ones in `meta`).
    pub(super) version: u32,
    pub(super) meta: Meta,
    pub(super) file: SafeTensors<'a>,
}

pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Parsed<'_>, CheckpointError> {
    use CheckpointError as E;
    precheck(bytes)?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer
        | SafeTensorError::InvalidOffset(_)
        | SafeTensorError::InvalidHeaderLength
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow => E::Truncated(format!("{e:?}")),
        other => E::NotSafetensors(format!("{other:?}")),
    })?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| E::NotSafetensors(format!("{e:?}")))?;
    let extra = header.metadata().as_ref();
    let json = extra
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| E::NotACheckpoint(format!("no `{METADATA_KEY}` entry in `__metadata__`")))?;
    let stored_crc = extra.and_then(|m| m.get(METADATA_CRC_KEY)).ok_or_else(|| {
        E::NotACheckpoint(format!("no `{METADATA_CRC_KEY}` entry in `__metadata__`"))
    })?;
    if stored_crc.parse::<u32>().ok() != Some(crc32fast::hash(json.as_bytes())) {
        return Err(E::ChecksumMismatch { what: "the metadata".into() });
    }
    // Format and version first, so that a future version's fields read as "unsupported
    // version" rather than as malformed.
    #[derive(Deserialize)]
    struct Tag {
        format: String,
        version: u64,
    }
    let tag: Tag =
        serde_json::from_str(json).map_err(|e| E::NotACheckpoint(format!("metadata: {e}")))?;
    if tag.format != FORMAT {
        return Err(E::NotACheckpoint(format!("format tag `{}`, expected `{FORMAT}`", tag.format)));
    }
    // Each version's own reader, which migrates what it reads to the current records.
    let meta = versions::read(tag.version, json)?;
    // A version with a reader is at most the current one.
    let version = u32::try_from(tag.version)
        .map_err(|_| E::UnsupportedVersion { found: tag.version, supported: FORMAT_VERSION })?;
    parse_fingerprint(&meta.fingerprint)?;
    // The file's tensors are exactly those the metadata lists, with the dtype and shape it
    // records and the bytes it checksummed.
    let names: BTreeSet<&str> = file.names().into_iter().map(String::as_str).collect();
    for name in &names {
        if !meta.tensors.contains_key(*name) {
            return Err(E::Malformed(format!("tensor `{name}` is not listed in the metadata")));
        }
    }
    for (key, saved) in &meta.tensors {
        let view = file
            .tensor(key)
            .map_err(|_| E::Malformed(format!("tensor `{key}` is listed but not in the file")))?;
        let kind = Kind::try_from(view.dtype()).map_err(|_| {
            E::Malformed(format!("tensor `{key}` has unsupported dtype {:?}", view.dtype()))
        })?;
        let shape = view.shape().iter().map(|&d| i64::try_from(d).ok()).collect::<Option<Vec<_>>>();
        if dtype_name(kind) != saved.dtype || shape.as_ref() != Some(&saved.shape) {
            return Err(E::Malformed(format!(
                "tensor `{key}` is {:?} {:?} in the file, {} {:?} in the metadata",
                view.dtype(),
                view.shape(),
                saved.dtype,
                saved.shape
            )));
        }
        if crc32fast::hash(view.data()) != saved.crc32 {
            return Err(E::ChecksumMismatch { what: format!("tensor `{key}`") });
        }
    }
    Ok(Parsed { version, meta, file })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use safetensors::tensor::Dtype;

    use super::super::container::{write_safetensors, Blob};
    use super::*;

    /// A file with one f32 tensor `w` and `metadata`.
    fn encode(metadata: &BTreeMap<&str, String>) -> Vec<u8> {
        let blob = Blob { dtype: Dtype::F32, shape: vec![1], bytes: vec![0; 4] };
        let mut out = Vec::new();
        write_safetensors(&mut out, &BTreeMap::from([("w".to_string(), blob)]), metadata).unwrap();
        out
    }

    #[test]
    fn other_files_are_typed_errors() {
        assert!(matches!(parse(b""), Err(CheckpointError::NotSafetensors(_))));
        assert!(matches!(
            parse(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Err(CheckpointError::NotSafetensors(_))
        ));
        // A valid safetensors file without caseopt's metadata.
        let plain = encode(&BTreeMap::new());
        assert!(matches!(parse(&plain), Err(CheckpointError::NotACheckpoint(_))));
        // Cut short.
        assert!(matches!(parse(&plain[..plain.len() - 1]), Err(CheckpointError::Truncated(_))));
    }

    #[test]
    fn metadata_checksum_and_version_are_checked() {
        let write = |json: &str, crc: u32| {
            encode(&BTreeMap::from([
                (METADATA_KEY, json.to_string()),
                (METADATA_CRC_KEY, crc.to_string()),
            ]))
        };
        let json = r#"{"format":"caseopt-checkpoint","version":3}"#;
        let file = write(json, crc32fast::hash(json.as_bytes()));
        assert_eq!(
            parse(&file).err(),
            Some(CheckpointError::UnsupportedVersion { found: 3, supported: 2 })
        );
        let file = write(json, crc32fast::hash(json.as_bytes()) ^ 1);
        assert!(matches!(parse(&file), Err(CheckpointError::ChecksumMismatch { .. })));
        let json = r#"{"format":"something-else","version":1}"#;
        let file = write(json, crc32fast::hash(json.as_bytes()));
        assert!(matches!(parse(&file), Err(CheckpointError::NotACheckpoint(_))));
    }
}
