//! Fused multi-tensor CPU kernels: one pass over all of an optimizer's variables, each element
//! read and written once, the work split across libtorch's own intra-op threads ([`pool`]).
//!
//! This is the only module of the crate with `unsafe` code, and `meta.cpp` beside it the only
//! C++ ([`meta`]: tensor metadata in bulk; [`pool`]: `at::parallel_for`). It turns tensors into
//! slices: an optimizer queues its variables' tensors in a [`Batch`], which reads all their
//! metadata in one call and checks every one of them (CPU, `f32`/`f64`, contiguous, aligned,
//! of the variable's length), and [`Batch::run`] proves that no memory it will write is touched
//! by another operand before it hands disjoint sub-slices to the threads. The arithmetic lives
//! in [`math`] and is safe code over slices.
//!
//! Anything a batch does not accept (CUDA, half precision, a strided view, a gradient that
//! aliases its parameter, ...) is reported back as [`Unfit`] and the optimizer uses its libtorch
//! ops instead, or fails when the fused path was forced.
//!
//! Writes go straight to the tensors' memory, so ATen's version counters are not bumped: the
//! same as an update under `no_grad` as far as autograd's results go, but a graph that saved a
//! parameter before the step will not notice that it changed (torch.optim's foreach path bumps
//! the counter and would raise there).

pub(crate) mod finite;
pub(crate) mod math;
pub(crate) mod meta;
pub(crate) mod ops;
pub(crate) mod pool;
pub(crate) mod stage;

use std::marker::PhantomData;
use std::mem::{align_of, size_of};

use tch::{Device, Kind, Tensor};

use math::Real;
use meta::{Meta, MetaReader, Status, CPU};

/// Below this many elements per thread, a second thread does not pay: on 2000 variables of 256
/// elements (2^19 in all) the per-variable work before the kernel dominates the step (reading
/// metadata: about a fifth of it, the kernels another fifth, in a `perf` profile), and a router
/// step with 2^17 here took 1.00-1.01x the time it takes with 2^18 (medians of 40 paired
/// in-process rounds of 50 steps).
pub(crate) const MIN_ELEMENTS_PER_THREAD: usize = 1 << 18;

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
        }
    }
}

/// One variable's update, as validated addresses (plain integers, so that a job list can be
/// kept between steps and sent to threads without claiming anything about the memory).
#[derive(Debug, Clone, Copy)]
struct Job {
    /// Index of the variable in its optimizer.
    index: usize,
    len: usize,
    p: usize,
    g: usize,
    states: [usize; MAX_STATES],
    /// Per-variable scalars the kernel interprets (e.g. Adam's step size).
    scalars: [f64; 2],
}

/// A byte range one operand of one job covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Region {
    start: usize,
    end: usize,
    writable: bool,
    /// The variable the operand belongs to.
    index: usize,
}

/// Scratch an optimizer keeps between steps, so that a fused step allocates nothing once the
/// job lists have grown to size, and re-proves disjointness only when an address changed.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    f32_jobs: Vec<Job>,
    f64_jobs: Vec<Job>,
    /// This step's regions, in queue order.
    regions: Vec<Region>,
    /// The regions of the last batch proven disjoint, in queue order.
    verified: Vec<Region>,
    /// Sorting scratch.
    sorted: Vec<Region>,
    /// Reads the parameters' and states' metadata (writable addresses).
    written: MetaReader,
    /// Reads the gradients' metadata.
    read: MetaReader,
    /// Reads the state buffers' metadata.
    buffers: MetaReader,
    /// A staged step's address of each f32 job's second state copy ([`stage`]).
    alt_addrs: Vec<usize>,
    /// A staged step's lines of weights to write, per thread, kept between steps.
    flips: Vec<Vec<stage::Flip>>,
}

