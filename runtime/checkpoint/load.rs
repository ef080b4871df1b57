//! Loading: read and check the file, plan every change against the router (and the model, and
//! the gradient scaler), then apply the plan. Nothing changes until the plan is whole.

use std::path::Path;

use tch::nn;

use super::apply::apply;
use super::format::{parse_hex64, SavedFloat, SavedScaler};
use super::parse::{bad, parse, read_file};
use super::plan::{plan, PlanError};
use crate::amp::{GradScaler, GradScalerState};
use crate::error::{CheckpointError, Result};
use crate::router::Router;

/// Loads `path` into `router` (and the model `vs`, and `scaler`, when given): validate, plan,
/// apply.
pub(super) fn load<R: Router + ?Sized>(
    path: &Path,
    router: &mut R,
    vs: Option<&nn::VarStore>,
    scaler: Option<&mut GradScaler>,
) -> Result<()> {
    if let Some(scaler) = &scaler {
        scaler.check_between_steps("load_scaled")?;
    }
    // Variables added to the VarStore since the router last routed are routed first, as its
    // next step would (the file lists them when it was saved after they were added).
    router.route_new_variables()?;
    let bytes = read_file(path)?;
    let parsed = parse(&bytes).map_err(|p| bad(path, p))?;
    let scaler_state = match (&scaler, &parsed.meta.scaler) {
        (None, None) => None,
        (None, Some(_)) => return Err(bad(path, CheckpointError::ScalerNotLoaded)),
        (Some(_), None) => return Err(bad(path, CheckpointError::NoScaler)),
        (Some(scaler), Some(saved)) => {
            Some(plan_scaler(saved, scaler.is_enabled()).map_err(|p| bad(path, p))?)
        }
    };
    let plan = plan(&parsed, router, vs).map_err(|e| match e {
        PlanError::Problem(p) => bad(path, p),
        PlanError::Torch(e) => e,
    })?;
    // The file's bytes are no longer needed: free them before the state is replaced.
    drop(parsed);
    drop(bytes);
    match (scaler, scaler_state) {
        (Some(scaler), Some(state)) => {
            // The scaler first (its state was checked, so only a libtorch fault can fail it),
            // put back should the router refuse its part.
            let before = scaler.state()?;
            scaler.load_state(&state)?;
            apply(router, plan).map_err(|p| {
                let _ = scaler.load_state(&before);
                bad(path, p)
            })
        }
        _ => apply(router, plan).map_err(|p| bad(path, p)),
    }
}

/// The scaler's state from the file, checked as [`GradScaler::load_state`] checks it.
fn plan_scaler(saved: &SavedScaler, enabled: bool) -> Result<GradScalerState, CheckpointError> {
    let bad = |why: String| CheckpointError::BadScaler(why);
    if enabled && !saved.enabled {
        return Err(bad("the file was written by a disabled scaler, this one is enabled \
                        (torch refuses a disabled scaler's empty state dict too)"
            .into()));
    }
    let scale = read_f32(&saved.scale).map_err(|w| bad(format!("scale: {w}")))?;
    let growth_factor =
        read_f64(&saved.growth_factor).map_err(|w| bad(format!("growth_factor: {w}")))?;
    let backoff_factor =
        read_f64(&saved.backoff_factor).map_err(|w| bad(format!("backoff_factor: {w}")))?;
    let growth_tracker = i32::try_from(saved.growth_tracker)
        .map_err(|_| bad(format!("growth_tracker {} is not an i32", saved.growth_tracker)))?;
    let growth_interval = u32::try_from(saved.growth_interval)
        .map_err(|_| bad(format!("growth_interval {} is not a u32", saved.growth_interval)))?;
    let state =
        GradScalerState { scale, growth_tracker, growth_factor, backoff_factor, growth_interval };
    if saved.enabled {
        GradScaler::check_state(&state).map_err(|e| bad(e.to_string()))?;
    }
    Ok(state)
}

/// An f32 from its 8 hex digits, which must agree with its text.
fn read_f32(saved: &SavedFloat) -> Result<f32, String> {
    let bits = match parse_hex64(&format!("{:0>16}", saved.bits)) {
        Some(bits) if saved.bits.len() == 8 => bits,
        _ => return Err(format!("bits `{}` are not 8 hex digits", saved.bits)),
    };
    let v = f32::from_bits(bits as u32);
    if format!("{v:?}") != saved.value {
        return Err(format!("value `{}` disagrees with its bits ({v:?})", saved.value));
    }
    Ok(v)
}

/// An f64 from its 16 hex digits, which must agree with its text.
fn read_f64(saved: &SavedFloat) -> Result<f64, String> {
    let v = parse_hex64(&saved.bits)
        .map(f64::from_bits)
        .ok_or_else(|| format!("bits `{}` are not 16 hex digits", saved.bits))?;
    if format!("{v:?}") != saved.value {
        return Err(format!("value `{}` disagrees with its bits ({v:?})", saved.value));
    }
    Ok(v)
}
