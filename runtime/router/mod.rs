//! Run-time support for the routers `case_optimizer!` generates.
//!
//! The macro emits one struct per invocation with one concrete field per rule's optimizer and
//! implements the hidden [`RouterParts`] for it: the rules as data, how to build each optimizer,
//! and a generic visitor over the fields. Everything else lives here, once: routing variables
//! with larq's `CaseOptimizer` semantics, the routing table, the step path (statically
//! dispatched through the visitor, no allocation of its own), gradient clipping and the
//! object-safe [`Router`] view that checkpoints and generic code use.
//!
//! One file per job: `rules` (the rules as data), `table` (the routing algorithm and its
//! table), `parts` (the contract with the generated code), `build` (routing variables at the
//! build and after it), `step` (the step pipeline), `nonfinite` (the non-finite policy and
//! search), `clip` (gradient clipping); this file holds the public [`Router`] trait.

mod build;
mod clip;
mod nonfinite;
mod ownership;
mod parts;
mod rules;
mod step;
mod table;

use std::fmt;
use std::sync::{Arc, Mutex};

use tch::{nn, Tensor};

use crate::error::Result;
use crate::optim::Optimizer;

use build::route_new_variables;
pub use build::RouterBuilder;
pub use nonfinite::NonFinitePolicy;
#[doc(hidden)]
pub use parts::{Assembly, OptimizerInspector, OptimizerVisitor, RouterCore, RouterParts};
pub use rules::{fingerprint, RuleInfo, RuleSpec};
pub use table::{Route, RoutingTable};

/// A router built by `case_optimizer!`, seen through a trait object: inspection (rules,
/// routing table, each rule's optimizer) and the training calls. Dispatch inside a router stays
/// static; this trait is for checkpoints and code generic over routers.
///
/// Every generated router implements it, and also has the same methods inherently, so calling
/// them needs no import.
///
/// ```
/// use caseopt::{case_optimizer, Param, Router, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu));
/// let vars = vec![Param::new(VarInfo::of("w", &w), w.shallow_clone())];
/// let opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build_from(vars)?;
/// let dynamic: &dyn Router = &opt;
/// assert_eq!(dynamic.rules()[0].optimizer, "Sgd");
/// assert_eq!(dynamic.optimizer(0).map(|o| o.name()), Some("SGD"));
/// # Ok::<(), caseopt::Error>(())
/// ```
pub trait Router: Send {
    /// The rules, in order.
    fn rules(&self) -> &[RuleInfo];
    /// Which rule trains each variable.
    fn routing_table(&self) -> &RoutingTable;
    /// Rule `rule`'s optimizer.
    fn optimizer(&self, rule: usize) -> Option<&dyn Optimizer>;
    /// Rule `rule`'s optimizer, mutably (to change a hyperparameter, restore state, ...).
    fn optimizer_mut(&mut self, rule: usize) -> Option<&mut dyn Optimizer>;
    /// See [`fingerprint`]: stable across runs and platforms, changes with the rules.
    fn fingerprint(&self) -> u64;
    /// The variables of the `VarStore` the router was built from (a clone of its
    /// `variables_` handle), so that variables added after the build can be found; `None` when
    /// it was built from a list.
    fn variable_store(&self) -> Option<&Arc<Mutex<nn::Variables>>>;
    /// Each rule's optimizer's step count, in rule order.
    fn step_counts(&self) -> Vec<u64>;
    /// One step of every optimizer, each with its variables' `.grad()`, after checks that
    /// refuse bad input before anything is updated:
    ///
    /// - variables added to the `VarStore` since the last step are routed first, with the same
    ///   rules and checks (a variable claimed by two rules is an error naming it, every step
    ///   until it is resolved);
    /// - a variable whose device, dtype or shape changed since it was routed is
    ///   [`Error::VariableChanged`](crate::Error::VariableChanged) naming it;
    /// - variables without a gradient, and frozen ones (`requires_grad` false, even with a stale
    ///   gradient), are skipped, as torch does;
    /// - a gradient whose shape, dtype, device or layout differs from its variable's is
    ///   [`Error::GradientMismatch`](crate::Error::GradientMismatch) naming it;
    /// - a step an optimizer would refuse ([`Optimizer::check_step`]: with the built-in
    ///   optimizers, a schedule whose value at this step is out of range) is
    ///   [`Error::InvalidHyperparameter`](crate::Error::InvalidHyperparameter);
    /// - gradients holding NaN or infinity are handled by the [`NonFinitePolicy`] (by default
    ///   an error naming the variable);
    /// - a 1-bit variable holding values other than +-1 is reported once (a warning on stderr
    ///   and [`binarised_variables`](Self::binarised_variables)); Bop binarises it, as larq does.
    ///
    /// Each check covers every rule before any optimizer moves: a refused step leaves every
    /// parameter, state and step counter as it was.
    fn step(&mut self) -> Result<()>;
    /// What [`step`](Self::step) does with gradients that hold NaN or infinity.
    fn set_non_finite_policy(&mut self, policy: NonFinitePolicy);
    /// The current [`NonFinitePolicy`] (by default [`NonFinitePolicy::Error`]).
    fn non_finite_policy(&self) -> NonFinitePolicy;
    /// Steps skipped under [`NonFinitePolicy::SkipStep`] so far.
    fn skipped_steps(&self) -> u64;
    /// 1-bit variables found holding values other than -1 and +1 (each reported once, at the
    /// first step that updated it), in the order they were found.
    fn binarised_variables(&self) -> &[String];
    /// Zeroes the gradient of every routed variable.
    fn zero_grad(&mut self);
    /// `zero_grad`, `loss.backward()`, `step`, like tch's `Optimizer::backward_step`.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()>;
    /// Scales the gradients of all routed variables so that their global L2 norm is at most
    /// `max_norm` (torch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, only when
    /// below 1) and returns the norm before clipping.
    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64>;
    /// [`clip_grad_norm`](Self::clip_grad_norm) applied to each rule's variables separately;
    /// returns each rule's norm before clipping, in rule order.
    fn clip_grad_norm_per_rule(&mut self, max_norm: f64) -> Result<Vec<f64>>;
}

