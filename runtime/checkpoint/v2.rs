//! Version 2 of the checkpoint metadata, frozen once shipped like version 1: version 1's
//! records, and two additions (issues 23 and 24):
//!
//! - a hyperparameter kind more, a plateau schedule ([`Schedule::Plateau`]) stored by its
//!   description *and its state* (its value and its memory of the reports), which a plateau's
//!   run needs to resume;
//! - one field, `scaler`, the [`GradScaler`](crate::GradScaler)'s state when the file was
//!   written by [`save_scaled`](super::save_scaled), `null` otherwise.
//!
//! Records version 2 did not change are version 1's own. The migration from version 1
//! ([`From<v1::Meta>`]) adds nothing: a version-1 file has no plateau and no scaler (there were
//! none), and every record it has reads the same. As for every version: never edit these
//! records; a change to what is written is a new version (docs/checkpoints.md,
//! "Compatibility").
//!
//! [`Schedule::Plateau`]: crate::schedule::Schedule::Plateau

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::v1;
pub(super) use super::v1::{SavedModelVar, SavedRoute, SavedTensor, SavedVariable};
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
    /// The gradient scaler's state (written by [`save_scaled`](super::save_scaled)); `null`
    /// for a file written without one. Always present in a version-2 file.
    pub(super) scaler: Option<SavedScaler>,
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

/// A hyperparameter: a constant by value, a schedule by description (closures cannot be
/// stored), a plateau by description and state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum SavedHyperparameter {
    /// `value` for people, `bits` (the f64's bit pattern, 16 hex digits) for exactness: JSON
    /// readers need not round decimal text back to the same double.
    Constant { value: String, bits: String },
    /// The schedule's `Debug` description.
    Schedule { description: String },
    /// A plateau schedule: its `Debug` description (its settings) and where it stands.
    Plateau { description: String, state: SavedPlateauState },
}

/// A plateau's state ([`PlateauState`](crate::schedule::PlateauState)); each f64 as its bit
/// pattern, 16 hex digits (`best` starts infinite).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedPlateauState {
    pub(super) value: String,
    pub(super) best: String,
    pub(super) num_bad_epochs: u64,
    pub(super) cooldown_counter: u64,
    pub(super) last_epoch: u64,
}

impl From<v1::SavedHyperparameter> for SavedHyperparameter {
    fn from(h: v1::SavedHyperparameter) -> Self {
        match h {
            v1::SavedHyperparameter::Constant { value, bits } => {
                SavedHyperparameter::Constant { value, bits }
            }
            v1::SavedHyperparameter::Schedule { description } => {
                SavedHyperparameter::Schedule { description }
            }
        }
    }
}

impl From<v1::SavedOptimizer> for SavedOptimizer {
    fn from(o: v1::SavedOptimizer) -> Self {
        SavedOptimizer {
            rule: o.rule,
            optimizer: o.optimizer,
            step_count: o.step_count,
            hyperparameters: o.hyperparameters.into_iter().map(|(k, h)| (k, h.into())).collect(),
            variables: o.variables,
        }
    }
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

/// The migration: version 1's records as version 2's (nothing to add: version 1 had no
/// plateau and no scaler).
impl From<v1::Meta> for Meta {
    fn from(m: v1::Meta) -> Self {
        Meta {
            format: m.format,
            version: m.version,
            fingerprint: m.fingerprint,
            rules: m.rules,
            routes: m.routes,
            optimizers: m.optimizers.into_iter().map(SavedOptimizer::from).collect(),
            model: m.model,
            tensors: m.tensors,
            scaler: None,
        }
    }
}

/// Version 2's metadata from its JSON text.
pub(super) fn parse(json: &str) -> Result<Meta, CheckpointError> {
    serde_json::from_str(json).map_err(|e| CheckpointError::Malformed(e.to_string()))
}
