//! Times one optimizer step on docs/design.md's benchmark parameter sets, every implementation side
//! by side, against the memory-bandwidth bound measured in the same minutes.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example bench_step -- [--set binarynet|many-small|all]
//!     [--json] [--device cpu|cuda] [--threads 2] [--rounds 8] [--reps 24] [--warmup 3]
//!     [--block-warmup 2] [--min-block-ms 8]
//!     [--no-torch] [--python PYTHON] [--only SUBSTRING] [--isa avx512|avx2|baseline]
//! ```
//!
//! `--isa` caps the instruction set of caseopt's fused kernels and of ATen's CPU kernels (in this
//! process and in Python's, through `ATEN_CPU_CAPABILITY`) at the one named, so that an AVX-512
//! machine times what an AVX2-only or a baseline processor runs. The bound stays the machine's
//! (the memory is the same): the Rust probe loops are not capped, and since ATen reads its
//! capability once per process, a capped run also times libtorch's `add_` in a second process
//! of this binary started without the cap (`--aten-probe-server`, not for use by hand), beside
//! the capped `add_` of this one. Every row names the set it ran with.
//!
//! Rows, per set: the caseopt router (`binary => Bop<threshold: 1e-8, gamma: 1e-4>,
//! _ => Adam<lr: 0.01>`) and caseopt Adam on every variable, each on its default backend
//! (fused kernels on CPU) and forced onto libtorch ops, and both on the multi-tensor backend
//! (`Backend::MultiTensor`, torch.optim's `fused=True` ops); caseopt Adam with ATen's square root
//! (`Sqrt::Aten`, torch.optim's bits); tch's `nn::Adam` (libtorch's C++
//! optimizer); and, through the provisioned Python (`scripts/bench_torch.py --serve`, one
//! long-lived process per set), torch.optim.Adam (foreach and fused) and a torch-ops Bop plus
//! fused Adam; caseopt Lion on every variable, fused and on libtorch ops. The PyTorch Bop row's
//! Adam is torch's fused multi-tensor kernel, so beside `caseopt Bop + Adam [libtorch ops]`
//! (Adam on per-tensor ops) runs `caseopt Bop [libtorch ops] + Adam [multi-tensor]`, whose Adam
//! is that same kernel: issue 22's "Bop on libtorch ops no slower than torch-ops Bop" compares
//! those two (like with like), the other pairing is printed too. libtorch and the kernels run on
//! `--threads` threads.
//!
//! The machine this is developed on is a shared VM whose memory bandwidth drifts by up to 2x
//! over tens of seconds, so nothing is timed in one block: every implementation of a set is
//! built once and warmed up (`--warmup` steps), then `--rounds` rounds each run a few bandwidth
//! passes and then, for every implementation in turn (in reverse order every other round),
//! Rust and Python alike, `--block-warmup` untimed steps followed by `--reps / --rounds` timed
//! steps (at least 3), or, for an implementation whose warm-up steps took less, as many as fill
//! `--min-block-ms` (at most 16 times as many): three sub-millisecond many-small steps per
//! round left its per-round ratios spread over 0.68-1.84x, twelve over 1.05-1.06x. The untimed
//! steps keep what the issue asks for, steps timed back to back after warm-up: without them the
//! first step of each block pays for caches the bandwidth passes and the other implementations
//! evicted (on many small tensors, about half again as long). The order alternates so that a
//! place in it cannot favour one implementation of a pair: the one timed first after the
//! bandwidth passes may pay more for them (on many-small, the router's check ratio against
//! `Proceed`, timed second, was 1.09-1.16x per round in three runs in that order and
//! 0.95-1.14x in three reversed, AMD EPYC Zen 5, 2026-12-08: within the host's noise, but a
//! fixed order can only add a bias). A row's time is the median (and min) of all its timed
//! steps across the rounds; the bandwidth is the median of all passes across the rounds, and
//! its spread over the rounds is printed to show how noisy the run was.
//!
//! The bound is bytes moved / streaming bandwidth. The bandwidth is that of `a += b` over two
//! 256 MiB `f32` buffers on `--threads` threads (3 transfers of 4 bytes per element), measured
//! by several probes: a Rust loop compiled for the widest vector instruction set the CPU has
//! (and for AVX2 beside AVX-512, which is not always the faster), and libtorch's own vectorised
//! `add_`. The highest is used, so that a weak loop cannot inflate the bound. Bytes per element:
//! 28 for Adam (p, m, v read and written, g read) and 20 for Bop and Lion (w, m read and
//! written, g read).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use caseopt::{
    case_optimizer, Adam, AdamConfig, Backend, Bop, BopConfig, Execution, Lion, LionConfig,
    NonFinitePolicy, Optimizer, Router, Sqrt,
};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

/// Bytes per element and step: Adam reads and writes p, m, v and reads g.
const ADAM_BYTES: f64 = 28.0;
/// Bop reads and writes w, m and reads g.
const BOP_BYTES: f64 = 20.0;
/// Lion, like Bop, reads and writes p, m and reads g.
const LION_BYTES: f64 = 20.0;
/// Passes of each bandwidth probe per round.
const BANDWIDTH_PASSES: usize = 3;
/// Elements of each bandwidth buffer: 256 MiB of f32, far beyond any cache.
const PROBE_LEN: usize = 256 * 1024 * 1024 / 4;
/// Bytes one probe pass moves: read a, read b, write a.
const PROBE_BYTES: f64 = 3.0 * 4.0 * PROBE_LEN as f64;

#[path = "bench_step/sets.rs"]
mod sets;
use sets::{make_store, set_named, Spec};

struct Args {
    sets: Vec<String>,
    json: bool,
    device: Device,
    threads: usize,
    /// Timed steps per implementation, spread over the rounds.
    reps: usize,
    rounds: usize,
    warmup: usize,
    /// Untimed steps before each implementation's timed steps in every round.
    block_warmup: usize,
    /// Each implementation's timed steps per round fill at least this long (by its warm-up
    /// steps' median), within [`max_steps_per_round`](Self::max_steps_per_round).
    min_block_ms: f64,
    torch_rows: bool,
    python: String,
    /// Only the rows whose name contains this.
    only: Option<String>,
    /// The instruction set the kernels (ours and ATen's) are capped at.
    isa: Option<String>,
}