impl Workspace {
    /// Starts an empty batch for a kernel with `states` state tensors per variable, whose
    /// tensors are borrowed for `'t`.
    pub(crate) fn batch<'t>(&mut self, states: usize) -> Batch<'_, 't> {
        self.f32_jobs.clear();
        self.f64_jobs.clear();
        Batch { ws: self, states: states.min(MAX_STATES), tensors: PhantomData }
    }

    /// Indices of the variables the last successful [`Batch::run`] updated.
    pub(crate) fn updated(&self) -> impl Iterator<Item = usize> + '_ {
        self.f32_jobs.iter().chain(&self.f64_jobs).map(|j| j.index)
    }
}

/// A kernel: the update of one variable's elements, in either element type.
pub trait Kernel: Sync {
    /// Updates one contiguous run of one variable: `p` and `g` are the same length, and so is
    /// each of the first [`states`](Kernel::states) slices of `states` (the rest are empty).
    /// `scalars` are the job's per-variable scalars.
    fn apply<T: Real>(
        &self,
        scalars: [f64; 2],
        p: &mut [T],
        g: &[T],
        states: [&mut [T]; MAX_STATES],
    );
}

/// The tensors of one step, queued variable by variable and then updated in one pass.
///
/// Holding shared borrows of every queued tensor for `'t` keeps their handles (and so their
/// storages) alive until the batch is run or dropped.
pub(crate) struct Batch<'w, 't> {
    ws: &'w mut Workspace,
    /// State tensors per variable.
    states: usize,
    tensors: PhantomData<&'t Tensor>,
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
    /// When the states live in a state buffer: its index in the `chunks` given to
    /// [`Batch::queue`] and each state's first element there. `states` are then not read.
    pub(crate) flat: Option<(usize, [usize; MAX_STATES])>,
}

/// ATen's scalar type codes of the two element types the kernels take.
const FLOAT: i32 = 6;
const DOUBLE: i32 = 7;

