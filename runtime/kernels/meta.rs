//! Tensor metadata for many tensors in one foreign call (the C++ side is `meta.cpp`, compiled
//! by build.rs against libtorch's headers).
//!
//! tch reads each field of a tensor (shape, dtype, device, contiguity, data address) through its
//! own libtch call followed by a check of libtch's thread-local error, and allocates for the
//! shape and for a gradient handle. On 2000 variables of 256 elements those calls were most of a
//! step: about 100 foreign calls per variable per step across the router's checks, the NaN scan
//! and the fused kernels' checks. [`MetaReader`] reads a whole list in one call.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use super::finite::{extent, Extent};

/// Most dimensions a tensor may have to be described (more is reported, not wrong).
pub(crate) const MAX_DIMS: usize = 12;

/// `caseopt_meta` of meta.cpp, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawMeta {
    numel: i64,
    data: usize,
    status: i32,
    dtype: i32,
    device: i32,
    ndim: i32,
    contiguous: u8,
    requires_grad: u8,
    pad: [u8; 6],
    sizes: [i64; MAX_DIMS],
}

// The C++ struct has the same fields in the same order, so the same size; `meta_layout_agrees`
// checks it against the compiled C++ too.
const _: () = assert!(std::mem::size_of::<RawMeta>() == 136);

const EMPTY: RawMeta = RawMeta {
    numel: 0,
    data: 0,
    status: Status::Undefined as i32,
    dtype: -1,
    device: CPU,
    ndim: 0,
    contiguous: 0,
    requires_grad: 0,
    pad: [0; 6],
    sizes: [0; MAX_DIMS],
};

extern "C" {
    fn caseopt_read_meta(
        tensors: *const *const c_void,
        n: usize,
        writable: i32,
        out: *mut RawMeta,
        grads: *mut RawMeta,
        grad_handles: *mut *mut c_void,
    );
    #[cfg(test)]
    fn caseopt_meta_size() -> usize;
    fn caseopt_swap_storages(a: *const *const c_void, b: *const *const c_void, n: usize) -> i32;
}

/// Exchanges the memory of the storages of each pair's two tensors (of equal byte size, on
/// the CPU): every tensor viewing one storage then sees what the other held. Fails, having
/// changed nothing, when a pair does not qualify or libtorch raised.
pub(crate) fn swap_storages(pairs: &[(&Tensor, &Tensor)]) -> Result<(), ()> {
    let a: Vec<*const c_void> = pairs.iter().map(|(x, _)| x.as_ptr() as *const c_void).collect();
    let b: Vec<*const c_void> = pairs.iter().map(|(_, y)| y.as_ptr() as *const c_void).collect();
    // SAFETY: every pointer is the `at::Tensor*` of a live tch tensor borrowed for the call;
    // the C++ side checks every pair before it changes any, catches libtorch's exceptions, and
    // only exchanges the two storages' allocations (both stay owned by a storage throughout).
    let status = unsafe { caseopt_swap_storages(a.as_ptr(), b.as_ptr(), pairs.len()) };
    if status == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// libtch's device code for the CPU; CUDA devices are their index, -2 anything else.
pub(crate) const CPU: i32 = -1;

/// What reading a tensor found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Status {
    /// Read.
    Ok = 0,
    /// An undefined tensor (no gradient).
    Undefined = 1,
    /// Not a dense (strided) tensor: sparse, mkldnn, ...
    NotStrided = 2,
    /// libtorch raised an exception while reading.
    Exception = 3,
    /// More than [`MAX_DIMS`] dimensions.
    TooManyDims = 4,
}

/// One tensor's metadata.
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Meta(RawMeta);

impl Meta {
    pub(crate) fn status(&self) -> Status {
        match self.0.status {
            0 => Status::Ok,
            1 => Status::Undefined,
            2 => Status::NotStrided,
            4 => Status::TooManyDims,
            _ => Status::Exception,
        }
    }

    /// Whether the tensor is defined and dense with its metadata read.
    pub(crate) fn is_ok(&self) -> bool {
        self.status() == Status::Ok
    }

    /// ATen's scalar type code (`at_scalar_type`'s).
    pub(crate) fn dtype(&self) -> i32 {
        self.0.dtype
    }

    /// The element type, if tch knows it.
    pub(crate) fn kind(&self) -> Option<Kind> {
        kind_of(self.0.dtype)
    }

    /// libtch's device code ([`CPU`], a CUDA index, or -2).
    pub(crate) fn device_code(&self) -> i32 {
        self.0.device
    }

    /// The device, where tch can name it.
    pub(crate) fn device(&self) -> Option<Device> {
        match self.0.device {
            CPU => Some(Device::Cpu),
            i if i >= 0 => Some(Device::Cuda(i as usize)),
            _ => None,
        }
    }

