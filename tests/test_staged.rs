//! Staged Bop steps: under the router's non-finite check, large Bop steps are computed in the
//! pass that checks their gradients and kept aside until the whole step is accepted. They must
//! give the in-place kernel's results bit for bit, and a refused step must change nothing.

// The tests of the fused path itself are `cfg(feature = "fused")`; without it their helpers
// are unused.
#![cfg_attr(not(feature = "fused"), allow(dead_code, unused_imports))]

mod checkpoint_support;

use caseopt::{
    case_optimizer, Bop, BopConfig, NonFinitePolicy, Optimizer, Param, PathExt, Router, VarInfo,
};
use checkpoint_support::{assert_refused_untouched, exact, snapshot, Rng};
use tch::{nn, Device, Kind, Tensor};

/// Enough elements to be staged (2^20 at least), not a multiple of 16.
const BIG: i64 = (1 << 20) + 37;

/// Weights of +-1 (and one 0.5, binarised by the first update) in `n` elements.
fn weights(n: i64, rng: &mut Rng) -> Tensor {
    let mut v: Vec<f32> = (0..n).map(|_| if rng.symmetric() >= 0.0 { 1.0 } else { -1.0 }).collect();
    v[0] = 0.5;
    Tensor::from_slice(&v)
}

/// Gradients whose moving averages cross the threshold both ways over a few steps.
fn gradient(n: i64, rng: &mut Rng) -> Tensor {
    let v: Vec<f32> = (0..n).map(|_| rng.symmetric() * 1e-3).collect();
    Tensor::from_slice(&v)
}

fn bop() -> Bop {
    Bop::new(BopConfig { threshold: 1e-7.into(), gamma: 1e-1.into() }).unwrap()
}

/// Two identical Bops over three variables: a large one, a small one, and a large one that
/// starts at an odd offset of its storage (so that its lines are not cache-line aligned).
fn twins() -> (Bop, Bop, Vec<Tensor>, Vec<Tensor>) {
    let mut rng = Rng::new(7);
    let big = weights(BIG, &mut rng);
    let small = weights(1000, &mut rng);
    let offset = weights(BIG + 3, &mut rng).narrow(0, 3, BIG);
    let (mut a, mut b) = (bop(), bop());
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for (i, t) in [big, small, offset].into_iter().enumerate() {
        let copy = t.copy();
        let info = VarInfo::of(format!("w{i}"), &t).with_bits(1);
        a.add_param(Param::new(info.clone(), t.shallow_clone())).unwrap();
        b.add_param(Param::new(info, copy.shallow_clone())).unwrap();
        pa.push(t);
        pb.push(copy);
    }
    (a, b, pa, pb)
}

fn grads_for(params: &[Tensor], rng: &mut Rng) -> Vec<Option<Tensor>> {
    params.iter().map(|p| Some(gradient(p.numel() as i64, rng))).collect()
}

fn same_state(a: &Bop, b: &Bop) {
    for i in 0..a.params().len() {
        let sa: Vec<_> = a.state(i).iter().map(|(n, t)| (*n, exact(t))).collect();
        let sb: Vec<_> = b.state(i).iter().map(|(n, t)| (*n, exact(t))).collect();
        assert_eq!(sa, sb, "state of variable {i}");
        assert_eq!(exact(&a.params()[i].tensor), exact(&b.params()[i].tensor), "variable {i}");
    }
}

#[cfg(feature = "fused")]
#[test]
fn staged_steps_equal_in_place_steps_bit_for_bit() {
    let (mut a, mut b, pa, _) = twins();
    let mut rng = Rng::new(11);
    let mut alias = None;
    let mut flips = 0;
    for step in 0..6 {
        let grads = grads_for(&pa, &mut rng);
        let report = a.stage_step(&grads).unwrap();
        if step == 0 {
            // No state yet: nothing to stage.
            assert_eq!(report, None);
        } else {
            // Every variable whose state lives in a state buffer is staged, the small one
            // too (the whole optimizer is large enough).
            let report = report.expect("a large step is staged");
            assert_eq!(report.covered, vec![0, 1, 2]);
            assert_eq!(report.first_non_finite, None);
        }
        let before = exact(&pa[0]);
        a.step_with_grads(&grads).unwrap();
        b.step_with_grads(&grads).unwrap();
        if exact(&pa[0]) != before {
            flips += 1;
        }
        same_state(&a, &b);
        // An alias of the state handed out earlier still shows the current state.
        let current = a.state(0).remove(0).1;
        let held = alias.get_or_insert_with(|| current.alias());
        assert_eq!(exact(held), exact(&current));
    }
    assert!(flips >= 3, "the steps should flip weights ({flips})");
}

