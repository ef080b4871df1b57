//! Fused multi-tensor CPU kernels: one pass over all of an optimizer's variables, each element
//! read and written once, the work split across libtorch's own intra-op threads.
//!
//! This is the only module of the crate with `unsafe` code, and `shim/` beside it the only C++.
//! It turns tensors into slices, one job per file:
//!
//! - [`metadata`]: tensor metadata in bulk, one foreign call for a whole list
//!   (`shim/metadata.cpp`);
//! - [`admit`]: which variables the kernels take (CPU, `f32`/`f64`, contiguous, aligned, of the
//!   variable's length), turning each into a job of validated addresses or an [`Unfit`] reason;
//! - [`alias`]: the proof that no memory a pass writes is touched by another operand, before
//!   any `&mut` slice exists;
//! - [`split`]: how many threads a pass pays for and each thread's share of the elements;
//! - [`pool`]: running those shares on libtorch's thread pool (`shim/parallel.cpp`);
//! - [`isa`]: the instruction set the loops are compiled for, chosen once per pass;
//! - [`batch`]: the pass itself ([`Batch::queue`](batch::Batch::queue),
//!   [`Batch::run`](batch::Batch::run));
//! - [`math`] and [`ops`]: the update rules, safe code over slices, and the optimizers'
//!   kernels built on them;
//! - [`stage`] and [`storage`]: Bop steps staged for the router's non-finite check and
//!   committed by exchanging two storages' memory (`shim/storage.cpp`);
//! - [`version`]: the version counters of the tensors a pass wrote, bumped after it as an
//!   in-place libtorch op bumps them (`shim/version.cpp`);
//! - [`finite`]: the router's NaN/infinity scan over many gradients;
//! - [`aten`]: ATen's own `add`, `addcmul` and `addcdiv` with the scalars tch cannot pass, for
//!   the optimizers' libtorch path, and the CPU capability ATen runs with (`shim/aten.cpp`,
//!   compiled with or without the `fused` feature).
//!
//! Anything a batch does not accept (CUDA, half precision, a strided view, a gradient that
//! aliases its parameter, ...) is reported back as [`Unfit`] and the optimizer uses its libtorch
//! ops instead, or fails when the fused path was forced.
//!
//! Without the `fused` cargo feature none of that is compiled but [`aten`]: [`unfused`] stands
//! in with the same crate-internal API, refusing every variable ([`Unfit::NotBuilt`]) and
//! scanning no gradient, so that every optimizer and the router take their libtorch paths, and
//! metadata is read through tch's accessors.
//!
//! Writes go straight to the tensors' memory, which ATen does not see; so once a pass has
//! written, it bumps the version counter of every tensor it wrote ([`version`]), as the in-place
//! ops of the libtorch path do: a graph that saved a parameter before the step then fails in
//! `backward` exactly as it does on torch's path, instead of differentiating through the new
//! values.
//!
//! The one buffer that holds many variables' states is called the *state buffer* throughout
//! (its second copy, written by a staged step, the *second copy*).

// Without the kernels the optimizers still name theirs (`ops`, over `math`), and those rules
// keep their unit tests, but nothing runs them.
#![cfg_attr(not(feature = "fused"), allow(dead_code))]

pub(crate) mod amp;
pub(crate) mod aten;
pub(crate) mod math;
pub(crate) mod metadata;
pub(crate) mod multi;
pub(crate) mod ops;

#[cfg(feature = "fused")]
mod admit;
#[cfg(feature = "fused")]
mod alias;
#[cfg(feature = "fused")]
mod batch;
#[cfg(feature = "fused")]
pub(crate) mod finite;
#[cfg(feature = "fused")]
mod isa;
#[cfg(feature = "fused")]
mod pool;
#[cfg(feature = "fused")]
mod split;
#[cfg(feature = "fused")]
pub(crate) mod stage;
#[cfg(feature = "fused")]
mod storage;
#[cfg(feature = "fused")]
mod version;
#[cfg(all(test, feature = "fused"))]
pub(crate) use batch::lent_queues;
#[cfg(feature = "fused")]
pub(crate) use batch::Workspace;

#[cfg(not(feature = "fused"))]
mod unfused;
#[cfg(not(feature = "fused"))]
pub(crate) use unfused::{finite, stage, Workspace};

use tch::{Device, Kind, Tensor};

use crate::optim::Sqrt;
use math::Real;

/// The largest number of state tensors a kernel updates besides the parameter (Adam with
/// AMSGrad: `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`).
pub(crate) const MAX_STATES: usize = 3;

