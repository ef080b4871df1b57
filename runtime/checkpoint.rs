//! Checkpoints: a router's whole training state (and optionally its model's variables) in one
//! safetensors file, written atomically and loaded all-or-nothing.
//!
//! # Format (version 1)
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
//!   and bit pattern, schedules by description), and a CRC-32 of every tensor's bytes;
//! - `__metadata__["caseopt.crc32"]`: the CRC-32 of that JSON text.
//!
//! Safetensors checks that the header's length, offsets and sizes agree with the file; the two
//! kinds of CRC catch a changed byte anywhere else, so a damaged file is an error, never a
//! silently different state.
//!
//! # Writing
//!
//! To a temporary file in the destination's directory, which is flushed to disk (`fsync`) and
//! then renamed over the destination; the directory is synced too. A crash or an error leaves
//! either the old file or the new one, never a mix; on error the temporary file is removed.
//!
//! # Loading
//!
//! Everything is parsed and checked first: format and version, checksums, the rules'
//! fingerprint, the routing table (every variable, its shape, dtype, precision and rule), each
//! optimizer's type, hyperparameters, and each state tensor's name, shape and dtype. The tensors
//! are then built on the device of the variable they belong to. Only then is anything changed;
//! an error on the way is a [`CheckpointError`] (inside [`Error::BadCheckpoint`]) naming the
//! problem, and the router is left exactly as it was. Constant hyperparameters are restored;
//! for a schedule the router's own schedule must have the same description (closures cannot be
//! stored), and the restored step counter makes it resume at the same position.
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
//! let mut resumed = Bnn::build(&vs)?;
//! resumed.load_checkpoint(&path)?;
//! assert_eq!(resumed.step_counts(), vec![1, 1]);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), caseopt::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::predicate::dtype_name;
use crate::router::Router;
use crate::schedule::Schedule;

/// The format tag stored in every checkpoint's metadata.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT, "caseopt-checkpoint");
/// ```
pub const FORMAT: &str = "caseopt-checkpoint";
/// The checkpoint format version this build writes and reads.
///
/// ```
/// assert_eq!(caseopt::checkpoint::FORMAT_VERSION, 1);
/// ```
pub const FORMAT_VERSION: u32 = 1;

/// `__metadata__` key of the JSON description.
const METADATA_KEY: &str = "caseopt";
/// `__metadata__` key of the CRC-32 of the JSON description.
const METADATA_CRC_KEY: &str = "caseopt.crc32";
/// Prefix of the optimizer-state tensors.
const OPT_PREFIX: &str = "opt/";
/// Prefix of the model-variable tensors.
const MODEL_PREFIX: &str = "model/";
/// Optimizers of this crate, whose state tensors follow the convention the loader checks before
/// applying anything: `step` is a 0-dim int64, every other state has its variable's shape and
/// dtype. Other optimizers' states are checked by their own `set_state`, and undone on error.
const BUILT_IN: &[&str] = &["Bop", "Bop2ndOrder", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad"];

/// What is wrong with a checkpoint that could not be loaded. Carried by
/// [`Error::BadCheckpoint`] together with the file's path; when it is returned, nothing was
/// changed.
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
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version in the file.
        found: u64,
        /// The version this build reads.
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
    /// [`load_training`] on a checkpoint written without model variables.
    #[error("the checkpoint holds no model variables (written by `save_checkpoint`, not `save_training`)")]
    NoModel,
    /// An optimizer rejected a restored state or hyperparameter that passed every check; the
    /// router was rolled back.
    #[error("restoring rule {rule} failed and was rolled back: {reason}")]
    Rejected {
        /// The rule's index.
        rule: usize,
        /// The optimizer's error.
        reason: String,
    },
}

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
    /// the rules' fingerprint to `path`, atomically.
    fn save_checkpoint<P: AsRef<Path>>(&self, path: P) -> Result<()>;

    /// Restores a checkpoint written by a router with the same rules and variables; on any
    /// error ([`Error::BadCheckpoint`], [`Error::Io`]) nothing is changed. Model variables in
    /// the file (from [`save_training`]) are checked but not restored; use [`load_training`].
    fn load_checkpoint<P: AsRef<Path>>(&mut self, path: P) -> Result<()>;
}

impl<R: Router + ?Sized> Checkpoint for R {
    fn save_checkpoint<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        save(path.as_ref(), self, None)
    }

    fn load_checkpoint<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        load(path.as_ref(), self, None)
    }
}

/// Writes the model's variables (every named variable of `vs`, trainable or not, under
/// `model/<name>`) and the router's whole state to one checkpoint, atomically.
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
    save(path.as_ref(), router, Some(vs))
}

