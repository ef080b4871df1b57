//! The optimizer trait and the optimizers: [`Bop`] and [`Bop2ndOrder`] (larq), and [`Sgd`],
//! [`Adam`], [`AdamW`], [`RmsProp`], [`Adagrad`] (torch.optim 2.13 semantics).
//!
//! Every optimizer is built from a `<Name>Config` whose `Default` is the reference default and
//! whose scalar hyperparameters are [`Schedule`]s, evaluated at the optimizer's own step count
//! (first step `t = 0`). Updates run in place, under `no_grad`, on the device and in the dtype
//! of each variable.

mod adagrad;
mod adam;
mod bop;
mod rmsprop;
mod sgd;

pub use adagrad::{Adagrad, AdagradConfig};
pub use adam::{Adam, AdamConfig, AdamW, AdamWConfig};
pub use bop::{Bop, Bop2ndOrder, Bop2ndOrderConfig, BopConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use sgd::{Sgd, SgdConfig};

use tch::Tensor;

use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::var::Param;

/// An optimizer: per-variable state, a step over (parameter, gradient) pairs, its own step
/// counter, and hyperparameters readable and settable while training.
///
/// Implement it for your own type to use it in `case_optimizer!` rules (together with
/// [`FromConfig`]).
///
/// ```
/// use caseopt::{Adam, AdamConfig, Optimizer, Param, VarInfo};
/// use tch::{Device, Kind, Tensor};
///
/// let w = Tensor::ones([3], (Kind::Double, Device::Cpu));
/// let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() })?;
/// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// let g = Tensor::from_slice(&[1.0f64, -1.0, 0.0]);
/// adam.step_with_grads(&[Some(g)])?;
/// assert_eq!(adam.step_count(), 1);
/// assert_eq!(Vec::<f64>::try_from(&w)?, vec![0.9, 1.1, 1.0]);
/// adam.set_hyperparameter("lr", 0.01.into())?;
/// assert_eq!(adam.hyperparameter("lr")?, 0.01);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Optimizer: Send {
    /// The algorithm's name, e.g. `"Adam"`.
    fn name(&self) -> &'static str;

    /// Adds a variable; its state is created (zeros, or the configured initial value) at its
    /// first update, as torch.optim does.
    fn add_param(&mut self, param: Param) -> Result<()>;

    /// The variables, in the order they were added.
    fn params(&self) -> &[Param];

    /// One step with explicit gradients, aligned with [`params`](Self::params); `None` leaves
    /// that variable and its state untouched. The step counter advances by one.
    fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()>;

    /// One step with each variable's own `.grad()`; variables without a gradient are skipped.
    fn step(&mut self) -> Result<()> {
        let grads: Vec<Option<Tensor>> = self.params().iter().map(Param::grad).collect();
        self.step_with_grads(&grads)
    }

    /// Sets every variable's gradient to zero (where it has one).
    fn zero_grad(&mut self) {
        for p in self.params() {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_zero_();
            }
        }
    }

    /// Steps taken so far; schedules are evaluated at this count.
    fn step_count(&self) -> u64;

    /// Sets the step counter (used when resuming).
    fn set_step_count(&mut self, steps: u64);

    /// Names of the hyperparameters [`hyperparameter`](Self::hyperparameter) accepts.
    fn hyperparameter_names(&self) -> &'static [&'static str];

    /// A hyperparameter's schedule.
    fn schedule(&self, name: &str) -> Result<&Schedule>;

    /// A hyperparameter's value at the current step count.
    fn hyperparameter(&self, name: &str) -> Result<f64> {
        Ok(self.schedule(name)?.value(self.step_count()))
    }

    /// Replaces a hyperparameter (a constant or a schedule) while training.
    fn set_hyperparameter(&mut self, name: &str, value: Schedule) -> Result<()>;

    /// Names of the per-variable state tensors this optimizer may keep.
    fn state_names(&self) -> &'static [&'static str];

    /// The state of variable `index` as named tensors (shallow handles); empty before its first
    /// update. `"step"` is a 0-dim int64 tensor where the optimizer counts per variable.
    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)>;

    /// Replaces the state of variable `index` (from [`state`](Self::state) of an identical
    /// optimizer); an empty list clears it.
    fn set_state(&mut self, index: usize, state: Vec<(String, Tensor)>) -> Result<()>;
}

