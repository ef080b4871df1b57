//! Bop and Bop2ndOrder: latent-free optimizers for binary weights.
//!
//! Sign conventions follow larq 0.14: the outer sign maps 0 to +1
//! (`larq.math.sign(x) = sign(sign(x) + 0.1)`), the inner sign is the plain one. A weight flips
//! when `w * m > threshold`, stays when `w * m < threshold`, and becomes +1 at exact equality;
//! weights that are not +-1 are binarised by their first update.

use tch::Tensor;

use super::{common_methods, exec_methods, fused_step, hyperparameters, new_states, take_state};
use super::{Backend, Exec, FlatSlot, FromConfig, FusedState, Optimizer};
use crate::error::Result;
use crate::kernels::ops::{Bop2Kernel, BopKernel};
use crate::kernels::{StateOperand, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

/// Denominator guard of Bop2ndOrder's normalised momentum, fixed by the paper.
pub const BOP2_EPSILON: f64 = 1e-10;

/// Configuration of [`Bop`]; `Default` is larq's (threshold 1e-8, gamma 1e-4).
#[derive(Debug, Clone)]
pub struct BopConfig {
    /// A weight flips when `w * m` exceeds it (>= 0). Default 1e-8.
    pub threshold: Schedule,
    /// Adaptivity rate of the gradient's moving average, in (0, 1]. Default 1e-4.
    pub gamma: Schedule,
}

impl Default for BopConfig {
    fn default() -> Self {
        BopConfig { threshold: 1e-8.into(), gamma: 1e-4.into() }
    }
}

hyperparameters!("Bop", BopConfig, BopValues { threshold: NonNegative, gamma: UnitOpenClosed });

impl BopConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_schedules()
    }
}

/// Configuration of [`Bop2ndOrder`]; `Default` is the paper's code's (threshold 1e-8,
/// gamma 1e-4, sigma 1e-2).
#[derive(Debug, Clone)]
pub struct Bop2ndOrderConfig {
    /// A weight flips when `w * m / (sqrt(v) + 1e-10)` exceeds it (>= 0). Default 1e-8.
    pub threshold: Schedule,
    /// Adaptivity rate of the gradient's moving average, in (0, 1]. Default 1e-4.
    pub gamma: Schedule,
    /// Adaptivity rate of the squared gradient's moving average, in (0, 1]. Default 1e-2.
    pub sigma: Schedule,
}

impl Default for Bop2ndOrderConfig {
    fn default() -> Self {
        Bop2ndOrderConfig { threshold: 1e-8.into(), gamma: 1e-4.into(), sigma: 1e-2.into() }
    }
}

hyperparameters!(
    "Bop2ndOrder",
    Bop2ndOrderConfig,
    Bop2ndOrderValues { threshold: NonNegative, gamma: UnitOpenClosed, sigma: UnitOpenClosed }
);

impl Bop2ndOrderConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_schedules()
    }
}

/// `m <- m + rate * (x - m)`, as written in the reference.
fn moving_average(m: &mut Tensor, x: &Tensor, rate: f64) -> Result<()> {
    let _ = m.f_add_(&x.f_sub(m)?.f_mul_scalar(rate)?)?;
    Ok(())
}

/// `w <- sign(-sign(signal - threshold) * w)`, the outer sign mapping 0 to +1.
fn flip(w: &mut Tensor, signal: &Tensor, threshold: f64) -> Result<()> {
    let inner = signal.f_sub_scalar(threshold)?.f_sign()?;
    let mut outer = inner.f_neg()?.f_mul(w)?.f_sign()?;
    let _ = outer.f_add_scalar_(0.1)?;
    w.f_copy_(&outer.f_sign()?)?;
    Ok(())
}

/// Per-variable state of Bop: the gradient's moving average.
#[derive(Debug)]
pub(crate) struct BopState {
    pub(crate) m: Tensor,
    /// Where `m` lives when it was made in a state buffer.
    pub(crate) flat: Option<FlatSlot>,
}