/// Restores the model's variables and the router's state from a checkpoint written by
/// [`save_training`]. Everything is checked before anything changes: the model's variables
/// must match the file's by name, shape and dtype, and the router's as for
/// [`Checkpoint::load_checkpoint`]. Variables are copied in place, so layers holding them see
/// the restored values.
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
    load(path.as_ref(), router, Some(vs))
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
    /// The format version.
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
        version: meta.version,
        fingerprint: parse_fingerprint(&meta.fingerprint).map_err(|p| bad(path, p))?,
        rules: meta.rules.clone(),
        step_counts: meta.optimizers.iter().map(|o| o.step_count).collect(),
        variables: meta.routes.iter().map(|r| r.variable.clone()).collect(),
        model_variables: meta.model.iter().flatten().map(|m| m.name.clone()).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// The metadata, as JSON.

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: String,
    version: u32,
    /// 16 hex digits: JSON numbers lose precision above 2^53 in many readers.
    fingerprint: String,
    rules: Vec<String>,
    routes: Vec<SavedRoute>,
    optimizers: Vec<SavedOptimizer>,
    /// `None` for [`Checkpoint::save_checkpoint`], the model's variables for [`save_training`].
    model: Option<Vec<SavedModelVar>>,
    /// Every tensor of the file, by key.
    tensors: BTreeMap<String, SavedTensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedRoute {
    variable: String,
    shape: Vec<i64>,
    dtype: String,
    bits: u8,
    rule: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedOptimizer {
    rule: usize,
    optimizer: String,
    step_count: u64,
    hyperparameters: BTreeMap<String, SavedHyperparameter>,
    /// Every variable of the optimizer, with the names of the state tensors it has (none before
    /// its first update).
    variables: Vec<SavedVariable>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedVariable {
    name: String,
    states: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum SavedHyperparameter {
    /// `value` for people, `bits` (the f64's bit pattern, 16 hex digits) for exactness: JSON
    /// readers need not round decimal text back to the same double.
    Constant { value: String, bits: String },
    /// The schedule's `Debug` description.
    Schedule { description: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedModelVar {
    name: String,
    shape: Vec<i64>,
    dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedTensor {
    dtype: String,
    shape: Vec<i64>,
    crc32: u32,
}

// ---------------------------------------------------------------------------------------------
// Saving.

/// A tensor's bytes on the CPU, as safetensors writes them.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Writes the safetensors layout: the header's length (u64, little endian), the JSON header
/// padded with spaces to a multiple of 8 bytes, then every tensor's bytes.
///
/// Written here rather than with `safetensors::serialize`: 0.3's serializer emits invalid JSON
/// (`{},"__metadata__":...`) for a file with metadata and no tensors, which a router that has
/// not stepped yet produces. Tensors go in order of decreasing element size, then by key (as
/// the crate orders them), so that every tensor starts at an offset aligned to its element
/// size and memory-mapping readers can use the data in place.
fn write_safetensors(
    out: &mut impl Write,
    blobs: &BTreeMap<String, Blob>,
    metadata: &BTreeMap<&str, String>,
) -> std::io::Result<()> {
    let mut order: Vec<(&String, &Blob)> = blobs.iter().collect();
    order.sort_by(|(ka, a), (kb, b)| b.dtype.size().cmp(&a.dtype.size()).then(ka.cmp(kb)));
    let mut header = serde_json::Map::new();
    let to_json = |e: serde_json::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    header.insert("__metadata__".to_string(), serde_json::to_value(metadata).map_err(to_json)?);
    let mut offset = 0usize;
    for (key, blob) in &order {
        let end = offset + blob.bytes.len();
        let entry = serde_json::json!({
            "dtype": blob.dtype,
            "shape": blob.shape,
            "data_offsets": [offset, end],
        });
        header.insert((*key).clone(), entry);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(to_json)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, blob) in order {
        out.write_all(&blob.bytes)?;
    }
    Ok(())
}

/// Copies a tensor (any device, any strides) to contiguous CPU bytes.
fn blob_of(tensor: &Tensor) -> Result<(Blob, SavedTensor)> {
    let kind = tensor.f_kind()?;
    let dtype = Dtype::try_from(kind)?;
    let size = tensor.size();
    let numel = tensor.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    // at_copy_data moves the tensor to the CPU and makes it contiguous first when needed.
    tensor.f_copy_data_u8(&mut bytes, numel)?;
    let saved = SavedTensor {
        dtype: dtype_name(kind).to_string(),
        shape: size.clone(),
        crc32: crc32fast::hash(&bytes),
    };
    let shape = size
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::Checkpoint(format!("negative dimension in shape {size:?}")))?;
    Ok((Blob { dtype, shape, bytes }, saved))
}

/// Every named variable of `vs` (shallow handles). `VarStore::variables` unwraps the store's
/// lock and would panic if a thread had panicked while holding it; the handles stay valid.
fn named_variables(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    let vars = vs.variables_.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    vars.named_variables.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
}

fn optimizer_of<R: Router + ?Sized>(router: &R, rule: usize) -> Result<&dyn Optimizer> {
    router
        .optimizer(rule)
        .ok_or_else(|| Error::Checkpoint(format!("the router has no optimizer for rule {rule}")))
}

fn save<R: Router + ?Sized>(path: &Path, router: &R, vs: Option<&nn::VarStore>) -> Result<()> {
    let rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    let routes = router
        .routing_table()
        .routes()
        .iter()
        .map(|r| SavedRoute {
            variable: r.variable.clone(),
            shape: r.shape.clone(),
            dtype: dtype_name(r.kind).to_string(),
            bits: r.bits,
            rule: r.rule,
        })
        .collect();
    let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
    let mut tensors: BTreeMap<String, SavedTensor> = BTreeMap::new();
    let mut add = |key: String, tensor: &Tensor| -> Result<()> {
        let (blob, saved) = blob_of(tensor)?;
        if blobs.insert(key.clone(), blob).is_some() {
            return Err(Error::Checkpoint(format!("two tensors would be stored as `{key}`")));
        }
        tensors.insert(key, saved);
        Ok(())
    };
    let mut optimizers = Vec::with_capacity(rules.len());
    for rule in 0..rules.len() {
        let opt = optimizer_of(router, rule)?;
        let mut hyperparameters = BTreeMap::new();
        for &name in opt.hyperparameter_names() {
            hyperparameters.insert(name.to_string(), save_schedule(opt.schedule(name)?));
        }
        let mut variables = Vec::with_capacity(opt.params().len());
        for (index, param) in opt.params().iter().enumerate() {
            let mut states = Vec::new();
            for (state, tensor) in opt.state(index) {
                // Keys are never parsed back, but a `/` in a state name could make two keys
                // equal (`a` + `b/m` and `a/b` + `m`).
                if state.contains('/') {
                    return Err(Error::Checkpoint(format!(
                        "{} state name `{state}` contains `/`",
                        opt.name()
                    )));
                }
                add(state_key(rule, &param.info.name, state), &tensor)?;
                states.push(state.to_string());
            }
            variables.push(SavedVariable { name: param.info.name.clone(), states });
        }
        optimizers.push(SavedOptimizer {
            rule,
            optimizer: opt.name().to_string(),
            step_count: opt.step_count(),
            hyperparameters,
            variables,
        });
    }
    let model = match vs {
        None => None,
        Some(vs) => {
            let mut vars: Vec<(String, Tensor)> = named_variables(vs).into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Vec::with_capacity(vars.len());
            for (name, tensor) in vars {
                add(format!("{MODEL_PREFIX}{name}"), &tensor)?;
                out.push(SavedModelVar {
                    shape: tensor.size(),
                    dtype: dtype_name(tensor.kind()).to_string(),
                    name,
                });
            }
            Some(out)
        }
    };
    let meta = Meta {
        format: FORMAT.to_string(),
        version: FORMAT_VERSION,
        fingerprint: format!("{:016x}", router.fingerprint()),
        rules,
        routes,
        optimizers,
        model,
        tensors,
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| Error::Checkpoint(format!("cannot encode the metadata: {e}")))?;
    let crc = crc32fast::hash(json.as_bytes()).to_string();
    let metadata = BTreeMap::from([(METADATA_KEY, json), (METADATA_CRC_KEY, crc)]);
    write_atomically(path, |file| {
        let mut out = BufWriter::new(file);
        write_safetensors(&mut out, &blobs, &metadata)?;
        out.flush()
    })
}

fn state_key(rule: usize, variable: &str, state: &str) -> String {
    format!("{OPT_PREFIX}{rule}/{variable}/{state}")
}

fn save_schedule(schedule: &Schedule) -> SavedHyperparameter {
    match schedule.as_constant() {
        Some(v) => SavedHyperparameter::Constant {
            value: format!("{v:?}"),
            bits: format!("{:016x}", v.to_bits()),
        },
        None => SavedHyperparameter::Schedule { description: format!("{schedule:?}") },
    }
}

/// Distinguishes temporary files written at the same time by one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file unless the rename succeeded.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `path` through `write(file)`: the file is a new temporary file in the same
/// directory (so the rename is atomic), synced before the rename, and removed on any error.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |what: &str, p: &Path| {
        let context = format!("{what} `{}`", p.display());
        move |source| Error::Io { context, source }
    };
    let name = path.file_name().ok_or_else(|| Error::Io {
        context: format!("saving checkpoint `{}`", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{unique}.tmp", name.to_string_lossy(), std::process::id()));
    // A new name only: a stale file (or a link planted under that name) is never written through.
    let mut file =
        OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io("creating", &tmp))?;
    let mut guard = TempFile(Some(tmp.clone()));
    write(&mut file).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("renaming the temporary file onto", path))?;
    guard.0 = None;
    // The rename itself lives in the directory: sync it so the new name survives a crash.
    // Directories cannot be opened for syncing on every platform; the file is complete anyway.
    #[cfg(unix)]
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io("syncing directory", &dir))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading.

fn bad(path: &Path, problem: CheckpointError) -> Error {
    Error::BadCheckpoint { path: path.to_path_buf(), problem }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| Error::Io {
        context: format!("reading checkpoint `{}`", path.display()),
        source,
    })
}

/// A parsed file whose metadata is consistent with itself and whose checksums hold.
struct Parsed<'a> {
    meta: Meta,
    file: SafeTensors<'a>,
}

/// The largest header safetensors accepts.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Rejects a header whose offsets point past the end of the file before safetensors 0.3 sees
/// it: its own final check adds offsets without overflow checks, so a crafted header could
/// wrap around it and make a later slice index panic.
fn precheck(bytes: &[u8]) -> std::result::Result<(), CheckpointError> {
    use CheckpointError as E;
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(E::NotSafetensors(format!(
            "{} bytes, shorter than the header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(E::NotSafetensors(format!("header length {header_len} is implausible")));
    }
    // At most 1e8: fits in usize.
    let header_len = header_len as usize;
    if header_len > rest.len() {
        return Err(E::Truncated(format!(
            "the header needs {header_len} bytes, {} follow",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let Ok(serde_json::Value::Object(entries)) =
        serde_json::from_slice::<serde_json::Value>(header)
    else {
        return Err(E::NotSafetensors("the header is not a JSON object".into()));
    };
    let data_len = data.len() as u64;
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry.get("data_offsets").and_then(|o| o.as_array());
        let in_bounds = offsets.is_some_and(|o| {
            o.len() == 2 && o.iter().all(|v| v.as_u64().is_some_and(|v| v <= data_len))
        });
        if !in_bounds {
            return Err(E::Truncated(format!(
                "the offsets of tensor `{name}` are missing or past the end of the data ({data_len} bytes)"
            )));
        }
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> std::result::Result<Parsed<'_>, CheckpointError> {
    use CheckpointError as E;
    precheck(bytes)?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer
        | SafeTensorError::InvalidOffset(_)
        | SafeTensorError::InvalidHeaderLength
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow => E::Truncated(format!("{e:?}")),
        other => E::NotSafetensors(format!("{other:?}")),
    })?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| E::NotSafetensors(format!("{e:?}")))?;
    let extra = header.metadata().as_ref();
    let json = extra
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| E::NotACheckpoint(format!("no `{METADATA_KEY}` entry in `__metadata__`")))?;
    let stored_crc = extra.and_then(|m| m.get(METADATA_CRC_KEY)).ok_or_else(|| {
        E::NotACheckpoint(format!("no `{METADATA_CRC_KEY}` entry in `__metadata__`"))
    })?;
    if stored_crc.parse::<u32>().ok() != Some(crc32fast::hash(json.as_bytes())) {
        return Err(E::ChecksumMismatch { what: "the metadata".into() });
    }
    // Format and version first, so that a future version's fields read as "unsupported
    // version" rather than as malformed.
    #[derive(Deserialize)]
    struct Tag {
        format: String,
        version: u64,
    }
    let tag: Tag =
        serde_json::from_str(json).map_err(|e| E::NotACheckpoint(format!("metadata: {e}")))?;
    if tag.format != FORMAT {
        return Err(E::NotACheckpoint(format!("format tag `{}`, expected `{FORMAT}`", tag.format)));
    }
    if tag.version != u64::from(FORMAT_VERSION) {
        return Err(E::UnsupportedVersion { found: tag.version, supported: FORMAT_VERSION });
    }
    let meta: Meta = serde_json::from_str(json).map_err(|e| E::Malformed(e.to_string()))?;
    parse_fingerprint(&meta.fingerprint)?;
    // The file's tensors are exactly those the metadata lists, with the dtype and shape it
    // records and the bytes it checksummed.
    let names: BTreeSet<&str> = file.names().into_iter().map(String::as_str).collect();
    for name in &names {
        if !meta.tensors.contains_key(*name) {
            return Err(E::Malformed(format!("tensor `{name}` is not listed in the metadata")));
        }
    }
    for (key, saved) in &meta.tensors {
        let view = file
            .tensor(key)
            .map_err(|_| E::Malformed(format!("tensor `{key}` is listed but not in the file")))?;
        let kind = Kind::try_from(view.dtype()).map_err(|_| {
            E::Malformed(format!("tensor `{key}` has unsupported dtype {:?}", view.dtype()))
        })?;
        let shape = view.shape().iter().map(|&d| i64::try_from(d).ok()).collect::<Option<Vec<_>>>();
        if dtype_name(kind) != saved.dtype || shape.as_ref() != Some(&saved.shape) {
            return Err(E::Malformed(format!(
                "tensor `{key}` is {:?} {:?} in the file, {} {:?} in the metadata",
                view.dtype(),
                view.shape(),
                saved.dtype,
                saved.shape
            )));
        }
        if crc32fast::hash(view.data()) != saved.crc32 {
            return Err(E::ChecksumMismatch { what: format!("tensor `{key}`") });
        }
    }
    Ok(Parsed { meta, file })
}

fn parse_fingerprint(text: &str) -> std::result::Result<u64, CheckpointError> {
    parse_hex64(text).ok_or_else(|| {
        CheckpointError::Malformed(format!("fingerprint `{text}` is not 16 hex digits"))
    })
}

/// Exactly 16 hex digits (`from_str_radix` alone would also take a sign).
fn parse_hex64(text: &str) -> Option<u64> {
    if text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

/// What a validated checkpoint will do to one rule's optimizer.
struct OptimizerPlan {
    rule: usize,
    step_count: u64,
    constants: Vec<(&'static str, f64)>,
    /// For every variable of the optimizer, by index: its state (empty = none yet).
    states: Vec<Vec<(String, Tensor)>>,
}

/// Everything a load will change, built (on the target devices) before anything is changed.
struct Plan {
    optimizers: Vec<OptimizerPlan>,
    /// (the model's variable, its value from the file on the variable's device).
    model: Vec<(Tensor, Tensor)>,
}

fn load<R: Router + ?Sized>(path: &Path, router: &mut R, vs: Option<&nn::VarStore>) -> Result<()> {
    let bytes = read_file(path)?;
    let parsed = parse(&bytes).map_err(|p| bad(path, p))?;
    let plan = plan(&parsed, router, vs).map_err(|e| match e {
        PlanError::Problem(p) => bad(path, p),
        PlanError::Torch(e) => e,
    })?;
    drop(parsed);
    drop(bytes);
    apply(router, plan).map_err(|p| bad(path, p))
}

enum PlanError {
    Problem(CheckpointError),
    /// libtorch failed while building a tensor (out of memory on the device, say).
    Torch(Error),
}

impl From<CheckpointError> for PlanError {
    fn from(p: CheckpointError) -> Self {
        PlanError::Problem(p)
    }
}

impl From<tch::TchError> for PlanError {
    fn from(e: tch::TchError) -> Self {
        PlanError::Torch(e.into())
    }
}

/// Checks the parsed checkpoint against the router (and the model) and builds every tensor to
/// restore; changes nothing.
fn plan<R: Router + ?Sized>(
    parsed: &Parsed<'_>,
    router: &R,
    vs: Option<&nn::VarStore>,
) -> std::result::Result<Plan, PlanError> {
    use CheckpointError as E;
    let meta = &parsed.meta;
    let current_rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    let saved_fingerprint = parse_fingerprint(&meta.fingerprint)?;
    if saved_fingerprint != router.fingerprint() || meta.rules != current_rules {
        return Err(E::RulesDiffer {
            saved_fingerprint,
            current_fingerprint: router.fingerprint(),
            saved: meta.rules.clone(),
            current: current_rules,
        }
        .into());
    }
    check_routes(meta, router)?;
    if meta.optimizers.len() != current_rules.len() {
        return Err(E::Malformed(format!(
            "{} optimizers for {} rules",
            meta.optimizers.len(),
            current_rules.len()
        ))
        .into());
    }
    // Every tensor the metadata lists must be claimed by exactly one optimizer state or model
    // variable; unclaimed ones are extra data we refuse to ignore.
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut optimizers = Vec::with_capacity(meta.optimizers.len());
    for (rule, saved) in meta.optimizers.iter().enumerate() {
        let opt = router.optimizer(rule).ok_or_else(|| E::OptimizerMismatch {
            rule,
            reason: "this router has no optimizer for it".into(),
        })?;
        optimizers.push(plan_optimizer(parsed, rule, saved, opt, &mut claimed)?);
    }
    let model = match (vs, &meta.model) {
        (None, Some(saved)) => {
            // Not restored, but part of the file: account for it.
            for m in saved {
                let key = format!("{MODEL_PREFIX}{}", m.name);
                let Some((key, _)) = meta.tensors.get_key_value(&key) else {
                    return Err(E::Malformed(format!("tensor `{key}` is missing")).into());
                };
                claimed.insert(key.as_str());
            }
            Vec::new()
        }
        (None, None) => Vec::new(),
        (Some(_), None) => return Err(E::NoModel.into()),
        (Some(vs), Some(saved)) => plan_model(parsed, vs, saved, &mut claimed)?,
    };
    if let Some(extra) = meta.tensors.keys().find(|k| !claimed.contains(k.as_str())) {
        return Err(E::Malformed(format!("tensor `{extra}` belongs to no variable")).into());
    }
    Ok(Plan { optimizers, model })
}

fn check_routes<R: Router + ?Sized>(
    meta: &Meta,
    router: &R,
) -> std::result::Result<(), CheckpointError> {
    use CheckpointError as E;
    let current = router.routing_table().routes();
    let saved: HashMap<&str, &SavedRoute> =
        meta.routes.iter().map(|r| (r.variable.as_str(), r)).collect();
    if saved.len() != meta.routes.len() {
        return Err(E::Malformed("a variable is listed twice in the routing table".into()));
    }
    for route in current {
        let Some(s) = saved.get(route.variable.as_str()) else {
            return Err(E::MissingVariable { variable: route.variable.clone() });
        };
        let now = SavedRoute {
            variable: route.variable.clone(),
            shape: route.shape.clone(),
            dtype: dtype_name(route.kind).to_string(),
            bits: route.bits,
            rule: route.rule,
        };
        if **s != now {
            return Err(E::VariableMismatch {
                variable: route.variable.clone(),
                saved: describe_route(s),
                current: describe_route(&now),
            });
        }
    }
    if let Some(extra) =
        meta.routes.iter().find(|s| !current.iter().any(|r| r.variable == s.variable))
    {
        return Err(E::UnexpectedVariable { variable: extra.variable.clone() });
    }
    Ok(())
}

fn describe_route(r: &SavedRoute) -> String {
    let rule = match r.rule {
        Some(i) => format!("rule {i}"),
        None => "untrained".to_string(),
    };
    format!(
        "{} {:?}, {} bit{}, {rule}",
        r.dtype,
        r.shape,
        r.bits,
        if r.bits == 1 { "" } else { "s" }
    )
}

fn plan_optimizer<'a>(
    parsed: &'a Parsed<'_>,
    rule: usize,
    saved: &'a SavedOptimizer,
    opt: &dyn Optimizer,
    claimed: &mut BTreeSet<&'a str>,
) -> std::result::Result<OptimizerPlan, PlanError> {
    use CheckpointError as E;
    let mismatch = |reason: String| PlanError::Problem(E::OptimizerMismatch { rule, reason });
    if saved.rule != rule {
        return Err(mismatch(format!("listed as rule {}", saved.rule)));
    }
    if saved.optimizer != opt.name() {
        return Err(mismatch(format!(
            "checkpoint has a {} optimizer, this router a {}",
            saved.optimizer,
            opt.name()
        )));
    }
    // Hyperparameters: the same names; constants restored; schedules must agree.
    let hp_error = |name: &str, reason: String| {
        PlanError::Problem(E::Hyperparameter {
            rule,
            optimizer: opt.name().to_string(),
            name: name.to_string(),
            reason,
        })
    };
    let names = opt.hyperparameter_names();
    if let Some(extra) = saved.hyperparameters.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(hp_error(extra, format!("{} has no such hyperparameter", opt.name())));
    }
    let mut constants = Vec::new();
    for &name in names {
        let Some(hp) = saved.hyperparameters.get(name) else {
            return Err(hp_error(name, "missing from the checkpoint".into()));
        };
        let current = opt.schedule(name).map_err(|e| hp_error(name, e.to_string()))?;
        match hp {
            SavedHyperparameter::Constant { value, bits } => {
                let v = parse_hex64(bits).map(f64::from_bits).ok_or_else(|| {
                    hp_error(name, format!("bits `{bits}` are not 16 hex digits"))
                })?;
                if format!("{v:?}") != *value {
                    return Err(hp_error(
                        name,
                        format!("value `{value}` disagrees with its bits ({v:?})"),
                    ));
                }
                constants.push((name, v));
            }
            SavedHyperparameter::Schedule { description } => {
                let now = format!("{current:?}");
                if now != *description {
                    return Err(hp_error(
                        name,
                        format!(
                            "the checkpoint was written with schedule `{description}`, this router \
                             has `{now}`; schedules are not stored, set the same one before loading"
                        ),
                    ));
                }
            }
        }
    }
    // Variables: the same set, by name.
    let params = opt.params();
    let index_of: HashMap<&str, usize> =
        params.iter().enumerate().map(|(i, p)| (p.info.name.as_str(), i)).collect();
    if saved.variables.len() != params.len() {
        let saved_names: BTreeSet<&str> = saved.variables.iter().map(|v| v.name.as_str()).collect();
        if let Some(p) = params.iter().find(|p| !saved_names.contains(p.info.name.as_str())) {
            return Err(E::MissingVariable { variable: p.info.name.clone() }.into());
        }
        return Err(mismatch(format!(
            "{} variables in the checkpoint, {} here",
            saved.variables.len(),
            params.len()
        )));
    }
    let mut states: Vec<Option<Vec<(String, Tensor)>>> = (0..params.len()).map(|_| None).collect();
    let builtin = BUILT_IN.contains(&opt.name());
    for var in &saved.variables {
        let Some(&index) = index_of.get(var.name.as_str()) else {
            return Err(E::UnexpectedVariable { variable: var.name.clone() }.into());
        };
        if states[index].is_some() {
            return Err(E::Malformed(format!(
                "variable `{}` is listed twice in rule {rule}",
                var.name
            ))
            .into());
        }
        let param = &params[index];
        let bad_state = |state: &str, reason: String| {
            PlanError::Problem(E::BadState {
                rule,
                variable: var.name.clone(),
                state: state.to_string(),
                reason,
            })
        };
        let mut restored = Vec::with_capacity(var.states.len());
        for state in &var.states {
            if !opt.state_names().contains(&state.as_str()) {
                return Err(bad_state(
                    state,
                    format!("{} keeps no state of that name", opt.name()),
                ));
            }
            if restored.iter().any(|(n, _): &(String, Tensor)| n == state) {
                return Err(bad_state(state, "listed twice".into()));
            }
            let key = state_key(rule, &var.name, state);
            let Some((key, saved_tensor)) = parsed.meta.tensors.get_key_value(&key) else {
                return Err(bad_state(state, format!("tensor `{key}` is missing")));
            };
            let (kind, shape) = (param.tensor.kind(), param.tensor.size());
            if builtin {
                let (want_kind, want_shape) =
                    if state == "step" { (Kind::Int64, Vec::new()) } else { (kind, shape.clone()) };
                if saved_tensor.dtype != dtype_name(want_kind) || saved_tensor.shape != want_shape {
                    return Err(bad_state(
                        state,
                        format!(
                            "{} {:?} in the checkpoint, expected {} {:?}",
                            saved_tensor.dtype,
                            saved_tensor.shape,
                            dtype_name(want_kind),
                            want_shape
                        ),
                    ));
                }
            }
            let cpu = tensor_from_file(parsed, key)?;
            if builtin && state == "step" && cpu.f_int64_value(&[])? < 0 {
                return Err(bad_state(state, "negative step count".into()));
            }
            claimed.insert(key.as_str());
            // Built here, on the variable's device, so that an out-of-memory error happens
            // before anything is changed.
            restored.push((state.clone(), cpu.f_to_device(param.tensor.device())?));
        }
        states[index] = Some(restored);
    }
    Ok(OptimizerPlan {
        rule,
        step_count: saved.step_count,
        constants,
        states: states.into_iter().map(Option::unwrap_or_default).collect(),
    })
}

/// A tensor of the (already checksummed) file, as a new CPU tensor.
fn tensor_from_file(parsed: &Parsed<'_>, key: &str) -> std::result::Result<Tensor, PlanError> {
    let malformed = |why: &str| {
        PlanError::Problem(CheckpointError::Malformed(format!("tensor `{key}`: {why}")))
    };
    let view = parsed.file.tensor(key).map_err(|_| malformed("not in the file"))?;
    let kind = Kind::try_from(view.dtype()).map_err(|_| malformed("unsupported dtype"))?;
    let shape = view
        .shape()
        .iter()
        .map(|&d| i64::try_from(d).ok())
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| malformed("dimension too large"))?;
    // tch copies `numel * element size` bytes without checking the slice: check it here.
    let numel = view.shape().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes())) != Some(view.data().len()) {
        return Err(malformed("byte length disagrees with its shape"));
    }
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

fn plan_model<'a>(
    parsed: &'a Parsed<'_>,
    vs: &nn::VarStore,
    saved: &'a [SavedModelVar],
    claimed: &mut BTreeSet<&'a str>,
) -> std::result::Result<Vec<(Tensor, Tensor)>, PlanError> {
    use CheckpointError as E;
    let current = named_variables(vs);
    let model_error = |variable: &str, reason: String| {
        PlanError::Problem(E::ModelVariable { variable: variable.to_string(), reason })
    };
    let saved_names: BTreeSet<&str> = saved.iter().map(|m| m.name.as_str()).collect();
    if saved_names.len() != saved.len() {
        return Err(E::Malformed("a model variable is listed twice".into()).into());
    }
    let mut missing: Vec<&String> =
        current.keys().filter(|n| !saved_names.contains(n.as_str())).collect();
    missing.sort();
    if let Some(name) = missing.first() {
        return Err(model_error(name, "in the model but missing from the checkpoint".into()));
    }
    let mut out = Vec::with_capacity(saved.len());
    for m in saved {
        let Some(var) = current.get(&m.name) else {
            return Err(model_error(&m.name, "in the checkpoint but not in the model".into()));
        };
        let key = format!("{MODEL_PREFIX}{}", m.name);
        let Some((key, t)) = parsed.meta.tensors.get_key_value(&key) else {
            return Err(model_error(&m.name, format!("tensor `{key}` is missing")));
        };
        let (kind, shape) = (var.kind(), var.size());
        if t.dtype != dtype_name(kind)
            || t.shape != shape
            || m.dtype != t.dtype
            || m.shape != t.shape
        {
            return Err(model_error(
                &m.name,
                format!(
                    "{} {:?} in the checkpoint, {} {:?} in the model",
                    t.dtype,
                    t.shape,
                    dtype_name(kind),
                    shape
                ),
            ));
        }
        let value = tensor_from_file(parsed, key)?.f_to_device(var.device())?;
        claimed.insert(key.as_str());
        out.push((var.shallow_clone(), value));
    }
    Ok(out)
}

/// How to put one optimizer back as it was.
struct Undo {
    rule: usize,
    step_count: u64,
    schedules: Vec<(&'static str, Schedule)>,
    states: Vec<Vec<(String, Tensor)>>,
}

/// Applies a validated plan. Optimizers validate what they are given once more; should one
/// refuse (it cannot for the built-in ones after the checks above), every optimizer already
/// changed is restored from handles to its previous state.
fn apply<R: Router + ?Sized>(
    router: &mut R,
    plan: Plan,
) -> std::result::Result<(), CheckpointError> {
    let mut journal: Vec<Undo> = Vec::with_capacity(plan.optimizers.len());
    for op in plan.optimizers {
        let rule = op.rule;
        let Some(opt) = router.optimizer_mut(rule) else {
            rollback(router, journal);
            return Err(CheckpointError::Rejected { rule, reason: "no optimizer".into() });
        };
        let mut undo = Undo {
            rule,
            step_count: opt.step_count(),
            schedules: Vec::with_capacity(op.constants.len()),
            states: (0..opt.params().len())
                .map(|i| opt.state(i).into_iter().map(|(n, t)| (n.to_string(), t)).collect())
                .collect(),
        };
        let mut result = Ok(());
        for (name, value) in op.constants {
            match opt.schedule(name) {
                Ok(s) => undo.schedules.push((name, s.clone())),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Err(e) = opt.set_hyperparameter(name, Schedule::Constant(value)) {
                undo.schedules.pop();
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            for (index, state) in op.states.into_iter().enumerate() {
                if let Err(e) = opt.set_state(index, state) {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            opt.set_step_count(op.step_count);
        }
        journal.push(undo);
        if let Err(e) = result {
            rollback(router, journal);
            return Err(CheckpointError::Rejected { rule, reason: e.to_string() });
        }
    }
    let _guard = tch::no_grad_guard();
    for (mut var, value) in plan.model {
        // Same shape, dtype and device, checked above: the copy cannot fail short of a libtorch
        // fault. Should it fail anyway, the optimizers are rolled back and the error says so.
        if let Err(e) = var.f_copy_(&value) {
            rollback(router, journal);
            return Err(CheckpointError::Rejected {
                rule: 0,
                reason: format!(
                    "copying a model variable failed ({e}); model variables may be partly restored"
                ),
            });
        }
    }
    Ok(())
}

fn rollback<R: Router + ?Sized>(router: &mut R, journal: Vec<Undo>) {
    for undo in journal.into_iter().rev() {
        if let Some(opt) = router.optimizer_mut(undo.rule) {
            for (name, schedule) in undo.schedules.into_iter().rev() {
                let _ = opt.set_hyperparameter(name, schedule);
            }
            for (index, state) in undo.states.into_iter().enumerate() {
                let _ = opt.set_state(index, state);
            }
            opt.set_step_count(undo.step_count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_round_trip_exactly_through_their_bits() {
        for v in [0.01, 1e-8, 0.1 + 0.2, f64::MIN_POSITIVE, 123456.789e-300] {
            let SavedHyperparameter::Constant { value, bits } =
                save_schedule(&Schedule::Constant(v))
            else {
                panic!("a constant is saved as a constant");
            };
            assert_eq!(
                f64::from_bits(u64::from_str_radix(&bits, 16).unwrap()).to_bits(),
                v.to_bits()
            );
            assert_eq!(value, format!("{v:?}"));
        }
        let s = Schedule::cosine(0.1, 100);
        assert!(
            matches!(save_schedule(&s), SavedHyperparameter::Schedule { description } if description == format!("{s:?}"))
        );
    }

    #[test]
    fn fingerprints_are_sixteen_hex_digits() {
        assert_eq!(parse_fingerprint("00000000000000ff"), Ok(255));
        assert!(parse_fingerprint("ff").is_err());
        assert!(parse_fingerprint("+00000000000000f").is_err());
        assert!(parse_fingerprint("zzzzzzzzzzzzzzzz").is_err());
    }

    /// A file with one f32 tensor `w` and `metadata`.
    fn encode(metadata: &BTreeMap<&str, String>) -> Vec<u8> {
        let blob = Blob { dtype: Dtype::F32, shape: vec![1], bytes: vec![0; 4] };
        let mut out = Vec::new();
        write_safetensors(&mut out, &BTreeMap::from([("w".to_string(), blob)]), metadata).unwrap();
        out
    }

    #[test]
    fn the_writer_produces_what_safetensors_reads_even_without_tensors() {
        let metadata = BTreeMap::from([("k", "v".to_string())]);
        for blobs in [
            BTreeMap::new(),
            BTreeMap::from([
                ("b".to_string(), Blob { dtype: Dtype::F32, shape: vec![3], bytes: vec![1; 12] }),
                ("a".to_string(), Blob { dtype: Dtype::I64, shape: vec![], bytes: vec![2; 8] }),
                ("z".to_string(), Blob { dtype: Dtype::F64, shape: vec![0], bytes: vec![] }),
            ]),
        ] {
            let mut out = Vec::new();
            write_safetensors(&mut out, &blobs, &metadata).unwrap();
            let (header_len, header) = SafeTensors::read_metadata(&out).unwrap();
            assert_eq!(header_len % 8, 0);
            assert_eq!(header.metadata().as_ref().and_then(|m| m.get("k")).unwrap(), "v");
            let file = SafeTensors::deserialize(&out).unwrap();
            assert_eq!(file.len(), blobs.len());
            for (name, blob) in &blobs {
                let view = file.tensor(name).unwrap();
                assert_eq!(
                    (view.dtype(), view.shape(), view.data()),
                    (blob.dtype, &blob.shape[..], &blob.bytes[..])
                );
                // Aligned to the element size from the start of the data.
                let start = view.data().as_ptr() as usize - out[8 + header_len..].as_ptr() as usize;
                assert_eq!(start % blob.dtype.size(), 0);
            }
        }
    }

    #[test]
    fn other_files_are_typed_errors() {
        assert!(matches!(parse(b""), Err(CheckpointError::NotSafetensors(_))));
        assert!(matches!(
            parse(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Err(CheckpointError::NotSafetensors(_))
        ));
        // A valid safetensors file without caseopt's metadata.
        let plain = encode(&BTreeMap::new());
        assert!(matches!(parse(&plain), Err(CheckpointError::NotACheckpoint(_))));
        // Cut short.
        assert!(matches!(parse(&plain[..plain.len() - 1]), Err(CheckpointError::Truncated(_))));
    }

    #[test]
    fn metadata_checksum_and_version_are_checked() {
        let write = |json: &str, crc: u32| {
            encode(&BTreeMap::from([
                (METADATA_KEY, json.to_string()),
                (METADATA_CRC_KEY, crc.to_string()),
            ]))
        };
        let json = r#"{"format":"caseopt-checkpoint","version":2}"#;
        let file = write(json, crc32fast::hash(json.as_bytes()));
        assert_eq!(
            parse(&file).err(),
            Some(CheckpointError::UnsupportedVersion { found: 2, supported: 1 })
        );
        let file = write(json, crc32fast::hash(json.as_bytes()) ^ 1);
        assert!(matches!(parse(&file), Err(CheckpointError::ChecksumMismatch { .. })));
        let json = r#"{"format":"something-else","version":1}"#;
        let file = write(json, crc32fast::hash(json.as_bytes()));
        assert!(matches!(parse(&file), Err(CheckpointError::NotACheckpoint(_))));
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file_on_error() {
        let dir = std::env::temp_dir().join(format!("caseopt-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("ckpt.safetensors");
        fs::write(&target, b"old").unwrap();
        let err = write_atomically(&target, |file| {
            file.write_all(b"half")?;
            Err(std::io::Error::other("simulated failure"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "the temporary file was removed");
        write_atomically(&target, |file| file.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
