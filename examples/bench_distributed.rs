//! What data-parallel training adds to a step: the gradient all-reduce (and, with ZeRO-1, the
//! broadcast of the updated variables) next to the router step itself, on docs/design.md's
//! benchmark sets, with `--world-size` local ranks over Gloo on loopback.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example bench_distributed -- [--set binarynet|many-small]
//!     [--world-size 2] [--steps 20] [--threads 1]
//! ```
//!
//! The command starts the ranks itself (child processes of the same binary) and rank 0 prints,
//! per set, the median over `--steps` timed steps (after 3 untimed ones) of: the all-reduce
//! alone (`DataParallel::average_gradients`), the router step alone
//! (`binary => Bop<threshold: 1e-8, gamma: 1e-4>, _ => Adam<lr: 0.01>`), and the whole
//! data-parallel step unsharded and with ZeRO-1, each rank on `--threads` threads.
//! On one machine the ranks share its cores and memory bandwidth, so the figures show the
//! collective's cost, not scaling; docs/distributed.md has the model for real links.

use std::process::Command;
use std::time::Instant;

use caseopt::case_optimizer;
use caseopt::distributed::{DataParallel, Rendezvous};
use tch::Device;

#[path = "bench_step/sets.rs"]
mod sets;

const USAGE: &str = "usage: bench_distributed [--set binarynet|many-small] [--world-size N] \
                     [--steps N] [--threads N]";

struct Args {
    set: String,
    world: usize,
    steps: usize,
    threads: i32,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { set: "binarynet".into(), world: 2, steps: 20, threads: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--set" => args.set = value()?,
            "--world-size" => {
                args.world = value()?.parse().map_err(|e| format!("--world-size: {e}"))?
            }
            "--steps" => args.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if sets::set_named(&args.set).is_none() {
        return Err(format!("unknown set {}\n{USAGE}", args.set));
    }
    if args.world == 0 || args.steps == 0 {
        return Err(format!("--world-size and --steps must be positive\n{USAGE}"));
    }
    Ok(args)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `f` `steps` times after 3 untimed calls; milliseconds, median.
fn time(steps: usize, mut f: impl FnMut() -> caseopt::Result<()>) -> caseopt::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut samples = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(samples))
}

fn rank_main(args: &Args, rank: usize, port: u16) -> caseopt::Result<()> {
    tch::set_num_threads(args.threads);
    let specs = sets::set_named(&args.set).unwrap_or_default();
    let vs = sets::make_store(&specs, Device::Cpu, true);
    let group = Rendezvous::new("127.0.0.1", port, rank, args.world)?.connect()?;
    let build = || {
        case_optimizer! {
            binary => Bop<threshold: 1e-8, gamma: 1e-4>,
            _ => Adam<lr: 0.01>,
        }
        .build(&vs)
    };
    let mut dp = DataParallel::new(group, &vs)?;
    let (collectives, bytes) = dp.traffic();
    let reduce = time(args.steps, || dp.average_gradients())?;
    let mut opt = build()?;
    let step = time(args.steps, || opt.step())?;
    let whole = time(args.steps, || dp.step(&mut opt))?;
    // A variable belongs to one router at a time: the sharded run gets a fresh one.
    drop(opt);
    let mut dp = dp.shard_optimizer_state()?;
    let mut opt = build()?;
    let zero = time(args.steps, || dp.step(&mut opt))?;
    let state = DataParallel::optimizer_state_bytes(&opt);
    if rank == 0 {
        let params: f64 = specs.iter().map(|s| s.numel()).sum();
        println!(
            "{} ({:.1} M parameters, {} ranks, {} thread(s) each): {collectives} collectives, \
             {:.1} MB per rank per step",
            args.set,
            params / 1e6,
            args.world,
            args.threads,
            bytes as f64 / 1e6
        );
        println!("  all-reduce of the gradients   {reduce:8.2} ms");
        println!("  router step alone              {step:8.2} ms");
        println!("  data-parallel step             {whole:8.2} ms");
        println!(
            "  data-parallel step, ZeRO-1     {zero:8.2} ms  (rank 0 holds {:.1} MB of optimizer state)",
            state as f64 / 1e6
        );
    }
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let (Ok(rank), Ok(port)) =
        (std::env::var("CASEOPT_BENCH_RANK"), std::env::var("CASEOPT_BENCH_PORT"))
    {
        let (Ok(rank), Ok(port)) = (rank.parse(), port.parse()) else {
            eprintln!("bad CASEOPT_BENCH_RANK / CASEOPT_BENCH_PORT");
            std::process::exit(2);
        };
        if let Err(e) = rank_main(&args, rank, port) {
            eprintln!("rank {rank}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29500);
    let exe = std::env::current_exe().expect("this program's path");
    let children: Vec<_> = (0..args.world)
        .map(|rank| {
            Command::new(&exe)
                .args(std::env::args().skip(1))
                .env("CASEOPT_BENCH_RANK", rank.to_string())
                .env("CASEOPT_BENCH_PORT", port.to_string())
                .spawn()
        })
        .collect();
    let mut ok = true;
    for child in children {
        ok &= child.and_then(|mut c| c.wait()).is_ok_and(|s| s.success());
    }
    if !ok {
        std::process::exit(1);
    }
}
