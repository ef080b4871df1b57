//! Tensor metadata for many tensors in one foreign call (the C++ side is `shim/metadata.cpp`,
//! compiled by build.rs against libtorch's headers; without the `fused` feature the same
//! metadata is read through tch's accessors, see [`unfused`](super::unfused)).
//!
//! tch reads each field of a tensor (shape, dtype, device, contiguity, data address) through its
//! own libtch call followed by a check of libtch's thread-local error, and allocates for the
//! shape and for a gradient handle. On 2000 variables of 256 elements those calls were most of a
//! step: about 100 foreign calls per variable per step across the router's checks, the NaN scan
//! and the fused kernels' checks. [`MetaReader`] reads a whole list in one call.

#[cfg(feature = "fused")]
use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

/// Most dimensions a tensor may have to be described (more is reported, not wrong).
pub(crate) const MAX_DIMS: usize = 12;

/// `caseopt_meta` of shim/metadata.cpp, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RawMeta {
    pub(super) numel: i64,
    pub(super) data: usize,
    pub(super) status: i32,
    pub(super) dtype: i32,
    pub(super) device: i32,
    pub(super) ndim: i32,
    pub(super) contiguous: u8,
    pub(super) requires_grad: u8,
    pub(super) pad: [u8; 6],
    pub(super) sizes: [i64; MAX_DIMS],
}

// The C++ struct has the same fields in the same order, so the same size; `meta_layout_agrees`
// checks it against the compiled C++ too.
const _: () = assert!(std::mem::size_of::<RawMeta>() == 136);

