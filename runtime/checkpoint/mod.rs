//! Checkpoints: a router's whole training state (and optionally its model's variables) in one
//! safetensors file, written atomically and loaded all-or-nothing.
//!
//! # Format (version 2)
//!
//! A [safetensors](https://github.com/huggingface/safetensors) file, readable by any
//! safetensors reader (`safetensors.torch.load_file` in Python, for instance):
//!
//! - tensors `opt/<rule index>/<variable name>/<state name>`: every optimizer's per-variable
//!   state (`exp_avg`, `m`, ...; `step` is a 0-dim int64), copied to the CPU and made contiguous,
//!   so a checkpoint written on CUDA loads on the CPU and the other way round;
//! - tensors `model/<variable name>`: the model's variables, when written by [`save_training`];
//! - `__metadata__["caseopt"]`: JSON with the format tag and version, the rules' fingerprint and
//!   text, the routing table, every optimizer's step count and hyperparameters (constants by value
//!   and bit pattern, schedules by description, [plateau](crate::Plateau) schedules by
//!   description and state), and a CRC-32 of every tensor's bytes;
//! - `__metadata__["caseopt.crc32"]`: the CRC-32 of that JSON text.
//!
//! Version 2 adds one field to version 1's JSON, `scaler`: a [`GradScaler`]'s state when the
//! file was written by [`save_scaled`], `null` otherwise. Version-1 files load as before.
//!
//! Every change to what is written is a new format version ([`FORMAT_VERSION`]); each version
//! ever written keeps a reader that migrates its records to the current ones, an unknown field
//! in a known version is refused rather than skipped, and a newer version is
//! [`CheckpointError::UnsupportedVersion`] naming both versions (docs/checkpoints.md,
//! "Compatibility").
//!
//! Safetensors checks that the header's length, offsets and sizes agree with the file; the two
//! kinds of CRC catch a changed byte anywhere else, so a damaged file is an error, never a
//! silently different state.
//!
//! # Writing
//!
//! Every checkpoint written can be loaded: a router whose variable changed device, dtype or
//! shape since it was routed (which its `step` refuses) is refused with
//! [`Error::VariableChanged`](crate::Error::VariableChanged) naming the variable, and nothing is
//! written.
//!
//! The file is written to a temporary file in the destination's directory, which is flushed
//! to disk (`fsync`) and then renamed over the destination; the directory is synced too. A
//! crash or an error leaves either the old file or the new one, never a mix; on error the
//! temporary file is removed.
//!
//! The temporary file of `<name>` is `.<name>.<pid>.<n>.tmp`, locked (`flock`) by its writer
//! until its rename. A process killed during a save leaves it behind; on Unix the next save to
//! the same destination removes such stale temporaries: files named exactly so for that
//! `<name>` that no process holds a lock on (the kernel drops a dead writer's locks), so a
//! concurrent writer's temporary, in this process or another, is never taken for stale.
//!
//! # Loading
//!
//! Everything is parsed and checked first: format and version, checksums, the rules'
//! fingerprint, the routing table (every variable, its shape, dtype, precision and rule), each
//! optimizer's type, hyperparameters, and each state tensor's name, shape and dtype. The tensors
//! are then built on the device of the variable they belong to. Only then is anything changed;
//! an error on the way is a [`CheckpointError`] (inside
//! [`Error::BadCheckpoint`](crate::Error::BadCheckpoint)) naming the problem, and the router
//! is left exactly as it was.
//!
//! Hyperparameters follow one rule, the same in both directions:
//!
//! - a constant in the checkpoint and a constant in the router: the checkpoint's is restored
//!   (a learning rate lowered during training resumes lowered);
//! - a schedule on either side: the other side must hold the same schedule (the same
//!   description; closures cannot be stored), and the router keeps it; the restored step
//!   counter makes it resume at the same position. A constant in the file against a schedule
//!   in the router, or a schedule in the file against a constant in the router, is a
//!   [`CheckpointError::Hyperparameter`] error: a load never swaps one kind for the other. Set
//!   the router's hyperparameter to what the run used before loading.
//!
//! ```
//! use caseopt::{case_optimizer, Checkpoint, PathExt, Router};
//! use tch::{nn, Device};
//!
//! case_optimizer! {
//!     struct Bnn { binary => Bop<threshold: 1e-6>, _ => Adam<lr: 0.01> }
//! }
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let w = vs.root().binary().var("w", &[4, 4], nn::Init::Const(1.0));
//! let b = vs.root().zeros("b", &[4]);
//! let mut opt = Bnn::build(&vs)?;
//! opt.backward_step(&(&w + &b).sum(tch::Kind::Float))?;
//! # let dir = std::env::temp_dir().join(format!("caseopt-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("optimizer.safetensors");
//! opt.save_checkpoint(&path)?;
//!
//! // A variable belongs to one router at a time: the old one goes before the new one trains.
//! drop(opt);
//! let mut resumed = Bnn::build(&vs)?;
//! resumed.load_checkpoint(&path)?;
//! assert_eq!(resumed.step_counts(), vec![1, 1]);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), caseopt::Error>(())
//! ```

