//! The multi-tensor backend (`Backend::MultiTensor`), forced on the CPU, where ATen's
//! `_fused_*`/`_foreach_*` ops run too:
//!
//! - bit for bit against torch.optim 2.13 with `fused=True` (Adam, AdamW, SGD, Adagrad) and
//!   `foreach=True` (RMSprop, RAdam, NAdam): the fixtures of tests/fixtures/gen_multi.py, one
//!   file per CPU capability ATen can run with (DEFAULT's bits differ from AVX2's and
//!   AVX-512's, which are the same), the test taking the one ATen runs with here; f32 and f64,
//!   every option, lr schedules, ten steps, eight variables of 1 to 1031 elements, some without
//!   a gradient at some steps;
//! - Bop and Bop2ndOrder bit for bit against the larq fixtures of gen_parity.py, alone and
//!   through a router, flip ratios included;
//! - a refused step (non-finite gradient) changes nothing; constraints are the unconstrained
//!   step then `clamp_`; states move between backends through `state`/`set_state`, and router
//!   checkpoints through a file, and continue bit for bit;
//! - a router's non-finite check on this backend reads one value back per step, whatever the
//!   number of variables (`Router::host_reads`).

mod checkpoint_support;
mod parity_support;

use std::collections::BTreeMap;

use caseopt::{
    case_optimizer, Adagrad, Adam, AdamConfig, AdamW, Backend, Bop, Bop2ndOrder, Constraint, Error,
    Execution, NAdam, Optimizer, Param, PathExt, RAdam, RmsProp, RmsPropConfig, Router, Sgd,
    SgdConfig, VarInfo,
};
use checkpoint_support::{assert_refused_untouched, exact, snapshot, Rng};
use parity_support::{
    fixtures_dir, multi_meta, run_multi_parity, run_parity_values, running_capability, MULTI,
};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

/// The multi-tensor fixtures for the capability ATen runs with here, or `None` (with why)
/// where gen_multi.py made none for it.
fn multi_fixtures() -> Option<(Value, BTreeMap<String, Tensor>)> {
    let dir = fixtures_dir();
    let meta = multi_meta();
    let capability = running_capability();
    let Some(file) = meta["files"][capability].as_str() else {
        println!("no multi-tensor fixtures for CPU capability {capability}: not compared");
        return None;
    };
    println!("multi-tensor fixtures of capability {capability}: {file}");
    let tensors = Tensor::read_safetensors(dir.join(file)).unwrap();
    Some((meta, tensors.into_iter().collect()))
}

fn multi_parity(dtype: &str) {
    let Some((meta, tensors)) = multi_fixtures() else { return };
    run_multi_parity(&meta, &tensors, dtype, Device::Cpu);
}

#[test]
fn fused_and_foreach_parity_f32() {
    multi_parity("f32");
}

#[test]
fn fused_and_foreach_parity_f64() {
    multi_parity("f64");
}

/// Bop and Bop2ndOrder on this backend give the larq fixtures' bits; the torch.optim cases of
/// those fixtures (single-tensor trajectories) are only held near, as the multi-tensor ops
/// round otherwise (the exact comparison is the test above).
#[test]
fn bop_and_bop2nd_order_are_larq_bit_for_bit() {
    for dtype in ["f32", "f64"] {
        let near = if dtype == "f32" { 1e-3 } else { 1e-9 };
        let tol = |o: &str| if o.starts_with("Bop") { 0.0 } else { near };
        let parity = run_parity_values(dtype, &tol, MULTI, Device::Cpu);
        assert_eq!(parity.worst["Bop"], 0.0);
        assert_eq!(parity.worst["Bop2ndOrder"], 0.0);
        assert_eq!(parity.worst.len(), 9);
    }
}

