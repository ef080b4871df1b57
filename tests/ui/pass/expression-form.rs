// The design's example: a BNN router built from a VarStore, trained one step.
use caseopt::{case_optimizer, PathExt};
use tch::{nn, Device, Kind, Tensor};

fn main() -> Result<(), caseopt::Error> {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = (&root / "fc").binary().var("weight", &[4, 8], nn::Init::Const(1.0));
    let b = (&root / "fc").var("bias", &[4], nn::Init::Const(0.0));
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-3>,
        _ => Adam<lr: 0.01>,
    }
    .build(&vs)?;
    let x = Tensor::ones([2, 8], (Kind::Float, Device::Cpu));
    let loss = (x.matmul(&w.tr()) + &b).sum(Kind::Float);
    opt.backward_step(&loss)?;
    assert_eq!(opt.step_counts(), vec![1, 1]);
    print!("{}", opt.routing_table());

    // Muon for the real-valued matrices, AdamW for the rest: the rule implies `ndim(2)`.
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = (&root / "fc").var("weight", &[4, 8], nn::Init::Const(0.5));
    let b = (&root / "fc").var("bias", &[4], nn::Init::Const(0.0));
    let mut opt = case_optimizer! {
        ndim(2) & !binary => Muon<
            lr: 0.02,
            ns_steps: 5,
            adjust_lr_fn: caseopt::MuonAdjustLr::MatchRmsAdamW,
        >,
        _ => AdamW<lr: 0.01>,
    }
    .build(&vs)?;
    let loss = (x.matmul(&w.tr()) + &b).sum(Kind::Float);
    opt.backward_step(&loss)?;
    assert_eq!(opt.step_counts(), vec![1, 1]);
    Ok(())
}