    pub(crate) fn shape(&self) -> &[i64] {
        let n = usize::try_from(self.0.ndim).unwrap_or(0).min(MAX_DIMS);
        &self.0.sizes[..n]
    }

    pub(crate) fn numel(&self) -> usize {
        usize::try_from(self.0.numel).unwrap_or(0)
    }

    pub(crate) fn contiguous(&self) -> bool {
        self.0.contiguous != 0
    }

    pub(crate) fn requires_grad(&self) -> bool {
        self.0.requires_grad != 0
    }

    /// The data address; 0 for a tensor without storage or without elements.
    pub(crate) fn data(&self) -> usize {
        self.0.data
    }
}

/// tch's `Kind` for ATen's scalar type code (tch's own conversion is private).
pub(crate) fn kind_of(code: i32) -> Option<Kind> {
    Some(match code {
        0 => Kind::Uint8,
        1 => Kind::Int8,
        2 => Kind::Int16,
        3 => Kind::Int,
        4 => Kind::Int64,
        5 => Kind::Half,
        6 => Kind::Float,
        7 => Kind::Double,
        8 => Kind::ComplexHalf,
        9 => Kind::ComplexFloat,
        10 => Kind::ComplexDouble,
        11 => Kind::Bool,
        12 => Kind::QInt8,
        13 => Kind::QUInt8,
        14 => Kind::QInt32,
        15 => Kind::BFloat16,
        23 => Kind::Float8e5m2,
        24 => Kind::Float8e4m3fn,
        25 => Kind::Float8e5m2fnuz,
        26 => Kind::Float8e4m3fnuz,
        _ => return None,
    })
}

/// One optimizer's gradients for a step, from [`MetaReader::grads`]: a handle per variable
/// (`None`: no gradient, or a frozen variable) and, aligned with them, the metadata read in the
/// same pass. The handles keep the gradients' memory alive, so the metadata's addresses stay
/// valid while this lives (as long as no other handle resizes a gradient meanwhile, the
/// contract of every tch read).
#[derive(Debug, Default)]
pub(crate) struct Grads {
    pub(crate) handles: Vec<Option<Tensor>>,
    /// Where each gradient's elements are, for the NaN scan (`None`: not readable there).
    extents: Vec<Option<Extent>>,
}

impl Grads {
    /// The extents of the gradients that have a handle, with their positions.
    pub(crate) fn present(&self) -> impl Iterator<Item = (usize, Option<Extent>)> + '_ {
        self.handles
            .iter()
            .zip(&self.extents)
            .enumerate()
            .filter_map(|(i, (h, e))| h.as_ref().map(|_| (i, *e)))
    }

    /// Empties the lists, keeping their buffers (the handles are dropped).
    pub(crate) fn clear(&mut self) {
        self.handles.clear();
        self.extents.clear();
    }

    /// Marks gradient `i` as already checked: the scan skips it (its position still counts).
    pub(crate) fn mark_checked(&mut self, i: usize) {
        if let Some(e) = self.extents.get_mut(i) {
            *e = Some(Extent::CHECKED);
        }
    }
}

/// Reads the metadata of tensor lists, keeping its buffers between calls so that a step
/// allocates nothing once they have grown.
#[derive(Debug, Default)]
pub(crate) struct MetaReader {
    handles: Vec<*const c_void>,
    out: Vec<RawMeta>,
    grads: Vec<RawMeta>,
    grad_handles: Vec<*mut c_void>,
}

// SAFETY: the handle pointers are only scratch between a `read*` call's start and end (they are
// cleared before the call returns); nothing else in the reader refers to another thread's data.
unsafe impl Send for MetaReader {}

