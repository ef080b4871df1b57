//! What `case_optimizer!` and the runtime agree on: the generated struct implements
//! [`RouterParts`] (its rules as data, how to build each optimizer from an [`Assembly`], and
//! statically dispatched walks over its optimizers with an [`OptimizerVisitor`] or an
//! [`OptimizerInspector`]) and keeps a [`RouterCore`], the state every router shares.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tch::nn;

use super::constraints::Constraints;
use super::nonfinite::NonFinitePolicy;
use super::ownership::Ownership;
use super::rules::{RuleInfo, RuleSpec};
use super::table::RoutingTable;
use crate::error::{Error, Result};
use crate::kernels::finite::ScanScratch;
use crate::kernels::metadata::{Grads, MetaReader};
use crate::optim::{FromConfig, Optimizer};
use crate::var::Param;

/// What a router keeps besides its optimizers: the rules, the routing table, the fingerprint
/// and, when built from a `VarStore`, a handle on the store's variables (so that variables
/// added after the build can be detected). Reached through [`Router`].
#[doc(hidden)]
#[derive(Debug)]
pub struct RouterCore {
    pub(super) table: RoutingTable,
    pub(super) fingerprint: u64,
    pub(super) store: Option<Arc<Mutex<nn::Variables>>>,
    /// How many of the store's trainable variables are routed; the store only grows, so a
    /// different count is the cheap sign of variables added after the build.
    pub(super) known_trainable: usize,
    pub(super) non_finite: NonFinitePolicy,
    pub(super) skipped_steps: u64,
    /// Whether some 1-bit variable has not yet been checked for values other than +-1.
    pub(super) binary_unchecked: bool,
    pub(super) binary_checked: HashSet<String>,
    pub(super) binarised: Vec<String>,
    /// One per rule, kept between steps so that reading every variable's metadata allocates
    /// nothing; a rule's read serves its optimizer's fused pass too (`step.rs`).
    pub(super) readers: Vec<MetaReader>,
    /// Kept between steps for the NaN scan, likewise.
    pub(super) scan: ScanScratch,
    /// The last step's per-rule gradient lists, emptied, whose buffers the next step reuses: on
    /// 2000 variables they were kilobyte allocations each step, and glibc consolidates its
    /// small free chunks (the 2000 gradient handles just freed) on every such allocation.
    pub(super) spare: Vec<Grads>,
    /// The variables this router trains, claimed so that no other router trains them too.
    pub(super) ownership: Ownership,
    /// The constraints set per variable and per rule.
    pub(super) constraints: Constraints,
    /// Values the last step read back to the host (`Router::host_reads`).
    pub(super) host_reads: u64,
}

impl RouterCore {
    /// A router's shared part as built: no step taken, the default [`NonFinitePolicy`].
    pub(super) fn new(
        table: RoutingTable,
        fingerprint: u64,
        store: Option<Arc<Mutex<nn::Variables>>>,
        known_trainable: usize,
    ) -> Self {
        RouterCore {
            fingerprint,
            table,
            store,
            known_trainable,
            non_finite: NonFinitePolicy::default(),
            skipped_steps: 0,
            binary_unchecked: true,
            binary_checked: HashSet::new(),
            binarised: Vec::new(),
            readers: Vec::new(),
            scan: Default::default(),
            spare: Vec::new(),
            ownership: Ownership::default(),
            constraints: Constraints::default(),
            host_reads: 0,
        }
    }

