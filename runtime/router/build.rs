//! Building routers: routing the variables through the rules once ([`RouterBuilder`]), and
//! routing the variables added to the `VarStore` afterwards, before each step.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::nn;

use super::parts::{Assembly, OptimizerInspector, OptimizerVisitor, RouterCore, RouterParts};
use super::rules::{fingerprint, RuleInfo};
use super::table::{Route, RoutingTable};
use crate::error::Result;
use crate::optim::Optimizer;
use crate::var::{
    bits_from_group, same_tensor, trainable_vars, Param, VarInfo, FULL_PRECISION_BITS,
};

/// The value `case_optimizer! { ... }` evaluates to (and `Name::new()` returns for the item
/// form): the rules' configurations, waiting for the variables to route.
///
/// ```no_run
/// use caseopt::case_optimizer;
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let opt = case_optimizer! { _ => Adam<lr: 1e-3> }.build(&vs)?;
/// # Ok::<(), caseopt::Error>(())
/// ```
pub struct RouterBuilder<R: RouterParts> {
    configs: R::Configs,
}

impl<R: RouterParts> RouterBuilder<R> {
    /// Wraps the configurations (called by generated code).
    #[doc(hidden)]
    pub fn new(configs: R::Configs) -> Self {
        RouterBuilder { configs }
    }

    /// Routes every trainable variable of `vs` (named by its path) and builds the optimizers.
    ///
    /// The router keeps a handle on the store's variables. Errors name the variable and the
    /// rules as written: a variable claimed by two rules, a non-default rule that claims
    /// nothing, a configuration the optimizer rejects. Variables claimed by no rule when there
    /// is no default are left untrained, with a warning printed once to stderr and recorded in
    /// the routing table.
    pub fn build(self, vs: &nn::VarStore) -> Result<R> {
        self.build_inner(trainable_vars(vs), Some(vs.variables_.clone()))
    }

    /// Routes an explicit list of variables (names must be unique) and builds the optimizers.
    pub fn build_from(self, vars: Vec<Param>) -> Result<R> {
        self.build_inner(vars, None)
    }

    fn build_inner(self, vars: Vec<Param>, store: Option<Arc<Mutex<nn::Variables>>>) -> Result<R> {
        let specs = R::rule_specs();
        let infos: Vec<VarInfo> = vars.iter().map(|p| p.info.clone()).collect();
        let table = RoutingTable::new(&specs, R::proven_disjoint(), &infos)?;
        let mut groups: Vec<Vec<Param>> = (0..specs.len()).map(|_| Vec::new()).collect();
        for (param, route) in vars.into_iter().zip(table.routes()) {
            if let Some(group) = route.rule.and_then(|i| groups.get_mut(i)) {
                group.push(param);
            }
        }
        for w in table.warnings() {
            eprintln!("caseopt: warning: {w}");
        }
        let rules: Vec<RuleInfo> = specs.iter().map(|s| s.info).collect();
        let known_trainable = match &store {
            Some(store) => lock(store).trainable_variables.len(),
            None => 0,
        };
        let mut core = RouterCore::new(table, fingerprint(&rules), store, known_trainable);
        // Before any optimizer is built: a variable another router trains is refused here.
        core.ownership.claim(groups.iter().flatten())?;
        R::assemble(self.configs, Assembly::new(groups, core))
    }
}

impl<R: RouterParts> fmt::Debug for RouterBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = R::rule_specs().iter().map(|s| s.info.to_string()).collect();
        f.debug_struct("RouterBuilder").field("rules", &rules).finish_non_exhaustive()
    }
}

