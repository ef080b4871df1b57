//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in caseopt: bad configuration, routing conflicts, bad input
/// while training, checkpoint problems, and errors from libtorch. Every variant that concerns a
/// variable or a rule names it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A hyperparameter value outside the range the optimizer accepts (torch.optim's ValueError).
    #[error("invalid {optimizer} hyperparameter `{name}`: {value} (expected {expected})")]
    InvalidHyperparameter {
        /// Optimizer name, e.g. `Adam`.
        optimizer: &'static str,
        /// Hyperparameter name, e.g. `lr`.
        name: &'static str,
        /// The offending value.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A schedule whose own parameters are invalid.
    #[error("invalid schedule for {optimizer} hyperparameter `{name}`: {reason}")]
    InvalidSchedule {
        /// Optimizer name.
        optimizer: &'static str,
        /// Hyperparameter name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An option combination the optimizer rejects (e.g. nesterov without momentum).
    #[error("invalid {optimizer} configuration: {reason}")]
    InvalidConfig {
        /// Optimizer name.
        optimizer: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A hyperparameter name the optimizer does not have.
    #[error("{optimizer} has no hyperparameter `{name}` (expected one of: {known})")]
    UnknownHyperparameter {
        /// Optimizer name.
        optimizer: &'static str,
        /// The unknown name.
        name: String,
        /// The names it does have, comma-separated.
        known: String,
    },
    /// Gradients passed to a step do not line up with the optimizer's variables.
    #[error("{optimizer} holds {expected} variables but was given {got} gradients")]
    GradientCount {
        /// Optimizer name.
        optimizer: &'static str,
        /// Number of variables.
        expected: usize,
        /// Number of gradients given.
        got: usize,
    },
    /// A gradient whose shape, dtype or device differs from its variable's.
    #[error("gradient of `{variable}` does not match the variable: {reason}")]
    GradientMismatch {
        /// Variable name.
        variable: String,
        /// What differs.
        reason: String,
    },
    /// A variable claimed by more than one rule.
    #[error("variable `{variable}` is claimed by more than one rule: {}", rules.join(", "))]
    OverlappingRules {
        /// Variable name.
        variable: String,
        /// The rules, as written.
        rules: Vec<String>,
    },
    /// A non-default rule that claims no variable.
    #[error("rule `{rule}` claims no variable; remove it or fix its predicate")]
    UnclaimedRule {
        /// The rule, as written.
        rule: String,
    },
    /// A variable given twice to a router.
    #[error("variable `{variable}` is given twice")]
    DuplicateVariable {
        /// Variable name.
        variable: String,
    },
    /// A variable whose device, dtype or shape changed since it was routed.
    #[error("variable `{variable}` changed since it was routed: was {was}, now {now}")]
    VariableChanged {
        /// Variable name.
        variable: String,
        /// Description before.
        was: String,
        /// Description now.
        now: String,
    },
    /// A gradient holding NaN or infinity, under the `Error` policy.
    #[error("gradient of `{variable}` holds NaN or infinity; the step was not applied")]
    NonFiniteGradient {
        /// Variable name.
        variable: String,
    },
    /// A layer built with an impossible shape or setting (e.g. a non-positive channel count).
    #[error("invalid layer: {0}")]
    InvalidLayer(String),
    /// A checkpoint that cannot be loaded into this router.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint file that cannot be loaded (another file type, damaged, or written for
    /// other rules or variables); nothing was changed. `problem` says what is wrong.
    #[error("checkpoint `{}`: {problem}", path.display())]
    BadCheckpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: crate::checkpoint::CheckpointError,
    },
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error while building one rule's optimizer (its configuration or a variable it was
    /// given), with the rule as written.
    #[error("rule `{rule}`: {source}")]
    Rule {
        /// The rule, as written (`predicate => Optimizer`).
        rule: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// A gradient-clipping bound that is negative or not finite.
    #[error("max_norm must be finite and >= 0, got {value}")]
    InvalidMaxNorm {
        /// The bound given.
        value: f64,
    },
    /// The fused kernels were forced (`Backend::Fused`) on a variable they cannot take.
    #[error("{optimizer}: the fused kernels cannot update `{variable}`: {reason}")]
    FusedUnavailable {
        /// Optimizer name.
        optimizer: &'static str,
        /// Variable name.
        variable: String,
        /// Why (device, dtype, layout, shared memory, or no kernel for this optimizer).
        reason: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// `Result` with caseopt's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;
