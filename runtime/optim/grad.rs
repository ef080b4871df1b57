//! Gradients as the optimizers take them: checked against their variable, and adjusted for
//! `maximize` and L2 weight decay as torch.optim does first.

use tch::Tensor;

use crate::error::{Error, Result};
use crate::kernels::aten;
use crate::var::Param;

/// Every gradient given must match its variable (see [`check_grad`]).
pub(crate) fn check_grads(params: &[Param], grads: &[Option<Tensor>]) -> Result<()> {
    for (p, g) in params.iter().zip(grads) {
        if let Some(g) = g {
            check_grad(p, g)?;
        }
    }
    Ok(())
}

/// A gradient must be defined and have its variable's shape, dtype and device.
pub(crate) fn check_grad(p: &Param, g: &Tensor) -> Result<()> {
    if !g.defined() {
        let reason = "the gradient is an undefined tensor".to_string();
        return Err(Error::GradientMismatch { variable: p.info.name.clone(), reason });
    }
    let (ps, gs) = (p.tensor.size(), g.size());
    let reason = if ps != gs {
        format!("shape {gs:?} != {ps:?}")
    } else if p.tensor.kind() != g.kind() {
        format!("dtype {:?} != {:?}", g.kind(), p.tensor.kind())
    } else if p.tensor.device() != g.device() {
        format!("device {:?} != {:?}", g.device(), p.tensor.device())
    } else {
        return Ok(());
    };
    Err(Error::GradientMismatch { variable: p.info.name.clone(), reason })
}

/// `grad` negated when maximizing and with `weight_decay * param` added, as torch.optim does
/// before any other use of the gradient: `grad.add(param, alpha=weight_decay)`, one rounding
/// per element where ATen's kernels fuse the multiply-add.
pub(crate) fn adjusted_grad(
    param: &Tensor,
    grad: &Tensor,
    maximize: bool,
    weight_decay: f64,
) -> Result<Tensor> {
    let mut g = if maximize { grad.f_neg()? } else { grad.shallow_clone() };
    if weight_decay != 0.0 {
        g = aten::add(&g, param, weight_decay)?;
    }
    Ok(g)
}

/// The gradient after weight decay, as torch.optim's Adam family applies it: decoupled, the
/// parameter is first multiplied by `1 - lr * weight_decay` (AdamW's decay) and the gradient is
/// only negated when maximizing; otherwise the decay is an L2 term of [`adjusted_grad`].
pub(crate) fn decayed_grad(
    param: &mut Tensor,
    grad: &Tensor,
    maximize: bool,
    lr: f64,
    weight_decay: f64,
    decoupled: bool,
) -> Result<Tensor> {
    if !decoupled {
        return adjusted_grad(param, grad, maximize, weight_decay);
    }
    if weight_decay != 0.0 {
        let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
    }
    adjusted_grad(param, grad, maximize, 0.0)
}
