//! Lion (Chen et al. 2023), as optax 0.2's `lion` computes it. torch.optim has no Lion; optax's
//! is the reference (tests/fixtures/gen_lion.py makes the fixtures from it).

use tch::Tensor;

use super::core::{Algorithm, Optim};
use super::hyper::hyperparameters;
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::aten::CpuCapability;
use crate::kernels::math::{select, Clip, Contraction, Fused, Real, Separate};
use crate::kernels::{Kernel, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Lion`]; `Default` is optax's `lion` (b1 0.9, b2 0.99, weight decay
/// 1e-3) with the paper's suggested learning rate, 1e-4 (optax has no default for it).
///
/// optax's `b1` and `b2` are `beta1` and `beta2` here, as torch names its betas.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LionConfig {
    /// Learning rate (>= 0). Default 1e-4 (the paper: 3-10x smaller than AdamW's).
    pub lr: Schedule,
    /// Weight of the momentum in the interpolation whose sign is the update, in [0, 1).
    /// Default 0.9.
    pub beta1: Schedule,
    /// Decay of the momentum, in [0, 1). Default 0.99.
    pub beta2: Schedule,
    /// Decoupled weight decay (>= 0): the update is `lr * (sign(...) + weight_decay * w)`.
    /// Default 1e-3 (the paper: 3-10x larger than AdamW's).
    pub weight_decay: Schedule,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            lr: 1e-4.into(),
            beta1: 0.9.into(),
            beta2: 0.99.into(),
            weight_decay: 1e-3.into(),
        }
    }
}

hyperparameters!(
    Lion,
    LionConfig,
    LionValues {
        lr,
        beta1,
        beta2,
        weight_decay,
    }
);

var_state! {
    /// Per-variable state of Lion: the momentum (optax's `mu`), zeros at the start.
    pub struct LionState {
        exp_avg: Tensor(LikeVariable),
    }
}

/// Lion, EvoLved Sign Momentum ([Chen et al. 2023](https://arxiv.org/abs/2302.06675)), as
/// optax's `lion`: per variable, with momentum `m` (zeros at the start),
///
/// ```text
/// u = sign((1 - beta1) * g + beta1 * m)
/// w <- w + (-lr) * (u + weight_decay * w)      (decoupled decay, skipped when it is 0)
/// m <- (1 - beta2) * g + beta2 * m
/// ```
///
/// with each `a * b + c` rounded once on a CPU where ATen's kernels contract it (AVX2,
/// AVX-512), as jitted optax does there, and twice elsewhere, as optax op by op: the fused
/// kernel and the libtorch path give optax's bits (docs/parity.md). `sign` is torch's: 0 for a
/// zero or NaN interpolation (optax's `jnp.sign` keeps a NaN).
///
/// ```
/// use caseopt::{Lion, LionConfig, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f64, 1.0]);
/// let config = LionConfig { lr: 0.1.into(), weight_decay: 0.0.into(), ..Default::default() };
/// let mut lion = Lion::new(config)?;
/// lion.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// lion.step_with_grads(&[Some(Tensor::from_slice(&[3.0f64, -1e-6]))])?;
/// // Every weight moves by lr, whatever the gradient's size: the update is a sign.
/// assert_eq!(Vec::<f64>::try_from(&w)?, vec![0.9, 1.1]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Lion = Optim<LionAlgorithm>;

/// The algorithm behind [`Lion`].
#[derive(Debug)]
pub enum LionAlgorithm {}

fn lion_kernel(hp: &LionValues) -> LionKernel {
    let LionValues { lr, beta1, beta2, weight_decay } = *hp;
    LionKernel { lr, beta1, beta2, weight_decay }
}

impl Algorithm for LionAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Lion;
    type Config = LionConfig;
    type State = LionState;
    type Kernel = LionKernel;
    type Extra = ();

    fn import_state(
        _: &LionConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<LionState> {
        LionState::import(state, param, |_| true)
    }

    /// optax's `scale_by_lion`, `add_decayed_weights`, `scale_by_learning_rate` and
    /// `apply_updates`, op for op, each `a * b + c` an ATen `add` with `alpha`: one rounding
    /// where ATen's kernels contract it (AVX2, AVX-512), as jitted optax on such a CPU, two
    /// elsewhere, as optax op by op.
    fn update(
        _: &LionConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<LionState>,
        hp: &LionValues,
        _: u64,
    ) -> Result<()> {
        let LionValues { lr, beta1, beta2, weight_decay } = *hp;
        let st = match state {
            Some(st) => st,
            empty => empty.insert(LionState::zeros(p, |_| true)?),
        };
        let m = &mut st.exp_avg;
        let mut u = aten::add(&m.f_mul_scalar(beta1)?, grad, 1.0 - beta1)?.f_sign()?;
        if weight_decay != 0.0 {
            u = aten::add(&u, p, weight_decay)?;
        }
        aten::add_(p, &u, -lr)?;
        let _ = m.f_mul_scalar_(beta2)?;
        aten::add_(m, grad, 1.0 - beta2)?;
        Ok(())
    }

    fn kernel(_: &LionConfig, hp: &LionValues) -> Option<LionKernel> {
        Some(lion_kernel(hp))
    }

    fn kernel_states(_: &LionKernel) -> usize {
        1
    }

    /// torch.optim has no Lion, so no multi-tensor op set to follow: the multi-tensor backend
    /// runs the libtorch update per variable (the same bits on every device ATen rounds alike).
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &LionValues,
        group: &[usize],
    ) -> Result<()> {
        for &i in group {
            if let Some(g) = &grads[i] {
                let mut p = this.params[i].tensor.shallow_clone();
                Self::update(&this.config, &mut p, g, &mut this.states[i], hp, this.steps)?;
            }
        }
        Ok(())
    }
}

