//! What stands in for the fused kernels when the crate is built without the `fused` feature
//! (no C++ compiler, no OpenMP): the same crate-internal API, refusing every variable with
//! [`Unfit::NotBuilt`] so that each optimizer takes its libtorch path (and
//! [`Backend::Fused`](crate::Backend::Fused) fails naming the reason), staging nothing, and
//! scanning no gradient so that the router checks them all with libtorch ops. Metadata is read
//! through tch's accessors ([`read_meta`]).

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Tensor};

use super::metadata::{kind_of, RawMeta, Status, CPU, EMPTY, MAX_DIMS};
use super::{Kernel, Operands, Unfit};

/// Scratch an optimizer keeps between steps; nothing to keep here.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    /// Where the router would lend its read; it never does without the shim.
    pub(crate) lent: Option<super::metadata::MetaReader>,
}

impl Workspace {
    /// Starts an empty batch.
    pub(crate) fn batch<'t>(&mut self, _states: usize) -> Batch<'_, 't> {
        Batch { _ws: PhantomData, _tensors: PhantomData }
    }

    /// The variables the last run updated: none, ever.
    pub(crate) fn updated(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::empty()
    }

    /// The variables the last run updated, with their flips: none, ever.
    pub(crate) fn flipped(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        std::iter::empty()
    }
}

/// A batch that takes no variable.
pub(crate) struct Batch<'w, 't> {
    _ws: PhantomData<&'w mut Workspace>,
    _tensors: PhantomData<&'t Tensor>,
}

impl<'t> Batch<'_, 't> {
    /// Refuses every variable of `vars` with [`Unfit::NotBuilt`], in order.
    pub(crate) fn queue<I>(
        &mut self,
        vars: I,
        _state_buffers: &'t [Tensor],
        refused: &mut Vec<(usize, Unfit)>,
    ) where
        I: Iterator<Item = Operands<'t>> + Clone,
    {
        refused.extend(vars.map(|v| (v.index, Unfit::NotBuilt)));
    }

    /// No variable is queued: nothing to set.
    pub(crate) fn set_scalars(&mut self, _scalars: impl FnMut(usize) -> [f64; 2]) {}

    /// No variable is queued: nothing to set.
    pub(crate) fn set_clips(&mut self, _clip: impl FnMut(usize) -> f64) {}

    /// No variable is queued: nothing to run.
    pub(crate) fn run<K: Kernel>(self, _kernel: &K, _threads: usize) -> Result<(), Unfit> {
        Ok(())
    }
}

/// Bop steps are never staged without the kernels.
pub(crate) mod stage {
    use tch::Tensor;

    use super::super::math::BopScalars;
    use super::{Batch, Unfit, Workspace};

    /// A staged Bop step; never made.
    #[derive(Debug, Default)]
    pub(crate) struct Staged {
        /// The variables whose update is staged: none.
        pub(crate) covered: Vec<usize>,
        /// The first covered variable whose gradient holds a NaN or an infinity: none.
        pub(crate) first_non_finite: Option<usize>,
        /// The covered variables' flips: none.
        pub(crate) flipped: Vec<(usize, usize)>,
    }

    impl Staged {
        /// Nothing to give back.
        pub(crate) fn recycle(self, _ws: &mut Workspace) {}
    }

    impl<'t> Batch<'_, 't> {
        /// Refuses to stage: the caller runs the step the ordinary way.
        pub(crate) fn stage_bop(
            self,
            _s: BopScalars<f32>,
            _state_buffers: &'t [Tensor],
            _copies: &'t [Option<Tensor>],
            _threads: usize,
        ) -> Result<Staged, Unfit> {
            Err(Unfit::NotBuilt)
        }
    }

    /// Nothing was staged, so nothing is committed.
    pub(crate) fn commit<'p>(
        _staged: &Staged,
        _ws: &mut Workspace,
        _param: impl Fn(usize) -> Option<&'p Tensor>,
        _state_buffers: &[Tensor],
        _copies: &[Option<Tensor>],
    ) -> Result<(), Unfit> {
        Err(Unfit::NotBuilt)
    }
}

/// The non-finite scan reads no gradient without the kernels.
pub(crate) mod finite {
    use super::super::metadata::Grads;

