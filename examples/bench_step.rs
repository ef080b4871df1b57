//! Times one optimizer step on design.md's benchmark parameter sets, every implementation side
//! by side, against the memory-bandwidth bound measured in the same run.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example bench_step -- [--set binarynet|many-small|all]
//!     [--json] [--device cpu|cuda] [--threads 2] [--reps 20] [--warmup 5] [--no-torch]
//!     [--python PYTHON]
//! ```
//!
//! Rows, per set: the caseopt router (`binary => Bop<threshold: 1e-8, gamma: 1e-4>,
//! _ => Adam<lr: 0.01>`) and caseopt Adam on every variable, each on its default backend
//! (fused kernels on CPU) and forced onto libtorch ops; tch's `nn::Adam` (libtorch's C++
//! optimizer); and, through the provisioned Python (`scripts/bench_torch.py`),
//! torch.optim.Adam (foreach and fused) and a torch-ops Bop plus fused Adam. Each time is the
//! median of `--reps` steps after `--warmup` steps, with libtorch and the kernels on
//! `--threads` threads.
//!
//! The bound is bytes moved / streaming bandwidth: bandwidth from `a += b` over two 256 MiB
//! `f32` buffers on `--threads` threads (3 transfers of 4 bytes per element, median of 15
//! passes), bytes per element 28 for Adam (p, m, v read and written, g read) and 20 for Bop
//! (w, m read and written, g read).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use caseopt::{
    case_optimizer, Adam, AdamConfig, Backend, Bop, BopConfig, NonFinitePolicy, Optimizer, PathExt,
    Router,
};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

/// Bytes per element and step: Adam reads and writes p, m, v and reads g.
const ADAM_BYTES: f64 = 28.0;
/// Bop reads and writes w, m and reads g.
const BOP_BYTES: f64 = 20.0;

/// One variable of a benchmark set: name, shape, and whether it is binary.
struct Spec {
    name: String,
    shape: Vec<i64>,
    binary: bool,
}

impl Spec {
    fn numel(&self) -> f64 {
        self.shape.iter().product::<i64>() as f64
    }
}

/// design.md's BinaryNet for CIFAR-10: 18 tensors, 14,025,866 parameters, 14,008,320 binary.
fn binarynet() -> Vec<Spec> {
    let mut out = Vec::new();
    let convs = [(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)];
    for (i, (cin, cout)) in convs.into_iter().enumerate() {
        out.push(Spec {
            name: format!("conv{i}.weight"),
            shape: vec![cout, cin, 3, 3],
            binary: i > 0,
        });
        out.push(Spec { name: format!("bn_conv{i}.beta"), shape: vec![cout], binary: false });
    }
    for (i, (fin, fout)) in [(8192, 1024), (1024, 1024), (1024, 10)].into_iter().enumerate() {
        out.push(Spec { name: format!("dense{i}.weight"), shape: vec![fout, fin], binary: i < 2 });
        out.push(Spec { name: format!("bn_dense{i}.beta"), shape: vec![fout], binary: false });
    }
    out
}

/// design.md's many-small: 2000 tensors of 256, binary when the index is even.
fn many_small() -> Vec<Spec> {
    (0..2000)
        .map(|i| Spec { name: format!("p{i}"), shape: vec![256], binary: i % 2 == 0 })
        .collect()
}

fn set_named(name: &str) -> Option<Vec<Spec>> {
    match name {
        "binarynet" => Some(binarynet()),
        "many-small" => Some(many_small()),
        _ => None,
    }
}

struct Args {
    sets: Vec<String>,
    json: bool,
    device: Device,
    threads: usize,
    reps: usize,
    warmup: usize,
    torch_rows: bool,
    python: String,
    /// Only the rows whose name contains this.
    only: Option<String>,
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
}