// The fused kernel: one pass over each variable's elements, for every instruction set the
// kernels are built for (the loops are generic over the element type and the rounding of
// `a * b + c`; runtime/kernels/ instantiates them per instruction set).

/// Lion with one step's hyperparameters. State: `exp_avg`. Each `a * b + c` of optax's update
/// rounds once where ATen's kernels contract (as jitted optax does on a CPU with FMA) and twice
/// elsewhere (as optax op by op does), like the libtorch path's `add` with `alpha`.
#[derive(Debug, Clone, Copy)]
pub struct LionKernel {
    pub(crate) lr: f64,
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) weight_decay: f64,
}

impl Kernel for LionKernel {
    #[inline(always)]
    fn apply<T: Real>(
        &self,
        _: [f64; 2],
        clip: f64,
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    ) -> usize {
        let [m, _, _] = states;
        let s = LionScalars {
            one_minus_beta1: T::from_f64(1.0 - self.beta1),
            beta1: T::from_f64(self.beta1),
            one_minus_beta2: T::from_f64(1.0 - self.beta2),
            beta2: T::from_f64(self.beta2),
            weight_decay: T::from_f64(self.weight_decay),
            neg_lr: T::from_f64(-self.lr),
        };
        let (decay, clip) = (self.weight_decay != 0.0, Clip::new(clip));
        if CpuCapability::get().contracts() {
            lion::<T, Fused>(p, g, m, s, decay, clip);
        } else {
            lion::<T, Separate>(p, g, m, s, decay, clip);
        }
        0
    }
}

/// Lion's scalars, already rounded to the element type as XLA rounds each Python float that
/// optax multiplies an f32 array by.
#[derive(Debug, Clone, Copy)]
struct LionScalars<T> {
    one_minus_beta1: T,
    beta1: T,
    one_minus_beta2: T,
    beta2: T,
    weight_decay: T,
    /// `-lr`, optax's `scale_by_learning_rate` factor.
    neg_lr: T,
}

