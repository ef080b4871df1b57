//! Adam, torch.optim 2.13 semantics (single-tensor path, same update order), and the state
//! and update it shares with [`AdamW`](super::AdamW).

use tch::Tensor;

use super::core::{Algorithm, Optim, Values};
use super::grad::decayed_grad;
use super::hyper::hyperparameters;
use super::state::var_state;
use super::hyper::Hyperparameters;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::multi::{self, AdamArgs, List};
use crate::kernels::ops::AdamKernel;
use crate::optim::Sqrt;
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Adam`]; `Default` is torch.optim.Adam's.
///
/// torch's `betas=(b1, b2)` are the two fields `beta1` and `beta2` here, so that each can be a
/// schedule.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: Schedule,
    /// Decay of the first moment, in [0, 1). Default 0.9.
    pub beta1: Schedule,
    /// Decay of the second moment, in [0, 1). Default 0.999.
    pub beta2: Schedule,
    /// Added to the denominator (> 0). Default 1e-8.
    pub eps: Schedule,
    /// L2 penalty added to the gradient (>= 0). Default 0.
    pub weight_decay: Schedule,
    /// Use the maximum of past second moments (AMSGrad). Default false.
    pub amsgrad: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3.into(),
            beta1: 0.9.into(),
            beta2: 0.999.into(),
            eps: 1e-8.into(),
            weight_decay: 0.0.into(),
            amsgrad: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    Adam,
    AdamConfig,
    AdamValues {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    }
);

var_state! {
    /// Per-variable state of Adam and AdamW.
    pub struct AdamState {
        step: Counter,
        exp_avg: Tensor(LikeVariable),
        exp_avg_sq: Tensor(LikeVariable),
        max_exp_avg_sq: Option(LikeVariable),
    }
}

/// torch.optim's `_single_tensor_adam`, op for op, for Adam and AdamW; creates the state at
/// the variable's first update. Takes the same scalars as the fused kernel, [`AdamKernel`].
pub(crate) fn adam_update(
    p: &mut Tensor,
    grad: &Tensor,
    state: &mut Option<AdamState>,
    h: &AdamKernel,
) -> Result<()> {
    let st = match state {
        Some(st) => st,
        empty => empty.insert(AdamState::zeros(p, |_| h.amsgrad)?),
    };
    st.step += 1;
    let grad = decayed_grad(p, grad, h.maximize, h.lr, h.weight_decay, h.decoupled)?;
    let _ = st.exp_avg.f_lerp_(&grad, 1.0 - h.beta1)?;
    let _ = st.exp_avg_sq.f_mul_scalar_(h.beta2)?;
    aten::addcmul_(&mut st.exp_avg_sq, &grad, &grad, 1.0 - h.beta2)?;
    let step = st.step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    let step_size = h.lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    let second = match &mut st.max_exp_avg_sq {
        Some(max) if h.amsgrad => {
            let _ = max.f_maximum_out(max, &st.exp_avg_sq)?;
            max.shallow_clone()
        }
        _ => st.exp_avg_sq.shallow_clone(),
    };
    let mut denom = second.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(h.eps)?;
    aten::addcdiv_(p, &st.exp_avg, &denom, -step_size)?;
    Ok(())
}

/// Adam ([Kingma & Ba 2014](https://arxiv.org/abs/1412.6980)), as torch.optim.Adam 2.13.
///
/// ```
/// use caseopt::{Adam, AdamConfig, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f64, 1.0]);
/// let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() })?;
/// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// adam.step_with_grads(&[Some(Tensor::from_slice(&[1.0f64, -1.0]))])?;
/// // The first step moves each weight by lr * g / (|g| + eps): just under 0.1.
/// let w = Vec::<f64>::try_from(&w)?;
/// assert!((w[0] - 0.9).abs() < 1e-7 && (w[1] - 1.1).abs() < 1e-7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Adam = Optim<AdamAlgorithm>;