/// Why a variable cannot take the fused path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Unfit {
    /// Not on the CPU (`None`: a device tch cannot name).
    Device(Option<Device>),
    /// An element type without a kernel.
    Kind(Kind),
    /// Operands of different element types (the gradient's is checked earlier; this is state).
    KindMismatch { operand: &'static str, kind: Kind },
    /// A strided, non-contiguous operand.
    NotContiguous(&'static str),
    /// An operand whose element count differs from the parameter's.
    Length { operand: &'static str, len: usize, expected: usize },
    /// An operand whose address is not aligned for its element type.
    Misaligned(&'static str),
    /// Two operands share memory that one of them writes; the index of one variable involved.
    Overlap(usize),
    /// Anything else the kernels do not handle (an undefined or sparse tensor, ...).
    Unsupported(&'static str),
    /// The gradient does not match its parameter (shape, dtype or device): not a reason to
    /// fall back but an error, as `optim::check_grad` reports it.
    Grad(String),
    /// The crate was built without the fused kernels.
    #[cfg(not(feature = "fused"))]
    NotBuilt,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Device(Some(d)) => {
                write!(f, "the fused kernels run on the CPU, the variable is on {d:?}")
            }
            Unfit::Device(None) => {
                write!(f, "the fused kernels run on the CPU, the variable is on another device")
            }
            Unfit::Kind(k) => {
                write!(f, "the fused kernels take f32 and f64, the variable is {k:?}")
            }
            Unfit::KindMismatch { operand, kind } => {
                write!(f, "`{operand}` is {kind:?}, unlike the variable")
            }
            Unfit::NotContiguous(op) => write!(f, "`{op}` is not contiguous"),
            Unfit::Length { operand, len, expected } => {
                write!(f, "`{operand}` holds {len} elements, the variable {expected}")
            }
            Unfit::Misaligned(op) => write!(f, "`{op}` is not aligned for its element type"),
            Unfit::Overlap(_) => {
                write!(
                    f,
                    "it shares memory with another operand of the step, which the update writes"
                )
            }
            Unfit::Unsupported(what) => write!(f, "the fused kernels do not take {what}"),
            Unfit::Grad(reason) => write!(f, "{reason}"),
            #[cfg(not(feature = "fused"))]
            Unfit::NotBuilt => write!(f, "caseopt was built without the `fused` feature"),
        }
    }
}

/// A kernel: the update of one variable's elements, in either element type (implemented in
/// [`ops`], and by an optimizer's own file where it has the kernel to itself, as Lion's).
pub trait Kernel: Sync {
    /// Updates one contiguous run of one variable: `p` and `g` are the same length, and so is
    /// each of the first [`states`](Kernel::states) slices of `states` (the rest are empty).
    /// `scalars` are the job's per-variable scalars; `clip` its constraint, which a kernel
    /// whose new values can leave `[-clip, clip]` applies before it stores them (infinity:
    /// none; Bop's kernels write +-1, which their optimizer constrains). Returns how many
    /// weights changed sign (counted by Bop's kernels; 0 from the others).
    fn apply<T: Real>(
        &self,
        scalars: [f64; 2],
        clip: f64,
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    ) -> usize;

    /// The kernel taking square roots as `sqrt` says ([`Execution::set_sqrt`]); kernels
    /// without a square root (all but Adam's) ignore it.
    ///
    /// [`Execution::set_sqrt`]: crate::Execution::set_sqrt
    fn with_sqrt(self, sqrt: Sqrt) -> Self
    where
        Self: Sized,
    {
        let _ = sqrt;
        self
    }
}

/// A named state tensor of one variable, or nothing in an unused slot.
pub type StateOperand<'t> = Option<(&'static str, &'t Tensor)>;

/// The tensors of one variable's update: parameter, gradient and the kernel's state tensors.
#[derive(Clone, Copy)]
pub(crate) struct Operands<'t> {
    /// The variable's index in its optimizer.
    pub(crate) index: usize,
    pub(crate) param: &'t Tensor,
    pub(crate) grad: &'t Tensor,
    pub(crate) states: [StateOperand<'t>; MAX_STATES],
    /// When the states live in a state buffer: its index in the `state_buffers` given to
    /// [`Batch::queue`](batch::Batch::queue) and each state's first element there. `states`
    /// are then not read.
    pub(crate) state_buffer: Option<(usize, [usize; MAX_STATES])>,
}

/// The instruction sets the fused kernels can run with on this processor, by name, the baseline
/// first (only the baseline without the `fused` feature, which has no loops of its own).
pub(crate) fn isa_names() -> Vec<&'static str> {
    #[cfg(feature = "fused")]
    return isa::Isa::available().into_iter().map(isa::Isa::name).collect();
    #[cfg(not(feature = "fused"))]
    return vec!["baseline"];
}

/// The instruction set the passes this thread starts run with, by name; an error when
/// `CASEOPT_ISA` names no instruction set (the passes then ignore it).
pub(crate) fn current_isa() -> Result<&'static str, String> {
    #[cfg(feature = "fused")]
    {
        if let Some(Err(e)) = isa::env_cap() {
            return Err(format!("CASEOPT_ISA: {e}"));
        }
        Ok(isa::Isa::current().name())
    }
    #[cfg(not(feature = "fused"))]
    Ok("baseline")
}

/// Caps the instruction set of the passes this thread starts at `name` (`None`: no cap of its
/// own, `CASEOPT_ISA`'s still applies), capped in turn at what the processor has; returns the
/// set they now run with. Nothing changes when `name` is no instruction set.
pub(crate) fn cap_isa(name: Option<&str>) -> Result<&'static str, String> {
    #[cfg(feature = "fused")]
    {
        let cap = name.map(isa::Isa::parse_cap).transpose()?;
        isa::set_thread_cap(cap);
        current_isa()
    }
    #[cfg(not(feature = "fused"))]
    {
        // No loops of their own to cap, but a name that is no instruction set is refused as
        // the fused build refuses it.
        match name.map(|n| n.trim().to_ascii_lowercase()) {
            None => Ok("baseline"),
            Some(n) if ["avx512", "avx2", "baseline"].contains(&n.as_str()) => Ok("baseline"),
            Some(other) => Err(format!(
                "unknown instruction set `{other}` (expected avx512, avx2 or baseline)"
            )),
        }
    }
}
