//! Run-time support for the routers `case_optimizer!` generates.
//!
//! The macro emits one struct per invocation with one concrete field per rule's optimizer and
//! implements the hidden [`RouterParts`] for it: the rules as data, how to build each optimizer,
//! and a generic visitor over the fields. Everything else lives here, once: routing variables
//! with larq's `CaseOptimizer` semantics, the routing table, the step path (statically
//! dispatched through the visitor, no allocation of its own), gradient clipping and the
//! object-safe [`Router`] view that checkpoints and generic code use.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::kernels::finite::ScanScratch;
use crate::kernels::metadata::{Grads, MetaReader};
use crate::optim::{FromConfig, Optimizer};
use crate::predicate::{dtype_name, Predicate};
use crate::var::{
    bits_from_group, same_tensor, trainable_vars, Param, VarInfo, FULL_PRECISION_BITS,
};

/// One rule of a router, as the user wrote it.
///
/// ```
/// let rule = caseopt::RuleInfo {
///     index: 0,
///     predicate: "binary",
///     optimizer: "Bop",
///     default: false,
///     name: Some("bop"),
/// };
/// assert_eq!(rule.to_string(), "binary => Bop");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleInfo {
    /// Position among the rules, from 0; also the suffix of the `ruleN()` accessors.
    pub index: usize,
    /// The predicate as written (normalised spacing), `"_"` for the default rule.
    pub predicate: &'static str,
    /// The optimizer's type as written, without its hyperparameters (`"Bop"`, `"my::Lion"`).
    pub optimizer: &'static str,
    /// Whether this is the default rule `_`.
    pub default: bool,
    /// The name given with `... as name`, if any.
    pub name: Option<&'static str>,
}

/// `predicate => Optimizer`, the way errors and the routing table name a rule.
impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} => {}", self.predicate, self.optimizer)
    }
}

/// A rule's description together with its predicate, as the generated code hands it over.
///
/// ```
/// use caseopt::{Predicate, RuleInfo, RuleSpec};
/// let info = RuleInfo { index: 0, predicate: "ndim(1)", optimizer: "Adam", default: false, name: None };
/// let spec = RuleSpec { info, predicate: Predicate::Ndim(1) };
/// assert_eq!(spec.predicate.to_string(), spec.info.predicate);
/// ```
#[derive(Debug, Clone)]
pub struct RuleSpec {
    /// What the user wrote.
    pub info: RuleInfo,
    /// What it means; [`Predicate::Any`] for the default rule.
    pub predicate: Predicate,
}

/// Where one variable went.
///
/// ```
/// # use caseopt::{Predicate, RuleInfo, RuleSpec, VarInfo};
/// let rules = [RuleSpec {
///     info: RuleInfo { index: 0, predicate: "_", optimizer: "Adam", default: true, name: None },
///     predicate: Predicate::Any,
/// }];
/// let vars = [VarInfo::new("w", &[2], tch::Kind::Float, tch::Device::Cpu)];
/// let table = caseopt::RoutingTable::new(&rules, &[], &vars)?;
/// let route = &table.routes()[0];
/// assert_eq!((route.variable.as_str(), route.rule), ("w", Some(0)));
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The variable's full name.
    pub variable: String,
    /// Its shape when the router was built.
    pub shape: Vec<i64>,
    /// Its element type.
    pub kind: Kind,
    /// Its declared precision.
    pub bits: u8,
    /// The position (in the table's rules) of the rule that claimed it; `None` when it is left
    /// untrained. For a router's own table this is the rule's index.
    pub rule: Option<usize>,
}

/// Which rule, and so which optimizer, trains each variable; printable as an aligned table.
///
/// Built by a router's `build`; also constructible on its own to preview a routing
/// ([`RoutingTable::new`]). Variables no rule claims (possible only without a default rule)
/// are listed as untrained and named in [`warnings`](Self::warnings).
///
/// ```
/// use caseopt::{Glob, Predicate, RoutingTable, RuleInfo, RuleSpec, VarInfo};
/// use tch::{Device, Kind};
///
/// let rules = [RuleSpec {
///     info: RuleInfo { index: 0, predicate: "binary", optimizer: "Bop", default: false, name: None },
///     predicate: Predicate::Bits(1),
/// }];
/// let vars = [
///     VarInfo::new("fc.weight", &[4, 8], Kind::Float, Device::Cpu).with_bits(1),
///     VarInfo::new("fc.bias", &[4], Kind::Float, Device::Cpu),
/// ];
/// let table = RoutingTable::new(&rules, &[], &vars)?;
/// assert_eq!(table.untrained(), vec!["fc.bias"]);
/// assert_eq!(table.variables_of(0), vec!["fc.weight"]);
/// print!("{table}");
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RoutingTable {
    rules: Vec<RuleInfo>,
    routes: Vec<Route>,
    warnings: Vec<String>,
    proven_disjoint: Vec<(usize, usize)>,
}