impl MetaReader {
    /// Reads `tensors` (`None` reads as undefined). `writable` asks for the addresses through
    /// which the caller will write (libtorch then gives a copy-on-write tensor its own memory
    /// first, as an in-place op does). The result borrows the reader until the next read.
    pub(crate) fn read<'r, 't>(
        &'r mut self,
        tensors: impl IntoIterator<Item = Option<&'t Tensor>>,
        writable: bool,
    ) -> &'r [Meta] {
        self.fill(tensors);
        self.call(writable, false);
        as_metas(&self.out)
    }

    /// Reads `params` and their gradients, and makes a handle to each defined gradient of a
    /// variable that requires one (the handle `Tensor::grad` would make, made in the same
    /// pass; `None` for the others). Returns the parameters' metadata and the gradients.
    ///
    /// The lists are built in `reuse`'s buffers (emptied first).
    pub(crate) fn grads<'r, 't>(
        &'r mut self,
        params: impl IntoIterator<Item = &'t Tensor>,
        reuse: Grads,
    ) -> (&'r [Meta], Grads) {
        self.fill(params.into_iter().map(Some));
        self.call(false, true);
        let metas = as_metas(&self.out);
        let n = metas.len();
        let mut grads = reuse;
        grads.clear();
        grads.handles.reserve(n);
        grads.extents.reserve(n);
        for ((h, p), g) in self.grad_handles.drain(..).zip(metas).zip(as_metas(&self.grads)) {
            // SAFETY: a non-null entry is a fresh `new at::Tensor` made by `caseopt_read_meta`
            // for this call and owned by nobody else; tch's `Tensor` takes it over and frees it
            // with `at_free` (`delete`), as it does the handles libtch makes.
            let handle = (!h.is_null()).then(|| unsafe { Tensor::from_ptr(h.cast()) });
            // A frozen variable keeps a stale gradient (zero_grad zeroes rather than drops):
            // it is skipped rather than moved by momentum.
            grads.handles.push(handle.filter(|_| p.requires_grad()));
            grads.extents.push(extent(g));
        }
        (metas, grads)
    }

    /// The gradients' metadata read by the last [`grads`](Self::grads), aligned with its
    /// parameters (undefined for a variable without a gradient).
    pub(crate) fn grad_metas(&self) -> &[Meta] {
        as_metas(&self.grads)
    }

    fn fill<'t>(&mut self, tensors: impl IntoIterator<Item = Option<&'t Tensor>>) {
        self.handles.clear();
        self.handles.extend(
            tensors.into_iter().map(|t| t.map_or(std::ptr::null(), |t| t.as_ptr() as *const _)),
        );
    }

    /// One call of the C++ reader over `handles`; with `grads`, also the gradients' metadata
    /// and a handle to each.
    fn call(&mut self, writable: bool, grads: bool) {
        let n = self.handles.len();
        self.out.clear();
        self.out.resize(n, EMPTY);
        self.grads.clear();
        self.grad_handles.clear();
        if grads {
            self.grads.resize(n, EMPTY);
            self.grad_handles.resize(n, std::ptr::null_mut());
        }
        if n > 0 {
            let grads_ptr =
                if grads { self.grads.as_mut_ptr() } else { std::ptr::null_mut::<RawMeta>() };
            let handles_ptr =
                if grads { self.grad_handles.as_mut_ptr() } else { std::ptr::null_mut() };
            // SAFETY: every non-null handle is the `at::Tensor*` of a live tch tensor borrowed by
            // the caller for this call (`fill` took them from `&Tensor`s that outlive it); `out`
            // (and `grads`, `grad_handles` when asked) hold `n` writable elements of the C++
            // layout (a pointer for each handle);
            // the C++ function catches every exception and only reads the tensors (a writable
            // read may un-share a copy-on-write storage, as any in-place tch op would).
            unsafe {
                caseopt_read_meta(
                    self.handles.as_ptr(),
                    n,
                    i32::from(writable),
                    self.out.as_mut_ptr(),
                    grads_ptr,
                    handles_ptr,
                );
            }
        }
        // The raw handles are not kept past the call.
        self.handles.clear();
    }
}