mod apply;
mod atomic;
mod container;
mod format;
mod load;
mod parse;
mod plan;
mod save;
mod v1;
mod v2;
mod versions;

use std::path::Path;

use tch::nn;

use crate::amp::GradScaler;
pub use crate::error::CheckpointError;
use crate::error::Result;
use crate::router::Router;
use format::parse_fingerprint;
pub use format::{FORMAT, FORMAT_VERSION};
use load::load;
use parse::{bad, parse, read_file};
use save::save;

/// Saving and loading a router's training state; implemented for every [`Router`] (generated
/// routers and `dyn Router` alike).
///
/// See the [module documentation](self) for the format and the guarantees.
///
/// ```
/// use caseopt::{case_optimizer, Checkpoint, Router};
///
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let _w = vs.root().zeros("w", &[3]);
/// let mut opt = case_optimizer! { _ => Adam<lr: 1e-3> }.build(&vs)?;
/// # let dir = std::env::temp_dir().join(format!("caseopt-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("optimizer.safetensors");
/// opt.save_checkpoint(&path)?;
/// // Also through a trait object.
/// let dynamic: &mut dyn Router = &mut opt;
/// dynamic.load_checkpoint(&path)?;
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), caseopt::Error>(())
/// ```
pub trait Checkpoint {
    /// Writes every optimizer's state, step counter and hyperparameters, the routing table and
    /// the rules' fingerprint to `path`, atomically. A variable whose device, dtype or shape
    /// changed since it was routed is [`Error::VariableChanged`](crate::Error::VariableChanged),
    /// and nothing is written.
    fn save_checkpoint<P: AsRef<Path>>(&self, path: P) -> Result<()>;

    /// Restores a checkpoint written by a router with the same rules and variables; on any
    /// error ([`Error::BadCheckpoint`](crate::Error::BadCheckpoint),
    /// [`Error::Io`](crate::Error::Io)) nothing is changed. Model variables in the file (from
    /// [`save_training`]) are checked but not restored; use [`load_training`].
    /// Hyperparameters: see [`load_training`].
    fn load_checkpoint<P: AsRef<Path>>(&mut self, path: P) -> Result<()>;
}

impl<R: Router + ?Sized> Checkpoint for R {
    fn save_checkpoint<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        save(path.as_ref(), self, None, None)
    }

    fn load_checkpoint<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        load(path.as_ref(), self, None, None)
    }
}