impl Args {
    /// Whether row `imp` is selected by `--only` (a substring; a trailing `$` anchors it at the
    /// end of the name).
    fn wants(&self, imp: &str) -> bool {
        match &self.only {
            None => true,
            Some(o) => match o.strip_suffix('$') {
                Some(end) => imp.ends_with(end),
                None => imp.contains(o.as_str()),
            },
        }
    }

    /// Timed steps of each implementation per round: at least 3, so that the one step per round
    /// that starts cold (caches and thread pools left to the previous implementation) never
    /// makes up half of a row's samples.
    fn steps_per_round(&self) -> usize {
        (self.reps / self.rounds).max(3)
    }

    /// The most timed steps per round `--min-block-ms` may ask for: 16 times
    /// [`steps_per_round`](Self::steps_per_round).
    fn max_steps_per_round(&self) -> usize {
        16 * self.steps_per_round()
    }

    /// Timed steps per round for an implementation whose warm-up steps took `warm_ms` (their
    /// median; `None` without warm-up): enough to fill `--min-block-ms`, within
    /// [`max_steps_per_round`](Self::max_steps_per_round) and never fewer than
    /// [`steps_per_round`](Self::steps_per_round).
    fn steps_for(&self, warm_ms: Option<f64>) -> usize {
        let k = self.steps_per_round();
        match warm_ms {
            Some(ms) if ms > 0.0 && ms.is_finite() => {
                let fill = (self.min_block_ms / ms).ceil();
                // Saturating float-to-int conversion; the clamp keeps it in range.
                (fill as usize).clamp(k, self.max_steps_per_round())
            }
            _ => k,
        }
    }
}

const USAGE: &str = "usage: bench_step [--set binarynet|many-small|all] [--json] \
[--device cpu|cuda] [--threads N] [--rounds N] [--reps N] [--warmup N] [--block-warmup N] \
[--min-block-ms MS] \
[--no-torch] [--python PYTHON] [--only SUBSTRING] [--isa avx512|avx2|baseline]";

impl Default for Args {
    // Sized so that a full run (both sets, every row) takes about a minute and a half on the
    // 2-core VM, most of it in the libtorch-ops rows.
    fn default() -> Self {
        Args {
            sets: vec!["binarynet".into(), "many-small".into()],
            json: false,
            device: Device::Cpu,
            threads: 2,
            reps: 24,
            rounds: 8,
            warmup: 3,
            block_warmup: 2,
            min_block_ms: 8.0,
            torch_rows: true,
            python: "python".into(),
            only: None,
            isa: None,
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        let number = |v: String, name: &str| {
            v.parse::<usize>().map_err(|_| format!("{name} takes a number, got `{v}`"))
        };
        match arg.as_str() {
            "--set" => {
                let v = value("--set")?;
                args.sets = match v.as_str() {
                    "all" => vec!["binarynet".into(), "many-small".into()],
                    s if set_named(s).is_some() => vec![v],
                    _ => return Err(format!("unknown set `{v}`\n{USAGE}")),
                }
            }
            "--json" => args.json = true,
            "--device" => {
                args.device = match value("--device")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    other => return Err(format!("unknown device `{other}`\n{USAGE}")),
                }
            }
            "--threads" => args.threads = number(value("--threads")?, "--threads")?.max(1),
            "--reps" => args.reps = number(value("--reps")?, "--reps")?.max(1),
            "--rounds" => args.rounds = number(value("--rounds")?, "--rounds")?.max(1),
            "--warmup" => args.warmup = number(value("--warmup")?, "--warmup")?,
            "--block-warmup" => {
                args.block_warmup = number(value("--block-warmup")?, "--block-warmup")?
            }
            "--min-block-ms" => {
                let v = value("--min-block-ms")?;
                args.min_block_ms = match v.parse::<f64>() {
                    Ok(ms) if ms >= 0.0 && ms.is_finite() => ms,
                    _ => {
                        return Err(format!("--min-block-ms takes a number of ms >= 0, got `{v}`"))
                    }
                }
            }
            "--no-torch" => args.torch_rows = false,
            "--python" => args.python = value("--python")?,
            "--only" => args.only = Some(value("--only")?),
            "--isa" => {
                let v = value("--isa")?;
                if !["avx512", "avx2", "baseline"].contains(&v.as_str()) {
                    return Err(format!("unknown instruction set `{v}`\n{USAGE}"));
                }
                args.isa = Some(v);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if args.device.is_cuda() && !tch::Cuda::is_available() {
        return Err("--device cuda: no CUDA device is available".into());
    }
    Ok(args)
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Lets the previous implementation's worker threads go idle before the next one is timed.
///
/// libtorch's OpenMP workers (in this process and in Python's) spin for some milliseconds after
/// each parallel region before they sleep; timing the next implementation while they spin would
/// charge it for two processes' threads sharing two cores.
fn settle() {
    std::thread::sleep(Duration::from_millis(10));
}

/// The instruction sets the rows run with: caseopt's fused kernels' and ATen's.
struct Isas {
    kernels: String,
    aten: String,
}

impl Isas {
    /// The set row `imp` runs its arithmetic with: the fused kernels' for caseopt's rows on
    /// their default backend, ATen's for the libtorch-ops, multi-tensor, tch and PyTorch rows.
    fn of(&self, imp: &str) -> String {
        let on_aten = imp.contains("[libtorch ops]") || imp.contains("[multi-tensor]");
        if imp.starts_with("caseopt") && !on_aten {
            self.kernels.clone()
        } else {
            format!("ATen {}", self.aten)
        }
    }
}

/// Caps caseopt's kernels and ATen's at `--isa` (ATen through `ATEN_CPU_CAPABILITY`, which it
/// reads at its first operation, so this runs before any; Python inherits it), and returns
/// the sets they run with.
fn cap_isa(args: &Args) -> Result<Isas, String> {
    if let Some(isa) = &args.isa {
        caseopt::__private::set_kernel_isa(Some(isa)).map_err(|e| e.to_string())?;
        // The kernels take the cap with the processor's widest set; a set it lacks would
        // label every row with a set nothing ran with.
        let kernels = caseopt::__private::kernel_isa().map_err(|e| e.to_string())?;
        if kernels != isa.as_str() {
            return Err(format!("--isa {isa}: this processor's widest set is {kernels}"));
        }
        let aten = if isa == "baseline" { "default" } else { isa.as_str() };
        // A capability the user set by hand wins.
        if std::env::var_os("ATEN_CPU_CAPABILITY").is_none() {
            std::env::set_var("ATEN_CPU_CAPABILITY", aten);
        }
    }
    let kernels = caseopt::__private::kernel_isa().map_err(|e| e.to_string())?;
    Ok(Isas { kernels: kernels.into(), aten: caseopt::__private::aten_cpu_capability().into() })
}

/// A vector instruction set the bandwidth loop is compiled for.
#[derive(Clone, Copy)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Isa {
    /// The loops to measure on this CPU: the widest instruction set it has, and AVX2 beside
    /// AVX-512, because the widest is not always the fastest.
    fn available() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2");
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
            {
                return if avx2 { vec![Isa::Avx512, Isa::Avx2] } else { vec![Isa::Avx512] };
            }
            if avx2 {
                return vec![Isa::Avx2];
            }
        }
        vec![Isa::Baseline]
    }

    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            Isa::Baseline => "baseline",
        }
    }

    /// `a += b` elementwise (`a` and `b` of equal length), in this instruction set.
    fn add_assign(self, a: &mut [f32], b: &[f32]) {
        match self {
            // SAFETY: `available` returns Avx512 only after `is_x86_feature_detected!` reported
            // avx512f, avx512vl, avx512bw and avx512dq on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { add_assign_avx512(a, b) },
            // SAFETY: `available` returns Avx2 only after `is_x86_feature_detected!("avx2")`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { add_assign_avx2(a, b) },
            Isa::Baseline => add_assign(a, b),
        }
    }
}

