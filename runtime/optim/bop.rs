//! Bop and Bop2ndOrder: latent-free optimizers for binary weights.
//!
//! Sign conventions follow larq 0.14: the outer sign maps 0 to +1
//! (`larq.math.sign(x) = sign(sign(x) + 0.1)`), the inner sign is the plain one. A weight flips
//! when `w * m > threshold`, stays when `w * m < threshold`, and becomes +1 at exact equality;
//! weights that are not +-1 are binarised by their first update.

use tch::Tensor;

use super::{common_methods, exec_methods, fused_step, hyperparameters, new_states, take_state};
use super::{Backend, Exec, FlatSlot, FromConfig, FusedState, Optimizer, StageReport, StagedStep};
use crate::error::Result;
use crate::kernels::math::BopScalars;
use crate::kernels::ops::{Bop2Kernel, BopKernel};
use crate::kernels::{stage, Operands, StateOperand, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

/// Elements below which a step is not staged for the router's non-finite check
/// ([`Optimizer::stage_step`]): the router's separate scan of a few MiB of gradients leaves
/// them in cache for the update, and staging would cost a second state buffer for no gain.
const STAGE_MIN_ELEMENTS: i64 = 1 << 20;

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
/// Under a router's non-finite check (its default policy), a Bop whose f32 variables hold at
/// least 2^20 elements computes each step in the pass that checks its gradients and commits it
/// once the whole step is accepted; it then keeps a second copy of its state buffer (4 more
/// bytes per element) for that. The results are the same bits either way.
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

    /// Stages the coming step for the router's non-finite check (see [`stage`]): the variables
    /// whose state already lives in an f32 state buffer, when there are enough of them.
    fn stage(&mut self, grads: &[Option<Tensor>]) -> Result<Option<StageReport>> {
        self.exec.drop_staged();
        if self.exec.backend == Backend::Torch || grads.len() != self.params.len() {
            return Ok(None);
        }
        let states = &self.states;
        let eligible =
            |i: usize| grads[i].is_some() && states[i].as_ref().is_some_and(|s| s.flat.is_some());
        let elements: i64 = (0..self.params.len())
            .filter(|&i| eligible(i))
            .map(|i| self.params[i].info.numel())
            .sum();
        if elements < STAGE_MIN_ELEMENTS {
            return Ok(None);
        }
        let hp = self.config.values_at(self.steps)?;
        let exec = &mut self.exec;
        exec.alts.resize_with(exec.chunks.len(), || None);
        for (chunk, alt) in exec.chunks.iter().zip(exec.alts.iter_mut()) {
            if alt.is_none() && chunk.kind() == tch::Kind::Float {
                *alt = Some(chunk.f_empty_like()?);
            }
        }
        let threads = exec.threads();
        let mut refused = std::mem::take(&mut exec.refused);
        refused.clear();
        let mut batch = exec.workspace.batch(1);
        let vars = self.params.iter().zip(grads).zip(states).enumerate().filter_map(
            |(index, ((p, g), st))| {
                let st = st.as_ref()?;
                let flat = st.flat?;
                Some(Operands {
                    index,
                    param: &p.tensor,
                    grad: g.as_ref()?,
                    states: st.operands(),
                    state_buffer: Some((flat.chunk, flat.offsets)),
                })
            },
        );
        // Refused variables (on another path, or with a mismatched gradient) are simply not
        // covered: the step handles them as it would without staging.
        batch.queue(vars, &exec.chunks, &mut refused);
        refused.clear();
        exec.refused = refused;
        // As the kernel rounds them (`BopKernel`).
        let scalars = BopScalars { gamma: hp.gamma as f32, threshold: hp.threshold as f32 };
        let Ok(staged) = batch.stage_bop(scalars, &exec.chunks, &exec.alts, threads) else {
            return Ok(None);
        };
        let report = StageReport {
            covered: staged.covered.clone(),
            first_non_finite: staged.first_non_finite,
        };
        let grads = staged
            .covered
            .iter()
            .filter_map(|&i| grads[i].as_ref().map(|g| (i, g.data_ptr() as usize)))
            .collect();
        exec.staged = Some(StagedStep {
            steps: self.steps,
            hyperparameters: vec![hp.gamma, hp.threshold],
            grads,
            staged,
        });
        Ok(Some(report))
    }

    /// Commits the step staged for exactly these gradients and hyperparameters, if any:
    /// returns the gradients still to apply (the covered ones removed), or `None` when there
    /// was nothing to commit (the whole step then runs as usual).
    fn commit_staged(
        &mut self,
        grads: &[Option<Tensor>],
        hp: &BopValues,
    ) -> Option<Vec<Option<Tensor>>> {
        let st = self.exec.take_staged(self.steps, &[hp.gamma, hp.threshold], grads)?;
        let StagedStep { staged, .. } = st;
        let params = &self.params;
        let exec = &mut self.exec;
        let committed = stage::commit(
            &staged,
            &mut exec.workspace,
            |i| params.get(i).map(|p: &Param| &p.tensor),
            &exec.chunks,
            &exec.alts,
        );
        let rest = committed.is_ok().then(|| {
            let mut rest: Vec<Option<Tensor>> =
                grads.iter().map(|g| g.as_ref().map(Tensor::shallow_clone)).collect();
            for &i in &staged.covered {
                rest[i] = None;
            }
            rest
        });
        staged.recycle(&mut exec.workspace);
        rest
    }

    /// One step: the fused kernel over every variable it takes, libtorch ops for the rest.
    fn apply(&mut self, grads: &[Option<Tensor>], hp: &BopValues) -> Result<()> {
        let committed = self.commit_staged(grads, hp);
        let grads = committed.as_deref().unwrap_or(grads);
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

    fn stage_step(&mut self, grads: &[Option<Tensor>]) -> Result<Option<StageReport>> {
        self.stage(grads)
    }

    fn drop_staged(&mut self) {
        self.exec.drop_staged();
    }
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