    /// The routing table.
    pub fn routing_table(&self) -> &RoutingTable {
        &self.table
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[RuleInfo] {
        self.table.rules()
    }

    /// See [`Router::fingerprint`].
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The variables of the `VarStore` the router was built from; `None` when it was built from
    /// a list.
    pub fn variable_store(&self) -> Option<&Arc<Mutex<nn::Variables>>> {
        self.store.as_ref()
    }
}

/// Visits each rule's optimizer mutably, statically dispatched (one monomorphised call per
/// field of the generated struct). How the runtime walks a router's optimizers; not public API.
#[doc(hidden)]
pub trait OptimizerVisitor {
    /// Called once per rule, in rule order.
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()>;
}

/// Visits each rule's optimizer immutably, statically dispatched; not public API.
#[doc(hidden)]
pub trait OptimizerInspector {
    /// Called once per rule, in rule order.
    fn inspect<O: Optimizer>(&mut self, rule: usize, optimizer: &O) -> Result<()>;
}

/// What `case_optimizer!` implements for the struct it generates. Not meant to be implemented by
/// hand; use the [`Router`] trait (implemented for every `RouterParts`) to work with routers.
#[doc(hidden)]
pub trait RouterParts: Sized + Send {
    /// The rules' optimizer configurations, in rule order (a tuple).
    type Configs;
    /// The rules as written, with their predicates.
    fn rule_specs() -> Vec<RuleSpec>;
    /// Rule pairs proven disjoint at compile time.
    fn proven_disjoint() -> &'static [(usize, usize)];
    /// Builds every rule's optimizer from its configuration and routed variables.
    fn assemble(configs: Self::Configs, assembly: Assembly) -> Result<Self>;
    /// The shared part.
    fn core(&self) -> &RouterCore;
    /// The shared part, mutably.
    fn core_mut(&mut self) -> &mut RouterCore;
    /// Hands each rule's optimizer, mutably and in rule order, to `visitor`'s
    /// [`visit`](OptimizerVisitor::visit); stops at the first error.
    fn for_each_optimizer_mut<V: OptimizerVisitor>(&mut self, visitor: &mut V) -> Result<()>;
    /// Hands each rule's optimizer, in rule order, to `inspector`'s
    /// [`inspect`](OptimizerInspector::inspect); stops at the first error.
    fn for_each_optimizer<I: OptimizerInspector>(&self, inspector: &mut I) -> Result<()>;
    /// Rule `rule`'s optimizer as a trait object.
    fn dyn_optimizer(&self, rule: usize) -> Option<&dyn Optimizer>;
    /// Rule `rule`'s optimizer as a mutable trait object.
    fn dyn_optimizer_mut(&mut self, rule: usize) -> Option<&mut dyn Optimizer>;
}

/// The routed variables and the router core while a generated router is being assembled.
#[doc(hidden)]
pub struct Assembly {
    groups: Vec<Vec<Param>>,
    core: RouterCore,
}

impl Assembly {
    /// Each rule's routed variables (by position) and the core.
    pub(super) fn new(groups: Vec<Vec<Param>>, core: RouterCore) -> Self {
        Assembly { groups, core }
    }

    /// Builds rule `rule`'s optimizer from `config` and hands it the variables the rule claimed.
    pub fn optimizer<O: FromConfig>(&mut self, rule: usize, config: O::Config) -> Result<O> {
        self.optimizer_with(rule, config, false)
    }

    /// [`optimizer`](Self::optimizer), with `master_weights: true` when `master_weights` (see
    /// [`Optimizer::set_master_weights`]); every variable's dtype is checked
    /// ([`Optimizer::check_dtype`]) before it is added.
    pub fn optimizer_with<O: FromConfig>(
        &mut self,
        rule: usize,
        config: O::Config,
        master_weights: bool,
    ) -> Result<O> {
        let info = self.core.rules().get(rule).copied();
        let in_rule = |e: Error| match info {
            Some(info) => Error::Rule { rule: info.to_string(), source: Box::new(e) },
            None => e,
        };
        let mut optimizer = O::from_config(config).map_err(in_rule)?;
        if master_weights && !optimizer.set_master_weights(true).map_err(in_rule)? {
            return Err(in_rule(Error::InvalidConfig {
                optimizer: optimizer.name(),
                reason: "this optimizer keeps no f32 state for half-precision variables \
                         (`master_weights`)"
                    .into(),
            }));
        }
        let params = self.groups.get_mut(rule).map(std::mem::take).unwrap_or_default();
        for p in params {
            optimizer.check_dtype(&p).map_err(in_rule)?;
            optimizer.add_param(p).map_err(in_rule)?;
        }
        Ok(optimizer)
    }

    /// The core, once every optimizer is built.
    pub fn finish(self) -> RouterCore {
        self.core
    }
}
