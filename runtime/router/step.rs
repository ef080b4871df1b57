//! One step of a router: collect every rule's gradients (checking each variable against its
//! route), stage the steps that can be computed while their gradients are checked, search the
//! rest for non-finite values, check 1-bit variables' values, and only then step every
//! optimizer.

use tch::Tensor;

use super::build::route_new_variables;
use super::constraints;
use super::nonfinite::{first_non_finite, NonFinitePolicy};
use super::parts::{OptimizerInspector, OptimizerVisitor, RouterParts};
use crate::error::{Error, Result};
use crate::kernels::metadata::{Grads, MetaReader, Status, TensorMeta};
use crate::optim::grad::check_grad;
use crate::optim::staging;
use crate::optim::{Backend, Optimizer};
use crate::var::Param;

/// One step of every optimizer with its variables' gradients; see
/// [`Router::step`](crate::Router::step).
pub(super) fn step<R: RouterParts>(router: &mut R) -> Result<()> {
    router.core_mut().host_reads = 0;
    route_new_variables(router)?;
    let mut grads = CollectGrads {
        grads: Vec::with_capacity(router.core().rules().len()),
        multi: Vec::with_capacity(router.core().rules().len()),
        reader: std::mem::take(&mut router.core_mut().reader),
        spare: std::mem::take(&mut router.core_mut().spare),
    };
    let collected = router.for_each_optimizer(&mut grads);
    let CollectGrads { mut grads, reader, multi, .. } = grads;
    router.core_mut().reader = reader;
    let found = match (collected, router.core().non_finite) {
        (Err(e), _) => Err(e),
        (Ok(()), NonFinitePolicy::Proceed) => Ok(None),
        (Ok(()), _) => {
            // Optimizers that can compute the step while they check its gradients do so
            // first, keeping the result aside (not after new variables: their binary
            // values are checked, and possibly rewritten, only once the step is accepted).
            let mut stage = StageAll { grads: &mut grads, first: None };
            let staged = if router.core().binary_unchecked {
                Ok(())
            } else {
                router.for_each_optimizer_mut(&mut stage)
            };
            let staged_first = stage.first;
            let found = staged.and_then(|()| {
                let mut scratch = std::mem::take(&mut router.core_mut().scan);
                let mut reads = 0;
                let found =
                    first_non_finite(&mut grads, &multi, &mut scratch, staged_first, &mut reads)
                        .map(|first| first.map(|(rule, index)| variable_name(router, rule, index)));
                let core = router.core_mut();
                core.scan = scratch;
                core.host_reads += reads;
                found
            });
            if !matches!(found, Ok(None)) {
                let _ = router.for_each_optimizer_mut(&mut DropStaged);
            }
            found
        }
    };
    // `None` under `NonFinitePolicy::Proceed`, which does not look.
    if let Some(variable) = found? {
        if router.core().non_finite == NonFinitePolicy::SkipStep {
            router.core_mut().skipped_steps += 1;
            return Ok(());
        }
        return Err(Error::NonFiniteGradient { variable });
    }
    if router.core().binary_unchecked {
        check_binary_values(router)?;
    }
    let mut step = StepWith(grads);
    let mut stepped = router.for_each_optimizer_mut(&mut step);
    if stepped.is_err() {
        // Rules after the failing one keep no staged step for a later call to find.
        let _ = router.for_each_optimizer_mut(&mut DropStaged);
    } else {
        // The constraints of optimizers that do not apply them in their own step.
        stepped = constraints::apply_declined(router, &step.0);
    }
    // The handles are dropped here; their lists' buffers serve the next step.
    let mut grads = step.0;
    grads.iter_mut().for_each(Grads::clear);
    router.core_mut().spare = grads;
    stepped
}