impl<'t> Batch<'_, 't> {
    /// Queues the update of every variable of `vars`, checking all their tensors (CPU, f32 or
    /// f64, contiguous, aligned, of the parameter's length; the gradient against the parameter
    /// as `optim::check_grad` does, [`Unfit::Grad`]) with two metadata reads for the whole
    /// list. Variables that cannot take the fused path are appended to `refused` with the
    /// reason, in order. Nothing is written until [`run`](Self::run); the kernel's per-variable
    /// scalars are zero until [`set_scalars`](Self::set_scalars).
    pub(crate) fn queue<I>(
        &mut self,
        vars: I,
        chunks: &'t [Tensor],
        refused: &mut Vec<(usize, Unfit)>,
    ) where
        I: Iterator<Item = Operands<'t>> + Clone,
    {
        let states = self.states;
        let ws = &mut *self.ws;
        // Variables whose states live in a buffer contribute only their parameter here.
        let own = |v: &Operands<'t>| if v.flat.is_some() { 0 } else { states };
        let written = ws.written.read(
            vars.clone().flat_map(|v| {
                std::iter::once(Some(v.param))
                    .chain(v.states.into_iter().take(own(&v)).map(|s| s.map(|(_, t)| t)))
            }),
            true,
        );
        let read = ws.read.read(vars.clone().map(|v| Some(v.grad)), false);
        let buffers = ws.buffers.read(chunks.iter().map(Some), true);
        let mut at = 0;
        for (k, v) in vars.enumerate() {
            let n = 1 + own(&v);
            let ops = &written[at..at + n];
            at += n;
            let names = v.states.map(|s| s.map_or("state", |(name, _)| name));
            let states = match v.flat {
                None => StateMetas::Own(&ops[1..]),
                Some((chunk, offsets)) => match buffers.get(chunk) {
                    Some(buffer) => StateMetas::Flat { buffer, offsets, count: states },
                    None => {
                        refused.push((v.index, Unfit::Unsupported("a missing state buffer")));
                        continue;
                    }
                },
            };
            match job(v.index, &ops[0], &read[k], states, &names) {
                Ok((job, true)) => ws.f64_jobs.push(job),
                Ok((job, false)) => ws.f32_jobs.push(job),
                Err(unfit) => refused.push((v.index, unfit)),
            }
        }
    }

    /// Sets each queued variable's kernel scalars, from its index.
    pub(crate) fn set_scalars(&mut self, mut scalars: impl FnMut(usize) -> [f64; 2]) {
        for j in self.ws.f32_jobs.iter_mut().chain(self.ws.f64_jobs.iter_mut()) {
            j.scalars = scalars(j.index);
        }
    }

    /// Runs `kernel` over every queued variable on up to `threads` threads (fewer when there
    /// is too little work to pay for them).
    ///
    /// Fails, before writing anything, when two operands share memory that one of them writes.
    pub(crate) fn run<K: Kernel>(self, kernel: &K, threads: usize) -> Result<(), Unfit> {
        let (ws, states) = (self.ws, self.states);
        if let Err(index) = ws.disjoint(states) {
            // Forget the jobs so that `updated` reports nothing.
            ws.f32_jobs.clear();
            ws.f64_jobs.clear();
            return Err(Unfit::Overlap(index));
        }
        let total = ws.f32_jobs.iter().chain(&ws.f64_jobs).map(|j| j.len).sum::<usize>();
        let threads = threads_for(total, threads, MIN_ELEMENTS_PER_THREAD);
        let simd = Simd::detect();
        let (f32_jobs, f64_jobs) = (&ws.f32_jobs[..], &ws.f64_jobs[..]);
        let work = |t: usize| {
            let (lo, hi) = share(total_len(f32_jobs), threads, t);
            // SAFETY: `push` checked every address (live CPU tensor of this element type,
            // contiguous, `len` elements, aligned) and the batch borrows those tensors until
            // it is consumed here; `disjoint` proved that written operands share no memory;
            // `share` hands each thread a disjoint element range.
            unsafe { run_range::<K, f32>(kernel, simd, f32_jobs, states, lo, hi) };
            let (lo, hi) = share(total_len(f64_jobs), threads, t);
            // SAFETY: as above, for the f64 jobs.
            unsafe { run_range::<K, f64>(kernel, simd, f64_jobs, states, lo, hi) };
        };
        pool::run(threads, work);
        Ok(())
    }
}

