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
use crate::optim::{builtin_mut, Backend, Optimizer};
use crate::var::Param;

/// One step of every optimizer with its variables' gradients; see
/// [`Router::step`](crate::Router::step).
pub(super) fn step<R: RouterParts>(router: &mut R) -> Result<()> {
    router.core_mut().host_reads = 0;
    route_new_variables(router)?;
    let mut shared = shares_reads(router);
    let rules = router.core().rules().len();
    let mut readers = std::mem::take(&mut router.core_mut().readers);
    readers.resize_with(rules, MetaReader::default);
    let mut grads = CollectGrads {
        grads: Vec::with_capacity(rules),
        multi: Vec::with_capacity(rules),
        readers,
        writable: shared,
        spare: std::mem::take(&mut router.core_mut().spare),
    };
    let collected = router.for_each_optimizer(&mut grads);
    let CollectGrads { mut grads, readers, multi, .. } = grads;
    let found = match (collected, router.core().non_finite) {
        (Err(e), _) => Err(e),
        (Ok(()), NonFinitePolicy::Proceed) => Ok(None),
        (Ok(()), _) => {
            // Optimizers that can compute the step while they check its gradients do so
            // first, keeping the result aside (not after new variables: their binary
            // values are checked, and possibly rewritten, only once the step is accepted).
            let mut stage = StageAll { grads: &mut grads, first: None, any: false };
            let staged = if router.core().binary_unchecked {
                Ok(())
            } else {
                router.for_each_optimizer_mut(&mut stage)
            };
            let staged_first = stage.first;
            // A staged step is committed by exchanging state buffers' storages, which moves
            // the memory of every view of them: the reads are not lent after one.
            shared &= !stage.any;
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
    // `None` under `NonFinitePolicy::Proceed`, which does not look. Whether to step:
    let proceed = found.and_then(|found| match found {
        Some(_) if router.core().non_finite == NonFinitePolicy::SkipStep => {
            router.core_mut().skipped_steps += 1;
            Ok(false)
        }
        Some(variable) => Err(Error::NonFiniteGradient { variable }),
        None => Ok(true),
    });
    let proceed = match proceed {
        Ok(true) if router.core().binary_unchecked => check_binary_values(router).map(|()| true),
        proceed => proceed,
    };
    let mut step = StepWith { grads, readers, shared };
    let stepped = match proceed {
        Ok(true) => {
            let stepped = router.for_each_optimizer_mut(&mut step);
            if stepped.is_err() {
                // Rules after the failing one keep no staged step for a later call to find.
                let _ = router.for_each_optimizer_mut(&mut DropStaged);
                stepped
            } else {
                // The constraints of optimizers that do not apply them in their own step.
                constraints::apply_declined(router, &step.grads)
            }
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    // The handles let go of their gradients here; the lists' buffers and the readers serve the
    // next step.
    let StepWith { mut grads, readers, .. } = step;
    grads.iter_mut().for_each(Grads::clear);
    let core = router.core_mut();
    core.spare = grads;
    core.readers = readers;
    stepped
}

/// Whether this step's reads of the variables and gradients can serve the optimizers' fused
/// passes too, instead of a second read of each: only when nothing but caseopt's own code runs
/// between the router's read and the last optimizer's pass, which then finds every tensor as it
/// was read. User code could resize or re-point a variable or a gradient in between and leave
/// the first read's addresses dangling; it runs there in a user optimizer's step (of an earlier
/// rule, or any rule's `check_step`) and in a custom schedule (evaluated in the collect and in
/// each step). So: every rule's optimizer is a built-in one without custom schedules. caseopt's
/// own code in between moves no variable and no gradient, but for one thing: a staged step is
/// committed by exchanging state buffers' storages, which would move a variable that is a view
/// of one; [`step`] lends nothing in a step where something was staged.
fn shares_reads<R: RouterParts>(router: &mut R) -> bool {
    struct OwnCodeOnly(bool);
    impl OptimizerVisitor for OwnCodeOnly {
        fn visit<O: Optimizer>(&mut self, _: usize, optimizer: &mut O) -> Result<()> {
            self.0 &= builtin_mut(optimizer).is_some_and(|o| o.runs_only_own_code());
            Ok(())
        }
    }
    let mut own = OwnCodeOnly(cfg!(feature = "fused"));
    router.for_each_optimizer_mut(&mut own).is_ok() && own.0
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
    /// Read every variable's metadata and its gradient's in one call per rule, one per rule.
    readers: Vec<MetaReader>,
    /// Whether to read the variables' writable addresses, for the optimizers' fused passes
    /// ([`shares_reads`]).
    writable: bool,
    /// Empty lists whose buffers to reuse, one per rule.
    spare: Vec<Grads>,
}

impl OptimizerInspector for CollectGrads {
    fn inspect<O: Optimizer>(&mut self, rule: usize, optimizer: &O) -> Result<()> {
        let params = optimizer.params();
        let reuse = if self.spare.is_empty() { Grads::default() } else { self.spare.remove(0) };
        if self.readers.len() <= rule {
            self.readers.resize_with(rule + 1, MetaReader::default);
        }
        let reader = &mut self.readers[rule];
        let (metas, grads) = reader.grads(params.iter().map(|p| &p.tensor), reuse, self.writable);
        let mut all_match = true;
        for (p, m) in params.iter().zip(metas) {
            if !p.matches(m) {
                // tch's own accessors name what changed (or find nothing: carry on).
                p.check_unchanged()?;
                all_match = false;
            }
        }
        // The gradients' metadata came with the variables' in the same read: a gradient that
        // matches its variable's route matches the variable, checked just above. When every
        // variable's read matched its route, a gradient read with its variable's device, dtype
        // and shape matches that route too (without a second look at the route); otherwise
        // the route itself is the judge.
        let read = reader.metas().iter().zip(reader.grad_metas());
        for ((p, g), (pm, m)) in params.iter().zip(&grads.handles).zip(read) {
            if let Some(g) = g {
                let matched = (all_match && m.same_layout(pm)) || p.matches(m);
                if !matched {
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
    /// Whether some optimizer staged its step.
    any: bool,
}

impl OptimizerVisitor for StageAll<'_> {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        let Some(grads) = self.grads.get_mut(rule) else {
            return Ok(());
        };
        if let Some(report) = staging::stage(optimizer, &grads.handles)? {
            self.any = true;
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

/// Steps each optimizer with the collected gradients, lending it its rule's read when
/// [`shares_reads`] allowed.
struct StepWith {
    grads: Vec<Grads>,
    readers: Vec<MetaReader>,
    shared: bool,
}

impl OptimizerVisitor for StepWith {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        let Some(grads) = self.grads.get(rule) else {
            return optimizer.step();
        };
        if self.shared {
            if let (Some(builtin), Some(read)) =
                (builtin_mut(optimizer), self.readers.get_mut(rule))
            {
                return builtin.step_with_read(&grads.handles, read);
            }
        }
        optimizer.step_with_grads(&grads.handles)
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

#[cfg(all(test, feature = "fused"))]
mod tests {
    use tch::{nn, Device, Kind, Tensor};

    use crate::kernels::lent_queues;
    use crate::{case_optimizer, PathExt, Router, Schedule};

    case_optimizer! {
        struct BopAdam {
            binary => Bop<threshold: 1e-7, gamma: 1e-1>,
            _ => Adam<lr: 0.01>,
        }
    }

    fn model() -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        for i in 0..24 {
            let _ = root.binary().var(&format!("w{i:02}"), &[64], nn::Init::Const(1.0));
            let _ = root.var(&format!("b{i:02}"), &[33], nn::Init::Const(0.5));
        }
        vs
    }

    /// Deterministic gradients, different per variable and step, whose moving averages cross
    /// Bop's threshold.
    fn set_grads<R: Router>(r: &mut R, vs: &nn::VarStore, step: u64) {
        r.zero_grad();
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (k, (_, t)) in sorted(vs).iter().enumerate() {
            let phase = k as f64 + 0.37 * step as f64;
            let g =
                (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) + phase).sin() * 1e-3;
            loss += (t * g.view(t.size().as_slice())).sum(Kind::Float);
        }
        loss.backward();
    }

    fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|x, y| x.0.cmp(&y.0));
        vars
    }

    fn values(vs: &nn::VarStore) -> Vec<(String, Vec<f32>)> {
        let flat = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        sorted(vs).iter().map(|(name, t)| (name.clone(), flat(t))).collect()
    }

    #[test]
    fn the_router_read_serves_the_fused_passes_only_where_no_user_code_runs() {
        let (vs_lent, vs_read) = (model(), model());
        let mut lent = BopAdam::build(&vs_lent).unwrap();
        let mut read = BopAdam::build(&vs_read).unwrap();
        // The same learning rate as a closure: user code runs in the step, so every pass
        // reads its operands itself.
        let adam = read.optimizer_mut(1).unwrap();
        adam.set_hyperparameter("lr", Schedule::custom(|_| 0.01)).unwrap();
        for step in 0..4 {
            set_grads(&mut lent, &vs_lent, step);
            set_grads(&mut read, &vs_read, step);
            let before = lent_queues();
            lent.step().unwrap();
            assert_eq!(lent_queues() - before, 2, "Bop's and Adam's passes, step {step}");
            let before = lent_queues();
            read.step().unwrap();
            assert_eq!(lent_queues(), before, "a custom schedule, step {step}");
            for ((name, a), (_, b)) in values(&vs_lent).iter().zip(values(&vs_read)) {
                assert!(a == &b, "{name} differs after step {step}");
            }
        }
        assert_eq!(lent.step_counts(), vec![4, 4]);
        // Back to a built-in schedule: lent again.
        let adam = read.optimizer_mut(1).unwrap();
        adam.set_hyperparameter("lr", Schedule::constant(0.01)).unwrap();
        set_grads(&mut read, &vs_read, 4);
        let before = lent_queues();
        read.step().unwrap();
        assert_eq!(lent_queues() - before, 2);
    }
}
