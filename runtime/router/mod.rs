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
mod constraints;
mod flips;
mod nonfinite;
mod ownership;
mod parts;
mod rules;
pub(crate) mod scaled;
mod step;
mod table;

use std::fmt;
use std::sync::{Arc, Mutex};

use tch::{nn, Tensor};

use crate::constraint::Constraint;
use crate::error::Result;
use crate::optim::{FlipRatios, Optimizer};

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
    /// The trainable variables added to the `VarStore` since the router last routed (when it
    /// was built, or at its last [`step`](Self::step)), each with the route the next step will
    /// give it; changes nothing. A variable two rules would claim is
    /// [`Error::OverlappingRules`](crate::Error::OverlappingRules), as at that step.
    /// Checkpoints record these routes, so that a file saved before that step loads into a
    /// router built afresh over the same model.
    ///
    /// ```
    /// use caseopt::{case_optimizer, Router};
    ///
    /// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    /// let _w = vs.root().zeros("w", &[3]);
    /// let mut opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs)?;
    /// let _b = vs.root().zeros("b", &[3]);
    /// let pending = opt.unrouted_variables()?;
    /// assert_eq!((pending[0].variable.as_str(), pending[0].rule), ("b", Some(0)));
    /// opt.route_new_variables()?;
    /// assert!(opt.unrouted_variables()?.is_empty());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn unrouted_variables(&self) -> Result<Vec<Route>>;
    /// Routes the [`unrouted_variables`](Self::unrouted_variables) now, as
    /// [`step`](Self::step) does first; on error nothing changes.
    fn route_new_variables(&mut self) -> Result<()>;
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
    /// - a 1-bit variable that [`Bop`](crate::Bop) or [`Bop2ndOrder`](crate::Bop2ndOrder)
    ///   trains and that holds values other than +-1 is reported once (a warning on stderr and
    ///   [`binarised_variables`](Self::binarised_variables)); Bop binarises it, as larq does. A
    ///   1-bit variable under any other optimizer is a latent weight (its real values trained,
    ///   a quantizer binarising them in the forward pass) and is not reported.
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
    /// 1-bit variables that Bop or Bop2ndOrder binarised because they held values other than
    /// -1 and +1 (each reported once, at the first step that updated it), in the order they
    /// were found. Latent weights, 1-bit variables under any other optimizer, are not listed.
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
    /// Sets the constraint applied to variable `variable` after each of its updates (larq's
    /// `kernel_constraint`, e.g. [`Constraint::weight_clip`]); `None` removes it, and the
    /// variable then follows its rule's ([`set_rule_constraint`](Self::set_rule_constraint)),
    /// which a variable's own constraint overrides.
    ///
    /// The optimizer applies it inside its step ([`Optimizer::set_constraint`]): the Adam
    /// family's fused kernels clamp each new value before they store it, the libtorch path
    /// clamps right after the variable's update. For an optimizer that declines (your own),
    /// the router clamps after the step. A refused or skipped step constrains nothing, and a
    /// variable without a gradient is not constrained. Constraints are configuration: a
    /// checkpoint does not hold them.
    ///
    /// Fails, changing nothing, with [`Error::UnknownVariable`](crate::Error::UnknownVariable)
    /// for a name the router does not train and
    /// [`Error::InvalidConstraint`](crate::Error::InvalidConstraint) for a bad parameter.
    ///
    /// ```
    /// use caseopt::{case_optimizer, Constraint, Param, Router, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[0.95f32, -0.3]).set_requires_grad(true);
    /// let vars = vec![Param::new(VarInfo::of("w", &w), w.shallow_clone())];
    /// let mut opt = case_optimizer! { _ => Adam<lr: 0.1> }.build_from(vars)?;
    /// opt.set_constraint("w", Some(Constraint::weight_clip(1.0)?))?;
    /// assert_eq!(opt.constraint("w"), Some(Constraint::WeightClip { clip_value: 1.0 }));
    /// assert!(opt.set_constraint("nope", None).is_err());
    /// // A loss pushing both weights up: 0.95 + 0.1 is clipped to 1.
    /// opt.backward_step(&(-w.sum(tch::Kind::Float)))?;
    /// assert_eq!(w.double_value(&[0]), 1.0);
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn set_constraint(&mut self, variable: &str, constraint: Option<Constraint>) -> Result<()>;
    /// Sets the constraint of every variable of rule `rule` (its index), present and routed
    /// later, that has none of its own ([`set_constraint`](Self::set_constraint)); `None`
    /// removes it. Fails, changing nothing, with
    /// [`Error::NoSuchRule`](crate::Error::NoSuchRule) or
    /// [`Error::InvalidConstraint`](crate::Error::InvalidConstraint).
    ///
    /// ```
    /// use caseopt::{case_optimizer, Constraint, Param, Router, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[1.0f32, -1.0]);
    /// let b = Tensor::from_slice(&[0.0f32]);
    /// let vars = vec![
    ///     Param::new(VarInfo::of("fc.weight", &w).with_bits(1), w.shallow_clone()),
    ///     Param::new(VarInfo::of("fc.bias", &b), b.shallow_clone()),
    /// ];
    /// // larq's latent-weight recipe: Adam on the latent kernels, clipped to [-1, 1].
    /// let mut opt = case_optimizer! { binary => Adam<lr: 0.01>, _ => Adam<lr: 0.01> }
    ///     .build_from(vars)?;
    /// opt.set_rule_constraint(0, Some(Constraint::weight_clip(1.0)?))?;
    /// assert_eq!(opt.constraint("fc.weight").map(|c| c.clip_value()), Some(1.0));
    /// assert_eq!(opt.constraint("fc.bias"), None);
    /// assert!(opt.set_rule_constraint(2, None).is_err());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn set_rule_constraint(&mut self, rule: usize, constraint: Option<Constraint>) -> Result<()>;
    /// The constraint applied to variable `variable`: its own, else its rule's; `None` also
    /// for a name the router does not train.
    fn constraint(&self, variable: &str) -> Option<Constraint>;
    /// Rule `rule`'s constraint.
    fn rule_constraint(&self, rule: usize) -> Option<Constraint>;
    /// The fraction of weights whose sign flipped in the last step, for every variable of
    /// every [`Bop`](crate::Bop) and [`Bop2ndOrder`](crate::Bop2ndOrder) of the router and in
    /// total (larq's `FlipRatio` metric; see [`FlipRatios`]); `None` when the router has no
    /// such optimizer or none of them has stepped. Counted by the pass that flipped the
    /// weights, not by a sweep of its own; on CUDA, reading it waits for the device.
    ///
    /// ```
    /// use caseopt::{case_optimizer, Param, Router, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[1.0f32, -1.0, 1.0, -1.0]).set_requires_grad(true);
    /// let vars = vec![Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())];
    /// let mut opt = case_optimizer! { binary => Bop<threshold: 0.0, gamma: 1.0> }
    ///     .build_from(vars)?;
    /// assert_eq!(opt.flip_ratios()?, None);
    /// // The loss's gradient is `g`; Bop flips where `w * g > 0`: the first and last weights.
    /// let g = Tensor::from_slice(&[1.0f32, 1.0, -1.0, -1.0]);
    /// opt.backward_step(&(&w * &g).sum(tch::Kind::Float))?;
    /// let ratios = opt.flip_ratios()?.expect("Bop stepped");
    /// assert_eq!((ratios.flipped, ratios.weights, ratios.total), (2, 4, 0.5));
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn flip_ratios(&self) -> Result<Option<FlipRatios>>;

    /// How many times the last [`step`](Self::step) read a value back from a tensor to the
    /// host to decide something (each such read waits for the device on a GPU): the
    /// non-finite check reads once per device whose gradients ATen's multi-tensor reduction
    /// checks (the gradients of optimizers on [`Backend::MultiTensor`](crate::Backend), and
    /// every CUDA, half-precision or strided gradient whatever the backend), so once a step
    /// on a single device, however many variables; more only after a find, to name the
    /// variable. The first step also reads once per device to check that 1-bit variables
    /// hold +-1. The CPU scan of the fused kernels' gradients reads memory, not tensors, and
    /// is not counted. 0 before the first step and under [`NonFinitePolicy::Proceed`] (after
    /// the first step).
    ///
    /// ```
    /// use caseopt::{case_optimizer, Backend, Execution, Param, Router, VarInfo};
    /// use tch::{Device, Kind, Tensor};
    ///
    /// let ws: Vec<Tensor> =
    ///     (0..20).map(|_| Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true)).collect();
    /// let vars = ws
    ///     .iter()
    ///     .enumerate()
    ///     .map(|(i, w)| Param::new(VarInfo::of(format!("w{i}"), w), w.shallow_clone()))
    ///     .collect();
    /// let mut opt = case_optimizer! { _ => Adam<lr: 0.1> }.build_from(vars)?;
    /// opt.rule0_mut().set_backend(Backend::MultiTensor);
    /// let loss = ws.iter().map(|w| w.sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
    /// opt.backward_step(&loss)?;
    /// assert_eq!(opt.host_reads(), 1); // 20 gradients checked with one read
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn host_reads(&self) -> u64;
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

    fn unrouted_variables(&self) -> Result<Vec<Route>> {
        build::unrouted_variables(self)
    }

    fn route_new_variables(&mut self) -> Result<()> {
        route_new_variables(self)
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

    fn set_constraint(&mut self, variable: &str, constraint: Option<Constraint>) -> Result<()> {
        constraints::set_variable(self, variable, constraint)
    }

    fn set_rule_constraint(&mut self, rule: usize, constraint: Option<Constraint>) -> Result<()> {
        constraints::set_rule(self, rule, constraint)
    }

    fn constraint(&self, variable: &str) -> Option<Constraint> {
        constraints::of_variable(self, variable)
    }

    fn rule_constraint(&self, rule: usize) -> Option<Constraint> {
        self.core().constraints.rule(rule)
    }

    fn flip_ratios(&self) -> Result<Option<FlipRatios>> {
        flips::flip_ratios(self)
    }

    fn host_reads(&self) -> u64 {
        self.core().host_reads
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
