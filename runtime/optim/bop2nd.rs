//! Bop2ndOrder: Bop with a second-order moving average (Suarez-Ramirez et al. 2021).

use tch::Tensor;

use super::bop::{libtorch_step, multi_binary};
use super::core::{Algorithm, BinaryAlgorithm, Optim};
use super::flips::PendingFlips;
use super::hyper::hyperparameters;
use super::state::var_state;
use caseopt_rules::OptimizerKind;

use crate::error::Result;
use crate::kernels::multi::List;
use crate::kernels::ops::Bop2Kernel;
use crate::schedule::Schedule;
use crate::var::Param;

/// Denominator guard of Bop2ndOrder's normalised momentum, fixed by the paper.
pub const BOP2_EPSILON: f64 = 1e-10;

/// Configuration of [`Bop2ndOrder`]; `Default` is the paper's code's (threshold 1e-8,
/// gamma 1e-4, sigma 1e-2).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bop2ndOrderConfig {
    /// A weight flips when `w * m / (sqrt(v) + 1e-10)` exceeds it (>= 0). Default 1e-8.
    pub threshold: Schedule,
    /// Adaptivity rate of the gradient's moving average, in (0, 1]. Default 1e-4.
    pub gamma: Schedule,
    /// Adaptivity rate of the squared gradient's moving average, in (0, 1]. Default 1e-2.
    pub sigma: Schedule,
}

impl Default for Bop2ndOrderConfig {
    fn default() -> Self {
        Bop2ndOrderConfig { threshold: 1e-8.into(), gamma: 1e-4.into(), sigma: 1e-2.into() }
    }
}

hyperparameters!(
    Bop2ndOrder,
    Bop2ndOrderConfig,
    Bop2ndOrderValues { threshold, gamma, sigma }
);

var_state! {
    /// Per-variable state of Bop2ndOrder: moving averages of the gradient and its square.
    pub struct Bop2ndOrderState {
        m: Tensor(LikeVariable),
        v: Tensor(LikeVariable),
    }
}

/// Bop with a second-order moving average (Suarez-Ramirez et al. 2021, "A Bop and beyond"):
/// the momentum is normalised by `sqrt(v) + 1e-10` before it meets the threshold.
///
/// ```
/// use caseopt::{Bop2ndOrder, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f32, -1.0]);
/// let mut bop = Bop2ndOrder::new(Default::default())?;
/// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
/// // A large gradient along the weight's sign: w * m / sqrt(v) exceeds the threshold.
/// bop.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, -1.0]))])?;
/// assert_eq!(Vec::<f32>::try_from(&w)?, vec![-1.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type Bop2ndOrder = Optim<Bop2ndOrderAlgorithm>;

/// The algorithm behind [`Bop2ndOrder`].
#[derive(Debug)]
pub enum Bop2ndOrderAlgorithm {}

impl BinaryAlgorithm for Bop2ndOrderAlgorithm {}

impl Algorithm for Bop2ndOrderAlgorithm {
    const KIND: OptimizerKind = OptimizerKind::Bop2ndOrder;
    const BINARY: bool = true;
    type Config = Bop2ndOrderConfig;
    type State = Bop2ndOrderState;
    type Kernel = Bop2Kernel;
    type Extra = ();

    fn import_state(
        _: &Bop2ndOrderConfig,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<Bop2ndOrderState> {
        Bop2ndOrderState::import(state, param, |_| true)
    }

    fn update(
        config: &Bop2ndOrderConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<Bop2ndOrderState>,
        hp: &Bop2ndOrderValues,
        step: u64,
    ) -> Result<()> {
        Self::update_counting_flips(config, w, grad, state, hp, step, None).map(drop)
    }

    fn update_counting_flips(
        _: &Bop2ndOrderConfig,
        w: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<Bop2ndOrderState>,
        hp: &Bop2ndOrderValues,
        _: u64,
        spare: Option<PendingFlips>,
    ) -> Result<Option<PendingFlips>> {
        let st = match state {
            Some(st) => st,
            empty => empty.insert(Bop2ndOrderState {
                m: w.f_zeros_like()?,
                v: w.f_zeros_like()?,
                slot: None,
            }),
        };
        let scalars = [hp.gamma, hp.sigma, hp.threshold, BOP2_EPSILON];
        libtorch_step(w, grad, &mut st.m, Some(&mut st.v), scalars, spare).map(Some)
    }

    fn kernel(_: &Bop2ndOrderConfig, hp: &Bop2ndOrderValues) -> Option<Bop2Kernel> {
        Some(Bop2Kernel {
            gamma: hp.gamma,
            sigma: hp.sigma,
            threshold: hp.threshold,
            eps: BOP2_EPSILON,
        })
    }

    fn kernel_states(_: &Bop2Kernel) -> usize {
        2
    }

    /// larq's Bop2ndOrder on `_foreach_*` ops (see `bop::multi_binary`).
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &Bop2ndOrderValues,
        group: &[usize],
    ) -> Result<()> {
        for &i in group {
            if this.states[i].is_none() {
                let w = &this.params[i].tensor;
                let (m, v) = (w.f_zeros_like()?, w.f_zeros_like()?);
                this.states[i] = Some(Bop2ndOrderState { m, v, slot: None });
            }
        }
        let flips = {
            let sts: Vec<&Bop2ndOrderState> =
                group.iter().filter_map(|&i| this.states[i].as_ref()).collect();
            let ms = List::of(sts.iter().map(|s| &s.m));
            let vs = List::of(sts.iter().map(|s| &s.v));
            let scalars = [hp.gamma, hp.sigma, hp.threshold, BOP2_EPSILON];
            multi_binary(&this.params, grads, group, &ms, Some(&vs), scalars)?
        };
        for (&i, n) in group.iter().zip(flips) {
            this.flips.pending(i, PendingFlips::counted(n));
        }
        Ok(())
    }
}