fn as_metas(raw: &[RawMeta]) -> &[Meta] {
    // SAFETY: `Meta` is a `#[repr(transparent)]` newtype over `RawMeta`, so a slice of one is
    // a slice of the other.
    unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<Meta>(), raw.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_layout_agrees() {
        // SAFETY: a pure function returning a constant.
        assert_eq!(unsafe { caseopt_meta_size() }, std::mem::size_of::<RawMeta>());
    }

    #[test]
    fn swapped_storages_show_through_every_view() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let b = Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0]);
        let view = a.narrow(0, 1, 2);
        let alias = a.alias();
        swap_storages(&[(&a, &b)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(Vec::<f32>::try_from(&view).unwrap(), [6.0, 7.0]);
        assert_eq!(Vec::<f32>::try_from(&alias).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        // A pair that does not qualify (sizes differ) changes nothing, even after a good pair.
        let c = Tensor::from_slice(&[9.0f32]);
        assert!(swap_storages(&[(&a, &b), (&a, &c)]).is_err());
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        // Nor does a tensor paired with itself, or an undefined one.
        assert!(swap_storages(&[(&a, &a)]).is_err());
        assert!(swap_storages(&[(&a, &Tensor::new())]).is_err());
        assert_eq!(Vec::<f32>::try_from(&c).unwrap(), [9.0]);
    }

    #[test]
    fn reads_what_tch_reads() {
        let a = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([5], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let t = a.tr();
        let e = Tensor::zeros([0, 2], (Kind::Half, Device::Cpu));
        let big = Tensor::zeros([1; 13], (Kind::Float, Device::Cpu));
        let undefined = Tensor::new();
        let mut r = MetaReader::default();
        let m = r.read(
            [Some(&a), Some(&b), Some(&t), Some(&e), Some(&big), Some(&undefined), None],
            false,
        );
        assert_eq!(m.len(), 7);
        assert!(m[0].is_ok() && m[0].contiguous() && !m[0].requires_grad());
        assert_eq!(
            (m[0].shape(), m[0].numel(), m[0].kind()),
            (&[3i64, 4][..], 12, Some(Kind::Float))
        );
        assert_eq!(m[0].data(), a.data_ptr() as usize);
        assert_eq!(m[0].device(), Some(Device::Cpu));
        assert!(m[1].requires_grad() && m[1].kind() == Some(Kind::Double));
        assert!(m[2].is_ok() && !m[2].contiguous() && m[2].shape() == [4, 3]);
        assert_eq!((m[3].numel(), m[3].data(), m[3].kind()), (0, 0, Some(Kind::Half)));
        assert_eq!(m[4].status(), Status::TooManyDims);
        assert_eq!(m[5].status(), Status::Undefined);
        assert_eq!(m[6].status(), Status::Undefined);
    }

    #[test]
    fn reads_gradients_and_makes_their_handles() {
        let x = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&x * 3.0).sum(Kind::Float).backward();
        let mut r = MetaReader::default();
        let frozen = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&frozen * 2.0).sum(Kind::Float).backward();
        let frozen = frozen.set_requires_grad(false);
        let (ps, grads) = r.grads([&x, &y, &frozen], Grads::default());
        assert_eq!(ps.len(), 3);
        assert!(ps.iter().all(Meta::is_ok));
        assert_eq!(grads.handles.len(), 3);
        let g = grads.handles[0].as_ref().expect("x has a gradient");
        assert_eq!(g.data_ptr(), x.grad().data_ptr());
        assert_eq!(g.size(), vec![4]);
        assert_eq!(Vec::<f32>::try_from(g).unwrap(), vec![3.0; 4]);
        assert!(grads.handles[1].is_none(), "y has no gradient");
        assert!(grads.handles[2].is_none(), "a frozen variable's stale gradient is skipped");
        let present: Vec<usize> = grads.present().map(|(i, _)| i).collect();
        assert_eq!(present, vec![0]);
        assert!(grads.present().next().unwrap().1.is_some(), "a readable f32 gradient");
        // Reading again into the same lists replaces what they held.
        let (_, again) = r.grads([&y, &x], grads);
        assert_eq!(again.handles.len(), 2);
        assert!(again.handles[0].is_none() && again.handles[1].is_some());
        assert_eq!(again.present().map(|(i, _)| i).collect::<Vec<_>>(), vec![1]);
        // The handle is a tensor of its own: dropping it leaves x's gradient alone.
        drop(again);
        assert_eq!(Vec::<f32>::try_from(&x.grad()).unwrap(), vec![3.0; 4]);
    }

    #[test]
    fn long_lists_are_read_on_several_threads_in_order() {
        // Past meta.cpp's CASEOPT_PARALLEL_READ (512), the list is split between threads: every
        // entry must still land at its own index, gradients and handles included.
        let params: Vec<Tensor> = (0..1500)
            .map(|i| Tensor::zeros([1 + i % 7], (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        for (i, p) in params.iter().enumerate() {
            if i % 3 != 0 {
                (p * (i as f64)).sum(Kind::Float).backward();
            }
        }
        let mut r = MetaReader::default();
        let (metas, grads) = r.grads(params.iter(), Grads::default());
        assert_eq!(metas.len(), 1500);
        for (i, (m, h)) in metas.iter().zip(&grads.handles).enumerate() {
            assert_eq!(m.numel(), 1 + i % 7, "{i}");
            assert_eq!(m.data(), params[i].data_ptr() as usize, "{i}");
            assert_eq!(h.is_some(), i % 3 != 0, "{i}");
            if let Some(g) = h {
                assert_eq!(g.data_ptr(), params[i].grad().data_ptr(), "{i}");
            }
        }
        let written = r.read(params.iter().map(Some), true);
        assert!(written.iter().zip(&params).all(|(m, p)| m.data() == p.data_ptr() as usize));
    }

    #[test]
    fn a_sparse_tensor_is_reported_not_thrown() {
        let dense = Tensor::eye(3, (Kind::Float, Device::Cpu));
        let sparse = dense.to_sparse_sparse_dim(2);
        let mut r = MetaReader::default();
        let m = r.read([Some(&sparse)], true);
        assert_eq!(m[0].status(), Status::NotStrided);
    }
}
