//! Bop, larq 0.14's latent-free optimizer for binary weights.
//!
//! Sign conventions follow larq 0.14: the outer sign maps 0 to +1
//! (`larq.math.sign(x) = sign(sign(x) + 0.1)`), the inner sign is the plain one. A weight flips
//! when `w * m > threshold`, stays when `w * m < threshold`, and becomes +1 at exact equality;
//! weights that are not +-1 are binarised by their first update.

use tch::Tensor;

use super::core::{Algorithm, BinaryAlgorithm, Optim, Values, VarState};
use super::flips::PendingFlips;
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

/// `m <- m + rate * (x - m)`, as written in the reference (its difference scaled in place: one
/// temporary, not two). Returns that temporary (of `m`'s shape and type, contiguous) for the
/// caller's next result: a fresh tensor of a large variable costs its page faults again.
pub(crate) fn moving_average(m: &mut Tensor, x: &Tensor, rate: f64) -> Result<Tensor> {
    let mut d = x.f_sub(m)?;
    let _ = d.f_mul_scalar_(rate)?;
    let _ = m.f_add_(&d)?;
    Ok(d)
}

/// `w <- sign(-sign(signal - threshold) * w)`, the outer sign mapping 0 to +1: -1 exactly where
/// `x = signal - threshold` and `w` are both positive or both negative, +1 elsewhere (ATen's
/// `sign` maps NaN to 0, so a NaN in `x` or `w` gives +1), which is what the fused kernels'
/// `math::flip` computes too. Written with masks rather than three `sign`s: fewer passes, most
/// over 1-byte booleans, and no float temporary but `signal`, in whose memory `x` is computed;
/// and the masks are what counting the flips needs ([`PendingFlips`]), so the count costs
/// nothing until someone reads it.
pub(crate) fn flip(w: &mut Tensor, mut signal: Tensor, threshold: f64) -> Result<PendingFlips> {
    let x = signal.f_sub_scalar_(threshold)?;
    let was_negative = w.f_lt(0.0)?;
    let mut negative = x.f_gt(0.0)?;
    let _ = negative.f_logical_and_(&w.f_gt(0.0)?)?;
    let mut both_negative = x.f_lt(0.0)?;
    let _ = both_negative.f_logical_and_(&was_negative)?;
    let _ = negative.f_logical_or_(&both_negative)?;
    let _ = w.f_fill_(1.0)?;
    let _ = w.f_masked_fill_(&negative, -1.0)?;
    Ok(PendingFlips::new(was_negative, negative))
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
    ) -> Result<Option<PendingFlips>> {
        let st = match state {
            Some(st) => st,
            empty => empty.insert(BopState { m: w.f_zeros_like()?, slot: None }),
        };
        let scratch = moving_average(&mut st.m, grad, hp.gamma)?;
        let signal = w.f_mul_out(&scratch, &st.m)?;
        flip(w, signal, hp.threshold).map(Some)
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
            this.flips.pending(i, PendingFlips::counted(n));
        }
        Ok(())
    }

    fn forget_staged(this: &mut Optim<Self>) {
        this.extra.forget(&mut this.exec.workspace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The mask formulation of `flip` against larq's formula in ATen's ops,
    /// `sign(sign(-sign(x) * w) + 0.1)`, on every kind of weight and signal (zeros of both signs,
    /// non-binary weights, NaN, infinities): the same bits, and its masks count exactly the
    /// weights whose sign changed. Long enough for ATen's vector bodies and scalar tails.
    #[test]
    fn flip_by_masks_is_larqs_formula_and_counts_its_sign_changes() {
        let ws = [1.0f32, -1.0, 0.3, -0.2, 0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let xs = [1e-3f32, -1e-3, 0.0, -0.0, 1e-8, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let (mut w, mut signal) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            for &a in &ws {
                for &x in &xs {
                    w.push(a);
                    signal.push(x);
                }
            }
        }
        let threshold = 1e-8;
        let w0 = Tensor::from_slice(&w);
        let signal = Tensor::from_slice(&signal);
        let inner = signal.f_sub_scalar(threshold).unwrap().sign();
        let want = ((-inner * &w0).sign() + 0.1).sign();
        let mut w1 = w0.copy();
        let pending = flip(&mut w1, signal.copy(), threshold).unwrap();
        let bits = |t: &Tensor| {
            Vec::<f32>::try_from(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&w1), bits(&want));
        let changed = w0.lt(0.0).logical_xor(&w1.lt(0.0)).sum(Kind::Int64).int64_value(&[]);
        assert!(changed > 0);
        assert_eq!(pending.count().unwrap(), changed as u64);
    }
}
