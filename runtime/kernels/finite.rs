//! A NaN/infinity scan over many CPU tensors in one pass, for a router's non-finite gradient
//! check: each element is read once, four bytes of f32 at memory speed, with no temporary
//! tensor and no ATen dispatch per tensor (libtorch's `sum` per gradient costs a parallel region
//! each, which on a busy machine waits on its worker threads far longer than the read).
//!
//! Only contiguous f32/f64 CPU tensors are read here; the others are handed back for the
//! caller to check its own way.

use super::meta::{Grads, Meta, CPU};
use super::{address, threads_for, Simd, DOUBLE, FLOAT, MIN_ELEMENTS_PER_THREAD};

/// The result of [`scan_grads`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct FiniteScan {
    /// Position (in the input order) of the first scanned tensor holding a NaN or an infinity.
    pub(crate) first_non_finite: Option<usize>,
    /// Positions of the tensors not scanned (not contiguous f32/f64 on the CPU, or with an
    /// unreadable layout), to be checked another way.
    pub(crate) unscanned: Vec<usize>,
}

/// One tensor to read: its position and its extent.
#[derive(Debug, Clone, Copy)]
struct Span {
    index: usize,
    extent: Extent,
}

/// Where a readable gradient's elements are: what the scan needs of its metadata, kept by
/// [`Grads`](super::meta::Grads) between reading it and scanning.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent {
    addr: usize,
    len: usize,
    f64: bool,
}

impl Extent {
    /// Nothing to read: a gradient checked another way (a staged step's, see
    /// [`stage`](super::stage)).
    pub(crate) const CHECKED: Extent = Extent { addr: 0, len: 0, f64: false };
}

/// The extent of a tensor the scan can read (contiguous f32/f64 on the CPU), or `None`.
pub(crate) fn extent(m: &Meta) -> Option<Extent> {
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
    let addr = address(m, "grad", align).ok()?;
    Some(Extent { addr, len, f64 })
}

/// Scans several optimizers' gradients, as the router collected them with their metadata
/// read in the same pass, for NaN and infinity on up to `threads` threads (fewer when there is
/// too little to read): positions count the gradients present (with a handle), in order,
/// across `grads`.
pub(crate) fn scan_grads(grads: &[Grads], threads: usize, scratch: &mut ScanScratch) -> FiniteScan {
    let extents = grads.iter().flat_map(|g| g.present().map(|(_, e)| e));
    scan_extents(extents, threads, &mut scratch.0)
}

/// The scan's list of spans, kept between steps by its caller: built afresh each step, it was a
/// 64 KB allocation on 2000 gradients, whose free makes glibc consolidate its heap every step.
#[derive(Debug, Default)]
pub(crate) struct ScanScratch(Vec<Span>);

