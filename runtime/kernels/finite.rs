//! A NaN/infinity scan over many CPU tensors in one pass, for a router's non-finite gradient
//! check: each element is read once, four bytes of f32 at memory speed, with no temporary
//! tensor and no ATen dispatch per tensor (libtorch's `sum` per gradient costs a parallel region
//! each, which on a busy machine waits on its worker threads far longer than the read).
//!
//! Only contiguous f32/f64 CPU tensors are read here; the others are handed back for the
//! caller to check its own way.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::isa::{Isa, IsaLoop};
use super::metadata::{Extent, Grads};
use super::pool;
use super::split::{pieces, share, threads_for, MIN_ELEMENTS_PER_THREAD};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    index: usize,
    extent: Extent,
}

/// Scans several optimizers' gradients, as the router collected them with their metadata
/// read in the same pass, for NaN and infinity on up to `threads` threads (fewer when there is
/// too little to read): positions count the gradients present (with a handle), in order,
/// across `grads`.
pub(crate) fn scan_grads(grads: &[Grads], threads: usize, scratch: &mut ScanScratch) -> FiniteScan {
    let extents = grads.iter().enumerate().flat_map(|(r, g)| g.present().map(move |(_, e)| (r, e)));
    scan_extents(extents, threads, scratch)
}

/// The scan's lists, kept between steps by its caller: built afresh each step, the spans were a
/// 64 KB allocation on 2000 gradients, whose free makes glibc consolidate its heap every step.
#[derive(Debug, Default)]
pub(crate) struct ScanScratch {
    spans: Vec<Span>,
    /// Each group's spans (`start..end`) and elements.
    groups: Vec<(usize, usize, usize)>,
}

/// The scan over metadata read from tensors that the caller keeps alive (and unwritten) for
/// the call: only [`scan_grads`] (and the tests' `scan_finite`) call it, whose arguments
/// guarantee that. Each extent comes with its group, the optimizer (rule) whose gradient it
/// is, in non-decreasing order; positions in the result count the extents.
fn scan_extents(
    extents: impl Iterator<Item = (usize, Option<Extent>)>,
    threads: usize,
    scratch: &mut ScanScratch,
) -> FiniteScan {
    let ScanScratch { spans, groups } = scratch;
    groups.clear();
    let mut out = FiniteScan::default();
    // Steps from one gradient to the next that go down in memory.
    let mut downward = 0;
    // The spans are rewritten only where they changed: the other threads read the list, so a
    // span written again with the same values costs a fetch of its line from their caches
    // (2000 spans: 21-22 us rewritten, 8 us compared, Zen 4). A gradient accumulated in place
    // keeps its address from one step to the next.
    let (mut n, mut last) = (0usize, None::<usize>);
    for (index, (group, e)) in extents.enumerate() {
        if groups.len() <= group {
            groups.resize(group + 1, (n, n, 0));
        }
        match e {
            Some(extent) if extent.len > 0 => {
                groups[group].1 = n + 1;
                groups[group].2 += extent.len;
                downward += usize::from(last.is_some_and(|a| a > extent.addr));
                last = Some(extent.addr);
                let span = Span { index, extent };
                match spans.get_mut(n) {
                    Some(s) if *s == span => {}
                    Some(s) => *s = span,
                    None => spans.push(span),
                }
                n += 1;
            }
            Some(_) => {}
            None => out.unscanned.push(index),
        }
    }
    spans.truncate(n);
    let total: usize = groups.iter().map(|g| g.2).sum();
    // Autograd allocates the gradients as the backward pass reaches their variables, from the
    // last layer to the first: in variable order they mostly lie downward in memory, which the
    // hardware prefetcher follows poorly (2000 such gradients of 1 KiB, out of the cache, read
    // in 45-95 us in variable order and in 28 us upward). So each share is read upward in
    // memory: backward through the list when most steps go down.
    let upward = 2 * downward > spans.len();
    // A scan reads 4 bytes per f32 element where an update moves 20 to 28, but a gradient
    // list's small tensors are read at cache-miss speed, not the memory's: a second thread
    // pays from as few elements as for an update. (Asking 4x as many left many-small's 512,000
    // to one thread: its scan took 62-66 us there against 33-47 us on two, AMD EPYC Zen 4,
    // 2026-12-07; 153,600 elements, 12.7 us against 9.8.)
    let threads = threads_for(total, threads, MIN_ELEMENTS_PER_THREAD);
    // Each group (an optimizer's gradients) is split as its fused pass will split it, so that
    // each thread reads the gradients it is about to update and no gradient goes from one core
    // to the other between the two. A group too small for a second thread is the calling
    // thread's, as its update is; when those add up to more than a thread's share of the
    // whole, the whole is split evenly instead.
    let group_threads = |elements: usize| threads_for(elements, threads, MIN_ELEMENTS_PER_THREAD);
    let unsplit: usize = groups.iter().filter(|g| group_threads(g.2) == 1).map(|g| g.2).sum();
    let by_group = threads > 1 && unsplit <= total / threads;
    let spans: &[Span] = spans;
    let groups: &[(usize, usize, usize)] = groups;
    let isa = Isa::current();
    let read = |spans: &[Span], lo: usize, hi: usize| {
        if upward {
            first_in_range_backward(spans, lo, hi, isa)
        } else {
            first_in_range(spans, lo, hi, isa)
        }
    };
    let work = |t: usize| -> Option<usize> {
        if !by_group {
            let (lo, hi) = share(total, threads, t);
            return read(spans, lo, hi);
        }
        groups.iter().find_map(|&(start, end, elements)| {
            let k = group_threads(elements);
            if t >= k {
                return None;
            }
            let (lo, hi) = share(elements, k, t);
            read(&spans[start..end.max(start)], lo, hi)
        })
    };
    // Each task keeps the first bad span of its share; the earliest of those is the answer.
    let firsts: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(usize::MAX)).collect();
    pool::run(threads, |t| {
        if let Some(i) = work(t) {
            firsts[t].store(i, Ordering::Relaxed);
        }
    });
    let found = firsts.iter().map(|f| f.load(Ordering::Relaxed)).min();
    let found = found.filter(|&i| i != usize::MAX);
    out.first_non_finite = found;
    out
}