impl RoutingTable {
    /// Routes `vars` through `rules` with larq's semantics, without building optimizers.
    ///
    /// `proven_disjoint` lists rule pairs known never to claim the same variable (the macro's
    /// compile-time proofs); such pairs are not checked against each other. Fails on a variable
    /// claimed by two rules, on a non-default rule that claims nothing and on a variable name
    /// given twice.
    pub fn new(
        rules: &[RuleSpec],
        proven_disjoint: &[(usize, usize)],
        vars: &[VarInfo],
    ) -> Result<Self> {
        let assignment = assign(rules, proven_disjoint, vars)?;
        let routes = vars
            .iter()
            .zip(&assignment)
            .map(|(v, rule)| Route {
                variable: v.name.clone(),
                shape: v.shape.clone(),
                kind: v.kind,
                bits: v.bits,
                rule: *rule,
            })
            .collect::<Vec<_>>();
        let mut warnings = Vec::new();
        let untrained: Vec<&str> =
            routes.iter().filter(|r| r.rule.is_none()).map(|r| r.variable.as_str()).collect();
        if !untrained.is_empty() {
            let names = untrained.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>();
            warnings.push(format!(
                "no default rule `_`: {} variable{} claimed by no rule {} left untrained: {}; \
                 add `_ => Optimizer<...>` as the last rule to train {}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                if names.len() == 1 { "is" } else { "are" },
                names.join(", "),
                if names.len() == 1 { "it" } else { "them" },
            ));
        }
        Ok(RoutingTable {
            rules: rules.iter().map(|r| r.info).collect(),
            routes,
            warnings,
            proven_disjoint: proven_disjoint.to_vec(),
        })
    }

    /// Routes variables added after the build with the same rules and checks (a name already
    /// routed, or a variable claimed by two rules, is an error naming it); `self` is unchanged
    /// on error. Returns each new variable's rule. A rule that claims none of them is fine: it
    /// claimed something when the router was built.
    pub(crate) fn extend(
        &mut self,
        rules: &[RuleSpec],
        vars: &[VarInfo],
    ) -> Result<Vec<Option<usize>>> {
        if let Some(v) = vars.iter().find(|v| self.route(&v.name).is_some()) {
            return Err(Error::DuplicateVariable { variable: v.name.clone() });
        }
        let (assignment, _) = claims(rules, &self.proven_disjoint, vars)?;
        let untrained: Vec<String> = vars
            .iter()
            .zip(&assignment)
            .filter(|(_, rule)| rule.is_none())
            .map(|(v, _)| format!("`{}`", v.name))
            .collect();
        if !untrained.is_empty() {
            self.warnings.push(format!(
                "no default rule `_`: variables added after the build and claimed by no rule are \
                 left untrained: {}",
                untrained.join(", ")
            ));
        }
        self.routes.extend(vars.iter().zip(&assignment).map(|(v, rule)| Route {
            variable: v.name.clone(),
            shape: v.shape.clone(),
            kind: v.kind,
            bits: v.bits,
            rule: *rule,
        }));
        Ok(assignment)
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    /// One route per variable, in the order the variables were given (sorted by name when built
    /// from a `VarStore`).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route of the variable named `variable`.
    pub fn route(&self, variable: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.variable == variable)
    }

    /// The rule that claimed `variable`; `None` when it is untrained or unknown.
    pub fn rule_of(&self, variable: &str) -> Option<&RuleInfo> {
        self.route(variable).and_then(|r| r.rule).and_then(|i| self.rules.get(i))
    }

    /// Names of the variables rule `rule` claimed, in routing order.
    pub fn variables_of(&self, rule: usize) -> Vec<&str> {
        self.routes.iter().filter(|r| r.rule == Some(rule)).map(|r| r.variable.as_str()).collect()
    }

    /// Names of the variables no rule claimed (left untrained).
    pub fn untrained(&self) -> Vec<&str> {
        self.routes.iter().filter(|r| r.rule.is_none()).map(|r| r.variable.as_str()).collect()
    }

    /// Warnings raised while routing (printed once to stderr by `build`).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Rule pairs proven disjoint at compile time, hence not checked against each other.
    pub fn proven_disjoint(&self) -> &[(usize, usize)] {
        &self.proven_disjoint
    }

    /// Rule pairs checked against each other when routing (every pair of non-default rules the
    /// compiler could not prove disjoint).
    pub fn checked_at_build(&self) -> Vec<(usize, usize)> {
        let n = self.rules.len();
        let mut out = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&self.rules[i], &self.rules[j]);
                if !a.default && !b.default && !is_disjoint(&self.proven_disjoint, i, j) {
                    out.push((i, j));
                }
            }
        }
        out
    }
}

