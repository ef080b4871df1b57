//! What a training run depends on, kept in the model's `VarStore` as the non-trainable int64
//! variable `run.state`, so that `caseopt::save_training` writes it into the same atomic file as
//! the weights and the optimizers' state: a checkpoint can never hold one without the other.
//!
//! Routers route only trainable variables, so `run.state` is in no routing table and no
//! optimizer sees it; no layer reads it, so it cannot change the model's results.
//!
//! Resuming replays the uninterrupted run's use of libtorch's global generator instead of
//! storing the generator (whose state is device-specific and opaque): seed it, build the model
//! (which draws its initial kernels), then draw and discard one epoch order per finished epoch.
//! That needs the seed, the data (which fixes the model's shapes: image size and classes), the
//! number of training images (the length of each permutation) and the finished epochs, all
//! stored here, so a resumed run continues with the very numbers an uninterrupted one would
//! have used. The recipe is stored too: a run is never continued with another optimizer; and
//! the precision: a run is never continued in another.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};
use tch::{nn, Kind, Tensor};

use crate::recipe::{Precision, Recipe};

/// The variable's name in the `VarStore` (and `model/run.state` in the checkpoint file).
pub const VARIABLE: &str = "run.state";
/// Bumped whenever the layout of the stored integers changes (2: the recipe was added; 3: the
/// world size; 4: the precision).
const LAYOUT_VERSION: i64 = 4;
/// Number of stored integers: the layout version and the ten fields of [`RunState`].
const LEN: usize = 11;

/// The settings a run's results depend on, and how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    /// Epochs finished (and saved).
    pub epochs_done: u32,
    /// Images per optimizer step.
    pub batch_size: i64,
    /// Training images per epoch (after `--train-images`).
    pub train_images: i64,
    /// Number of classes (the last layer's width).
    pub classes: u32,
    /// Batches the batch norms' statistics are re-estimated on after each epoch (0: never);
    /// the re-estimated statistics carry into the next epoch's running averages.
    pub precise_bn_batches: i64,
    /// The seed of libtorch's generator.
    pub seed: i64,
    /// FNV-1a 64 of the data set's four files (see `idx::IdxSet::identity`).
    pub data: u64,
    /// How the binary kernels are trained (`--recipe`).
    pub recipe: Recipe,
    /// Processes the global batches are split over (`--world-size`): each rank's batch norms
    /// see its own slice, so another split trains differently.
    pub world_size: u32,
    /// The forward and backward passes' precision (`--precision`).
    pub precision: Precision,
}

/// Why a run cannot resume from a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The checkpoint itself is unreadable or damaged.
    #[error(transparent)]
    Checkpoint(#[from] caseopt::Error),
    /// A valid checkpoint without this example's run state.
    #[error("{}: no `{VARIABLE}` variable: not written by this example's `--checkpoint` (or by an older version of it), so what it was trained with is unknown", path.display())]
    NoRunState { path: PathBuf },
    /// A run state this version cannot read.
    #[error("{}: `{VARIABLE}` is malformed ({problem})", path.display())]
    Malformed { path: PathBuf, problem: String },
    /// Settings that differ from the checkpoint's, each with both values.
    #[error("cannot resume from {}: {}", path.display(), mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Settings { path: PathBuf, mismatches: Vec<Mismatch> },
    /// `--epochs` asks for fewer epochs than the checkpoint has.
    #[error("{}: the checkpoint has already trained {done} epoch(s), more than `--epochs {epochs}`; pass `--epochs {done}` (to evaluate it) or more", path.display())]
    EpochsBelow { path: PathBuf, done: u32, epochs: u32 },
    /// The optimizers' step count disagrees with the recorded epochs.
    #[error("{}: the optimizers took {steps} steps, but {done} epoch(s) of {per_epoch} steps make {}", path.display(), u64::from(*done) * per_epoch)]
    StepCount { path: PathBuf, steps: u64, done: u32, per_epoch: u64 },
}