const USAGE: &str = "usage: bench_step [--set binarynet|many-small|all] [--json] \
[--device cpu|cuda] [--threads N] [--reps N] [--warmup N] [--no-torch] [--python PYTHON] [--only SUBSTRING]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sets: vec!["binarynet".into(), "many-small".into()],
        json: false,
        device: Device::Cpu,
        threads: 2,
        reps: 20,
        warmup: 5,
        torch_rows: true,
        python: "python".into(),
        only: None,
    };
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
            "--warmup" => args.warmup = number(value("--warmup")?, "--warmup")?,
            "--no-torch" => args.torch_rows = false,
            "--python" => args.python = value("--python")?,
            "--only" => args.only = Some(value("--only")?),
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
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median and minimum of `reps` timed calls after `warmup` untimed ones, in ms.
fn time_it(device: Device, warmup: usize, reps: usize, mut step: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        step();
    }
    sync(device);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        step();
        sync(device);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    (median(times), min)
}

/// Streaming bandwidth in bytes/s: `a += b` over two 256 MiB f32 buffers, 3 transfers per
/// element, median of 15 passes after 2 warm-up passes.
fn bandwidth(device: Device, threads: usize) -> f64 {
    const N: usize = 256 * 1024 * 1024 / 4;
    let bytes = 3.0 * 4.0 * N as f64;
    let (ms, _) = if device.is_cuda() {
        let mut a = Tensor::ones([N as i64], (Kind::Float, device));
        let b = Tensor::ones([N as i64], (Kind::Float, device));
        time_it(device, 2, 15, || {
            let _ = a.g_add_(&b);
        })
    } else {
        let mut a = vec![1.0f32; N];
        let b = vec![1e-9f32; N];
        let chunk = N.div_ceil(threads);
        time_it(device, 2, 15, || {
            std::thread::scope(|s| {
                for (a, b) in a.chunks_mut(chunk).zip(b.chunks(chunk)) {
                    s.spawn(move || {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += *y;
                        }
                    });
                }
            });
        })
    };
    bytes / (ms * 1e-3)
}

/// Parameters of one set in a fresh VarStore, binary ones set to +-1 (and declared 1-bit when
/// `mark_binary`), with N(0, 1) * 1e-3 gradients in `.grad()` (through one backward pass of
/// `sum(p * g)`).
///
/// tch's own optimizers must get an unmarked store: caseopt keeps the bit count in tch's
/// per-variable group number, and libtorch's optimizer creates one parameter group per group
/// number up to the largest (about 1.7e9 of them for a marked variable).
fn make_store(specs: &[Spec], device: Device, mark_binary: bool) -> nn::VarStore {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    for s in specs {
        // tch names "conv0.weight" as the variable "weight" under the path "conv0".
        let (path, leaf) = match s.name.rsplit_once('.') {
            Some((prefix, leaf)) => (&root / prefix, leaf),
            None => (root.clone(), s.name.as_str()),
        };
        let path = if s.binary && mark_binary { path.binary() } else { path };
        let init = Tensor::randn(s.shape.as_slice(), (Kind::Float, device));
        // +-1 (`sign` would leave an exact 0, which the router reports as non-binary).
        let init =
            if s.binary { init.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0 } else { init * 0.1 };
        let p = path.var_copy(leaf, &init);
        let g = Tensor::randn(s.shape.as_slice(), (Kind::Float, device)) * 1e-3;
        loss += (&p * &g).sum(Kind::Float);
    }
    loss.backward();
    vs
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
    fn new(vs: &nn::VarStore, backend: Backend, threads: usize) -> caseopt::Result<Self> {
        let mut bop = Bop::new(BopConfig { threshold: 1e-8.into(), gamma: 1e-4.into() })?;
        let mut adam = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() })?;
        for p in caseopt::trainable_vars(vs) {
            if p.info.is_binary() {
                bop.add_param(p)?;
            } else {
                adam.add_param(p)?;
            }
        }
        bop.set_backend(backend);
        adam.set_backend(backend);
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

/// One measured row.
struct Row {
    set: String,
    imp: String,
    ms: f64,
    min_ms: f64,
    bytes: f64,
}

