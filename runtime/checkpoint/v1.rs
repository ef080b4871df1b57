//! Version 1 of the checkpoint metadata, frozen: the records every file written with
//! `"version": 1` holds, exactly (`deny_unknown_fields`: a field a version does not define is
//! a damaged or forged file, not something to skip). Never edit these records, add nothing to
//! them and change no `serde` attribute: a change to what is written is a new version with its
//! own module and a migration from this one (docs/checkpoints.md, "Compatibility").
//! `tests/fixtures/checkpoint_v1.safetensors` is a file of this version that every build must
//! load and continue bit for bit (tests/test_checkpoint_v1.rs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::CheckpointError;

/// The JSON stored under [`METADATA_KEY`](super::format::METADATA_KEY).
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
}

/// One row of the routing table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedRoute {
    pub(super) variable: String,
    pub(super) shape: Vec<i64>,
    pub(super) dtype: String,
    pub(super) bits: u8,
    pub(super) rule: Option<usize>,
}

/// One rule's optimizer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedOptimizer {
    pub(super) rule: usize,
    pub(super) optimizer: String,
    pub(super) step_count: u64,
    pub(super) hyperparameters: BTreeMap<String, SavedHyperparameter>,
    /// Every variable of the optimizer, with the names of the state tensors it has (none before
    /// its first update).
    pub(super) variables: Vec<SavedVariable>,
}

/// One variable of an optimizer and the names of its state tensors.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedVariable {
    pub(super) name: String,
    pub(super) states: Vec<String>,
}

/// A hyperparameter: a constant by value, a schedule by description (closures cannot be
/// stored).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum SavedHyperparameter {
    /// `value` for people, `bits` (the f64's bit pattern, 16 hex digits) for exactness: JSON
    /// readers need not round decimal text back to the same double.
    Constant { value: String, bits: String },
    /// The schedule's `Debug` description.
    Schedule { description: String },
}

/// One of the model's variables (checkpoints written by [`save_training`](super::save_training)).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedModelVar {
    pub(super) name: String,
    pub(super) shape: Vec<i64>,
    pub(super) dtype: String,
}

/// What the metadata records of every tensor in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedTensor {
    pub(super) dtype: String,
    pub(super) shape: Vec<i64>,
    pub(super) crc32: u32,
}

/// Version 1's metadata from its JSON text.
pub(super) fn parse(json: &str) -> Result<Meta, CheckpointError> {
    serde_json::from_str(json).map_err(|e| CheckpointError::Malformed(e.to_string()))
}