/// The first span holding a non-finite value within elements `[lo, hi)` of the concatenation.
fn first_in_range(spans: &[Span], lo: usize, hi: usize, isa: Isa) -> Option<usize> {
    for (k, a, n) in pieces(spans.iter().map(|s| s.extent.len), lo, hi) {
        if piece_non_finite(&spans[k], a, n, isa) {
            return Some(spans[k].index);
        }
    }
    None
}

/// [`first_in_range`], reading the pieces from the last to the first (so the whole range: the
/// first span found bad is the last one read).
fn first_in_range_backward(spans: &[Span], lo: usize, hi: usize, isa: Isa) -> Option<usize> {
    // The spans the range touches, `first..=last`, and where `last` starts.
    let (mut first, mut last, mut offset) = (None, None, 0);
    for (k, s) in spans.iter().enumerate() {
        if offset >= hi {
            break;
        }
        if offset + s.extent.len > lo {
            first.get_or_insert(k);
            last = Some((k, offset));
        }
        offset += s.extent.len;
    }
    let (Some(first), Some((mut k, mut start))) = (first, last) else {
        return None;
    };
    let mut found = None;
    loop {
        let (a, b) = (lo.max(start), hi.min(start + spans[k].extent.len));
        if a < b && piece_non_finite(&spans[k], a - start, b - a, isa) {
            found = Some(spans[k].index);
        }
        if k == first {
            return found;
        }
        k -= 1;
        start -= spans[k].extent.len;
    }
}

/// Whether elements `[a, a + n)` of `span` hold a NaN or an infinity (`a + n` within its
/// length).
fn piece_non_finite(span: &Span, a: usize, n: usize, isa: Isa) -> bool {
    let Extent { addr, len, f64 } = span.extent;
    debug_assert!(a + n <= len);
    if f64 {
        // SAFETY: `metadata::extent` took `addr` from the data address of a contiguous f64
        // CPU tensor of `len` elements, aligned, which `scan_extents`'s caller keeps alive
        // for the scan (`scan_grads`: the `Grads` hold a handle to each gradient); `a + n <=
        // len` (the callers take pieces of the spans' lengths). The memory is only read
        // (other handles must not write it meanwhile: the contract of any tch read).
        let xs = unsafe { std::slice::from_raw_parts((addr as *const f64).add(a), n) };
        non_finite(isa, xs)
    } else {
        // SAFETY: as above, for an f32 tensor.
        let xs = unsafe { std::slice::from_raw_parts((addr as *const f32).add(a), n) };
        non_finite(isa, xs)
    }
}

