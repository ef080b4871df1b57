//! Behaviour of the optimizer runtime beyond parity: schedules at the optimizer's own step count,
//! hyperparameters while training, skipped gradients, state round trips, reduced precision,
//! variable metadata from a VarStore.

// The tests of the fused path itself are `cfg(feature = "fused")`; without it their helpers
// are unused.
#![cfg_attr(not(feature = "fused"), allow(dead_code, unused_imports))]

use caseopt::{
    var_infos, Adam, AdamConfig, Bop, BopConfig, Error, Execution, Optimizer, Param, PathExt,
    Schedule, Sgd, SgdConfig, VarInfo,
};
use tch::{nn, Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap()
}

#[test]
fn schedules_are_evaluated_at_the_step_count_starting_at_zero() {
    let w = Tensor::from_slice(&[0.0f64]);
    let lr = Schedule::piecewise(vec![1, 2], vec![1.0, 10.0, 100.0]);
    let mut sgd = Sgd::new(SgdConfig { lr, ..Default::default() }).unwrap();
    sgd.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(sgd.hyperparameter("lr").unwrap());
        sgd.step_with_grads(&[Some(Tensor::from_slice(&[-1.0f64]))]).unwrap();
    }
    assert_eq!(seen, vec![1.0, 10.0, 100.0]);
    assert_eq!(values(&w), vec![111.0]);
}

#[test]
fn learning_rate_changes_mid_training() {
    let w = Tensor::from_slice(&[0.0f64]);
    let mut sgd = Sgd::new(SgdConfig { lr: 1.0.into(), ..Default::default() }).unwrap();
    sgd.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    sgd.step_with_grads(&[Some(Tensor::from_slice(&[-1.0f64]))]).unwrap();
    sgd.set_hyperparameter("lr", 0.5.into()).unwrap();
    sgd.step_with_grads(&[Some(Tensor::from_slice(&[-1.0f64]))]).unwrap();
    assert_eq!(values(&w), vec![1.5]);
    assert!(sgd.hyperparameter_names().contains(&"momentum"));
}

#[test]
fn variables_without_gradient_keep_value_and_state() {
    let a = Tensor::from_slice(&[1.0f64]);
    let b = Tensor::from_slice(&[1.0f64]);
    let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() }).unwrap();
    adam.add_param(Param::new(VarInfo::of("a", &a), a.shallow_clone())).unwrap();
    adam.add_param(Param::new(VarInfo::of("b", &b), b.shallow_clone())).unwrap();
    adam.step_with_grads(&[Some(Tensor::from_slice(&[1.0f64])), None]).unwrap();
    assert_eq!(values(&b), vec![1.0]);
    assert!(adam.state(1).is_empty());
    let st: Vec<&str> = adam.state(0).iter().map(|(n, _)| *n).collect();
    assert_eq!(st, vec!["step", "exp_avg", "exp_avg_sq"]);
}

#[test]
fn step_uses_each_variables_own_grad() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
    let frozen = vs.root().var("frozen", &[1], nn::Init::Const(1.0));
    let mut sgd = Sgd::new(SgdConfig { lr: 0.5.into(), ..Default::default() }).unwrap();
    for p in caseopt::trainable_vars(&vs) {
        sgd.add_param(p).unwrap();
    }
    (&w * Tensor::from_slice(&[1.0f32, 2.0, 3.0])).sum(Kind::Float).backward();
    sgd.step().unwrap(); // `frozen` has no gradient: skipped, as torch does
    assert_eq!(values(&w), vec![0.5, 0.0, -0.5]);
    assert_eq!(values(&frozen), vec![1.0]);
    sgd.zero_grad();
    assert_eq!(values(&w.grad()), vec![0.0, 0.0, 0.0]);
}