/// The loop itself, inlined into each `target_feature` wrapper so that it is vectorised for
/// that wrapper's instruction set.
#[inline(always)]
fn add_assign(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// # Safety
/// The CPU must support avx512f, avx512vl, avx512bw and avx512dq.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn add_assign_avx512(a: &mut [f32], b: &[f32]) {
    add_assign(a, b)
}

/// # Safety
/// The CPU must support avx2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_assign_avx2(a: &mut [f32], b: &[f32]) {
    add_assign(a, b)
}

/// The bandwidth probes and their buffers, allocated once for the whole run: the Rust loops
/// (`a += b` split across the threads; none on CUDA, where host memory is not what is bounded),
/// then libtorch's own vectorised `add_` on its thread pool (or on the device).
struct Probe {
    device: Device,
    threads: usize,
    loops: Vec<Isa>,
    host: (Aligned, Aligned),
    tensors: (Tensor, Tensor),
    /// libtorch's `add_` without the `--isa` cap, in a process of its own (capped CPU runs).
    uncapped: Option<AtenProbe>,
}

impl Probe {
    fn new(device: Device, threads: usize, capped: bool) -> Probe {
        let cpu = !device.is_cuda();
        let loops = if cpu { Isa::available() } else { Vec::new() };
        let len = if cpu { PROBE_LEN } else { 0 };
        let host = (Aligned::new(len, 1.0), Aligned::new(len, 1e-9));
        let (a, b) = aten_probe_tensors(device);
        let uncapped = if cpu && capped {
            AtenProbe::spawn(threads)
                .map_err(|e| eprintln!("bench_step: no uncapped libtorch add_ probe: {e}"))
                .ok()
        } else {
            None
        };
        let mut probe = Probe { device, threads, loops, host, tensors: (a, b), uncapped };
        // Untimed passes: page faults, thread start-up.
        for i in 0..probe.len() {
            probe.pass(i);
        }
        probe
    }

    fn len(&self) -> usize {
        self.loops.len() + 1 + usize::from(self.uncapped.is_some())
    }

    fn name(&self, i: usize) -> String {
        match self.loops.get(i) {
            Some(isa) => format!("Rust loop [{}]", isa.name()),
            None if i == self.loops.len() => "libtorch add_".into(),
            None => match &self.uncapped {
                Some(p) => format!("libtorch add_ [{}, own process]", p.capability),
                None => "libtorch add_ [own process]".into(),
            },
        }
    }

    /// One pass of probe `i`, in bytes/s.
    fn pass(&mut self, i: usize) -> f64 {
        if i > self.loops.len() {
            // Timed in the other process, with no OpenMP worker of either process spinning
            // beside the other's. A probe process that failed gives 0 from then on: never the
            // highest.
            settle();
            let bps = self.uncapped.as_mut().map(AtenProbe::pass).unwrap_or(Ok(0.0));
            settle();
            return bps.unwrap_or_else(|e| {
                eprintln!("bench_step: dropping the uncapped libtorch add_ probe: {e}");
                self.uncapped = None;
                0.0
            });
        }
        let Some(&isa) = self.loops.get(i) else {
            let (a, b) = &mut self.tensors;
            return aten_add_pass(a, b, self.device).expect("libtorch add_ on the probe's buffers");
        };
        let t0 = Instant::now();
        let (a, b) = (self.host.0.slice_mut(), self.host.1.slice());
        let chunk = PROBE_LEN.div_ceil(self.threads);
        std::thread::scope(|s| {
            for (a, b) in a.chunks_mut(chunk).zip(b.chunks(chunk)) {
                s.spawn(move || isa.add_assign(a, b));
            }
        });
        PROBE_BYTES / t0.elapsed().as_secs_f64()
    }
}

/// The libtorch `add_` probe's two buffers on `device`.
fn aten_probe_tensors(device: Device) -> (Tensor, Tensor) {
    let a = Tensor::ones([PROBE_LEN as i64], (Kind::Float, device));
    let b = Tensor::full([PROBE_LEN as i64], 1e-9, (Kind::Float, device));
    (a, b)
}

/// One pass of libtorch's `a += b`, in bytes/s (this process's probe and the uncapped server's).
fn aten_add_pass(a: &mut Tensor, b: &Tensor, device: Device) -> Result<f64, tch::TchError> {
    let t0 = Instant::now();
    let _ = a.f_add_(b)?;
    sync(device);
    Ok(PROBE_BYTES / t0.elapsed().as_secs_f64())
}

