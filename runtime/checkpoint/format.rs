//! The checkpoint format: the constants that name its parts, the JSON description stored in
//! `__metadata__`, and how numbers are written in it so that they read back exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::CheckpointError;
use crate::schedule::Schedule;

/// The format tag stored in every checkpoint's metadata.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT, "caseopt-checkpoint");
/// ```
pub const FORMAT: &str = "caseopt-checkpoint";
/// The checkpoint format version this build writes and reads.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT_VERSION, 1);
/// ```
pub const FORMAT_VERSION: u32 = 1;

/// `__metadata__` key of the JSON description.
pub(super) const METADATA_KEY: &str = "caseopt";
/// `__metadata__` key of the CRC-32 of the JSON description.
pub(super) const METADATA_CRC_KEY: &str = "caseopt.crc32";
/// Prefix of the optimizer-state tensors.
pub(super) const OPT_PREFIX: &str = "opt/";
/// Prefix of the model-variable tensors.
pub(super) const MODEL_PREFIX: &str = "model/";

/// The JSON stored under [`METADATA_KEY`].
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

/// The key of a state tensor: `opt/<rule>/<variable>/<state>`.
pub(super) fn state_key(rule: usize, variable: &str, state: &str) -> String {
    format!("{OPT_PREFIX}{rule}/{variable}/{state}")
}

/// A hyperparameter as the metadata stores it.
pub(super) fn save_schedule(schedule: &Schedule) -> SavedHyperparameter {
    match schedule.as_constant() {
        Some(v) => SavedHyperparameter::Constant {
            value: format!("{v:?}"),
            bits: format!("{:016x}", v.to_bits()),
        },
        None => SavedHyperparameter::Schedule { description: format!("{schedule:?}") },
    }
}

/// The fingerprint written as 16 hex digits (JSON numbers lose precision above 2^53 in many
/// readers).
pub(super) fn parse_fingerprint(text: &str) -> std::result::Result<u64, CheckpointError> {
    parse_hex64(text).ok_or_else(|| {
        CheckpointError::Malformed(format!("fingerprint `{text}` is not 16 hex digits"))
    })
}

/// Exactly 16 hex digits (`from_str_radix` alone would also take a sign).
pub(super) fn parse_hex64(text: &str) -> Option<u64> {
    if text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

/// A route in words, for [`CheckpointError::VariableMismatch`].
pub(super) fn describe_route(r: &SavedRoute) -> String {
    let rule = match r.rule {
        Some(i) => format!("rule {i}"),
        None => "untrained".to_string(),
    };
    format!(
        "{} {:?}, {} bit{}, {rule}",
        r.dtype,
        r.shape,
        r.bits,
        if r.bits == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_round_trip_exactly_through_their_bits() {
        for v in [0.01, 1e-8, 0.1 + 0.2, f64::MIN_POSITIVE, 123456.789e-300] {
            let SavedHyperparameter::Constant { value, bits } =
                save_schedule(&Schedule::Constant(v))
            else {
                panic!("a constant is saved as a constant");
            };
            assert_eq!(
                f64::from_bits(u64::from_str_radix(&bits, 16).unwrap()).to_bits(),
                v.to_bits()
            );
            assert_eq!(value, format!("{v:?}"));
        }
        let s = Schedule::cosine(0.1, 100);
        assert!(
            matches!(save_schedule(&s), SavedHyperparameter::Schedule { description } if description == format!("{s:?}"))
        );
    }

    #[test]
    fn fingerprints_are_sixteen_hex_digits() {
        assert_eq!(parse_fingerprint("00000000000000ff"), Ok(255));
        assert!(parse_fingerprint("ff").is_err());
        assert!(parse_fingerprint("+00000000000000f").is_err());
        assert!(parse_fingerprint("zzzzzzzzzzzzzzzz").is_err());
    }
}