impl<R: RouterParts> Router for R {
    fn rules(&self) -> &[RuleInfo] {
        self.core().rules()
    }

    fn routing_table(&self) -> &RoutingTable {
        self.core().routing_table()
    }

    fn optimizer(&self, rule: usize) -> Option<&dyn Optimizer> {
        self.dyn_optimizer(rule)
    }

    fn optimizer_mut(&mut self, rule: usize) -> Option<&mut dyn Optimizer> {
        self.dyn_optimizer_mut(rule)
    }

    fn fingerprint(&self) -> u64 {
        self.core().fingerprint()
    }

    fn variable_store(&self) -> Option<&Arc<Mutex<nn::Variables>>> {
        self.core().variable_store()
    }

    fn step_counts(&self) -> Vec<u64> {
        struct Counts(Vec<u64>);
        impl OptimizerInspector for Counts {
            fn inspect<O: Optimizer>(&mut self, _: usize, optimizer: &O) -> Result<()> {
                self.0.push(optimizer.step_count());
                Ok(())
            }
        }
        let mut counts = Counts(Vec::with_capacity(self.rules().len()));
        // The visitor never fails.
        let _ = self.for_each_optimizer(&mut counts);
        counts.0
    }

    fn step(&mut self) -> Result<()> {
        step::step(self)
    }

    fn set_non_finite_policy(&mut self, policy: NonFinitePolicy) {
        self.core_mut().non_finite = policy;
    }

    fn non_finite_policy(&self) -> NonFinitePolicy {
        self.core().non_finite
    }

    fn skipped_steps(&self) -> u64 {
        self.core().skipped_steps
    }

    fn binarised_variables(&self) -> &[String] {
        &self.core().binarised
    }

    fn zero_grad(&mut self) {
        struct ZeroGrad;
        impl OptimizerVisitor for ZeroGrad {
            fn visit<O: Optimizer>(&mut self, _: usize, optimizer: &mut O) -> Result<()> {
                optimizer.zero_grad();
                Ok(())
            }
        }
        let _ = self.for_each_optimizer_mut(&mut ZeroGrad);
    }

    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        // New variables first, so that their gradients are zeroed with the others.
        route_new_variables(self)?;
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        clip::clip_grad_norm(self, max_norm)
    }

    fn clip_grad_norm_per_rule(&mut self, max_norm: f64) -> Result<Vec<f64>> {
        clip::clip_grad_norm_per_rule(self, max_norm)
    }
}

/// `Debug` for generated routers: the rules and each optimizer's step count.
#[doc(hidden)]
pub fn debug_router<R: RouterParts>(router: &R, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    f.debug_struct("CaseOptimizer")
        .field("rules", &rules)
        .field("step_counts", &router.step_counts())
        .finish_non_exhaustive()
}