/// libtorch's `add_` probe in a process of its own, this binary run as `--aten-probe-server
/// THREADS` without `ATEN_CPU_CAPABILITY`: ATen picks its capability once per process, so an
/// `--isa`-capped run cannot time its uncapped `add_` itself.
struct AtenProbe {
    child: Child,
    /// Taken (closed) on drop: the server exits at the end of its stdin.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The capability the server's ATen runs with, as it reported it.
    capability: String,
}

impl AtenProbe {
    fn spawn(threads: usize) -> Result<AtenProbe, String> {
        let exe = std::env::current_exe().map_err(|e| format!("no path to this binary: {e}"))?;
        let mut child = Command::new(exe)
            .args(["--aten-probe-server", &threads.to_string()])
            .env_remove("ATEN_CPU_CAPABILITY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start it: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no pipes to it".into());
        };
        let mut probe = AtenProbe {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            capability: "?".into(),
        };
        // The first line names the capability, once the buffers are allocated and touched.
        probe.capability = probe.line()?;
        Ok(probe)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("it exited".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(format!("reading from it: {e}")),
        }
    }

    /// One pass of `a += b` in the server, in bytes/s.
    fn pass(&mut self) -> Result<f64, String> {
        let stdin = self.stdin.as_mut().ok_or("its stdin is closed")?;
        writeln!(stdin, "pass")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing: {e}"))?;
        let line = self.line()?;
        line.parse::<f64>().map_err(|_| format!("it answered `{line}`"))
    }
}

impl Drop for AtenProbe {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The other side of [`AtenProbe`]: allocates the two buffers, prints ATen's capability, then
/// answers every `pass` line on stdin with the bytes/s of one `a += b`, until stdin ends.
fn aten_probe_server(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(threads.max(1) as i32);
    let (mut a, b) = aten_probe_tensors(Device::Cpu);
    // Untimed: page faults, thread start-up.
    aten_add_pass(&mut a, &b, Device::Cpu)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", caseopt::__private::aten_cpu_capability())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() != "pass" {
            return Err("expected `pass`".into());
        }
        writeln!(out, "{}", aten_add_pass(&mut a, &b, Device::Cpu)?)?;
        out.flush()?;
    }
    Ok(())
}

/// `len` f32 starting on a 64-byte boundary, as libtorch allocates tensors: a `Vec<f32>` of
/// 256 MiB from the system allocator starts 16 bytes past one, which splits every other
/// 64-byte AVX-512 load across two cache lines and made the AVX-512 loop look 10-25% slower
/// than the AVX2 one here.
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, value: f32) -> Aligned {
        let buf = vec![value; len + 16];
        let start = (64 - buf.as_ptr() as usize % 64) % 64 / std::mem::size_of::<f32>();
        Aligned { buf, start, len }
    }

    fn slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    fn slice_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Bandwidth passes of one set in bytes/s, per probe, per round.
#[derive(Default)]
struct BandwidthSamples {
    passes: Vec<Vec<Vec<f64>>>,
}

impl BandwidthSamples {
    /// One round's passes, the probes taking turns so that all see the same seconds.
    fn round(&mut self, probe: &mut Probe) {
        self.passes.resize_with(probe.len(), Vec::new);
        for rounds in &mut self.passes {
            rounds.push(Vec::with_capacity(BANDWIDTH_PASSES));
        }
        for _ in 0..BANDWIDTH_PASSES {
            for (i, rounds) in self.passes.iter_mut().enumerate() {
                let bw = probe.pass(i);
                rounds.last_mut().expect("pushed above").push(bw);
            }
        }
    }

    fn summary(&self, probe: &Probe) -> Bandwidth {
        let probes: Vec<(String, f64)> = self
            .passes
            .iter()
            .enumerate()
            .map(|(i, rounds)| (probe.name(i), median(rounds.concat())))
            .collect();
        let best = (0..probes.len()).max_by(|&i, &j| probes[i].1.total_cmp(&probes[j].1));
        // Rounds are at least 1 and libtorch's probe always runs, so `best` is some probe.
        let best = best.unwrap_or(0);
        let chosen = self.passes.get(best).map(Vec::as_slice).unwrap_or(&[]);
        let per_round: Vec<f64> = chosen.iter().map(|r| median(r.clone())).collect();
        let (source, bytes_per_s) = probes.get(best).cloned().unwrap_or((String::new(), f64::NAN));
        Bandwidth {
            bytes_per_s,
            source,
            probes,
            round_min: min(&per_round),
            round_max: max(&per_round),
            passes: chosen.iter().map(Vec::len).sum(),
            per_round,
        }
    }
}

/// One set's bandwidth, in bytes/s.
struct Bandwidth {
    /// The bound's: the highest of the probes (median of its passes).
    bytes_per_s: f64,
    /// Every probe's name and median.
    probes: Vec<(String, f64)>,
    /// Which probe `bytes_per_s` comes from.
    source: String,
    /// That probe's lowest and highest round (median of the round's passes).
    round_min: f64,
    round_max: f64,
    /// Passes behind `bytes_per_s`.
    passes: usize,
    /// That probe's bandwidth in each round (median of the round's passes).
    per_round: Vec<f64>,
}

/// The benchmark's routing done by hand, to force both optimizers onto one backend (a router
/// built by `case_optimizer!` keeps each rule's default, `Backend::Auto`): binary variables to
/// Bop<threshold: 1e-8, gamma: 1e-4>, the rest to Adam<lr: 0.01>, each stepping with its
/// variables' `.grad()` as a router's step does.
struct ManualRouter {
    bop: Bop,
    adam: Adam,
}

impl ManualRouter {
    /// Bop on `bop_backend`, Adam on `adam_backend`.
    fn new(
        vs: &nn::VarStore,
        bop_backend: Backend,
        adam_backend: Backend,
        threads: usize,
    ) -> caseopt::Result<Self> {
        let mut bop = Bop::new(BopConfig { threshold: 1e-8.into(), gamma: 1e-4.into() })?;
        let mut adam = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() })?;
        for p in caseopt::trainable_vars(vs) {
            if p.info.is_binary() {
                bop.add_param(p)?;
            } else {
                adam.add_param(p)?;
            }
        }
        bop.set_backend(bop_backend);
        adam.set_backend(adam_backend);
        bop.set_threads(threads);
        adam.set_threads(threads);
        Ok(ManualRouter { bop, adam })
    }

    fn step(&mut self) -> caseopt::Result<()> {
        self.bop.step()?;
        self.adam.step()
    }
}

