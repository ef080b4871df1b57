//! Adagrad, torch.optim 2.13 semantics (lr_decay, initial_accumulator_value, eps, weight decay).

use tch::Tensor;

use super::core::{Algorithm, NoKernel, Optim};
use super::grad::adjusted_grad;
use super::hyper::hyperparameters;
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::multi::{self, List};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Adagrad`]; `Default` is torch.optim.Adagrad's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdagradConfig {
    /// Learning rate (>= 0). Default 1e-2.
    pub lr: Schedule,
    /// Learning-rate decay: the step size is `lr / (1 + (step - 1) * lr_decay)` (>= 0). Default 0.
    pub lr_decay: Schedule,
    /// L2 penalty added to the gradient (>= 0). Default 0.
    pub weight_decay: Schedule,
    /// Starting value of the sum of squared gradients (>= 0). Default 0.
    pub initial_accumulator_value: f64,
    /// Added to the denominator (> 0). Default 1e-10.
    pub eps: Schedule,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        AdagradConfig {
            lr: 1e-2.into(),
            lr_decay: 0.0.into(),
            weight_decay: 0.0.into(),
            initial_accumulator_value: 0.0,
            eps: 1e-10.into(),
            maximize: false,
        }
    }
}

hyperparameters!(
    Adagrad,
    AdagradConfig,
    AdagradValues {
        lr,
        lr_decay,
        weight_decay,
        eps,
    },
    floats = [initial_accumulator_value]
);

var_state! {
    /// Per-variable state of Adagrad.
    pub struct AdagradState {
        step: Counter,
        sum: Tensor(LikeVariable),
    }
}

/// Adagrad ([Duchi et al. 2011](https://jmlr.org/papers/v12/duchi11a.html)), as
/// torch.optim.Adagrad 2.13.
pub type Adagrad = Optim<AdagradAlgorithm>;

/// The algorithm behind [`Adagrad`].
#[derive(Debug)]
pub enum AdagradAlgorithm {}

impl Algorithm for AdagradAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Adagrad;
    type Config = AdagradConfig;
    type State = AdagradState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        _: &AdagradConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<AdagradState> {
        AdagradState::import(state, param, |_| true)
    }

    fn update(
        c: &AdagradConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<AdagradState>,
        hp: &AdagradValues,
        _: u64,
    ) -> Result<()> {
        let init = c.initial_accumulator_value;
        let st = match state {
            Some(st) => st,
            empty => empty.insert(AdagradState { step: 0, sum: p.f_full_like(init)?, slot: None }),
        };
        st.step += 1;
        let grad = adjusted_grad(p, grad, c.maximize, hp.weight_decay)?;
        let clr = hp.lr / (1.0 + (st.step as f64 - 1.0) * hp.lr_decay);
        aten::addcmul_(&mut st.sum, &grad, &grad, 1.0)?;
        let mut std = st.sum.f_sqrt()?;
        let _ = std.f_add_scalar_(hp.eps)?;
        aten::addcdiv_(p, &grad, &std, -clr)?;
        Ok(())
    }

    /// torch.optim's `_fused_adagrad` (`fused=True`): `_fused_adagrad_`.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &AdagradValues,
        group: &[usize],
    ) -> Result<()> {
        let init = this.config.initial_accumulator_value;
        for &i in group {
            if this.states[i].is_none() {
                let sum = this.params[i].tensor.f_full_like(init)?;
                this.states[i] = Some(AdagradState { step: 0, sum, slot: None });
            }
        }
        let result = {
            let sts: Vec<&AdagradState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let counts: Vec<u64> = sts.iter().map(|s| s.step).collect();
            let steps = this.exec.step_tensors(&this.params, group, &counts)?;
            let p = List::of(group.iter().map(|&i| &this.params[i].tensor));
            let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
            let sums = List::of(sts.iter().map(|s| &s.sum));
            let scalars = [hp.lr, hp.lr_decay, hp.weight_decay, hp.eps];
            let maximize = this.config.maximize;
            multi::fused_adagrad([&p, &g, &sums, &List::of(&steps)], scalars, maximize)
        };
        this.exec.steps_advanced(group, result.is_ok());
        result?;
        for &i in group {
            if let Some(st) = &mut this.states[i] {
                st.step += 1;
            }
        }
        Ok(())
    }
}
