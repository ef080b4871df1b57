// The item form: a nameable router type in a struct field, with named rules and the
// builders `builder()`, `build(&vs)` and `build_from(vars)`.
use caseopt::{case_optimizer, Optimizer, Param, VarInfo};
use tch::{Device, Kind, Tensor};

case_optimizer! {
    /// Binary kernels with Bop, everything else with Adam.
    pub struct BnnOptimizer {
        binary => Bop<threshold: 1e-8, gamma: 1e-4> as bop,
        _ => Adam<lr: 1e-3> as adam,
    }
}

pub struct Trainer {
    pub optimizer: BnnOptimizer,
}

fn main() -> caseopt::Result<()> {
    let w = Tensor::ones([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let vars = vec![
        Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()),
        Param::new(VarInfo::of("b", &b), b.shallow_clone()),
    ];
    let mut trainer = Trainer { optimizer: BnnOptimizer::builder().build_from(vars)? };
    trainer.optimizer.bop_mut().set_hyperparameter("gamma", 1e-3.into())?;
    trainer.optimizer.adam_mut().set_hyperparameter("lr", 1e-2.into())?;
    assert_eq!(trainer.optimizer.rule0().params().len(), 1);
    Ok(())
}
