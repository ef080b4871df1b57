//! Quickstart: learn a binary teacher with Bop (its 1-bit kernel) and Adam (everything else),
//! routed by `case_optimizer!`.
//!
//! ```sh
//! scripts/env.sh cargo run --release --example quickstart
//! ```
//!
//! The data are labelled by a hidden +-1 weight vector; the student is a 1-bit kernel (routed to
//! Bop) with a full-precision scale and bias (routed to Adam). The loss falls as Bop flips the
//! kernel's signs towards the teacher's.

use caseopt::{case_optimizer, PathExt};
use tch::{nn, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::manual_seed(0);
    tch::set_num_threads(2);
    let (n, d) = (2048, 256);
    let teacher = Tensor::randn([d, 1], (Kind::Float, Device::Cpu)).sign();
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let y = x.matmul(&teacher).gt(0.0).to_kind(Kind::Float);

    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    // A 1-bit kernel starts at random signs (Bop would binarise anything else, with a warning).
    let signs =
        Tensor::randn([d, 1], (Kind::Float, Device::Cpu)).ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    let kernel = root.binary().var_copy("kernel", &signs);
    let scale = root.var("scale", &[1], nn::Init::Const(0.1));
    let bias = root.var("bias", &[1], nn::Init::Const(0.0));

    // Binary variables to Bop, the rest to Adam: one statically dispatched router.
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-3>,
        _      => Adam<lr: 0.02>,
    }
    .build(&vs)?;
    print!("{}", opt.routing_table());

    for epoch in 1..=10 {
        let mut total = 0.0;
        for batch in 0..(n / 256) {
            let xb = x.narrow(0, batch * 256, 256);
            let yb = y.narrow(0, batch * 256, 256);
            let logits = xb.matmul(&kernel) * &scale + &bias;
            let loss = logits.binary_cross_entropy_with_logits::<Tensor>(
                &yb,
                None,
                None,
                tch::Reduction::Mean,
            );
            opt.backward_step(&loss)?;
            total += loss.double_value(&[]);
        }
        let agree = kernel.eq_tensor(&teacher).to_kind(Kind::Float).mean(Kind::Float);
        println!(
            "epoch {epoch:>2}  loss {:.4}  kernel signs matching the teacher {:.1}%",
            total / (n / 256) as f64,
            100.0 * agree.double_value(&[])
        );
    }
    Ok(())
}