    /// The result of [`scan_grads`].
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub(crate) struct FiniteScan {
        /// Always `None`: nothing is scanned.
        pub(crate) first_non_finite: Option<usize>,
        /// Every present gradient, to be checked another way.
        pub(crate) unscanned: Vec<usize>,
    }

    /// Nothing kept between steps.
    #[derive(Debug, Default)]
    pub(crate) struct ScanScratch;

    /// Hands every present gradient back as unscanned, positions counted as the fused scan
    /// counts them (the gradients present, in order, across `grads`).
    pub(crate) fn scan_grads(grads: &[Grads], _threads: usize, _: &mut ScanScratch) -> FiniteScan {
        let present = grads.iter().map(|g| g.present().count()).sum();
        FiniteScan { first_non_finite: None, unscanned: (0..present).collect() }
    }
}

/// One tensor's metadata through tch's accessors, as `shim/metadata.cpp` reads it: undefined
/// for `None`, the status for what cannot be read (a panic of tch's, which reports libtorch's
/// exceptions so, is caught and reported as [`Status::Exception`]).
pub(super) fn read_meta(t: Option<&Tensor>, writable: bool) -> RawMeta {
    let _ = writable; // tch's `data_ptr` is the mutable address either way
    let Some(t) = t else { return EMPTY };
    let read = catch_unwind(AssertUnwindSafe(|| {
        let mut m = EMPTY;
        if !t.defined() {
            return m;
        }
        m.dtype = t.f_kind().map_or(-1, code_of);
        m.device = match t.device() {
            Device::Cpu => CPU,
            Device::Cuda(i) => i32::try_from(i).unwrap_or(-2),
            _ => -2,
        };
        m.requires_grad = u8::from(t.requires_grad());
        if t.is_sparse() || t.is_mkldnn() {
            m.status = Status::NotStrided as i32;
            return m;
        }
        let sizes = t.size();
        m.ndim = i32::try_from(sizes.len()).unwrap_or(i32::MAX);
        if sizes.len() > MAX_DIMS {
            m.status = Status::TooManyDims as i32;
            return m;
        }
        m.sizes[..sizes.len()].copy_from_slice(&sizes);
        m.numel = sizes.iter().product();
        m.contiguous = u8::from(t.is_contiguous());
        if m.numel > 0 {
            m.data = t.data_ptr() as usize;
        }
        m.status = Status::Ok as i32;
        m
    }));
    read.unwrap_or(RawMeta { status: Status::Exception as i32, ..EMPTY })
}

/// ATen's scalar type code of `kind` (tch's own conversion is private).
fn code_of(kind: Kind) -> i32 {
    (0..=26).find(|&c| kind_of(c) == Some(kind)).unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use tch::Tensor;

    use crate::{Backend, Bop, Error, Execution, Optimizer, Param, VarInfo};

    fn bop(backend: Backend) -> (Bop, Tensor) {
        let w = Tensor::from_slice(&[1.0f32, -1.0, 1.0]);
        let mut bop = Bop::new(Default::default()).unwrap();
        bop.set_backend(backend);
        bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
        (bop, w)
    }

    #[test]
    fn forced_fused_fails_naming_the_missing_feature_and_changes_nothing() {
        let (mut bop, w) = bop(Backend::Fused);
        let g = Tensor::from_slice(&[1.0f32, 1.0, -1.0]);
        match bop.step_with_grads(&[Some(g)]) {
            Err(Error::FusedUnavailable { variable, reason, .. }) => {
                assert_eq!(variable, "w");
                assert!(reason.contains("without the `fused` feature"), "{reason}");
            }
            other => panic!("expected FusedUnavailable, got {other:?}"),
        }
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), [1.0, -1.0, 1.0]);
    }

    #[test]
    fn auto_takes_the_libtorch_path() {
        let (mut auto, w_auto) = bop(Backend::Auto);
        let (mut torch, w_torch) = bop(Backend::Torch);
        for step in 0..3 {
            let g = Tensor::from_slice(&[1.0f32, 1.0, -1.0]) * (step + 1);
            auto.step_with_grads(&[Some(g.copy())]).unwrap();
            torch.step_with_grads(&[Some(g)]).unwrap();
        }
        assert_eq!(Vec::<f32>::try_from(&w_auto).unwrap(), Vec::<f32>::try_from(&w_torch).unwrap());
    }
}
