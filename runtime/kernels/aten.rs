//! ATen's own ops with the scalar arguments tch cannot pass (the C++ side is `shim/aten.cpp`),
//! and the CPU capability ATen runs its kernels with.
//!
//! torch.optim writes `add(x, alpha=a)`, `addcmul(.., value=v)` and `addcdiv(.., value=v)`.
//! tch has these ops only without their scalar, and spelling them as a `mul` then an `add`
//! rounds twice where ATen's AVX2 and AVX-512 CPU kernels round once (a fused multiply-add):
//! the optimizers' libtorch path calls them through here instead, so that it issues
//! torch.optim's ops themselves and gets its bits on every device. Unlike the fused kernels,
//! this is compiled with or without the `fused` feature: building tch compiles C++ already.

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;

use tch::{TchError, Tensor};

use super::math::{BlockSqrt, Real};
use crate::error::Result;

extern "C" {
    fn caseopt_tensor_impl(t: *const c_void) -> *const c_void;
    fn caseopt_aten_add(
        s: *const c_void,
        other: *const c_void,
        alpha: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_add_(
        s: *mut c_void,
        other: *const c_void,
        alpha: f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_addcmul(
        s: *const c_void,
        t1: *const c_void,
        t2: *const c_void,
        value: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_addcmul_(
        s: *mut c_void,
        t1: *const c_void,
        t2: *const c_void,
        value: f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_addcdiv_(
        s: *mut c_void,
        t1: *const c_void,
        t2: *const c_void,
        value: f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_addmm(
        s: *const c_void,
        mat1: *const c_void,
        mat2: *const c_void,
        beta: f64,
        alpha: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_vector_norm(
        s: *const c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_clamp_min(
        s: *const c_void,
        min: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    #[cfg(test)]
    fn caseopt_aten_bop_flip(
        w: *mut c_void,
        signal: *mut c_void,
        threshold: f64,
        was_negative: *mut *mut c_void,
        negative: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_bop(
        w: *mut c_void,
        g: *const c_void,
        m: *mut c_void,
        v: *mut c_void,
        gamma: f64,
        sigma: f64,
        threshold: f64,
        eps: f64,
        keep_was: *mut c_void,
        keep_neg: *mut c_void,
        was_negative: *mut *mut c_void,
        negative: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_aten_cpu_capability() -> i32;
    fn caseopt_aten_vml_sqrt(dtype: i32) -> *const c_void;
}

/// Room for the message of an exception ATen raised.
const MESSAGE: usize = 512;

/// Calls one shim function with an error buffer and turns a failure into tch's error, as tch
/// reports the exceptions of its own ops.
pub(super) fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0u8; MESSAGE];
    if f(err.as_mut_ptr().cast(), MESSAGE) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(MESSAGE);
    Err(TchError::Torch(String::from_utf8_lossy(&err[..end]).into_owned()).into())
}

fn ptr(t: &Tensor) -> *const c_void {
    t.as_ptr().cast()
}

/// Wraps the handle an out-of-place shim function made.
///
/// # Safety
/// `out` must be a handle the shim allocated (`new at::Tensor`), owned by no one else.
pub(super) unsafe fn owned(out: *mut c_void) -> Tensor {
    // SAFETY: per this function's contract; tch frees it with `delete` on drop, as it frees the
    // handles libtch allocates the same way.
    unsafe { Tensor::from_ptr(out.cast()) }
}

/// `a + alpha * b` (torch.add with `alpha`).
pub(crate) fn add(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: both handles are live tch tensors; the shim catches every exception and on
    // success stores a new handle in `out`, which `owned` takes over.
    call(|e, n| unsafe { caseopt_aten_add(ptr(a), ptr(b), alpha, &mut out, e, n) })?;
    // SAFETY: `call` succeeded, so the shim stored a fresh handle.
    Ok(unsafe { owned(out) })
}

/// `a += alpha * b` (Tensor.add_ with `alpha`).
pub(crate) fn add_(a: &mut Tensor, b: &Tensor, alpha: f64) -> Result<()> {
    // SAFETY: live tch tensors; `a` is borrowed mutably for the in-place op, as tch's own
    // in-place ops borrow it; the shim catches every exception.
    call(|e, n| unsafe { caseopt_aten_add_(a.as_mut_ptr().cast(), ptr(b), alpha, e, n) })
}

/// `a + value * t1 * t2` (torch.addcmul).
pub(crate) fn addcmul(a: &Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `add`.
    call(|e, n| unsafe { caseopt_aten_addcmul(ptr(a), ptr(t1), ptr(t2), value, &mut out, e, n) })?;
    // SAFETY: `call` succeeded, so the shim stored a fresh handle.
    Ok(unsafe { owned(out) })
}

/// `a += value * t1 * t2` (Tensor.addcmul_).
pub(crate) fn addcmul_(a: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<()> {
    let a = a.as_mut_ptr().cast();
    // SAFETY: as in `add_`.
    call(|e, n| unsafe { caseopt_aten_addcmul_(a, ptr(t1), ptr(t2), value, e, n) })
}

/// `a += value * t1 / t2` (Tensor.addcdiv_).
pub(crate) fn addcdiv_(a: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<()> {
    let a = a.as_mut_ptr().cast();
    // SAFETY: as in `add_`.
    call(|e, n| unsafe { caseopt_aten_addcdiv_(a, ptr(t1), ptr(t2), value, e, n) })
}

/// `beta * a + alpha * (m1 @ m2)` (torch.addmm with `beta` and `alpha`).
pub(crate) fn addmm(a: &Tensor, m1: &Tensor, m2: &Tensor, beta: f64, alpha: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `add`.
    call(|e, n| unsafe {
        caseopt_aten_addmm(ptr(a), ptr(m1), ptr(m2), beta, alpha, &mut out, e, n)
    })?;
    // SAFETY: `call` succeeded, so the shim stored a fresh handle.
    Ok(unsafe { owned(out) })
}

/// The 2-norm of all of `a`'s elements in its dtype, as Python's `Tensor.norm()` computes it
/// (`torch.linalg.vector_norm(a, 2)`; tch has no `linalg_vector_norm`).
pub(crate) fn vector_norm(a: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `add`.
    call(|e, n| unsafe { caseopt_aten_vector_norm(ptr(a), &mut out, e, n) })?;
    // SAFETY: `call` succeeded, so the shim stored a fresh handle.
    Ok(unsafe { owned(out) })
}

/// `a.clamp(min=min)`: aten::clamp with no upper bound, the op Python issues (tch's
/// `clamp_min` is another op).
pub(crate) fn clamp_min(a: &Tensor, min: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `add`.
    call(|e, n| unsafe { caseopt_aten_clamp_min(ptr(a), min, &mut out, e, n) })?;
    // SAFETY: `call` succeeded, so the shim stored a fresh handle.
    Ok(unsafe { owned(out) })
}

/// The masks a Bop step leaves to count its flips with: `w < 0` before the step, and after it
/// (bool tensors of `w`'s shape).
pub(crate) struct FlipMasks {
    /// `w < 0` before the step.
    pub(crate) was_negative: Tensor,
    /// `w < 0` after it.
    pub(crate) negative: Tensor,
}

/// Takes the two mask handles a successful Bop shim call stored.
///
/// # Safety
/// Both must be fresh handles the shim allocated, owned by no one else.
unsafe fn masks(was_negative: *mut c_void, negative: *mut c_void) -> FlipMasks {
    // SAFETY: per this function's contract.
    unsafe { FlipMasks { was_negative: owned(was_negative), negative: owned(negative) } }
}

/// Bop's flip (as `optim::bop::libtorch_step` flips) in `signal`'s memory: `w` becomes -1
/// exactly where `signal - threshold` and `w` are both positive or both negative, +1 elsewhere.
#[cfg(test)]
pub(crate) fn bop_flip(w: &mut Tensor, signal: &mut Tensor, threshold: f64) -> Result<FlipMasks> {
    let (mut was, mut neg) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (wp, sp) = (w.as_mut_ptr().cast(), signal.as_mut_ptr().cast());
    // SAFETY: live tch tensors, borrowed mutably for the in-place ops; the shim catches every
    // exception and on success stores a fresh handle in each mask.
    call(|e, n| unsafe { caseopt_aten_bop_flip(wp, sp, threshold, &mut was, &mut neg, e, n) })?;
    // SAFETY: `call` succeeded, so the shim stored two fresh handles.
    Ok(unsafe { masks(was, neg) })
}

/// One variable's Bop step (`v` `None`) or Bop2ndOrder step on ATen's ops, in one call to the
/// shim (`caseopt_aten_bop`): `m += gamma * (g - m)` (each operation rounded, as larq's),
/// Bop2ndOrder's `v += sigma * (g * g - v)`, then the flip of `w` by `w * m - threshold`
/// (Bop2ndOrder's divided by `sqrt(v) + eps` first). `[gamma, sigma, threshold, eps]`.
///
/// `keep`, the masks of the variable's previous step (no longer needed), is where this step's
/// go when they fit (the same shape, on the same device): two allocations fewer per variable
/// and step. Otherwise they are new tensors, and `keep` is dropped.
pub(crate) fn bop(
    w: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: Option<&mut Tensor>,
    scalars: [f64; 4],
    mut keep: Option<FlipMasks>,
) -> Result<FlipMasks> {
    let [gamma, sigma, threshold, eps] = scalars;
    let (mut was, mut neg) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (wp, mp) = (w.as_mut_ptr().cast(), m.as_mut_ptr().cast());
    let vp = v.map_or(std::ptr::null_mut(), |v| v.as_mut_ptr().cast());
    let (kw, kn) = match &mut keep {
        Some(k) => (k.was_negative.as_mut_ptr().cast(), k.negative.as_mut_ptr().cast()),
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    // SAFETY: live tch tensors (`v` null or one), the state, the weight and the kept masks
    // (owned here, null or both) borrowed mutably for the in-place ops; the shim catches every
    // exception and on success either filled the kept masks (both handles left null) or stored
    // a fresh handle in each mask.
    call(|e, n| unsafe {
        caseopt_aten_bop(
            wp,
            ptr(g),
            mp,
            vp,
            gamma,
            sigma,
            threshold,
            eps,
            kw,
            kn,
            &mut was,
            &mut neg,
            e,
            n,
        )
    })?;
    match keep {
        Some(kept) if was.is_null() && neg.is_null() => Ok(kept),
        // SAFETY: `call` succeeded without the kept masks, so the shim stored two fresh
        // handles.
        _ => Ok(unsafe { masks(was, neg) }),
    }
}

/// The CPU kernels ATen dispatches to, as `torch.backends.cpu.get_cpu_capability()` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuCapability {
    /// The baseline build: no fused multiply-add anywhere.
    Default,
    /// x86-64 AVX2 (compiled with `-mavx2 -mfma`).
    Avx2,
    /// x86-64 AVX-512 (compiled with FMA too).
    Avx512,
    /// Another architecture's build (VSX, ZVECTOR, SVE), or no answer.
    Other,
}

impl CpuCapability {
    /// Asked of ATen once per process, as ATen itself decides once.
    pub(crate) fn get() -> Self {
        static CAPABILITY: OnceLock<CpuCapability> = OnceLock::new();
        *CAPABILITY.get_or_init(|| {
            // SAFETY: takes nothing, catches every exception.
            let raw = unsafe { caseopt_aten_cpu_capability() };
            match raw {
                0 => CpuCapability::Default,
                1 => CpuCapability::Avx2,
                2 => CpuCapability::Avx512,
                _ => CpuCapability::Other,
            }
        })
    }

    /// Whether ATen's element-wise kernels round `a + b * c` once (fused multiply-add), in their
    /// vector bodies and their scalar tails alike: measured for AVX2 and AVX-512 against
    /// torch 2.13 (docs/parity.md); the baseline build has no FMA to contract into.
    pub(crate) fn contracts(self) -> bool {
        matches!(self, CpuCapability::Avx2 | CpuCapability::Avx512)
    }
}

/// The address of the `TensorImpl` behind `t` (0 for an undefined tensor): what every handle
/// of one variable shares, and what `set_data` keeps while it replaces the storage (and with
/// it the data address). Ownership of variables by routers is keyed by it
/// (`router/ownership.rs`).
pub(crate) fn tensor_impl(t: &Tensor) -> usize {
    // SAFETY: `as_ptr` is the `at::Tensor*` of a live tch handle borrowed for the call; the
    // C++ side only reads the handle's TensorImpl pointer and does not throw.
    unsafe { caseopt_tensor_impl(t.as_ptr() as *const c_void) as usize }
}

/// MKL's `vsSqrt`/`vdSqrt` through their Fortran entry points: `(n, in, out, mode)`.
type VmlSqrtFn<T> = unsafe extern "C" fn(*const i32, *const T, *mut T, *const i64);

/// The square roots of ATen's CPU `sqrt` where libtorch has MKL (every x86-64 Linux wheel):
/// MKL's vector square root, not the correctly rounded one, called as `at::vml::vsqrt` calls it.
/// Its result is a function of each element alone (the same whatever the run's length or the
/// element's place in it, measured), so the fused kernels can call it on blocks of their own.
#[derive(Clone, Copy)]
pub(crate) struct VmlSqrt<T: 'static> {
    f: VmlSqrtFn<T>,
}

/// `VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE` (mkl_vml_defines.h), ATen's mode.
const VML_MODE: i64 = 0x2 | 0x14_0000 | 0x100;

impl<T: Real> BlockSqrt<T> for VmlSqrt<T> {
    const PER_ELEMENT: bool = false;

    #[inline(always)]
    fn sqrt_block(self, x: &mut [T]) {
        // Blocks are a few hundred elements: never past i32.
        let n = x.len() as i32;
        let p = x.as_mut_ptr();
        // SAFETY: `f` is MKL's square root over `n` elements of `T` (see `vml_sqrt`), reading
        // `n` from `p` and writing `n` to `p`, which MKL allows in place (ATen calls it so on
        // its own buffer); it neither keeps the pointers nor raises (errors ignored by mode).
        unsafe { (self.f)(&n, p, p, &VML_MODE) }
    }
}

/// The square root ATen's CPU `sqrt` computes `T` with, when it is MKL's (else `None`: ATen's is
/// the correctly rounded one). Asked of the shim once per process.
pub(crate) fn vml_sqrt<T: Real>() -> Option<VmlSqrt<T>> {
    static F32: OnceLock<usize> = OnceLock::new();
    static F64: OnceLock<usize> = OnceLock::new();
    let (cell, dtype) = match T::BITS {
        32 => (&F32, 0),
        _ => (&F64, 1),
    };
    // SAFETY: takes an integer, returns a function pointer or null.
    let raw = *cell.get_or_init(|| unsafe { caseopt_aten_vml_sqrt(dtype) } as usize);
    if raw == 0 {
        return None;
    }
    // SAFETY: the shim returned MKL's `v?Sqrt` Fortran entry for exactly this element type
    // (`dtype` follows `T::BITS`), whose signature `VmlSqrtFn<T>` spells.
    let f = unsafe { std::mem::transmute::<usize, VmlSqrtFn<T>>(raw) };
    Some(VmlSqrt { f })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn scalar_ops_match_their_definitions() {
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        let b = Tensor::from_slice(&[4.0f64, 5.0, 6.0]);
        let sum = Vec::<f64>::try_from(add(&a, &b, 0.5).unwrap()).unwrap();
        assert_eq!(sum, vec![3.0, 4.5, 6.0]);
        let mut c = a.copy();
        add_(&mut c, &b, -1.0).unwrap();
        assert_eq!(Vec::<f64>::try_from(&c).unwrap(), vec![-3.0; 3]);
        let prod = Vec::<f64>::try_from(addcmul(&a, &b, &b, 2.0).unwrap()).unwrap();
        assert_eq!(prod, vec![33.0, 52.0, 75.0]);
        let mut c = a.copy();
        addcmul_(&mut c, &a, &b, -1.0).unwrap();
        assert_eq!(Vec::<f64>::try_from(&c).unwrap(), vec![-3.0, -8.0, -15.0]);
        let mut c = a.copy();
        addcdiv_(&mut c, &b, &a, 0.5).unwrap();
        assert_eq!(Vec::<f64>::try_from(&c).unwrap(), vec![3.0, 3.25, 4.0]);
    }

    #[test]
    fn aten_errors_come_back_as_errors() {
        let a = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        let err = add(&a, &b, 1.0).unwrap_err().to_string();
        assert!(err.contains("size"), "{err}");
        let mut c = a.copy();
        assert!(addcdiv_(&mut c, &a, &b, 1.0).is_err());
    }

    #[test]
    fn vml_sqrt_is_torchs_sqrt() {
        let x: Vec<f32> = (1..=3000).map(|i| (i as f32 * 0.37).sin().abs() * 1e-3).collect();
        let ours = |x: &[f32]| -> Vec<f32> {
            let mut y = x.to_vec();
            match vml_sqrt::<f32>() {
                Some(v) => y.chunks_mut(256).for_each(|b| v.sqrt_block(b)),
                None => y.iter_mut().for_each(|e| *e = e.sqrt()),
            }
            y
        };
        let torch = Vec::<f32>::try_from(Tensor::from_slice(&x).sqrt()).unwrap();
        assert_eq!(ours(&x), torch);
        let x64: Vec<f64> = x.iter().map(|&e| e as f64 * 1.1).collect();
        let mut y = x64.clone();
        match vml_sqrt::<f64>() {
            Some(v) => v.sqrt_block(&mut y),
            None => y.iter_mut().for_each(|e| *e = e.sqrt()),
        }
        assert_eq!(y, Vec::<f64>::try_from(Tensor::from_slice(&x64).sqrt()).unwrap());
    }

    #[test]
    fn capability_is_known_on_x86_64() {
        let c = CpuCapability::get();
        if cfg!(target_arch = "x86_64") {
            assert_ne!(c, CpuCapability::Other);
        }
    }
}