case_optimizer! {
    struct BopAdamRouter {
        binary & ndim(2) => Bop<threshold: 1e-6, gamma: 1e-1>,
        binary & ndim(1) => Bop2ndOrder<threshold: 1e-6, gamma: 1e-1, sigma: 1e-2>,
        _ => Adam<lr: 0.01, amsgrad: true>,
    }
}

/// A model of `n` full-precision variables of odd sizes and three binary ones.
fn model(n: usize, kind: Kind, seed: u64) -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(kind);
    let root = vs.root();
    let mut rng = Rng::new(seed);
    let mut values = |len: i64, signs: bool| -> Tensor {
        let v: Vec<f32> = (0..len)
            .map(|_| {
                let x = rng.symmetric();
                if signs {
                    if x >= 0.0 {
                        1.0
                    } else {
                        -1.0
                    }
                } else {
                    x
                }
            })
            .collect();
        Tensor::from_slice(&v)
    };
    for (name, shape) in [("k1", vec![7i64, 9]), ("k2", vec![33, 5]), ("s", vec![17])] {
        let len: i64 = shape.iter().product();
        let _ = root.binary().var_copy(name, &values(len, true).view(shape.as_slice()));
    }
    for i in 0..n {
        let len = 1 + (i as i64 * 37) % 301;
        let _ = root.var_copy(&format!("b{i:03}"), &values(len, false));
    }
    vs
}

/// Deterministic gradients for `step` (a NaN in `poison`'s last element if named).
fn set_grads<R: Router>(r: &mut R, vs: &nn::VarStore, step: u64, poison: Option<&str>) {
    r.zero_grad();
    let mut names: Vec<_> = vs.variables().into_iter().collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    let mut rng = Rng::new(1000 + step);
    let mut loss = Tensor::zeros([], (vs.kind(), Device::Cpu));
    for (name, t) in names {
        let v: Vec<f32> = (0..t.numel()).map(|_| rng.symmetric() * 0.5).collect();
        let g = Tensor::from_slice(&v).to_kind(t.kind());
        if poison == Some(name.as_str()) {
            let _ = g.get(t.numel() as i64 - 1).fill_(f64::NAN);
        }
        loss += (&t * g.view(t.size().as_slice())).sum(t.kind());
    }
    loss.backward();
}

fn set_backend(r: &mut BopAdamRouter, backend: Backend) {
    r.rule0_mut().set_backend(backend);
    r.rule1_mut().set_backend(backend);
    r.rule2_mut().set_backend(backend);
}

#[test]
fn through_a_router_bop_is_bit_for_bit_and_flip_ratios_agree() {
    for kind in [Kind::Float, Kind::Double] {
        let (vs_m, vs_t) = (model(5, kind, 1), model(5, kind, 1));
        let mut multi = BopAdamRouter::build(&vs_m).unwrap();
        let mut torch = BopAdamRouter::build(&vs_t).unwrap();
        set_backend(&mut multi, Backend::MultiTensor);
        set_backend(&mut torch, Backend::Torch);
        for step in 0..6 {
            set_grads(&mut multi, &vs_m, step, None);
            set_grads(&mut torch, &vs_t, step, None);
            multi.step().unwrap();
            torch.step().unwrap();
            let (sm, st) = (snapshot(&multi), snapshot(&torch));
            // Rules 0 and 1 (Bop, Bop2ndOrder): the same bits as the libtorch path's larq ops.
            assert_eq!(sm.rules[..2], st.rules[..2], "{kind:?} step {step}");
            let (fm, ft) = (multi.flip_ratios().unwrap(), torch.flip_ratios().unwrap());
            assert_eq!(fm, ft, "{kind:?} step {step}");
            assert!(fm.unwrap().flipped > 0 || step > 0, "the first step flips something");
        }
    }
}

