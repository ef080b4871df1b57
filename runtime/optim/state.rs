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
pub enum StateLayout {
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

/// The saved layout of state `name` of the built-in optimizer named `optimizer` (its display
/// name), from that optimizer's [`var_state!`] declaration; `None` for a name it does not keep
/// or an optimizer that is not built in.
pub(crate) fn saved_state_layout(optimizer: &str, name: &str) -> Option<StateLayout> {
    super::registry::by_display_name(optimizer).and_then(|b| b.state_layout(name))
}

/// Takes the named state out of a saved state as `layout` says it looks: shaped by the layout
/// and of the variable's dtype (moved to its device), or, for [`StateLayout::Scalar`], a 0-dim
/// tensor of that dtype kept on the host.
pub(crate) fn take_laid(
    state: &[(String, Tensor)],
    name: &str,
    param: &Param,
    layout: StateLayout,
) -> Result<Tensor> {
    match layout {
        StateLayout::Scalar(kind) => {
            let t = find_state(state, name, param)?;
            if t.dim() != 0 || t.kind() != kind {
                return Err(Error::Checkpoint(CheckpointError::StateMismatch {
                    variable: param.info.name.clone(),
                    state: name.to_string(),
                    expected: format!("{kind:?} []"),
                    found: format!("{:?} {:?}", t.kind(), t.size()),
                }));
            }
            Ok(t.f_to_device(tch::Device::Cpu)?.f_detach_copy()?)
        }
        _ => take_state_shaped(state, name, param, &layout.shape(&param.tensor.size())),
    }
}

/// A fresh state tensor as `layout` says it looks, all zeros: like the variable (its dtype,
/// device and memory format, as `zeros_like` makes torch.optim's states), of the variable's
/// dtype and device in the reduced shape, or a 0-dim host tensor of the layout's dtype.
pub(crate) fn zeros_laid(p: &Tensor, layout: StateLayout) -> Result<Tensor> {
    Ok(match layout {
        StateLayout::LikeVariable => p.f_zeros_like()?,
        StateLayout::Scalar(kind) => Tensor::f_zeros([], (kind, tch::Device::Cpu))?,
        StateLayout::Reduced(_) => {
            Tensor::f_zeros(layout.shape(&p.size()), (p.kind(), p.device()))?
        }
    })
}

/// Declares a built-in optimizer's per-variable state once: its struct and, from the same
/// list, its names ([`VarState::NAMES`](super::core::VarState::NAMES)), the saved layout of
/// each, its export (what `Optimizer::state` and checkpoints hold), its import from saved
/// tensors checked against the variable, zero-filled creation, the fused kernels' operands and
/// the state built from a state buffer's tensors (with the [`StateSlot`] it lives in). Each
/// field is one of
///
/// - `step: Counter`: the per-variable step counter, a `u64`, saved as torch's 0-dim int64;
/// - `name: Tensor(layout)`: a tensor with a [`StateLayout`] (`LikeVariable`,
///   `Scalar(Kind::Float)`, `Reduced(-1)`);
/// - `name: Option(layout)`: a tensor only some configs or variables keep (AMSGrad's maximum,
///   Adafactor's factored moments): `import` and `zeros` take a predicate saying which.
macro_rules! var_state {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$fattr:meta])* $field:ident : $wrap:ident $(($($layout:tt)*))?),* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug)]
        pub struct $name {
            $($(#[$fattr])* pub(crate) $field: $crate::optim::state::var_state!(@ty $wrap),)*
            /// Where its tensors live when they were made in a state buffer.
            pub(crate) slot: ::std::option::Option<$crate::optim::state::StateSlot>,
        }

        #[allow(dead_code, unused_variables)]
        impl $name {
            /// Its saved layout per name, in declaration order.
            pub(crate) const LAYOUTS: &'static [(&'static str, $crate::optim::state::StateLayout)] = &[
                $((stringify!($field), $crate::optim::state::var_state!(@layout $wrap $(($($layout)*))?)),)*
            ];

            /// A saved state, checked against its variable; an optional tensor is taken where
            /// `keeps(name)` says this config and variable keep it.
            pub(crate) fn import(
                state: &[(::std::string::String, ::tch::Tensor)],
                param: &$crate::var::Param,
                keeps: impl Fn(&str) -> bool,
            ) -> $crate::error::Result<Self> {
                Ok($name {
                    $($field: $crate::optim::state::var_state!(
                        @import $wrap, stringify!($field),
                        $crate::optim::state::var_state!(@layout $wrap $(($($layout)*))?),
                        state, param, keeps
                    ),)*
                    slot: None,
                })
            }

            /// A fresh state: counters at 0, tensors of zeros; an optional tensor where
            /// `keeps(name)`.
            pub(crate) fn zeros(
                p: &::tch::Tensor,
                keeps: impl Fn(&str) -> bool,
            ) -> $crate::error::Result<Self> {
                Ok($name {
                    $($field: $crate::optim::state::var_state!(
                        @zeros $wrap, stringify!($field),
                        $crate::optim::state::var_state!(@layout $wrap $(($($layout)*))?),
                        p, keeps
                    ),)*
                    slot: None,
                })
            }

        }

        impl $crate::optim::core::VarState for $name {
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            fn layout(name: &str) -> ::std::option::Option<$crate::optim::state::StateLayout> {
                Self::LAYOUTS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
            }

            #[allow(clippy::vec_init_then_push)]
            fn export(&self) -> ::std::vec::Vec<(&'static str, ::tch::Tensor)> {
                let mut out = ::std::vec::Vec::with_capacity(Self::NAMES.len());
                $($crate::optim::state::var_state!(@export $wrap, stringify!($field), self.$field, out);)*
                out
            }

            #[allow(unused_assignments)]
            fn operands(&self) -> [$crate::kernels::StateOperand<'_>; $crate::kernels::MAX_STATES] {
                let mut out: [$crate::kernels::StateOperand<'_>; $crate::kernels::MAX_STATES] =
                    [None; $crate::kernels::MAX_STATES];
                let mut i = 0;
                $($crate::optim::state::var_state!(@operand $wrap, stringify!($field), self.$field, out, i);)*
                out
            }

            fn slot(&self) -> ::std::option::Option<$crate::optim::state::StateSlot> {
                self.slot
            }

            fn from_buffer(
                tensors: ::std::vec::Vec<::tch::Tensor>,
                slot: ::std::option::Option<$crate::optim::state::StateSlot>,
            ) -> ::std::option::Option<Self> {
                let mut tensors = tensors.into_iter();
                Some($name {
                    $($field: $crate::optim::state::var_state!(@buffer $wrap, tensors),)*
                    slot,
                })
            }
        }
    };

    (@ty Counter) => { u64 };
    (@ty Tensor) => { ::tch::Tensor };
    (@ty Option) => { ::std::option::Option<::tch::Tensor> };

    (@layout Counter) => { $crate::optim::state::StateLayout::Scalar(::tch::Kind::Int64) };
    (@layout $wrap:ident ($($layout:tt)*)) => { $crate::optim::state::StateLayout::$($layout)* };

    (@import Counter, $n:expr, $l:expr, $state:ident, $param:ident, $keeps:ident) => {
        $crate::optim::state::take_step($state, $param)?
    };
    (@import Tensor, $n:expr, $l:expr, $state:ident, $param:ident, $keeps:ident) => {
        $crate::optim::state::take_laid($state, $n, $param, $l)?
    };
    (@import Option, $n:expr, $l:expr, $state:ident, $param:ident, $keeps:ident) => {
        if $keeps($n) { Some($crate::optim::state::take_laid($state, $n, $param, $l)?) } else { None }
    };

    (@zeros Counter, $n:expr, $l:expr, $p:ident, $keeps:ident) => { 0 };
    (@zeros Tensor, $n:expr, $l:expr, $p:ident, $keeps:ident) => {
        $crate::optim::state::zeros_laid($p, $l)?
    };
    (@zeros Option, $n:expr, $l:expr, $p:ident, $keeps:ident) => {
        if $keeps($n) { Some($crate::optim::state::zeros_laid($p, $l)?) } else { None }
    };

    (@export Counter, $n:expr, $v:expr, $out:ident) => {
        $out.push(($n, $crate::optim::state::step_tensor($v)));
    };
    (@export Tensor, $n:expr, $v:expr, $out:ident) => { $out.push(($n, $v.alias())); };
    (@export Option, $n:expr, $v:expr, $out:ident) => {
        if let Some(t) = &$v {
            $out.push(($n, t.alias()));
        }
    };

    (@operand Counter, $n:expr, $v:expr, $out:ident, $i:ident) => {};
    (@operand Tensor, $n:expr, $v:expr, $out:ident, $i:ident) => {
        if $i < $crate::kernels::MAX_STATES {
            $out[$i] = Some(($n, &$v));
        }
        $i += 1;
    };
    (@operand Option, $n:expr, $v:expr, $out:ident, $i:ident) => {
        if $i < $crate::kernels::MAX_STATES {
            $out[$i] = $v.as_ref().map(|t| ($n, t));
        }
        $i += 1;
    };

    (@buffer Counter, $t:ident) => { 0 };
    (@buffer Tensor, $t:ident) => { $t.next()? };
    (@buffer Option, $t:ident) => { $t.next() };
}
pub(crate) use var_state;

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