/// One setting that differs between a checkpoint and this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The command-line option, e.g. `--batch-size`.
    pub setting: &'static str,
    /// Its value (or effect) in the checkpoint's run.
    pub checkpoint: String,
    /// Its value in this run.
    pub now: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` differs: the checkpoint's run had {}, this run has {}",
            self.setting, self.checkpoint, self.now
        )
    }
}

impl RunState {
    fn to_values(self) -> [i64; LEN] {
        [
            LAYOUT_VERSION,
            i64::from(self.epochs_done),
            self.batch_size,
            self.train_images,
            i64::from(self.classes),
            self.precise_bn_batches,
            self.seed,
            // The bit pattern: an i64 holds every u64 hash exactly.
            self.data as i64,
            self.recipe.code(),
            i64::from(self.world_size),
            self.precision.code(),
        ]
    }

    fn from_values(v: &[i64]) -> Result<RunState, String> {
        let &[version, epochs_done, batch_size, train_images, classes, precise, seed, data, recipe, world, precision] =
            v
        else {
            return Err(format!("{} integers, expected {LEN}", v.len()));
        };
        if version != LAYOUT_VERSION {
            return Err(format!("layout version {version}, this build reads {LAYOUT_VERSION}"));
        }
        let epochs_done =
            u32::try_from(epochs_done).map_err(|_| format!("epoch count {epochs_done}"))?;
        let classes = u32::try_from(classes).map_err(|_| format!("class count {classes}"))?;
        let recipe = Recipe::from_code(recipe).ok_or_else(|| format!("recipe code {recipe}"))?;
        let world_size = u32::try_from(world).map_err(|_| format!("world size {world}"))?;
        let precision =
            Precision::from_code(precision).ok_or_else(|| format!("precision code {precision}"))?;
        Ok(RunState {
            epochs_done,
            batch_size,
            train_images,
            classes,
            precise_bn_batches: precise,
            seed,
            data: data as u64,
            recipe,
            world_size,
            precision,
        })
    }

    /// Whether a run with the settings of `now` may continue from `self` (a checkpoint's state)
    /// up to `epochs` epochs; every differing setting is named at once.
    pub fn check_resumable(
        &self,
        path: &Path,
        now: &RunState,
        epochs: u32,
    ) -> Result<(), ResumeError> {
        let mut mismatches = Vec::new();
        let mut differ = |setting, same: bool, checkpoint: String, current: String| {
            if !same {
                mismatches.push(Mismatch { setting, checkpoint, now: current });
            }
        };
        let (a, b) = (self.recipe, now.recipe);
        differ("--recipe", a == b, a.name().to_string(), b.name().to_string());
        let (a, b) = (self.precision, now.precision);
        differ("--precision", a == b, a.name().to_string(), b.name().to_string());
        let (a, b) = (self.world_size, now.world_size);
        differ("--world-size", a == b, a.to_string(), b.to_string());
        let hash = |h: u64| format!("data with FNV-1a {h:#018x}");
        differ("--data", self.data == now.data, hash(self.data), hash(now.data));
        let (a, b) = (self.classes, now.classes);
        differ("--classes", a == b, a.to_string(), b.to_string());
        let (a, b) = (self.batch_size, now.batch_size);
        differ("--batch-size", a == b, a.to_string(), b.to_string());
        let (a, b) = (self.train_images, now.train_images);
        let images = |n: i64| format!("{n} training images per epoch");
        differ("--train-images", a == b, images(a), images(b));
        let (a, b) = (self.seed, now.seed);
        differ("--seed", a == b, a.to_string(), b.to_string());
        let (a, b) = (self.precise_bn_batches, now.precise_bn_batches);
        let batches = |n: i64| format!("{n} re-estimation batches");
        differ("--precise-bn-batches", a == b, batches(a), batches(b));
        if !mismatches.is_empty() {
            return Err(ResumeError::Settings { path: path.to_path_buf(), mismatches });
        }
        if epochs < self.epochs_done {
            return Err(ResumeError::EpochsBelow {
                path: path.to_path_buf(),
                done: self.epochs_done,
                epochs,
            });
        }
        Ok(())
    }
}

/// The `run.state` variable of a `VarStore`.
#[derive(Debug)]
pub struct RunStateVar {
    tensor: Tensor,
}

impl RunStateVar {
    /// Adds `run.state` (not trainable) under `root`. It draws no random numbers.
    pub fn register(root: &nn::Path) -> Result<RunStateVar, tch::TchError> {
        let zeros = Tensor::f_zeros([LEN as i64], (Kind::Int64, root.device()))?;
        Ok(RunStateVar { tensor: root.sub("run").add("state", zeros, false) })
    }

    /// Stores `state`, to be written by the next `save_training`.
    pub fn set(&self, state: &RunState) -> Result<(), tch::TchError> {
        let values = Tensor::f_from_slice(&state.to_values())?;
        let mut tensor = self.tensor.shallow_clone();
        tch::no_grad(|| tensor.f_copy_(&values))
    }
}

/// Reads the run state of the checkpoint at `path` without loading anything, after checking the
/// file's integrity (`caseopt::checkpoint_info` verifies every checksum), so that a resume with
/// other settings is refused by name before shapes or optimizer states are compared.
pub fn read_checkpoint(path: &Path) -> Result<RunState, ResumeError> {
    let info = caseopt::checkpoint_info(path)?;
    if !info.model_variables.iter().any(|v| v == VARIABLE) {
        return Err(ResumeError::NoRunState { path: path.to_path_buf() });
    }
    let malformed = |problem: String| ResumeError::Malformed { path: path.to_path_buf(), problem };
    let bytes = std::fs::read(path).map_err(|e| malformed(e.to_string()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| malformed(format!("{e:?}")))?;
    // `caseopt::save_training` stores the model's variables under `model/<name>`.
    let view =
        file.tensor(&format!("model/{VARIABLE}")).map_err(|e| malformed(format!("{e:?}")))?;
    if view.dtype() != Dtype::I64 || view.shape() != [LEN] {
        return Err(malformed(format!(
            "{:?} {:?}, expected I64 [{LEN}]",
            view.dtype(),
            view.shape()
        )));
    }
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    RunState::from_values(&values).map_err(malformed)
}

/// Checks that the router's step count is what `state.epochs_done` epochs of `per_epoch` steps
/// make: a last line of defence against a checkpoint whose run state and optimizers disagree.
pub fn check_steps(
    path: &Path,
    state: &RunState,
    steps: u64,
    per_epoch: u64,
) -> Result<(), ResumeError> {
    if steps != u64::from(state.epochs_done) * per_epoch {
        return Err(ResumeError::StepCount {
            path: path.to_path_buf(),
            steps,
            done: state.epochs_done,
            per_epoch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RunState {
        RunState {
            epochs_done: 2,
            batch_size: 64,
            train_images: 60000,
            classes: 10,
            precise_bn_batches: 100,
            seed: -42,
            data: 0xfedc_ba98_7654_3210,
            recipe: Recipe::LatentAdam,
            world_size: 2,
            precision: Precision::Bf16,
        }
    }

    #[test]
    fn values_round_trip_exactly() {
        let s = state();
        assert_eq!(RunState::from_values(&s.to_values()), Ok(s));
        let mut v = s.to_values();
        v[0] = 1;
        assert!(RunState::from_values(&v).unwrap_err().contains("layout version 1"));
        assert!(RunState::from_values(&v[..3]).is_err());
    }

    #[test]
    fn every_differing_setting_is_named() {
        let saved = state();
        let now = RunState {
            batch_size: 32,
            seed: 7,
            epochs_done: 0,
            recipe: Recipe::Bop,
            world_size: 1,
            precision: Precision::F32,
            ..saved
        };
        let e = saved.check_resumable(Path::new("ck"), &now, 3).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("`--batch-size` differs") && text.contains("`--seed` differs"),
            "{text}"
        );
        assert!(
            text.contains(
                "`--recipe` differs: the checkpoint's run had latent-adam, this run has bop"
            ),
            "{text}"
        );
        assert!(text.contains("`--world-size` differs: the checkpoint's run had 2, this run has 1"));
        assert!(
            text.contains("`--precision` differs: the checkpoint's run had bf16, this run has f32")
        );
        assert!(!text.contains("--data"), "{text}");
        let e = saved.check_resumable(Path::new("ck"), &RunState { epochs_done: 0, ..saved }, 1);
        assert!(matches!(e, Err(ResumeError::EpochsBelow { done: 2, epochs: 1, .. })));
        assert!(saved.check_resumable(Path::new("ck"), &saved, 2).is_ok());
    }
}