/// An optimizer built from a configuration struct; what `case_optimizer!` calls for a rule's
/// `Name<key: value, ...>`, which becomes `NameConfig { key: value, ..Default::default() }`.
///
/// ```
/// use caseopt::{Bop, FromConfig, Optimizer};
/// let bop = <Bop as FromConfig>::from_config(Default::default())?;
/// assert_eq!(bop.hyperparameter("threshold")?, 1e-8);
/// # Ok::<(), caseopt::Error>(())
/// ```
pub trait FromConfig: Optimizer + Sized {
    /// The configuration; `Default` is the reference default.
    type Config: Default;
    /// Validates the configuration and builds the optimizer.
    fn from_config(config: Self::Config) -> Result<Self>;
}

/// A hyperparameter's accepted range, checked on construction and on every value a schedule
/// yields.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Range {
    /// `v >= 0`.
    NonNegative,
    /// `v > 0`.
    Positive,
    /// `0 < v <= 1`.
    UnitOpenClosed,
    /// `0 <= v < 1`.
    UnitClosedOpen,
}

impl Range {
    fn contains(self, v: f64) -> bool {
        match self {
            Range::NonNegative => v >= 0.0,
            Range::Positive => v > 0.0,
            Range::UnitOpenClosed => v > 0.0 && v <= 1.0,
            Range::UnitClosedOpen => (0.0..1.0).contains(&v),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Range::NonNegative => ">= 0",
            Range::Positive => "> 0",
            Range::UnitOpenClosed => "in (0, 1]",
            Range::UnitClosedOpen => "in [0, 1)",
        }
    }

    pub(crate) fn check(self, optimizer: &'static str, name: &'static str, v: f64) -> Result<f64> {
        if v.is_finite() && self.contains(v) {
            Ok(v)
        } else {
            Err(Error::InvalidHyperparameter {
                optimizer,
                name,
                value: v,
                expected: self.describe(),
            })
        }
    }
}

/// Declares a config's scheduled hyperparameters once: their names, ranges, by-name access and
/// a struct of their values at one step.
macro_rules! hyperparameters {
    ($opt:literal, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? }) => {
        /// Hyperparameter values at one step.
        #[derive(Debug, Clone, Copy)]
        pub(crate) struct $values {
            $(pub(crate) $field: f64,)*
        }

        impl $config {
            pub(crate) const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Names of the scheduled hyperparameters.
            pub fn names(&self) -> &'static [&'static str] {
                Self::NAMES
            }

            /// Checks every schedule and the value each takes at step 0.
            pub(crate) fn validate_schedules(&self) -> $crate::error::Result<()> {
                $(
                    self.$field.validate().map_err(|reason| $crate::error::Error::InvalidSchedule {
                        optimizer: $opt,
                        name: stringify!($field),
                        reason,
                    })?;
                    $crate::optim::Range::$range.check($opt, stringify!($field), self.$field.value(0))?;
                )*
                Ok(())
            }

            /// Every hyperparameter's value at step `t`, each checked against its range.
            pub(crate) fn values_at(&self, t: u64) -> $crate::error::Result<$values> {
                Ok($values {
                    $($field: $crate::optim::Range::$range.check($opt, stringify!($field), self.$field.value(t))?,)*
                })
            }

            pub(crate) fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&self.$field),)*
                    _ => Err($crate::optim::unknown($opt, name, Self::NAMES)),
                }
            }

            pub(crate) fn set_schedule(&mut self, name: &str, value: $crate::schedule::Schedule) -> $crate::error::Result<()> {
                let mut next = self.clone();
                match name {
                    $(stringify!($field) => next.$field = value,)*
                    _ => return Err($crate::optim::unknown($opt, name, Self::NAMES)),
                }
                next.validate()?;
                *self = next;
                Ok(())
            }
        }
    };
}
pub(crate) use hyperparameters;

