//! NAdam, torch.optim 2.13 semantics (single-tensor path, same update order).

use tch::{Kind, Tensor};

use super::core::{Algorithm, NoKernel, Optim};
use super::grad::decayed_grad;
use super::hyper::hyperparameters;
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::multi::{self, List, MomentArgs};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`NAdam`]; `Default` is torch.optim.NAdam's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NAdamConfig {
    /// Learning rate (>= 0). Default 2e-3.
    pub lr: Schedule,
    /// Decay of the first moment, in [0, 1). Default 0.9.
    pub beta1: Schedule,
    /// Decay of the second moment, in [0, 1). Default 0.999.
    pub beta2: Schedule,
    /// Added to the denominator (> 0). Default 1e-8.
    pub eps: Schedule,
    /// Weight decay (>= 0): an L2 penalty added to the gradient, or decoupled (see
    /// `decoupled_weight_decay`). Default 0.
    pub weight_decay: Schedule,
    /// The momentum schedule's decay, `mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))`
    /// (>= 0). Default 4e-3.
    pub momentum_decay: Schedule,
    /// Decay the parameters by `1 - lr * weight_decay` instead of adding an L2 penalty to the
    /// gradient (NAdamW). Default false.
    pub decoupled_weight_decay: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for NAdamConfig {
    fn default() -> Self {
        NAdamConfig {
            lr: 2e-3.into(),
            beta1: 0.9.into(),
            beta2: 0.999.into(),
            eps: 1e-8.into(),
            weight_decay: 0.0.into(),
            momentum_decay: 4e-3.into(),
            decoupled_weight_decay: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    NAdam,
    NAdamConfig,
    NAdamValues {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        momentum_decay,
    }
);

var_state! {
    /// Per-variable state of NAdam.
    pub struct NAdamState {
        step: Counter,
        /// The product of the momentum coefficients so far, a 0-dim f32 tensor: torch keeps it
        /// in its default dtype (float32) whatever the parameter's, and its rounding is part of
        /// the result.
        mu_product: Tensor(Scalar(Kind::Float)),
        exp_avg: Tensor(LikeVariable),
        exp_avg_sq: Tensor(LikeVariable),
    }
}

impl NAdamState {
    /// A fresh state: zero moments, a `mu_product` of 1.
    fn fresh(p: &Tensor) -> Result<Self> {
        let mut st = NAdamState::zeros(p, |_| true)?;
        let _ = st.mu_product.f_fill_(1.0)?;
        Ok(st)
    }
}

/// NAdam, Adam with Nesterov momentum ([Dozat 2016](https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ)),
/// as torch.optim.NAdam 2.13.
///
/// ```
/// use caseopt::{NAdam, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f32, 1.0]);
/// let mut nadam = NAdam::new(Default::default())?;
/// nadam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// nadam.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, -1.0]))])?;
/// // Each weight moves against its gradient by lr (2e-3) for the gradient's share, plus the
/// // momentum's look-ahead share.
/// let w = Vec::<f32>::try_from(&w)?;
/// assert!(w[0] > 0.997 && w[0] < 0.998 && w[1] > 1.002 && w[1] < 1.003);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type NAdam = Optim<NAdamAlgorithm>;

/// The momentum coefficient of step `t`: `beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))`.
fn mu(beta1: f64, momentum_decay: f64, t: f64) -> f64 {
    beta1 * (1.0 - 0.5 * 0.96f64.powf(t * momentum_decay))
}

/// The algorithm behind [`NAdam`].
#[derive(Debug)]
pub enum NAdamAlgorithm {}

impl Algorithm for NAdamAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::NAdam;
    type Config = NAdamConfig;
    type State = NAdamState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        _: &NAdamConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<NAdamState> {
        NAdamState::import(state, param, |_| true)
    }

    /// torch.optim's `_single_tensor_nadam`, op for op.
    fn update(
        c: &NAdamConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<NAdamState>,
        hp: &NAdamValues,
        _: u64,
    ) -> Result<()> {
        let NAdamValues { lr, beta1, beta2, eps, weight_decay, momentum_decay } = *hp;
        let st = match state {
            Some(st) => st,
            empty => empty.insert(NAdamState::fresh(p)?),
        };
        st.step += 1;
        let step = st.step as f64;
        let bias_correction2 = 1.0 - beta2.powf(step);
        let decoupled = c.decoupled_weight_decay;
        let grad = decayed_grad(p, grad, c.maximize, lr, weight_decay, decoupled)?;
        let mu_now = mu(beta1, momentum_decay, step);
        let mu_next = mu(beta1, momentum_decay, step + 1.0);
        let _ = st.mu_product.f_mul_scalar_(mu_now)?;
        let _ = st.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
        let _ = st.exp_avg_sq.f_mul_scalar_(beta2)?;
        aten::addcmul_(&mut st.exp_avg_sq, &grad, &grad, 1.0 - beta2)?;
        let mut denom = st.exp_avg_sq.f_div_scalar(bias_correction2)?.f_sqrt()?;
        let mu_product = st.mu_product.f_double_value(&[])?;
        let mu_product_next = mu_product * mu_next;
        let _ = denom.f_add_scalar_(eps)?;
        aten::addcdiv_(p, &grad, &denom, -lr * (1.0 - mu_now) / (1.0 - mu_product))?;
        aten::addcdiv_(p, &st.exp_avg, &denom, (-lr * mu_next) / (1.0 - mu_product_next))?;
        Ok(())
    }

    /// torch.optim's `_multi_tensor_nadam` (`foreach=True`), op for op; the per-variable
    /// scalars are computed as torch computes them in Python from each `step.item()` and
    /// `mu_product.item()`. The new `mu_product`s are stored only once the step went through.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &NAdamValues,
        group: &[usize],
    ) -> Result<()> {
        let NAdamValues { lr, beta1, beta2, eps, weight_decay, momentum_decay } = *hp;
        for &i in group {
            if this.states[i].is_none() {
                this.states[i] = Some(NAdamState::fresh(&this.params[i].tensor)?);
            }
        }
        let products = {
            let sts: Vec<&NAdamState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let n = sts.len();
            let (mut bc, mut sg, mut se, mut products) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for st in &sts {
                let step = (st.step + 1) as f32 as f64;
                bc.push((1.0 - beta2.powf(step)).powf(0.5));
                let mu = beta1 * (1.0 - 0.5 * 0.96f64.powf(step * momentum_decay));
                let mu_next = beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * momentum_decay));
                // torch's `_foreach_mul_(mu_products, mus)`: an f32 multiply on the CPU.
                let product = st.mu_product.f_mul_scalar(mu)?;
                let mp = product.f_double_value(&[])?;
                // torch writes `(...) * -1`: the same bits as the negation.
                sg.push(-(lr * (1.0 - mu) / (1.0 - mp)));
                se.push(-(lr * mu_next / (1.0 - mp * mu_next)));
                products.push(product);
            }
            let p = List::of(group.iter().map(|&i| &this.params[i].tensor));
            let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
            let m = List::of(sts.iter().map(|s| &s.exp_avg));
            let v = List::of(sts.iter().map(|s| &s.exp_avg_sq));
            let decoupled = this.config.decoupled_weight_decay;
            let maximize = this.config.maximize;
            let args = MomentArgs { lr, beta1, beta2, eps, weight_decay, decoupled, maximize };
            multi::nadam([&p, &g, &m, &v], args, [&bc, &sg, &se])?;
            products
        };
        for (&i, product) in group.iter().zip(products) {
            if let Some(st) = &mut this.states[i] {
                st.step += 1;
                // In place: handles `state()` gave out keep aliasing it.
                st.mu_product.f_copy_(&product)?;
            }
        }
        Ok(())
    }
}
