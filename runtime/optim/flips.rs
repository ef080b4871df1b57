//! How many weights Bop and Bop2ndOrder flipped in their last step, counted by the pass that
//! flipped them (larq's `FlipRatio` metric, without a second sweep over the weights).
//!
//! A weight *flips* when its sign changes: negative before and not after, or the other way
//! (`(w < 0) != (w' < 0)`). For +-1 weights that is exactly larq's "changed value"; a weight
//! that Bop's first update binarises from 0.3 to +1 has not flipped.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::kernels::aten::FlipMasks;

/// The fraction of weights whose sign flipped in the last step, per variable of every Bop and
/// Bop2ndOrder of a router and in total ([`Router::flip_ratios`](crate::Router::flip_ratios)),
/// or of one such optimizer ([`Bop::flip_ratios`](crate::Bop::flip_ratios)).
///
/// ```
/// use caseopt::{Bop, BopConfig, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f32, -1.0, 1.0, -1.0]);
/// let mut bop = Bop::new(BopConfig { threshold: 0.0.into(), gamma: 1.0.into() })?;
/// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
/// assert_eq!(bop.flip_ratios()?, None); // no step yet
/// // The moving average becomes the gradient; `w * m > 0` flips the first and last weights.
/// bop.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, 1.0, -1.0, -1.0]))])?;
/// let ratios = bop.flip_ratios()?.expect("a step was taken");
/// assert_eq!(ratios.per_variable, vec![("w".to_string(), 0.5)]);
/// assert_eq!((ratios.flipped, ratios.weights, ratios.total), (2, 4, 0.5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FlipRatios {
    /// Each variable's fraction (0 for a variable the last step did not update: it had no
    /// gradient, or is frozen; 0 for an empty one), in rule order, then in the optimizer's
    /// order.
    pub per_variable: Vec<(String, f64)>,
    /// Weights flipped in all of them.
    pub flipped: u64,
    /// Weights in all of them.
    pub weights: u64,
    /// `flipped / weights` (0 when there are no weights).
    pub total: f64,
}

impl FlipRatios {
    /// Adds one variable's count.
    pub(crate) fn push(&mut self, name: &str, flipped: u64, weights: u64) {
        self.per_variable.push((name.to_string(), ratio(flipped, weights)));
        self.flipped += flipped;
        self.weights += weights;
        self.total = ratio(self.flipped, self.weights);
    }

    /// Adds another optimizer's variables, after these.
    pub(crate) fn absorb(&mut self, other: FlipRatios) {
        self.per_variable.extend(other.per_variable);
        self.flipped += other.flipped;
        self.weights += other.weights;
        self.total = ratio(self.flipped, self.weights);
    }

    /// No variable yet.
    pub(crate) fn empty() -> Self {
        FlipRatios { per_variable: Vec::new(), flipped: 0, weights: 0, total: 0.0 }
    }
}

/// `flipped / weights`, 0 for no weights.
fn ratio(flipped: u64, weights: u64) -> f64 {
    if weights == 0 {
        0.0
    } else {
        flipped as f64 / weights as f64
    }
}

/// One variable's flips in the last step.
#[derive(Debug)]
enum Count {
    /// Counted by a fused pass.
    Counted(u64),
    /// From the libtorch path: counted only when asked for, so that a step nobody reads the
    /// flips of pays no reduction (and a CUDA step does not wait for the device).
    Pending(PendingFlips),
}

/// The flips of a binary optimizer's last step, per variable.
#[derive(Debug, Default)]
pub(crate) struct FlipCounts {
    counts: Vec<Count>,
    /// During a step, the previous step's counts, whose masks this step's may take over
    /// ([`spare`](Self::spare)); empty between steps.
    previous: Vec<Count>,
    /// Whether a step has been taken since the optimizer was built.
    stepped: bool,
}

impl FlipCounts {
    /// Starts a step over `len` variables: nothing flipped yet. The last step's counts stay
    /// aside until [`drop_spares`](Self::drop_spares), for their masks' memory.
    pub(crate) fn start(&mut self, len: usize) {
        std::mem::swap(&mut self.counts, &mut self.previous);
        self.counts.clear();
        self.counts.resize_with(len, || Count::Counted(0));
        self.stepped = true;
    }

