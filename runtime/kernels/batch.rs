//! The fused pass: an optimizer queues its variables' tensors in a [`Batch`], which reads all
//! their metadata in one call and admits each one ([`admit`](super::admit)); [`Batch::run`]
//! then proves the operands disjoint ([`alias`](super::alias)), splits the elements between
//! threads ([`split`](super::split)) and runs the kernel over safe slices, compiled for the
//! processor's instruction set ([`isa`](super::isa)), and bumps the version counter of every
//! tensor it wrote ([`version`](super::version)).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::Tensor;

use super::admit::{admit, KernelJob, StateMetas};
use super::alias::AliasProof;
use super::isa::{Isa, IsaLoop};
use super::math::Real;
use super::metadata::{MetaReader, TensorMeta};
use super::split::{pieces, share, threads_for, MIN_ELEMENTS_PER_THREAD};
use super::version::Written;
use super::{pool, stage, Kernel, Operands, Unfit, MAX_STATES};

/// Scratch an optimizer keeps between steps, so that a fused step allocates nothing once the
/// job lists have grown to size, and re-proves disjointness only when an address changed.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    pub(super) f32_jobs: Jobs,
    pub(super) f64_jobs: Jobs,
    /// The proof that the queued operands overlap nothing written.
    pub(super) alias: AliasProof,
    /// What the last successful proof covered: each job list's generation and length, and
    /// the states per job ([`prove_disjoint`](Self::prove_disjoint)).
    proven: Option<ProofKey>,
    /// Reads the parameters' and states' metadata (writable addresses).
    pub(super) written: MetaReader,
    /// Reads the gradients' metadata.
    read: MetaReader,
    /// Reads the state buffers' metadata.
    pub(super) state_buffers: MetaReader,
    /// The router's read of this step's variables and gradients, lent for the length of one
    /// optimizer step ([`MetaReader::lent`]): a queue whose operands it covers takes their
    /// metadata from it instead of reading them again.
    pub(crate) lent: Option<MetaReader>,
    /// A staged step's address of each f32 job's state in the second copy of its state buffer
    /// ([`stage`]).
    pub(super) copy_addrs: Vec<usize>,
    /// A staged step's lines of weights to write, per thread, kept between steps.
    pub(super) flips: Vec<Vec<stage::Flip>>,
    /// The tensors the queued jobs write (parameters, own states, state buffers), whose
    /// version counters a successful run bumps; scratch of one batch.
    pub(super) to_bump: Written,
    /// The state buffers already in `to_bump`.
    bumped_buffers: Vec<usize>,
    /// The weights whose sign the last run changed, per job (the f32 jobs, then the f64
    /// ones), as the kernels count them.
    pub(super) flipped: Vec<AtomicUsize>,
}

impl Workspace {
    /// Starts an empty batch for a kernel with `states` state tensors per variable, whose
    /// tensors are borrowed for `'t`.
    pub(crate) fn batch<'t>(&mut self, states: usize) -> Batch<'_, 't> {
        self.f32_jobs.clear();
        self.f64_jobs.clear();
        // A batch dropped without running (refused) leaves its list behind: nothing was written.
        self.to_bump.clear();
        self.bumped_buffers.clear();
        Batch {
            ws: self,
            states: states.min(MAX_STATES),
            scalars_set: false,
            clips_set: false,
            tensors: PhantomData,
        }
    }

    /// Indices of the variables the last successful [`Batch::run`] updated.
    pub(crate) fn updated(&self) -> impl Iterator<Item = usize> + '_ {
        self.f32_jobs.iter().chain(self.f64_jobs.iter()).map(|j| j.index)
    }

    /// Each variable the last successful [`Batch::run`] updated, with the weights whose sign
    /// it changed (Bop's kernels count them; the others report 0).
    pub(crate) fn flipped(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let counts = self.flipped.iter().map(|n| n.load(Ordering::Relaxed));
        self.updated().zip(counts)
    }

    /// Proves the queued jobs' operands disjoint ([`AliasProof::prove`]), or finds that the
    /// last proof covered them: no job of either list was rewritten since (their
    /// [generations](Jobs::generation) are the same), the lists have the same lengths and the
    /// kernel the same states per job. A job's operands are its addresses and lengths, which
    /// only [`Jobs::push`] writes, so the regions are then those proven; on 2000 variables
    /// whose tensors do not move, this skips building and comparing 8000 regions per pass.
    pub(super) fn prove_disjoint(&mut self, states: usize) -> Result<(), usize> {
        let key = ProofKey {
            f32_jobs: (self.f32_jobs.generation(), self.f32_jobs.len()),
            f64_jobs: (self.f64_jobs.generation(), self.f64_jobs.len()),
            states,
        };
        if self.proven == Some(key) {
            return Ok(());
        }
        self.proven = None;
        self.alias.prove(&self.f32_jobs, &self.f64_jobs, states)?;
        self.proven = Some(key);
        Ok(())
    }
}

