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
    /// A variable that another live router already trains: both would update it every step.
    /// Drop the other router first (or route the variable with one of them only).
    #[error(
        "variable `{variable}` is already trained by another router (as `{other}`); a variable \
         belongs to one router at a time, so drop the other router first"
    )]
    VariableInAnotherRouter {
        /// Variable name, as this router's store names it.
        variable: String,
        /// Its name in the router that trains it.
        other: String,
    },
    /// A gradient holding NaN or infinity, under the `Error` policy.
    #[error("gradient of `{variable}` holds NaN or infinity; the step was not applied")]
    NonFiniteGradient {
        /// Variable name.
        variable: String,
    },
    /// A variable whose dtype its rule's optimizer cannot train as configured, refused when a
    /// router routes it (wrapped in [`Error::Rule`], which names the rule): an f16 or bf16
    /// variable under a built-in optimizer without `master_weights: true`.
    #[error("variable `{variable}` is {dtype}: {optimizer} {reason}")]
    UntrainableDtype {
        /// The variable.
        variable: String,
        /// Its dtype (`bf16`, `f16`).
        dtype: &'static str,
        /// The optimizer.
        optimizer: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// A layer built with an impossible shape or setting (e.g. a non-positive channel count).
    #[error("invalid layer: {0}")]
    InvalidLayer(String),
    /// [`Autocast`](crate::amp::Autocast) for a device or dtype autocast does not run in
    /// (CPU and CUDA, in bfloat16 or float16).
    #[error("autocast: {0}")]
    Autocast(String),
    /// A quantizer parameter outside the range it has a meaning in (see
    /// [`Quantizer::validate`](crate::bnn::Quantizer::validate)).
    #[error("invalid {quantizer} parameter `{name}`: {value} (expected {expected})")]
    InvalidQuantizer {
        /// larq's name of the quantizer, e.g. `ste_tern`.
        quantizer: &'static str,
        /// Parameter name, e.g. `threshold_value`.
        name: &'static str,
        /// The offending value.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A checkpoint that cannot be written (see [`save_training`](crate::save_training)), or a
    /// saved state an optimizer refuses ([`Optimizer::set_state`](crate::Optimizer::set_state)).
    /// Problems with a file being loaded are [`BadCheckpoint`](Self::BadCheckpoint), with its
    /// path.
    #[error("checkpoint: {0}")]
    Checkpoint(CheckpointError),
    /// A data-parallel run that cannot go on (see `caseopt::distributed`, the `distributed`
    /// feature): a rendezvous or collective that timed out or lost a peer, ranks that disagree.
    #[error("distributed: {0}")]
    Distributed(DistributedError),
    /// A [`GradScaler`](crate::GradScaler) call out of order or with bad input; nothing was
    /// changed (no gradient, parameter, optimizer state or scale).
    #[error("gradient scaler: {0}")]
    Scaler(ScalerError),
    /// A checkpoint file that cannot be loaded (another file type, damaged, or written for
    /// other rules or variables); nothing was changed. `problem` says what is wrong.
    #[error("checkpoint `{}`: {problem}", path.display())]
    BadCheckpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: CheckpointError,
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
    /// A constraint whose parameter is out of range (e.g. a negative `weight_clip`).
    #[error("invalid {constraint} parameter `{name}`: {value} (expected {expected})")]
    InvalidConstraint {
        /// The constraint, as larq names it, e.g. `weight_clip`.
        constraint: &'static str,
        /// The parameter, e.g. `clip_value`.
        name: &'static str,
        /// The offending value.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A variable name the router (or optimizer) does not train.
    #[error("no variable `{variable}` is trained here{hint}")]
    UnknownVariable {
        /// The name given.
        variable: String,
        /// More about why, or nothing.
        hint: String,
    },
    /// A rule index past the router's rules.
    #[error("no rule {rule}: the router has {rules} rule(s)")]
    NoSuchRule {
        /// The index given.
        rule: usize,
        /// How many rules there are.
        rules: usize,
    },
    /// A variable an optimizer cannot train: [`Muon`](crate::Muon) takes 2-D variables only,
    /// as torch.optim.Muon does. Reported when the variable is given to the optimizer (when a
    /// router is built), naming it.
    #[error("{optimizer} cannot train `{variable}` of shape {shape:?}: {reason}")]
    UnsupportedVariable {
        /// Optimizer name.
        optimizer: &'static str,
        /// Variable name.
        variable: String,
        /// The variable's shape.
        shape: Vec<i64>,
        /// Why, and what to do instead.
        reason: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// `Result` with caseopt's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with a checkpoint: one that could not be loaded (carried by
/// [`Error::BadCheckpoint`] together with the file's path; nothing was changed), one that could
/// not be written, or a saved state an optimizer refuses (both carried by
/// [`Error::Checkpoint`]).
///
/// ```
/// use caseopt::CheckpointError;
/// let e = CheckpointError::MissingVariable { variable: "fc.weight".into() };
/// assert_eq!(
///     e.to_string(),
///     "variable `fc.weight` is routed by this router but missing from the checkpoint"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The file is not in the safetensors format (another file type, or a damaged header).
    #[error("not a safetensors file: {0}")]
    NotSafetensors(String),
    /// The file's size or offsets disagree with its header: truncated, extended or damaged.
    #[error("truncated or damaged file: {0}")]
    Truncated(String),
    /// A safetensors file that caseopt did not write.
    #[error("not a caseopt checkpoint: {0}")]
    NotACheckpoint(String),
    /// A checkpoint of a format version this build cannot read.
    #[error(
        "format version {found} is not supported (this build reads versions 1 to {supported})"
    )]
    UnsupportedVersion {
        /// The version in the file.
        found: u64,
        /// The newest version this build reads (it reads every one from 1 up to it).
        supported: u32,
    },
    /// Bytes that do not match their stored CRC-32: the file is corrupt.
    #[error("checksum mismatch in {what}: the file is corrupt")]
    ChecksumMismatch {
        /// The metadata or the tensor whose bytes changed.
        what: String,
    },
    /// Metadata that is well-formed JSON but inconsistent with itself or with the tensors.
    #[error("malformed checkpoint metadata: {0}")]
    Malformed(String),
    /// The checkpoint was written by a router with other rules.
    #[error(
        "written by other rules (fingerprint {saved_fingerprint:016x}: {}); this router's \
         (fingerprint {current_fingerprint:016x}): {}",
        saved.join("; "),
        current.join("; ")
    )]
    RulesDiffer {
        /// The fingerprint in the file.
        saved_fingerprint: u64,
        /// This router's fingerprint.
        current_fingerprint: u64,
        /// The rules in the file, as written.
        saved: Vec<String>,
        /// This router's rules, as written.
        current: Vec<String>,
    },
    /// A variable this router routes that the checkpoint does not have.
    #[error("variable `{variable}` is routed by this router but missing from the checkpoint")]
    MissingVariable {
        /// The variable's name.
        variable: String,
    },
    /// A variable in the checkpoint that this router does not route.
    #[error("variable `{variable}` is in the checkpoint but not routed by this router")]
    UnexpectedVariable {
        /// The variable's name.
        variable: String,
    },
    /// A variable whose shape, dtype, precision or rule differs.
    #[error("variable `{variable}` differs: checkpoint has {saved}, this router has {current}")]
    VariableMismatch {
        /// The variable's name.
        variable: String,
        /// What the checkpoint says.
        saved: String,
        /// What this router has.
        current: String,
    },
    /// A rule's optimizer of another type, or with other variables.
    #[error("rule {rule}: {reason}")]
    OptimizerMismatch {
        /// The rule's index.
        rule: usize,
        /// What differs.
        reason: String,
    },
    /// A state tensor with an unknown name, a wrong shape or dtype, or a bad value.
    #[error("state `{state}` of variable `{variable}` (rule {rule}): {reason}")]
    BadState {
        /// The rule's index.
        rule: usize,
        /// The variable's name.
        variable: String,
        /// The state's name.
        state: String,
        /// What is wrong.
        reason: String,
    },
    /// A hyperparameter that cannot be restored (a schedule that differs from this router's, a
    /// name the optimizer does not have, or a value it rejects).
    #[error("rule {rule} ({optimizer}) hyperparameter `{name}`: {reason}")]
    Hyperparameter {
        /// The rule's index.
        rule: usize,
        /// The optimizer's name.
        optimizer: String,
        /// The hyperparameter's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A model variable that is missing, unexpected, or of another shape or dtype.
    #[error("model variable `{variable}`: {reason}")]
    ModelVariable {
        /// The variable's name.
        variable: String,
        /// What is wrong.
        reason: String,
    },
    /// [`load_training`](crate::load_training) on a checkpoint written without model variables.
    #[error("the checkpoint holds no model variables (written by `save_checkpoint`, not `save_training`)")]
    NoModel,
    /// [`load_scaled`](crate::load_scaled) on a checkpoint written without a gradient
    /// scaler's state (by `save_checkpoint` or `save_training`, or a version-1 file).
    #[error("the checkpoint holds no gradient scaler state (written without `save_scaled`)")]
    NoScaler,
    /// A checkpoint holding a gradient scaler's state loaded without a scaler to restore it
    /// into (`load_checkpoint`, `load_training`): resuming with another scale would be another
    /// run, so the file is refused rather than partly loaded. Load it with
    /// [`load_scaled`](crate::load_scaled).
    #[error(
        "the checkpoint holds a gradient scaler's state: load it with `load_scaled` and the scaler"
    )]
    ScalerNotLoaded,
    /// The scaler's state in the checkpoint cannot be restored: a value out of its range (as
    /// [`GradScaler::load_state`](crate::GradScaler::load_state) would refuse it), or a disabled
    /// scaler's state for an enabled scaler.
    #[error("gradient scaler state: {0}")]
    BadScaler(String),
    /// An optimizer rejected a restored state or hyperparameter that passed every check; the
    /// router was rolled back.
    #[error("restoring rule {rule} failed and was rolled back: {reason}")]
    Rejected {
        /// The rule's index.
        rule: usize,
        /// The optimizer's error, in words.
        reason: String,
        /// The optimizer's error when it was a checkpoint problem (a
        /// [`StateMissing`](Self::StateMissing), say), to match on.
        problem: Option<Box<CheckpointError>>,
    },
    /// [`Optimizer::set_state`](crate::Optimizer::set_state) for a variable index the
    /// optimizer does not have.
    #[error("{optimizer} has no variable #{index}")]
    NoSuchVariable {
        /// The optimizer's name.
        optimizer: String,
        /// The index given.
        index: usize,
    },
    /// A saved state without a tensor the optimizer needs.
    #[error("state `{state}` of `{variable}` is missing")]
    StateMissing {
        /// The variable's name.
        variable: String,
        /// The state's name.
        state: String,
    },
    /// A saved state tensor whose dtype or shape is not its variable's.
    #[error("state `{state}` of `{variable}` is {found}, the variable is {expected}")]
    StateMismatch {
        /// The variable's name.
        variable: String,
        /// The state's name.
        state: String,
        /// The variable's dtype and shape.
        expected: String,
        /// The tensor's dtype and shape.
        found: String,
    },
    /// A saved per-variable step counter that is not a non-negative 0-dim integer.
    #[error("state `step` of `{variable}` {reason}")]
    BadStepCounter {
        /// The variable's name.
        variable: String,
        /// What is wrong (`is negative`, `is not a scalar: ...`).
        reason: String,
    },
    /// A router whose state cannot be written as a checkpoint (two tensors that would be
    /// stored under one key, a dimension that does not fit, metadata that cannot be encoded).
    #[error("cannot encode the checkpoint: {0}")]
    Unencodable(String),
}

