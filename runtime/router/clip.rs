//! Gradient clipping by global L2 norm, over all rules or per rule, as torch's
//! `clip_grad_norm_` does.

use super::build::route_new_variables;
use super::parts::{OptimizerInspector, OptimizerVisitor, RouterParts};
use crate::error::{Error, Result};
use crate::optim::Optimizer;

/// See [`Router::clip_grad_norm`](crate::Router::clip_grad_norm).
pub(super) fn clip_grad_norm<R: RouterParts>(router: &mut R, max_norm: f64) -> Result<f64> {
    check_max_norm(max_norm)?;
    route_new_variables(router)?;
    let mut norms = SquaredNorms(Vec::with_capacity(router.core().rules().len()));
    router.for_each_optimizer(&mut norms)?;
    let total = norms.0.iter().sum::<f64>().sqrt();
    let factor = clip_factor(max_norm, total);
    if factor < 1.0 {
        router.for_each_optimizer_mut(&mut ScaleGrads { factor: |_| factor })?;
    }
    Ok(total)
}

/// See [`Router::clip_grad_norm_per_rule`](crate::Router::clip_grad_norm_per_rule).
pub(super) fn clip_grad_norm_per_rule<R: RouterParts>(
    router: &mut R,
    max_norm: f64,
) -> Result<Vec<f64>> {
    check_max_norm(max_norm)?;
    route_new_variables(router)?;
    let mut norms = SquaredNorms(Vec::with_capacity(router.core().rules().len()));
    router.for_each_optimizer(&mut norms)?;
    let norms: Vec<f64> = norms.0.iter().map(|s| s.sqrt()).collect();
    let factors: Vec<f64> = norms.iter().map(|&n| clip_factor(max_norm, n)).collect();
    if factors.iter().any(|&f| f < 1.0) {
        router.for_each_optimizer_mut(&mut ScaleGrads { factor: |rule| factors[rule] })?;
    }
    Ok(norms)
}

fn check_max_norm(max_norm: f64) -> Result<()> {
    if max_norm.is_finite() && max_norm >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidMaxNorm { value: max_norm })
    }
}

/// torch's `clip_grad_norm_` coefficient, clamped to 1.
fn clip_factor(max_norm: f64, norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Per rule, the sum of the squared L2 norms of its variables' gradients.
struct SquaredNorms(Vec<f64>);

impl OptimizerInspector for SquaredNorms {
    fn inspect<O: Optimizer>(&mut self, _: usize, optimizer: &O) -> Result<()> {
        let mut sum = 0.0;
        for p in optimizer.params() {
            if let Some(g) = p.grad() {
                let n = g.f_norm()?.f_double_value(&[])?;
                sum += n * n;
            }
        }
        self.0.push(sum);
        Ok(())
    }
}

/// Multiplies each rule's gradients in place by `factor(rule)` where it is below 1.
struct ScaleGrads<F: Fn(usize) -> f64> {
    factor: F,
}

impl<F: Fn(usize) -> f64> OptimizerVisitor for ScaleGrads<F> {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        let factor = (self.factor)(rule);
        if factor >= 1.0 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for p in optimizer.params() {
            if let Some(mut g) = p.grad() {
                let _ = g.f_mul_scalar_(factor)?;
            }
        }
        Ok(())
    }
}