/// The name of variable `index` of rule `rule`, for an error.
fn variable_name<R: RouterParts>(router: &R, rule: usize, index: usize) -> String {
    router
        .dyn_optimizer(rule)
        .and_then(|o| o.params().get(index))
        .map(|p| p.info.name.clone())
        .unwrap_or_else(|| format!("<rule {rule} variable {index}>"))
}

/// Every rule's gradients, aligned with its optimizer's variables: `None` for a variable
/// without a gradient or a frozen one. Checks, for every rule before any optimizer moves,
/// what the optimizers' steps would otherwise refuse one rule at a time: fails on a variable
/// whose device, dtype or shape changed since it was routed, on a gradient that does not match
/// its variable, and on a step its optimizer would refuse ([`Optimizer::check_step`], a
/// hyperparameter whose schedule yields NaN).
struct CollectGrads {
    grads: Vec<Grads>,
    /// Per rule, whether its optimizer runs on `Backend::MultiTensor` (its gradients are then
    /// checked with ATen's multi-tensor reduction).
    multi: Vec<bool>,
    /// Reads every variable's metadata and its gradient's in one call per rule.
    reader: MetaReader,
    /// Empty lists whose buffers to reuse, one per rule.
    spare: Vec<Grads>,
}

impl OptimizerInspector for CollectGrads {
    fn inspect<O: Optimizer>(&mut self, _: usize, optimizer: &O) -> Result<()> {
        let params = optimizer.params();
        let reuse = if self.spare.is_empty() { Grads::default() } else { self.spare.remove(0) };
        let (metas, grads) = self.reader.grads(params.iter().map(|p| &p.tensor), reuse);
        for (p, m) in params.iter().zip(metas) {
            if !p.matches(m) {
                // tch's own accessors name what changed (or find nothing: carry on).
                p.check_unchanged()?;
            }
        }
        // The gradients' metadata came with the variables' in the same read: a gradient that
        // matches its variable's route matches the variable, checked just above.
        let grad_metas = self.reader.grad_metas();
        for ((p, g), m) in params.iter().zip(&grads.handles).zip(grad_metas) {
            if let Some(g) = g {
                if !p.matches(m) {
                    check_gradient(p, g, m)?;
                }
            }
        }
        optimizer.check_step(&grads.handles)?;
        check_hyperparameters(optimizer)?;
        self.grads.push(grads);
        let backend = optimizer.execution().map(|e| e.backend());
        self.multi.push(backend == Some(Backend::MultiTensor));
        Ok(())
    }
}

/// The slow path of the gradient check, for a gradient whose metadata does not match its
/// variable's: tch's own accessors name what differs; a gradient they find nothing wrong with
/// is in a layout the optimizers cannot use (sparse, ...), or was not readable (then carry on:
/// the optimizer's step checks it again).
fn check_gradient(p: &Param, g: &Tensor, m: &TensorMeta) -> Result<()> {
    check_grad(p, g)?;
    if m.status() == Status::NotStrided {
        let reason = "not a dense (strided) tensor: sparse, or another layout".to_string();
        return Err(Error::GradientMismatch { variable: p.info.name.clone(), reason });
    }
    Ok(())
}

/// Every hyperparameter's value at the optimizer's current step is a number. The ranges are
/// the optimizer's to check ([`Optimizer::check_step`]); NaN is in none, whatever the
/// optimizer.
fn check_hyperparameters<O: Optimizer>(optimizer: &O) -> Result<()> {
    for &name in optimizer.hyperparameter_names() {
        let value = optimizer.hyperparameter(name)?;
        if value.is_nan() {
            let optimizer = optimizer.name();
            return Err(Error::InvalidHyperparameter {
                optimizer,
                name,
                value,
                expected: "a number",
            });
        }
    }
    Ok(())
}

/// Asks each optimizer to [`stage`] its step with the collected
/// gradients; the gradients a staging checked are marked so that the scan skips them.
struct StageAll<'a> {
    grads: &'a mut [Grads],
    /// The first (rule, variable) whose gradient a staging found non-finite.
    first: Option<(usize, usize)>,
}