/// The scan over metadata read from tensors that the caller keeps alive (and unwritten) for
/// the call: only [`scan_grads`] (and the tests' `scan_finite`) call it, whose arguments
/// guarantee that.
fn scan_extents(
    extents: impl Iterator<Item = Option<Extent>>,
    threads: usize,
    spans: &mut Vec<Span>,
) -> FiniteScan {
    spans.clear();
    let mut out = FiniteScan::default();
    for (index, e) in extents.enumerate() {
        match e {
            Some(extent) if extent.len > 0 => spans.push(Span { index, extent }),
            Some(_) => {}
            None => out.unscanned.push(index),
        }
    }
    let spans: &[Span] = spans;
    let total: usize = spans.iter().map(|s| s.extent.len).sum();
    // A scan reads 4 bytes per f32 element where an update moves 20 to 28: a thread pays off
    // only over proportionally more elements.
    let threads = threads_for(total, threads, 4 * MIN_ELEMENTS_PER_THREAD);
    let simd = Simd::detect();
    let work = |t: usize| -> Option<usize> {
        let (lo, hi) = super::share(total, threads, t);
        first_in_range(spans, lo, hi, simd)
    };
    // Each task keeps the first bad span of its share; the earliest of those is the answer.
    let firsts: Vec<std::sync::atomic::AtomicUsize> =
        (0..threads).map(|_| std::sync::atomic::AtomicUsize::new(usize::MAX)).collect();
    super::pool::run(threads, |t| {
        if let Some(i) = work(t) {
            firsts[t].store(i, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let found = firsts.iter().map(|f| f.load(std::sync::atomic::Ordering::Relaxed)).min();
    let found = found.filter(|&i| i != usize::MAX);
    out.first_non_finite = found;
    out
}

/// The first span holding a non-finite value within elements `[lo, hi)` of the concatenation.
fn first_in_range(spans: &[Span], lo: usize, hi: usize, simd: Simd) -> Option<usize> {
    for (k, a, n) in super::pieces(spans.iter().map(|s| s.extent.len), lo, hi) {
        let Span { index, extent: Extent { addr, f64, .. } } = spans[k];
        let bad = if f64 {
            // SAFETY: `extent` took `addr` from the data address of a live, contiguous f64 CPU
            // tensor of `len` elements, aligned; the caller's borrow (`'t`) keeps it allocated
            // during the scan; `a + n <= len`. The memory is only read (other handles must not
            // write it meanwhile: the contract of any tch read).
            let xs = unsafe { std::slice::from_raw_parts((addr as *const f64).add(a), n) };
            non_finite(simd, xs)
        } else {
            // SAFETY: as above, for an f32 tensor.
            let xs = unsafe { std::slice::from_raw_parts((addr as *const f32).add(a), n) };
            non_finite(simd, xs)
        };
        if bad {
            return Some(index);
        }
    }
    None
}

/// Elements per block between early exits.
const BLOCK: usize = 4096;

/// A float's bits, and the mask of its exponent: all exponent bits set means NaN or infinity.
trait FloatBits: Copy {
    type Bits: Copy + Ord + Default + std::ops::BitAnd<Output = Self::Bits>;
    const EXP: Self::Bits;
    fn bits(self) -> Self::Bits;
}

impl FloatBits for f32 {
    type Bits = u32;
    const EXP: u32 = 0x7f80_0000;
    #[inline(always)]
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl FloatBits for f64 {
    type Bits = u64;
    const EXP: u64 = 0x7ff0_0000_0000_0000;
    #[inline(always)]
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

/// Whether any element is NaN or infinite: an integer max over the masked exponents, which
/// the compiler vectorises (a float test would not).
#[inline(always)]
fn any_non_finite<T: FloatBits>(xs: &[T]) -> bool {
    xs.chunks(BLOCK)
        .any(|b| b.iter().fold(T::Bits::default(), |acc, x| acc.max(x.bits() & T::EXP)) == T::EXP)
}

/// [`any_non_finite`] compiled for AVX2 (the baseline x86-64 has no unsigned vector max, so
/// its build runs several times slower than the memory it reads).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn any_non_finite_avx2<T: FloatBits>(xs: &[T]) -> bool {
    any_non_finite(xs)
}

/// [`any_non_finite`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn any_non_finite_avx512<T: FloatBits>(xs: &[T]) -> bool {
    any_non_finite(xs)
}

/// [`any_non_finite`] built for `simd`, which must come from [`Simd::detect`].
fn non_finite<T: FloatBits>(simd: Simd, xs: &[T]) -> bool {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` reports AVX-512 only when the CPU has these features.
        Simd::Avx512 => unsafe { any_non_finite_avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` reports AVX2 only when the CPU has it.
        Simd::Avx2 => unsafe { any_non_finite_avx2(xs) },
        Simd::Baseline => any_non_finite(xs),
    }
}

#[cfg(test)]
mod tests {
    use super::super::meta::MetaReader;
    use super::*;
    use tch::Tensor;
    use tch::{Device, Kind};

    /// The scan over any tensors, reading their metadata first.
    fn scan_finite<'t>(
        tensors: impl IntoIterator<Item = &'t Tensor>,
        threads: usize,
        reader: &mut MetaReader,
    ) -> FiniteScan {
        let metas = reader.read(tensors.into_iter().map(Some), false);
        scan_extents(metas.iter().map(extent), threads, &mut Vec::new())
    }

    #[test]
    fn the_bit_tests_find_every_kind_of_non_finite_value() {
        // The baseline loop and the widest build this CPU runs.
        for simd in [Simd::Baseline, Simd::detect()] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                let mut xs = vec![1.0f32; 10_000];
                assert!(!non_finite(simd, &xs));
                xs[9_999] = bad;
                assert!(non_finite(simd, &xs), "{simd:?} {bad}");
            }
            // The largest finite values and subnormals are finite.
            assert!(!non_finite(simd, &[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, -0.0]));
            assert!(!non_finite(simd, &[f64::MAX, f64::MIN, 5e-324]));
            assert!(non_finite(simd, &[0.0, f64::NAN]));
            assert!(non_finite(simd, &[f64::NEG_INFINITY]));
            assert!(non_finite(simd, &[1.0, f64::INFINITY]));
        }
    }

    fn cpu(kind: Kind, n: i64) -> Tensor {
        Tensor::ones([n], (kind, Device::Cpu))
    }

    #[test]
    fn the_first_bad_tensor_is_found_and_the_unreadable_are_handed_back() {
        let ts = vec![
            cpu(Kind::Float, 100),
            cpu(Kind::Double, 7),
            cpu(Kind::Float, 0),
            cpu(Kind::Half, 8),
            cpu(Kind::Float, 48).view([6, 8]).tr(),
            cpu(Kind::Float, 5),
            cpu(Kind::Double, 3),
        ];
        assert_eq!(
            scan_finite(&ts, 1, &mut MetaReader::default()),
            FiniteScan { first_non_finite: None, unscanned: vec![3, 4] }
        );
        let _ = ts[6].get(2).fill_(f64::INFINITY);
        assert_eq!(scan_finite(&ts, 1, &mut MetaReader::default()).first_non_finite, Some(6));
        let _ = ts[5].get(0).fill_(f64::NAN);
        assert_eq!(scan_finite(&ts, 1, &mut MetaReader::default()).first_non_finite, Some(5));
        // Not read: a NaN in the half-precision tensor is the caller's to find.
        let _ = ts[3].get(0).fill_(f64::NAN);
        assert_eq!(scan_finite(&ts, 1, &mut MetaReader::default()).first_non_finite, Some(5));
    }

    #[test]
    fn threads_split_the_scan_and_agree() {
        // Enough for four threads; bad values near the end of the second and the last tensor.
        let ts = vec![
            cpu(Kind::Float, 3_000_000),
            cpu(Kind::Float, 2_500_001),
            cpu(Kind::Double, 1_000_000),
        ];
        for threads in [1, 2, 4] {
            assert_eq!(
                scan_finite(&ts, threads, &mut MetaReader::default()).first_non_finite,
                None,
                "{threads}"
            );
        }
        let _ = ts[2].get(999_999).fill_(f64::NAN);
        let _ = ts[1].get(2_500_000).fill_(f64::INFINITY);
        for threads in [1, 2, 4] {
            assert_eq!(
                scan_finite(&ts, threads, &mut MetaReader::default()).first_non_finite,
                Some(1),
                "{threads}"
            );
        }
    }
}
