//! Adafactor, torch.optim 2.13 semantics (`_single_tensor_adafactor`, same update order).

use tch::Tensor;

use super::core::{Algorithm, NoKernel, Optim};
use super::hyper::{hyperparameters, Hyperparameters};
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::{Error, Result};
use crate::kernels::aten;
use crate::schedule::Schedule;
use crate::var::Param;

/// Configuration of [`Adafactor`]; `Default` is torch.optim.Adafactor's.
///
/// torch's `eps=(eps1, eps2)` are the two fields `eps1` and `eps2` here.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdafactorConfig {
    /// Learning rate (>= 0); the relative step size is `min(lr, 1 / sqrt(step))`. Default 1e-2.
    pub lr: Schedule,
    /// Exponent of the second moments' decay, `1 - beta2_t = step^beta2_decay` (<= 0).
    /// Default -0.8.
    pub beta2_decay: Schedule,
    /// Floor of the second-moment estimate, squared before use (>= 0); `None`, the default,
    /// takes the machine epsilon of each variable's dtype, as torch does. Not a schedule, and
    /// not a key a `case_optimizer!` rule can give: set it in the config.
    pub eps1: Option<f64>,
    /// Floor of the parameter's RMS in the step size (>= 0). Default 1e-3.
    pub eps2: Schedule,
    /// Clipping threshold of the update's RMS (>= 1). Default 1.
    pub d: Schedule,
    /// Decoupled weight decay: parameters are multiplied by `1 - lr * weight_decay` (>= 0).
    /// Default 0.
    pub weight_decay: Schedule,
    /// Maximize the objective instead of minimizing it. Default false.
    pub maximize: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            lr: 1e-2.into(),
            beta2_decay: (-0.8).into(),
            eps1: None,
            eps2: 1e-3.into(),
            d: 1.0.into(),
            weight_decay: 0.0.into(),
            maximize: false,
        }
    }
}

hyperparameters!(
    Adafactor,
    AdafactorConfig,
    AdafactorValues {
        lr,
        beta2_decay,
        eps2,
        d,
        weight_decay,
    },
    extra_checks = AdafactorConfig::check_eps1
);

impl AdafactorConfig {
    /// `eps1`, when given, is finite and >= 0.
    fn check_eps1(&self) -> Result<()> {
        match self.eps1 {
            Some(v) if !(v.is_finite() && v >= 0.0) => Err(Error::InvalidHyperparameter {
                optimizer: Self::OPTIMIZER,
                name: "eps1",
                value: v,
                expected: ">= 0",
            }),
            _ => Ok(()),
        }
    }
}

var_state! {
    /// Per-variable state of Adafactor: the step count and, for a variable of two or more
    /// dimensions, the row and column factors of its second moment (`row_var` reduced over the
    /// last dimension, `col_var` over the second-to-last), else its full second moment
    /// (`variance`).
    pub struct AdafactorState {
        step: Counter,
        row_var: Option(Reduced(-1)),
        col_var: Option(Reduced(-2)),
        variance: Option(LikeVariable),
    }
}

/// Whether a variable of `ndim` dimensions keeps Adafactor's state `name`: the factored
/// `row_var` and `col_var` from two dimensions on, `variance` below.
fn keeps(ndim: usize) -> impl Fn(&str) -> bool {
    move |name| (name == "variance") == (ndim < 2)
}

/// Adafactor ([Shazeer & Stern 2018](https://arxiv.org/abs/1804.04235)), as
/// torch.optim.Adafactor 2.13: second moments factored into row and column averages for
/// variables of two or more dimensions (over their last two), a relative step size
/// `min(lr, 1 / sqrt(step)) * max(eps2, RMS(w))`, and the update's RMS clipped at `d`.
///
/// ```
/// use caseopt::{Adafactor, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
/// let mut adafactor = Adafactor::new(Default::default())?;
/// adafactor.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// adafactor.step_with_grads(&[Some(Tensor::ones([2, 3], (tch::Kind::Double, tch::Device::Cpu)))])?;
/// // The factored state: one value per row and one per column.
/// let state = adafactor.state(0);
/// assert_eq!(state[1].0, "row_var");
/// assert_eq!((state[1].1.size(), state[2].1.size()), (vec![2, 1], vec![1, 3]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Adafactor = Optim<AdafactorAlgorithm>;

/// The algorithm behind [`Adafactor`].
#[derive(Debug)]
pub enum AdafactorAlgorithm {}

