//! Bop steps staged for the router's non-finite check: the gradient is checked in the same pass
//! that computes the update, and nothing the user can see changes until every gradient of the
//! step is known to be finite.
//!
//! The router's default promise is that a step with a NaN or an infinity in any gradient
//! changes nothing. Checked first, in a pass of its own, that costs a read of every gradient
//! (4 bytes per element, about 0.3x of a Bop step's bandwidth bound on binarynet). Staged, the
//! pass that reads the gradient also computes the update, but writes it where it can still be
//! dropped:
//!
//! - the new moving average goes to a second state buffer of the same layout, with streaming
//!   stores (no read of the destination), so that reading `m` and writing `m'` moves the same
//!   bytes as updating `m` in place;
//! - a weight's new sign is not written: each line of 16 weights whose signs change is recorded
//!   (its address and a 16-bit mask), which is few once training has settled.
//!
//! [`commit`] then exchanges the two buffers' memory (one pointer swap per buffer, which every
//! view of the state sees), writes the recorded lines and bumps the version counters of the
//! covered parameters and the exchanged state buffers; dropping a [`Staged`] leaves the
//! parameters and the state (and their versions) as they were. Both results are bit for bit those of the in-place
//! kernel ([`math::bop`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tch::Tensor;

use super::admit::KernelJob;
use super::batch::{slice_mut, Batch, Workspace};
use super::isa::Isa;
use super::math::{self, BopScalars, FlipLine};
use super::metadata::{Status, TensorMeta, CPU, DOUBLE, FLOAT};
use super::split::{pieces, share, threads_for, MIN_ELEMENTS_PER_THREAD};
use super::{pool, storage, Unfit};

/// A line of weights to write at commit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flip {
    /// Address of its first element (f32).
    addr: usize,
    count: usize,
    negative: u16,
}

/// A staged Bop step ([`Batch::stage_bop`]): which variables it covers, what their gradients
/// held, and what [`commit`] will write.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    /// The variables whose update is staged (and whose gradients were checked), in order.
    pub(crate) covered: Vec<usize>,
    /// The first covered variable whose gradient holds a NaN or an infinity.
    pub(crate) first_non_finite: Option<usize>,
    /// Each covered non-empty variable's (index, parameter address, length), checked again at
    /// commit.
    params: Vec<(usize, usize, usize)>,
    /// Indices of the state buffers whose staged copy becomes the state at commit.
    buffers: Vec<usize>,
    /// The lines of weights to write, one list per thread of the staging pass.
    flips: Vec<Vec<Flip>>,
    /// Each covered variable's index and the weights whose sign the step changes.
    pub(crate) flipped: Vec<(usize, usize)>,
}

impl Staged {
    /// Gives the staging's scratch back to `ws` for the next step.
    pub(crate) fn recycle(self, ws: &mut Workspace) {
        let mut flips = self.flips;
        flips.iter_mut().for_each(Vec::clear);
        ws.flips = flips;
    }
}