#[test]
fn the_non_finite_check_reads_once_per_step_whatever_the_number_of_variables() {
    for n in [4usize, 150] {
        let vs = model(n, Kind::Float, 2);
        let mut r = BopAdamRouter::build(&vs).unwrap();
        set_backend(&mut r, Backend::MultiTensor);
        assert_eq!(r.host_reads(), 0);
        for step in 0..4 {
            set_grads(&mut r, &vs, step, None);
            r.step().unwrap();
            // The first step also checks the 1-bit variables' values, in one read.
            let expected = if step == 0 { 2 } else { 1 };
            assert_eq!(r.host_reads(), expected, "{n} variables, step {step}");
        }
    }
}

#[test]
fn a_non_finite_gradient_refuses_the_whole_step_and_names_the_variable() {
    for poisoned in ["b007", "k2", "s"] {
        let vs = model(12, Kind::Float, 3);
        let mut r = BopAdamRouter::build(&vs).unwrap();
        set_backend(&mut r, Backend::MultiTensor);
        set_grads(&mut r, &vs, 0, None);
        r.step().unwrap();
        set_grads(&mut r, &vs, 1, Some(poisoned));
        assert_refused_untouched(&mut r, poisoned);
        // One read found it, and one per variable checked in rule order until the first.
        assert!(r.host_reads() > 1, "{poisoned}");
        set_grads(&mut r, &vs, 1, None);
        r.step().unwrap();
        assert_eq!(r.step_counts(), vec![2, 2, 2]);
    }
}

/// A built-in optimizer: an [`Optimizer`] with [`Execution`] settings.
trait Builtin: Optimizer + Execution {}
impl<T: Optimizer + Execution> Builtin for T {}

/// One optimizer of each kind with `Param`s over `vars` on `backend`.
fn each_optimizer(vars: &[Tensor], backend: Backend) -> Vec<Box<dyn Builtin>> {
    let mut out: Vec<Box<dyn Builtin>> = vec![
        Box::new(Adam::new(AdamConfig { amsgrad: true, ..Default::default() }).unwrap()),
        Box::new(AdamW::new(Default::default()).unwrap()),
        Box::new(
            Sgd::new(SgdConfig { lr: 0.1.into(), momentum: 0.9.into(), ..Default::default() })
                .unwrap(),
        ),
        Box::new(Adagrad::new(Default::default()).unwrap()),
        Box::new(
            RmsProp::new(RmsPropConfig {
                momentum: 0.5.into(),
                centered: true,
                ..Default::default()
            })
            .unwrap(),
        ),
        Box::new(RAdam::new(Default::default()).unwrap()),
        Box::new(NAdam::new(Default::default()).unwrap()),
        Box::new(Bop::new(Default::default()).unwrap()),
        Box::new(Bop2ndOrder::new(Default::default()).unwrap()),
    ];
    for o in out.iter_mut() {
        o.set_backend(backend);
        for (j, v) in vars.iter().enumerate() {
            let mut info = VarInfo::of(format!("v{j}"), v);
            if o.name().starts_with("Bop") {
                info = info.with_bits(1);
            }
            o.add_param(Param::new(info, v.shallow_clone())).unwrap();
        }
    }
    out
}

fn vars(kind: Kind, binary: bool) -> Vec<Tensor> {
    let mut rng = Rng::new(7);
    [5i64, 1, 40, 17]
        .iter()
        .map(|&n| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let x = rng.symmetric();
                    if binary {
                        x.signum()
                    } else {
                        x
                    }
                })
                .collect();
            Tensor::from_slice(&v).to_kind(kind)
        })
        .collect()
}

fn grads(vars: &[Tensor], step: u64) -> Vec<Option<Tensor>> {
    let mut rng = Rng::new(500 + step);
    vars.iter()
        .enumerate()
        .map(|(j, v)| {
            // The second variable sits out step 1.
            if j == 1 && step == 1 {
                return None;
            }
            let g: Vec<f32> = (0..v.numel()).map(|_| rng.symmetric() * 0.3).collect();
            Some(Tensor::from_slice(&g).to_kind(v.kind()))
        })
        .collect()
}