/// Elements per block between early exits.
const BLOCK: usize = 4096;

/// A float's bits, and the mask of its exponent: all exponent bits set means NaN or infinity.
trait FloatBits: Copy {
    type Bits: Copy + Eq + std::ops::BitAnd<Output = Self::Bits>;
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

/// Whether any element is NaN or infinite: an OR over "the exponent bits are all set" tests,
/// which the compiler vectorises with integer compares every x86-64 has (SSE2's `pcmpeqd`; an
/// unsigned max of the masked exponents, the earlier form, needs SSE4.1 and ran the baseline
/// build several times slower than the memory it reads). A float test would not vectorise.
#[inline(always)]
fn any_non_finite<T: FloatBits>(xs: &[T]) -> bool {
    xs.chunks(BLOCK).any(|b| b.iter().fold(false, |acc, x| acc | (x.bits() & T::EXP == T::EXP)))
}

/// [`any_non_finite`] as a loop for [`Isa::run`].
struct AnyNonFinite<'a, T>(&'a [T]);

impl<T: FloatBits> IsaLoop for AnyNonFinite<'_, T> {
    type Output = bool;
    #[inline(always)]
    fn run(self) -> bool {
        any_non_finite(self.0)
    }
}

/// [`any_non_finite`] built for `isa`.
fn non_finite<T: FloatBits>(isa: Isa, xs: &[T]) -> bool {
    isa.run(AnyNonFinite(xs))
}

