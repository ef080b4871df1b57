//! Staged Bop steps: under the router's non-finite check, large Bop steps are computed in the
//! pass that checks their gradients and kept aside until the whole step is accepted. They must
//! give the in-place kernel's results bit for bit, and a refused step must change nothing.

mod checkpoint_support;

use caseopt::{case_optimizer, NonFinitePolicy, PathExt, Router};
use checkpoint_support::{assert_refused_untouched, snapshot, Rng, Snapshot};
use tch::{nn, Device, Kind, Tensor};

/// Gradients whose moving averages cross the threshold both ways over a few steps.
fn gradient(n: i64, rng: &mut Rng) -> Tensor {
    let v: Vec<f32> = (0..n).map(|_| rng.symmetric() * 1e-3).collect();
    Tensor::from_slice(&v)
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

/// Under every instruction set the kernels have on this processor (`caseopt::__private::
/// set_kernel_isa`): the staged step equals the in-place one, and refuses bad steps whole; and
/// every set trains to the baseline's bits.
#[test]
fn a_router_with_the_check_trains_exactly_as_without_and_refuses_bad_steps_whole() {
    let isas = caseopt::__private::kernel_isas();
    eprintln!("instruction sets: {isas:?}");
    let mut baseline = None;
    for isa in isas {
        assert_eq!(caseopt::__private::set_kernel_isa(Some(isa)).unwrap(), isa);
        let trained = trains_exactly_as_without_and_refuses_bad_steps_whole(isa);
        match &baseline {
            None => baseline = Some(trained),
            Some(b) => assert_eq!(&trained, b, "{isa} against the baseline"),
        }
    }
    caseopt::__private::set_kernel_isa(None).unwrap();
}

fn trains_exactly_as_without_and_refuses_bad_steps_whole(isa: &str) -> Snapshot {
    let (vs_checked, vs_plain) = (model(), model());
    let mut checked = BopAdam::build(&vs_checked).unwrap();
    let mut plain = BopAdam::build(&vs_plain).unwrap();
    plain.set_non_finite_policy(NonFinitePolicy::Proceed);
    for step in 0..4 {
        set_grads(&mut checked, &vs_checked, step, None);
        set_grads(&mut plain, &vs_plain, step, None);
        checked.step().unwrap();
        plain.step().unwrap();
        assert_eq!(snapshot(&checked), snapshot(&plain), "{isa} step {step}");
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
    assert_eq!(snapshot(&checked), snapshot(&plain), "{isa}");
    snapshot(&checked)
}