/// What went wrong in a data-parallel run (`caseopt::distributed`, carried by
/// [`Error::Distributed`]). Every rank that sees the problem gets the same variant; a
/// disagreement names the first thing that differs.
///
/// ```
/// use caseopt::DistributedError;
/// let e = DistributedError::Mismatch {
///     rank: 1,
///     what: "variable `fc.weight`: [10, 64] f32 there, [10, 32] f32 here".into(),
/// };
/// assert_eq!(
///     e.to_string(),
///     "rank 1 disagrees with rank 0: variable `fc.weight`: [10, 64] f32 there, [10, 32] f32 here"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedError {
    /// A launcher variable (`MASTER_ADDR`, `RANK`, ...) that is missing or unreadable.
    #[error("environment variable {variable}: {reason}")]
    Environment {
        /// The variable's name.
        variable: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Rendezvous settings that cannot describe a group (a rank outside the world, a world of
    /// zero, a timeout of zero or above `distributed::MAX_TIMEOUT`), or
    /// ranks that cannot form one (a rank claimed by two processes, ranks started with
    /// different world sizes).
    #[error("invalid rendezvous: {0}")]
    InvalidRendezvous(String),
    /// An operation that did not complete within the group's timeout (a peer that never came,
    /// or stopped answering).
    #[error("{operation} timed out after {timeout_ms} ms: {message}")]
    Timeout {
        /// What was under way (`rendezvous`, `all-reduce`, ...).
        operation: &'static str,
        /// The group's timeout.
        timeout_ms: u64,
        /// c10d's own message.
        message: String,
    },
    /// A peer that closed its connection mid-operation (it crashed or was killed).
    #[error("{operation}: a peer left the group: {message}")]
    PeerLost {
        /// What was under way.
        operation: &'static str,
        /// c10d's own message.
        message: String,
    },
    /// A connection refused: nobody listens at the address a peer published (a peer that is
    /// gone, or a stale address from an earlier attempt of the job). Reported as soon as it
    /// happens, not as a timeout.
    #[error("{operation}: a peer's address refused the connection: {message}")]
    Unreachable {
        /// What was under way.
        operation: &'static str,
        /// c10d's own message.
        message: String,
    },
    /// Any other failure c10d reported.
    #[error("{operation} failed: {message}")]
    Failed {
        /// What was under way.
        operation: &'static str,
        /// c10d's own message.
        message: String,
    },
    /// Ranks that do not agree on something they must share (variables, their shapes, dtypes
    /// and precisions, the routing rules): the first difference, from the point of view of the
    /// rank that reports it.
    #[error("rank {rank} disagrees with rank 0: {what}")]
    Mismatch {
        /// The first rank that differs from rank 0.
        rank: usize,
        /// What differs.
        what: String,
    },
    /// A variable with a gradient on some ranks and none on others at the same step (every rank
    /// must compute every gradient, as torch's DDP requires without `find_unused_parameters`).
    #[error("variable `{variable}` has a gradient on {with} of {world_size} ranks")]
    GradientPresence {
        /// The variable.
        variable: String,
        /// How many ranks had a gradient for it.
        with: usize,
        /// The world size.
        world_size: usize,
    },
    /// A tensor a collective cannot take (a CUDA tensor on the Gloo backend, a sparse one).
    #[error("variable `{variable}` cannot be communicated: {reason}")]
    Unsupported {
        /// The variable.
        variable: String,
        /// Why.
        reason: String,
    },
}

impl From<DistributedError> for Error {
    fn from(e: DistributedError) -> Self {
        Error::Distributed(e)
    }
}

/// What a [`GradScaler`](crate::GradScaler) refused (carried by [`Error::Scaler`]); in every
/// case nothing was changed. The calls out of order are the ones torch.amp.GradScaler raises
/// on; the others are what it would let through silently.
///
/// ```
/// use caseopt::ScalerError;
/// assert_eq!(
///     ScalerError::AlreadyUnscaled.to_string(),
///     "unscale() has already been called since the last update()"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScalerError {
    /// A configuration or state value outside its range (torch asserts on the factors).
    #[error("invalid `{name}`: {value} (expected {expected})")]
    InvalidConfig {
        /// The field.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// `unscale` twice between two `update`s (torch's RuntimeError): the gradients would be
    /// divided by the scale twice.
    #[error("unscale() has already been called since the last update()")]
    AlreadyUnscaled,
    /// `unscale` after `step` and before `update` (torch's RuntimeError).
    #[error("unscale() is being called after step(); call update() first")]
    UnscaleAfterStep,
    /// `step` twice between two `update`s (torch's RuntimeError).
    #[error("step() has already been called since the last update()")]
    AlreadyStepped,
    /// `update` with no `unscale` or `step` since the last one (torch's AssertionError): there
    /// is no verdict to update the scale with.
    #[error("no inf checks were recorded prior to update(): call step() (or unscale()) first")]
    NothingToUpdate,
    /// `unscale` or `step` before any `scale`, whose first call places the scale on the loss's
    /// device (torch's AssertionError).
    #[error("{call}() before the scale was initialised: call scale() on the loss first")]
    NotInitialised {
        /// The call refused.
        call: &'static str,
    },
    /// `unscale` or `step` on a router that has no gradient to unscale (torch's
    /// AssertionError "No inf checks were recorded for this optimizer").
    #[error("the router has no gradient to unscale (run backward on the scaled loss first)")]
    NoGradients,
    /// A float16 gradient (torch's ValueError "Attempting to unscale FP16 gradients"): the
    /// variable itself is f16, and an optimizer stepping it in f16 loses the small updates loss
    /// scaling exists to keep; train an f32 copy instead.
    #[error("gradient of `{variable}` is float16: f16 variables cannot be trained with a scaler")]
    HalfGradient {
        /// The variable.
        variable: String,
    },
    /// The scaler's current step belongs to another router: one router per step, between two
    /// `update`s (each router needs its own scaler within a step).
    #[error("this step of the scaler belongs to another router; call update() first, or give each router its own scaler")]
    OtherRouter,
    /// A backoff that would bring the scale to zero: every later loss would scale to 0 and
    /// every step would be skipped (or step with zero gradients) without end. The scale and the
    /// growth tracker are left as they were; the usual cause is a loss that is NaN or infinite
    /// step after step.
    #[error("the scale would back off from {scale:e} to zero after {skipped} consecutive skipped steps: the loss or the gradients are non-finite at every scale")]
    ScaleUnderflow {
        /// The scale before the refused backoff.
        scale: f32,
        /// Consecutive skipped steps up to this one.
        skipped: u64,
    },
    /// A checkpoint saved or loaded with the scaler between `unscale`/`step` and `update`:
    /// the step's verdict and its unscaled gradients are not part of a checkpoint (torch
    /// advises saving after `update` too). Call `update` first.
    #[error("{call} in the middle of a step (after unscale() or step(), before update()): call update() first")]
    MidStep {
        /// The call refused (`save_scaled`, `load_scaled`).
        call: &'static str,
    },
}

impl From<ScalerError> for Error {
    fn from(e: ScalerError) -> Self {
        Error::Scaler(e)
    }
}
