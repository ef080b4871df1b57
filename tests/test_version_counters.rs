//! ATen's version counters across a step: every tensor a step writes (parameters and state)
//! has its version bumped, on every backend, so that a graph that saved one before the step
//! fails in `backward` with autograd's in-place error instead of differentiating through the
//! new values. The fused kernels write memory ATen does not see and bump the counters
//! themselves (runtime/kernels/version.rs); libtorch's in-place ops bump them on their own.

use caseopt::{case_optimizer, Backend, Execution, NonFinitePolicy, PathExt, Router};
use tch::{nn, Device, Kind, TchError, Tensor};

case_optimizer! {
    struct BopAdam {
        binary => Bop<threshold: 1e-7, gamma: 1e-1>,
        _ => Adam<lr: 0.01>,
    }
}

/// Every backend this build has (without the `fused` feature `Backend::Fused` always fails).
fn backends() -> Vec<Backend> {
    #[allow(unused_mut)]
    let mut all = vec![Backend::Torch, Backend::Auto];
    #[cfg(feature = "fused")]
    all.push(Backend::Fused);
    all
}

/// A binary variable `w` of `binary` elements (Bop) and a full-precision one `v` (Adam). From
/// 2^20 elements up the router stages Bop's step (runtime/optim/staging.rs) from its second
/// step on, when the state exists.
fn model(binary: i64) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.binary().var("w", &[binary], nn::Init::Const(1.0));
    let _ = root.var("v", &[300], nn::Init::Const(0.25));
    vs
}

fn router(vs: &nn::VarStore, backend: Backend) -> BopAdam {
    let mut r = BopAdam::build(vs).unwrap();
    r.rule0_mut().set_backend(backend);
    r.rule1_mut().set_backend(backend);
    r
}

fn var(vs: &nn::VarStore, name: &str) -> Tensor {
    vs.variables().remove(name).unwrap()
}

/// A loss whose gradients are deterministic noise (`scale` 0: zero gradients, with which Bop
/// changes no weight).
fn loss(vs: &nn::VarStore, step: i64, scale: f64) -> Tensor {
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for name in ["w", "v"] {
        let t = var(vs, name);
        let g = (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * 0.37 + step as f64)
            .sin()
            * (1e-2 * scale);
        total += (&t * g.view(t.size().as_slice())).sum(Kind::Float);
    }
    total
}

/// Graphs that saved each of `tensors` (a graph saves `t` in `t * t * x`, and a state, which
/// needs no gradient, in `probe * state`).
fn save(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors
        .iter()
        .map(|t| {
            if t.requires_grad() {
                (t * t * t.full_like(0.5)).sum(Kind::Float)
            } else {
                let probe = t.ones_like().set_requires_grad(true);
                (probe * t).sum(Kind::Float)
            }
        })
        .collect()
}

/// The parameters `w` and `v` and every state tensor the router holds for them.
fn written(vs: &nn::VarStore, r: &BopAdam) -> Vec<(String, Tensor)> {
    let mut out = vec![("w".to_string(), var(vs, "w")), ("v".to_string(), var(vs, "v"))];
    for (rule, opt) in [(0, r.rule0() as &dyn caseopt::Optimizer), (1, r.rule1())] {
        for i in 0..opt.params().len() {
            for (name, t) in opt.state(i) {
                if t.kind() != Kind::Int64 {
                    out.push((format!("rule {rule} variable {i} {name}"), t));
                }
            }
        }
    }
    out
}

fn assert_inplace_error(result: Result<(), TchError>, case: &str) {
    match result {
        Ok(()) => panic!("{case}: backward through a tensor the step wrote succeeded"),
        Err(e) => assert!(
            e.to_string().contains("modified by an inplace operation"),
            "{case}: not autograd's in-place error: {e}"
        ),
    }
}

/// Two steps (the first creates the state, the second updates it in place, staged for a
/// large Bop): every tensor the step writes gets a new version, and every graph that saved
/// one fails in `backward` as on torch's path.
fn check_steps(binary: i64, scale: f64) {
    for backend in backends() {
        let vs = model(binary);
        let mut r = router(&vs, backend);
        for step in 0..2 {
            let tensors = written(&vs, &r);
            let versions: Vec<i64> = tensors.iter().map(|(_, t)| t.internal_version()).collect();
            let saved = save(&tensors.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>());
            r.backward_step(&loss(&vs, step, scale)).unwrap();
            for (((name, t), before), saved) in tensors.iter().zip(versions).zip(saved) {
                let case =
                    format!("{backend:?}, {binary} elements, scale {scale}, step {step}, {name}");
                assert!(t.internal_version() > before, "{case}: version not bumped");
                assert_inplace_error(saved.f_backward(), &case);
            }
        }
        // Both steps updated the state: it exists, so the second step checked it too.
        assert_eq!(written(&vs, &r).len(), 2 + 1 + 2, "{backend:?}: w, v, m, exp_avg(_sq)");
    }
}

#[test]
fn a_graph_that_saved_a_parameter_or_state_before_the_step_fails_on_every_backend() {
    check_steps(300, 1.0);
}

#[test]
fn a_bop_step_that_flips_no_weight_still_bumps_its_parameter() {
    // Zero gradients: the moving average stays 0 and no weight changes, but torch's path
    // (`w.copy_(...)`) bumps the version all the same, and so must the fused one.
    check_steps(300, 0.0);
}

#[test]
fn a_staged_bop_step_bumps_at_commit() {
    check_steps(1 << 20, 1.0);
}

#[test]
fn a_refused_step_bumps_nothing() {
    // Under the default policy a step with a NaN gradient changes nothing, staged or not:
    // neither the values nor the versions, and the saved graphs stay valid.
    for binary in [300, 1 << 20] {
        for backend in backends() {
            let vs = model(binary);
            let mut r = router(&vs, backend);
            assert_eq!(r.non_finite_policy(), NonFinitePolicy::Error);
            r.backward_step(&loss(&vs, 0, 1.0)).unwrap();
            let tensors = written(&vs, &r);
            let versions: Vec<i64> = tensors.iter().map(|(_, t)| t.internal_version()).collect();
            let saved = save(&tensors.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>());
            let bad = loss(&vs, 1, 1.0) + var(&vs, "w").sum(Kind::Float) * f64::NAN;
            assert!(r.backward_step(&bad).is_err(), "{backend:?}: a NaN gradient is refused");
            for (((name, t), before), saved) in tensors.iter().zip(versions).zip(saved) {
                let case = format!("{backend:?}, {binary} elements, {name}");
                assert_eq!(t.internal_version(), before, "{case}: bumped by a refused step");
                saved.f_backward().unwrap_or_else(|e| panic!("{case}: {e}"));
            }
        }
    }
}