/// A variable's state operands: tensors of its own, or runs of a state buffer.
enum StateMetas<'a> {
    Own(&'a [Meta]),
    Flat { buffer: &'a Meta, offsets: [usize; MAX_STATES], count: usize },
}

/// Validates one variable's operands (parameter `p`, gradient `g`, the kernel's states) and
/// builds its job; the bool is true for f64.
fn job(
    index: usize,
    p: &Meta,
    g: &Meta,
    states: StateMetas<'_>,
    names: &[&'static str; MAX_STATES],
) -> Result<(Job, bool), Unfit> {
    usable(p)?;
    usable(g)?;
    if g.shape() != p.shape() {
        return Err(Unfit::Grad(format!("shape {:?} != {:?}", g.shape(), p.shape())));
    }
    if g.dtype() != p.dtype() {
        return Err(Unfit::Grad(format!("dtype {} != {}", kind_name(g), kind_name(p))));
    }
    if g.device_code() != p.device_code() {
        return Err(Unfit::Grad(format!("device {:?} != {:?}", g.device(), p.device())));
    }
    if p.device_code() != CPU {
        return Err(Unfit::Device(p.device()));
    }
    let (f64, align) = match p.dtype() {
        FLOAT => (false, align_of::<f32>()),
        DOUBLE => (true, align_of::<f64>()),
        _ => return Err(p.kind().map_or(Unfit::Unsupported("an unknown dtype"), Unfit::Kind)),
    };
    if !p.contiguous() {
        return Err(Unfit::NotContiguous("param"));
    }
    if !g.contiguous() {
        return Err(Unfit::NotContiguous("grad"));
    }
    let len = p.numel();
    let mut addrs = [0usize; MAX_STATES];
    // Checks a state tensor, or a whole state buffer, against the parameter.
    let check = |s: &Meta, name: &'static str, min_len: usize| -> Result<(), Unfit> {
        if s.status() == Status::Undefined {
            return Err(Unfit::Unsupported("a state tensor is missing"));
        }
        usable(s)?;
        if s.device_code() != CPU {
            return Err(Unfit::Device(s.device()));
        }
        if s.dtype() != p.dtype() {
            return Err(match s.kind() {
                Some(kind) => Unfit::KindMismatch { operand: name, kind },
                None => Unfit::Unsupported("a state of an unknown dtype"),
            });
        }
        if !s.contiguous() {
            return Err(Unfit::NotContiguous(name));
        }
        if s.numel() < min_len {
            return Err(Unfit::Length { operand: name, len: s.numel(), expected: min_len });
        }
        Ok(())
    };
    match states {
        StateMetas::Own(metas) => {
            for ((slot, s), &name) in addrs.iter_mut().zip(metas).zip(names) {
                check(s, name, len)?;
                if s.numel() != len {
                    return Err(Unfit::Length { operand: name, len: s.numel(), expected: len });
                }
                if len > 0 {
                    *slot = address(s, name, align)?;
                }
            }
        }
        StateMetas::Flat { buffer, offsets, count } => {
            let end = offsets[..count].iter().max().map_or(0, |&o| o + len);
            check(buffer, "state buffer", end)?;
            if len > 0 {
                let base = address(buffer, "state buffer", align)?;
                let size = if f64 { size_of::<f64>() } else { size_of::<f32>() };
                for (slot, &offset) in addrs.iter_mut().zip(&offsets).take(count) {
                    *slot = base + offset * size;
                }
            }
        }
    }
    // An empty variable is queued too (with no addresses), so that `updated` reports it: its
    // optimizer still counts the step for it, as torch.optim does.
    let (p, g) =
        if len == 0 { (0, 0) } else { (address(p, "param", align)?, address(g, "grad", align)?) };
    Ok((Job { index, len, p, g, states: addrs, scalars: [0.0; 2] }, f64))
}

/// Refuses a tensor whose metadata could not be read.
fn usable(m: &Meta) -> Result<(), Unfit> {
    match m.status() {
        Status::Ok => Ok(()),
        Status::Undefined => Err(Unfit::Unsupported("an undefined tensor")),
        Status::NotStrided => Err(Unfit::Unsupported("a sparse or opaque tensor layout")),
        Status::TooManyDims => Err(Unfit::Unsupported("a tensor with more than 12 dimensions")),
        Status::Exception => Err(Unfit::Unsupported("a tensor whose metadata libtorch refused")),
    }
}

/// The data address of a non-empty tensor, which must be `align`-aligned.
fn address(m: &Meta, name: &'static str, align: usize) -> Result<usize, Unfit> {
    let addr = m.data();
    if addr == 0 || !addr.is_multiple_of(align) {
        return Err(Unfit::Misaligned(name));
    }
    Ok(addr)
}

/// A dtype for a message.
fn kind_name(m: &Meta) -> String {
    m.kind().map_or_else(|| format!("scalar type {}", m.dtype()), |k| format!("{k:?}"))
}

impl Workspace {
    /// Checks that every byte some job writes belongs to exactly one operand of one job;
    /// readers (gradients) may share memory with each other, not with anything written. The
    /// error is the index of a variable involved in an overlap.
    fn disjoint(&mut self, states: usize) -> Result<(), usize> {
        self.regions.clear();
        for (jobs, size) in [(&self.f32_jobs, size_of::<f32>()), (&self.f64_jobs, size_of::<f64>())]
        {
            for j in jobs.iter().filter(|j| j.len > 0) {
                let bytes = j.len * size;
                let mut add = |addr: usize, writable: bool| {
                    let index = j.index;
                    self.regions.push(Region { start: addr, end: addr + bytes, writable, index })
                };
                add(j.p, true);
                add(j.g, false);
                for &s in &j.states[..states] {
                    add(s, true);
                }
            }
        }
        if self.regions == self.verified {
            return Ok(());
        }
        self.sorted.clear();
        self.sorted.extend_from_slice(&self.regions);
        self.sorted.sort_unstable();
        let (mut end_any, mut end_written) = (0usize, 0usize);
        for r in &self.sorted {
            if r.start < end_written || (r.writable && r.start < end_any) {
                return Err(r.index);
            }
            end_any = end_any.max(r.end);
            if r.writable {
                end_written = end_written.max(r.end);
            }
        }
        std::mem::swap(&mut self.verified, &mut self.regions);
        Ok(())
    }
}

fn total_len(jobs: &[Job]) -> usize {
    jobs.iter().map(|j| j.len).sum()
}

/// The pieces of elements `[lo, hi)` of the concatenation of runs of lengths `lens`, in order:
/// (run index, first element of the piece within its run, element count), empty pieces left out.
fn pieces(
    lens: impl IntoIterator<Item = usize>,
    lo: usize,
    hi: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut offset = 0;
    lens.into_iter()
        .enumerate()
        .map_while(move |(k, len)| {
            if offset >= hi {
                return None;
            }
            let (start, end, base) = (lo.max(offset), hi.min(offset + len), offset);
            offset += len;
            Some((k, start, end, base))
        })
        .filter(|&(_, start, end, _)| start < end)
        .map(|(k, start, end, base)| (k, start - base, end - start))
}

/// How many threads to use for `total` elements: at most `wanted`, and no more than leaves
/// each `min_per_thread` elements; at least one.
fn threads_for(total: usize, wanted: usize, min_per_thread: usize) -> usize {
    wanted.min(total / min_per_thread.max(1)).max(1)
}

/// Thread `t`'s share `[lo, hi)` of `total` elements split `threads` ways, boundaries rounded
/// to 16 elements so that threads do not share cache lines.
fn share(total: usize, threads: usize, t: usize) -> (usize, usize) {
    let at = |k: usize| if k >= threads { total } else { ((total / threads * k) & !15).min(total) };
    (at(t), at(t + 1))
}

/// The instruction set a loop runs with, detected once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    /// The baseline the crate is compiled for.
    Baseline,
    /// AVX2 (x86-64): the same arithmetic (no FMA), eight f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 (x86-64-v4: F, VL, BW, DQ): the same arithmetic, sixteen f32 lanes. ATen's own
    /// CPU kernels run this way where the processor has it; on the 2-core AMD EPYC benchmark VM
    /// it streams Adam's five operands faster than AVX2 (see the README's Performance section).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
                return Simd::Avx512;
            }
            if has!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

