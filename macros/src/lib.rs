//! Implementation detail of `caseopt`: the `case_optimizer!` procedural macro.
//! Depend on `caseopt`, which re-exports it.
//!
//! The rule language (parser and checks) lives in `caseopt-rules`; this crate is the entry
//! point, the code generation and what to emit on errors.

#![warn(missing_docs)]

mod expand;
mod fallback;
#[cfg(test)]
mod proptests;

/// Compiles routing rules into a statically dispatched router: larq's `CaseOptimizer`, with
/// the exclusivity of the rules proven at compile time where it can be.
///
/// ```
/// use caseopt::{case_optimizer, PathExt};
/// use caseopt::tch::{nn, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let kernel = (vs.root() / "fc").binary().var("weight", &[4, 8], nn::Init::Const(1.0));
/// let bias = (vs.root() / "fc").var("bias", &[4], nn::Init::Const(0.0));
///
/// let mut opt = case_optimizer! {
///     binary => Bop<threshold: 1e-6, gamma: 1e-3>,
///     _ => Adam<lr: 0.01>,
/// }
/// .build(&vs)?;
///
/// let x = Tensor::ones([2, 8], (Kind::Float, Device::Cpu));
/// let loss = (x.matmul(&kernel.tr()) + &bias).sum(Kind::Float);
/// opt.backward_step(&loss)?;
/// assert_eq!(opt.routing_table().rule_of("fc.weight").map(|r| r.optimizer), Some("Bop"));
/// assert_eq!(opt.step_counts(), vec![1, 1]);
/// # Ok::<(), caseopt::Error>(())
/// ```
///
/// # Rules
///
/// `PREDICATE => OPTIMIZER<key: value, ...>`, comma-separated, trailing comma allowed, an
/// optional `as name` after a rule. `_` is the default rule; it stands alone and comes last.
///
/// | atom | a variable matches when |
/// |---|---|
/// | `binary` | it is declared 1-bit (`PathExt::binary`); the same as `bits(1)` |
/// | `bits(N)` | it is declared `N` bits wide (`PathExt::bits`; unmarked variables are 32) |
/// | `ndim(N)` | it has exactly `N` dimensions |
/// | `name("glob")` | its full name matches: `*` any run of characters, `?` one character |
/// | `dtype(f32)` | its dtype is `f32`, `f64`, `f16` or `bf16` |
/// | `where(path::to::f)` | `f(&VarInfo) -> bool` says so; `f` is a path or a non-capturing closure |
///
/// Atoms combine with `!`, `&`, `|` (in that order of precedence) and parentheses.
///
/// The optimizer is one of the runtime's (`Bop`, `Bop2ndOrder`, `Sgd`, `Adam`, `AdamW`, `RAdam`, `NAdam`,
/// `RmsProp`, `Adagrad`; a single name always means the built-in one) or any type named by a
/// path that implements `caseopt::Optimizer` and `caseopt::FromConfig` (its config a struct
/// with public fields and `Default`). `Opt<k: v>` builds `<Opt as FromConfig>::Config { k: v,
/// ..Default::default() }`; a value is a literal, a path, or any expression in `( )` or `{ }`,
/// converted with `Into` (so a number or a `Schedule` goes wherever a scalar goes; an integer
/// literal for a built-in's number is read as a float).
///
/// # Two forms
///
/// The expression form (above) evaluates to a `caseopt::RouterBuilder`; its values may use
/// local variables. The item form declares a router type that can live in a struct field:
///
/// ```
/// caseopt::case_optimizer! {
///     /// Binary kernels with Bop, the rest with Adam.
///     pub struct BnnOptimizer {
///         binary => Bop<threshold: 1e-8, gamma: 1e-4> as bop,
///         _ => Adam<lr: 1e-3> as adam,
///     }
/// }
///
/// struct Trainer {
///     optimizer: BnnOptimizer,
/// }
///
/// use caseopt::tch::{nn, Device};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _ = vs.root().binary().var("kernel", &[2, 2], nn::Init::Const(1.0));
/// let _ = vs.root().var("bias", &[2], nn::Init::Const(0.0));
/// let trainer = Trainer { optimizer: BnnOptimizer::build(&vs)? };
/// // Also: BnnOptimizer::builder().build(&vs), BnnOptimizer::build_from(vars).
/// assert_eq!(trainer.optimizer.adam().params()[0].info.name, "bias");
/// # use caseopt::{Optimizer, PathExt};
/// # Ok::<(), caseopt::Error>(())
/// ```
///
/// Either way the router has one concrete field per rule and dispatches by direct calls. Its
/// inherent methods, callable without an import: `step`, `zero_grad`, `backward_step(&loss)`,
/// `clip_grad_norm(max)`, `clip_grad_norm_per_rule(max)`, `step_counts`, `rules`,
/// `routing_table`, `fingerprint`, `optimizer(i)`/`optimizer_mut(i)` (trait objects), and typed
/// accessors `ruleN()`/`ruleN_mut()` for rule `N` (plus `name()`/`name_mut()` for a rule
/// written `... as name`). It also implements `Debug` and the object-safe `caseopt::Router`,
/// whose other methods (`variable_store`, `set_non_finite_policy`, `non_finite_policy`,
/// `skipped_steps`, `binarised_variables`) need the trait in scope.
///
/// # Checked at compile time
///
/// Every error is spanned at the offending tokens and all are reported together: a rule no
/// variable can satisfy; two rules of which one implies the other (identical rules included),
/// because every variable the narrower claims would also be claimed by the wider; `_` twice or
/// not last; a duplicate hyperparameter; a key a built-in optimizer does not have (the error
/// lists the valid ones); a literal out of a built-in optimizer's range (a negative `lr`,
/// `gamma` outside (0, 1], ...). A pair of rules proven disjoint is not checked when the router
/// is built; every other pair is. A user optimizer's unknown keys are reported by rustc at the
/// key ("struct `LionConfig` has no field named `betta`").
///
/// # Checked when built
///
/// `build(&vs)` routes every trainable variable of a tch `VarStore` (`build_from(vars)` an
/// explicit list): a variable two rules claim is an error naming it and the rules; a
/// non-default rule claiming nothing is an error; without a default, unclaimed variables are
/// left untrained with a warning (printed once, and in `routing_table().warnings()`).
#[proc_macro]
pub fn case_optimizer(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    expand::case_optimizer(input.into()).into()
}