/// Writes the model's variables (every named variable of `vs`, trainable or not, under
/// `model/<name>`) and the router's whole state to one checkpoint, atomically; refused as
/// [`Checkpoint::save_checkpoint`] is.
///
/// ```
/// use caseopt::{case_optimizer, load_training, save_training};
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let mut w = vs.root().zeros("w", &[3]);
/// let mut opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs)?;
/// # let dir = std::env::temp_dir().join(format!("caseopt-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("training.safetensors");
/// save_training(&path, &vs, &opt)?;
/// tch::no_grad(|| w.fill_(5.0));
/// load_training(&path, &vs, &mut opt)?;
/// assert_eq!(Vec::<f32>::try_from(&w)?, vec![0.0; 3]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_training<P: AsRef<Path>, R: Router + ?Sized>(
    path: P,
    vs: &nn::VarStore,
    router: &R,
) -> Result<()> {
    save(path.as_ref(), router, Some(vs), None)
}

/// Restores the model's variables and the router's state from a checkpoint written by
/// [`save_training`]. Everything is checked before anything changes: the model's variables
/// must match the file's by name, shape and dtype, and the router's as for
/// [`Checkpoint::load_checkpoint`]. Variables are copied in place, so layers holding them see
/// the restored values.
///
/// Hyperparameters follow one rule, the same in both directions. Where the checkpoint and the
/// router both hold a constant, the checkpoint's is restored. Where either holds a schedule,
/// the other must hold the same schedule (same description), which the router keeps: a
/// constant in the file against a schedule in the router is refused
/// ([`CheckpointError::Hyperparameter`]), exactly as a schedule in the file against a
/// constant in the router is; a load never replaces one kind by the other.
///
/// ```
/// use caseopt::{case_optimizer, load_training, save_training, CheckpointError, Error};
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _w = vs.root().zeros("w", &[3]);
/// let mut opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs)?;
/// # let dir = std::env::temp_dir().join(format!("caseopt-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("training.safetensors");
/// save_training(&path, &vs, &opt)?;
/// // A model with one more variable is refused, and left as it was.
/// let _extra = vs.root().zeros_no_train("running_mean", &[3]);
/// let err = load_training(&path, &vs, &mut opt).unwrap_err();
/// assert!(matches!(
///     err,
///     Error::BadCheckpoint { problem: CheckpointError::ModelVariable { .. }, .. }
/// ));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn load_training<P: AsRef<Path>, R: Router + ?Sized>(
    path: P,
    vs: &nn::VarStore,
    router: &mut R,
) -> Result<()> {
    load(path.as_ref(), router, Some(vs), None)
}

/// Writes the router's whole state, the model's variables when `vs` is given (as
/// [`save_training`] does), and the gradient scaler's state (torch.amp.GradScaler's
/// `state_dict()`: the scale, the growth tracker and the three factors, each exactly) to one
/// checkpoint, atomically; [`load_scaled`] resumes all of them bit for bit. Refused as
/// [`Checkpoint::save_checkpoint`] is, and with
/// [`ScalerError::MidStep`](crate::ScalerError::MidStep) between the scaler's `unscale`/`step`
/// and its `update` (save after `update`, as torch advises).
///
/// ```
/// use caseopt::{case_optimizer, load_scaled, save_scaled, GradScaler, GradScalerConfig};
/// use tch::{nn, Device, Kind};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let w = vs.root().ones("w", &[3]);
/// let mut opt = case_optimizer! { _ => Adam<lr: 0.1> }.build(&vs)?;
/// let mut scaler = GradScaler::new(GradScalerConfig { growth_interval: 1, ..Default::default() })?;
/// opt.zero_grad();
/// scaler.scale(&w.sum(Kind::Float))?.backward();
/// scaler.step(&mut opt)?;
/// scaler.update()?; // a clean step: the scale doubles
/// # let dir = std::env::temp_dir().join(format!("caseopt-doc-scaled-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("training.safetensors");
/// save_scaled(&path, Some(&vs), &opt, &scaler)?;
///
/// drop(opt);
/// let mut opt = case_optimizer! { _ => Adam<lr: 0.1> }.build(&vs)?;
/// let mut resumed = GradScaler::default();
/// load_scaled(&path, Some(&vs), &mut opt, &mut resumed)?;
/// assert_eq!(resumed.state()?, scaler.state()?);
/// assert_eq!(resumed.scale_factor()?, 131072.0);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_scaled<P: AsRef<Path>, R: Router + ?Sized>(
    path: P,
    vs: Option<&nn::VarStore>,
    router: &R,
    scaler: &GradScaler,
) -> Result<()> {
    save(path.as_ref(), router, vs, Some(scaler))
}

