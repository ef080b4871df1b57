//! Training that survives bad input: non-finite gradients under each policy, variables without
//! gradients, variables added after the build, variables whose dtype or device changed, 1-bit
//! variables that do not hold +-1, zero-sized and frozen variables, and routers on threads.

mod checkpoint_support;

use caseopt::{case_optimizer, Error, NonFinitePolicy, PathExt, Router};
use checkpoint_support::{
    assert_refused_untouched, bop_adam, exact, model, snapshot, train, BopAdam, ModelSpec,
};
use tch::{nn, Device, Kind, Tensor};

/// Gives every trainable variable of `vs` the gradient `grad(name, tensor)` through one
/// backward pass (after zeroing the old ones); `None` leaves a variable out of the loss.
fn set_grads(
    router: &mut impl Router,
    vs: &nn::VarStore,
    grad: impl Fn(&str, &Tensor) -> Option<Tensor>,
) {
    router.zero_grad();
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for p in caseopt::trainable_vars(vs) {
        if let Some(g) = grad(&p.info.name, &p.tensor) {
            loss += (&p.tensor * g.detach()).sum(Kind::Float);
        }
    }
    loss.backward();
}

fn ones(_: &str, t: &Tensor) -> Option<Tensor> {
    Some(t.ones_like() * 1e-2)
}

fn poisoned(target: &'static str, value: f64) -> impl Fn(&str, &Tensor) -> Option<Tensor> {
    move |name, t| {
        let g = t.ones_like() * 1e-2;
        if name == target {
            // One element only: the check must find a single bad value in a tensor.
            let flat = g.flatten(0, -1);
            let _ = flat.get(0).fill_(value);
        }
        Some(g)
    }
}

#[test]
fn non_finite_gradients_are_refused_by_default_before_any_update() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..3, None);
    assert_eq!(r.non_finite_policy(), NonFinitePolicy::Error);
    // NaN in rule 1's variable, Inf in rule 0's: rule 0 comes first in the step, so it would
    // have been updated already if the check were per optimizer.
    for (target, value) in
        [("fc.bias", f64::NAN), ("fc.weight", f64::INFINITY), ("conv.weight", f64::NEG_INFINITY)]
    {
        set_grads(&mut r, &vs, poisoned(target, value));
        assert_refused_untouched(&mut r, target);
    }
    assert_eq!(r.skipped_steps(), 0);
    assert_eq!(r.step_counts(), vec![3, 3]);
}

#[test]
fn skip_step_leaves_everything_untouched_and_counts() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    r.set_non_finite_policy(NonFinitePolicy::SkipStep);
    train(&mut r, &vs, 0..2, None);
    set_grads(&mut r, &vs, poisoned("fc.bias", f64::NAN));
    let before = snapshot(&r);
    r.step().unwrap();
    r.step().unwrap();
    assert_eq!(snapshot(&r), before);
    assert_eq!(r.skipped_steps(), 2);
    // A clean step afterwards goes through.
    set_grads(&mut r, &vs, ones);
    r.step().unwrap();
    assert_eq!((r.step_counts(), r.skipped_steps()), (vec![3, 3], 2));
}

#[test]
fn proceed_does_what_torch_does() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    r.set_non_finite_policy(NonFinitePolicy::Proceed);
    set_grads(&mut r, &vs, poisoned("fc.bias", f64::NAN));
    r.step().unwrap();
    assert_eq!(r.step_counts(), vec![1, 1]);
    // Adam spreads the NaN into its element (torch.optim does the same); the others move.
    let bias = vs.variables()["fc.bias"].shallow_clone();
    let v = Vec::<f32>::try_from(&bias).unwrap();
    assert!(v[0].is_nan() && v[1..].iter().all(|x| x.is_finite()), "{v:?}");
}

#[test]
fn huge_but_finite_gradients_are_not_mistaken_for_infinity() {
    // Their f32 sum overflows; the exact check behind the fast one sees they are finite.
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    set_grads(&mut r, &vs, |_, t| Some(t.ones_like() * 3e38));
    r.step().unwrap();
    assert_eq!(r.step_counts(), vec![1, 1]);
}

#[test]
fn a_variable_without_a_gradient_is_skipped() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    let bias_before = exact(&vs.variables()["fc.bias"]);
    let conv_before = exact(&vs.variables()["conv.weight"]);
    set_grads(&mut r, &vs, |name, t| (name != "fc.bias").then(|| t.ones_like() * 1e-2));
    assert!(!vs.variables()["fc.bias"].grad().defined());
    r.step().unwrap();
    assert_eq!(exact(&vs.variables()["fc.bias"]), bias_before);
    let adam = r.optimizer(1).unwrap();
    assert!(adam.state(0).is_empty(), "no state for a variable never updated");
    assert_ne!(exact(&vs.variables()["conv.weight"]), conv_before);
    assert_eq!(r.step_counts(), vec![1, 1]);
}