impl BopState {
    fn export(&self) -> Vec<(&'static str, Tensor)> {
        vec![("m", self.m.alias())]
    }
}

impl FusedState for BopState {
    fn operands(&self) -> [StateOperand<'_>; MAX_STATES] {
        [Some(("m", &self.m)), None, None]
    }

    fn flat(&self) -> Option<FlatSlot> {
        self.flat
    }
}

/// Bop, the binary optimizer ([Helwegen et al. 2019](https://arxiv.org/abs/1906.02107)), as
/// larq 0.14's `larq.optimizers.Bop`.
///
/// ```
/// use caseopt::{Bop, BopConfig, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// // design.md's first worked check.
/// let w = Tensor::from_slice(&[1.0f64, -1.0, 1.0, -1.0]);
/// let mut bop = Bop::new(BopConfig { threshold: 1e-8.into(), gamma: 1e-4.into() })?;
/// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
/// bop.step_with_grads(&[Some(Tensor::from_slice(&[2e-4f64, 2e-4, -2e-4, 5e-5]))])?;
/// assert_eq!(Vec::<f64>::try_from(&w)?, vec![-1.0, -1.0, 1.0, -1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Bop {
    config: BopConfig,
    params: Vec<Param>,
    states: Vec<Option<BopState>>,
    steps: u64,
    exec: Exec,
}

impl Bop {
    const STATE_NAMES: &'static [&'static str] = &["m"];

    /// Validates `config` and builds the optimizer with no variables yet.
    pub fn new(config: BopConfig) -> Result<Self> {
        config.validate()?;
        Ok(Bop { config, params: Vec::new(), states: Vec::new(), steps: 0, exec: Exec::default() })
    }

    exec_methods!(Bop);

    /// The configuration (hyperparameters as schedules).
    pub fn config(&self) -> &BopConfig {
        &self.config
    }

    fn import_state(_: &BopConfig, state: &[(String, Tensor)], param: &Param) -> Result<BopState> {
        Ok(BopState { m: take_state(state, "m", param)?, flat: None })
    }

    /// One step: the fused kernel over every variable it takes, libtorch ops for the rest.
    fn apply(&mut self, grads: &[Option<Tensor>], hp: &BopValues) -> Result<()> {
        if self.exec.backend != Backend::Torch {
            let missing = |i: usize| grads[i].is_some() && self.states[i].is_none();
            for (i, mut st, flat) in new_states(&mut self.exec, &self.params, missing, 1)? {
                self.states[i] = st.pop().map(|m| BopState { m, flat });
            }
        }
        let kernel = BopKernel { gamma: hp.gamma, threshold: hp.threshold };
        fused_step(&mut self.exec, "Bop", &self.params, &self.states, grads, &kernel, 1, |_| {
            [0.0; 2]
        })?;
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
    fn update(&mut self, i: usize, grad: &Tensor, hp: &BopValues) -> Result<()> {
        let mut w = self.params[i].tensor.shallow_clone();
        let st = match &mut self.states[i] {
            Some(st) => st,
            empty => empty.insert(BopState { m: w.f_zeros_like()?, flat: None }),
        };
        moving_average(&mut st.m, grad, hp.gamma)?;
        let signal = w.f_mul(&st.m)?;
        flip(&mut w, &signal, hp.threshold)
    }
}

impl Optimizer for Bop {
    common_methods!("Bop");
}

impl FromConfig for Bop {
    type Config = BopConfig;
    fn from_config(config: BopConfig) -> Result<Self> {
        Self::new(config)
    }
}

/// Per-variable state of Bop2ndOrder: moving averages of the gradient and its square.
#[derive(Debug)]
pub(crate) struct Bop2ndOrderState {
    pub(crate) m: Tensor,
    pub(crate) v: Tensor,
    /// Where `m` and `v` live when they were made in a state buffer.
    pub(crate) flat: Option<FlatSlot>,
}

