//! # caseopt
//!
//! larq's `CaseOptimizer` and `Bop` for libtorch, through the `tch` crate.
//!
//! Optimizers ([`Bop`], [`Bop2ndOrder`], [`Sgd`], [`Adam`], [`AdamW`], [`RAdam`], [`NAdam`],
//! [`RmsProp`], [`Adagrad`], [`Adafactor`], [`Lion`], [`Muon`]) implement the [`Optimizer`]
//! trait (twelve required methods: the variables, the step, the step count, hyperparameters and
//! state; seven documented provided ones); their
//! hyperparameters are [`Schedule`]s; variables carry [`VarInfo`] metadata, and [`PathExt`]
//! marks tch variables as 1-bit or n-bit.

// Unsafe code lives in `kernels` and `distributed::ffi` alone (see their docs), every block with
// a SAFETY comment.
#![deny(unsafe_code)]
// Every public item is documented; CI denies the warning (`.ci/run`).
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod amp;
pub mod bnn;
pub mod checkpoint;
pub mod constraint;
#[cfg(feature = "distributed")]
pub mod distributed;
pub mod error;
#[allow(unsafe_code)]
mod kernels;
pub mod optim;
pub mod predicate;
pub mod router;
pub mod schedule;
pub mod var;

pub use amp::{Autocast, GradScaler, GradScalerConfig, GradScalerState, ScaledStep};
pub use bnn::{
    ste_sign, KernelInit, QuantConv2d, QuantConv2dConfig, QuantLinear, QuantLinearConfig, Quantizer,
};
pub use checkpoint::{
    checkpoint_info, load_scaled, load_training, save_scaled, save_training, Checkpoint,
    CheckpointError, CheckpointInfo,
};
pub use constraint::Constraint;
pub use error::{DistributedError, Error, Result, ScalerError};
/// The built-in optimizers and their configs (declared by `builtins!` in runtime/optim/mod.rs).
#[doc(inline)]
pub use optim::builtin_items::*;
pub use optim::{
    builtin, builtins, Backend, Builtin, BuiltinOptimizer, Execution, FlipRatios, FromConfig,
    Optimizer, Sqrt,
};
pub use schedule::{Plateau, PlateauConfig, PlateauMode, PlateauState, Schedule, ThresholdMode};
pub use tch;

#[doc(inline)]
pub use caseopt_macros::case_optimizer;
pub use predicate::{dtype_from_name, dtype_name, Glob, Predicate, DTYPE_NAMES};
pub use router::{
    fingerprint, NonFinitePolicy, Route, Router, RouterBuilder, RoutingTable, RuleInfo, RuleSpec,
};

/// Support for the code `case_optimizer!` generates; not public API.
#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

// Lets the macro's absolute paths (`::caseopt::__private`) resolve inside this crate too.
extern crate self as caseopt;
pub use var::{
    bits_from_group, group_for_bits, trainable_vars, var_infos, Param, PathExt, VarInfo,
    FULL_PRECISION_BITS,
};
