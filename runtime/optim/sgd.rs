//! SGD with momentum, dampening, Nesterov and weight decay, torch.optim 2.13 semantics.

use tch::Tensor;

use super::{adjusted_grad, common_methods, hyperparameters, take_state};
use super::{exec_methods, Exec, FromConfig, Optimizer};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Sgd`]; `Default` is torch.optim.SGD's.
#[derive(Debug, Clone)]
pub struct SgdConfig {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: Schedule,
    /// Momentum factor (>= 0). Default 0.
    pub momentum: Schedule,
    /// Dampening of the momentum (>= 0). Default 0.
    pub dampening: Schedule,
    /// L2 penalty added to the gradient (>= 0). Default 0.
    pub weight_decay: Schedule,
    /// Nesterov momentum; needs momentum > 0 and dampening 0. Default false.
    pub nesterov: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3.into(),
            momentum: 0.0.into(),
            dampening: 0.0.into(),
            weight_decay: 0.0.into(),
            nesterov: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    "SGD",
    SgdConfig,
    SgdValues {
        lr: NonNegative,
        momentum: NonNegative,
        dampening: NonNegative,
        weight_decay: NonNegative,
    }
);

impl SgdConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_schedules()?;
        if self.nesterov {
            let momentum = self.momentum.as_constant();
            let dampening = self.dampening.as_constant();
            if momentum.is_some_and(|m| m <= 0.0) || dampening.is_some_and(|d| d != 0.0) {
                return Err(Error::InvalidConfig {
                    optimizer: "SGD",
                    reason: "nesterov momentum requires a momentum > 0 and zero dampening".into(),
                });
            }
        }
        Ok(())
    }
}

/// Per-variable state: the momentum buffer, created from the first gradient.
#[derive(Debug)]
pub(crate) struct SgdState {
    momentum_buffer: Tensor,
}

impl SgdState {
    fn export(&self) -> Vec<(&'static str, Tensor)> {
        vec![("momentum_buffer", self.momentum_buffer.alias())]
    }
}

/// Stochastic gradient descent, as torch.optim.SGD 2.13 (momentum, dampening, Nesterov,
/// weight decay, maximize).
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    params: Vec<Param>,
    states: Vec<Option<SgdState>>,
    steps: u64,
    exec: Exec,
}

impl Sgd {
    const STATE_NAMES: &'static [&'static str] = &["momentum_buffer"];

    /// Validates `config` and builds the optimizer with no variables yet.
    ///
    /// ```
    /// use caseopt::{Sgd, SgdConfig};
    /// let bad = Sgd::new(SgdConfig { nesterov: true, ..Default::default() });
    /// assert!(bad.is_err()); // nesterov needs momentum
    /// ```
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sgd { config, params: Vec::new(), states: Vec::new(), steps: 0, exec: Exec::default() })
    }

    exec_methods!(Sgd);

    /// The configuration (hyperparameters as schedules).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    fn import_state(_: &SgdConfig, state: &[(String, Tensor)], param: &Param) -> Result<SgdState> {
        Ok(SgdState { momentum_buffer: take_state(state, "momentum_buffer", param)? })
    }

    /// One step, with libtorch ops (SGD has no fused kernel).
    fn apply(&mut self, grads: &[Option<Tensor>], hp: &SgdValues) -> Result<()> {
        self.exec.torch_only("SGD", &self.params)?;
        super::check_grads(&self.params, grads)?;
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                self.update(i, g, hp)?;
            }
        }
        Ok(())
    }

    /// One variable's update with libtorch ops.
    fn update(&mut self, i: usize, grad: &Tensor, hp: &SgdValues) -> Result<()> {
        if self.config.nesterov && (hp.momentum <= 0.0 || hp.dampening != 0.0) {
            return Err(Error::InvalidConfig {
                optimizer: "SGD",
                reason: format!(
                    "nesterov momentum requires a momentum > 0 and zero dampening, the schedules give momentum {} and dampening {} at step {}",
                    hp.momentum, hp.dampening, self.steps
                ),
            });
        }
        let mut p = self.params[i].tensor.shallow_clone();
        let mut g = adjusted_grad(&p, grad, self.config.maximize, hp.weight_decay)?;
        if hp.momentum != 0.0 {
            let buf = match &mut self.states[i] {
                Some(st) => {
                    let _ = st.momentum_buffer.f_mul_scalar_(hp.momentum)?;
                    let _ = st.momentum_buffer.f_add_(&g.f_mul_scalar(1.0 - hp.dampening)?)?;
                    st.momentum_buffer.shallow_clone()
                }
                empty => {
                    let buf = g.f_detach_copy()?;
                    empty.insert(SgdState { momentum_buffer: buf }).momentum_buffer.shallow_clone()
                }
            };
            g = if self.config.nesterov { g.f_add(&buf.f_mul_scalar(hp.momentum)?)? } else { buf };
        }
        let _ = p.f_add_(&g.f_mul_scalar(-hp.lr)?)?;
        Ok(())
    }
}

impl Optimizer for Sgd {
    common_methods!("SGD");
}

impl FromConfig for Sgd {
    type Config = SgdConfig;
    fn from_config(config: SgdConfig) -> Result<Self> {
        Self::new(config)
    }
}