/// An aligned table `variable | shape | dtype | bits | rule | optimizer`, untrained variables
/// marked as such, followed by the warnings.
impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = ["variable", "shape", "dtype", "bits", "rule", "optimizer"];
        let rows: Vec<[String; 6]> = self
            .routes
            .iter()
            .map(|r| {
                let (rule, optimizer) = match r.rule.and_then(|i| self.rules.get(i)) {
                    Some(info) => (format!("#{} {}", info.index, info.predicate), info.optimizer),
                    None => ("-".to_string(), "(untrained)"),
                };
                [
                    r.variable.clone(),
                    format!("{:?}", r.shape),
                    dtype_name(r.kind).to_string(),
                    r.bits.to_string(),
                    rule,
                    optimizer.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[&str]| -> fmt::Result {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}  "));
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(f, &header)?;
        for row in &rows {
            line(f, &row.each_ref().map(String::as_str))?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

fn is_disjoint(pairs: &[(usize, usize)], i: usize, j: usize) -> bool {
    pairs.iter().any(|&(a, b)| (a, b) == (i, j) || (a, b) == (j, i))
}

/// larq's `CaseOptimizer` routing: each variable goes to the one non-default rule that claims
/// it, else to the default rule, else nowhere. Errors name the variable and the rules.
fn assign(
    rules: &[RuleSpec],
    proven_disjoint: &[(usize, usize)],
    vars: &[VarInfo],
) -> Result<Vec<Option<usize>>> {
    let (out, claimed_any) = claims(rules, proven_disjoint, vars)?;
    // By position: `info.index` is what the user wrote and is not trusted as an index.
    let unclaimed =
        rules.iter().zip(&claimed_any).find(|(r, claimed)| !r.info.default && !**claimed);
    if let Some((rule, _)) = unclaimed {
        return Err(Error::UnclaimedRule { rule: rule.info.to_string() });
    }
    Ok(out)
}

/// Each variable's rule (see [`assign`]) and, per rule, whether it claimed anything; fails on a
/// name given twice and on a variable claimed by two rules.
#[allow(clippy::type_complexity)]
fn claims(
    rules: &[RuleSpec],
    proven_disjoint: &[(usize, usize)],
    vars: &[VarInfo],
) -> Result<(Vec<Option<usize>>, Vec<bool>)> {
    let mut seen = HashSet::with_capacity(vars.len());
    for v in vars {
        if !seen.insert(v.name.as_str()) {
            return Err(Error::DuplicateVariable { variable: v.name.clone() });
        }
    }
    let n = rules.len();
    let mut disjoint = vec![false; n * n];
    for &(a, b) in proven_disjoint {
        if a < n && b < n {
            disjoint[a * n + b] = true;
            disjoint[b * n + a] = true;
        }
    }
    let default = rules.iter().position(|r| r.info.default);
    let mut claimed_any = vec![false; n];
    let mut out = Vec::with_capacity(vars.len());
    let mut matched = Vec::with_capacity(n);
    for v in vars {
        matched.clear();
        for (i, rule) in rules.iter().enumerate() {
            if rule.info.default {
                continue;
            }
            // A rule proven disjoint from one that already matched cannot match: skip it, so
            // proven pairs cost nothing (not even a call to a user predicate).
            if matched.iter().any(|&m: &usize| disjoint[m * n + i]) {
                continue;
            }
            if rule.predicate.matches(v) {
                matched.push(i);
            }
        }
        if matched.len() > 1 {
            return Err(Error::OverlappingRules {
                variable: v.name.clone(),
                rules: matched.iter().map(|&i| rules[i].info.to_string()).collect(),
            });
        }
        let rule = matched.first().copied().or(default);
        if let Some(i) = rule {
            claimed_any[i] = true;
        }
        out.push(rule);
    }
    Ok((out, claimed_any))
}

/// What a router keeps besides its optimizers: the rules, the routing table, the fingerprint
/// and, when built from a `VarStore`, a handle on the store's variables (so that variables
/// added after the build can be detected). Reached through [`Router`].
#[doc(hidden)]
#[derive(Debug)]
pub struct RouterCore {
    table: RoutingTable,
    fingerprint: u64,
    store: Option<Arc<Mutex<nn::Variables>>>,
    /// How many of the store's trainable variables are routed; the store only grows, so a
    /// different count is the cheap sign of variables added after the build.
    known_trainable: usize,
    non_finite: NonFinitePolicy,
    skipped_steps: u64,
    /// Whether some 1-bit variable has not yet been checked for values other than +-1.
    binary_unchecked: bool,
    binary_checked: HashSet<String>,
    binarised: Vec<String>,
    /// Kept between steps so that reading every variable's metadata allocates nothing.
    reader: MetaReader,
    /// Kept between steps for the NaN scan, likewise.
    scan: ScanScratch,
    /// The last step's per-rule gradient lists, emptied, whose buffers the next step reuses: on
    /// 2000 variables they were kilobyte allocations each step, and glibc consolidates its
    /// small free chunks (the 2000 gradient handles just freed) on every such allocation.
    spare: Vec<Grads>,
}

impl RouterCore {
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

/// A stable identity of a router's rules: 64-bit FNV-1a over every rule's predicate text,
/// optimizer name and default flag, in order. Independent of hyperparameter values, the
/// process, and the platform, so a checkpoint can tell whether it was written by the same rules.
///
/// ```
/// # use caseopt::RuleInfo;
/// let a = RuleInfo { index: 0, predicate: "binary", optimizer: "Bop", default: false, name: None };
/// let b = RuleInfo { index: 1, predicate: "_", optimizer: "Adam", default: true, name: None };
/// assert_eq!(caseopt::fingerprint(&[a, b]), caseopt::fingerprint(&[a, b]));
/// assert_ne!(caseopt::fingerprint(&[a, b]), caseopt::fingerprint(&[b, a]));
/// ```
pub fn fingerprint(rules: &[RuleInfo]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for r in rules {
        eat(r.predicate.as_bytes());
        eat(&[0]);
        eat(r.optimizer.as_bytes());
        eat(&[0, u8::from(r.default), 0xff]);
    }
    h
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
    /// Visits the optimizers mutably, in rule order.
    fn visit_mut<V: OptimizerVisitor>(&mut self, visitor: &mut V) -> Result<()>;
    /// Visits the optimizers, in rule order.
    fn visit<V: OptimizerInspector>(&self, visitor: &mut V) -> Result<()>;
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
    /// Builds rule `rule`'s optimizer from `config` and hands it the variables the rule claimed.
    pub fn optimizer<O: FromConfig>(&mut self, rule: usize, config: O::Config) -> Result<O> {
        let info = self.core.rules().get(rule).copied();
        let in_rule = |e: Error| match info {
            Some(info) => Error::Rule { rule: info.to_string(), source: Box::new(e) },
            None => e,
        };
        let mut optimizer = O::from_config(config).map_err(in_rule)?;
        let params = self.groups.get_mut(rule).map(std::mem::take).unwrap_or_default();
        for p in params {
            optimizer.add_param(p).map_err(in_rule)?;
        }
        Ok(optimizer)
    }

    /// The core, once every optimizer is built.
    pub fn finish(self) -> RouterCore {
        self.core
    }
}

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
        let core = RouterCore {
            fingerprint: fingerprint(&rules),
            table,
            store,
            known_trainable,
            non_finite: NonFinitePolicy::default(),
            skipped_steps: 0,
            binary_unchecked: true,
            binary_checked: HashSet::new(),
            binarised: Vec::new(),
            reader: Default::default(),
            scan: Default::default(),
            spare: Vec::new(),
        };
        R::assemble(self.configs, Assembly { groups, core })
    }
}

impl<R: RouterParts> fmt::Debug for RouterBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = R::rule_specs().iter().map(|s| s.info.to_string()).collect();
        f.debug_struct("RouterBuilder").field("rules", &rules).finish_non_exhaustive()
    }
}

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
    ///   [`Error::VariableChanged`] naming it;
    /// - variables without a gradient, and frozen ones (`requires_grad` false, even with a stale
    ///   gradient), are skipped, as torch does;
    /// - gradients holding NaN or infinity, searched across all rules before any optimizer
    ///   moves, are handled by the [`NonFinitePolicy`] (by default an error naming the variable,
    ///   with every parameter, state and step counter untouched);
    /// - a 1-bit variable holding values other than +-1 is reported once (a warning on stderr
    ///   and [`binarised_variables`](Self::binarised_variables)); Bop binarises it, as larq does.
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
        let _ = self.visit(&mut counts);
        counts.0
    }

    fn step(&mut self) -> Result<()> {
        route_new_variables(self)?;
        let mut grads = CollectGrads {
            grads: Vec::with_capacity(self.rules().len()),
            reader: std::mem::take(&mut self.core_mut().reader),
            spare: std::mem::take(&mut self.core_mut().spare),
        };
        let collected = self.visit(&mut grads);
        let CollectGrads { mut grads, reader, .. } = grads;
        self.core_mut().reader = reader;
        let found = match (collected, self.core().non_finite) {
            (Err(e), _) => Err(e),
            (Ok(()), NonFinitePolicy::Proceed) => Ok(None),
            (Ok(()), _) => {
                // Optimizers that can compute the step while they check its gradients do so
                // first, keeping the result aside (not after new variables: their binary
                // values are checked, and possibly rewritten, only once the step is accepted).
                let mut stage = StageAll { grads: &mut grads, first: None };
                let staged =
                    if self.core().binary_unchecked { Ok(()) } else { self.visit_mut(&mut stage) };
                let staged_first = stage.first;
                let found = staged.and_then(|()| {
                    let mut scratch = std::mem::take(&mut self.core_mut().scan);
                    let found = first_non_finite(self, &grads, &mut scratch, staged_first);
                    self.core_mut().scan = scratch;
                    found
                });
                if !matches!(found, Ok(None)) {
                    let _ = self.visit_mut(&mut DropStaged);
                }
                found
            }
        };
        // `None` under `NonFinitePolicy::Proceed`, which does not look.
        if let Some(variable) = found? {
            if self.core().non_finite == NonFinitePolicy::SkipStep {
                self.core_mut().skipped_steps += 1;
                return Ok(());
            }
            return Err(Error::NonFiniteGradient { variable });
        }
        if self.core().binary_unchecked {
            check_binary_values(self)?;
        }
        let mut step = StepWith(grads);
        let stepped = self.visit_mut(&mut step);
        if stepped.is_err() {
            // Rules after the failing one keep no staged step for a later call to find.
            let _ = self.visit_mut(&mut DropStaged);
        }
        // The handles are dropped here; their lists' buffers serve the next step.
        let mut grads = step.0;
        grads.iter_mut().for_each(Grads::clear);
        self.core_mut().spare = grads;
        stepped
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
        let _ = self.visit_mut(&mut ZeroGrad);
    }

    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        // New variables first, so that their gradients are zeroed with the others.
        route_new_variables(self)?;
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        check_max_norm(max_norm)?;
        route_new_variables(self)?;
        let mut norms = SquaredNorms(Vec::with_capacity(self.rules().len()));
        self.visit(&mut norms)?;
        let total = norms.0.iter().sum::<f64>().sqrt();
        let factor = clip_factor(max_norm, total);
        if factor < 1.0 {
            self.visit_mut(&mut ScaleGrads { factor: |_| factor })?;
        }
        Ok(total)
    }

    fn clip_grad_norm_per_rule(&mut self, max_norm: f64) -> Result<Vec<f64>> {
        check_max_norm(max_norm)?;
        route_new_variables(self)?;
        let mut norms = SquaredNorms(Vec::with_capacity(self.rules().len()));
        self.visit(&mut norms)?;
        let norms: Vec<f64> = norms.0.iter().map(|s| s.sqrt()).collect();
        let factors: Vec<f64> = norms.iter().map(|&n| clip_factor(max_norm, n)).collect();
        if factors.iter().any(|&f| f < 1.0) {
            self.visit_mut(&mut ScaleGrads { factor: |rule| factors[rule] })?;
        }
        Ok(norms)
    }
}