/// The store's variables, even if a thread panicked while holding the lock (the data is a
/// list of tensor handles, still consistent).
fn lock(store: &Mutex<nn::Variables>) -> MutexGuard<'_, nn::Variables> {
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The trainable variables added to the router's `VarStore` since it last routed, and the
/// routing table with them routed by the same rules and checks (the new rows at its end); `None`
/// when nothing was added. Changes nothing.
fn pending<R: RouterParts>(router: &R) -> Result<Option<(Vec<Param>, RoutingTable)>> {
    let core = router.core();
    let Some(store) = core.store.as_ref() else {
        return Ok(None);
    };
    let new: Vec<Param> = {
        let vars = lock(store);
        let Some(added) = vars.trainable_variables.get(core.known_trainable..) else {
            return Ok(None);
        };
        if added.is_empty() {
            return Ok(None);
        }
        added
            .iter()
            .map(|var| {
                let name = vars
                    .named_variables
                    .iter()
                    .find(|(_, t)| same_tensor(t, &var.tensor))
                    .map(|(n, _)| n.clone())
                    .unwrap_or_else(|| format!("<unnamed #{}>", core.table.routes().len()));
                let bits = bits_from_group(var.group).unwrap_or(FULL_PRECISION_BITS);
                Param::new(
                    VarInfo::of(name, &var.tensor).with_bits(bits),
                    var.tensor.shallow_clone(),
                )
            })
            .collect()
    };
    let infos: Vec<VarInfo> = new.iter().map(|p| p.info.clone()).collect();
    let mut table = core.table.clone();
    table.extend(&R::rule_specs(), &infos)?;
    Ok(Some((new, table)))
}

/// The routes the next [`route_new_variables`] will add (see
/// [`Router::unrouted_variables`](super::Router::unrouted_variables)).
pub(super) fn unrouted_variables<R: RouterParts>(router: &R) -> Result<Vec<Route>> {
    let known = router.core().table.routes().len();
    Ok(pending(router)?.map(|(_, table)| table.routes()[known..].to_vec()).unwrap_or_default())
}

/// Routes the trainable variables added to the router's `VarStore` since the last call: same
/// rules, same checks, added to the right optimizers, recorded in the routing table. Costs one
/// lock and a length comparison when nothing was added. On error nothing changes.
pub(super) fn route_new_variables<R: RouterParts>(router: &mut R) -> Result<()> {
    let Some((new, table)) = pending(router)? else {
        return Ok(());
    };
    let core = router.core();
    let known = core.table.routes().len();
    let mut groups: Vec<Vec<Param>> = (0..table.rules().len()).map(|_| Vec::new()).collect();
    for (param, route) in new.into_iter().zip(&table.routes()[known..]) {
        if let Some(group) = route.rule.and_then(|i| groups.get_mut(i)) {
            group.push(param);
        }
    }
    let count = core.known_trainable + (table.routes().len() - known);
    router.core_mut().ownership.claim(groups.iter().flatten())?;
    let core = router.core();
    for w in table.warnings().iter().skip(core.table.warnings().len()) {
        eprintln!("caseopt: warning: {w}");
    }
    // Every new variable's dtype first, so that a refusal adds none of them.
    router.for_each_optimizer(&mut CheckDtypes(&groups))?;
    router.for_each_optimizer_mut(&mut AddParams(groups))?;
    let core = router.core_mut();
    core.table = table;
    core.known_trainable = count;
    core.binary_unchecked = true;
    super::constraints::after_routing(router)
}

/// Checks that each rule's optimizer can train its new variables' dtypes.
struct CheckDtypes<'a>(&'a [Vec<Param>]);

impl OptimizerInspector for CheckDtypes<'_> {
    fn inspect<O: Optimizer>(&mut self, rule: usize, optimizer: &O) -> Result<()> {
        for p in self.0.get(rule).into_iter().flatten() {
            optimizer.check_dtype(p)?;
        }
        Ok(())
    }
}

/// Hands each rule's new variables to its optimizer.
struct AddParams(Vec<Vec<Param>>);

impl OptimizerVisitor for AddParams {
    fn visit<O: Optimizer>(&mut self, rule: usize, optimizer: &mut O) -> Result<()> {
        for p in self.0.get_mut(rule).map(std::mem::take).unwrap_or_default() {
            optimizer.add_param(p)?;
        }
        Ok(())
    }
}