/// What one aliasing proof covered ([`Workspace::prove_disjoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProofKey {
    /// The f32 list's generation and length.
    f32_jobs: (u64, usize),
    /// The f64 list's generation and length.
    f64_jobs: (u64, usize),
    /// State operands per job.
    states: usize,
}

#[cfg(test)]
thread_local! {
    /// How many queues on this thread took their operands' metadata from a lent read.
    static LENT_QUEUES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many [`Batch::queue`] calls on this thread took their operands' metadata from a read the
/// router lent ([`Workspace::lent`]), for tests.
#[cfg(test)]
pub(crate) fn lent_queues() -> usize {
    LENT_QUEUES.with(std::cell::Cell::get)
}

/// The tensors of one step, queued variable by variable and then updated in one pass.
///
/// Holding shared borrows of every queued tensor for `'t` keeps their handles (and so their
/// storages) alive until the batch is run or dropped.
pub(crate) struct Batch<'w, 't> {
    pub(super) ws: &'w mut Workspace,
    /// State tensors per variable.
    states: usize,
    /// Whether [`set_scalars`](Self::set_scalars) and [`set_clips`](Self::set_clips) ran: a
    /// job kept from an earlier batch holds that batch's values until they do, and `run`
    /// resets those not set.
    scalars_set: bool,
    clips_set: bool,
    tensors: PhantomData<&'t Tensor>,
}

impl<'t> Batch<'_, 't> {
    /// Queues the update of every variable of `vars`, checking all their tensors (CPU, f32 or
    /// f64, contiguous, aligned, of the parameter's length; the gradient against the parameter
    /// as `optim::check_grad` does, [`Unfit::Grad`]) with two metadata reads for the whole
    /// list, or none when the workspace holds a lent read that covers every variable and
    /// gradient (and every variable's states live in a state buffer). Variables that cannot
    /// take the fused path are appended to `refused` with the reason, in order. Nothing is
    /// written until [`run`](Self::run), which runs the kernel with per-variable scalars of
    /// zero and no clip unless [`set_scalars`](Self::set_scalars) and
    /// [`set_clips`](Self::set_clips) set them.
    pub(crate) fn queue<I>(
        &mut self,
        vars: I,
        state_buffers: &'t [Tensor],
        refused: &mut Vec<(usize, Unfit)>,
    ) where
        I: Iterator<Item = Operands<'t>> + Clone,
    {
        let states = self.states;
        let ws = &mut *self.ws;
        // Variables whose states live in a state buffer contribute only their parameter here.
        let own = |v: &Operands<'t>| if v.state_buffer.is_some() { 0 } else { states };
        // The router's read of this step serves when it covers every operand read here.
        let lent = ws.lent.as_ref().filter(|r| {
            vars.clone().all(|v| own(&v) == 0 && r.lent(v.index, v.param, v.grad).is_some())
        });
        let (written, read): (&[TensorMeta], &[TensorMeta]) = match lent {
            Some(_) => (&[], &[]),
            None => (
                ws.written.read(
                    vars.clone().flat_map(|v| {
                        std::iter::once(Some(v.param))
                            .chain(v.states.into_iter().take(own(&v)).map(|s| s.map(|(_, t)| t)))
                    }),
                    true,
                ),
                ws.read.read(vars.clone().map(|v| Some(v.grad)), false),
            ),
        };
        #[cfg(test)]
        if lent.is_some() {
            LENT_QUEUES.with(|n| n.set(n.get() + 1));
        }
        let buffers = ws.state_buffers.read(state_buffers.iter().map(Some), true);
        let mut at = 0;
        for (k, v) in vars.enumerate() {
            let (param, grad, own_states) = match lent {
                Some(r) => match r.lent(v.index, v.param, v.grad) {
                    Some((param, grad)) => (param, grad, &[][..]),
                    None => {
                        // Never: the filter above found every operand in it.
                        refused.push((v.index, Unfit::Unsupported("an operand not read")));
                        continue;
                    }
                },
                None => {
                    let n = 1 + own(&v);
                    let ops = &written[at..at + n];
                    at += n;
                    (&ops[0], &read[k], &ops[1..])
                }
            };
            let names = v.states.map(|s| s.map_or("state", |(name, _)| name));
            let state_metas = match v.state_buffer {
                None => StateMetas::Own(own_states),
                Some((buffer, offsets)) => match buffers.get(buffer) {
                    Some(buffer) => StateMetas::InStateBuffer { buffer, offsets, count: states },
                    None => {
                        refused.push((v.index, Unfit::Unsupported("a missing state buffer")));
                        continue;
                    }
                },
            };
            let (job, f64) = match admit(v.index, param, grad, state_metas, &names) {
                Ok(admitted) => admitted,
                Err(unfit) => {
                    refused.push((v.index, unfit));
                    continue;
                }
            };
            if f64 {
                ws.f64_jobs.push(job);
            } else {
                ws.f32_jobs.push(job);
            }
            // What the run will write, bumped after it. Every parameter, whether or not the
            // kernel changes a value (Bop's writes a line only where a sign flipped), as
            // torch's path bumps every tensor its in-place ops update. States in a state
            // buffer are views of it, which share its version counter: the buffer is bumped
            // once for all of them.
            ws.to_bump.push(v.param);
            match v.state_buffer {
                None => v.states.iter().take(own(&v)).flatten().for_each(|(_, t)| {
                    ws.to_bump.push(t);
                }),
                Some((buffer, _)) if !ws.bumped_buffers.contains(&buffer) => {
                    ws.bumped_buffers.push(buffer);
                    ws.to_bump.push(&state_buffers[buffer]);
                }
                Some(_) => {}
            }
        }
    }

    /// Sets each queued variable's kernel scalars, from its index.
    pub(crate) fn set_scalars(&mut self, mut scalars: impl FnMut(usize) -> [f64; 2]) {
        let ws = &mut *self.ws;
        for (index, old, _) in ws.f32_jobs.settings_mut().chain(ws.f64_jobs.settings_mut()) {
            let s = scalars(index);
            // Written only when changed (see `Jobs`); compared by bits, so a NaN is written.
            if s.map(f64::to_bits) != old.map(f64::to_bits) {
                *old = s;
            }
        }
        self.scalars_set = true;
    }

    /// Sets each queued variable's constraint (its clip, infinity for none), from its index.
    pub(crate) fn set_clips(&mut self, mut clip: impl FnMut(usize) -> f64) {
        let ws = &mut *self.ws;
        for (index, _, old) in ws.f32_jobs.settings_mut().chain(ws.f64_jobs.settings_mut()) {
            let c = clip(index);
            if c.to_bits() != old.to_bits() {
                *old = c;
            }
        }
        self.clips_set = true;
    }

    /// Runs `kernel` over every queued variable on up to `threads` threads (fewer when there
    /// is too little work to pay for them).
    ///
    /// Then bumps the version counter of every tensor the queued jobs wrote (parameters, own
    /// states, state buffers), as in-place libtorch ops do.
    ///
    /// Fails, before writing or bumping anything, when two operands share memory that one of
    /// them writes.
    pub(crate) fn run<K: Kernel>(mut self, kernel: &K, threads: usize) -> Result<(), Unfit> {
        if !self.scalars_set {
            self.set_scalars(|_| [0.0; 2]);
        }
        if !self.clips_set {
            self.set_clips(|_| f64::INFINITY);
        }
        let (ws, states) = (self.ws, self.states);
        if let Err(index) = ws.prove_disjoint(states) {
            // Forget the jobs so that `updated` reports nothing, and bump nothing.
            ws.f32_jobs.clear();
            ws.f64_jobs.clear();
            ws.to_bump.clear();
            return Err(Unfit::Overlap(index));
        }
        let total = ws.f32_jobs.iter().chain(ws.f64_jobs.iter()).map(|j| j.len).sum::<usize>();
        let threads = threads_for(total, threads, MIN_ELEMENTS_PER_THREAD);
        let isa = Isa::current();
        let (f32_jobs, f64_jobs) = (&ws.f32_jobs[..], &ws.f64_jobs[..]);
        let jobs = f32_jobs.len() + f64_jobs.len();
        // Reset only where the last run counted flips: the worker threads add to these lines.
        for n in ws.flipped.iter_mut().take(jobs).map(AtomicUsize::get_mut) {
            if *n != 0 {
                *n = 0;
            }
        }
        ws.flipped.resize_with(jobs.max(ws.flipped.len()), AtomicUsize::default);
        let (f32_flipped, f64_flipped) = ws.flipped[..jobs].split_at(f32_jobs.len());
        let work = |t: usize| {
            let (lo, hi) = share(total_len(f32_jobs), threads, t);
            // SAFETY: `queue` admitted every address (`admit`: a live CPU tensor of this
            // element type, contiguous, `len` elements, aligned) and the batch borrows those
            // tensors until it is consumed here; `prove_disjoint` proved that written operands
            // share no memory; `share` hands each thread a disjoint element range.
            unsafe { run_range::<K, f32>(kernel, isa, f32_jobs, f32_flipped, states, lo, hi) };
            let (lo, hi) = share(total_len(f64_jobs), threads, t);
            // SAFETY: as above, for the f64 jobs.
            unsafe { run_range::<K, f64>(kernel, isa, f64_jobs, f64_flipped, states, lo, hi) };
        };
        pool::run(threads, work);
        // SAFETY: `queue` recorded tensors borrowed by the batch for `'t`, which outlives this
        // call. (A tensor ATen will not bump, an inference tensor, keeps its version: it has
        // been written all the same.)
        unsafe { ws.to_bump.bump() };
        Ok(())
    }
}

