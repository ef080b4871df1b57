//! Per-variable state as the optimizers keep and exchange it: where state tensors live in a
//! state buffer, and the checked reading of saved states (checkpoints, `set_state`).

use tch::{Kind, Tensor};

use crate::error::{CheckpointError, Error, Result};
use crate::kernels::MAX_STATES;
use crate::var::Param;

/// Where a variable's state tensors live inside one of its optimizer's state buffers
/// (`Exec::state_buffers`): buffer `buffer`, state `s` starting at element `offsets[s]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSlot {
    pub(crate) buffer: usize,
    pub(crate) offsets: [usize; MAX_STATES],
}

/// How a built-in optimizer's saved state tensor looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateLayout {
    /// Its variable's shape and dtype.
    LikeVariable,
    /// A 0-dim tensor of this dtype.
    Scalar(Kind),
    /// Its variable's dtype and shape but for dimension `dim` (counted from the end, as
    /// `-1` is the last), which is 1: Adafactor's factored second moments.
    Reduced(i64),
}

impl StateLayout {
    /// The shape this layout gives a state of a variable of shape `variable`.
    pub(crate) fn shape(self, variable: &[i64]) -> Vec<i64> {
        match self {
            StateLayout::LikeVariable => variable.to_vec(),
            StateLayout::Scalar(_) => Vec::new(),
            StateLayout::Reduced(dim) => reduced_shape(variable, dim),
        }
    }
}

/// `shape` with dimension `dim` (negative: from the end) set to 1; unchanged where it has no
/// such dimension.
pub(crate) fn reduced_shape(shape: &[i64], dim: i64) -> Vec<i64> {
    let mut out = shape.to_vec();
    let n = out.len() as i64;
    let i = if dim < 0 { n + dim } else { dim };
    if (0..n).contains(&i) {
        out[i as usize] = 1;
    }
    out
}

/// The layout of the built-in optimizers' state `name`: torch's per-variable `step` counters
/// are 0-dim int64 (as [`step_tensor`] writes them), NAdam's `mu_product` a 0-dim f32 (as
/// torch keeps it), Adafactor's `row_var` and `col_var` its variable's shape reduced over the
/// last and the second-to-last dimension, every other state is shaped like its variable.
pub(crate) fn saved_state_layout(name: &str) -> StateLayout {
    match name {
        "step" => StateLayout::Scalar(Kind::Int64),
        "mu_product" => StateLayout::Scalar(Kind::Float),
        "row_var" => StateLayout::Reduced(-1),
        "col_var" => StateLayout::Reduced(-2),
        _ => StateLayout::LikeVariable,
    }
}

/// Takes the named tensor out of a saved state, checking it against its variable.
pub(crate) fn take_state(state: &[(String, Tensor)], name: &str, param: &Param) -> Result<Tensor> {
    take_state_shaped(state, name, param, &param.tensor.size())
}

/// Takes the named tensor out of a saved state, checking that it has its variable's dtype and
/// the shape `shape`; moved to the variable's device.
pub(crate) fn take_state_shaped(
    state: &[(String, Tensor)],
    name: &str,
    param: &Param,
    shape: &[i64],
) -> Result<Tensor> {
    let t = find_state(state, name, param)?;
    let p = &param.tensor;
    if t.size() != shape || t.kind() != p.kind() {
        return Err(Error::Checkpoint(CheckpointError::StateMismatch {
            variable: param.info.name.clone(),
            state: name.to_string(),
            expected: format!("{:?} {:?}", p.kind(), shape),
            found: format!("{:?} {:?}", t.kind(), t.size()),
        }));
    }
    Ok(t.f_to_device(p.device())?.f_contiguous()?)
}

/// The largest per-variable step counter a saved state may hold: 2^53, beyond any run, and the
/// last count an f64 (the bias corrections) holds exactly; a larger one is a forged or damaged
/// state, refused before it could overflow a step.
pub(crate) const MAX_STEP: u64 = 1 << 53;

/// The per-variable step counter from a saved state, at most [`MAX_STEP`].
pub(crate) fn take_step(state: &[(String, Tensor)], param: &Param) -> Result<u64> {
    let t = find_state(state, "step", param)?;
    let bad = |reason: String| {
        Error::Checkpoint(CheckpointError::BadStepCounter {
            variable: param.info.name.clone(),
            reason,
        })
    };
    let v = t.f_int64_value(&[]).map_err(|e| bad(format!("is not a scalar: {e}")))?;
    let step = u64::try_from(v).map_err(|_| bad("is negative".into()))?;
    if step > MAX_STEP {
        return Err(bad(format!("{step} is beyond 2^53, more steps than any run takes")));
    }
    Ok(step)
}

/// A per-variable step counter as `state()` exports it: a 0-dim int64 tensor.
pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::from(step as i64)
}

fn find_state<'a>(state: &'a [(String, Tensor)], name: &str, param: &Param) -> Result<&'a Tensor> {
    state.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
        Error::Checkpoint(CheckpointError::StateMissing {
            variable: param.info.name.clone(),
            state: name.to_string(),
        })
    })
}