#[cfg(feature = "fused")]
#[test]
fn a_dropped_or_mismatched_staging_changes_nothing() {
    let (mut a, mut b, pa, _) = twins();
    let mut rng = Rng::new(3);
    let grads = grads_for(&pa, &mut rng);
    a.step_with_grads(&grads).unwrap();
    b.step_with_grads(&grads).unwrap();
    // Staged, then dropped: nothing moved.
    let grads = grads_for(&pa, &mut rng);
    assert!(a.stage_step(&grads).unwrap().is_some());
    a.drop_staged();
    same_state(&a, &b);
    // Staged for some gradients, stepped with others: the staging is not used.
    assert!(a.stage_step(&grads).unwrap().is_some());
    let other = grads_for(&pa, &mut rng);
    a.step_with_grads(&other).unwrap();
    b.step_with_grads(&other).unwrap();
    same_state(&a, &b);
    // Staged, then a hyperparameter changed: not used either.
    let grads = grads_for(&pa, &mut rng);
    assert!(a.stage_step(&grads).unwrap().is_some());
    a.set_hyperparameter("gamma", 0.2.into()).unwrap();
    b.set_hyperparameter("gamma", 0.2.into()).unwrap();
    a.step_with_grads(&grads).unwrap();
    b.step_with_grads(&grads).unwrap();
    same_state(&a, &b);
}

#[cfg(feature = "fused")]
#[test]
fn a_staging_finds_a_single_bad_value_anywhere() {
    let (mut a, _, pa, _) = twins();
    let mut rng = Rng::new(5);
    let grads = grads_for(&pa, &mut rng);
    a.step_with_grads(&grads).unwrap();
    for (var, at, value) in
        [(0, 0, f32::NAN), (0, BIG - 1, f32::INFINITY), (2, BIG / 2, f32::NEG_INFINITY)]
    {
        let grads = grads_for(&pa, &mut rng);
        let _ = grads[var].as_ref().unwrap().get(at).fill_(f64::from(value));
        let report = a.stage_step(&grads).unwrap().expect("staged");
        assert_eq!(report.first_non_finite, Some(var), "{var} {at}");
        a.drop_staged();
    }
}

case_optimizer! {
    struct BopAdam {
        binary => Bop<threshold: 1e-7, gamma: 1e-1>,
        _ => Adam<lr: 0.01>,
    }
}

/// A model whose binary variables are large enough to be staged.
fn model() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.binary().var("big", &[1024, 1025], nn::Init::Const(1.0));
    let _ = root.binary().var("small", &[300], nn::Init::Const(-1.0));
    let _ = root.var("bias", &[300], nn::Init::Const(0.0));
    vs
}

/// Sets every variable's gradient to deterministic noise, with `poison`'s value written at the
/// last element of each variable it names.
fn set_grads(r: &mut BopAdam, vs: &nn::VarStore, step: u64, poison: Option<(&[&str], f64)>) {
    r.zero_grad();
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let mut names: Vec<_> = vs.variables().into_iter().collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    let mut rng = Rng::new(100 + step);
    for (name, t) in names {
        let g = gradient(t.numel() as i64, &mut rng).view(t.size().as_slice());
        if let Some((targets, value)) = poison {
            if targets.contains(&name.as_str()) {
                let _ = g.flatten(0, -1).get(t.numel() as i64 - 1).fill_(value);
            }
        }
        loss += (&t * g).sum(Kind::Float);
    }
    loss.backward();
}

#[test]
fn a_router_with_the_check_trains_exactly_as_without_and_refuses_bad_steps_whole() {
    let (vs_checked, vs_plain) = (model(), model());
    let mut checked = BopAdam::build(&vs_checked).unwrap();
    let mut plain = BopAdam::build(&vs_plain).unwrap();
    plain.set_non_finite_policy(NonFinitePolicy::Proceed);
    for step in 0..4 {
        set_grads(&mut checked, &vs_checked, step, None);
        set_grads(&mut plain, &vs_plain, step, None);
        checked.step().unwrap();
        plain.step().unwrap();
        assert_eq!(snapshot(&checked), snapshot(&plain), "step {step}");
    }
    // The last element of a staged variable, then of the scanned one; then several at once:
    // the first in rule order is named, staged or not.
    let cases: [(&[&str], &str); 5] = [
        (&["big"], "big"),
        (&["small"], "small"),
        (&["bias"], "bias"),
        (&["bias", "small"], "small"),
        (&["small", "big"], "big"),
    ];
    for (targets, target) in cases {
        set_grads(&mut checked, &vs_checked, 9, Some((targets, f64::NAN)));
        assert_refused_untouched(&mut checked, target);
    }
    checked.set_non_finite_policy(NonFinitePolicy::SkipStep);
    set_grads(&mut checked, &vs_checked, 9, Some((&["big"], f64::INFINITY)));
    let before = snapshot(&checked);
    checked.step().unwrap();
    assert_eq!(snapshot(&checked), before);
    assert_eq!(checked.skipped_steps(), 1);
    // And the next clean step is the same as the unchecked router's.
    set_grads(&mut checked, &vs_checked, 4, None);
    set_grads(&mut plain, &vs_plain, 4, None);
    checked.step().unwrap();
    plain.step().unwrap();
    assert_eq!(snapshot(&checked), snapshot(&plain));
}