/// A batch's job list, kept between steps: the worker threads read the jobs, so a job
/// rewritten with the same values costs the writing core a fetch of its line from theirs. A
/// [`push`](Self::push) writes only what differs from the job that held that place in the
/// previous batch (on 2000 variables whose addresses do not move, nothing), [`clear`](Self::clear)
/// only forgets the length. Seen as a slice, it holds the jobs pushed since the last clear.
///
/// Only `push` writes a job's addresses and length (the slice is read-only; the scalars and
/// clips are set through [`settings_mut`](Self::settings_mut)), and each push that writes them
/// moves the list to a new [`generation`](Self::generation): a list cleared and pushed again
/// with the same operands keeps its generation, which lets the aliasing proof be skipped.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    jobs: Vec<KernelJob>,
    len: usize,
    generation: u64,
}

impl Jobs {
    /// Empties the list, keeping its jobs for the next pushes to compare with.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends the addresses, length and index of `job`; its scalars and clip are those of the
    /// job that was in this place, until [`Batch::set_scalars`] and [`Batch::set_clips`].
    pub(crate) fn push(&mut self, job: KernelJob) {
        match self.jobs.get_mut(self.len) {
            Some(j) => {
                if (j.index, j.len, j.p, j.g, j.states)
                    != (job.index, job.len, job.p, job.g, job.states)
                {
                    *j = KernelJob { scalars: j.scalars, clip: j.clip, ..job };
                    self.generation += 1;
                }
            }
            None => {
                self.jobs.push(job);
                self.generation += 1;
            }
        }
        self.len += 1;
    }