/// Runs `kernel` over elements `[lo, hi)` of the concatenation of `jobs`.
///
/// # Safety
/// Every job's addresses must point to `len` valid, aligned elements of `T` (its first `states`
/// state addresses included), no byte written through one operand may belong to another
/// operand of any job, and nothing else may access elements `[lo, hi)` of the written operands
/// while this runs: what `Batch::push`, `Workspace::disjoint` and `share` establish.
unsafe fn run_range<K: Kernel, T: Real>(
    kernel: &K,
    simd: Simd,
    jobs: &[Job],
    states: usize,
    lo: usize,
    hi: usize,
) {
    for (k, a, n) in pieces(jobs.iter().map(|j| j.len), lo, hi) {
        let job = &jobs[k];
        if let Some(next) = jobs.get(k + 1) {
            prefetch::<T>(next, states);
        }
        // SAFETY (for the three blocks below): by this function's contract every address
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
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::Avx2` is only chosen when the CPU reports AVX2.
            Simd::Avx2 => unsafe { apply_avx2(kernel, job.scalars, p, g, st) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::Avx512` is only chosen when the CPU reports these features.
            Simd::Avx512 => unsafe { apply_avx512(kernel, job.scalars, p, g, st) },
            Simd::Baseline => kernel.apply(job.scalars, p, g, st),
        }
    }
}

