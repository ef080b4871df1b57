//! What the code `case_optimizer!` generates names, through `::caseopt::__private::...`.
//!
//! Not part of the public API: anything here may change without notice. Generated code names
//! only this module, `::core` and `::std`, so it works whatever the user has in scope.

pub use crate::error::{Error, Result};
pub use crate::optim::{
    Adagrad, Adam, AdamW, Bop, Bop2ndOrder, FromConfig, NAdam, Optimizer, RAdam, RmsProp, Sgd,
};
pub use crate::predicate::{Glob, Predicate};
pub use crate::router::{
    debug_router, Assembly, OptimizerInspector, OptimizerVisitor, Router, RouterBuilder,
    RouterCore, RouterParts, RoutingTable, RuleInfo, RuleSpec,
};
pub use crate::schedule::Schedule;
pub use crate::var::{Param, VarInfo};
pub use tch::{nn::VarStore, Kind, Tensor};

/// A user predicate `where(f)`: `f` is coerced to a function pointer here, so a wrong signature
/// is reported at the user's `f`.
pub fn user_predicate(text: &'static str, f: fn(&VarInfo) -> bool) -> Predicate {
    Predicate::User { text, f }
}

/// `name("glob")`.
pub fn name_predicate(pattern: &str) -> Predicate {
    Predicate::Name(Glob::new(pattern))
}

/// `!p`.
pub fn not_predicate(p: Predicate) -> Predicate {
    Predicate::Not(::std::boxed::Box::new(p))
}

/// Builds rule `rule`'s optimizer from the config in `slot`, taking it out. A generated router's
/// `assemble` keeps its configs in one tuple of slots (and what it built in another), so each
/// of its early returns drops two values and its code grows linearly with the rules.
pub fn build_rule<O: FromConfig>(
    assembly: &mut Assembly,
    rule: usize,
    slot: &mut Option<O::Config>,
) -> Result<O> {
    match slot.take() {
        Some(config) => assembly.optimizer::<O>(rule, config),
        None => Err(rule_not_built()),
    }
}

/// The error for a rule whose config was already used: a generated router is assembled once
/// from fresh configs, so this never happens, but it is an error rather than a panic.
pub fn rule_not_built() -> Error {
    Error::InvalidConfig {
        optimizer: "router",
        reason: "a rule's configuration was used twice while assembling the router".to_string(),
    }
}