/// The parts of [`Optimizer`] every built-in optimizer shares, over fields `config`, `params`,
/// `states` and `steps`, an inherent `update(i, grad, values)`, `import_state` and the state's
/// `export`.
macro_rules! common_methods {
    ($opt:literal) => {
        fn name(&self) -> &'static str {
            $opt
        }

        fn add_param(&mut self, param: $crate::var::Param) -> $crate::error::Result<()> {
            self.params.push(param);
            self.states.push(None);
            Ok(())
        }

        fn params(&self) -> &[$crate::var::Param] {
            &self.params
        }

        fn step_count(&self) -> u64 {
            self.steps
        }

        fn set_step_count(&mut self, steps: u64) {
            self.steps = steps;
        }

        fn hyperparameter_names(&self) -> &'static [&'static str] {
            self.config.names()
        }

        fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
            self.config.schedule(name)
        }

        fn set_hyperparameter(
            &mut self,
            name: &str,
            value: $crate::schedule::Schedule,
        ) -> $crate::error::Result<()> {
            self.config.set_schedule(name, value)
        }

        fn state_names(&self) -> &'static [&'static str] {
            Self::STATE_NAMES
        }

        fn state(&self, index: usize) -> Vec<(&'static str, tch::Tensor)> {
            match self.states.get(index) {
                Some(Some(s)) => s.export(),
                _ => Vec::new(),
            }
        }

        fn set_state(
            &mut self,
            index: usize,
            state: Vec<(String, tch::Tensor)>,
        ) -> $crate::error::Result<()> {
            let Some(param) = self.params.get(index) else {
                return Err($crate::error::Error::Checkpoint(format!(
                    "{} has no variable #{index}",
                    $opt
                )));
            };
            let new = if state.is_empty() {
                None
            } else {
                Some(Self::import_state(&self.config, &state, param)?)
            };
            self.states[index] = new;
            Ok(())
        }

        fn step_with_grads(&mut self, grads: &[Option<tch::Tensor>]) -> $crate::error::Result<()> {
            if grads.len() != self.params.len() {
                return Err($crate::error::Error::GradientCount {
                    optimizer: $opt,
                    expected: self.params.len(),
                    got: grads.len(),
                });
            }
            for (p, g) in self.params.iter().zip(grads) {
                if let Some(g) = g {
                    $crate::optim::check_grad(p, g)?;
                }
            }
            let hp = self.config.values_at(self.steps)?;
            let _guard = tch::no_grad_guard();
            for i in 0..self.params.len() {
                if let Some(g) = &grads[i] {
                    self.update(i, g, &hp)?;
                }
            }
            self.steps += 1;
            Ok(())
        }
    };
}
pub(crate) use common_methods;

pub(crate) fn unknown(optimizer: &'static str, name: &str, known: &[&str]) -> Error {
    Error::UnknownHyperparameter {
        optimizer,
        name: name.to_string(),
        known: known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
    }
}

/// A gradient must have its variable's shape, dtype and device.
pub(crate) fn check_grad(p: &Param, g: &Tensor) -> Result<()> {
    let (ps, gs) = (p.tensor.size(), g.size());
    let reason = if ps != gs {
        format!("shape {gs:?} != {ps:?}")
    } else if p.tensor.kind() != g.kind() {
        format!("dtype {:?} != {:?}", g.kind(), p.tensor.kind())
    } else if p.tensor.device() != g.device() {
        format!("device {:?} != {:?}", g.device(), p.tensor.device())
    } else {
        return Ok(());
    };
    Err(Error::GradientMismatch { variable: p.info.name.clone(), reason })
}

/// Takes the named tensor out of a saved state, checking it against its variable.
pub(crate) fn take_state(state: &[(String, Tensor)], name: &str, param: &Param) -> Result<Tensor> {
    let t = find_state(state, name, param)?;
    let p = &param.tensor;
    if t.size() != p.size() || t.kind() != p.kind() {
        return Err(Error::Checkpoint(format!(
            "state `{name}` of `{}` is {:?} {:?}, the variable is {:?} {:?}",
            param.info.name,
            t.kind(),
            t.size(),
            p.kind(),
            p.size()
        )));
    }
    Ok(t.f_to_device(p.device())?.f_contiguous()?)
}

/// The per-variable step counter from a saved state.
pub(crate) fn take_step(state: &[(String, Tensor)], param: &Param) -> Result<u64> {
    let t = find_state(state, "step", param)?;
    let v = t.f_int64_value(&[]).map_err(|e| {
        Error::Checkpoint(format!("state `step` of `{}` is not a scalar: {e}", param.info.name))
    })?;
    u64::try_from(v).map_err(|_| {
        Error::Checkpoint(format!("state `step` of `{}` is negative", param.info.name))
    })
}

pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::from(step as i64)
}

fn find_state<'a>(state: &'a [(String, Tensor)], name: &str, param: &Param) -> Result<&'a Tensor> {
    state.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
        Error::Checkpoint(format!("state `{name}` of `{}` is missing", param.info.name))
    })
}

/// `grad` negated when maximizing and with `weight_decay * param` added, as torch.optim does
/// before any other use of the gradient.
pub(crate) fn adjusted_grad(
    param: &Tensor,
    grad: &Tensor,
    maximize: bool,
    weight_decay: f64,
) -> Result<Tensor> {
    let mut g = if maximize { grad.f_neg()? } else { grad.shallow_clone() };
    if weight_decay != 0.0 {
        g = g.f_add(&param.f_mul_scalar(weight_decay)?)?;
    }
    Ok(g)
}
