//! Bop, larq 0.14's latent-free optimizer for binary weights.
//!
//! Sign conventions follow larq 0.14: the outer sign maps 0 to +1
//! (`larq.math.sign(x) = sign(sign(x) + 0.1)`), the inner sign is the plain one. A weight flips
//! when `w * m > threshold`, stays when `w * m < threshold`, and becomes +1 at exact equality;
//! weights that are not +-1 are binarised by their first update.

use tch::Tensor;

use super::core::{Algorithm, BinaryAlgorithm, Optim, Values, VarState};
use super::flips::count_flips;
use super::hyper::hyperparameters;
use super::staging::Staging;
use super::state::{take_state, StateSlot};
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::multi::{self, List};
use crate::kernels::ops::BopKernel;
use crate::kernels::{StateOperand, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

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

hyperparameters!(Bop, BopConfig, BopValues { threshold: NonNegative, gamma: UnitOpenClosed });

/// `m <- m + rate * (x - m)`, as written in the reference.
pub(crate) fn moving_average(m: &mut Tensor, x: &Tensor, rate: f64) -> Result<()> {
    let _ = m.f_add_(&x.f_sub(m)?.f_mul_scalar(rate)?)?;
    Ok(())
}

/// `w <- sign(-sign(signal - threshold) * w)`, the outer sign mapping 0 to +1. Returns how
/// many weights changed sign ([`count_flips`], on the mask the step computes anyway), as a
/// 0-dim tensor on `w`'s device.
pub(crate) fn flip(w: &mut Tensor, signal: &Tensor, threshold: f64) -> Result<Tensor> {
    let inner = signal.f_sub_scalar(threshold)?.f_sign()?;
    let mut outer = inner.f_neg()?.f_mul(w)?.f_sign()?;
    let _ = outer.f_add_scalar_(0.1)?;
    let new = outer.f_sign()?;
    let flips = count_flips(w, &new)?;
    w.f_copy_(&new)?;
    Ok(flips)
}

/// Bop's or Bop2ndOrder's step of one group on ATen's `_foreach_*` ops, rounding as the
/// libtorch path (`moving_average`, `flip`) does; returns each variable's flip count, left on
/// its device. `[gamma, sigma, threshold, eps]`; `vs` for Bop2ndOrder.
pub(crate) fn multi_binary(
    params: &[Param],
    grads: &[Option<Tensor>],
    group: &[usize],
    ms: &List<'_>,
    vs: Option<&List<'_>>,
    scalars: [f64; 4],
) -> Result<Vec<Tensor>> {
    let w = List::of(group.iter().map(|&i| &params[i].tensor));
    let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
    multi::bop([&w, &g, ms], vs, scalars)
}

/// Per-variable state of Bop: the gradient's moving average.
#[derive(Debug)]
pub struct BopState {
    pub(crate) m: Tensor,
    /// Where `m` lives when it was made in a state buffer.
    pub(crate) slot: Option<StateSlot>,
}

impl VarState for BopState {
    fn export(&self) -> Vec<(&'static str, Tensor)> {
        vec![("m", self.m.alias())]
    }

    fn operands(&self) -> [StateOperand<'_>; MAX_STATES] {
        [Some(("m", &self.m)), None, None]
    }

    fn slot(&self) -> Option<StateSlot> {
        self.slot
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
/// // The first worked check of docs/design.md.
/// let w = Tensor::from_slice(&[1.0f64, -1.0, 1.0, -1.0]);
/// let mut bop = Bop::new(BopConfig { threshold: 1e-8.into(), gamma: 1e-4.into() })?;
/// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
/// bop.step_with_grads(&[Some(Tensor::from_slice(&[2e-4f64, 2e-4, -2e-4, 5e-5]))])?;
/// assert_eq!(Vec::<f64>::try_from(&w)?, vec![-1.0, -1.0, 1.0, -1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Bop = Optim<BopAlgorithm>;

/// The algorithm behind [`Bop`].
#[derive(Debug)]
pub enum BopAlgorithm {}

impl BinaryAlgorithm for BopAlgorithm {}

impl Algorithm for BopAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Bop;
    const STATE_NAMES: &'static [&'static str] = &["m"];
    const BINARY: bool = true;
    type Config = BopConfig;
    type State = BopState;
    type Kernel = BopKernel;
    type Extra = Staging;

    fn import_state(_: &BopConfig, state: &[(String, Tensor)], param: &Param) -> Result<BopState> {
        Ok(BopState { m: take_state(state, "m", param)?, slot: None })
    }

    fn update(
        config: &BopConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<BopState>,
        hp: &BopValues,
        step: u64,
    ) -> Result<()> {
        Self::update_counting_flips(config, w, grad, state, hp, step).map(drop)
    }

    fn update_counting_flips(
        _: &BopConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<BopState>,
        hp: &BopValues,
        _: u64,
    ) -> Result<Option<Tensor>> {
        let st = match state {
            Some(st) => st,
            empty => empty.insert(BopState { m: w.f_zeros_like()?, slot: None }),
        };
        moving_average(&mut st.m, grad, hp.gamma)?;
        let signal = w.f_mul(&st.m)?;
        flip(w, &signal, hp.threshold).map(Some)
    }

    fn kernel(_: &BopConfig, hp: &BopValues) -> Option<BopKernel> {
        Some(BopKernel { gamma: hp.gamma, threshold: hp.threshold })
    }

    fn kernel_states(_: &BopKernel) -> usize {
        1
    }

    fn state_from_buffer(mut tensors: Vec<Tensor>, slot: Option<StateSlot>) -> Option<BopState> {
        tensors.pop().map(|m| BopState { m, slot })
    }

    /// Commits the step staged for exactly these gradients and hyperparameters, if any, then
    /// runs the rest of the step as usual.
    fn apply(this: &mut Optim<Self>, grads: &[Option<Tensor>], hp: &Values<Self>) -> Result<()> {
        let committed = Staging::commit(this, grads, hp);
        let grads = committed.as_deref().unwrap_or(grads);
        this.run_step(grads, hp)
    }

    /// larq's Bop on `_foreach_*` ops (see `multi_binary`).
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &BopValues,
        group: &[usize],
    ) -> Result<()> {
        for &i in group {
            if this.states[i].is_none() {
                let m = this.params[i].tensor.f_zeros_like()?;
                this.states[i] = Some(BopState { m, slot: None });
            }
        }
        let flips = {
            let ms = List::of(group.iter().filter_map(|&i| this.states[i].as_ref().map(|s| &s.m)));
            multi_binary(&this.params, grads, group, &ms, None, [hp.gamma, 0.0, hp.threshold, 0.0])?
        };
        for (&i, n) in group.iter().zip(flips) {
            this.flips.pending(i, n);
        }
        Ok(())
    }

    fn forget_staged(this: &mut Optim<Self>) {
        this.extra.forget(&mut this.exec.workspace);
    }
}