    /// What variable `index`'s previous step left to count its flips with, if that was masks
    /// (the libtorch path's): the step no longer reports it, so this step may fill its memory.
    pub(crate) fn spare(&mut self, index: usize) -> Option<PendingFlips> {
        match self.previous.get_mut(index) {
            Some(c @ Count::Pending(_)) => match std::mem::replace(c, Count::Counted(0)) {
                Count::Pending(p) => Some(p),
                Count::Counted(_) => None,
            },
            _ => None,
        }
    }

    /// Ends a step's use of the previous step's counts: the masks no variable took are freed.
    pub(crate) fn drop_spares(&mut self) {
        self.previous.clear();
    }

    /// Variable `index` flipped `n` weights (counted by a fused pass).
    pub(crate) fn counted(&mut self, index: usize, n: usize) {
        if let Some(c) = self.counts.get_mut(index) {
            *c = Count::Counted(n as u64);
        }
    }

    /// Variable `index` flipped the weights `count` can count (libtorch path).
    pub(crate) fn pending(&mut self, index: usize, count: PendingFlips) {
        if let Some(c) = self.counts.get_mut(index) {
            *c = Count::Pending(count);
        }
    }

    /// Each variable's count, in order; `None` before the first step.
    pub(crate) fn read(&self) -> Result<Option<Vec<u64>>> {
        if !self.stepped {
            return Ok(None);
        }
        let counts = self
            .counts
            .iter()
            .map(|c| match c {
                Count::Counted(n) => Ok(*n),
                Count::Pending(p) => p.count(),
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(Some(counts))
    }
}

/// What a Bop step on libtorch ops leaves behind to count its flips with, so that nothing is
/// reduced or read back until [`FlipCounts::read`] asks: either the two masks its update
/// computed anyway (`bop::libtorch_step`), kept (2 bytes per weight), or, on the
/// multi-tensor backend, the count itself, left on the variable's device. Public only because
/// the sealed `Algorithm` trait names it; not part of the API.
#[derive(Debug)]
pub struct PendingFlips(Pending);

#[derive(Debug)]
enum Pending {
    /// `w < 0` before the step and `w' < 0` after it (bool tensors of one shape).
    Masks { was_negative: Tensor, negative: Tensor },
    /// The number of weights that changed sign, a 0-dim integer tensor on the device.
    Count(Tensor),
}

impl PendingFlips {
    /// The masks of one step: `w < 0` before it and `w' < 0` after (bool tensors of one shape).
    pub(crate) fn new(was_negative: Tensor, negative: Tensor) -> Self {
        PendingFlips(Pending::Masks { was_negative, negative })
    }

    /// A count already reduced on the device (the multi-tensor backend's).
    pub(crate) fn counted(count: Tensor) -> Self {
        PendingFlips(Pending::Count(count))
    }

    /// The data addresses of the two masks (none for a count), for tests.
    #[cfg(test)]
    pub(crate) fn mask_addresses(&self) -> Option<(usize, usize)> {
        match &self.0 {
            Pending::Masks { was_negative, negative } => {
                Some((was_negative.data_ptr() as usize, negative.data_ptr() as usize))
            }
            Pending::Count(_) => None,
        }
    }

    /// The masks, for a later step to compute its own in ([`FlipCounts::spare`]).
    pub(crate) fn into_masks(self) -> Option<FlipMasks> {
        match self.0 {
            Pending::Masks { was_negative, negative } => Some(FlipMasks { was_negative, negative }),
            Pending::Count(_) => None,
        }
    }

    /// How many weights changed sign: `(w < 0) != (w' < 0)`.
    pub(crate) fn count(&self) -> Result<u64> {
        let n = match &self.0 {
            Pending::Masks { was_negative, negative } => {
                was_negative.f_logical_xor(negative)?.f_sum(Kind::Int64)?
            }
            Pending::Count(n) => n.shallow_clone(),
        };
        Ok(u64::try_from(n.f_int64_value(&[])?).unwrap_or(0))
    }
}