/// What a router's [`step`](Router::step) does with a gradient that holds NaN or infinity.
///
/// The search covers every rule's gradients before any optimizer updates anything, and costs
/// one reduction per gradient (a sum, exact check only for a tensor whose sum is not finite)
/// and one synchronisation per step.
///
/// ```
/// use caseopt::{case_optimizer, Error, NonFinitePolicy, Router};
/// use tch::Tensor;
///
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let w = vs.root().zeros("w", &[2]);
/// let mut opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs)?;
/// opt.backward_step(&(&w * Tensor::from_slice(&[f32::NAN, 1.0])).sum(tch::Kind::Float))
///     .unwrap_err(); // Error::NonFiniteGradient { variable: "w" }, nothing changed
/// assert_eq!(opt.step_counts(), vec![0]);
///
/// opt.set_non_finite_policy(NonFinitePolicy::SkipStep);
/// opt.step()?;
/// assert_eq!((opt.step_counts(), opt.skipped_steps()), (vec![0], 1));
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// Refuse the whole step with [`Error::NonFiniteGradient`] naming the first such variable
    /// (in rule order); no parameter, state or step counter changes. The default: a NaN is
    /// almost always a bug or a diverging run, better stopped where it appears.
    #[default]
    Error,
    /// Skip the whole step as [`Error`](Self::Error) does, but return `Ok` and count it
    /// ([`Router::skipped_steps`]), as mixed-precision loss scaling does with overflowing
    /// steps.
    SkipStep,
    /// No check: the optimizers use the gradients as they are (torch.optim's behaviour), so
    /// the values spread into parameters and state.
    Proceed,
}