/// Asks the processor to start loading the first few KiB of `job`'s operands, so that a small
/// variable's data is on its way while the previous one is computed (the hardware prefetcher
/// needs a few misses per stream before it helps, and a 1 KiB tensor has only 16 lines).
fn prefetch<T>(job: &Job, states: usize) {
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
unsafe fn slice_mut<'a, T>(addr: usize, offset: usize, n: usize) -> &'a mut [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut((addr as *mut T).add(offset), n) }
}

/// The kernel compiled for AVX2: the loops are inlined here and vectorised eight f32 wide.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2<K: Kernel, T: Real>(
    kernel: &K,
    scalars: [f64; 2],
    p: &mut [T],
    g: &[T],
    states: [&mut [T]; MAX_STATES],
) {
    kernel.apply(scalars, p, g, states)
}

/// The kernel compiled for AVX-512: sixteen f32 lanes, still without FMA.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn apply_avx512<K: Kernel, T: Real>(
    kernel: &K,
    scalars: [f64; 2],
    p: &mut [T],
    g: &[T],
    states: [&mut [T]; MAX_STATES],
) {
    kernel.apply(scalars, p, g, states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_the_concatenation_at_the_range() {
        let lens = [3usize, 0, 5, 2];
        let all = |lo, hi| pieces(lens, lo, hi).collect::<Vec<_>>();
        assert_eq!(all(0, 10), vec![(0, 0, 3), (2, 0, 5), (3, 0, 2)]);
        assert_eq!(all(2, 4), vec![(0, 2, 1), (2, 0, 1)]);
        assert_eq!(all(3, 8), vec![(2, 0, 5)]);
        assert_eq!(all(9, 10), vec![(3, 1, 1)]);
        assert_eq!(all(4, 4), vec![]);
        assert_eq!(all(10, 10), vec![]);
    }

    #[test]
    fn threads_follow_the_work() {
        assert_eq!(threads_for(0, 4, 100), 1);
        assert_eq!(threads_for(99, 4, 100), 1);
        assert_eq!(threads_for(250, 4, 100), 2);
        assert_eq!(threads_for(10_000, 4, 100), 4);
        assert_eq!(threads_for(10_000, 0, 100), 1);
    }

    #[test]
    fn shares_cover_everything_once_on_cache_line_boundaries() {
        for total in [0usize, 1, 15, 16, 17, 1000, 12_345] {
            for threads in 1..6 {
                let mut next = 0;
                for t in 0..threads {
                    let (lo, hi) = share(total, threads, t);
                    assert_eq!(lo, next, "total {total} threads {threads}");
                    assert!(lo <= hi);
                    assert!(lo % 16 == 0 || lo == total);
                    next = hi;
                }
                assert_eq!(next, total);
            }
        }
    }

    fn ws_with(jobs: &[(usize, usize, usize, usize)]) -> Workspace {
        let mut ws = Workspace::default();
        for &(p, g, m, len) in jobs {
            let index = ws.f32_jobs.len();
            ws.f32_jobs.push(Job { index, len, p, g, states: [m, 0, 0], scalars: [0.0; 2] });
        }
        ws
    }

    #[test]
    fn disjointness_allows_shared_reads_only() {
        // Separate buffers of 4 f32 (16 bytes) each.
        assert_eq!(ws_with(&[(0, 16, 32, 4), (48, 64, 80, 4)]).disjoint(1), Ok(()));
        // Two variables reading the same gradient: fine.
        assert_eq!(ws_with(&[(0, 100, 32, 4), (48, 100, 80, 4)]).disjoint(1), Ok(()));
        // A gradient that is its own parameter.
        assert_eq!(ws_with(&[(0, 0, 32, 4)]).disjoint(1), Err(0));
        // A state overlapping the next variable's parameter by one element.
        assert!(ws_with(&[(0, 16, 32, 4), (44, 64, 80, 4)]).disjoint(1).is_err());
        // A gradient reading memory another variable writes.
        assert!(ws_with(&[(0, 52, 32, 4), (48, 100, 80, 4)]).disjoint(1).is_err());
        // Only the operands a kernel uses count: a stale second state slot is ignored.
        let mut ws = ws_with(&[(0, 16, 32, 4)]);
        ws.f32_jobs[0].states[1] = 0;
        assert_eq!(ws.disjoint(1), Ok(()));
    }

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
    fn run_once<K: Kernel>(kernel: &K, states: usize, simd: Simd, n: usize) -> Vec<Vec<f32>> {
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
        let job = Job {
            index: 0,
            len: n,
            p: p.as_mut_ptr() as usize,
            g: g.as_ptr() as usize,
            states: addrs,
            scalars: [0.01, 0.05],
        };
        // SAFETY: every address is a distinct live Vec of `n` f32, used by nothing else here.
        unsafe { run_range::<K, f32>(kernel, simd, &[job], states, 0, n) };
        let mut out = vec![p];
        out.extend(s.into_iter().take(states));
        out
    }

    /// The instruction sets this CPU can run, the baseline first.
    fn available() -> Vec<Simd> {
        let mut out = vec![Simd::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                out.push(Simd::Avx2);
            }
            if Simd::detect() == Simd::Avx512 {
                out.push(Simd::Avx512);
            }
        }
        out
    }

    #[test]
    fn every_instruction_set_agrees_with_the_baseline_bit_for_bit() {
        use ops::{AdamKernel, Bop2Kernel, BopKernel};
        let sets = available();
        eprintln!("instruction sets compared: {sets:?}");
        let n = 1003; // not a multiple of any vector width: the scalar tails run too
        let bop = BopKernel { gamma: 1e-2, threshold: 1e-7 };
        let base = run_once(&bop, 1, Simd::Baseline, n);
        assert_ne!(base[1], noise(n, 3).iter().map(|v| v.abs() * 1e-3).collect::<Vec<_>>());
        let bop2 = Bop2Kernel { gamma: 1e-2, sigma: 1e-1, threshold: 1e-3, eps: 1e-10 };
        let base2 = run_once(&bop2, 2, Simd::Baseline, n);
        let adams: Vec<AdamKernel> =
            [(false, false, false, 0.0), (false, true, true, 0.1), (true, true, false, 0.3)]
                .into_iter()
                .map(|(decoupled, amsgrad, maximize, weight_decay)| AdamKernel {
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay,
                    decoupled,
                    amsgrad,
                    maximize,
                })
                .collect();
        let adam_base: Vec<_> =
            adams.iter().map(|a| run_once(a, a.states(), Simd::Baseline, n)).collect();
        for &simd in &sets[1..] {
            assert_eq!(base, run_once(&bop, 1, simd, n), "{simd:?}");
            assert_eq!(base2, run_once(&bop2, 2, simd, n), "{simd:?}");
            for (adam, want) in adams.iter().zip(&adam_base) {
                assert_eq!(*want, run_once(adam, adam.states(), simd, n), "{simd:?} {adam:?}");
            }
        }
    }

    #[test]
    fn a_verified_plan_is_reused_and_a_changed_one_rechecked() {
        let mut ws = ws_with(&[(0, 16, 32, 4)]);
        assert_eq!(ws.disjoint(1), Ok(()));
        assert_eq!(ws.verified.len(), 3);
        assert_eq!(ws.disjoint(1), Ok(()));
        ws.f32_jobs[0].g = 0;
        assert_eq!(ws.disjoint(1), Err(0));
    }
}