fn caseopt_adam(vs: &nn::VarStore, backend: Backend, threads: usize) -> caseopt::Result<Adam> {
    let mut adam = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() })?;
    for p in caseopt::trainable_vars(vs) {
        adam.add_param(p)?;
    }
    adam.set_backend(backend);
    adam.set_threads(threads);
    Ok(adam)
}

/// caseopt Lion (lr 1e-4, weight decay 1e-3: optax's defaults) on every variable.
fn caseopt_lion(vs: &nn::VarStore, backend: Backend, threads: usize) -> caseopt::Result<Lion> {
    let mut lion = Lion::new(LionConfig::default())?;
    for p in caseopt::trainable_vars(vs) {
        lion.add_param(p)?;
    }
    lion.set_backend(backend);
    lion.set_threads(threads);
    Ok(lion)
}

/// One optimizer step of an implementation built in this process.
type StepFn = Box<dyn FnMut() -> caseopt::Result<()>>;

/// Where an implementation runs.
enum Runner {
    /// In this process; the store its optimizer updates is kept alive beside it.
    Rust { step: StepFn, _store: nn::VarStore },
    /// In the set's `bench_torch.py --serve` process, under this name.
    Python(String),
}

/// One implementation of a set, built once, timed over every round.
struct Bench {
    imp: String,
    bytes: f64,
    runner: Runner,
    /// Every timed step, in ms.
    times: Vec<f64>,
    /// The median of each round's timed steps, in ms.
    round_ms: Vec<f64>,
    /// Timed steps per round ([`Args::steps_for`]), set after the warm-up.
    per_round: usize,
}

/// Bytes a Bop + Adam step moves (each variable at its own optimizer's rate), and an Adam step.
fn step_bytes(specs: &[Spec]) -> (f64, f64) {
    let (binary, total) = specs
        .iter()
        .fold((0.0, 0.0), |(b, t), s| (b + if s.binary { s.numel() } else { 0.0 }, t + s.numel()));
    (binary * BOP_BYTES + (total - binary) * ADAM_BYTES, total * ADAM_BYTES)
}

/// The implementations that run in this process, each on a store of its own.
fn rust_benches(specs: &[Spec], args: &Args) -> Result<Vec<Bench>, Box<dyn std::error::Error>> {
    let d = args.device;
    let (router_bytes, adam_bytes) = step_bytes(specs);
    let mut out = Vec::new();
    let mut add = |imp: &str, bytes: f64, store: nn::VarStore, step: StepFn| {
        out.push(Bench {
            imp: imp.into(),
            bytes,
            runner: Runner::Rust { step, _store: store },
            times: Vec::new(),
            round_ms: Vec::new(),
            per_round: 0,
        });
    };

    let name = "caseopt router";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut router = case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)?;
        add(name, router_bytes, vs, Box::new(move || router.step()));
    }
    // The router's step first checks every gradient for NaN and infinity (its default
    // `NonFinitePolicy::Error`); torch.optim does not. The same router without that check:
    let name = "caseopt router, NonFinitePolicy::Proceed";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut router = case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)?;
        router.set_non_finite_policy(NonFinitePolicy::Proceed);
        add(name, router_bytes, vs, Box::new(move || router.step()));
    }
    let name = "caseopt Adam";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::Auto, args.threads)?;
        add(name, adam_bytes, vs, Box::new(move || adam.step()));
    }
    let name = "caseopt Adam [ATen sqrt]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::Auto, args.threads)?;
        adam.set_sqrt(Sqrt::Aten);
        add(name, adam_bytes, vs, Box::new(move || adam.step()));
    }
    let name = "caseopt Bop + Adam [libtorch ops]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut router = ManualRouter::new(&vs, Backend::Torch, Backend::Torch, args.threads)?;
        add(name, router_bytes, vs, Box::new(move || router.step()));
    }
    // The PyTorch row pairs its torch-ops Bop with torch's fused Adam (one multi-tensor kernel
    // for all of Adam's variables); the row above pairs Bop with Adam on per-tensor libtorch ops.
    // Like with like: the same libtorch-ops Bop beside Adam on the multi-tensor backend, whose
    // CPU Adam is that same fused kernel (`_fused_adam_`).
    let name = "caseopt Bop [libtorch ops] + Adam [multi-tensor]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut router =
            ManualRouter::new(&vs, Backend::Torch, Backend::MultiTensor, args.threads)?;
        add(name, router_bytes, vs, Box::new(move || router.step()));
    }
    let name = "caseopt Adam [libtorch ops]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::Torch, args.threads)?;
        add(name, adam_bytes, vs, Box::new(move || adam.step()));
    }
    // The multi-tensor backend: torch.optim's own `fused=True` ops (what `Auto` takes for CUDA
    // variables), its non-finite check one read per step.
    let name = "caseopt router [multi-tensor]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut router = case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)?;
        router.rule0_mut().set_backend(Backend::MultiTensor);
        router.rule1_mut().set_backend(Backend::MultiTensor);
        add(name, router_bytes, vs, Box::new(move || router.step()));
    }
    let name = "caseopt Adam [multi-tensor]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::MultiTensor, args.threads)?;
        add(name, adam_bytes, vs, Box::new(move || adam.step()));
    }
    // Lion on every variable: one pass of sign(interpolation), 20 bytes per element as Bop.
    let lion_bytes = specs.iter().map(Spec::numel).sum::<f64>() * LION_BYTES;
    let name = "caseopt Lion";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut lion = caseopt_lion(&vs, Backend::Auto, args.threads)?;
        add(name, lion_bytes, vs, Box::new(move || lion.step()));
    }
    let name = "caseopt Lion [libtorch ops]";
    if args.wants(name) {
        let vs = make_store(specs, d, true);
        let mut lion = caseopt_lion(&vs, Backend::Torch, args.threads)?;
        add(name, lion_bytes, vs, Box::new(move || lion.step()));
    }
    let name = "tch nn::Adam (libtorch C++)";
    if args.wants(name) {
        let vs = make_store(specs, d, false);
        let mut opt = nn::Adam::default().build(&vs, 0.01)?;
        add(
            name,
            adam_bytes,
            vs,
            Box::new(move || {
                opt.step();
                Ok(())
            }),
        );
    }
    Ok(out)
}