/// `torch.finfo(dtype).eps` for a floating dtype (f32's for any other, as no other reaches the
/// kernels of this optimizer with a different meaning).
fn machine_eps(kind: tch::Kind) -> f64 {
    match kind {
        tch::Kind::Double => f64::EPSILON,
        tch::Kind::Half => 0.0009765625,
        tch::Kind::BFloat16 => 0.0078125,
        _ => f32::EPSILON as f64,
    }
}

/// Python's `max(a, b)`: `a` unless `b > a`.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: `a` unless `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// A 0-dim tensor's value as Python's `.item()` gives it.
fn item(t: &Tensor) -> Result<f64> {
    Ok(t.f_double_value(&[])?)
}

impl Algorithm for AdafactorAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Adafactor;
    type Config = AdafactorConfig;
    type State = AdafactorState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        _: &AdafactorConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<AdafactorState> {
        AdafactorState::import(state, param, keeps(param.tensor.dim()))
    }

    /// torch.optim's `_single_tensor_adafactor`, op for op: the scalars in f64 as Python
    /// computes them (the step as torch's f32 counter gives it), the norms and means ATen's.
    fn update(
        c: &AdafactorConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<AdafactorState>,
        hp: &AdafactorValues,
        _: u64,
    ) -> Result<()> {
        let AdafactorValues { lr, beta2_decay, eps2, d, weight_decay } = *hp;
        let st = match state {
            Some(st) => st,
            empty => empty.insert(AdafactorState::zeros(p, keeps(p.dim()))?),
        };
        let grad = if c.maximize { grad.f_neg()? } else { grad.shallow_clone() };
        let eps1 = c.eps1.unwrap_or_else(|| machine_eps(p.kind()));
        st.step += 1;
        // torch keeps the step in an f32 tensor and reads it back with `.item()`.
        let step = st.step as f32 as f64;
        let one_minus_beta2_t = step.powf(beta2_decay);
        let rho_t = py_min(lr, 1.0 / step.powf(0.5));
        let numel = p.numel() as f64;
        let alpha = py_max(eps2, item(&p.f_norm()?)? / numel.powf(0.5)) * rho_t;
        if weight_decay != 0.0 {
            let _ = p.f_mul_scalar_(1.0 - lr * weight_decay)?;
        }
        let var_estimate = match (&mut st.row_var, &mut st.col_var, &mut st.variance) {
            (Some(row_var), Some(col_var), _) => {
                let size = grad.size();
                let (rows, cols) = (size[size.len() - 2], size[size.len() - 1]);
                let mut row_mean = grad.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?;
                let _ = row_mean.f_square_()?.f_div_scalar_(cols)?;
                let _ = row_var.f_lerp_(&row_mean, one_minus_beta2_t)?;
                let mut col_mean = grad.f_norm_scalaropt_dim(2.0, [-2i64].as_slice(), true)?;
                let _ = col_mean.f_square_()?.f_div_scalar_(rows)?;
                let _ = col_var.f_lerp_(&col_mean, one_minus_beta2_t)?;
                let mut var_estimate = row_var.f_matmul(col_var)?;
                let mut row_var_mean = row_var.f_mean_dim([-2i64].as_slice(), true, None)?;
                let _ = row_var_mean.f_clamp_min_(eps1)?;
                let _ = var_estimate.f_div_(&row_var_mean)?;
                var_estimate
            }
            (_, _, Some(variance)) => {
                let grad_squared = grad.f_mul(&grad)?;
                let _ = variance.f_lerp_(&grad_squared, one_minus_beta2_t)?;
                variance.f_detach_copy()?
            }
            _ => unreachable_state()?,
        };
        let mut update = var_estimate;
        let _ = update.f_clamp_min_(eps1 * eps1)?.f_rsqrt_()?;
        let _ = update.f_mul_(&grad)?;
        let norm = item(&update.f_norm()?)?;
        let denom = py_max(1.0, norm / ((update.numel() as f64).powf(0.5) * d));
        aten::add_(p, &update, -alpha / denom)?;
        Ok(())
    }

    /// torch has `_multi_tensor_adafactor` (`foreach=True`), which this backend does not
    /// follow yet: the multi-tensor backend runs the single-tensor update per variable.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &AdafactorValues,
        group: &[usize],
    ) -> Result<()> {
        for &i in group {
            if let Some(g) = &grads[i] {
                let mut p = this.params[i].tensor.shallow_clone();
                Self::update(&this.config, &mut p, g, &mut this.states[i], hp, this.steps)?;
            }
        }
        Ok(())
    }
}

/// A state with neither factors nor a full second moment: never built by this file.
fn unreachable_state() -> Result<Tensor> {
    Err(Error::InvalidConfig {
        optimizer: "Adafactor",
        reason: "a variable's state has neither factored nor full second moments".into(),
    })
}
