//! The checkpoint format: the constants that name its parts, the JSON description stored in
//! `__metadata__`, and how numbers are written in it so that they read back exactly.

use crate::error::CheckpointError;
use crate::schedule::{PlateauState, Schedule};

/// The format tag stored in every checkpoint's metadata.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT, "caseopt-checkpoint");
/// ```
pub const FORMAT: &str = "caseopt-checkpoint";
/// The checkpoint format version this build writes. It reads this version and every earlier
/// one (each has its own reader, which migrates it); a later one is
/// [`CheckpointError::UnsupportedVersion`]. docs/checkpoints.md states which changes bump it.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT_VERSION, 2);
/// ```
pub const FORMAT_VERSION: u32 = 2;

/// The largest step count a checkpoint may hold, an optimizer's or a variable's: 2^53, the
/// last count every f64 (schedules, bias corrections) holds exactly and far beyond any run, so
/// that a crafted count can neither overflow the next step nor wrap it
/// ([`crate::optim::state::MAX_STEP`], the same bound on `set_state`).
pub(super) const MAX_STEP: u64 = crate::optim::state::MAX_STEP;

/// `__metadata__` key of the JSON description.
pub(super) const METADATA_KEY: &str = "caseopt";
/// `__metadata__` key of the CRC-32 of the JSON description.
pub(super) const METADATA_CRC_KEY: &str = "caseopt.crc32";
/// Prefix of the optimizer-state tensors.
pub(super) const OPT_PREFIX: &str = "opt/";
/// Prefix of the model-variable tensors.
pub(super) const MODEL_PREFIX: &str = "model/";

// The records of the version this build writes, version 2's. A new version adds its own module
// (`v3`) whose records take these names here, and a reader that migrates version 2's records
// into them (`versions.rs`); `v1` and `v2` themselves are never edited, so that files written
// with them keep loading.
pub(super) use super::v2::{
    Meta, SavedFloat, SavedHyperparameter, SavedModelVar, SavedOptimizer, SavedPlateauState,
    SavedRoute, SavedScaler, SavedTensor, SavedVariable,
};

/// The key of a state tensor: `opt/<rule>/<variable>/<state>`.
pub(super) fn state_key(rule: usize, variable: &str, state: &str) -> String {
    format!("{OPT_PREFIX}{rule}/{variable}/{state}")
}

/// A hyperparameter as the metadata stores it.
pub(super) fn save_schedule(schedule: &Schedule) -> SavedHyperparameter {
    match schedule {
        Schedule::Constant(v) => SavedHyperparameter::Constant {
            value: format!("{v:?}"),
            bits: format!("{:016x}", v.to_bits()),
        },
        Schedule::Plateau(p) => SavedHyperparameter::Plateau {
            description: format!("{p:?}"),
            state: save_plateau_state(&p.state()),
        },
        _ => SavedHyperparameter::Schedule { description: format!("{schedule:?}") },
    }
}

/// A plateau's state as the metadata stores it, each f64 by its bits.
pub(super) fn save_plateau_state(s: &PlateauState) -> SavedPlateauState {
    SavedPlateauState {
        value: format!("{:016x}", s.value.to_bits()),
        best: format!("{:016x}", s.best.to_bits()),
        num_bad_epochs: s.num_bad_epochs,
        cooldown_counter: s.cooldown_counter,
        last_epoch: s.last_epoch,
    }
}

/// A saved plateau state, checked: each f64 16 hex digits, the value finite, `best` not NaN,
/// the counters at most [`MAX_STEP`].
pub(super) fn parse_plateau_state(s: &SavedPlateauState) -> Result<PlateauState, String> {
    let float = |name: &str, text: &str| {
        parse_hex64(text)
            .map(f64::from_bits)
            .ok_or_else(|| format!("plateau {name} `{text}` is not 16 hex digits"))
    };
    let (value, best) = (float("value", &s.value)?, float("best", &s.best)?);
    if !value.is_finite() || best.is_nan() {
        return Err(format!("plateau value {value:?} or best metric {best:?} is not a number"));
    }
    for (name, n) in [
        ("num_bad_epochs", s.num_bad_epochs),
        ("cooldown_counter", s.cooldown_counter),
        ("last_epoch", s.last_epoch),
    ] {
        if n > MAX_STEP {
            return Err(format!("plateau {name} {n} is beyond 2^53"));
        }
    }
    Ok(PlateauState {
        value,
        best,
        num_bad_epochs: s.num_bad_epochs,
        cooldown_counter: s.cooldown_counter,
        last_epoch: s.last_epoch,
    })
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