impl OptimizerVisitor for StageAll<'_> {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        let Some(grads) = self.grads.get_mut(rule) else {
            return Ok(());
        };
        if let Some(report) = staging::stage(optimizer, &grads.handles)? {
            for &i in &report.covered {
                grads.mark_checked(i);
            }
            if let Some(i) = report.first_non_finite {
                let here = (rule, i);
                self.first = Some(self.first.map_or(here, |f| f.min(here)));
            }
        }
        Ok(())
    }
}

/// Drops every optimizer's staged step: the step was refused.
struct DropStaged;

impl OptimizerVisitor for DropStaged {
    fn visit<O: Optimizer>(&mut self, _: usize, optimizer: &mut O) -> Result<()> {
        staging::drop_staged(optimizer);
        Ok(())
    }
}

/// Steps each optimizer with the collected gradients.
struct StepWith(Vec<Grads>);

impl OptimizerVisitor for StepWith {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        match self.0.get(rule) {
            Some(grads) => optimizer.step_with_grads(&grads.handles),
            None => optimizer.step(),
        }
    }
}

/// Reports, once each, the 1-bit variables that a binary optimizer (Bop, Bop2ndOrder) binarises
/// at their first update because they hold values other than -1 and +1, as larq's Bop does.
///
/// A 1-bit variable under any other optimizer is a latent weight, larq's other way of training a
/// binary network: the optimizer trains its real values and a quantizer binarises them in the
/// forward pass, so values other than +-1 are what it is meant to hold and are not reported.
fn check_binary_values<R: RouterParts>(router: &mut R) -> Result<()> {
    let mut found = Vec::new();
    let mut checked = Vec::new();
    // Each variable's verdict stays on its device; they are read back together, once per
    // device.
    let mut verdicts: Vec<(tch::Device, Vec<(usize, Tensor)>)> = Vec::new();
    for rule in 0..router.core().rules().len() {
        let Some(optimizer) = router.dyn_optimizer(rule) else { continue };
        let binarises = matches!(optimizer.name(), "Bop" | "Bop2ndOrder");
        for p in optimizer.params() {
            if !p.info.is_binary() || router.core().binary_checked.contains(&p.info.name) {
                continue;
            }
            checked.push((rule, p.info.name.clone()));
            if !binarises {
                // Only Bop and Bop2ndOrder binarise what they train; any other optimizer trains a
                // latent-weight variable as it is, which is what the user asked for.
                continue;
            }
            let other = p.tensor.f_abs()?.f_ne(1.0)?.f_any()?;
            let device = p.tensor.device();
            let k = checked.len() - 1;
            match verdicts.iter_mut().find(|(d, _)| *d == device) {
                Some((_, v)) => v.push((k, other)),
                None => verdicts.push((device, vec![(k, other)])),
            }
        }
    }
    let mut other = vec![false; checked.len()];
    for (_, v) in &verdicts {
        let flags: Vec<Tensor> = v.iter().map(|(_, t)| t.shallow_clone()).collect();
        let read = Vec::<bool>::try_from(Tensor::f_stack(&flags, 0)?)?;
        router.core_mut().host_reads += 1;
        for ((k, _), flag) in v.iter().zip(read) {
            other[*k] = flag;
        }
    }
    for ((rule, name), other) in checked.iter().zip(other) {
        let Some(optimizer) = router.dyn_optimizer(*rule) else { continue };
        if other {
            eprintln!(
                "caseopt: warning: `{name}` is declared 1-bit but holds values other than -1 and +1; {} binarises it at this step, as larq does",
                optimizer.name()
            );
            found.push(name.clone());
        }
    }
    let core = router.core_mut();
    core.binary_checked.extend(checked.into_iter().map(|(_, name)| name));
    core.binarised.extend(found);
    core.binary_unchecked = false;
    Ok(())
}