/// Restores a checkpoint written by [`save_scaled`]: the router's state, the model's variables
/// when `vs` is given (as [`load_training`] does) and the scaler's state
/// ([`GradScaler::load_state`]: scale, growth tracker, factors). Everything is checked before
/// anything changes, the scaler's values included; on any error router, model and scaler are
/// as they were. A file without a scaler's state (written by `save_checkpoint`,
/// `save_training`, or a version-1 file) is [`CheckpointError::NoScaler`]; a file with one
/// loaded by `load_checkpoint` or `load_training` is [`CheckpointError::ScalerNotLoaded`],
/// so that no run resumes with another scale unnoticed. A disabled scaler loads nothing into
/// itself (as torch); an enabled one refuses a disabled scaler's file
/// ([`CheckpointError::BadScaler`]). Refused with
/// [`ScalerError::MidStep`](crate::ScalerError::MidStep) between the scaler's
/// `unscale`/`step` and its `update`. See [`save_scaled`] for an example.
pub fn load_scaled<P: AsRef<Path>, R: Router + ?Sized>(
    path: P,
    vs: Option<&nn::VarStore>,
    router: &mut R,
    scaler: &mut GradScaler,
) -> Result<()> {
    load(path.as_ref(), router, vs, Some(scaler))
}

/// What a checkpoint says about itself, read without a router.
///
/// ```
/// use caseopt::{case_optimizer, Checkpoint};
///
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let _w = vs.root().zeros("w", &[3]);
/// let opt = case_optimizer! { _ => Adam<lr: 1e-3> }.build(&vs)?;
/// # let dir = std::env::temp_dir().join(format!("caseopt-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("optimizer.safetensors");
/// opt.save_checkpoint(&path)?;
/// let info = caseopt::checkpoint_info(&path)?;
/// assert_eq!((info.rules, info.step_counts), (vec!["_ => Adam".to_string()], vec![0]));
/// assert_eq!(info.variables, vec!["w"]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The file's format version (older versions are read and migrated, see
    /// [`FORMAT_VERSION`]).
    pub version: u32,
    /// The rules' fingerprint (see [`Router::fingerprint`]).
    pub fingerprint: u64,
    /// The rules, as written.
    pub rules: Vec<String>,
    /// Each rule's optimizer's step count, in rule order.
    pub step_counts: Vec<u64>,
    /// The routed variables' names, in routing order.
    pub variables: Vec<String>,
    /// The model variables' names (empty unless written by [`save_training`]).
    pub model_variables: Vec<String>,
}

/// Reads and checks a checkpoint's metadata and checksums, without a router (see
/// [`CheckpointInfo`] for an example).
pub fn checkpoint_info<P: AsRef<Path>>(path: P) -> Result<CheckpointInfo> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let parsed = parse(&bytes).map_err(|problem| bad(path, problem))?;
    let meta = &parsed.meta;
    Ok(CheckpointInfo {
        version: parsed.version,
        fingerprint: parse_fingerprint(&meta.fingerprint).map_err(|p| bad(path, p))?,
        rules: meta.rules.clone(),
        step_counts: meta.optimizers.iter().map(|o| o.step_count).collect(),
        variables: meta.routes.iter().map(|r| r.variable.clone()).collect(),
        model_variables: meta.model.iter().flatten().map(|m| m.name.clone()).collect(),
    })
}
