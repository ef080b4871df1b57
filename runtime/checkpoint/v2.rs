//! Version 2 of the checkpoint metadata, frozen once shipped: version 1's records plus one
//! field, `scaler`, the [`GradScaler`](crate::GradScaler)'s state (issue 24) when the file was
//! written by [`save_scaled`](super::save_scaled), `null` otherwise. Every other record is
//! version 1's, unchanged (re-exported from `v1`). A version-1 file migrates to these records
//! with no scaler (`From<v1::Meta>`). As for every version: never edit these records; a change
//! to what is written is a new version (docs/checkpoints.md, "Compatibility").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub(super) use super::v1::{
    SavedHyperparameter, SavedModelVar, SavedOptimizer, SavedRoute, SavedTensor, SavedVariable,
};
use crate::error::CheckpointError;

/// The JSON stored under [`METADATA_KEY`](super::format::METADATA_KEY): version 1's fields and
/// `scaler`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Meta {
    pub(super) format: String,
    pub(super) version: u32,
    /// 16 hex digits: JSON numbers lose precision above 2^53 in many readers.
    pub(super) fingerprint: String,
    pub(super) rules: Vec<String>,
    pub(super) routes: Vec<SavedRoute>,
    pub(super) optimizers: Vec<SavedOptimizer>,
    /// `None` for [`Checkpoint::save_checkpoint`](super::Checkpoint::save_checkpoint), the model's
    /// variables for [`save_training`](super::save_training).
    pub(super) model: Option<Vec<SavedModelVar>>,
    /// Every tensor of the file, by key.
    pub(super) tensors: BTreeMap<String, SavedTensor>,
    /// The gradient scaler's state (written by [`save_scaled`](super::save_scaled)); `null`
    /// for a file written without one. Always present in a version-2 file.
    pub(super) scaler: Option<SavedScaler>,
}

/// A number written for people (`value`, Rust's shortest round-trip text) and for exactness
/// (`bits`: the IEEE bit pattern in hex, 8 digits for an f32, 16 for an f64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedFloat {
    pub(super) value: String,
    pub(super) bits: String,
}

/// A [`GradScaler`](crate::GradScaler)'s state: what torch.amp.GradScaler's `state_dict()`
/// holds (`scale`, `growth_factor`, `backoff_factor`, `growth_interval`, `_growth_tracker`),
/// and whether the scaler was enabled (a disabled torch scaler's `state_dict()` is empty; here
/// its values are written all the same, and a disabled file does not load into an enabled
/// scaler, as torch's `load_state_dict` refuses an empty dict).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedScaler {
    pub(super) enabled: bool,
    /// The f32 scale (8 hex digits).
    pub(super) scale: SavedFloat,
    pub(super) growth_tracker: i64,
    /// f64 (16 hex digits).
    pub(super) growth_factor: SavedFloat,
    /// f64 (16 hex digits).
    pub(super) backoff_factor: SavedFloat,
    pub(super) growth_interval: u64,
}

impl From<super::v1::Meta> for Meta {
    /// Version 1 to version 2: the same records, and no scaler (version 1 never held one).
    fn from(v1: super::v1::Meta) -> Self {
        let super::v1::Meta {
            format,
            version,
            fingerprint,
            rules,
            routes,
            optimizers,
            model,
            tensors,
        } = v1;
        Meta {
            format,
            version,
            fingerprint,
            rules,
            routes,
            optimizers,
            model,
            tensors,
            scaler: None,
        }
    }
}

/// Version 2's metadata from its JSON text.
pub(super) fn parse(json: &str) -> Result<Meta, CheckpointError> {
    serde_json::from_str(json).map_err(|e| CheckpointError::Malformed(e.to_string()))
}