/// The rows timed in this process.
fn rust_rows(
    set: &str,
    specs: &[Spec],
    args: &Args,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let d = args.device;
    let (binary, total) = specs
        .iter()
        .fold((0.0, 0.0), |(b, t), s| (b + if s.binary { s.numel() } else { 0.0 }, t + s.numel()));
    let router_bytes = binary * BOP_BYTES + (total - binary) * ADAM_BYTES;
    let adam_bytes = total * ADAM_BYTES;
    let mut rows = Vec::new();
    let wanted = |imp: &str| args.wants(imp);
    let mut row = |imp: &str, bytes: f64, (ms, min_ms): (f64, f64)| {
        rows.push(Row { set: set.into(), imp: imp.into(), ms, min_ms, bytes });
    };
    let (w, r) = (args.warmup, args.reps);
    let mut failed: Option<caseopt::Error> = None;
    let mut check = |res: caseopt::Result<()>| {
        if let Err(e) = res {
            failed.get_or_insert(e);
        }
    };

    let name = "caseopt router";
    if wanted(name) {
        let vs = make_store(specs, d, true);
        let mut router = case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)?;
        row(name, router_bytes, time_it(d, w, r, || check(router.step())));
    }
    // The router's step first checks every gradient for NaN and infinity (its default
    // `NonFinitePolicy::Error`); torch.optim does not. The same router without that check:
    let name = "caseopt router, NonFinitePolicy::Proceed";
    if wanted(name) {
        let vs = make_store(specs, d, true);
        let mut router = case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)?;
        router.set_non_finite_policy(NonFinitePolicy::Proceed);
        row(name, router_bytes, time_it(d, w, r, || check(router.step())));
    }
    let name = "caseopt Adam";
    if wanted(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::Auto, args.threads)?;
        row(name, adam_bytes, time_it(d, w, r, || check(adam.step())));
    }
    let name = "caseopt Bop + Adam [libtorch ops]";
    if wanted(name) {
        let vs = make_store(specs, d, true);
        let mut router = ManualRouter::new(&vs, Backend::Torch, args.threads)?;
        row(name, router_bytes, time_it(d, w, r, || check(router.step())));
    }
    let name = "caseopt Adam [libtorch ops]";
    if wanted(name) {
        let vs = make_store(specs, d, true);
        let mut adam = caseopt_adam(&vs, Backend::Torch, args.threads)?;
        row(name, adam_bytes, time_it(d, w, r, || check(adam.step())));
    }
    let name = "tch nn::Adam (libtorch C++)";
    if wanted(name) {
        let vs = make_store(specs, d, false);
        let mut opt = nn::Adam::default().build(&vs, 0.01)?;
        row(name, adam_bytes, time_it(d, w, r, || opt.step()));
    }

    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(rows)
}

/// The PyTorch rows, from scripts/bench_torch.py run with `args.python`.
fn torch_rows(set: &str, specs: &[Spec], args: &Args) -> Result<Vec<Row>, String> {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time too; a binary run elsewhere (e.g. bundled
    // for another machine) finds the script through it, else where it was built.
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let script = format!("{root}/scripts/bench_torch.py");
    let device = if args.device.is_cuda() { "cuda" } else { "cpu" };
    let out = Command::new(&args.python)
        .arg(&script)
        .args(["--set", set, "--device", device])
        .args(["--threads", &args.threads.to_string()])
        .args(["--reps", &args.reps.to_string(), "--warmup", &args.warmup.to_string()])
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", args.python))?;
    let (binary, total) = specs
        .iter()
        .fold((0.0, 0.0), |(b, t), s| (b + if s.binary { s.numel() } else { 0.0 }, t + s.numel()));
    let mut rows = Vec::new();
    let mut child = out;
    let stdout = child.stdout.take().ok_or("no stdout from python")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("bad line from python `{line}`: {e}"))?;
        let imp = v["impl"].as_str().unwrap_or("?").to_string();
        let bytes = if imp.contains("Bop") {
            binary * BOP_BYTES + (total - binary) * ADAM_BYTES
        } else {
            total * ADAM_BYTES
        };
        let imp = format!("PyTorch {imp}");
        if !args.wants(&imp) {
            continue;
        }
        rows.push(Row {
            set: set.into(),
            imp,
            ms: v["ms"].as_f64().unwrap_or(f64::NAN),
            min_ms: v["min_ms"].as_f64().unwrap_or(f64::NAN),
            bytes,
        });
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("{} scripts/bench_torch.py exited with {status}", args.python));
    }
    Ok(rows)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    tch::set_num_threads(args.threads as i32);
    let bw = bandwidth(args.device, args.threads);
    let device = if args.device.is_cuda() { "cuda" } else { "cpu" };
    if args.json {
        let probe = 3.0 * 4.0 * (256.0 * 1024.0 * 1024.0 / 4.0);
        let ms = probe / bw * 1e3;
        println!(
            "{}",
            serde_json::json!({"set": "memory", "impl": "bandwidth: a += b, 2 x 256 MiB f32",
                "ms": ms, "bound_ms": ms, "ratio": 1.0, "gbps": bw / 1e9, "device": device,
                "threads": args.threads})
        );
    } else {
        println!(
            "device {device}, {} threads; streaming bandwidth (a += b, 2 x 256 MiB f32, median of 15): {:.1} GB/s",
            args.threads,
            bw / 1e9
        );
        println!("times: median of {} steps after {} warm-up steps\n", args.reps, args.warmup);
    }
    let mut all = Vec::new();
    for set in &args.sets {
        let specs = set_named(set).expect("sets are checked when parsed");
        let mut rows = match rust_rows(set, &specs, &args) {
            Ok(rows) => rows,
            Err(e) => {
                eprintln!("bench_step: {set}: {e}");
                std::process::exit(1);
            }
        };
        if args.torch_rows {
            match torch_rows(set, &specs, &args) {
                Ok(more) => rows.extend(more),
                Err(e) => eprintln!("bench_step: skipping the PyTorch rows of {set}: {e}"),
            }
        }
        print_rows(set, &rows, bw, &args, device);
        all.extend(rows);
    }
    // The issue's targets are for the CPU.
    if !args.json && !args.device.is_cuda() {
        print_targets(&all, bw);
    }
}