pub(super) const EMPTY: RawMeta = RawMeta {
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

#[cfg(feature = "fused")]
extern "C" {
    fn caseopt_read_meta(
        tensors: *const *const c_void,
        n: usize,
        writable: i32,
        out: *mut RawMeta,
        grads: *mut RawMeta,
        grad_handles: *mut *mut c_void,
        recycled: *mut *mut c_void,
    );
    fn caseopt_release_handles(handles: *mut *mut c_void, n: usize);
    #[cfg(test)]
    fn caseopt_meta_size() -> usize;
    #[cfg(test)]
    fn caseopt_use_count(t: *const c_void) -> usize;
}

/// ATen's scalar type codes of the two element types the kernels take.
pub(crate) const FLOAT: i32 = 6;
pub(crate) const DOUBLE: i32 = 7;

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
pub(crate) struct TensorMeta(RawMeta);

impl TensorMeta {
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

    /// Whether both tensors were read, with the same device, dtype and shape.
    pub(crate) fn same_layout(&self, other: &TensorMeta) -> bool {
        self.is_ok()
            && other.is_ok()
            && self.0.device == other.0.device
            && self.0.dtype == other.0.dtype
            && same_shape(self.shape(), other.shape())
    }

    /// The data address; 0 for a tensor without storage or without elements.
    pub(crate) fn data(&self) -> usize {
        self.0.data
    }

    /// The data address when there is one and it is `align`-aligned.
    pub(crate) fn aligned_data(&self, align: usize) -> Option<usize> {
        let addr = self.0.data;
        (addr != 0 && addr.is_multiple_of(align)).then_some(addr)
    }
}

/// `a == b` for two shapes, as an inlined loop: the slice comparison calls `memcmp`, and the
/// router and the kernels compare every variable's and gradient's shape each step, shapes of
/// one to four dimensions.
#[inline]
pub(crate) fn same_shape(a: &[i64], b: &[i64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
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

/// Where a readable gradient's elements are: what the NaN scan ([`finite`](super::finite))
/// needs of its metadata, kept by [`Grads`] between reading it and scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) f64: bool,
}

impl Extent {
    /// Nothing to read: a gradient checked another way (a staged step's, see
    /// [`stage`](super::stage)).
    pub(crate) const CHECKED: Extent = Extent { addr: 0, len: 0, f64: false };
}

/// The extent of a tensor the scan can read (contiguous f32/f64 on the CPU), or `None`.
pub(crate) fn extent(m: &TensorMeta) -> Option<Extent> {
    if !m.is_ok() || m.device_code() != CPU || !m.contiguous() {
        return None;
    }
    let f64 = match m.dtype() {
        FLOAT => false,
        DOUBLE => true,
        _ => return None,
    };
    let len = m.numel();
    if len == 0 {
        return Some(Extent { addr: 0, len, f64 });
    }
    let align = if f64 { std::mem::align_of::<f64>() } else { std::mem::align_of::<f32>() };
    let addr = m.aligned_data(align)?;
    Some(Extent { addr, len, f64 })
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
    /// The handles of earlier steps, released, for the next read to reuse.
    pool: HandlePool,
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

    /// Empties the lists, keeping their buffers: the handles let go of their gradients (so
    /// that autograd, which accumulates in place only into a gradient nobody else holds, keeps
    /// doing so) and are kept for the next read.
    pub(crate) fn clear(&mut self) {
        self.pool.take_back(&mut self.handles);
        self.extents.clear();
    }

    /// Marks gradient `i` as already checked: the scan skips it (its position still counts).
    pub(crate) fn mark_checked(&mut self, i: usize) {
        if let Some(e) = self.extents.get_mut(i) {
            *e = Some(Extent::CHECKED);
        }
    }
}

/// Gradient handles kept from one step to the next: with the shim, each a `new at::Tensor`
/// that holds no tensor between steps ([`take_back`](Self::take_back) releases it) and that
/// the next read assigns a gradient to instead of allocating a handle.
#[derive(Debug, Default)]
struct HandlePool {
    /// Aligned with the variables: null, or an owned, undefined `at::Tensor`.
    #[cfg(feature = "fused")]
    spare: Vec<*mut c_void>,
}

// SAFETY: every non-null entry is an `at::Tensor` this pool owns alone (no tch handle refers to
// it) and that holds no tensor; it is only touched through `&mut self`.
#[cfg(feature = "fused")]
unsafe impl Send for HandlePool {}
// SAFETY: as above: `&HandlePool` gives access to nothing.
#[cfg(feature = "fused")]
unsafe impl Sync for HandlePool {}

impl HandlePool {
    /// Takes back `handles` (emptied), which the reader made: each releases its gradient and
    /// keeps its place for the next read.
    #[cfg(feature = "fused")]
    fn take_back(&mut self, handles: &mut Vec<Option<Tensor>>) {
        if handles.len() > self.spare.len() {
            self.spare.resize(handles.len(), std::ptr::null_mut());
        }
        for (i, h) in handles.drain(..).enumerate() {
            if let Some(t) = h {
                self.keep(i, t);
            }
        }
        if !self.spare.is_empty() {
            // SAFETY: every non-null entry is an owned `at::Tensor` (a tch handle given up just
            // above, or one released earlier); the C++ side only assigns an undefined tensor
            // to each and never throws.
            unsafe { caseopt_release_handles(self.spare.as_mut_ptr(), self.spare.len()) };
        }
    }

    /// Without the shim the handles are tch's own: they are dropped.
    #[cfg(not(feature = "fused"))]
    fn take_back(&mut self, handles: &mut Vec<Option<Tensor>>) {
        handles.clear();
    }

    /// Keeps handle `t` of variable `i` in the pool (it lets go of its tensor at the next
    /// [`take_back`](Self::take_back)); should the slot hold one already (never: the reader
    /// took the slot's handle to make `t`), `t` is dropped as usual.
    #[cfg(feature = "fused")]
    fn keep(&mut self, i: usize, t: Tensor) {
        if let Some(slot) = self.spare.get_mut(i).filter(|slot| slot.is_null()) {
            *slot = std::mem::ManuallyDrop::new(t).as_mut_ptr().cast();
        }
    }

    /// Without the shim the handle is dropped.
    #[cfg(not(feature = "fused"))]
    fn keep(&mut self, _: usize, t: Tensor) {
        drop(t);
    }

    /// `n` entries for a read (null past what earlier steps left).
    #[cfg(feature = "fused")]
    fn entries(&mut self, n: usize) -> *mut *mut c_void {
        if self.spare.len() < n {
            self.spare.resize(n, std::ptr::null_mut());
        }
        self.spare.as_mut_ptr()
    }
}

#[cfg(feature = "fused")]
impl Drop for HandlePool {
    fn drop(&mut self) {
        for &h in self.spare.iter().filter(|h| !h.is_null()) {
            // SAFETY: an owned `at::Tensor` allocated with `new` (by the C++ reader), which
            // tch frees as its own handles, with `delete`.
            drop(unsafe { Tensor::from_ptr(h.cast()) });
        }
    }
}

/// A gradient handle as the reader makes it: the `at::Tensor*` the C++ reader allocated, or
/// (without the shim) the tch tensor itself.
#[cfg(feature = "fused")]
type GradHandle = *mut c_void;
#[cfg(not(feature = "fused"))]
type GradHandle = Option<Tensor>;

/// Reads the metadata of tensor lists, keeping its buffers between calls so that a step
/// allocates nothing once they have grown.
#[derive(Debug, Default)]
pub(crate) struct MetaReader {
    #[cfg(feature = "fused")]
    handles: Vec<*const c_void>,
    out: Vec<RawMeta>,
    grads: Vec<RawMeta>,
    grad_handles: Vec<GradHandle>,
    /// After [`grads`](Self::grads): the address of each parameter's handle and of the
    /// gradient handle made for it (0: none), which identify what was read (never
    /// dereferenced); empty after [`read`](Self::read).
    ids: Vec<(usize, usize)>,
    /// Whether the last read asked for writable addresses.
    writable: bool,
}

// SAFETY: the handle pointers are only scratch between the start and the end of a `read` or
// `grads` call (both lists are emptied before the call returns); nothing else in the reader
// refers to another thread's data.
#[cfg(feature = "fused")]
unsafe impl Send for MetaReader {}

impl MetaReader {
    /// Reads `tensors` (`None` reads as undefined). `writable` asks for the addresses through
    /// which the caller will write (libtorch then gives a copy-on-write tensor its own memory
    /// first, as an in-place op does). The result borrows the reader until the next read.
    pub(crate) fn read<'r, 't>(
        &'r mut self,
        tensors: impl IntoIterator<Item = Option<&'t Tensor>>,
        writable: bool,
    ) -> &'r [TensorMeta] {
        self.read_all(tensors, writable, None);
        as_metas(&self.out)
    }

    /// Reads `params` and their gradients, and makes a handle to each defined gradient of a
    /// variable that requires one (the handle `Tensor::grad` would make, made in the same
    /// pass; `None` for the others). Returns the parameters' metadata and the gradients.
    ///
    /// The lists are built in `reuse`'s buffers (emptied first).
    /// `writable` reads the parameters' addresses as [`read`](Self::read) does (the
    /// gradients' are only read), so that the reader can then be lent to the fused pass of
    /// their optimizer's step ([`lent`](Self::lent)).
    pub(crate) fn grads<'r, 't>(
        &'r mut self,
        params: impl IntoIterator<Item = &'t Tensor>,
        reuse: Grads,
        writable: bool,
    ) -> (&'r [TensorMeta], Grads) {
        let mut grads = reuse;
        grads.clear();
        self.read_all(params.into_iter().map(Some), writable, Some(&mut grads.pool));
        let metas = as_metas(&self.out);
        let n = metas.len();
        grads.handles.reserve(n);
        grads.extents.reserve(n);
        let read = self.grad_handles.drain(..).zip(metas).zip(as_metas(&self.grads));
        for (i, ((h, p), g)) in read.enumerate() {
            let handle = match into_tensor(h) {
                // A frozen variable keeps a stale gradient (zero_grad zeroes rather than
                // drops): it is skipped rather than moved by momentum.
                Some(t) if !p.requires_grad() => {
                    grads.pool.keep(i, t);
                    None
                }
                handle => handle,
            };
            if let Some(id) = self.ids.get_mut(i) {
                id.1 = handle.as_ref().map_or(0, |t| t.as_ptr() as usize);
            }
            grads.handles.push(handle);
            grads.extents.push(extent(g));
        }
        (metas, grads)
    }

    /// The metadata of variable `index` and of its gradient as the last
    /// [`grads`](Self::grads) read them, for the fused pass of the same step: `None` unless
    /// that read was writable and `param` and `grad` are the very handles it read and made.
    ///
    /// The caller vouches that nothing changed those tensors' metadata since the read: only
    /// caseopt's own code ran in between (the router checks that no user code can: see
    /// `router::step`), and none of it resizes, moves or re-points a variable or a gradient.
    pub(crate) fn lent(
        &self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
    ) -> Option<(&TensorMeta, &TensorMeta)> {
        let &(p, g) = self.ids.get(index)?;
        let same = p == param.as_ptr() as usize && g == grad.as_ptr() as usize && g != 0;
        if !(self.writable && same) {
            return None;
        }
        Some((as_metas(&self.out).get(index)?, as_metas(&self.grads).get(index)?))
    }

    /// The gradients' metadata read by the last [`grads`](Self::grads), aligned with its
    /// parameters (undefined for a variable without a gradient).
    pub(crate) fn grad_metas(&self) -> &[TensorMeta] {
        as_metas(&self.grads)
    }

    /// The tensors' metadata read by the last [`read`](Self::read) or [`grads`](Self::grads).
    pub(crate) fn metas(&self) -> &[TensorMeta] {
        as_metas(&self.out)
    }

    /// Reads `tensors` into `out`; with a `pool` (`grads`), also their gradients' metadata
    /// into `grads` and a handle to each defined gradient into `grad_handles`, taken from the
    /// pool where it has one.
    #[cfg(feature = "fused")]
    fn read_all<'t>(
        &mut self,
        tensors: impl IntoIterator<Item = Option<&'t Tensor>>,
        writable: bool,
        mut pool: Option<&mut HandlePool>,
    ) {
        let grads = pool.is_some();
        self.writable = writable;
        self.handles.clear();
        self.handles.extend(
            tensors.into_iter().map(|t| t.map_or(std::ptr::null(), |t| t.as_ptr() as *const _)),
        );
        self.ids.clear();
        if grads {
            self.ids.extend(self.handles.iter().map(|&h| (h as usize, 0)));
        }
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
            let recycled = pool.as_mut().map_or(std::ptr::null_mut(), |p| p.entries(n));
            // SAFETY: every non-null handle is the `at::Tensor*` of a live tch tensor borrowed by
            // the caller for this call (taken just above from `&Tensor`s that outlive it); `out`
            // (and `grads`, `grad_handles` and `recycled` when asked) hold `n` writable
            // elements of the C++ layout (a pointer for each handle; `recycled`'s non-null
            // entries are undefined `at::Tensor`s the pool owns, which the C++ side moves to
            // `grad_handles` when it assigns a gradient to them); the C++ function catches
            // every exception and only reads the tensors (a writable read may un-share a
            // copy-on-write storage, as any in-place tch op would).
            unsafe {
                caseopt_read_meta(
                    self.handles.as_ptr(),
                    n,
                    i32::from(writable),
                    self.out.as_mut_ptr(),
                    grads_ptr,
                    handles_ptr,
                    recycled,
                );
            }
        }
        // The raw handles are not kept past the call.
        self.handles.clear();
    }

    /// [`read_all`](Self::read_all) through tch's accessors, one tensor at a time.
    #[cfg(not(feature = "fused"))]
    fn read_all<'t>(
        &mut self,
        tensors: impl IntoIterator<Item = Option<&'t Tensor>>,
        writable: bool,
        pool: Option<&mut HandlePool>,
    ) {
        let grads = pool.is_some();
        self.writable = writable;
        self.out.clear();
        self.grads.clear();
        self.grad_handles.clear();
        self.ids.clear();
        for t in tensors {
            if grads {
                self.ids.push((t.map_or(0, |t| t.as_ptr() as usize), 0));
            }
            self.out.push(super::unfused::read_meta(t, writable));
            if grads {
                let g = t.filter(|t| t.defined()).map(Tensor::grad).filter(Tensor::defined);
                self.grads.push(super::unfused::read_meta(g.as_ref(), false));
                self.grad_handles.push(g);
            }
        }
    }
}

