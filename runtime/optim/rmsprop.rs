//! RMSprop, torch.optim 2.13 semantics (alpha, eps, centered, momentum, weight decay).

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

/// Configuration of [`RmsProp`]; `Default` is torch.optim.RMSprop's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmsPropConfig {
    /// Learning rate (>= 0). Default 1e-2.
    pub lr: Schedule,
    /// Smoothing constant of the squared-gradient average (>= 0). Default 0.99.
    pub alpha: Schedule,
    /// Added to the denominator (> 0). Default 1e-8.
    pub eps: Schedule,
    /// L2 penalty added to the gradient (>= 0). Default 0.
    pub weight_decay: Schedule,
    /// Momentum factor (>= 0). Default 0.
    pub momentum: Schedule,
    /// Normalize by the estimated variance of the gradient instead of its second moment.
    /// Default false.
    pub centered: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 1e-2.into(),
            alpha: 0.99.into(),
            eps: 1e-8.into(),
            weight_decay: 0.0.into(),
            momentum: 0.0.into(),
            centered: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    RmsProp,
    RmsPropConfig,
    RmsPropValues {
        lr,
        alpha,
        eps,
        weight_decay,
        momentum,
    }
);

var_state! {
    /// Per-variable state of RMSprop (`grad_avg` only when centered).
    pub struct RmsPropState {
        step: Counter,
        square_avg: Tensor(LikeVariable),
        momentum_buffer: Tensor(LikeVariable),
        grad_avg: Option(LikeVariable),
    }
}

/// RMSprop (Hinton's lecture 6e), as torch.optim.RMSprop 2.13.
pub type RmsProp = Optim<RmsPropAlgorithm>;

/// The algorithm behind [`RmsProp`].
#[derive(Debug)]
pub enum RmsPropAlgorithm {}

impl Algorithm for RmsPropAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::RmsProp;
    type Config = RmsPropConfig;
    type State = RmsPropState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        c: &RmsPropConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<RmsPropState> {
        RmsPropState::import(state, param, |_| c.centered)
    }

    fn update(
        c: &RmsPropConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<RmsPropState>,
        hp: &RmsPropValues,
        _: u64,
    ) -> Result<()> {
        let st = match state {
            Some(st) => st,
            empty => empty.insert(RmsPropState::zeros(p, |_| c.centered)?),
        };
        let grad = adjusted_grad(p, grad, c.maximize, hp.weight_decay)?;
        st.step += 1;
        let _ = st.square_avg.f_mul_scalar_(hp.alpha)?;
        aten::addcmul_(&mut st.square_avg, &grad, &grad, 1.0 - hp.alpha)?;
        let mut avg = match &mut st.grad_avg {
            Some(grad_avg) => {
                let _ = grad_avg.f_lerp_(&grad, 1.0 - hp.alpha)?;
                let mut centered = aten::addcmul(&st.square_avg, grad_avg, grad_avg, -1.0)?;
                let _ = centered.f_sqrt_()?;
                centered
            }
            None => st.square_avg.f_sqrt()?,
        };
        let _ = avg.f_add_scalar_(hp.eps)?;
        if hp.momentum > 0.0 {
            let _ = st.momentum_buffer.f_mul_scalar_(hp.momentum)?;
            aten::addcdiv_(&mut st.momentum_buffer, &grad, &avg, 1.0)?;
            aten::add_(p, &st.momentum_buffer, -hp.lr)?;
        } else {
            aten::addcdiv_(p, &grad, &avg, -hp.lr)?;
        }
        Ok(())
    }

    /// torch.optim's `_multi_tensor_rmsprop` (`foreach=True`), op for op.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &RmsPropValues,
        group: &[usize],
    ) -> Result<()> {
        let c = &this.config;
        for &i in group {
            if this.states[i].is_none() {
                let p = &this.params[i].tensor;
                this.states[i] = Some(RmsPropState::zeros(p, |_| c.centered)?);
            }
        }
        {
            let sts: Vec<&RmsPropState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let p = List::of(group.iter().map(|&i| &this.params[i].tensor));
            let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
            let sq = List::of(sts.iter().map(|s| &s.square_avg));
            let grad_avgs =
                c.centered.then(|| List::of(sts.iter().filter_map(|s| s.grad_avg.as_ref())));
            let bufs =
                (hp.momentum > 0.0).then(|| List::of(sts.iter().map(|s| &s.momentum_buffer)));
            let scalars = [hp.lr, hp.alpha, hp.eps, hp.weight_decay, hp.momentum];
            let ops = [&p, &g, &sq];
            multi::rmsprop(
                ops,
                grad_avgs.as_ref(),
                bufs.as_ref(),
                scalars,
                c.centered,
                c.maximize,
            )?;
        }
        for &i in group {
            if let Some(st) = &mut this.states[i] {
                st.step += 1;
            }
        }
        Ok(())
    }
}