fn print_rows(set: &str, rows: &[Row], bw: f64, args: &Args, device: &str) {
    if args.json {
        for r in rows {
            let bound_ms = r.bytes / bw * 1e3;
            println!(
                "{}",
                serde_json::json!({"set": r.set, "impl": r.imp, "ms": r.ms, "min_ms": r.min_ms,
                    "bound_ms": bound_ms, "ratio": r.ms / bound_ms, "gbps": r.bytes / (r.ms * 1e-3) / 1e9,
                    "bytes": r.bytes, "device": device, "threads": args.threads, "reps": args.reps})
            );
        }
        return;
    }
    println!("{set}");
    println!(
        "  {:<40} {:>10} {:>10} {:>8} {:>8}",
        "implementation", "ms", "bound ms", "x bound", "GB/s"
    );
    for r in rows {
        let bound_ms = r.bytes / bw * 1e3;
        println!(
            "  {:<40} {:>10.3} {:>10.3} {:>8.2} {:>8.1}",
            r.imp,
            r.ms,
            bound_ms,
            r.ms / bound_ms,
            r.bytes / (r.ms * 1e-3) / 1e9
        );
    }
    println!();
}

/// The issue's targets, computed from this run's rows (where all the rows they need ran).
fn print_targets(rows: &[Row], bw: f64) {
    let find = |set: &str, imp: &str| rows.iter().find(|r| r.set == set && r.imp == imp);
    let ratio = |r: &Row| r.ms / (r.bytes / bw * 1e3);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("targets");
    if let Some(r) = find("binarynet", "caseopt router") {
        let x = ratio(r);
        println!(
            "  router on binarynet <= 1.3x bound:                 {x:.2}x  {}",
            verdict(x <= 1.3)
        );
    }
    if let (Some(a), Some(t)) =
        (find("binarynet", "caseopt Adam"), find("binarynet", "PyTorch torch.optim.Adam fused"))
    {
        let x = a.ms / t.ms;
        println!(
            "  caseopt Adam <= 1.05x torch fused Adam (binarynet): {x:.2}x  {}",
            verdict(x <= 1.05)
        );
    }
    if let Some(r) = find("many-small", "caseopt router") {
        let x = ratio(r);
        println!(
            "  router on many-small <= 5x bound:                  {x:.2}x  {}",
            verdict(x <= 5.0)
        );
        if let Some(t) = find("many-small", "PyTorch torch.optim.Adam fused") {
            let s = t.ms / r.ms;
            println!(
                "  router >= 5x faster than torch fused Adam (many-small): {s:.1}x  {}",
                verdict(s >= 5.0)
            );
        }
    }
}
