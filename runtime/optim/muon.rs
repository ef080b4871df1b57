//! Muon, torch.optim 2.13 semantics (`_single_tensor_muon`, the only path torch has): Nesterov
//! momentum, then the update orthogonalised by Newton-Schulz iterations in bfloat16, decoupled
//! weight decay and a learning rate adjusted to the variable's shape.

use tch::{Kind, Tensor};

use super::core::{Algorithm, NoKernel, Optim};
use super::hyper::{hyperparameters, Hyperparameters};
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::{Error, Result};
use crate::kernels::aten;
use crate::schedule::Schedule;
use crate::var::Param;

/// How [`Muon`] scales its learning rate by the variable's shape `[A, B]` (torch's
/// `adjust_lr_fn`).
///
/// In a config read as JSON ([`Builtin::build`](crate::Builtin::build)), torch's strings:
/// `"original"` and `"match_rms_adamw"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum MuonAdjustLr {
    /// Keller Jordan's scaling, `lr * sqrt(max(1, A / B))` (torch's `None` or `"original"`).
    #[default]
    #[serde(rename = "original")]
    Original,
    /// Moonshot's, `lr * 0.2 * sqrt(max(A, B))`, which matches the update's RMS to AdamW's so
    /// that AdamW's learning rate and weight decay carry over (torch's `"match_rms_adamw"`).
    #[serde(rename = "match_rms_adamw")]
    MatchRmsAdamW,
}

impl MuonAdjustLr {
    /// The learning rate for a variable of shape `[a, b]`, computed as torch's `_adjust_lr`
    /// computes it in Python (f64).
    fn adjust(self, lr: f64, a: i64, b: i64) -> f64 {
        let (a, b) = (a as f64, b as f64);
        let ratio = match self {
            MuonAdjustLr::Original => (a / b).max(1.0).sqrt(),
            MuonAdjustLr::MatchRmsAdamW => 0.2 * a.max(b).sqrt(),
        };
        lr * ratio
    }
}

/// Configuration of [`Muon`]; `Default` is torch.optim.Muon's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MuonConfig {
    /// Learning rate (>= 0), before the shape adjustment. Default 1e-3.
    pub lr: Schedule,
    /// Decoupled weight decay (>= 0): the variable is multiplied by `1 - lr * weight_decay`
    /// (the unadjusted lr) before the update. Default 0.1.
    pub weight_decay: Schedule,
    /// Momentum factor (>= 0). Default 0.95.
    pub momentum: Schedule,
    /// Nesterov momentum (the update is `lerp(g, buf, momentum)` rather than the buffer).
    /// Default true.
    pub nesterov: bool,
    /// The coefficients `(a, b, c)` of the quintic Newton-Schulz iteration. Default
    /// `(3.4445, -4.7750, 2.0315)`, Keller Jordan's.
    pub ns_coefficients: (f64, f64, f64),
    /// Floor of the norm the update is divided by before the iterations (> 0). Default 1e-7.
    pub eps: f64,
    /// Number of Newton-Schulz iterations (< 100, as torch requires). Default 5.
    pub ns_steps: usize,
    /// The learning rate's adjustment to the variable's shape. Default
    /// [`MuonAdjustLr::Original`].
    pub adjust_lr_fn: MuonAdjustLr,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            lr: 1e-3.into(),
            weight_decay: 0.1.into(),
            momentum: 0.95.into(),
            nesterov: true,
            ns_coefficients: (3.4445, -4.7750, 2.0315),
            eps: 1e-7,
            ns_steps: 5,
            adjust_lr_fn: MuonAdjustLr::Original,
        }
    }
}

hyperparameters!(
    Muon,
    MuonConfig,
    MuonValues { lr, weight_decay, momentum },
    floats = [eps],
    extra_checks = MuonConfig::check_iteration
);

impl MuonConfig {
    /// The Newton-Schulz settings beyond `eps`'s range: finite coefficients and fewer than 100
    /// steps (torch raises the last at the first step; here the config is refused).
    fn check_iteration(&self) -> Result<()> {
        let (a, b, c) = self.ns_coefficients;
        if ![a, b, c].iter().all(|v| v.is_finite()) {
            return Err(Error::InvalidConfig {
                optimizer: Self::OPTIMIZER,
                reason: format!("ns_coefficients must be finite, got ({a}, {b}, {c})"),
            });
        }
        if self.ns_steps >= 100 {
            return Err(Error::InvalidConfig {
                optimizer: Self::OPTIMIZER,
                reason: format!(
                    "ns_steps must be below 100 (torch's limit), got {}",
                    self.ns_steps
                ),
            });
        }
        Ok(())
    }
}

var_state! {
    /// Per-variable state of Muon: the momentum buffer, zeros before the first step.
    pub struct MuonState {
        momentum_buffer: Tensor(LikeVariable),
    }
}

