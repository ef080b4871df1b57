//! The two ways of training the binary kernels (`--recipe`), each as larq writes it:
//!
//! - `bop` (the default): larq's `CaseOptimizer` example, Bop for the 1-bit kernels
//!   (`threshold 1e-6, gamma 1e-3`) and `Adam(0.01)` for everything else; the kernels start
//!   as random +-1 (see `model`).
//! - `latent-adam`: larq's "Introduction to BNNs with Larq" (docs/larq/tutorials/mnist.ipynb in
//!   larq/docs): real-valued latent kernels binarised by `ste_sign` in the forward pass,
//!   Glorot-uniform, trained with `optimizer='adam'` (Keras's defaults: learning rate 1e-3,
//!   epsilon 1e-7) like every other variable, and clipped to [-1, 1] after every step
//!   (`kernel_constraint="weight_clip"`). The kernels are still declared 1-bit, so the rule
//!   `binary => Adam` claims them and the constraint is set on that rule; under Adam a 1-bit
//!   variable is a latent weight, so the router does not warn that it holds values other than
//!   -1 and +1.

use caseopt::amp::Autocast;
use caseopt::{case_optimizer, Constraint, KernelInit, Router};
use clap::ValueEnum;
use tch::{nn, Device, Kind};

/// How the binary kernels are trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Recipe {
    /// Bop for the binary kernels, Adam(0.01) for the rest.
    Bop,
    /// Adam(1e-3) on latent real-valued kernels clipped to [-1, 1], and on the rest.
    LatentAdam,
}

impl Recipe {
    /// The name `--recipe` takes.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Bop => "bop",
            Recipe::LatentAdam => "latent-adam",
        }
    }

    /// How the recipe is stored in a checkpoint's run state.
    pub fn code(self) -> i64 {
        match self {
            Recipe::Bop => 0,
            Recipe::LatentAdam => 1,
        }
    }

    /// The recipe stored as `code`.
    pub fn from_code(code: i64) -> Option<Recipe> {
        [Recipe::Bop, Recipe::LatentAdam].into_iter().find(|r| r.code() == code)
    }

    /// How the kernels start.
    pub fn kernel_init(self) -> KernelInit {
        match self {
            // The signs of larq's Glorot-uniform kernels, which is all its forward pass and
            // Bop's first step make of them.
            Recipe::Bop => KernelInit::RandomSign,
            // Latent weights: their magnitudes matter (the clip, the STE's window).
            Recipe::LatentAdam => KernelInit::GlorotUniform,
        }
    }

    /// Whether the recipe trains with a binary optimizer, whose flips are worth watching.
    pub fn flips(self) -> bool {
        self == Recipe::Bop
    }

    /// The router over every trainable variable of `vs`.
    pub fn router(self, vs: &nn::VarStore) -> caseopt::Result<Box<dyn Router>> {
        Ok(match self {
            Recipe::Bop => Box::new(
                case_optimizer! {
                    binary => Bop<threshold: 1e-6, gamma: 1e-3>,
                    _ => Adam<lr: 0.01>,
                }
                .build(vs)?,
            ),
            Recipe::LatentAdam => {
                let mut router = case_optimizer! {
                    binary => Adam<lr: 1e-3, eps: 1e-7>,
                    _ => Adam<lr: 1e-3, eps: 1e-7>,
                }
                .build(vs)?;
                router.set_rule_constraint(0, Some(Constraint::weight_clip(1.0)?))?;
                Box::new(router)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for r in [Recipe::Bop, Recipe::LatentAdam] {
            assert_eq!(Recipe::from_code(r.code()), Some(r));
            assert_eq!(Recipe::from_str(r.name(), false), Ok(r));
        }
        assert_eq!(Recipe::from_code(7), None);
    }
}

/// The precision of the forward and backward passes (`--precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// Every op in f32.
    F32,
    /// Under autocast in bfloat16 (CPU's or CUDA's): convolutions and matrix products in
    /// bfloat16, losses and the other ops of autocast's f32 list in f32; the variables, their
    /// gradients and the optimizers' state stay f32. No loss scaling: bfloat16 has f32's
    /// exponent range, so no gradient underflows that would not in f32.
    Bf16,
}

impl Precision {
    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// How the precision is stored in a checkpoint's run state.
    pub fn code(self) -> i64 {
        match self {
            Precision::F32 => 0,
            Precision::Bf16 => 1,
        }
    }

    /// The precision stored as `code`.
    pub fn from_code(code: i64) -> Option<Precision> {
        [Precision::F32, Precision::Bf16].into_iter().find(|p| p.code() == code)
    }

    /// The autocast region for one forward pass on `device` (`None` in f32).
    pub fn autocast(self, device: Device) -> caseopt::Result<Option<Autocast>> {
        match self {
            Precision::F32 => Ok(None),
            Precision::Bf16 => Autocast::enter(device, Kind::BFloat16).map(Some),
        }
    }
}