/// A `scripts/bench_torch.py --serve` process: it builds the PyTorch implementations of one set
/// once and runs steps of them on request, one JSON line each way.
struct TorchServer {
    child: Child,
    /// Taken (closed) on drop: the script exits at the end of its stdin.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl TorchServer {
    /// Starts the process; it builds while this process builds its own rows (see `ready`).
    fn spawn(set: &str, args: &Args) -> Result<TorchServer, String> {
        // `cargo run` sets CARGO_MANIFEST_DIR at run time too; a binary run elsewhere (e.g.
        // bundled for another machine) finds the script through it, else where it was built.
        let root = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        let script = format!("{root}/scripts/bench_torch.py");
        let device = if args.device.is_cuda() { "cuda" } else { "cpu" };
        let mut child = Command::new(&args.python)
            .arg(&script)
            .args(["--serve", "--set", set, "--device", device])
            .args(["--threads", &args.threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run `{}`: {e}", args.python))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        match (stdin, stdout) {
            (Some(stdin), Some(stdout)) => Ok(TorchServer { child, stdin: Some(stdin), stdout }),
            _ => Err("no pipes to python".into()),
        }
    }

    /// The next line from the script, parsed; an `{"error": ...}` reply is an error.
    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| format!("reading python: {e}"))?;
        if n == 0 {
            let status = match self.child.wait() {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(format!("scripts/bench_torch.py exited ({status})"));
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("bad line from python `{}`: {e}", line.trim_end()))?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(format!("scripts/bench_torch.py: {e}")),
            None => Ok(v),
        }
    }

    /// Waits until the script has built its implementations; their names.
    fn ready(&mut self) -> Result<Vec<String>, String> {
        let v = self.read()?;
        let impls = v["impls"].as_array().ok_or(format!("expected the ready line, got {v}"))?;
        Ok(impls.iter().filter_map(|i| i.as_str().map(String::from)).collect())
    }

    /// Times `steps` steps of `imp` in the script; each step's time in ms.
    fn steps(&mut self, imp: &str, steps: usize) -> Result<Vec<f64>, String> {
        let stdin = self.stdin.as_mut().ok_or("python's stdin is closed")?;
        let request = serde_json::json!({"impl": imp, "steps": steps});
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to python: {e}"))?;
        let v = self.read()?;
        let times: Option<Vec<f64>> =
            v["times_ms"].as_array().map(|a| a.iter().filter_map(|t| t.as_f64()).collect());
        match times {
            Some(t) if t.len() == steps && v["impl"] == imp => Ok(t),
            _ => Err(format!("expected {steps} step times of `{imp}`, got {v}")),
        }
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        // Closing stdin ends the script's request loop; waiting frees its memory before the
        // next set is built.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// One measured row.
struct Row {
    set: String,
    imp: String,
    /// The instruction set it ran with.
    isa: String,
    ms: f64,
    min_ms: f64,
    bound_ms: f64,
    bytes: f64,
    /// Timed steps behind `ms`.
    steps: usize,
    /// The median of each round's steps, and the bound in that round (its bandwidth).
    round_ms: Vec<f64>,
    round_bound_ms: Vec<f64>,
}

/// Runs `steps` steps of `bench` and returns their times in ms, or `None` when it is a PyTorch
/// row and the script is gone (which drops every PyTorch row of the set, with a warning).
fn run_steps(
    set: &str,
    bench: &mut Bench,
    server: &mut Option<TorchServer>,
    device: Device,
    steps: usize,
) -> caseopt::Result<Option<Vec<f64>>> {
    match &mut bench.runner {
        Runner::Rust { step, .. } => {
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let t0 = Instant::now();
                step()?;
                sync(device);
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Some(times))
        }
        Runner::Python(name) => {
            let Some(s) = server.as_mut() else { return Ok(None) };
            match s.steps(name, steps) {
                Ok(times) => Ok(Some(times)),
                Err(e) => {
                    eprintln!("bench_step: dropping the PyTorch rows of {set}: {e}");
                    *server = None;
                    Ok(None)
                }
            }
        }
    }
}

/// Builds every implementation of a set, then times them in interleaved rounds with the
/// bandwidth probes (see the module docs). Everything built here is freed on return.
fn run_set(
    set: &str,
    specs: &[Spec],
    args: &Args,
    probe: &mut Probe,
    isas: &Isas,
) -> Result<(Vec<Row>, Bandwidth), Box<dyn std::error::Error>> {
    let d = args.device;
    // Started first: Python imports torch and builds its rows while the Rust rows are built.
    let mut server = if args.torch_rows {
        TorchServer::spawn(set, args)
            .map_err(|e| eprintln!("bench_step: skipping the PyTorch rows of {set}: {e}"))
            .ok()
    } else {
        None
    };
    let mut benches = rust_benches(specs, args)?;
    if let Some(s) = server.as_mut() {
        match s.ready() {
            Ok(impls) => {
                let (router_bytes, adam_bytes) = step_bytes(specs);
                for imp in impls {
                    let name = format!("PyTorch {imp}");
                    if args.wants(&name) {
                        let bytes = if imp.contains("Bop") { router_bytes } else { adam_bytes };
                        benches.push(Bench {
                            imp: name,
                            bytes,
                            runner: Runner::Python(imp),
                            times: Vec::new(),
                            round_ms: Vec::new(),
                            per_round: 0,
                        });
                    }
                }
            }
            Err(e) => {
                eprintln!("bench_step: skipping the PyTorch rows of {set}: {e}");
                server = None;
            }
        }
    }

    for b in &mut benches {
        let mut warm_ms = None;
        if args.warmup > 0 {
            settle();
            warm_ms = run_steps(set, b, &mut server, d, args.warmup)?.map(median);
        }
        b.per_round = args.steps_for(warm_ms);
    }
    let mut bandwidth = BandwidthSamples::default();
    for round in 0..args.rounds {
        settle();
        bandwidth.round(probe);
        let rows = benches.len();
        for k in 0..rows {
            // Every other round in reverse: each implementation of a pair is timed first (right
            // after the bandwidth passes) as often as the other.
            let b = &mut benches[if round % 2 == 0 { k } else { rows - 1 - k }];
            settle();
            let warm = args.block_warmup;
            if let Some(times) = run_steps(set, b, &mut server, d, warm + b.per_round)? {
                let timed: Vec<f64> = times.into_iter().skip(warm).collect();
                b.round_ms.push(median(timed.clone()));
                b.times.extend(timed);
            }
        }
    }
    // A script that died mid-run leaves rows timed in some rounds only: none are kept.
    if server.is_none() {
        benches.retain(|b| matches!(b.runner, Runner::Rust { .. }));
    }
    drop(server);

    let bw = bandwidth.summary(probe);
    let rows = benches
        .into_iter()
        .map(|b| Row {
            set: set.into(),
            bound_ms: b.bytes / bw.bytes_per_s * 1e3,
            ms: median(b.times.clone()),
            min_ms: min(&b.times),
            steps: b.times.len(),
            round_bound_ms: bw.per_round.iter().map(|bps| b.bytes / bps * 1e3).collect(),
            round_ms: b.round_ms,
            isa: isas.of(&b.imp),
            imp: b.imp,
            bytes: b.bytes,
        })
        .collect();
    Ok((rows, bw))
}