#[test]
fn state_round_trips_into_a_fresh_optimizer() {
    let make = || Adam::new(AdamConfig { lr: 0.1.into(), amsgrad: true, ..Default::default() });
    let w1 = Tensor::from_slice(&[1.0f64, -2.0]);
    let w2 = w1.copy();
    let (mut a, mut b) = (make().unwrap(), make().unwrap());
    a.add_param(Param::new(VarInfo::of("w", &w1), w1.shallow_clone())).unwrap();
    b.add_param(Param::new(VarInfo::of("w", &w2), w2.shallow_clone())).unwrap();
    let g = |x: f64| Some(Tensor::from_slice(&[x, -x]));
    a.step_with_grads(&[g(1.0)]).unwrap();
    b.step_with_grads(&[g(1.0)]).unwrap();
    let saved: Vec<(String, Tensor)> =
        a.state(0).into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect();
    let mut c = make().unwrap();
    let w3 = w1.copy();
    c.add_param(Param::new(VarInfo::of("w", &w3), w3.shallow_clone())).unwrap();
    c.set_state(0, saved).unwrap();
    c.set_step_count(a.step_count());
    for x in [0.5, -3.0, 2.0] {
        b.step_with_grads(&[g(x)]).unwrap();
        c.step_with_grads(&[g(x)]).unwrap();
    }
    assert_eq!(values(&w2), values(&w3));
}

#[test]
fn set_state_rejects_wrong_shapes_and_missing_entries() {
    let w = Tensor::from_slice(&[1.0f64, 2.0]);
    let mut bop = Bop::new(BopConfig::default()).unwrap();
    bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    let err = bop.set_state(0, vec![("m".into(), Tensor::zeros([3], (Kind::Double, Device::Cpu)))]);
    assert!(matches!(err, Err(Error::Checkpoint(_))), "{err:?}");
    let err = bop.set_state(0, vec![("v".into(), Tensor::zeros([2], (Kind::Double, Device::Cpu)))]);
    assert!(matches!(err, Err(Error::Checkpoint(_))), "{err:?}");
    assert!(bop.set_state(5, vec![]).is_err());
}

#[test]
fn mismatched_gradients_are_typed_errors() {
    let w = Tensor::from_slice(&[1.0f64, 2.0]);
    let mut sgd = Sgd::new(SgdConfig::default()).unwrap();
    sgd.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let err = sgd.step_with_grads(&[Some(Tensor::from_slice(&[1.0f64]))]).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    let err = sgd.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, 1.0]))]).unwrap_err();
    assert!(matches!(err, Error::GradientMismatch { .. }), "{err}");
    let err = sgd.step_with_grads(&[]).unwrap_err();
    assert!(matches!(err, Error::GradientCount { expected: 1, got: 0, .. }), "{err}");
    assert_eq!(sgd.step_count(), 0);
}

#[test]
fn reduced_precision_runs_through_libtorch_ops() {
    for kind in [Kind::Half, Kind::BFloat16] {
        let w = Tensor::from_slice(&[0.5f32, -0.25, 1.0]).to_kind(kind);
        let reference = Tensor::from_slice(&[0.5f32, -0.25, 1.0]);
        let mut lo = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() }).unwrap();
        let mut hi = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() }).unwrap();
        lo.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
        hi.add_param(Param::new(VarInfo::of("w", &reference), reference.shallow_clone())).unwrap();
        for s in 0..10 {
            let g = Tensor::from_slice(&[1.0f32, -2.0, 0.5]) * (s as f64 + 1.0);
            lo.step_with_grads(&[Some(g.to_kind(kind))]).unwrap();
            hi.step_with_grads(&[Some(g)]).unwrap();
        }
        assert_eq!(w.kind(), kind);
        for (a, b) in values(&w).iter().zip(values(&reference)) {
            assert!((a - b).abs() < 2e-2, "{kind:?}: {a} vs {b}");
        }
    }
}

#[test]
fn bits_declared_through_paths_reach_var_infos() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _k = root.sub("conv1").binary().var("kernel", &[4, 1, 3, 3], nn::Init::Const(1.0));
    let _q = root.sub("dense").bits(4).var("kernel", &[8, 4], nn::Init::Const(0.5));
    let _b = root.sub("dense").var("bias", &[8], nn::Init::Const(0.0));
    let _nt = root.zeros_no_train("running_mean", &[8]);
    let infos = var_infos(&vs);
    let got: Vec<(&str, u8, usize)> =
        infos.iter().map(|v| (v.name.as_str(), v.bits, v.ndim())).collect();
    assert_eq!(got, vec![("conv1.kernel", 1, 4), ("dense.bias", 32, 1), ("dense.kernel", 4, 2)]);
    assert!(infos[0].is_binary());
    assert_eq!(infos[0].kind, Kind::Float);
    assert_eq!(infos[0].device, Device::Cpu);
}

