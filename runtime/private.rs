//! What the code `case_optimizer!` generates names, through `::caseopt::__private::...`.
//!
//! Not part of the public API: anything here may change without notice. Generated code names
//! only this module, `::core` and `::std`, so it works whatever the user has in scope.

pub use crate::error::{Error, Result};
pub use crate::optim::builtin_items::*;
pub use crate::optim::{FromConfig, Optimizer};
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

/// [`build_rule`] for a rule with `master_weights: true`.
pub fn build_rule_master<O: FromConfig>(
    assembly: &mut Assembly,
    rule: usize,
    slot: &mut Option<O::Config>,
) -> Result<O> {
    match slot.take() {
        Some(config) => assembly.optimizer_with::<O>(rule, config, true),
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

/// The instruction sets the fused CPU kernels can run with on this processor (`"baseline"`,
/// `"avx2"`, `"avx512"`), narrowest first: for the tests that compare each with the baseline
/// and the benchmark that times each.
///
/// ```
/// assert_eq!(caseopt::__private::kernel_isas()[0], "baseline");
/// ```
pub fn kernel_isas() -> ::std::vec::Vec<&'static str> {
    crate::kernels::isa_names()
}

/// The instruction set the fused kernels run with in the steps this thread takes: the widest
/// the processor has, capped by the `CASEOPT_ISA` environment variable (read once) and by
/// [`set_kernel_isa`]. An error when `CASEOPT_ISA` names no instruction set (the kernels then
/// ignore it).
///
/// ```
/// let isa = caseopt::__private::kernel_isa()?;
/// assert!(caseopt::__private::kernel_isas().contains(&isa));
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn kernel_isa() -> Result<&'static str> {
    crate::kernels::current_isa().map_err(isa_error)
}

/// Caps the instruction set of the fused kernels in the steps this thread takes at `name`
/// (`"avx512"`, `"avx2"` or `"baseline"`; `None` removes this thread's cap), capped in turn at
/// what the processor has; returns the set they now run with. Every set computes the same bits.
///
/// ```
/// use caseopt::__private::set_kernel_isa;
///
/// assert_eq!(set_kernel_isa(Some("baseline"))?, "baseline");
/// assert!(set_kernel_isa(Some("sse9")).is_err()); // refused, the cap unchanged
/// assert_eq!(caseopt::__private::kernel_isa()?, "baseline");
/// set_kernel_isa(None)?;
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn set_kernel_isa(name: Option<&str>) -> Result<&'static str> {
    crate::kernels::cap_isa(name).map_err(isa_error)
}

fn isa_error(reason: ::std::string::String) -> Error {
    Error::InvalidConfig { optimizer: "fused kernels", reason }
}

/// The CPU kernels ATen dispatches to, as `torch.backends.cpu.get_cpu_capability()` names them
/// (`"default"`, `"avx2"`, `"avx512"`, or `"other"`), asked of ATen once per process.
///
/// ```
/// let aten = caseopt::__private::aten_cpu_capability();
/// assert!(["default", "avx2", "avx512", "other"].contains(&aten));
/// ```
pub fn aten_cpu_capability() -> &'static str {
    use crate::kernels::aten::CpuCapability;
    match CpuCapability::get() {
        CpuCapability::Default => "default",
        CpuCapability::Avx2 => "avx2",
        CpuCapability::Avx512 => "avx512",
        CpuCapability::Other => "other",
    }
}
