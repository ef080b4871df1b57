//! AdamW, torch.optim 2.13 semantics: Adam with decoupled weight decay. Its state and
//! update are Adam's ([`adam_update`]), with the decay applied to the parameter first.

use tch::Tensor;

use super::adam::{adam_update, AdamState};
use super::core::{Algorithm, Core};
use super::hyper::hyperparameters;
use super::state::StateSlot;
use crate::error::Result;
use crate::kernels::ops::AdamKernel;
use crate::schedule::Schedule;
use crate::var::Param;

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
    /// The scalars of one update at this step's values, shared by the fused kernel and the
    /// libtorch path.
    fn step_kernel(&self, hp: &AdamWValues) -> AdamKernel {
        let AdamWValues { lr, beta1, beta2, eps, weight_decay } = *hp;
        let (decoupled, amsgrad, maximize) = (true, self.amsgrad, self.maximize);
        AdamKernel { lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize }
    }
}

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
#[derive(Debug)]
pub struct AdamW {
    core: Core<AdamW>,
}

impl AdamW {
    /// Validates `config` and builds the optimizer with no variables yet.
    pub fn new(config: AdamWConfig) -> Result<Self> {
        Core::new(config).map(Self::from_core)
    }

    /// The configuration (hyperparameters as schedules).
    pub fn config(&self) -> &AdamWConfig {
        &self.core.config
    }
}

impl Algorithm for AdamW {
    const NAME: &'static str = "AdamW";
    const STATE_NAMES: &'static [&'static str] =
        &["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
    type Config = AdamWConfig;
    type State = AdamState;
    type Kernel = AdamKernel;

    fn core(&self) -> &Core<Self> {
        &self.core
    }

    fn core_mut(&mut self) -> &mut Core<Self> {
        &mut self.core
    }

    fn from_core(core: Core<Self>) -> Self {
        AdamW { core }
    }

    fn import_state(
        c: &AdamWConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<AdamState> {
        AdamState::import(state, param, c.amsgrad)
    }

    fn update(
        c: &AdamWConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<AdamState>,
        hp: &AdamWValues,
        _: u64,
    ) -> Result<()> {
        adam_update(p, grad, state, &c.step_kernel(hp))
    }

    fn kernel(c: &AdamWConfig, hp: &AdamWValues) -> Option<AdamKernel> {
        Some(c.step_kernel(hp))
    }

    fn kernel_states(kernel: &AdamKernel) -> usize {
        kernel.states()
    }

    fn state_from_buffer(tensors: Vec<Tensor>, slot: Option<StateSlot>) -> Option<AdamState> {
        AdamState::from_buffer(tensors, slot)
    }

    fn scalars_key(state: &AdamState) -> u64 {
        state.step + 1
    }

    fn scalars(kernel: &AdamKernel, step: u64) -> [f64; 2] {
        kernel.scalars(step)
    }

    fn after_kernel(state: &mut AdamState) {
        state.step += 1;
    }
}