/// `torch.sign` as ATen computes it (vector body and scalar tail alike): `(x > 0) - (x < 0)`,
/// so 0, -0 and NaN give +0.
#[inline(always)]
fn sign<T: Real>(x: T) -> T {
    select(x > T::ZERO, T::ONE, T::ZERO) - select(x < T::ZERO, T::ONE, T::ZERO)
}

/// One Lion element, optax's `lion` with each `a * b + c` rounded as `C` says (jitted optax on
/// a CPU with FMA contracts every one, as ATen's AVX2/AVX-512 `add` with `alpha` does; optax
/// op by op, and ATen's baseline, round twice): `u = sign((1 - b1) * g + b1 * m)`,
/// `u = wd * p + u` when `DECAY`, `p = (-lr) * u + p` (clamped to the constraint),
/// `m = (1 - b2) * g + b2 * m`. Returns the new parameter and moment.
#[inline(always)]
fn lion_element<T: Real, C: Contraction, const DECAY: bool>(
    p: T,
    g: T,
    m: T,
    s: LionScalars<T>,
    clip: Clip<T>,
) -> (T, T) {
    let mut u = sign(C::madd(s.one_minus_beta1, g, s.beta1 * m));
    if DECAY {
        u = C::madd(s.weight_decay, p, u);
    }
    let p = clip.apply(C::madd(s.neg_lr, u, p));
    (p, C::madd(s.one_minus_beta2, g, s.beta2 * m))
}

/// One Lion step over a run of elements ([`lion_element`] each); `decay` is false when the
/// weight decay is zero, which optax's `add_decayed_weights` then skips.
#[inline(always)]
fn lion<T: Real, C: Contraction>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    s: LionScalars<T>,
    decay: bool,
    clip: Clip<T>,
) {
    let n = p.len();
    let (g, m) = (&g[..n], &mut m[..n]);
    if decay {
        for i in 0..n {
            (p[i], m[i]) = lion_element::<T, C, true>(p[i], g[i], m[i], s, clip);
        }
    } else {
        for i in 0..n {
            (p[i], m[i]) = lion_element::<T, C, false>(p[i], g[i], m[i], s, clip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lion_takes_the_sign_of_the_interpolation() {
        let s = LionScalars::<f64> {
            one_minus_beta1: 0.1,
            beta1: 0.9,
            one_minus_beta2: 0.01,
            beta2: 0.99,
            weight_decay: 0.5,
            neg_lr: -0.1,
        };
        // c = 0.1 * g + 0.9 * m: positive, negative, zero (g = m = 0) and NaN.
        let mut p = [1.0f64, 1.0, 1.0, 1.0];
        let mut m = [0.0, 1.0, 0.0, 0.0];
        let inf = Clip::new(f64::INFINITY);
        lion::<_, Separate>(&mut p, &[1.0, -20.0, 0.0, f64::NAN], &mut m, s, false, inf);
        assert_eq!(p, [0.9, 1.1, 1.0, 1.0], "sign 0 (torch.sign) for a zero or NaN interpolation");
        assert_eq!(m[..3], [0.01 * 1.0, 0.01 * -20.0 + 0.99 * 1.0, 0.0]);
        assert!(m[3].is_nan());
        // Decoupled decay: p - lr * (sign + wd * p); and the clamp before the store.
        let (mut p, mut m) = ([2.0f64, 2.0], [0.0, 0.0]);
        lion::<_, Separate>(&mut p, &[1.0, 1.0], &mut m, s, true, Clip::new(1.5));
        assert_eq!(p, [1.5, 1.5]);
        let (mut p, mut m) = ([2.0f64], [0.0]);
        lion::<_, Fused>(&mut p, &[-1.0], &mut m, s, true, inf);
        assert_eq!(p, [2.0], "-lr * (sign + wd * p) = -0.1 * (-1 + 0.5 * 2) = 0");
    }
}