/// The store's variables, even if a thread panicked while holding the lock (the data is a
/// list of tensor handles, still consistent).
fn lock(store: &Mutex<nn::Variables>) -> MutexGuard<'_, nn::Variables> {
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Routes the trainable variables added to the router's `VarStore` since the last call: same
/// rules, same checks, added to the right optimizers, recorded in the routing table. Costs one
/// lock and a length comparison when nothing was added. On error nothing changes.
fn route_new_variables<R: RouterParts>(router: &mut R) -> Result<()> {
    let core = router.core();
    let Some(store) = core.store.as_ref() else {
        return Ok(());
    };
    let new: Vec<Param> = {
        let vars = lock(store);
        let Some(added) = vars.trainable_variables.get(core.known_trainable..) else {
            return Ok(());
        };
        if added.is_empty() {
            return Ok(());
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
    let assignment = table.extend(&R::rule_specs(), &infos)?;
    let mut groups: Vec<Vec<Param>> = (0..table.rules().len()).map(|_| Vec::new()).collect();
    for (param, rule) in new.into_iter().zip(assignment) {
        if let Some(group) = rule.and_then(|i| groups.get_mut(i)) {
            group.push(param);
        }
    }
    for w in table.warnings().iter().skip(core.table.warnings().len()) {
        eprintln!("caseopt: warning: {w}");
    }
    let count = core.known_trainable + infos.len();
    router.visit_mut(&mut AddParams(groups))?;
    let core = router.core_mut();
    core.table = table;
    core.known_trainable = count;
    core.binary_unchecked = true;
    Ok(())
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

/// Every rule's gradients, aligned with its optimizer's variables: `None` for a variable
/// without a gradient or a frozen one. Fails on a variable whose device, dtype or shape
/// changed since it was routed.
struct CollectGrads {
    grads: Vec<Grads>,
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
        self.grads.push(grads);
        Ok(())
    }
}

/// Asks each optimizer to stage its step ([`Optimizer::stage_step`]) with the collected
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
        if let Some(report) = optimizer.stage_step(&grads.handles)? {
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
        optimizer.drop_staged();
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

/// Gradients with at least this many elements are summed on their own; smaller ones are
/// concatenated and summed together, so that many small tensors cost a few ops rather than one
/// each.
const SUM_ALONE: i64 = 1 << 16;
/// Elements per concatenation of small gradients: bounds the temporary at 4 MiB of f32.
const SMALL_BATCH: i64 = 1 << 20;

/// Where a partial sum came from: (rule, variable index) of each gradient in it.
type Origin = Vec<(usize, usize)>;

/// Partial sums of the gradients of one device and accumulation dtype.
struct SumGroup {
    device: Device,
    kind: Kind,
    sums: Vec<Tensor>,
    origins: Vec<Origin>,
    small: Vec<Tensor>,
    small_origin: Origin,
    small_numel: i64,
}

impl SumGroup {
    fn flush_small(&mut self) -> Result<()> {
        if self.small.is_empty() {
            return Ok(());
        }
        let joined = Tensor::f_cat(&self.small, 0)?;
        self.sums.push(joined.f_sum(self.kind)?);
        self.origins.push(std::mem::take(&mut self.small_origin));
        self.small.clear();
        self.small_numel = 0;
        Ok(())
    }
}

/// The first variable, in rule order, whose gradient holds NaN or infinity.
///
/// Sums, not element-wise tests: a sum reads its input once and allocates nothing the size of
/// the tensor (accumulated in f32, f64 for f64 gradients). Large gradients are summed one by
/// one, small ones in concatenated batches; the partial sums are stacked and read back with one
/// synchronisation per device. NaN and infinities always make a sum non-finite; a finite
/// gradient's sum can only overflow to infinity, so the gradients behind a non-finite sum are
/// checked element by element before one is reported (only then are temporaries made).
///
/// Contiguous f32/f64 CPU gradients are read in one multi-threaded pass by the kernels module
/// (four bytes per f32 element, no dispatch per tensor); the others (CUDA, half precision,
/// strided) go through the libtorch search below, and the earlier of the two finds, in rule
/// order, is reported.
///
/// `staged` is the earliest find of the optimizers' staged steps, whose gradients the scan
/// skips.
fn first_non_finite<R: RouterParts>(
    router: &R,
    grads: &[Grads],
    scratch: &mut ScanScratch,
    staged: Option<(usize, usize)>,
) -> Result<Option<String>> {
    // The scan's positions count the gradients present, in rule order: (rule, variable) of the
    // k-th, looked up only for what the scan reports.
    let nth_present = |k: usize| {
        grads.iter().enumerate().flat_map(|(r, gs)| gs.present().map(move |(i, _)| (r, i))).nth(k)
    };
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    let scan = crate::kernels::finite::scan_grads(grads, threads, scratch);
    let scanned_first = scan.first_non_finite.and_then(nth_present);
    let torch_first = if scan.unscanned.is_empty() {
        None
    } else {
        let mut rest: Vec<Vec<Option<Tensor>>> =
            grads.iter().map(|gs| gs.handles.iter().map(|_| None).collect()).collect();
        let present: Vec<(usize, usize)> = grads
            .iter()
            .enumerate()
            .flat_map(|(r, gs)| gs.present().map(move |(i, _)| (r, i)))
            .collect();
        for &k in &scan.unscanned {
            if let Some(&(r, i)) = present.get(k) {
                rest[r][i] = grads[r].handles[i].as_ref().map(Tensor::shallow_clone);
            }
        }
        first_non_finite_with_libtorch(&rest)?
    };
    let first = [scanned_first, torch_first, staged].into_iter().flatten().min();
    Ok(first.map(|(rule, index)| {
        router
            .dyn_optimizer(rule)
            .and_then(|o| o.params().get(index))
            .map(|p| p.info.name.clone())
            .unwrap_or_else(|| format!("<rule {rule} variable {index}>"))
    }))
}

/// [`first_non_finite`]'s search with libtorch ops, as (rule, variable) positions.
fn first_non_finite_with_libtorch(grads: &[Vec<Option<Tensor>>]) -> Result<Option<(usize, usize)>> {
    let mut groups: Vec<SumGroup> = Vec::new();
    for (rule, rule_grads) in grads.iter().enumerate() {
        for (index, g) in rule_grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let numel = g.numel() as i64;
            if numel == 0 {
                continue;
            }
            let (device, kind) =
                (g.device(), if g.kind() == Kind::Double { Kind::Double } else { Kind::Float });
            let group = match groups.iter().position(|s| s.device == device && s.kind == kind) {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(SumGroup {
                        device,
                        kind,
                        sums: Vec::new(),
                        origins: Vec::new(),
                        small: Vec::new(),
                        small_origin: Vec::new(),
                        small_numel: 0,
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            if numel >= SUM_ALONE {
                group.sums.push(g.f_sum(kind)?);
                group.origins.push(vec![(rule, index)]);
            } else {
                // One dimension and the group's dtype (half precision widened, small tensors
                // only), skipping the ops, each a dispatch, where there is nothing to do.
                let mut flat = if g.dim() == 1 { g.shallow_clone() } else { g.f_reshape([-1])? };
                if flat.kind() != kind {
                    flat = flat.f_to_kind(kind)?;
                }
                group.small.push(flat);
                group.small_origin.push((rule, index));
                group.small_numel += numel;
                if group.small_numel >= SMALL_BATCH {
                    group.flush_small()?;
                }
            }
        }
    }
    let mut suspects: Vec<(usize, usize)> = Vec::new();
    for group in &mut groups {
        group.flush_small()?;
        let stacked = Tensor::f_stack(&group.sums, 0)?.f_to_kind(Kind::Double)?;
        let values = Vec::<f64>::try_from(&stacked)?;
        for (value, origin) in values.iter().zip(&group.origins) {
            if !value.is_finite() {
                suspects.extend(origin);
            }
        }
    }
    suspects.sort_unstable();
    for (rule, index) in suspects {
        let Some(g) = &grads[rule][index] else { continue };
        if g.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Ok(Some((rule, index)));
        }
    }
    Ok(None)
}

/// Reports, once each, the 1-bit variables holding values other than -1 and +1 (larq's Bop
/// binarises them at their first update; other optimizers train them as they are).
fn check_binary_values<R: RouterParts>(router: &mut R) -> Result<()> {
    let mut found = Vec::new();
    let mut checked = Vec::new();
    for rule in 0..router.rules().len() {
        let Some(optimizer) = router.dyn_optimizer(rule) else { continue };
        for p in optimizer.params() {
            if !p.info.is_binary() || router.core().binary_checked.contains(&p.info.name) {
                continue;
            }
            checked.push(p.info.name.clone());
            let other = p.tensor.f_abs()?.f_ne(1.0)?.f_any()?.f_int64_value(&[])? != 0;
            if other {
                let what = match optimizer.name() {
                    "Bop" | "Bop2ndOrder" => {
                        format!("{} binarises it at this step, as larq does", optimizer.name())
                    }
                    name => format!("{name} trains it as it is"),
                };
                eprintln!(
                    "caseopt: warning: `{}` is declared 1-bit but holds values other than -1 and +1; {what}",
                    p.info.name
                );
                found.push(p.info.name.clone());
            }
        }
    }
    let core = router.core_mut();
    core.binary_checked.extend(checked);
    core.binarised.extend(found);
    core.binary_unchecked = false;
    Ok(())
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

/// `Debug` for generated routers: the rules and each optimizer's step count.
#[doc(hidden)]
pub fn debug_router<R: RouterParts>(router: &R, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    f.debug_struct("CaseOptimizer")
        .field("rules", &rules)
        .field("step_counts", &router.step_counts())
        .finish_non_exhaustive()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predicate::Glob;
    use tch::Device;

    fn rule(index: usize, text: &'static str, predicate: Predicate) -> RuleSpec {
        let default = matches!(predicate, Predicate::Any);
        RuleSpec {
            info: RuleInfo { index, predicate: text, optimizer: "Opt", default, name: None },
            predicate,
        }
    }

    fn var(name: &str, bits: u8, ndim: usize) -> VarInfo {
        VarInfo::new(name, &vec![2; ndim], Kind::Float, Device::Cpu).with_bits(bits)
    }

    #[test]
    fn overlapping_rules_name_the_variable_and_both_rules() {
        let rules = [rule(0, "binary", Predicate::Bits(1)), rule(1, "ndim(2)", Predicate::Ndim(2))];
        let err = RoutingTable::new(&rules, &[], &[var("a", 32, 2), var("b", 1, 2)]).unwrap_err();
        match err {
            Error::OverlappingRules { variable, rules } => {
                assert_eq!(variable, "b");
                assert_eq!(rules, vec!["binary => Opt", "ndim(2) => Opt"]);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn proven_disjoint_pairs_are_not_evaluated() {
        // A predicate that would claim everything: if the proof is honoured it is never asked
        // about a variable the first rule already claimed.
        fn everything(_: &VarInfo) -> bool {
            true
        }
        let rules = [
            rule(0, "binary", Predicate::Bits(1)),
            rule(1, "where(everything)", Predicate::User { text: "everything", f: everything }),
        ];
        let vars = [var("a", 1, 2), var("b", 32, 1)];
        assert!(RoutingTable::new(&rules, &[], &vars).is_err());
        let table = RoutingTable::new(&rules, &[(0, 1)], &vars).unwrap();
        assert_eq!(table.variables_of(0), vec!["a"]);
        assert_eq!(table.variables_of(1), vec!["b"]);
        assert!(table.checked_at_build().is_empty());
    }

    #[test]
    fn unclaimed_rule_and_duplicates_are_errors() {
        let rules = [rule(0, "bits(4)", Predicate::Bits(4)), rule(1, "_", Predicate::Any)];
        let err = RoutingTable::new(&rules, &[], &[var("a", 32, 1)]).unwrap_err();
        assert!(matches!(err, Error::UnclaimedRule { ref rule } if rule == "bits(4) => Opt"));
        let err = RoutingTable::new(&rules[1..], &[], &[var("a", 32, 1), var("a", 1, 1)]);
        assert!(matches!(err, Err(Error::DuplicateVariable { ref variable }) if variable == "a"));
    }

    #[test]
    fn rule_indices_as_written_are_not_trusted_as_positions() {
        let rules = [rule(7, "binary", Predicate::Bits(1))];
        let table = RoutingTable::new(&rules, &[(5, 9)], &[var("a", 1, 1)]).unwrap();
        assert_eq!(table.routes()[0].rule, Some(0));
        assert_eq!(table.rule_of("a").map(|r| r.index), Some(7));
        let err = RoutingTable::new(&rules, &[], &[var("b", 32, 1)]).unwrap_err();
        assert!(matches!(err, Error::UnclaimedRule { .. }), "{err}");
    }

    #[test]
    fn untrained_variables_are_recorded_and_the_table_aligns() {
        let rules = [rule(0, r#"name("*.w")"#, Predicate::Name(Glob::new("*.w")))];
        let table =
            RoutingTable::new(&rules, &[], &[var("layer.w", 1, 2), var("b", 32, 1)]).unwrap();
        assert_eq!(table.untrained(), vec!["b"]);
        assert_eq!(table.warnings().len(), 1);
        assert!(table.warnings()[0].contains("`b`"), "{}", table.warnings()[0]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "variable  shape   dtype  bits  rule            optimizer");
        assert_eq!(lines[1], r#"layer.w   [2, 2]  f32    1     #0 name("*.w")  Opt"#);
        assert_eq!(lines[2], "b         [2]     f32    32    -               (untrained)");
        assert!(lines[3].starts_with("warning: no default rule `_`: 1 variable"));
    }

    #[test]
    fn fingerprint_is_fnv1a_and_ignores_names() {
        // FNV-1a of the empty input is the offset basis.
        assert_eq!(fingerprint(&[]), 0xcbf2_9ce4_8422_2325);
        let a = RuleInfo { index: 0, predicate: "_", optimizer: "Adam", default: true, name: None };
        let named = RuleInfo { name: Some("adam"), ..a };
        assert_eq!(fingerprint(&[a]), fingerprint(&[named]));
        let other = RuleInfo { optimizer: "AdamW", ..a };
        assert_ne!(fingerprint(&[a]), fingerprint(&[other]));
        // Pinned (computed independently with a few lines of Python) so that a change to the
        // hash, which would orphan checkpoints, is deliberate.
        assert_eq!(fingerprint(&[a]), 0x5372_9c4a_3e09_509f);
    }
}
