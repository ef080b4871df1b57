//! Implementation detail of `caseopt`: the rule language of `case_optimizer!` and the table of
//! built-in optimizers, shared by the proc-macro crate (which expands rules), the runtime (which
//! names and validates the same optimizers) and the tests (which hold the checker's verdicts
//! against run-time routing). Depend on `caseopt`, not on this crate.
//!
//! - [`builtin`]: the built-in optimizers ([`OptimizerKind`]), their fields and ranges.
//! - [`logic`]: satisfiability of rule formulas in the theory of variable metadata.
//! - [`ast`] (feature `syntax`): the macro's input parsed into a typed view.
//! - [`check`] (feature `syntax`): the cross-rule checks, exclusivity first.

#![warn(missing_docs)]

#[cfg(feature = "syntax")]
pub mod ast;
pub mod builtin;
#[cfg(feature = "syntax")]
pub mod check;
pub mod logic;

pub use builtin::{Field, OptimizerKind, Range};
