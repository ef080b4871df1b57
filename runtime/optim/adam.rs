//! Adam and AdamW, torch.optim 2.13 semantics (single-tensor path, same update order).

use tch::Tensor;

use super::{adjusted_grad, common_methods, exec_methods, fused_step, hyperparameters};
use super::{new_states, step_tensor, take_state, take_step};
use super::{Backend, Exec, FlatSlot, FromConfig, FusedState, Optimizer};
use crate::error::Result;
use crate::kernels::ops::AdamKernel;
use crate::kernels::{StateOperand, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Adam`]; `Default` is torch.optim.Adam's.
///
/// torch's `betas=(b1, b2)` are the two fields `beta1` and `beta2` here, so that each can be a
/// schedule.
#[derive(Debug, Clone)]
pub struct AdamConfig {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: Schedule,
    /// Decay of the first moment, in [0, 1). Default 0.9.
    pub beta1: Schedule,
    /// Decay of the second moment, in [0, 1). Default 0.999.
    pub beta2: Schedule,
    /// Added to the denominator (> 0). Default 1e-8.
    pub eps: Schedule,
    /// L2 penalty added to the gradient (>= 0). Default 0.
    pub weight_decay: Schedule,
    /// Use the maximum of past second moments (AMSGrad). Default false.
    pub amsgrad: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3.into(),
            beta1: 0.9.into(),
            beta2: 0.999.into(),
            eps: 1e-8.into(),
            weight_decay: 0.0.into(),
            amsgrad: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    "Adam",
    AdamConfig,
    AdamValues {
        lr: NonNegative,
        beta1: UnitClosedOpen,
        beta2: UnitClosedOpen,
        eps: Positive,
        weight_decay: NonNegative,
    }
);

impl AdamConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_schedules()
    }
}

/// Configuration of [`AdamW`]; `Default` is torch.optim.AdamW's (weight decay 1e-2).
#[derive(Debug, Clone)]
pub struct AdamWConfig {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: Schedule,
    /// Decay of the first moment, in [0, 1). Default 0.9.
    pub beta1: Schedule,
    /// Decay of the second moment, in [0, 1). Default 0.999.
    pub beta2: Schedule,
    /// Added to the denominator (> 0). Default 1e-8.
    pub eps: Schedule,
    /// Decoupled weight decay: parameters are multiplied by `1 - lr * weight_decay` (>= 0).
    /// Default 1e-2.
    pub weight_decay: Schedule,
    /// Use the maximum of past second moments (AMSGrad). Default false.
    pub amsgrad: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3.into(),
            beta1: 0.9.into(),
            beta2: 0.999.into(),
            eps: 1e-8.into(),
            weight_decay: 1e-2.into(),
            amsgrad: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    "AdamW",
    AdamWConfig,
    AdamWValues {
        lr: NonNegative,
        beta1: UnitClosedOpen,
        beta2: UnitClosedOpen,
        eps: Positive,
        weight_decay: NonNegative,
    }
);

impl AdamWConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_schedules()
    }
}

/// Per-variable state of Adam and AdamW.
#[derive(Debug)]
pub(crate) struct AdamState {
    pub(crate) step: u64,
    pub(crate) exp_avg: Tensor,
    pub(crate) exp_avg_sq: Tensor,
    pub(crate) max_exp_avg_sq: Option<Tensor>,
    /// Where the moments live when they were made in a state buffer.
    pub(crate) flat: Option<FlatSlot>,
}

impl AdamState {
    fn zeros(p: &Tensor, amsgrad: bool) -> Result<Self> {
        Ok(AdamState {
            step: 0,
            exp_avg: p.f_zeros_like()?,
            exp_avg_sq: p.f_zeros_like()?,
            max_exp_avg_sq: if amsgrad { Some(p.f_zeros_like()?) } else { None },
            flat: None,
        })
    }

    /// A fresh state from the tensors [`new_states`] made (two, or three with AMSGrad).
    fn from_new(states: Vec<Tensor>, flat: Option<FlatSlot>) -> Option<Self> {
        let mut st = states.into_iter();
        let (exp_avg, exp_avg_sq) = (st.next()?, st.next()?);
        Some(AdamState { step: 0, exp_avg, exp_avg_sq, max_exp_avg_sq: st.next(), flat })
    }

    fn export(&self) -> Vec<(&'static str, Tensor)> {
        let mut out = vec![
            ("step", step_tensor(self.step)),
            ("exp_avg", self.exp_avg.alias()),
            ("exp_avg_sq", self.exp_avg_sq.alias()),
        ];
        if let Some(m) = &self.max_exp_avg_sq {
            out.push(("max_exp_avg_sq", m.alias()));
        }
        out
    }

    fn import(state: &[(String, Tensor)], param: &Param, amsgrad: bool) -> Result<Self> {
        Ok(AdamState {
            step: take_step(state, param)?,
            exp_avg: take_state(state, "exp_avg", param)?,
            exp_avg_sq: take_state(state, "exp_avg_sq", param)?,
            max_exp_avg_sq: if amsgrad {
                Some(take_state(state, "max_exp_avg_sq", param)?)
            } else {
                None
            },
            flat: None,
        })
    }
}

impl FusedState for AdamState {
    fn operands(&self) -> [StateOperand<'_>; MAX_STATES] {
        [
            Some(("exp_avg", &self.exp_avg)),
            Some(("exp_avg_sq", &self.exp_avg_sq)),
            self.max_exp_avg_sq.as_ref().map(|t| ("max_exp_avg_sq", t)),
        ]
    }

    fn flat(&self) -> Option<FlatSlot> {
        self.flat
    }
}

/// torch.optim's `_single_tensor_adam`, op for op.
/// Takes the same scalars as the fused kernel, [`AdamKernel`].
fn adam_update(p: &mut Tensor, grad: &Tensor, st: &mut AdamState, h: &AdamKernel) -> Result<()> {
    st.step += 1;
    let grad = if h.decoupled {
        if h.weight_decay != 0.0 {
            let _ = p.f_mul_scalar_(1.0 - h.lr * h.weight_decay)?;
        }
        adjusted_grad(p, grad, h.maximize, 0.0)?
    } else {
        adjusted_grad(p, grad, h.maximize, h.weight_decay)?
    };
    let _ = st.exp_avg.f_lerp_(&grad, 1.0 - h.beta1)?;
    let _ = st.exp_avg_sq.f_mul_scalar_(h.beta2)?;
    let _ = st.exp_avg_sq.f_add_(&grad.f_mul_scalar(1.0 - h.beta2)?.f_mul(&grad)?)?;
    let step = st.step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    let step_size = h.lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    let second = match &mut st.max_exp_avg_sq {
        Some(max) if h.amsgrad => {
            let _ = max.f_maximum_out(max, &st.exp_avg_sq)?;
            max.shallow_clone()
        }
        _ => st.exp_avg_sq.shallow_clone(),
    };
    let mut denom = second.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(h.eps)?;
    // addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom.
    let _ = p.f_add_(&st.exp_avg.f_mul_scalar(-step_size)?.f_div(&denom)?)?;
    Ok(())
}

macro_rules! adam_like {
    ($ty:ident, $config:ident, $values:ident, $name:literal, $decoupled:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $ty {
            config: $config,
            params: Vec<Param>,
            states: Vec<Option<AdamState>>,
            steps: u64,
            exec: Exec,
        }

        impl $ty {
            const STATE_NAMES: &'static [&'static str] =
                &["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

            /// Validates `config` and builds the optimizer with no variables yet.
            pub fn new(config: $config) -> Result<Self> {
                config.validate()?;
                Ok($ty {
                    config,
                    params: Vec::new(),
                    states: Vec::new(),
                    steps: 0,
                    exec: Exec::default(),
                })
            }

            exec_methods!($ty);

            /// The scalars of one update at this step's hyperparameter values, shared by the
            /// fused kernel and the libtorch path.
            fn step_scalars(&self, hp: &$values) -> AdamKernel {
                AdamKernel {
                    lr: hp.lr,
                    beta1: hp.beta1,
                    beta2: hp.beta2,
                    eps: hp.eps,
                    weight_decay: hp.weight_decay,
                    decoupled: $decoupled,
                    amsgrad: self.config.amsgrad,
                    maximize: self.config.maximize,
                }
            }

            /// The configuration (hyperparameters as schedules).
            pub fn config(&self) -> &$config {
                &self.config
            }

            fn import_state(
                config: &$config,
                state: &[(String, Tensor)],
                param: &Param,
            ) -> Result<AdamState> {
                AdamState::import(state, param, config.amsgrad)
            }

            /// One step: the fused kernel over every variable it takes, libtorch ops for the
            /// rest.
            fn apply(&mut self, grads: &[Option<Tensor>], hp: &$values) -> Result<()> {
                let amsgrad = self.config.amsgrad;
                if self.exec.backend != Backend::Torch {
                    let missing = |i: usize| grads[i].is_some() && self.states[i].is_none();
                    let count = if amsgrad { 3 } else { 2 };
                    for (i, st, flat) in new_states(&mut self.exec, &self.params, missing, count)? {
                        self.states[i] = AdamState::from_new(st, flat);
                    }
                }
                let kernel = self.step_scalars(hp);
                // Variables mostly share a step count: compute the bias corrections once.
                let mut last: Option<(u64, [f64; 2])> = None;
                let scalars = |st: &AdamState| match last {
                    Some((step, s)) if step == st.step + 1 => s,
                    _ => {
                        let s = kernel.scalars(st.step + 1);
                        last = Some((st.step + 1, s));
                        s
                    }
                };
                let (params, states) = (&self.params, &self.states);
                fused_step(
                    &mut self.exec,
                    $name,
                    params,
                    states,
                    grads,
                    &kernel,
                    kernel.states(),
                    scalars,
                )?;
                for i in self.exec.workspace.updated() {
                    if let Some(st) = &mut self.states[i] {
                        st.step += 1;
                    }
                }
                let rest = std::mem::take(&mut self.exec.rest);
                for &i in &rest {
                    if let Some(g) = &grads[i] {
                        self.update(i, g, hp)?;
                    }
                }
                self.exec.rest = rest;
                Ok(())
            }

            /// One variable's update with libtorch ops.
            fn update(&mut self, i: usize, grad: &Tensor, hp: &$values) -> Result<()> {
                let h = self.step_scalars(hp);
                let amsgrad = self.config.amsgrad;
                let mut p = self.params[i].tensor.shallow_clone();
                let st = match &mut self.states[i] {
                    Some(st) => st,
                    empty => empty.insert(AdamState::zeros(&p, amsgrad)?),
                };
                adam_update(&mut p, grad, st, &h)
            }
        }

        impl Optimizer for $ty {
            common_methods!($name);
        }

        impl FromConfig for $ty {
            type Config = $config;
            fn from_config(config: $config) -> Result<Self> {
                Self::new(config)
            }
        }
    };
}

adam_like!(
    Adam,
    AdamConfig,
    AdamValues,
    "Adam",
    false,
    "Adam ([Kingma & Ba 2014](https://arxiv.org/abs/1412.6980)), as torch.optim.Adam 2.13."
);

adam_like!(
    AdamW,
    AdamWConfig,
    AdamWValues,
    "AdamW",
    true,
    "AdamW ([Loshchilov & Hutter 2017](https://arxiv.org/abs/1711.05101)), as torch.optim.AdamW \
     2.13: Adam with decoupled weight decay."
);
