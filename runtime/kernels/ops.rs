//! The optimizers' kernels: their hyperparameters for one step, in `f64`, rounded to the
//! element type the way ATen rounds a Python scalar, and handed to the loops of [`math`]
//! with the rounding of `a + b * c` ATen's CPU kernels use ([`CpuCapability::contracts`]).

use super::aten::{self, CpuCapability};
use super::math::{
    self, AdamScalars, AdamSlices, Bop2Scalars, BopScalars, Clip, Contraction, CorrectSqrt, Decay,
    Fused, Real, Separate,
};
use super::{Kernel, MAX_STATES};
use crate::optim::Sqrt;

/// Bop with one step's hyperparameters. State: `m`.
#[derive(Debug, Clone, Copy)]
pub struct BopKernel {
    pub(crate) gamma: f64,
    pub(crate) threshold: f64,
}

impl Kernel for BopKernel {
    #[inline(always)]
    fn apply<T: Real>(
        &self,
        _: [f64; 2],
        _: f64,
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    ) -> usize {
        let [m, _, _] = states;
        let s =
            BopScalars { gamma: T::from_f64(self.gamma), threshold: T::from_f64(self.threshold) };
        math::bop(p, g, m, s)
    }
}

/// Bop2ndOrder with one step's hyperparameters. States: `m`, `v`.
#[derive(Debug, Clone, Copy)]
pub struct Bop2Kernel {
    pub(crate) gamma: f64,
    pub(crate) sigma: f64,
    pub(crate) threshold: f64,
    pub(crate) eps: f64,
}

impl Kernel for Bop2Kernel {
    #[inline(always)]
    fn apply<T: Real>(
        &self,
        _: [f64; 2],
        _: f64,
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    ) -> usize {
        let [m, v, _] = states;
        let s = Bop2Scalars {
            gamma: T::from_f64(self.gamma),
            sigma: T::from_f64(self.sigma),
            threshold: T::from_f64(self.threshold),
            eps: T::from_f64(self.eps),
        };
        math::bop2(p, g, m, v, s)
    }
}

/// Adam / AdamW with one step's hyperparameters. States: `exp_avg`, `exp_avg_sq` and, with
/// AMSGrad, `max_exp_avg_sq`. Per-variable scalars (the step counts differ when variables skip
/// steps): `[step_size, bias_correction2_sqrt]` from [`AdamKernel::scalars`].
#[derive(Debug, Clone, Copy)]
pub struct AdamKernel {
    pub(crate) lr: f64,
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) eps: f64,
    pub(crate) weight_decay: f64,
    pub(crate) decoupled: bool,
    pub(crate) amsgrad: bool,
    pub(crate) maximize: bool,
    /// The square root of the second moment: the correctly rounded one, or ATen's.
    pub(crate) sqrt: Sqrt,
}

impl AdamKernel {
    /// Number of state tensors.
    pub(crate) fn states(&self) -> usize {
        if self.amsgrad {
            3
        } else {
            2
        }
    }

    /// The per-variable scalars of a variable at its `step`-th update (1 for the first), in
    /// f64 as torch.optim computes them in Python.
    pub(crate) fn scalars(&self, step: u64) -> [f64; 2] {
        let step = step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        [self.lr / bias_correction1, bias_correction2.powf(0.5)]
    }

    /// The Adam loop with `C`'s rounding and the square root `self.sqrt` asks for: chosen once
    /// per call (a run of one variable), each choice its own monomorphic loop.
    #[inline(always)]
    fn adam<T: Real, C: Contraction>(
        &self,
        x: AdamSlices<'_, T>,
        s: AdamScalars<T>,
        clip: Clip<T>,
    ) {
        let (decay, amsgrad) = (self.decay(), self.amsgrad);
        let vml = match self.sqrt {
            Sqrt::Fast => None,
            Sqrt::Aten => aten::vml_sqrt::<T>(),
        };
        match vml {
            Some(vml) => math::adam_clipped::<T, C, _>(x, s, decay, amsgrad, clip, vml),
            // No MKL: ATen's `sqrt` is the correctly rounded one.
            None => math::adam_clipped::<T, C, _>(x, s, decay, amsgrad, clip, CorrectSqrt),
        }
    }

    fn decay(&self) -> Decay {
        match (self.weight_decay != 0.0, self.decoupled) {
            (false, _) => Decay::None,
            (true, false) => Decay::L2,
            (true, true) => Decay::Decoupled,
        }
    }
}

impl Kernel for AdamKernel {
    #[inline(always)]
    fn apply<T: Real>(
        &self,
        scalars: [f64; 2],
        clip: f64,
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    ) -> usize {
        let [m, v, max_v] = states;
        let [step_size, bias_correction2_sqrt] = scalars;
        let s = AdamScalars {
            lerp_weight: T::from_f64(1.0 - self.beta1),
            beta2: T::from_f64(self.beta2),
            one_minus_beta2: T::from_f64(1.0 - self.beta2),
            eps: T::from_f64(self.eps),
            neg_step_size: T::from_f64(-step_size),
            bias_correction2_sqrt: T::from_f64(bias_correction2_sqrt),
            weight_decay: T::from_f64(self.weight_decay),
            decay_factor: T::from_f64(1.0 - self.lr * self.weight_decay),
            grad_sign: if self.maximize { -T::ONE } else { T::ONE },
        };
        let x = AdamSlices { p, g, m, v, max_v };
        // Round as ATen's own kernels round on this CPU, so that the fused step gives
        // torch.optim's bits.
        let clip = Clip::new(clip);
        if CpuCapability::get().contracts() {
            self.adam::<T, Fused>(x, s, clip);
        } else {
            self.adam::<T, Separate>(x, s, clip);
        }
        0
    }

    fn with_sqrt(self, sqrt: Sqrt) -> Self {
        AdamKernel { sqrt, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_scalars_follow_torch_bias_corrections() {
        let k = AdamKernel {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            amsgrad: false,
            maximize: false,
            sqrt: Sqrt::Fast,
        };
        let [step_size, bc2] = k.scalars(1);
        assert!((step_size - 0.1).abs() < 1e-15);
        assert!((bc2 - 0.001f64.sqrt()).abs() < 1e-15);
        assert_eq!(k.states(), 2);
        assert_eq!(AdamKernel { amsgrad: true, ..k }.states(), 3);
        assert_eq!(
            AdamKernel { weight_decay: 0.1, decoupled: true, ..k }.decay(),
            Decay::Decoupled
        );
    }
}
