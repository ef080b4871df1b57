//! AdamW, torch.optim 2.13 semantics: Adam with decoupled weight decay. Its state and
//! update are Adam's (`adam.rs`), with the decay applied to the parameter first.

use super::adam::AdamVariant;
use super::core::Optim;
use super::hyper::hyperparameters;
use caseopt_rules::OptimizerKind;

use crate::kernels::ops::AdamKernel;
use crate::optim::Sqrt;
use crate::schedule::Schedule;

/// Configuration of [`AdamW`]; `Default` is torch.optim.AdamW's (weight decay 1e-2).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    AdamW,
    AdamWConfig,
    AdamWValues {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    }
);

/// AdamW ([Loshchilov & Hutter 2017](https://arxiv.org/abs/1711.05101)), as
/// torch.optim.AdamW 2.13: Adam with decoupled weight decay.
///
/// ```
/// use caseopt::{AdamW, AdamWConfig, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f64]);
/// let config = AdamWConfig { lr: 0.1.into(), weight_decay: 0.5.into(), ..Default::default() };
/// let mut adamw = AdamW::new(config)?;
/// adamw.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// adamw.step_with_grads(&[Some(Tensor::from_slice(&[0.0f64]))])?;
/// // With a zero gradient only the decay acts: w * (1 - lr * weight_decay).
/// assert_eq!(Vec::<f64>::try_from(&w)?, vec![0.95]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type AdamW = Optim<AdamWAlgorithm>;

/// The algorithm behind [`AdamW`]: Adam's, with the decay decoupled.
#[derive(Debug)]
pub enum AdamWAlgorithm {}

impl AdamVariant for AdamWAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::AdamW;
    type Config = AdamWConfig;

    fn step_kernel(c: &AdamWConfig, hp: &AdamWValues) -> AdamKernel {
        let AdamWValues { lr, beta1, beta2, eps, weight_decay } = *hp;
        let (decoupled, amsgrad, maximize) = (true, c.amsgrad, c.maximize);
        let sqrt = Sqrt::Fast; // the optimizer's setting replaces it (`Kernel::with_sqrt`)
        AdamKernel { lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, sqrt }
    }

    fn amsgrad(c: &AdamWConfig) -> bool {
        c.amsgrad
    }
}
