// User predicates (a path and a closure), every atom, values that are expressions, schedules
// and integers, and a user optimizer named by path.
use caseopt::{case_optimizer, Optimizer, Param, Schedule, VarInfo};
use tch::{Device, Kind, Tensor};

mod rules {
    pub fn is_embedding(v: &caseopt::VarInfo) -> bool {
        v.name.starts_with("emb")
    }
}

mod opt {
    /// SGD under another name: a user type is anything that implements the runtime's traits.
    pub type PlainSgd = caseopt::Sgd;
}

fn main() -> caseopt::Result<()> {
    let scale = 2.0;
    let vars: Vec<Param> = [("emb", 32u8, Kind::Float), ("k", 4, Kind::Float), ("h", 32, Kind::Half), ("c.w", 1, Kind::Float), ("x", 32, Kind::Float)]
        .iter()
        .map(|(name, bits, kind)| {
            let t = Tensor::zeros([2, 2], (*kind, Device::Cpu));
            Param::new(VarInfo::of(*name, &t).with_bits(*bits), t)
        })
        .collect();
    let opt = case_optimizer! {
        where(rules::is_embedding) => Adagrad<lr: (0.1 * scale), initial_accumulator_value: 0>,
        bits(4) & ndim(2) => opt::PlainSgd<lr: 1.0, momentum: 0.9, nesterov: true>,
        dtype(f16) | dtype(bf16) => RmsProp<lr: { Schedule::cosine(0.01, 100) }, centered: true, master_weights: true>,
        binary & name("c.*") & !where(|v: &VarInfo| v.numel() > 100) => Bop2ndOrder<sigma: 1e-3>,
        _ => AdamW<lr: (Schedule::step(1e-3, 0.5, 10)), weight_decay: 0>,
    }
    .build_from(vars)?;
    assert_eq!(opt.rules()[1].optimizer, "opt::PlainSgd");
    assert_eq!(opt.rule2().hyperparameter("lr")?, 0.01);
    assert_eq!(opt.rule0().hyperparameter("lr")?, 0.2);
    Ok(())
}