    /// Changes whenever a [`push`](Self::push) writes a job's index, length or addresses:
    /// two equal generations (with equal lengths) hold the same operands.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Each job's variable index, with its scalars and clip to set.
    pub(crate) fn settings_mut(
        &mut self,
    ) -> impl Iterator<Item = (usize, &mut [f64; 2], &mut f64)> {
        self.jobs[..self.len].iter_mut().map(|j| (j.index, &mut j.scalars, &mut j.clip))
    }
}

impl std::ops::Deref for Jobs {
    type Target = [KernelJob];
    fn deref(&self) -> &[KernelJob] {
        &self.jobs[..self.len]
    }
}

fn total_len(jobs: &[KernelJob]) -> usize {
    jobs.iter().map(|j| j.len).sum()
}

/// One run of one variable under [`Kernel::apply`], as a loop for [`Isa::run`].
struct ApplyKernel<'k, 's, K, T> {
    kernel: &'k K,
    scalars: [f64; 2],
    clip: f64,
    p: &'s mut [T],
    g: &'s [T],
    states: [&'s mut [T]; MAX_STATES],
}

impl<K: Kernel, T: Real> IsaLoop for ApplyKernel<'_, '_, K, T> {
    type Output = usize;
    #[inline(always)]
    fn run(self) -> usize {
        self.kernel.apply(self.scalars, self.clip, self.p, self.g, self.states)
    }
}

/// Runs `kernel` over elements `[lo, hi)` of the concatenation of `jobs`, adding the weights
/// whose sign it changed in each job to `flipped` (aligned with `jobs`).
///
/// # Safety
/// Every job's addresses must point to `len` valid, aligned elements of `T` (its first `states`
/// state addresses included), no byte written through one operand may belong to another
/// operand of any job, and nothing else may access elements `[lo, hi)` of the written operands
/// while this runs: what `admit`, `AliasProof::prove` and `share` establish.
unsafe fn run_range<K: Kernel, T: Real>(
    kernel: &K,
    isa: Isa,
    jobs: &[KernelJob],
    flipped: &[AtomicUsize],
    states: usize,
    lo: usize,
    hi: usize,
) {
    for (k, a, n) in pieces(jobs.iter().map(|j| j.len), lo, hi) {
        let job = &jobs[k];
        if let Some(next) = jobs.get(k + 1) {
            prefetch::<T>(next, states);
        }
        // SAFETY: (this block and the two below) by this function's contract every address
        // points to `job.len` valid, aligned elements of `T` (in practice the data of a live,
        // contiguous CPU tensor that the batch borrows, so its storage stays allocated), and
        // `a + n <= job.len`, so the ranges are in bounds. No byte written through one operand
        // belongs to any other operand of any job (gradients, only read, may share memory with
        // each other), and no other thread touches elements `[lo, hi)`, so each mutable slice
        // is the only reference to its elements while it lives. (Other tch handles to the same
        // tensors must not be used from other threads during the step: the same contract as
        // any in-place tch op.)
        let p = unsafe { slice_mut::<T>(job.p, a, n) };
        // SAFETY: as above; the gradient is only read.
        let g = unsafe { std::slice::from_raw_parts((job.g as *const T).add(a), n) };
        let mut st: [&mut [T]; MAX_STATES] = [&mut [], &mut [], &mut []];
        for (slot, &addr) in st.iter_mut().zip(&job.states[..states]) {
            // SAFETY: as above.
            *slot = unsafe { slice_mut::<T>(addr, a, n) };
        }
        let changed =
            isa.run(ApplyKernel { kernel, scalars: job.scalars, clip: job.clip, p, g, states: st });
        if changed > 0 {
            if let Some(count) = flipped.get(k) {
                count.fetch_add(changed, Ordering::Relaxed);
            }
        }
    }
}

/// Asks the processor to start loading the first few KiB of `job`'s operands, so that a small
/// variable's data is on its way while the previous one is computed (the hardware prefetcher
/// needs a few misses per stream before it helps, and a 1 KiB tensor has only 16 lines).
fn prefetch<T>(job: &KernelJob, states: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = (job.len * std::mem::size_of::<T>()).min(4096);
        for &addr in [job.p, job.g].iter().chain(&job.states[..states]) {
            for off in (0..bytes).step_by(64) {
                // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever
                // the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(addr.wrapping_add(off) as *const i8) };
            }
        }
    }
}