fn main() {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--aten-probe-server") {
        let threads = raw.next().and_then(|t| t.parse().ok()).unwrap_or(1);
        if let Err(e) = aten_probe_server(threads) {
            eprintln!("bench_step --aten-probe-server: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let isas = match cap_isa(&args) {
        Ok(isas) => isas,
        Err(msg) => {
            eprintln!("bench_step: {msg}");
            std::process::exit(2);
        }
    };
    tch::set_num_threads(args.threads as i32);
    let device = if args.device.is_cuda() { "cuda" } else { "cpu" };
    let mut probe = Probe::new(args.device, args.threads, args.isa.is_some());
    let k = args.steps_per_round();
    if !args.json {
        println!(
            "device {device}, {} threads; {} rounds per set, each: {BANDWIDTH_PASSES} passes of \
             each bandwidth probe, then for every implementation in turn (in reverse order every \
             other round) {} untimed and {k} timed steps (more, up to {}, for one whose {k} \
             steps take less than {} ms)",
            args.threads,
            args.rounds,
            args.block_warmup,
            args.max_steps_per_round(),
            args.min_block_ms
        );
        println!(
            "instruction sets: caseopt's kernels {} (this CPU: {}), ATen {}",
            isas.kernels,
            caseopt::__private::kernel_isas().join(", "),
            isas.aten
        );
        println!(
            "times: median of every timed step of an implementation (steps: how many) after {} \
             warm-up steps; bound: bytes moved / the highest bandwidth probe\n",
            args.warmup
        );
    }
    let mut all = Vec::new();
    for set in &args.sets {
        let specs = set_named(set).expect("sets are checked when parsed");
        let (rows, bw) = match run_set(set, &specs, &args, &mut probe, &isas) {
            Ok(out) => out,
            Err(e) => {
                eprintln!("bench_step: {set}: {e}");
                std::process::exit(1);
            }
        };
        print_rows(set, &rows, &bw, &args, device);
        all.extend(rows);
    }
    // The CPU targets (issues 5 and 22) on a CPU, issue 21's multi-tensor targets on a GPU.
    if !args.json {
        print_targets(&all, args.device.is_cuda());
    }
}

fn gbps(bytes_per_s: f64) -> f64 {
    bytes_per_s / 1e9
}

fn print_rows(set: &str, rows: &[Row], bw: &Bandwidth, args: &Args, device: &str) {
    if args.json {
        let ms = PROBE_BYTES / bw.bytes_per_s * 1e3;
        let probes: serde_json::Map<String, serde_json::Value> =
            bw.probes.iter().map(|(name, b)| (name.clone(), gbps(*b).into())).collect();
        println!(
            "{}",
            serde_json::json!({"set": "memory", "for_set": set,
                "impl": "bandwidth: a += b, 2 x 256 MiB f32", "ms": ms, "bound_ms": ms,
                "ratio": 1.0, "gbps": gbps(bw.bytes_per_s), "source": bw.source, "probes_gbps": probes,
                "gbps_round_min": gbps(bw.round_min),
                "gbps_round_max": gbps(bw.round_max), "passes": bw.passes,
                "rounds": args.rounds, "block_warmup": args.block_warmup, "device": device, "threads": args.threads})
        );
        for r in rows {
            println!(
                "{}",
                serde_json::json!({"set": r.set, "impl": r.imp, "isa": r.isa, "ms": r.ms, "min_ms": r.min_ms,
                    "bound_ms": r.bound_ms, "ratio": r.ms / r.bound_ms,
                    "gbps": r.bytes / (r.ms * 1e-3) / 1e9, "bytes": r.bytes, "device": device,
                    "threads": args.threads, "reps": r.steps, "rounds": args.rounds, "block_warmup": args.block_warmup, "min_block_ms": args.min_block_ms, "round_ms": r.round_ms, "round_bound_ms": r.round_bound_ms})
            );
        }
        return;
    }
    println!("{set}");
    let probes: Vec<String> =
        bw.probes.iter().map(|(name, b)| format!("{name} {:.1}", gbps(*b))).collect();
    println!(
        "  bandwidth (a += b, 2 x 256 MiB f32, median of {} passes each): {} GB/s; bound from {}; \
         its rounds ranged {:.1}..{:.1} GB/s",
        bw.passes,
        probes.join(", "),
        bw.source,
        gbps(bw.round_min),
        gbps(bw.round_max)
    );
    println!(
        "  {:<48} {:<12} {:>10} {:>10} {:>8} {:>8} {:>6}",
        "implementation", "isa", "ms", "bound ms", "x bound", "GB/s", "steps"
    );
    for r in rows {
        println!(
            "  {:<48} {:<12} {:>10.3} {:>10.3} {:>8.2} {:>8.1} {:>6}",
            r.imp,
            r.isa,
            r.ms,
            r.bound_ms,
            r.ms / r.bound_ms,
            r.bytes / (r.ms * 1e-3) / 1e9,
            r.steps
        );
    }
    println!();
}

/// The issue's targets, computed from this run's rows (where all the rows they need ran); each
/// ratio compares rows timed in the same rounds.
fn print_targets(rows: &[Row], cuda: bool) {
    let find = |set: &str, imp: &str| rows.iter().find(|r| r.set == set && r.imp == imp);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    // Each ratio twice: from the whole run's medians (the table's), and paired within each
    // round (both sides timed seconds apart, so the bandwidth's drift cancels), as the median
    // and range over the rounds. The verdict goes by the paired median.
    let paired = |a: &[f64], b: &[f64]| -> (f64, f64, f64) {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        (median(r.clone()), min(&r), max(&r))
    };
    let line = |what: &str, whole: f64, (m, lo, hi): (f64, f64, f64), ok: bool| {
        println!(
            "  {what:<52} {whole:>6.2}x  per round {m:.2}x ({lo:.2}..{hi:.2})  {}",
            verdict(ok)
        );
    };
    // A comparison printed beside the targets, with no verdict of its own.
    let info = |what: &str, whole: f64, (m, lo, hi): (f64, f64, f64)| {
        println!("  {what:<52} {whole:>6.2}x  per round {m:.2}x ({lo:.2}..{hi:.2})  (no target)");
    };
    println!("targets (ratio of the medians; per round: median and range of the paired ratios)");
    if cuda {
        // Issue 21's targets for the multi-tensor backend, set for a GPU.
        for (set, router_max) in [("binarynet", 1.5), ("many-small", 1.2)] {
            let Some(t) = find(set, "PyTorch torch.optim.Adam fused") else { continue };
            if let Some(r) = find(set, "caseopt router [multi-tensor]") {
                let p = paired(&r.round_ms, &t.round_ms);
                let what = format!("multi-tensor router <= {router_max}x torch fused Adam ({set})");
                line(&what, r.ms / t.ms, p, p.0 <= router_max);
            }
            if let Some(a) = find(set, "caseopt Adam [multi-tensor]") {
                let p = paired(&a.round_ms, &t.round_ms);
                let what = format!("multi-tensor Adam <= 1.05x torch fused Adam ({set})");
                line(&what, a.ms / t.ms, p, p.0 <= 1.05);
            }
        }
        return;
    }
    // The CPU targets (issues 5 and 22). The multi-tensor rows have none on a CPU: there they
    // only show what the generic path costs where the fused CPU kernels exist.
    for set in ["binarynet", "many-small"] {
        // Issue 22: the non-finite check (staged Bop) costs at most 15% over no check.
        if let (Some(r), Some(p)) =
            (find(set, "caseopt router"), find(set, "caseopt router, NonFinitePolicy::Proceed"))
        {
            let ratio = paired(&r.round_ms, &p.round_ms);
            let what = format!("router <= 1.15x router with Proceed ({set})");
            line(&what, r.ms / p.ms, ratio, ratio.0 <= 1.15);
        }
    }
    if let Some(r) = find("binarynet", "caseopt router") {
        let p = paired(&r.round_ms, &r.round_bound_ms);
        line("router on binarynet <= 1.1x bound", r.ms / r.bound_ms, p, p.0 <= 1.1);
    }
    if let Some(r) = find("many-small", "caseopt router") {
        let p = paired(&r.round_ms, &r.round_bound_ms);
        line("router on many-small <= 3x bound", r.ms / r.bound_ms, p, p.0 <= 3.0);
    }
    for set in ["binarynet", "many-small"] {
        if let (Some(a), Some(t)) =
            (find(set, "caseopt Adam"), find(set, "PyTorch torch.optim.Adam fused"))
        {
            let p = paired(&a.round_ms, &t.round_ms);
            let what = format!("caseopt Adam <= 1.0x torch fused Adam ({set})");
            line(&what, a.ms / t.ms, p, p.0 <= 1.0);
        }
        if let (Some(a), Some(t)) = (
            find(set, "caseopt Bop + Adam [libtorch ops]"),
            find(set, "PyTorch torch-ops Bop + fused Adam"),
        ) {
            // Not like with like (Adam on per-tensor ops against torch's fused kernel): the
            // target is the pairing below.
            let p = paired(&a.round_ms, &t.round_ms);
            let what = format!("Bop+Adam [libtorch ops] / torch Bop+fused Adam ({set})");
            info(&what, a.ms / t.ms, p);
        }
        // Like with like: both Bops on per-tensor ops, both Adams on torch's fused kernel.
        if let (Some(a), Some(t)) = (
            find(set, "caseopt Bop [libtorch ops] + Adam [multi-tensor]"),
            find(set, "PyTorch torch-ops Bop + fused Adam"),
        ) {
            let p = paired(&a.round_ms, &t.round_ms);
            let what = format!("Bop [libtorch ops] <= 1.0x torch-ops Bop ({set})");
            line(&what, a.ms / t.ms, p, p.0 <= 1.0);
        }
    }
    if let (Some(r), Some(t)) =
        (find("many-small", "caseopt router"), find("many-small", "PyTorch torch.optim.Adam fused"))
    {
        let p = paired(&t.round_ms, &r.round_ms);
        line("router >= 5x faster than torch fused Adam (many-small)", t.ms / r.ms, p, p.0 >= 5.0);
    }
}

#[cfg(test)]
mod tests {
    use super::Args;

    #[test]
    fn fast_implementations_get_enough_timed_steps_to_fill_a_block() {
        let args = Args { reps: 24, rounds: 8, min_block_ms: 8.0, ..Args::default() };
        assert_eq!(args.steps_per_round(), 3);
        // Slow steps keep the floor; a 0.65 ms step gets ceil(8 / 0.65) = 13.
        assert_eq!(args.steps_for(Some(40.0)), 3);
        assert_eq!(args.steps_for(Some(0.65)), 13);
        // Never more than 16 times the floor, and the floor without a warm-up time.
        assert_eq!(args.steps_for(Some(0.001)), 48);
        assert_eq!(args.steps_for(Some(0.0)), 3);
        assert_eq!(args.steps_for(Some(f64::NAN)), 3);
        assert_eq!(args.steps_for(None), 3);
        // --min-block-ms 0 times the floor only.
        let off = Args { min_block_ms: 0.0, ..args };
        assert_eq!(off.steps_for(Some(0.65)), 3);
    }
}