#[test]
fn variables_added_after_the_build_are_routed_on_the_next_step() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..2, None);
    let late_bias = vs.root().sub("late").var("bias", &[3], nn::Init::Const(0.5));
    let late_kernel = vs.root().sub("late").binary().var("kernel", &[2, 2], nn::Init::Const(1.0));
    set_grads(&mut r, &vs, ones);
    r.step().unwrap();
    let table = r.routing_table();
    assert_eq!(table.rule_of("late.bias").map(|x| x.optimizer), Some("Adam"));
    assert_eq!(table.rule_of("late.kernel").map(|x| x.optimizer), Some("Bop"));
    assert_eq!(table.routes().len(), 5);
    // Updated in this very step.
    assert!(Vec::<f32>::try_from(&late_bias).unwrap().iter().all(|&x| x < 0.5));
    let names: Vec<&str> =
        r.optimizer(0).unwrap().params().iter().map(|p| p.info.name.as_str()).collect();
    assert!(names.contains(&"late.kernel"), "{names:?}");
    let _ = late_kernel;
}

#[test]
fn a_late_variable_claimed_by_two_rules_is_an_error_naming_it_every_step() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.sub("a").binary().var("w", &[2], nn::Init::Const(1.0));
    let _ = root.sub("late").var("b", &[2], nn::Init::Const(0.0));
    let _ = root.var("c", &[2], nn::Init::Const(0.0));
    let mut r = case_optimizer! {
        binary => Bop,
        name("late.*") => Sgd<lr: 0.1>,
        _ => Adam,
    }
    .build(&vs)
    .unwrap();
    let _ = root.sub("late").binary().var("both", &[2], nn::Init::Const(1.0));
    set_grads(&mut r, &vs, ones);
    let before = snapshot(&r);
    for _ in 0..2 {
        let err = r.step().unwrap_err();
        assert!(
            matches!(&err, Error::OverlappingRules { variable, .. } if variable == "late.both"),
            "{err}"
        );
        assert_eq!(snapshot(&r), before);
        assert!(r.routing_table().route("late.both").is_none());
    }
}

#[test]
fn a_variable_whose_dtype_changed_after_the_build_is_an_error_naming_it() {
    let mut vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..1, None);
    vs.set_kind(Kind::Double);
    let before = snapshot(&r);
    let err = r.step().unwrap_err();
    match &err {
        Error::VariableChanged { variable, was, now } => {
            assert_eq!(variable, "conv.weight");
            assert!(was.contains("Float") && now.contains("Double"), "{was} / {now}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(snapshot(&r).step_counts, before.step_counts);
}

#[test]
fn a_variable_moved_to_another_device_after_the_build_is_an_error_naming_it() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device (the dtype case above takes the same path on the CPU)");
        return;
    }
    let mut vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..1, None);
    vs.set_device(Device::Cuda(0));
    let err = r.step().unwrap_err();
    match &err {
        Error::VariableChanged { variable, was, now } => {
            assert_eq!(variable, "conv.weight");
            assert!(was.contains("Cpu") && now.contains("Cuda"), "{was} / {now}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(r.step_counts(), vec![1, 1]);
}

#[test]
fn binary_variables_that_are_not_plus_minus_one_are_binarised_with_one_warning() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = root
        .sub("conv")
        .binary()
        .var_copy("weight", &Tensor::from_slice(&[0.3f32, -0.2, 0.0, 1.0]));
    let ok = root.sub("fc").binary().var("weight", &[2], nn::Init::Const(-1.0));
    let _b = root.sub("fc").var("bias", &[2], nn::Init::Const(0.0));
    let mut r = bop_adam(&vs);
    set_grads(&mut r, &vs, |_, t| Some(t.zeros_like()));
    r.step().unwrap();
    // larq: sign(-sign(w*m - threshold) * w) with m = 0 is sign(w) with sign(0) = +1.
    assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![1.0, -1.0, 1.0, 1.0]);
    assert_eq!(r.binarised_variables(), vec!["conv.weight".to_string()]);
    r.step().unwrap();
    assert_eq!(r.binarised_variables().len(), 1, "warned once");
    let _ = ok;
}