/// `n` elements of type `T` from element `offset` of the buffer at `addr`, mutably.
///
/// # Safety
/// `addr` must point to at least `offset + n` initialised, aligned elements of `T` that nothing
/// else reads or writes while the slice lives.
pub(super) unsafe fn slice_mut<'a, T>(addr: usize, offset: usize, n: usize) -> &'a mut [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut((addr as *mut T).add(offset), n) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::ops::{AdamKernel, Bop2Kernel, BopKernel};
    use crate::optim::Sqrt;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Runs `kernel` once over fresh buffers of `n` elements with the given instruction set
    /// and returns every buffer afterwards.
    fn run_once<K: Kernel>(kernel: &K, states: usize, isa: Isa, n: usize) -> Vec<Vec<f32>> {
        let mut p: Vec<f32> =
            noise(n, 1).iter().map(|v| if *v >= 0.0 { 1.0 } else { -1.0 }).collect();
        p[0] = 0.5; // a non-binary weight
        let g: Vec<f32> = noise(n, 2).iter().map(|v| v * 1e-3).collect();
        let mut s: Vec<Vec<f32>> = (0..MAX_STATES)
            .map(|k| noise(n, 3 + k as u64).iter().map(|v| v.abs() * 1e-3).collect())
            .collect();
        let mut addrs = [0usize; MAX_STATES];
        for (a, buf) in addrs.iter_mut().zip(&mut s) {
            *a = buf.as_mut_ptr() as usize;
        }
        let job = KernelJob {
            index: 0,
            len: n,
            p: p.as_mut_ptr() as usize,
            g: g.as_ptr() as usize,
            states: addrs,
            scalars: [0.01, 0.05],
            clip: f64::INFINITY,
        };
        let flipped = [AtomicUsize::new(0)];
        // SAFETY: every address is a distinct live Vec of `n` f32, used by nothing else here.
        unsafe { run_range::<K, f32>(kernel, isa, &[job], &flipped, states, 0, n) };
        let mut out = vec![p];
        out.extend(s.into_iter().take(states));
        out
    }

    /// `n` f32 elements of `value`.
    fn full(n: i64, value: f64) -> Tensor {
        Tensor::full([n], value, (tch::Kind::Float, tch::Device::Cpu))
    }

    /// A variable with one state tensor of its own, `m`.
    fn own<'t>(index: usize, param: &'t Tensor, grad: &'t Tensor, m: &'t Tensor) -> Operands<'t> {
        Operands { index, param, grad, states: [Some(("m", m)), None, None], state_buffer: None }
    }

    #[test]
    fn a_run_bumps_what_it_wrote_once_and_a_failed_run_nothing() {
        let bop = BopKernel { gamma: 1e-1, threshold: 1e-7 };
        let (p0, g0, m0) = (full(8, 1.0), full(8, 1e-3), full(8, 0.0));
        // Variables 1 and 2 keep their state in a state buffer; variable 3 is refused (its
        // gradient is a strided view).
        let buffers = [full(64, 0.0)];
        let (p1, g1, p2, g2) = (full(8, 1.0), full(8, -1e-3), full(4, -1.0), full(4, 1e-3));
        let (p3, g3, m3) = (full(4, 1.0), full(8, 1e-3).slice(0, 0, 8, 2), full(4, 0.0));
        let in_buffer = |index, param, grad, offset| Operands {
            index,
            param,
            grad,
            states: [None, None, None],
            state_buffer: Some((0, [offset, 0, 0])),
        };
        let all = [&p0, &m0, &p1, &p2, &buffers[0], &p3, &m3];
        let versions = || all.iter().map(|t| t.internal_version()).collect::<Vec<_>>();
        let before = versions();
        let mut ws = Workspace::default();
        let mut refused = Vec::new();
        let mut batch = ws.batch(1);
        let vars = [
            own(0, &p0, &g0, &m0),
            in_buffer(1, &p1, &g1, 0),
            in_buffer(2, &p2, &g2, 16),
            own(3, &p3, &g3, &m3),
        ];
        batch.queue(vars.into_iter(), &buffers, &mut refused);
        assert_eq!(refused.iter().map(|r| r.0).collect::<Vec<_>>(), [3], "{refused:?}");
        batch.run(&bop, 1).unwrap();
        let after = versions();
        // Each written tensor once, the buffer once for both of its variables; the refused
        // variable's tensors not at all.
        let bumped: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(bumped, [1, 1, 1, 1, 1, 0, 0]);
        // Two variables writing the same parameter: refused before anything is written.
        let mut batch = ws.batch(1);
        let m1 = full(8, 0.0);
        let twice = [own(0, &p0, &g0, &m0), own(1, &p0, &g1, &m1)];
        refused.clear();
        batch.queue(twice.into_iter(), &[], &mut refused);
        assert!(refused.is_empty(), "{refused:?}");
        assert!(matches!(batch.run(&bop, 1), Err(Unfit::Overlap(_))));
        assert_eq!(versions(), after);
        // Nor does a batch dropped without running (its variables refused by the caller).
        ws.batch(1).queue([own(0, &p0, &g0, &m0)].into_iter(), &[], &mut refused);
        let _ = ws.batch(1);
        assert_eq!(versions(), after);
    }

    #[test]
    fn kept_jobs_take_the_new_addresses_and_unset_scalars_are_zero() {
        // The job list is rewritten only where it changed (`Jobs`): a batch that reuses the
        // previous one's places must see its own tensors, and the scalars and clips it did
        // not set at their defaults, not the previous batch's.
        let bop = BopKernel { gamma: 1e-1, threshold: 1e-7 };
        let (p0, g0, m0) = (full(8, 1.0), full(8, 1e-3), full(8, 0.0));
        let (p1, g1, m1) = (full(4, 1.0), full(4, 1e-3), full(4, 0.0));
        let (p2, g2, m2) = (full(6, 1.0), full(6, 1e-3), full(6, 0.0));
        let mut ws = Workspace::default();
        let mut refused = Vec::new();
        let mut batch = ws.batch(1);
        batch.queue([own(0, &p0, &g0, &m0), own(1, &p1, &g1, &m1)].into_iter(), &[], &mut refused);
        batch.set_scalars(|i| [i as f64 + 1.0, 2.0]);
        batch.set_clips(|_| 0.5);
        batch.run(&bop, 1).unwrap();
        let seen = |ws: &Workspace| {
            ws.f32_jobs.iter().map(|j| (j.index, j.len, j.p, j.scalars, j.clip)).collect::<Vec<_>>()
        };
        let addr = |t: &Tensor| t.data_ptr() as usize;
        assert_eq!(
            seen(&ws),
            [(0, 8, addr(&p0), [1.0, 2.0], 0.5), (1, 4, addr(&p1), [2.0, 2.0], 0.5)]
        );
        // The same first variable, another second one, and no scalars or clips set.
        let mut batch = ws.batch(1);
        batch.queue([own(0, &p0, &g0, &m0), own(2, &p2, &g2, &m2)].into_iter(), &[], &mut refused);
        batch.run(&bop, 1).unwrap();
        let inf = f64::INFINITY;
        assert_eq!(seen(&ws), [(0, 8, addr(&p0), [0.0; 2], inf), (2, 6, addr(&p2), [0.0; 2], inf)]);
        assert_eq!(ws.updated().collect::<Vec<_>>(), [0, 2]);
        // A shorter batch: only its own job is seen.
        let mut batch = ws.batch(1);
        batch.queue([own(1, &p1, &g1, &m1)].into_iter(), &[], &mut refused);
        batch.set_scalars(|_| [3.0, 4.0]);
        batch.run(&bop, 1).unwrap();
        assert_eq!(seen(&ws), [(1, 4, addr(&p1), [3.0, 4.0], inf)]);
        assert!(refused.is_empty(), "{refused:?}");
    }

    #[test]
    fn an_unchanged_batch_keeps_its_proof_and_a_changed_one_is_proven_again() {
        let bop = BopKernel { gamma: 1e-1, threshold: 1e-7 };
        let (p0, g0, m0) = (full(8, 1.0), full(8, 1e-3), full(8, 0.0));
        let (p1, g1, m1) = (full(8, 1.0), full(8, 1e-3), full(8, 0.0));
        let mut ws = Workspace::default();
        let mut refused = Vec::new();
        let mut run = |ws: &mut Workspace, vars: &[Operands<'_>]| {
            let mut batch = ws.batch(1);
            batch.queue(vars.iter().copied(), &[], &mut refused);
            let result = batch.run(&bop, 1);
            (result.map_err(|e| matches!(e, Unfit::Overlap(_))), ws.alias.runs)
        };
        let both = [own(0, &p0, &g0, &m0), own(1, &p1, &g1, &m1)];
        assert_eq!(run(&mut ws, &both), (Ok(()), 1));
        // The same operands: the proof stands.
        assert_eq!(run(&mut ws, &both), (Ok(()), 1));
        // Variable 1's state is variable 0's parameter: proven again, refused.
        let clash = [own(0, &p0, &g0, &m0), own(1, &p1, &g1, &p0)];
        assert_eq!(run(&mut ws, &clash), (Err(true), 2));
        // And again, though its jobs are those of the refused batch: a refusal proves nothing.
        assert_eq!(run(&mut ws, &clash).1, 3);
        assert_eq!(run(&mut ws, &both), (Ok(()), 4));
        // A shorter list, then the full one: each proven.
        assert_eq!(run(&mut ws, &both[..1]), (Ok(()), 5));
        assert_eq!(run(&mut ws, &both), (Ok(()), 6));
        assert!(refused.is_empty(), "{refused:?}");
    }

    #[test]
    fn every_instruction_set_agrees_with_the_baseline_bit_for_bit() {
        let sets = Isa::available();
        eprintln!("instruction sets compared: {sets:?}");
        let n = 1003; // not a multiple of any vector width: the scalar tails run too
        let bop = BopKernel { gamma: 1e-2, threshold: 1e-7 };
        let base = run_once(&bop, 1, Isa::Baseline, n);
        assert_ne!(base[1], noise(n, 3).iter().map(|v| v.abs() * 1e-3).collect::<Vec<_>>());
        let bop2 = Bop2Kernel { gamma: 1e-2, sigma: 1e-1, threshold: 1e-3, eps: 1e-10 };
        let base2 = run_once(&bop2, 2, Isa::Baseline, n);
        // Each with both square roots: ATen's takes the blocked loop (math's tests hold it to
        // the one-pass loop over several blocks).
        let configs =
            [(false, false, false, 0.0), (false, true, true, 0.1), (true, true, false, 0.3)];
        let adams: Vec<AdamKernel> = [Sqrt::Fast, Sqrt::Aten]
            .into_iter()
            .flat_map(|sqrt| configs.map(move |c| (c, sqrt)))
            .map(|((decoupled, amsgrad, maximize, weight_decay), sqrt)| AdamKernel {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
                decoupled,
                amsgrad,
                maximize,
                sqrt,
            })
            .collect();
        let adam_base: Vec<_> =
            adams.iter().map(|a| run_once(a, a.states(), Isa::Baseline, n)).collect();
        for &isa in &sets[1..] {
            assert_eq!(base, run_once(&bop, 1, isa, n), "{isa:?}");
            assert_eq!(base2, run_once(&bop2, 2, isa, n), "{isa:?}");
            for (adam, want) in adams.iter().zip(&adam_base) {
                assert_eq!(*want, run_once(adam, adam.states(), isa, n), "{isa:?} {adam:?}");
            }
        }
    }
}