#[cfg(test)]
mod tests {
    use super::super::metadata::{extent, MetaReader};
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
        scan_extents(metas.iter().map(|m| (0, extent(m))), threads, &mut ScanScratch::default())
    }

    #[test]
    fn the_bit_tests_find_every_kind_of_non_finite_value() {
        // Every build this CPU runs.
        for isa in Isa::available() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                let mut xs = vec![1.0f32; 10_000];
                assert!(!non_finite(isa, &xs));
                xs[9_999] = bad;
                assert!(non_finite(isa, &xs), "{isa:?} {bad}");
            }
            // The largest finite values and subnormals are finite.
            assert!(!non_finite(isa, &[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, -0.0]));
            assert!(!non_finite(isa, &[f64::MAX, f64::MIN, 5e-324]));
            assert!(non_finite(isa, &[0.0, f64::NAN]));
            assert!(non_finite(isa, &[f64::NEG_INFINITY]));
            assert!(non_finite(isa, &[1.0, f64::INFINITY]));
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
    fn gradients_lying_downward_are_read_backward_and_the_first_bad_one_is_found() {
        // Spans in list order are the tensors from the last allocated to the first, as autograd
        // leaves a network's gradients: most steps go down in memory (where the allocator
        // places later tensors higher) or the list order is read as it is; the answer must be
        // the same either way. Two bad tensors, so that a backward read must not stop at the
        // first it meets.
        let ts: Vec<Tensor> = (0..40).map(|k| cpu(Kind::Float, 37 + 5 * k)).collect();
        let listed: Vec<&Tensor> = ts.iter().rev().collect();
        let _ = listed[31].get(3).fill_(f64::NAN);
        let _ = listed[9].get(36).fill_(f64::INFINITY);
        let mut reader = MetaReader::default();
        for threads in [1, 2, 3] {
            let scan = scan_finite(listed.iter().copied(), threads, &mut reader);
            assert_eq!(scan.first_non_finite, Some(9), "{threads} threads");
        }
        // Both walks over every range of the concatenation, under every set: the same answer.
        let metas = reader.read(listed.iter().copied().map(Some), false);
        let spans: Vec<Span> = metas
            .iter()
            .map(extent)
            .enumerate()
            .map(|(index, e)| Span { index, extent: e.unwrap() })
            .collect();
        let total: usize = spans.iter().map(|s| s.extent.len).sum();
        let cuts = [0, 1, 36, 37, 300, 301, 1000, total - 1, total];
        for isa in Isa::available() {
            for &lo in &cuts {
                for &hi in cuts.iter().filter(|&&hi| hi >= lo) {
                    assert_eq!(
                        first_in_range_backward(&spans, lo, hi, isa),
                        first_in_range(&spans, lo, hi, isa),
                        "{isa:?} [{lo}, {hi})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_kept_span_list_follows_the_gradients_from_one_scan_to_the_next() {
        // The spans are rewritten only where they changed: a list kept between scans must
        // still follow a gradient that moved, one that went away and one that came.
        let (a, b, c, d, e) = (
            cpu(Kind::Float, 9),
            cpu(Kind::Float, 5),
            cpu(Kind::Double, 6),
            cpu(Kind::Float, 7),
            cpu(Kind::Float, 3),
        );
        let mut reader = MetaReader::default();
        let mut scratch = ScanScratch::default();
        let mut scan = |ts: &[&Tensor]| {
            let metas = reader.read(ts.iter().copied().map(Some), false);
            scan_extents(metas.iter().map(|m| (0, extent(m))), 1, &mut scratch)
        };
        assert_eq!(scan(&[&a, &b, &c]).first_non_finite, None);
        let _ = d.get(6).fill_(f64::NAN);
        // `d` in `b`'s place: same length, another address.
        assert_eq!(scan(&[&a, &d, &c]).first_non_finite, Some(1));
        assert_eq!(scan(&[&a, &b, &c]).first_non_finite, None);
        // Shorter, then longer than the kept list.
        let _ = e.get(2).fill_(f64::INFINITY);
        assert_eq!(scan(&[&a, &c]).first_non_finite, None);
        assert_eq!(scan(&[&a, &b, &c, &e]).first_non_finite, Some(3));
        let _ = c.get(0).fill_(f64::NAN);
        assert_eq!(scan(&[&c]).first_non_finite, Some(0));
        assert_eq!(scan(&[&a, &b]).first_non_finite, None);
    }

    #[test]
    fn groups_split_as_their_updates_and_the_first_bad_one_in_order_is_found() {
        // Two optimizers' gradients, each large enough for two threads, then a third too
        // small for a second one: scanned group by group (each split in two, the small one on
        // the calling thread), or evenly when the small groups outweigh a thread's share.
        let big = || cpu(Kind::Float, 200_000);
        let ts = [big(), big(), big(), big(), cpu(Kind::Float, 1000)];
        let mut reader = MetaReader::default();
        let mut scan = |groups: &[usize], threads| {
            let metas = reader.read(ts.iter().map(Some), false);
            let extents = groups.iter().zip(metas).map(|(&g, m)| (g, extent(m)));
            scan_extents(extents, threads, &mut ScanScratch::default()).first_non_finite
        };
        let layouts: [&[usize]; 3] = [&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 1], &[0, 0, 0, 0, 0]];
        for (threads, groups) in [1, 2, 4].into_iter().flat_map(|t| layouts.map(|g| (t, g))) {
            assert_eq!(scan(groups, threads), None, "{threads} {groups:?}");
        }
        let _ = ts[4].get(999).fill_(f64::NAN);
        let _ = ts[2].get(0).fill_(f64::INFINITY);
        let _ = ts[1].get(199_999).fill_(f64::NAN);
        for (threads, groups) in [1, 2, 4].into_iter().flat_map(|t| layouts.map(|g| (t, g))) {
            assert_eq!(scan(groups, threads), Some(1), "{threads} {groups:?}");
        }
        let _ = ts[1].get(199_999).fill_(0.0);
        for (threads, groups) in [1, 2, 4].into_iter().flat_map(|t| layouts.map(|g| (t, g))) {
            assert_eq!(scan(groups, threads), Some(2), "{threads} {groups:?}");
        }
        // Five groups too small for a second thread each: split evenly as one list.
        let small: Vec<Tensor> = (0..5).map(|_| cpu(Kind::Float, 100_000)).collect();
        let _ = small[3].get(5).fill_(f64::NAN);
        let metas = reader.read(small.iter().map(Some), false);
        let extents = metas.iter().enumerate().map(|(g, m)| (g, extent(m)));
        let found = scan_extents(extents, 2, &mut ScanScratch::default()).first_non_finite;
        assert_eq!(found, Some(3));
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