impl<'t> Batch<'_, 't> {
    /// Stages one Bop step over the queued f32 variables (f64 ones are left out of
    /// [`Staged::covered`]): every variable's state must be a run of one of `state_buffers`,
    /// and `copies[k]` the second copy of `state_buffers[k]` (same size and dtype), which
    /// receives the new state. Nothing any parameter or state tensor shows is written.
    ///
    /// Fails, having written nothing, when two operands share memory that one of them writes,
    /// or a state is not in a buffer with a usable second copy.
    pub(crate) fn stage_bop(
        self,
        s: BopScalars<f32>,
        state_buffers: &'t [Tensor],
        copies: &'t [Option<Tensor>],
        threads: usize,
    ) -> Result<Staged, Unfit> {
        let ws = self.ws;
        // Staging writes nothing the user sees: the versions are bumped at commit.
        ws.to_bump.clear();
        ws.prove_disjoint(1).map_err(Unfit::Overlap)?;
        let n = state_buffers.len();
        let metas = ws
            .state_buffers
            .read(state_buffers.iter().map(Some).chain(copies.iter().map(Option::as_ref)), true);
        let (bufs, copy_metas) = metas.split_at(n);
        // Each buffer's byte range, and its second copy's address (0: none usable).
        let mut ranges = Vec::with_capacity(n);
        for (b, a) in bufs.iter().zip(copy_metas) {
            let ok = |m: &TensorMeta| {
                m.status() == Status::Ok
                    && m.device_code() == CPU
                    && m.dtype() == FLOAT
                    && m.contiguous()
                    && m.data().is_multiple_of(64)
            };
            let usable = ok(b) && ok(a) && a.numel() == b.numel() && b.numel() > 0;
            // Every buffer's extent counts for the clash check below, f64 ones included.
            let bytes = b.numel() * if b.dtype() == DOUBLE { 8 } else { 4 };
            ranges.push((b.data(), b.data() + bytes, if usable { a.data() } else { 0 }));
        }
        ws.copy_addrs.clear();
        let mut buffers: Vec<usize> = Vec::new();
        for j in ws.f32_jobs.iter() {
            if j.len == 0 {
                ws.copy_addrs.push(0);
                continue;
            }
            let m = j.states[0];
            let found = ranges
                .iter()
                .position(|&(lo, hi, copy)| copy != 0 && lo <= m && m + j.len * 4 <= hi);
            let Some(k) = found else {
                return Err(Unfit::Unsupported("a state outside a staged buffer"));
            };
            let (lo, _, copy) = ranges[k];
            ws.copy_addrs.push(copy + (m - lo));
            if !buffers.contains(&k) {
                buffers.push(k);
            }
        }
        // The second copies are this optimizer's own allocations, never handed out; still, no
        // byte the staging writes may belong to an operand, a state buffer or another copy.
        let first_index = ws.f32_jobs.first().map_or(0, |j| j.index);
        for &k in &buffers {
            let (lo, hi, copy) = ranges[k];
            let hits = |a: usize, b: usize| a < copy + (hi - lo) && copy < b;
            if let Some(r) = ws.alias.verified().iter().find(|r| hits(r.start, r.end)) {
                return Err(Unfit::Overlap(r.index));
            }
            let buffer = ranges.iter().any(|&(a, b, _)| hits(a, b));
            let copy = buffers.iter().any(|&k2| {
                let (a, b, copy2) = ranges[k2];
                k2 != k && hits(copy2, copy2 + (b - a))
            });
            if buffer || copy {
                return Err(Unfit::Overlap(first_index));
            }
        }
        let total: usize = ws.f32_jobs.iter().map(|j| j.len).sum();
        let threads = threads_for(total, threads, MIN_ELEMENTS_PER_THREAD);
        let mut lists = std::mem::take(&mut ws.flips);
        lists.resize_with(threads.max(lists.len()), Vec::new);
        lists.iter_mut().for_each(Vec::clear);
        let lists: Vec<Mutex<Vec<Flip>>> = lists.into_iter().map(Mutex::new).collect();
        let first_bad = AtomicUsize::new(usize::MAX);
        let isa = Isa::current();
        let (jobs, copy_addrs) = (&ws.f32_jobs[..], &ws.copy_addrs[..]);
        ws.flipped.iter_mut().take(jobs.len()).for_each(|n| *n.get_mut() = 0);
        ws.flipped.resize_with(jobs.len().max(ws.flipped.len()), AtomicUsize::default);
        let counts = &ws.flipped[..jobs.len()];
        pool::run(threads, |t| {
            let (lo, hi) = share(total, threads, t);
            let mut flips = lists[t].lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: `queue` admitted every job's addresses (live, contiguous, aligned f32 CPU
            // tensors of `len` elements, borrowed by the batch for `'t`), and the loop above
            // every second copy's (a live f32 CPU buffer of its state buffer's size, borrowed
            // for `'t`); `prove_disjoint` and the clash check proved that no byte written here
            // (the second copies only) belongs to any operand or state buffer; `share` gives
            // each thread its own element range.
            let bad = unsafe { stage_range(jobs, copy_addrs, counts, s, isa, lo, hi, &mut flips) };
            if let Some(k) = bad {
                first_bad.fetch_min(k, Ordering::Relaxed);
            }
        });
        let first = first_bad.load(Ordering::Relaxed);
        let flips =
            lists.into_iter().map(|l| l.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
        Ok(Staged {
            covered: jobs.iter().map(|j| j.index).collect(),
            first_non_finite: jobs.get(first).map(|j| j.index),
            params: jobs.iter().filter(|j| j.len > 0).map(|j| (j.index, j.p, j.len)).collect(),
            buffers,
            flips,
            flipped: jobs
                .iter()
                .zip(counts)
                .map(|(j, n)| (j.index, n.load(Ordering::Relaxed)))
                .collect(),
        })
    }
}

