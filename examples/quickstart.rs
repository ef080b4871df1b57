//! Quickstart: learn a binary teacher with Bop (its 1-bit kernel) and Adam (everything else).
//!
//! ```sh
//! scripts/env.sh cargo run --release --example quickstart
//! ```
//!
//! The data are labelled by a hidden +-1 weight vector; the student is a 1-bit kernel (routed to
//! Bop) with a full-precision scale and bias (routed to Adam). The loss falls as Bop flips the
//! kernel's signs towards the teacher's.

use caseopt::{Adam, AdamConfig, Bop, BopConfig, Optimizer, PathExt};
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
    let kernel = root.binary().var("kernel", &[d, 1], nn::Init::Uniform { lo: -1.0, up: 1.0 });
    let scale = root.var("scale", &[1], nn::Init::Const(0.1));
    let bias = root.var("bias", &[1], nn::Init::Const(0.0));

    // Route by hand: binary variables to Bop, the rest to Adam.
    let mut bop = Bop::new(BopConfig { threshold: 1e-6.into(), gamma: 1e-3.into() })?;
    let mut adam = Adam::new(AdamConfig { lr: 0.02.into(), ..Default::default() })?;
    for p in caseopt::trainable_vars(&vs) {
        println!(
            "{:<8} {:>3} bit(s) -> {}",
            p.info.name,
            p.info.bits,
            if p.info.is_binary() { "Bop" } else { "Adam" }
        );
        if p.info.is_binary() {
            bop.add_param(p)?
        } else {
            adam.add_param(p)?
        }
    }

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
            bop.zero_grad();
            adam.zero_grad();
            loss.backward();
            bop.step()?;
            adam.step()?;
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