#[test]
fn tch_optimizers_still_work_on_a_store_with_bit_marks() {
    // tch's optimizers make one parameter group per group number up to the largest they meet;
    // the marks must keep those numbers small.
    use tch::nn::OptimizerConfig;
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().binary().var("w", &[4], nn::Init::Const(1.0));
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    w.sum(Kind::Float).backward();
    opt.step();
    assert_eq!(var_infos(&vs)[0].bits, 1);
    assert!(values(&w).iter().all(|&x| x < 1.0));
}

#[test]
fn many_variables_are_named_right() {
    let vs = nn::VarStore::new(Device::Cpu);
    for i in 0..300 {
        let _ = vs.root().var(&format!("p{i:03}"), &[2], nn::Init::Const(i as f64));
    }
    let _ = vs.root().var("empty", &[0], nn::Init::Const(0.0));
    let _ = vs.root().var("empty2", &[0, 3], nn::Init::Const(0.0));
    let params = caseopt::trainable_vars(&vs);
    assert_eq!(params.len(), 302);
    for p in &params {
        if let Some(i) = p.info.name.strip_prefix('p') {
            let i: f64 = i.parse().unwrap();
            assert_eq!(values(&p.tensor), vec![i, i], "{}", p.info.name);
        }
    }
    let names: Vec<&str> = params.iter().map(|p| p.info.name.as_str()).collect();
    assert!(names.contains(&"empty") && names.contains(&"empty2"));
}

/// Two Adam optimizers on the same variables and gradients, one on each backend.
fn adam_pair(backend: caseopt::Backend) -> (Adam, Vec<Tensor>) {
    let ws: Vec<Tensor> = (0..3)
        .map(|i| {
            Tensor::from_slice(&[0.5f32, -0.25, 1.0, 2.0, 0.125][..3 + i]).set_requires_grad(false)
        })
        .collect();
    let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() }).unwrap();
    for (i, w) in ws.iter().enumerate() {
        adam.add_param(Param::new(VarInfo::of(format!("w{i}"), w), w.shallow_clone())).unwrap();
    }
    adam.set_backend(backend);
    (adam, ws)
}

fn grads_for(ws: &[Tensor], step: usize) -> Vec<Option<Tensor>> {
    ws.iter().map(|w| Some(w.ones_like() * (0.01 * (step as f64 + 1.0)))).collect()
}

/// State tensors handed out by `state()` share memory with the optimizer, as torch.optim's
/// `optimizer.state[p]` does: an in-place edit (here, resetting the momentum) is what the next
/// step sees, on the fused path (states in one buffer) exactly as on the libtorch path. A user
/// resizing their handle must not break the optimizer either.
#[cfg(feature = "fused")]
#[test]
fn exported_state_shares_memory_on_every_backend() {
    let mut results = Vec::new();
    for backend in [caseopt::Backend::Torch, caseopt::Backend::Fused] {
        let (mut adam, ws) = adam_pair(backend);
        adam.step_with_grads(&grads_for(&ws, 0)).unwrap();
        let exported = adam.state(1);
        let (_, m) = exported.iter().find(|(n, _)| *n == "exp_avg").unwrap();
        assert!(values(m).iter().all(|&v| v != 0.0));
        let _ = m.shallow_clone().zero_();
        let (_, m_again) = adam.state(1).into_iter().find(|(n, _)| *n == "exp_avg").unwrap();
        assert!(values(&m_again).iter().all(|&v| v == 0.0), "{backend:?}");
        // Resizing the handle gives it its own shape; the optimizer's view keeps its own.
        let _ = m.shallow_clone().resize_([1000]);
        adam.step_with_grads(&grads_for(&ws, 1)).unwrap();
        adam.step_with_grads(&grads_for(&ws, 2)).unwrap();
        let shape: Vec<i64> =
            adam.state(1).into_iter().find(|(n, _)| *n == "exp_avg").unwrap().1.size();
        assert_eq!(shape, vec![4], "{backend:?}");
        results.push(ws.iter().map(values).collect::<Vec<_>>());
    }
    // Same arithmetic on both paths (f32 Adam: within an ulp or two).
    for (a, b) in results[0].iter().flatten().zip(results[1].iter().flatten()) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
    }
}