impl Bop2ndOrderState {
    fn export(&self) -> Vec<(&'static str, Tensor)> {
        vec![("m", self.m.alias()), ("v", self.v.alias())]
    }
}

impl FusedState for Bop2ndOrderState {
    fn operands(&self) -> [StateOperand<'_>; MAX_STATES] {
        [Some(("m", &self.m)), Some(("v", &self.v)), None]
    }

    fn flat(&self) -> Option<FlatSlot> {
        self.flat
    }
}

/// Bop with a second-order moving average (Suarez-Ramirez et al. 2021, "A Bop and beyond"):
/// the momentum is normalised by `sqrt(v) + 1e-10` before it meets the threshold.
#[derive(Debug)]
pub struct Bop2ndOrder {
    config: Bop2ndOrderConfig,
    params: Vec<Param>,
    states: Vec<Option<Bop2ndOrderState>>,
    steps: u64,
    exec: Exec,
}

impl Bop2ndOrder {
    const STATE_NAMES: &'static [&'static str] = &["m", "v"];

    /// Validates `config` and builds the optimizer with no variables yet.
    pub fn new(config: Bop2ndOrderConfig) -> Result<Self> {
        config.validate()?;
        Ok(Bop2ndOrder {
            config,
            params: Vec::new(),
            states: Vec::new(),
            steps: 0,
            exec: Exec::default(),
        })
    }

    exec_methods!(Bop2ndOrder);

    /// The configuration (hyperparameters as schedules).
    pub fn config(&self) -> &Bop2ndOrderConfig {
        &self.config
    }

    fn import_state(
        _: &Bop2ndOrderConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<Bop2ndOrderState> {
        Ok(Bop2ndOrderState {
            m: take_state(state, "m", param)?,
            v: take_state(state, "v", param)?,
            flat: None,
        })
    }

    /// One step: the fused kernel over every variable it takes, libtorch ops for the rest.
    fn apply(&mut self, grads: &[Option<Tensor>], hp: &Bop2ndOrderValues) -> Result<()> {
        if self.exec.backend != Backend::Torch {
            let missing = |i: usize| grads[i].is_some() && self.states[i].is_none();
            for (i, st, flat) in new_states(&mut self.exec, &self.params, missing, 2)? {
                let mut st = st.into_iter();
                if let (Some(m), Some(v)) = (st.next(), st.next()) {
                    self.states[i] = Some(Bop2ndOrderState { m, v, flat });
                }
            }
        }
        let kernel = Bop2Kernel {
            gamma: hp.gamma,
            sigma: hp.sigma,
            threshold: hp.threshold,
            eps: BOP2_EPSILON,
        };
        let (params, states) = (&self.params, &self.states);
        fused_step(&mut self.exec, "Bop2ndOrder", params, states, grads, &kernel, 2, |_| [0.0; 2])?;
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
    fn update(&mut self, i: usize, grad: &Tensor, hp: &Bop2ndOrderValues) -> Result<()> {
        let mut w = self.params[i].tensor.shallow_clone();
        let st = match &mut self.states[i] {
            Some(st) => st,
            empty => empty.insert(Bop2ndOrderState {
                m: w.f_zeros_like()?,
                v: w.f_zeros_like()?,
                flat: None,
            }),
        };
        moving_average(&mut st.m, grad, hp.gamma)?;
        moving_average(&mut st.v, &grad.f_mul(grad)?, hp.sigma)?;
        let mut denom = st.v.f_sqrt()?;
        let _ = denom.f_add_scalar_(BOP2_EPSILON)?;
        let signal = w.f_mul(&st.m)?.f_div(&denom)?;
        flip(&mut w, &signal, hp.threshold)
    }
}

impl Optimizer for Bop2ndOrder {
    common_methods!("Bop2ndOrder");
}

impl FromConfig for Bop2ndOrder {
    type Config = Bop2ndOrderConfig;
    fn from_config(config: Bop2ndOrderConfig) -> Result<Self> {
        Self::new(config)
    }
}