/// Stages elements `[lo, hi)` of the concatenation of `jobs`, adding the weights whose sign
/// changes in each job to `flipped` (aligned with `jobs`); returns the position in `jobs` of
/// the first one whose gradient holds a NaN or an infinity there.
///
/// # Safety
/// As `batch::run_range`, for one state; besides, `copies[k]` must point to `jobs[k].len`
/// writable f32 that no operand of any job and nothing else uses while this runs.
#[allow(clippy::too_many_arguments)]
unsafe fn stage_range(
    jobs: &[KernelJob],
    copies: &[usize],
    flipped: &[AtomicUsize],
    s: BopScalars<f32>,
    isa: Isa,
    lo: usize,
    hi: usize,
    flips: &mut Vec<Flip>,
) -> Option<usize> {
    let mut bad = None;
    for (k, a, n) in pieces(jobs.iter().map(|j| j.len), lo, hi) {
        let (job, copy) = (&jobs[k], copies[k]);
        let read = |addr: usize| {
            // SAFETY: (the four slices: `w`, `g`, `m` here, `m_out` below) in bounds (`a + n <=
            // job.len`) of live f32 buffers by the contract; `w`, `g` and `m` are only read
            // here, and `m_out` is written by this thread only (its own element range of a
            // second copy nothing else uses).
            unsafe { std::slice::from_raw_parts((addr as *const f32).add(a), n) }
        };
        let (w, g, m) = (read(job.p), read(job.g), read(job.states[0]));
        // SAFETY: as above.
        let m_out = unsafe { slice_mut::<f32>(copy, a, n) };
        let base = job.p + a * 4;
        let mut changed = 0;
        let mut record = |l: FlipLine| {
            changed += l.flipped.count_ones() as usize;
            flips.push(Flip { addr: base + l.offset * 4, count: l.count, negative: l.negative })
        };
        // SAFETY: `isa` came from `Isa::current`, so the CPU has its features.
        let found = unsafe { stage_slices(isa, w, g, m, m_out, s, &mut record) };
        if found && bad.is_none() {
            bad = Some(k);
        }
        if changed > 0 {
            if let Some(count) = flipped.get(k) {
                count.fetch_add(changed, Ordering::Relaxed);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64. Streaming stores (every set's, the baseline's SSE2 ones
    // included) are weakly ordered: the fence makes them visible before this task reports done
    // (and so before the commit reads them).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    bad
}

/// [`math::bop_stage`] compiled for `isa`: [`stage_lines`] over the set's vectors on x86-64
/// (the baseline's SSE2, which every x86-64 processor has, AVX2's or AVX-512's); elsewhere the
/// baseline's is that loop.
///
/// # Safety
/// The CPU must support `isa` (it came from [`Isa::current`]).
#[inline(always)]
unsafe fn stage_slices(
    isa: Isa,
    w: &[f32],
    g: &[f32],
    m: &[f32],
    m_out: &mut [f32],
    s: BopScalars<f32>,
    flip: &mut impl FnMut(FlipLine),
) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE2 is part of x86-64.
        Isa::Baseline => unsafe { lanes::stage_sse2(w, g, m, m_out, s, flip) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Baseline => math::bop_stage(w, g, m, m_out, s, flip),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Isa::Avx2 => unsafe { lanes::stage_avx2(w, g, m, m_out, s, flip) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Isa::Avx512 => unsafe { lanes::stage_avx512(w, g, m, m_out, s, flip) },
    }
}

/// [`math::bop_stage`] over vectors of `V`: sixteen elements (one output cache line) per
/// iteration, the new state written with streaming stores once the output is aligned to a
/// cache line; the same operations as [`math::bop`] (no fused multiply-add), so the same bits.
/// The one definition of the vector loop: [`lanes`] instantiates it for SSE2 (the x86-64
/// baseline), AVX2 and AVX-512.
///
/// The comparisons stay masks of `V` ([`lanes::Lanes::Mask`]: vectors of all-ones lanes up to
/// AVX2, mask registers with AVX-512), combined with vector logic; a line's masks become bits
/// ([`lanes::Lanes::line_bits`]) only when some weight of it changes. Moving each comparison
/// to a general register (one `movmskps` each, then shifts and ORs) made the SSE2 loop
/// compute-bound: 0.70 ns per element on one core of a Zen 5 with the data in cache, too slow
/// for memory speed on two; 0.50-0.55 ns this way (AVX2: 0.34 to 0.24 ns; AVX-512 unchanged).
///
/// # Safety
/// The CPU must support `V`'s instructions, and this must be inlined into a function compiled
/// with them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stage_lines<V: lanes::Lanes>(
    w: &[f32],
    g: &[f32],
    m: &[f32],
    m_out: &mut [f32],
    s: BopScalars<f32>,
    flip: &mut impl FnMut(FlipLine),
) -> bool {
    use lanes::PER_LINE;
    const LINE: usize = 16;
    let n = w.len();
    let (g, m, m_out) = (&g[..n], &m[..n], &mut m_out[..n]);
    // Elements before the output's first cache line boundary, and the aligned lines after.
    let head = ((64 - m_out.as_ptr() as usize % 64) % 64 / 4).min(n);
    let lines = (n - head) / LINE;
    let tail = head + lines * LINE;
    let mut bad =
        math::bop_stage(&w[..head], &g[..head], &m[..head], &mut m_out[..head], s, &mut *flip);
    // SAFETY: the caller's contract on the CPU's features (for every `V` call below).
    let (gamma, threshold, zero) =
        unsafe { (V::splat(s.gamma), V::splat(s.threshold), V::splat(0.0)) };
    // SAFETY: as above.
    let mut non_finite = unsafe { V::none() };
    let (wp, gp, mp, op) = (w.as_ptr(), g.as_ptr(), m.as_ptr(), m_out.as_mut_ptr());
    for line in 0..lines {
        let at = head + line * LINE;
        // SAFETY: as above.
        let (mut negative, mut was_negative, mut changed) =
            unsafe { ([V::none(); PER_LINE], [V::none(); PER_LINE], V::none()) };
        for k in 0..LINE / V::LANES {
            let i = at + k * V::LANES;
            // SAFETY: `i + V::LANES <= at + LINE <= tail <= n`, within every slice;
            // `op.add(i)` is aligned to the vector's width (`head` aligned the output to 64
            // bytes, each line adds 64 and each vector `4 * LANES`), as the streaming store
            // requires.
            unsafe {
                let gv = V::load(gp.add(i));
                let mv = V::load(mp.add(i));
                let wv = V::load(wp.add(i));
                non_finite = V::or(non_finite, V::non_finite(gv));
                // m + (g - m) * gamma, as math::bop rounds it.
                let mn = V::add(mv, V::mul(V::sub(gv, mv), gamma));
                V::stream(op.add(i), mn);
                // flip(w, w * m - threshold) is -1 exactly where sign(x) and w are both
                // positive or both negative (-sign(x) * w < 0; NaN and 0 give +1).
                let x = V::sub(V::mul(wv, mn), threshold);
                let (w_neg, w_pos) = (V::lt(wv, zero), V::lt(zero, wv));
                let neg = V::or(V::and(V::lt(zero, x), w_pos), V::and(V::lt(x, zero), w_neg));
                negative[k] = neg;
                was_negative[k] = w_neg;
                // A weight is written where the new +-1 is not the old value (NaN included).
                changed = V::or(changed, V::ne(wv, V::signs_of(neg)));
            }
        }
        // SAFETY: as above.
        if unsafe { V::any(changed) } {
            // SAFETY: as above.
            let (negative, was_negative) =
                unsafe { (V::line_bits(negative), V::line_bits(was_negative)) };
            // Signs changed, as math::bop counts them: (w < 0) != (w' < 0).
            let flipped = (negative ^ was_negative) as u16;
            flip(FlipLine { offset: at, count: LINE, negative: negative as u16, flipped });
        }
    }
    // SAFETY: as above.
    bad |= unsafe { V::any(non_finite) };
    let rest = math::bop_stage(&w[tail..], &g[tail..], &m[tail..], &mut m_out[tail..], s, |l| {
        flip(FlipLine { offset: l.offset + tail, ..l })
    });
    bad | rest
}

/// The vector operations [`stage_lines`] and [`write_flip`] are written in, one implementation
/// per instruction set (each operation one or two intrinsics), and the functions that
/// instantiate them with that set's target features.
#[cfg(target_arch = "x86_64")]
mod lanes {
    use std::arch::x86_64::*;

    use super::super::math::{BopScalars, FlipLine};

    /// The most vectors a line of 16 f32 takes (SSE2's four lanes each).
    pub(super) const PER_LINE: usize = 4;

    /// A vector of f32 lanes, and the comparisons' masks ([`Mask`](Lanes::Mask)).
    ///
    /// # Safety
    /// Every operation needs the CPU features of its instruction set, and must be inlined into
    /// a function compiled with them.
    pub(super) trait Lanes: Copy {
        /// f32 per vector (4, 8 or 16; a line of 16 is a whole number of vectors).
        const LANES: usize;
        /// A comparison's result, lane by lane: a vector of all-ones and all-zeros lanes (SSE2,
        /// AVX2), or a mask register (AVX-512).
        type Mask: Copy;
        unsafe fn splat(x: f32) -> Self;
        /// An unaligned load of `LANES` f32.
        unsafe fn load(p: *const f32) -> Self;
        /// A streaming store of `LANES` f32 to `p`, aligned to `4 * LANES` bytes.
        unsafe fn stream(p: *mut f32, v: Self);
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn sub(a: Self, b: Self) -> Self;
        unsafe fn mul(a: Self, b: Self) -> Self;
        /// `a < b`, ordered (false for NaN).
        unsafe fn lt(a: Self, b: Self) -> Self::Mask;
        /// `a != b`, unordered (true for NaN).
        unsafe fn ne(a: Self, b: Self) -> Self::Mask;
        /// The lanes holding a NaN or an infinity (exponent all ones).
        unsafe fn non_finite(v: Self) -> Self::Mask;
        /// No lane set.
        unsafe fn none() -> Self::Mask;
        unsafe fn and(a: Self::Mask, b: Self::Mask) -> Self::Mask;
        unsafe fn or(a: Self::Mask, b: Self::Mask) -> Self::Mask;
        /// Whether some lane is set.
        unsafe fn any(m: Self::Mask) -> bool;
        /// The masks of one line (its `16 / LANES` vectors, the rest unused) as bits, one per
        /// lane, lane 0 of the first vector lowest.
        unsafe fn line_bits(m: [Self::Mask; PER_LINE]) -> u32;
        /// -1 in the lanes `m` sets, else +1.
        unsafe fn signs_of(m: Self::Mask) -> Self;
        /// -1 in the lanes whose bit of `bits` is set, else +1.
        unsafe fn signs(bits: u32) -> Self;
    }

    /// SSE2, part of every x86-64 processor: the baseline's vectors, four f32 lanes. SSE2 has
    /// no fused multiply-add, and the loop asks for none: the same bits as the scalar loop.
    impl Lanes for __m128 {
        const LANES: usize = 4;
        type Mask = __m128;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: Self) {
            // SAFETY: the trait's contract.
            unsafe { _mm_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn lt(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_cmplt_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn ne(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_cmpneq_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn non_finite(v: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                let exponent = _mm_set1_epi32(0x7f80_0000);
                let e = _mm_and_si128(_mm_castps_si128(v), exponent);
                _mm_castsi128_ps(_mm_cmpeq_epi32(e, exponent))
            }
        }
        #[inline(always)]
        unsafe fn none() -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn and(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_and_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_or_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn any(m: Self) -> bool {
            // SAFETY: the trait's contract.
            unsafe { _mm_movemask_ps(m) != 0 }
        }
        #[inline(always)]
        unsafe fn line_bits(m: [Self; PER_LINE]) -> u32 {
            // SAFETY: the trait's contract.
            unsafe {
                // Lanes of all ones or all zeros narrow without changing (signed saturation):
                // four vectors of 32-bit lanes to one of sixteen bytes, in order, and one
                // movemask for all sixteen.
                let c = |v: Self| _mm_castps_si128(v);
                let low = _mm_packs_epi32(c(m[0]), c(m[1]));
                let high = _mm_packs_epi32(c(m[2]), c(m[3]));
                _mm_movemask_epi8(_mm_packs_epi16(low, high)) as u32
            }
        }
        #[inline(always)]
        unsafe fn signs_of(m: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm_or_ps(_mm_set1_ps(1.0), _mm_and_ps(m, _mm_set1_ps(-0.0))) }
        }
        #[inline(always)]
        unsafe fn signs(bits: u32) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                // No blend before SSE4.1: +1 with the sign bit set where the lane's bit is.
                let lane = _mm_setr_epi32(1, 2, 4, 8);
                let set = _mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(bits as i32), lane), lane);
                let sign = _mm_and_ps(_mm_castsi128_ps(set), _mm_set1_ps(-0.0));
                _mm_or_ps(_mm_set1_ps(1.0), sign)
            }
        }
    }

    impl Lanes for __m256 {
        const LANES: usize = 8;
        type Mask = __m256;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: Self) {
            // SAFETY: the trait's contract.
            unsafe { _mm256_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn lt(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        unsafe fn ne(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_cmp_ps::<_CMP_NEQ_UQ>(a, b) }
        }
        #[inline(always)]
        unsafe fn non_finite(v: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                let exponent = _mm256_set1_epi32(0x7f80_0000);
                let e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
                _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exponent))
            }
        }
        #[inline(always)]
        unsafe fn none() -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn and(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_and_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_or_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn any(m: Self) -> bool {
            // SAFETY: the trait's contract.
            unsafe { _mm256_movemask_ps(m) != 0 }
        }
        #[inline(always)]
        unsafe fn line_bits(m: [Self; PER_LINE]) -> u32 {
            // SAFETY: the trait's contract.
            unsafe { _mm256_movemask_ps(m[0]) as u32 | (_mm256_movemask_ps(m[1]) as u32) << 8 }
        }
        #[inline(always)]
        unsafe fn signs_of(m: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm256_blendv_ps(_mm256_set1_ps(1.0), _mm256_set1_ps(-1.0), m) }
        }
        #[inline(always)]
        unsafe fn signs(bits: u32) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                let lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                let set = _mm256_cmpeq_epi32(
                    _mm256_and_si256(_mm256_set1_epi32(bits as i32), lane),
                    lane,
                );
                _mm256_blendv_ps(
                    _mm256_set1_ps(1.0),
                    _mm256_set1_ps(-1.0),
                    _mm256_castsi256_ps(set),
                )
            }
        }
    }

    impl Lanes for __m512 {
        const LANES: usize = 16;
        type Mask = __mmask16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: Self) {
            // SAFETY: the trait's contract.
            unsafe { _mm512_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn lt(a: Self, b: Self) -> __mmask16 {
            // SAFETY: the trait's contract.
            unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        unsafe fn ne(a: Self, b: Self) -> __mmask16 {
            // SAFETY: the trait's contract.
            unsafe { _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, b) }
        }
        #[inline(always)]
        unsafe fn non_finite(v: Self) -> __mmask16 {
            // SAFETY: the trait's contract.
            unsafe {
                let exponent = _mm512_set1_epi32(0x7f80_0000);
                let e = _mm512_and_si512(_mm512_castps_si512(v), exponent);
                _mm512_cmpeq_epi32_mask(e, exponent)
            }
        }
        #[inline(always)]
        unsafe fn none() -> __mmask16 {
            0
        }
        #[inline(always)]
        unsafe fn and(a: __mmask16, b: __mmask16) -> __mmask16 {
            a & b
        }
        #[inline(always)]
        unsafe fn or(a: __mmask16, b: __mmask16) -> __mmask16 {
            a | b
        }
        #[inline(always)]
        unsafe fn any(m: __mmask16) -> bool {
            m != 0
        }
        #[inline(always)]
        unsafe fn line_bits(m: [__mmask16; PER_LINE]) -> u32 {
            u32::from(m[0])
        }
        #[inline(always)]
        unsafe fn signs_of(m: __mmask16) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_mask_blend_ps(m, _mm512_set1_ps(1.0), _mm512_set1_ps(-1.0)) }
        }
        #[inline(always)]
        unsafe fn signs(bits: u32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { _mm512_mask_blend_ps(bits as u16, _mm512_set1_ps(1.0), _mm512_set1_ps(-1.0)) }
        }
    }

    /// The staging loop and the line writer, instantiated per instruction set: `stage_lines`
    /// and `write_line_lanes` inlined into functions compiled with the set's features.
    macro_rules! instantiate {
        ($($stage:ident, $write:ident: $v:ty = $features:literal;)*) => {$(
            /// [`super::stage_lines`] for this instruction set.
            ///
            /// # Safety
            #[doc = concat!("The CPU must support `", $features, "`.")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $stage(
                w: &[f32],
                g: &[f32],
                m: &[f32],
                m_out: &mut [f32],
                s: BopScalars<f32>,
                flip: &mut impl FnMut(FlipLine),
            ) -> bool {
                // SAFETY: compiled with the features `$v`'s operations need.
                unsafe { super::stage_lines::<$v>(w, g, m, m_out, s, flip) }
            }

            /// A whole line of 16 new signs, with streaming stores (the old line not read).
            ///
            /// # Safety
            #[doc = concat!("The CPU must support `", $features, "`; `p` 64-byte aligned, ")]
            /// pointing to 16 f32 nothing else uses meanwhile.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $write(p: *mut f32, negative: u16) {
                for k in 0..16 / <$v>::LANES {
                    let shift = k * <$v>::LANES;
                    // SAFETY: the caller's contract; `p + shift` stays in the line, aligned to
                    // the vector's width.
                    unsafe { <$v>::stream(p.add(shift), <$v>::signs(u32::from(negative) >> shift)) };
                }
            }
        )*};
    }

    instantiate! {
        stage_sse2, write_line_sse2: __m128 = "sse2";
        stage_avx2, write_line_avx2: __m256 = "avx2,fma";
        stage_avx512, write_line_avx512: __m512 = "avx512f,avx512vl,avx512bw,avx512dq,fma";
    }
}