#[test]
fn latent_weights_under_adam_are_not_reported_as_binarised() {
    let vs = nn::VarStore::new(Device::Cpu);
    let values = [0.3f32, -0.2, 0.0, 1.0];
    let w = vs.root().sub("conv").binary().var_copy("weight", &Tensor::from_slice(&values));
    let mut r = case_optimizer! {
        binary => Adam<lr: 0.1>,
    }
    .build(&vs)
    .unwrap();
    set_grads(&mut r, &vs, |_, t| Some(t.zeros_like()));
    r.step().unwrap();
    assert!(r.binarised_variables().is_empty(), "{:?}", r.binarised_variables());
    // Adam trained the real values as they are (a zero gradient moves nothing).
    assert_eq!(Vec::<f32>::try_from(&w).unwrap(), values);
}

#[test]
fn zero_sized_variables_train_under_every_policy() {
    for policy in [NonFinitePolicy::Error, NonFinitePolicy::SkipStep, NonFinitePolicy::Proceed] {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root.sub("empty").binary().var("w", &[0, 4], nn::Init::Const(1.0));
        let _ = root.sub("empty").var("b", &[0], nn::Init::Const(0.0));
        let b = root.var("b", &[2], nn::Init::Const(0.0));
        let mut r = bop_adam(&vs);
        r.set_non_finite_policy(policy);
        set_grads(&mut r, &vs, ones);
        r.step().unwrap();
        r.step().unwrap();
        assert_eq!(r.step_counts(), vec![2, 2]);
        assert!(Vec::<f32>::try_from(&b).unwrap().iter().all(|&x| x < 0.0));
    }
}

#[test]
fn a_frozen_variable_is_skipped_even_with_a_stale_gradient() {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    set_grads(&mut r, &vs, ones);
    // Frozen after its gradient was computed: the gradient is still there.
    let bias = vs.variables()["fc.bias"].shallow_clone();
    let _ = bias.set_requires_grad(false);
    assert!(bias.grad().defined());
    let before = exact(&bias);
    r.step().unwrap();
    assert_eq!(exact(&bias), before);
    assert!(r.optimizer(1).unwrap().state(0).is_empty());
    assert_eq!(r.step_counts(), vec![1, 1]);
}

#[test]
fn routers_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<BopAdam>();
    assert_send::<Box<dyn Router>>();
}

#[test]
fn two_routers_on_two_threads_do_not_interfere() {
    let run = |seed: u64| {
        let vs = model(&ModelSpec { seed, ..Default::default() });
        let mut r = bop_adam(&vs);
        train(&mut r, &vs, seed * 100..seed * 100 + 30, Some(seed * 100 + 10));
        (snapshot(&r), checkpoint_support::model_values(&vs))
    };
    let sequential = (run(1), run(2));
    let threads = std::thread::scope(|s| {
        let a = s.spawn(|| run(1));
        let b = s.spawn(|| run(2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(threads, sequential);
    assert_ne!(sequential.0, sequential.1);
}

#[test]
fn the_search_names_the_right_variable_among_many_small_and_large_ones() {
    // 40 small variables (summed in concatenated batches), two large ones (summed alone), in
    // f32 and f64: a single bad element anywhere is found and named, the first in rule order
    // when there are several.
    for kind in [Kind::Float, Kind::Double] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        for i in 0..40 {
            let _ = root.sub("small").var(&format!("p{i:02}"), &[7 + i], nn::Init::Const(0.0));
        }
        let _ = root.sub("large").var("a", &[300, 300], nn::Init::Const(0.0));
        let _ = root.sub("large").binary().var("b", &[70_000], nn::Init::Const(1.0));
        vs.set_kind(kind);
        let mut r = bop_adam(&vs);
        for target in ["small.p00", "small.p23", "small.p39", "large.a", "large.b"] {
            set_grads(&mut r, &vs, poisoned(target, f64::NAN));
            let err = r.step().unwrap_err();
            assert!(
                matches!(&err, Error::NonFiniteGradient { variable } if variable == target),
                "{kind:?} {target}: {err}"
            );
        }
        // Two bad variables: rule 0 (Bop, `large.b`) comes before rule 1.
        set_grads(&mut r, &vs, |name, t| {
            let g = t.ones_like();
            if name == "small.p05" || name == "large.b" {
                let _ = g.flatten(0, -1).get(3).fill_(f64::INFINITY);
            }
            Some(g)
        });
        let err = r.step().unwrap_err();
        assert!(
            matches!(&err, Error::NonFiniteGradient { variable } if variable == "large.b"),
            "{err}"
        );
        assert_eq!(r.step_counts(), vec![0, 0]);
    }
}
