//! RAdam, torch.optim 2.13 semantics (single-tensor path, same update order).

use tch::Tensor;

use super::adam::AdamState;
use super::core::{Algorithm, NoKernel, Optim};
use super::grad::decayed_grad;
use super::hyper::hyperparameters;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::aten;
use crate::kernels::multi::{self, List, MomentArgs};
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`RAdam`]; `Default` is torch.optim.RAdam's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RAdamConfig {
    /// Learning rate (>= 0). Default 1e-3.
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
    /// Decay the parameters by `1 - lr * weight_decay` instead of adding an L2 penalty to the
    /// gradient (AdamW's decay). Default false.
    pub decoupled_weight_decay: bool,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for RAdamConfig {
    fn default() -> Self {
        RAdamConfig {
            lr: 1e-3.into(),
            beta1: 0.9.into(),
            beta2: 0.999.into(),
            eps: 1e-8.into(),
            weight_decay: 0.0.into(),
            decoupled_weight_decay: false,
            maximize: false,
        }
    }
}

hyperparameters!(
    RAdam,
    RAdamConfig,
    RAdamValues {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    }
);

/// RAdam, Adam with a rectified adaptive learning rate
/// ([Liu et al. 2019](https://arxiv.org/abs/1908.03265)), as torch.optim.RAdam 2.13.
///
/// While the variance of the adaptive rate is intractable (the first steps: the approximated
/// simple moving average's length is at most 5), the update is plain momentum SGD.
///
/// ```
/// use caseopt::{Optimizer, Param, RAdam, RAdamConfig, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f64]);
/// let mut radam = RAdam::new(RAdamConfig { lr: 0.1.into(), ..Default::default() })?;
/// radam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// radam.step_with_grads(&[Some(Tensor::from_slice(&[2.0f64]))])?;
/// // First step: momentum SGD with the bias-corrected average, w - lr * g.
/// assert!((Vec::<f64>::try_from(&w)?[0] - 0.8).abs() < 1e-12);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type RAdam = Optim<RAdamAlgorithm>;

/// The algorithm behind [`RAdam`].
#[derive(Debug)]
pub enum RAdamAlgorithm {}

impl Algorithm for RAdamAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::RAdam;
    const STATE_NAMES: &'static [&'static str] = &["step", "exp_avg", "exp_avg_sq"];
    type Config = RAdamConfig;
    type State = AdamState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        _: &RAdamConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<AdamState> {
        AdamState::import(state, param, |_| false)
    }

    /// torch.optim's `_single_tensor_radam`, op for op.
    fn update(
        c: &RAdamConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<AdamState>,
        hp: &RAdamValues,
        _: u64,
    ) -> Result<()> {
        let RAdamValues { lr, beta1, beta2, eps, weight_decay } = *hp;
        let st = match state {
            Some(st) => st,
            empty => empty.insert(AdamState::zeros(p, |_| false)?),
        };
        st.step += 1;
        let step = st.step as f64;
        let decoupled = c.decoupled_weight_decay;
        let grad = decayed_grad(p, grad, c.maximize, lr, weight_decay, decoupled)?;
        let _ = st.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
        let _ = st.exp_avg_sq.f_mul_scalar_(beta2)?;
        aten::addcmul_(&mut st.exp_avg_sq, &grad, &grad, 1.0 - beta2)?;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let bias_corrected_exp_avg = st.exp_avg.f_div_scalar(bias_correction1)?;
        // The maximum length of the approximated simple moving average, and its length now.
        let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * beta2.powf(step) / bias_correction2;
        let update = if rho_t > 5.0 {
            let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5);
            let mut sqrt = st.exp_avg_sq.f_sqrt()?;
            let _ = sqrt.f_add_scalar_(eps)?;
            // Python's `float / tensor` is `tensor.reciprocal() * float`.
            let adaptive_lr = sqrt.f_reciprocal()?.f_mul_scalar(bias_correction2.powf(0.5))?;
            bias_corrected_exp_avg.f_mul_scalar(lr)?.f_mul(&adaptive_lr)?.f_mul_scalar(rect)?
        } else {
            bias_corrected_exp_avg.f_mul_scalar(lr)?
        };
        aten::add_(p, &update, -1.0)?;
        Ok(())
    }

    /// torch.optim's `_multi_tensor_radam` (`foreach=True`), op for op; the per-variable
    /// scalars are computed as torch computes them in Python from each `step.item()` (an f32
    /// counter), here from the optimizer's own counts.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &RAdamValues,
        group: &[usize],
    ) -> Result<()> {
        let RAdamValues { lr, beta1, beta2, eps, weight_decay } = *hp;
        for &i in group {
            if this.states[i].is_none() {
                this.states[i] = Some(AdamState::zeros(&this.params[i].tensor, |_| false)?);
            }
        }
        {
            let sts: Vec<&AdamState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
            let mut unrect_step_size = Vec::with_capacity(sts.len());
            let mut bias_correction2 = Vec::with_capacity(sts.len());
            for st in &sts {
                let step = (st.step + 1) as f32 as f64;
                let rho_t = rho_inf - 2.0 * step * beta2.powf(step) / (1.0 - beta2.powf(step));
                let rect = if rho_t > 5.0 {
                    ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                        .powf(0.5)
                } else {
                    0.0
                };
                let unrectified = if rect > 0.0 { 0.0 } else { 1.0 };
                let bc1 = 1.0 - beta1.powf(step);
                // torch writes `(...) * -1`: the same bits as the negation.
                unrect_step_size.push(-(lr * unrectified / bc1));
                bias_correction2.push(-((1.0 - beta2.powf(step)).powf(0.5) * (lr * rect / bc1)));
            }
            let p = List::of(group.iter().map(|&i| &this.params[i].tensor));
            let g = List::of(group.iter().filter_map(|&i| grads[i].as_ref()));
            let m = List::of(sts.iter().map(|s| &s.exp_avg));
            let v = List::of(sts.iter().map(|s| &s.exp_avg_sq));
            let decoupled = this.config.decoupled_weight_decay;
            let maximize = this.config.maximize;
            let args = MomentArgs { lr, beta1, beta2, eps, weight_decay, decoupled, maximize };
            multi::radam([&p, &g, &m, &v], args, &unrect_step_size, &bias_correction2)?;
        }
        for &i in group {
            if let Some(st) = &mut this.states[i] {
                st.step += 1;
            }
        }
        Ok(())
    }
}