/// What sets Adam and AdamW apart: the config, and whether the weight decay is decoupled. The
/// rest of their algorithm is written once, for both, below.
pub trait AdamVariant: std::fmt::Debug + Send + 'static {
    /// Which of the two it is.
    const KIND: OptimizerKind;
    /// The config.
    type Config: Hyperparameters;
    /// The scalars of one update at this step's values, shared by the fused kernel and the
    /// libtorch path.
    fn step_kernel(
        config: &Self::Config,
        hp: &<Self::Config as Hyperparameters>::Values,
    ) -> AdamKernel;
    /// Whether the config asks for AMSGrad (a third state tensor).
    fn amsgrad(config: &Self::Config) -> bool;
}

/// The algorithm behind [`Adam`].
#[derive(Debug)]
pub enum AdamAlgorithm {}

impl AdamVariant for AdamAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Adam;
    type Config = AdamConfig;

    fn step_kernel(c: &AdamConfig, hp: &AdamValues) -> AdamKernel {
        let AdamValues { lr, beta1, beta2, eps, weight_decay } = *hp;
        let (decoupled, amsgrad, maximize) = (false, c.amsgrad, c.maximize);
        let sqrt = Sqrt::Fast; // the optimizer's setting replaces it (`Kernel::with_sqrt`)
        AdamKernel { lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, sqrt }
    }

    fn amsgrad(c: &AdamConfig) -> bool {
        c.amsgrad
    }
}

impl<V: AdamVariant> Algorithm for V {
    const KIND: OptimizerKind = V::KIND;
    type Config = V::Config;
    type State = AdamState;
    type Kernel = AdamKernel;
    type Extra = ();

    fn import_state(c: &V::Config, state: &[(String, Tensor)], param: &Param) -> Result<AdamState> {
        AdamState::import(state, param, |_| V::amsgrad(c))
    }

    fn update(
        c: &V::Config,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<AdamState>,
        hp: &Values<V>,
        _: u64,
    ) -> Result<()> {
        adam_update(p, grad, state, &V::step_kernel(c, hp))
    }

    fn kernel(c: &V::Config, hp: &Values<V>) -> Option<AdamKernel> {
        Some(V::step_kernel(c, hp))
    }

    fn kernel_states(kernel: &AdamKernel) -> usize {
        kernel.states()
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

    /// torch.optim's `_fused_adam` (`fused=True`): `_fused_adam_` or `_fused_adamw_`.
    fn multi(
        this: &mut Optim<V>,
        grads: &[Option<Tensor>],
        hp: &Values<V>,
        group: &[usize],
    ) -> Result<()> {
        let k = V::step_kernel(&this.config, hp);
        for &i in group {
            if this.states[i].is_none() {
                this.states[i] = Some(AdamState::zeros(&this.params[i].tensor, |_| k.amsgrad)?);
            }
        }
        let result = {
            let sts: Vec<&AdamState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let counts: Vec<u64> = sts.iter().map(|s| s.step).collect();
            let steps = this.exec.step_tensors(&this.params, group, &counts)?;
            let p = List::of(group.iter().map(|&i| &this.params[i].tensor));
            let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
            let m = List::of(sts.iter().map(|s| &s.exp_avg));
            let v = List::of(sts.iter().map(|s| &s.exp_avg_sq));
            let maxs =
                k.amsgrad.then(|| List::of(sts.iter().filter_map(|s| s.max_exp_avg_sq.as_ref())));
            let args = AdamArgs {
                lr: k.lr,
                beta1: k.beta1,
                beta2: k.beta2,
                weight_decay: k.weight_decay,
                eps: k.eps,
                amsgrad: k.amsgrad,
                maximize: k.maximize,
                decoupled: k.decoupled,
            };
            multi::fused_adam([&p, &g, &m, &v], maxs.as_ref(), &List::of(&steps), args)
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