/// Takes over a gradient handle made by the C++ reader.
#[cfg(feature = "fused")]
fn into_tensor(h: GradHandle) -> Option<Tensor> {
    // SAFETY: a non-null entry is an `at::Tensor` made (or taken from the pool, which gave it
    // up) by `caseopt_read_meta` for this call and owned by nobody else; tch's `Tensor` takes it
    // over and frees it with `at_free` (`delete`), as it does the handles libtch makes.
    (!h.is_null()).then(|| unsafe { Tensor::from_ptr(h.cast()) })
}

/// A gradient handle read through tch is already a tensor.
#[cfg(not(feature = "fused"))]
fn into_tensor(h: GradHandle) -> Option<Tensor> {
    h
}

fn as_metas(raw: &[RawMeta]) -> &[TensorMeta] {
    // SAFETY: `TensorMeta` is a `#[repr(transparent)]` newtype over `RawMeta`, so a slice of
    // one is a slice of the other.
    unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<TensorMeta>(), raw.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "fused")]
    #[test]
    fn meta_layout_agrees() {
        // SAFETY: a pure function returning a constant.
        assert_eq!(unsafe { caseopt_meta_size() }, std::mem::size_of::<RawMeta>());
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
        let (ps, grads) = r.grads([&x, &y, &frozen], Grads::default(), false);
        assert_eq!(ps.len(), 3);
        assert!(ps.iter().all(TensorMeta::is_ok));
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
        let (_, again) = r.grads([&y, &x], grads, false);
        assert_eq!(again.handles.len(), 2);
        assert!(again.handles[0].is_none() && again.handles[1].is_some());
        assert_eq!(again.present().map(|(i, _)| i).collect::<Vec<_>>(), vec![1]);
        // The handle is a tensor of its own: dropping it leaves x's gradient alone.
        drop(again);
        assert_eq!(Vec::<f32>::try_from(&x.grad()).unwrap(), vec![3.0; 4]);
    }

    #[test]
    fn a_read_is_lent_only_for_the_handles_it_read_and_made_and_only_when_writable() {
        let x = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&x * 3.0 + 1.0).sum(Kind::Float).backward();
        let mut r = MetaReader::default();
        let (_, grads) = r.grads([&x, &y], Grads::default(), true);
        let g = grads.handles[0].as_ref().expect("x has a gradient");
        let (p, gm) = r.lent(0, &x, g).expect("the handles read and made");
        assert_eq!((p.data(), p.numel()), (x.data_ptr() as usize, 4));
        assert_eq!((gm.data(), gm.numel()), (x.grad().data_ptr() as usize, 4));
        // Another handle to the same tensor, another gradient handle, another index, a
        // variable without a gradient: not what was read.
        assert!(r.lent(0, &x.shallow_clone(), g).is_none());
        assert!(r.lent(0, &x, &x.grad()).is_none());
        assert!(r.lent(1, &x, g).is_none() && r.lent(2, &x, g).is_none());
        assert!(r.lent(1, &y, g).is_none());
        // A read of addresses not to be written through is never lent.
        let (_, grads) = r.grads([&x, &y], grads, false);
        let g = grads.handles[0].as_ref().expect("x has a gradient");
        assert!(r.lent(0, &x, g).is_none());
        // Nor is a plain read.
        let (_, grads) = r.grads([&x, &y], grads, true);
        assert!(r.lent(0, &x, grads.handles[0].as_ref().unwrap()).is_some());
        r.read([Some(&x)], true);
        assert!(r.lent(0, &x, grads.handles[0].as_ref().unwrap()).is_none());
    }

    /// 1500 variables of 1 to 7 elements, past shim/metadata.cpp's CASEOPT_PARALLEL_READ (512)
    /// so that reads and releases are split between threads; variable `i` has a gradient of
    /// `i`s when `i % 3 != 0`, none otherwise.
    fn long_list() -> Vec<Tensor> {
        let params: Vec<Tensor> = (0..1500)
            .map(|i| Tensor::zeros([1 + i % 7], (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        for (i, p) in params.iter().enumerate() {
            if i % 3 != 0 {
                (p * (i as f64)).sum(Kind::Float).backward();
            }
        }
        params
    }

    #[test]
    fn long_lists_are_read_on_several_threads_in_order() {
        // Every entry must land at its own index, gradients and handles included.
        let params = long_list();
        let mut r = MetaReader::default();
        let (metas, grads) = r.grads(params.iter(), Grads::default(), false);
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

    /// The references to `t`'s tensor (its own handle included).
    #[cfg(feature = "fused")]
    fn use_count(t: &Tensor) -> usize {
        // SAFETY: the `at::Tensor*` of a live tch tensor; the C++ side only reads its count.
        unsafe { caseopt_use_count(t.as_ptr().cast()) }
    }

    #[cfg(feature = "fused")]
    #[test]
    fn handles_let_go_of_their_gradients_at_clear_and_serve_the_next_read() {
        let params = long_list();
        // Frozen after its backward: it keeps a stale gradient, which the step skips.
        let _ = params[2].set_requires_grad(false);
        let watched: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let counts = |watched: &[Tensor]| watched.iter().map(use_count).collect::<Vec<_>>();
        let alone = counts(&watched);
        assert_eq!(alone[1], 2, "autograd's reference and the watching handle");
        assert_eq!(alone[0], 0, "no gradient");

        let mut r = MetaReader::default();
        let (_, mut grads) = r.grads(params.iter(), Grads::default(), false);
        let held = counts(&watched);
        for i in 0..params.len() {
            let handle = grads.handles[i].as_ref();
            assert_eq!(handle.is_some(), i % 3 != 0 && i != 2, "{i}");
            assert_eq!(held[i], alone[i] + usize::from(i % 3 != 0), "{i}: one handle each");
            if let Some(h) = handle {
                assert_eq!(h.data_ptr(), watched[i].data_ptr(), "{i}");
            }
        }
        let made: Vec<usize> =
            grads.handles.iter().flatten().map(|h| h.as_ptr() as usize).collect();

        grads.clear();
        assert!(grads.handles.is_empty());
        assert_eq!(counts(&watched), alone, "every gradient let go of, the frozen one too");

        let (_, grads) = r.grads(params.iter(), grads, false);
        let reused: Vec<usize> =
            grads.handles.iter().flatten().map(|h| h.as_ptr() as usize).collect();
        assert_eq!(reused, made, "the same handles, not new ones");
        assert_eq!(counts(&watched), held);
        for (h, w) in grads.handles.iter().zip(&watched) {
            if let Some(h) = h {
                assert_eq!(Vec::<f32>::try_from(h).unwrap(), Vec::<f32>::try_from(w).unwrap());
            }
        }
        // Dropped without a clear, handles and pool free what they hold.
        drop(grads);
        assert_eq!(counts(&watched), alone);
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