/// Muon ([Keller Jordan 2024](https://kellerjordan.github.io/posts/muon/)), as
/// torch.optim.Muon 2.13: momentum SGD whose update is orthogonalised by a quintic
/// Newton-Schulz iteration in bfloat16, for the 2-D weight matrices of hidden layers.
///
/// It trains 2-D variables only, as torch's: `add_param` refuses any other with
/// [`Error::UnsupportedVariable`], and `case_optimizer!` rejects a rule routing to `Muon` whose
/// predicate does not imply `ndim(2)`. Pair it with AdamW for the rest, as torch's docs advise:
/// `ndim(2) & !name("*embed*") => Muon<lr: 0.02>, _ => AdamW<lr: 3e-4>`.
///
/// ```
/// use caseopt::{Muon, MuonConfig, Optimizer, Param, VarInfo};
/// use tch::{Kind, Tensor};
///
/// let w = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu));
/// let mut muon = Muon::new(MuonConfig { lr: 0.02.into(), ..Default::default() })?;
/// muon.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// muon.step_with_grads(&[Some(Tensor::full([3, 2], 0.5, (Kind::Float, tch::Device::Cpu)))])?;
/// assert_eq!(muon.state_names(), ["momentum_buffer"]);
/// // A bias is not a matrix.
/// let b = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
/// assert!(muon.add_param(Param::new(VarInfo::of("b", &b), b.shallow_clone())).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Muon = Optim<MuonAlgorithm>;

/// The algorithm behind [`Muon`].
#[derive(Debug)]
pub enum MuonAlgorithm {}

/// torch's `_zeropower_via_newtonschulz`, op for op: the update in bfloat16, transposed when it
/// is tall, divided by its norm (at least `eps`), then `ns_steps` quintic iterations.
fn zeropower_via_newtonschulz(update: &Tensor, c: &MuonConfig) -> Result<Tensor> {
    let (a, b, cc) = c.ns_coefficients;
    let size = update.size();
    let tall = size[0] > size[1];
    let mut ortho = update.f_to_kind(Kind::BFloat16)?;
    if tall {
        ortho = ortho.f_tr()?;
    }
    let norm = aten::clamp_min(&aten::vector_norm(&ortho)?, c.eps)?;
    let _ = ortho.f_div_(&norm)?;
    for _ in 0..c.ns_steps {
        let gram = ortho.f_matmul(&ortho.f_tr()?)?;
        let gram_update = aten::addmm(&gram, &gram, &gram, b, cc)?;
        ortho = aten::addmm(&ortho, &gram_update, &ortho, a, 1.0)?;
    }
    if tall {
        ortho = ortho.f_tr()?;
    }
    Ok(ortho)
}

impl Algorithm for MuonAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Muon;
    type Config = MuonConfig;
    type State = MuonState;
    type Kernel = NoKernel;
    type Extra = ();

    fn import_state(
        _: &MuonConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<MuonState> {
        MuonState::import(state, param, |_| true)
    }

    /// torch.optim's `_single_tensor_muon`, op for op.
    fn update(
        c: &MuonConfig,
        p: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<MuonState>,
        hp: &MuonValues,
        _: u64,
    ) -> Result<()> {
        let MuonValues { lr, weight_decay, momentum } = *hp;
        let shape = p.size();
        // `add_param` refused every other variable already; this guards the indexing below.
        if shape.len() != 2 || grad.dim() != 2 {
            return Err(Error::UnsupportedVariable {
                optimizer: MuonAlgorithm::NAME,
                variable: "<unnamed>".into(),
                shape,
                reason: "it trains 2-D variables and gradients only".into(),
            });
        }
        // torch makes the buffer in `_init_group`, before the update: zeros like the gradient.
        let st = match state {
            Some(st) => st,
            empty => empty.insert(MuonState::zeros(grad, |_| true)?),
        };
        let _ = st.momentum_buffer.f_lerp_(grad, 1.0 - momentum)?;
        let update = if c.nesterov {
            grad.f_lerp(&st.momentum_buffer, momentum)?
        } else {
            st.momentum_buffer.shallow_clone()
        };
        let update = zeropower_via_newtonschulz(&update, c)?;
        let adjusted_lr = c.adjust_lr_fn.adjust(lr, shape[0], shape[1]);
        let _ = p.f_mul_scalar_(1.0 - lr * weight_decay)?;
        aten::add_(p, &update, -adjusted_lr)?;
        Ok(())
    }

    /// torch.optim.Muon has no multi-tensor path (`foreach=True` raises): each variable of the
    /// group takes the single-tensor update.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &MuonValues,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_is_adjusted_as_torch_does() {
        let original = MuonAdjustLr::Original;
        assert_eq!(original.adjust(0.02, 64, 32), 0.02 * 2f64.sqrt());
        assert_eq!(original.adjust(0.02, 32, 64), 0.02);
        let rms = MuonAdjustLr::MatchRmsAdamW;
        assert_eq!(rms.adjust(0.02, 32, 64), 0.02 * (0.2 * 8.0));
    }

    #[test]
    fn the_iteration_settings_are_checked() {
        let ok = MuonConfig::default();
        assert!(ok.validate().is_ok());
        let bad = [
            MuonConfig { eps: 0.0, ..Default::default() },
            MuonConfig { ns_steps: 100, ..Default::default() },
            MuonConfig { ns_coefficients: (f64::NAN, 0.0, 0.0), ..Default::default() },
            MuonConfig { momentum: (-0.1).into(), ..Default::default() },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