/// Moves optimizer `from`'s variables' values and states into `to`, as a checkpoint does.
fn transfer(from: &dyn Builtin, to: &mut dyn Builtin) {
    for j in 0..from.params().len() {
        to.params()[j].tensor.shallow_clone().copy_(&from.params()[j].tensor);
        let state: Vec<(String, Tensor)> =
            from.state(j).into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect();
        to.set_state(j, state).unwrap();
    }
    to.set_step_count(from.step_count());
}

/// States saved on one backend load on another and continue bit for bit: the same as one
/// optimizer that switches backend at that step (and, multi-tensor to multi-tensor, as if
/// nothing happened: the step tensors the fused ops want are derived from the counts).
#[test]
fn states_move_between_backends_and_continue_bit_for_bit() {
    for kind in [Kind::Float, Kind::Double] {
        for (first, then) in [
            (Backend::MultiTensor, Backend::Torch),
            (Backend::Torch, Backend::MultiTensor),
            (Backend::Auto, Backend::MultiTensor),
            (Backend::MultiTensor, Backend::MultiTensor),
        ] {
            for binary in [false, true] {
                let case = format!("{kind:?} {first:?} -> {then:?}");
                let (va, vb) = (vars(kind, binary), vars(kind, binary));
                let mut straight = each_optimizer(&va, first);
                let mut saved = each_optimizer(&vb, first);
                for step in 0..3 {
                    for (o, v) in straight.iter_mut().zip([&va; 9]) {
                        o.step_with_grads(&grads(v, step)).unwrap();
                    }
                    for (o, v) in saved.iter_mut().zip([&vb; 9]) {
                        o.step_with_grads(&grads(v, step)).unwrap();
                    }
                }
                let vc = vars(kind, binary);
                let mut loaded = each_optimizer(&vc, then);
                for (s, l) in saved.iter().zip(loaded.iter_mut()) {
                    transfer(s.as_ref(), l.as_mut());
                }
                for s in straight.iter_mut() {
                    s.set_backend(then);
                }
                for step in 3..6 {
                    for (s, l) in straight.iter_mut().zip(loaded.iter_mut()) {
                        s.step_with_grads(&grads(&va, step)).unwrap();
                        l.step_with_grads(&grads(&vc, step)).unwrap();
                        let name = s.name();
                        if name.starts_with("Bop") != binary {
                            continue;
                        }
                        for (j, (a, b)) in s.params().iter().zip(l.params()).enumerate() {
                            assert_eq!(
                                exact(&a.tensor),
                                exact(&b.tensor),
                                "{case} {name} v{j} step {step}"
                            );
                            let (sa, sb) = (s.state(j), l.state(j));
                            assert_eq!(sa.len(), sb.len(), "{case} {name}");
                            for ((n, x), (_, y)) in sa.iter().zip(&sb) {
                                assert_eq!(
                                    exact(x),
                                    exact(y),
                                    "{case} {name} v{j} {n} step {step}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A constrained multi-tensor step is the unconstrained one followed by `clamp_`.
#[test]
fn constraints_clamp_after_the_multi_tensor_update() {
    for kind in [Kind::Float, Kind::Double] {
        let (va, vb) = (vars(kind, false), vars(kind, false));
        let mut clipped = each_optimizer(&va, Backend::MultiTensor);
        let mut plain = each_optimizer(&vb, Backend::MultiTensor);
        let clip = Constraint::weight_clip(0.4).unwrap();
        for o in clipped.iter_mut().take(7) {
            for j in 0..va.len() {
                // Two values: one clamp per clip value and group.
                let c = if j % 2 == 0 { clip } else { Constraint::weight_clip(0.6).unwrap() };
                assert!(o.set_constraint(j, Some(c)).unwrap());
            }
        }
        for step in 0..4 {
            for (c, p) in clipped.iter_mut().zip(plain.iter_mut()).take(7) {
                c.step_with_grads(&grads(&va, step)).unwrap();
                p.step_with_grads(&grads(&vb, step)).unwrap();
                let g = grads(&vb, step);
                for (j, (a, b)) in c.params().iter().zip(p.params()).enumerate() {
                    if g[j].is_some() {
                        let bound = if j % 2 == 0 { 0.4 } else { 0.6 };
                        let _ = b.tensor.shallow_clone().clamp_(-bound, bound);
                    }
                    assert_eq!(
                        exact(&a.tensor),
                        exact(&b.tensor),
                        "{} {kind:?} v{j} step {step}",
                        c.name()
                    );
                }
            }
        }
        // The clip did something: the 40-element variable sits at its bound (0.4 in `kind`).
        let bound = Tensor::from(0.4f64).to_kind(kind).double_value(&[]);
        let clamped = va[2].abs().max().double_value(&[]);
        assert_eq!(clamped, bound, "{kind:?}");
    }
}

#[test]
fn a_gradient_that_does_not_match_is_refused_before_anything_changes() {
    let v = vars(Kind::Float, false);
    let mut opts = each_optimizer(&v, Backend::MultiTensor);
    let before: Vec<_> = v.iter().map(exact).collect();
    for o in opts.iter_mut() {
        let mut g = grads(&v, 0);
        g[2] = Some(Tensor::zeros([3], (Kind::Float, Device::Cpu)));
        let err = o.step_with_grads(&g).unwrap_err();
        assert!(matches!(err, Error::GradientMismatch { .. }), "{}: {err}", o.name());
        assert_eq!(o.step_count(), 0);
        assert!(o.state(0).is_empty(), "{}", o.name());
    }
    assert_eq!(v.iter().map(exact).collect::<Vec<_>>(), before);
}

/// A router checkpoint written on one backend loads into a router on another and continues bit
/// for bit: the same as a router that switches backend at that step, through the file.
#[test]
fn router_checkpoints_move_between_backends_and_continue_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("caseopt-multi-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for kind in [Kind::Float, Kind::Double] {
        for (first, then) in [
            (Backend::MultiTensor, Backend::Auto),
            (Backend::Auto, Backend::MultiTensor),
            (Backend::Torch, Backend::MultiTensor),
        ] {
            let case = format!("{kind:?} {first:?} -> {then:?}");
            let (vs_a, vs_b) = (model(6, kind, 4), model(6, kind, 4));
            let mut straight = BopAdamRouter::build(&vs_a).unwrap();
            let mut saved = BopAdamRouter::build(&vs_b).unwrap();
            set_backend(&mut straight, first);
            set_backend(&mut saved, first);
            for step in 0..3 {
                set_grads(&mut straight, &vs_a, step, None);
                straight.step().unwrap();
                set_grads(&mut saved, &vs_b, step, None);
                saved.step().unwrap();
            }
            let path = dir.join(format!("{kind:?}-{first:?}-{then:?}.safetensors"));
            caseopt::save_training(&path, &vs_b, &saved).unwrap();
            drop(saved);
            // A fresh model of other values and a fresh router on the other backend.
            let vs_c = model(6, kind, 99);
            let mut loaded = BopAdamRouter::build(&vs_c).unwrap();
            set_backend(&mut loaded, then);
            caseopt::load_training(&path, &vs_c, &mut loaded).unwrap();
            assert_eq!(snapshot(&loaded), snapshot(&straight), "{case} after loading");
            set_backend(&mut straight, then);
            for step in 3..6 {
                set_grads(&mut straight, &vs_a, step, None);
                straight.step().unwrap();
                set_grads(&mut loaded, &vs_c, step, None);
                loaded.step().unwrap();
                assert_eq!(snapshot(&loaded), snapshot(&straight), "{case} step {step}");
                assert_eq!(loaded.flip_ratios().unwrap(), straight.flip_ratios().unwrap());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
