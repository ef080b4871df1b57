//! Bop, larq 0.14's latent-free optimizer for binary weights.
//!
//! Sign conventions follow larq 0.14: the outer sign maps 0 to +1
//! (`larq.math.sign(x) = sign(sign(x) + 0.1)`), the inner sign is the plain one. A weight flips
//! when `w * m > threshold`, stays when `w * m < threshold`, and becomes +1 at exact equality;
//! weights that are not +-1 are binarised by their first update.

use tch::Tensor;

use super::core::{Algorithm, BinaryAlgorithm, Optim, Values};
use super::flips::PendingFlips;
use super::hyper::hyperparameters;
use super::state::var_state;
use super::staging::Staging;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::multi::{self, List};
use crate::kernels::ops::BopKernel;
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Bop`]; `Default` is larq's (threshold 1e-8, gamma 1e-4).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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

hyperparameters!(Bop, BopConfig, BopValues { threshold, gamma });

/// One variable's Bop or Bop2ndOrder step on libtorch ops, larq's rounding:
/// `m <- m + gamma * (g - m)` as written in the reference (the subtraction, the product and the
/// sum each rounded: a `lerp` rounds once, and differs), Bop2ndOrder's `v` likewise with
/// `g * g` and `sigma`, then `w <- sign(-sign(signal - threshold) * w)` with `signal = w * m`
/// (Bop2ndOrder's divided by `sqrt(v) + eps`), the outer sign mapping 0 to +1: -1 exactly where
/// `x = signal - threshold` and `w` are both positive or both negative, +1 elsewhere (ATen's
/// `sign` maps NaN to 0, so a NaN in `x` or `w` gives +1), which is what the fused kernels'
/// `math::flip` computes too. `[gamma, sigma, threshold, eps]`; `v` for Bop2ndOrder.
///
/// The ops are ATen's, issued from one call to the shim (`kernels::aten::bop`): on small tensors
/// most of an op's cost is the way to it (tch's FFI, its boxed handles and error checks), which
/// this pays once per variable, not 14 times. The flip is written as `sign(x) * w > 0` (exact: a
/// product by -1, 0 or +1) rather than with three `sign`s, fewer passes and one float
/// temporary, in whose memory `x` is computed; and its masks are what counting the flips needs
/// ([`PendingFlips`]), so the count costs nothing until someone reads it. `spare`, what the
/// variable's previous step left to count with, lends its masks' memory to this step's.
pub(crate) fn libtorch_step(
    w: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: Option<&mut Tensor>,
    scalars: [f64; 4],
    spare: Option<PendingFlips>,
) -> Result<PendingFlips> {
    let masks = aten::bop(w, grad, m, v, scalars, spare.and_then(PendingFlips::into_masks))?;
    Ok(PendingFlips::new(masks.was_negative, masks.negative))
}

/// Bop's or Bop2ndOrder's step of one group on ATen's `_foreach_*` ops, rounding as the
/// libtorch path (`libtorch_step`) does; returns each variable's flip count, left on
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

var_state! {
    /// Per-variable state of Bop: the gradient's moving average.
    pub struct BopState {
        m: Tensor(LikeVariable),
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
    const BINARY: bool = true;
    type Config = BopConfig;
    type State = BopState;
    type Kernel = BopKernel;
    type Extra = Staging;

    fn import_state(_: &BopConfig, state: &[(String, Tensor)], param: &Param) -> Result<BopState> {
        BopState::import(state, param, |_| true)
    }

    fn update(
        config: &BopConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<BopState>,
        hp: &BopValues,
        step: u64,
    ) -> Result<()> {
        Self::update_counting_flips(config, w, grad, state, hp, step, None).map(drop)
    }

    fn update_counting_flips(
        _: &BopConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<BopState>,
        hp: &BopValues,
        _: u64,
        spare: Option<PendingFlips>,
    ) -> Result<Option<PendingFlips>> {
        let st = match state {
            Some(st) => st,
            empty => empty.insert(BopState { m: w.f_zeros_like()?, slot: None }),
        };
        let scalars = [hp.gamma, 0.0, hp.threshold, 0.0];
        libtorch_step(w, grad, &mut st.m, None, scalars, spare).map(Some)
    }

    fn kernel(_: &BopConfig, hp: &BopValues) -> Option<BopKernel> {
        Some(BopKernel { gamma: hp.gamma, threshold: hp.threshold })
    }

    fn kernel_states(_: &BopKernel) -> usize {
        1
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

    /// The flip of `libtorch_step` (`sign(x) * w > 0`, with masks) against larq's formula in
    /// ATen's ops, `sign(sign(-sign(x) * w) + 0.1)`, on every kind of weight and signal (zeros
    /// of both signs, non-binary weights, NaN, infinities): the same bits, and its masks count
    /// exactly the weights whose sign changed. Long enough for ATen's vector bodies and scalar
    /// tails.
    #[test]
    fn flip_is_larqs_formula_and_its_masks_count_its_sign_changes() {
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
        let masks = aten::bop_flip(&mut w1, &mut signal.copy(), threshold).unwrap();
        let pending = PendingFlips::new(masks.was_negative, masks.negative);
        let bits = |t: &Tensor| {
            Vec::<f32>::try_from(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&w1), bits(&want));
        let changed = w0.lt(0.0).logical_xor(&w1.lt(0.0)).sum(Kind::Int64).int64_value(&[]);
        assert!(changed > 0);
        assert_eq!(pending.count().unwrap(), changed as u64);
    }

    /// A whole `libtorch_step`, Bop's and Bop2ndOrder's, against the reference written op by op
    /// with tch (larq's moving average, `sign(sign(-sign(x) * w) + 0.1)`), on weights of every
    /// kind and gradients of every size, over a few steps: the same bits in `w`, `m` and `v`, in
    /// f32 and f64, and the masks count the weights whose sign changed.
    #[test]
    fn one_shim_call_is_the_op_by_op_reference() {
        for kind in [Kind::Float, Kind::Double] {
            let n = 1000;
            let i = Tensor::arange(n, (Kind::Double, tch::Device::Cpu));
            let w0 = (&i * 0.37).sin().f_sign().unwrap().to_kind(kind);
            // A few weights that are not +-1, zeros of both signs, a NaN.
            let w0 = w0.index_put(
                &[Some(Tensor::from_slice(&[3i64, 7, 11, 13]))],
                &Tensor::from_slice(&[0.3, 0.0, -0.0, f64::NAN]).to_kind(kind),
                false,
            );
            let (mut w, mut m, mut v) = (w0.copy(), w0.zeros_like(), w0.zeros_like());
            let (mut rw, mut rm, mut rv) = (w0.copy(), w0.zeros_like(), w0.zeros_like());
            let mut spare: Option<PendingFlips> = None;
            for step in 0..4 {
                let g = ((&i * (1.3 + step as f64)).cos() * (&i * 0.01 - 4.0).exp()).to_kind(kind);
                let (gamma, sigma, threshold, eps) = (1e-1, 1e-2, 1e-8, 1e-10);
                for second in [false, true] {
                    let (mut w, mut m, mut v) = (w.copy(), m.copy(), v.copy());
                    let vv = if second { Some(&mut v) } else { None };
                    let scalars = [gamma, sigma, threshold, eps];
                    let pending = libtorch_step(&mut w, &g, &mut m, vv, scalars, None).unwrap();
                    let rm2 = &rm + (&g - &rm) * gamma;
                    let mut signal = &rw * &rm2;
                    let rv2 = &rv + (&g * &g - &rv) * sigma;
                    if second {
                        signal /= rv2.sqrt() + eps;
                        assert_eq!(bits(&v), bits(&rv2));
                    }
                    let want = ((-(signal - threshold).sign() * &rw).sign() + 0.1).sign();
                    assert_eq!(bits(&w), bits(&want), "{kind:?} step {step} second {second}");
                    assert_eq!(bits(&m), bits(&rm2));
                    let changed = rw.lt(0.0).logical_xor(&want.lt(0.0)).sum(Kind::Int64);
                    assert_eq!(pending.count().unwrap(), changed.int64_value(&[]) as u64);
                }
                // The chain itself hands each step the previous one's masks, which it fills.
                let reused = spare.as_ref().and_then(PendingFlips::mask_addresses);
                let scalars = [gamma, sigma, threshold, eps];
                let pending =
                    libtorch_step(&mut w, &g, &mut m, Some(&mut v), scalars, spare.take())
                        .unwrap();
                rm = &rm + (&g - &rm) * gamma;
                rv = &rv + (&g * &g - &rv) * sigma;
                let signal = &rw * &rm / (rv.sqrt() + eps);
                let rw2 = ((-(signal - threshold).sign() * &rw).sign() + 0.1).sign();
                assert_eq!(bits(&w), bits(&rw2));
                let changed = rw.lt(0.0).logical_xor(&rw2.lt(0.0)).sum(Kind::Int64);
                assert_eq!(pending.count().unwrap(), changed.int64_value(&[]) as u64);
                assert_eq!(reused.is_some(), step > 0);
                if reused.is_some() {
                    assert_eq!(pending.mask_addresses(), reused, "{kind:?} step {step}");
                }
                rw = rw2;
                spare = Some(pending);
            }
        }
    }

    /// Masks that cannot hold a step's (another shape; a count, not masks) are not used: the
    /// step makes its own, and counts right.
    #[test]
    fn a_spare_that_does_not_fit_is_dropped() {
        let w0 = Tensor::from_slice(&[1.0f32, -1.0, 1.0, -1.0, 1.0, -1.0]);
        let g = Tensor::from_slice(&[1.0f32, -1.0, -1.0, 1.0, 0.0, 0.0]);
        let scalars = [1.0, 0.0, 0.5, 0.0];
        let step = |spare| {
            let (mut w, mut m) = (w0.copy(), w0.zeros_like());
            let pending = libtorch_step(&mut w, &g, &mut m, None, scalars, spare).unwrap();
            (Vec::<f32>::try_from(&w).unwrap(), pending)
        };
        let (want, fresh) = step(None);
        assert_eq!(want, [-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]);
        assert_eq!(fresh.count().unwrap(), 2);
        let (mut other, mut m) = (Tensor::ones([3], FLOAT_CPU), Tensor::zeros([3], FLOAT_CPU));
        let g3 = Tensor::ones([3], FLOAT_CPU);
        let small = libtorch_step(&mut other, &g3, &mut m, None, scalars, None).unwrap();
        let addresses = small.mask_addresses();
        for spare in [small, PendingFlips::counted(Tensor::from(5i64))] {
            let (w, pending) = step(Some(spare));
            assert_eq!(w, want);
            assert_eq!(pending.count().unwrap(), 2);
            assert_ne!(pending.mask_addresses(), addresses);
        }
        // One that fits is filled.
        let addresses = fresh.mask_addresses();
        let (w, pending) = step(Some(fresh));
        assert_eq!((w, pending.count().unwrap()), (want, 2));
        assert_eq!(pending.mask_addresses(), addresses);
    }

    const FLOAT_CPU: (Kind, tch::Device) = (Kind::Float, tch::Device::Cpu);

    fn bits(t: &Tensor) -> Vec<u64> {
        let t = t.to_kind(Kind::Double);
        Vec::<f64>::try_from(&t).unwrap().iter().map(|x| x.to_bits()).collect()
    }
}