/// Makes a staged step the current one: the staged state buffers take their second copy's
/// memory, the recorded lines of weights are written, and the version counters of every
/// covered parameter and every exchanged state buffer (so of every state viewing it) are
/// bumped. `param(i)` must give the optimizer's
/// parameter tensor of variable `i`, `state_buffers` and `copies` those the step was staged with.
///
/// Fails, having changed nothing, when a parameter is no longer the memory the step was staged
/// over or a buffer cannot be exchanged; the caller then runs the step the ordinary way.
pub(crate) fn commit<'p>(
    staged: &Staged,
    ws: &mut Workspace,
    param: impl Fn(usize) -> Option<&'p Tensor>,
    state_buffers: &[Tensor],
    copies: &[Option<Tensor>],
) -> Result<(), Unfit> {
    let metas = ws.written.read(staged.params.iter().map(|&(i, _, _)| param(i)), true);
    for (m, &(_, addr, len)) in metas.iter().zip(&staged.params) {
        if m.status() != Status::Ok || m.data() != addr || m.numel() != len || m.dtype() != FLOAT {
            return Err(Unfit::Unsupported("a parameter changed since the step was staged"));
        }
    }
    let mut pairs = Vec::with_capacity(staged.buffers.len());
    for &k in &staged.buffers {
        match (state_buffers.get(k), copies.get(k).and_then(Option::as_ref)) {
            (Some(a), Some(b)) => pairs.push((a, b)),
            _ => return Err(Unfit::Unsupported("a missing state buffer")),
        }
    }
    storage::swap_storages(&pairs)
        .map_err(|()| Unfit::Unsupported("a state buffer libtorch would not exchange"))?;
    let isa = Isa::current();
    let lists = &staged.flips;
    let work = |t: usize| {
        for f in lists.get(t).into_iter().flatten() {
            // SAFETY: each line lies inside a parameter checked just above to be the live,
            // contiguous f32 CPU memory it was when staged (the optimizer owns the tensors,
            // and the router runs nothing between staging and commit); threads write disjoint
            // lines (each was recorded by the one thread that staged its elements).
            unsafe { write_flip(*f, isa) };
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64; orders the streaming stores before the task ends.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    };
    let lines: usize = lists.iter().map(Vec::len).sum();
    // A few lines are written faster than a thread is woken.
    if lines < 4096 {
        (0..lists.len()).for_each(&work);
    } else {
        pool::run(lists.len(), work);
    }
    // Every covered parameter, not only those with a line written: the in-place kernel writes
    // a line only where a sign flipped, but torch's path (`w.copy_(...)`) bumps the version
    // of every parameter it updates, changed or not, and a graph that saved one must fail the
    // same way on both paths.
    ws.to_bump.clear();
    for p in staged.covered.iter().filter_map(|&i| param(i)) {
        ws.to_bump.push(p);
    }
    for (a, _) in &pairs {
        ws.to_bump.push(a);
    }
    // SAFETY: the parameters are borrowed from `param` for `'p` and the state buffers from
    // `state_buffers`, both alive for this call.
    unsafe { ws.to_bump.bump() };
    Ok(())
}

/// Writes one staged line.
///
/// # Safety
/// `f.addr` must point to `f.count` f32 that nothing else uses meanwhile; the CPU must support
/// `isa`.
unsafe fn write_flip(f: Flip, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if f.count == 16 && f.addr.is_multiple_of(64) {
        let p = f.addr as *mut f32;
        match isa {
            // SAFETY: the caller's contract; the address is aligned.
            Isa::Avx512 => return unsafe { lanes::write_line_avx512(p, f.negative) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { lanes::write_line_avx2(p, f.negative) },
            // SAFETY: as above; SSE2 is part of x86-64.
            Isa::Baseline => return unsafe { lanes::write_line_sse2(p, f.negative) },
        }
    }
    let _ = isa;
    // SAFETY: the caller's contract.
    let w = unsafe { slice_mut::<f32>(f.addr, 0, f.count) };
    math::write_line(w, FlipLine { offset: 0, count: f.count, negative: f.negative, flipped: 0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values: weights of +-1 (some 0.5, binarised by the step), small gradients
    /// whose moving averages cross the threshold both ways, and moving averages.
    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut w = Vec::with_capacity(n);
        let (mut g, mut m) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let r = next();
            w.push(if i % 97 == 5 {
                0.5
            } else if r >= 0.0 {
                1.0
            } else {
                -1.0
            });
            g.push(next() * 1e-3);
            m.push(next() * 1e-4);
        }
        (w, g, m)
    }

    fn bits(xs: &[f32]) -> Vec<u32> {
        xs.iter().map(|x| x.to_bits()).collect()
    }

    /// A buffer holding `n` f32 from `skip` elements past a 64-byte boundary: (buffer, start).
    fn out_buffer(n: usize, skip: usize) -> (Vec<f32>, usize) {
        let v = vec![7.0f32; n + skip + 16];
        let to_boundary = (64 - v.as_ptr() as usize % 64) % 64 / 4;
        (v, to_boundary + skip)
    }

    /// Stages with `isa` (`None`: the portable loop, [`math::bop_stage`], which x86-64 runs
    /// only for a line's head and tail) and applies the result, returning (new weights, new
    /// state, bad, flips).
    fn staged(
        isa: Option<Isa>,
        w: &[f32],
        g: &[f32],
        m: &[f32],
        skip: usize,
    ) -> (Vec<f32>, Vec<f32>, bool, usize) {
        let s = BopScalars { gamma: 0.1, threshold: 1e-6 };
        let n = w.len();
        let (mut buffer, start) = out_buffer(n, skip);
        let out = &mut buffer[start..start + n];
        let mut lines = Vec::new();
        let bad = match isa {
            // SAFETY: `isa` comes from `Isa::available`, the processor's own sets.
            Some(isa) => unsafe { stage_slices(isa, w, g, m, out, s, &mut |l| lines.push(l)) },
            None => math::bop_stage(w, g, m, out, s, |l| lines.push(l)),
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64; the streaming stores are read below.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
        let mut new_w = w.to_vec();
        let mut flips = 0;
        for l in lines {
            assert!(l.count >= 1 && l.count <= 16 && l.offset + l.count <= n);
            assert_eq!(u32::from(l.flipped) >> l.count, 0, "flips past the line's end");
            flips += l.flipped.count_ones() as usize;
            math::write_line(&mut new_w[l.offset..], l);
        }
        (new_w, out.to_vec(), bad, flips)
    }

    #[test]
    fn a_staged_step_applied_equals_the_in_place_step_bit_for_bit() {
        let sets = Isa::available();
        eprintln!("instruction sets compared: {sets:?}");
        for n in [0usize, 1, 15, 16, 17, 100, 1000, 4099] {
            for skip in [0usize, 1, 5, 15] {
                for poison in [None, Some(0), Some(n / 2), Some(n.saturating_sub(1))] {
                    let (mut w, mut g, mut m) = data(n, (n * 31 + skip) as u64);
                    if let (Some(at), true) = (poison, n > 0) {
                        g[at] = if at % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
                    }
                    let (w0, m0) = (w.clone(), m.clone());
                    let flips =
                        math::bop(&mut w, &g, &mut m, BopScalars { gamma: 0.1, threshold: 1e-6 });
                    // Counted independently: the signs before and after.
                    let signs = |v: &[f32]| v.iter().map(|x| *x < 0.0).collect::<Vec<_>>();
                    let changed =
                        signs(&w0).iter().zip(signs(&w)).filter(|(a, b)| **a != *b).count();
                    assert_eq!(flips, changed, "in place, n {n}");
                    let loops = sets.iter().map(|&isa| Some(isa)).chain([None]);
                    for isa in loops {
                        let (sw, sm, bad, staged_flips) = staged(isa, &w0, &g, &m0, skip);
                        assert_eq!(staged_flips, flips, "{isa:?} n {n} skip {skip}");
                        let case = format!("{isa:?} n {n} skip {skip} poison {poison:?}");
                        assert_eq!(bits(&sw), bits(&w), "weights, {case}");
                        assert_eq!(bits(&sm), bits(&m), "state, {case}");
                        assert_eq!(bad, poison.is_some() && n > 0, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn lines_are_written_whole_or_in_part() {
        for isa in Isa::available() {
            lines_are_written_whole_or_in_part_with(isa);
        }
    }

    fn lines_are_written_whole_or_in_part_with(isa: Isa) {
        // A whole line is written with vector stores only where it is aligned.
        let (mut buffer, start) = out_buffer(40, 0);
        let w = &mut buffer[start..start + 40];
        w.fill(0.5);
        let line = FlipLine { offset: 0, count: 16, negative: 0b1000_0000_0000_0001, flipped: 0 };
        // SAFETY: 16 f32 of `w` from element 0, used by nothing else meanwhile.
        unsafe {
            write_flip(
                Flip { addr: w.as_mut_ptr() as usize, count: 16, negative: line.negative },
                isa,
            )
        };
        // SAFETY: as above, 3 f32 from element 20.
        unsafe {
            write_flip(Flip { addr: w[20..].as_mut_ptr() as usize, count: 3, negative: 0b010 }, isa)
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64; the streaming stores are read below.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
        let mut want = [0.5f32; 40];
        want[..16].fill(1.0);
        want[0] = -1.0;
        want[15] = -1.0;
        want[20..23].copy_from_slice(&[1.0, -1.0, 1.0]);
        assert_eq!(w, &want[..], "{isa:?}");
    }
}
