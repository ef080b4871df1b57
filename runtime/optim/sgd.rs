//! SGD with momentum, dampening, Nesterov and weight decay, torch.optim 2.13 semantics.

use tch::Tensor;

use super::core::{Algorithm, NoKernel, Optim};
use super::grad::adjusted_grad;
use super::hyper::{hyperparameters, Hyperparameters};
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::{Error, Result};
use crate::kernels::aten;
use crate::kernels::multi::{self, List, SgdArgs};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Sgd`]; `Default` is torch.optim.SGD's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    Sgd,
    SgdConfig,
    SgdValues {
        lr,
        momentum,
        dampening,
        weight_decay,
    },
    extra_checks = SgdConfig::check_nesterov
);

impl SgdConfig {
    /// Nesterov momentum needs a momentum > 0 and zero dampening, as far as constants tell.
    fn check_nesterov(&self) -> Result<()> {
        if self.nesterov {
            let momentum = self.momentum.as_constant();
            let dampening = self.dampening.as_constant();
            if momentum.is_some_and(|m| m <= 0.0) || dampening.is_some_and(|d| d != 0.0) {
                return Err(Error::InvalidConfig {
                    optimizer: Self::OPTIMIZER,
                    reason: "nesterov momentum requires a momentum > 0 and zero dampening".into(),
                });
            }
        }
        Ok(())
    }
}

var_state! {
    /// Per-variable state: the momentum buffer, created from the first gradient.
    pub struct SgdState {
        momentum_buffer: Tensor(LikeVariable),
    }
}

/// Stochastic gradient descent, as torch.optim.SGD 2.13 (momentum, dampening, Nesterov,
/// weight decay, maximize).
pub type Sgd = Optim<SgdAlgorithm>;

/// Nesterov momentum needs a momentum and no dampening, at every step's values.
fn check_nesterov(c: &SgdConfig, hp: &SgdValues, step: u64) -> Result<()> {
    if c.nesterov && (hp.momentum <= 0.0 || hp.dampening != 0.0) {
        return Err(Error::InvalidConfig {
            optimizer: SgdAlgorithm::NAME,
            reason: format!(
                "nesterov momentum requires a momentum > 0 and zero dampening, the schedules give momentum {} and dampening {} at step {}",
                hp.momentum, hp.dampening, step
            ),
        });
    }
    Ok(())
}

/// The algorithm behind [`Sgd`].
#[derive(Debug)]
pub enum SgdAlgorithm {}

impl Algorithm for SgdAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Sgd;
    type Config = SgdConfig;
    type State = SgdState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(_: &SgdConfig, state: &[(String, Tensor)], param: &Param) -> Result<SgdState> {
        SgdState::import(state, param, |_| true)
    }

    fn update(
        c: &SgdConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<SgdState>,
        hp: &SgdValues,
        step: u64,
    ) -> Result<()> {
        check_nesterov(c, hp, step)?;
        let mut g = adjusted_grad(p, grad, c.maximize, hp.weight_decay)?;
        if hp.momentum != 0.0 {
            let buf = match state {
                Some(st) => {
                    let _ = st.momentum_buffer.f_mul_scalar_(hp.momentum)?;
                    aten::add_(&mut st.momentum_buffer, &g, 1.0 - hp.dampening)?;
                    st.momentum_buffer.shallow_clone()
                }
                empty => {
                    let buf = g.f_detach_copy()?;
                    empty.insert(SgdState { momentum_buffer: buf, slot: None }).momentum_buffer.shallow_clone()
                }
            };
            g = if c.nesterov { aten::add(&g, &buf, hp.momentum)? } else { buf };
        }
        aten::add_(p, &g, -hp.lr)?;
        Ok(())
    }

    /// torch.optim's `_fused_sgd` (`fused=True`): `_fused_sgd_`, with `is_first_step` for the
    /// variables without a momentum buffer yet (fresh buffers the kernel fills, as torch makes
    /// them); those with one and those without take a call each.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &SgdValues,
        group: &[usize],
    ) -> Result<()> {
        let c = &this.config;
        check_nesterov(c, hp, this.steps)?;
        let args = SgdArgs {
            lr: hp.lr,
            momentum: hp.momentum,
            dampening: hp.dampening,
            weight_decay: hp.weight_decay,
            nesterov: c.nesterov,
            maximize: c.maximize,
        };
        let params = |idx: &[usize]| List::of(idx.iter().map(|&i| &this.params[i].tensor));
        let grads_of = |idx: &[usize]| List::of(idx.iter().filter_map(|&i| grads[i].as_ref()));
        if hp.momentum == 0.0 {
            return multi::fused_sgd(&params(group), &grads_of(group), None, args, false);
        }
        let (old, new): (Vec<usize>, Vec<usize>) =
            group.iter().partition(|&&i| this.states[i].is_some());
        if !old.is_empty() {
            let bufs = List::of(
                old.iter().filter_map(|&i| this.states[i].as_ref().map(|s| &s.momentum_buffer)),
            );
            multi::fused_sgd(&params(&old), &grads_of(&old), Some(&bufs), args, false)?;
        }
        if !new.is_empty() {
            let fresh = new
                .iter()
                .filter_map(|&i| grads[i].as_ref().map(Tensor::f_empty_like))
                .collect::<Result<Vec<_>, _>>()?;
            let bufs = List::of(&fresh);
            multi::fused_sgd(&params(&new), &grads_of(&new), Some(&bufs), args, true)?;
            drop(bufs);
            for (&i, momentum_buffer) in new.iter().zip(fresh) {
                this.states[i] = Some(SgdState { momentum_buffer, slot: None });
            }
        }
        Ok(())
    }
}
