//! Constraints (larq's `weight_clip`) and flip ratios, through routers.
//!
//! A constrained step must be exactly an unconstrained step followed by `clamp_` (on both
//! backends, in f32 and f64, per variable and per rule), a refused step must clip nothing, and
//! bad input is a typed error. The flip ratios the kernels count must equal a count of sign
//! changes done with tensor ops, on the libtorch path, the fused kernels and the staged step.

mod checkpoint_support;

use caseopt::{case_optimizer, Backend, Constraint, Error, Execution, PathExt, Router};
use checkpoint_support::{assert_refused_untouched, snapshot, Rng};
use tch::{nn, Device, Kind, Tensor};

case_optimizer! {
    struct Latent {
        binary => Adam<lr: 0.05>,
        _ => AdamW<lr: 0.05, weight_decay: 0.01>,
    }
}

case_optimizer! {
    struct LatentSgd {
        _ => Sgd<lr: 0.5, momentum: 0.9>,
    }
}

case_optimizer! {
    struct Binary {
        binary & ndim(2) => Bop<threshold: 1e-7, gamma: 1e-1>,
        binary & ndim(1) => Bop2ndOrder<threshold: 1e-6, gamma: 1e-1, sigma: 1e-2>,
        _ => Adam<lr: 0.01>,
    }
}

/// `n` values uniform in [-1, 1), or signs of them.
fn values(n: i64, rng: &mut Rng, signs: bool) -> Tensor {
    let v: Vec<f32> = (0..n)
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
}

/// A model of `kind`: latent (or +-1 with `signs`) binary kernels and a real bias; with
/// `big`, a binary kernel large enough for Bop to stage its steps (2^20 elements and more).
fn model(kind: Kind, signs: bool, big: bool) -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(kind);
    let root = vs.root();
    let mut rng = Rng::new(3);
    let mut add = |path: &nn::Path, name: &str, shape: &[i64], signs: bool| {
        let n: i64 = shape.iter().product();
        let init = values(n, &mut rng, signs).view(shape);
        let _ = path.var_copy(name, &init);
    };
    add(&root.binary(), "k", &[40, 25], signs);
    add(&root.binary(), "v", &[37], signs);
    add(&root, "b", &[50], false);
    if big {
        add(&root.binary(), "big", &[1024, 1025], signs);
    }
    vs
}

/// Sets every variable's gradient to deterministic noise for `step` (with a NaN at the end of
/// `poison`, if given).
fn set_grads<R: Router>(r: &mut R, vs: &nn::VarStore, step: u64, poison: Option<&str>) {
    r.zero_grad();
    let mut names: Vec<_> = vs.variables().into_iter().collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    let mut rng = Rng::new(100 + step);
    let mut loss = Tensor::zeros([], (vs.kind(), Device::Cpu));
    for (name, t) in names {
        let g = values(t.numel() as i64, &mut rng, false).to_kind(t.kind()) * 0.5;
        if poison == Some(name.as_str()) {
            let _ = g.get(t.numel() as i64 - 1).fill_(f64::NAN);
        }
        loss += (&t * g.view(t.size().as_slice())).sum(t.kind());
    }
    loss.backward();
}

/// Clamps the named variables of `vs` to `[-clip, clip]`, as torch would after the step.
fn clamp(vs: &nn::VarStore, names: &[(&str, f64)]) {
    let _guard = tch::no_grad_guard();
    for (name, t) in vs.variables() {
        if let Some((_, c)) = names.iter().find(|(n, _)| *n == name) {
            let _ = t.shallow_clone().clamp_(-c, *c);
        }
    }
}

/// The backends the constraint must agree on: the libtorch path, and the fused kernels where
/// the build has them (`fused` feature).
const BACKENDS: &[Backend] =
    if cfg!(feature = "fused") { &[Backend::Torch, Backend::Fused] } else { &[Backend::Torch] };

fn set_backend_latent(r: &mut Latent, backend: Backend) {
    r.rule0_mut().set_backend(backend);
    r.rule1_mut().set_backend(backend);
}

#[test]
fn a_clipped_step_is_the_unclipped_step_then_clamp_on_both_backends() {
    for &backend in BACKENDS {
        for kind in [Kind::Float, Kind::Double] {
            for per_rule in [false, true] {
                let case = format!("{backend:?} {kind:?} per rule {per_rule}");
                let (vs_c, vs_p) = (model(kind, false, false), model(kind, false, false));
                let mut clipped = Latent::build(&vs_c).unwrap();
                let mut plain = Latent::build(&vs_p).unwrap();
                set_backend_latent(&mut clipped, backend);
                set_backend_latent(&mut plain, backend);
                let half = Constraint::weight_clip(0.5).unwrap();
                // The binary kernels at 0.5, per rule or each; the bias (AdamW) at 0.3.
                let clips: [(&str, f64); 3] = [("k", 0.5), ("v", 0.5), ("b", 0.3)];
                if per_rule {
                    clipped.set_rule_constraint(0, Some(half)).unwrap();
                } else {
                    clipped.set_constraint("k", Some(half)).unwrap();
                    clipped.set_constraint("v", Some(half)).unwrap();
                }
                clipped.set_constraint("b", Some(Constraint::weight_clip(0.3).unwrap())).unwrap();
                assert_eq!(clipped.constraint("k"), Some(half));
                assert_eq!(clipped.rule_constraint(0), per_rule.then_some(half));
                for step in 0..5 {
                    set_grads(&mut clipped, &vs_c, step, None);
                    set_grads(&mut plain, &vs_p, step, None);
                    clipped.step().unwrap();
                    plain.step().unwrap();
                    clamp(&vs_p, &clips);
                    assert_eq!(snapshot(&clipped), snapshot(&plain), "{case}, step {step}");
                }
                // The clip did something: values sit at the bound, and the unconstrained
                // router's own values went past it before its clamp.
                let k = vs_c.variables()["k"].abs();
                let at_bound = k.eq(0.5).sum(Kind::Int64).int64_value(&[]);
                assert!(at_bound > 0, "{case}: nothing was clipped");
                assert!(k.max().double_value(&[]) <= 0.5, "{case}");
            }
        }
    }
}

#[test]
fn optimizers_without_kernels_clamp_after_their_libtorch_update() {
    for kind in [Kind::Float, Kind::Double] {
        let (vs_c, vs_p) = (model(kind, false, false), model(kind, false, false));
        let mut clipped = LatentSgd::build(&vs_c).unwrap();
        let mut plain = LatentSgd::build(&vs_p).unwrap();
        clipped.set_rule_constraint(0, Some(Constraint::weight_clip(0.8).unwrap())).unwrap();
        for step in 0..4 {
            set_grads(&mut clipped, &vs_c, step, None);
            set_grads(&mut plain, &vs_p, step, None);
            clipped.step().unwrap();
            plain.step().unwrap();
            clamp(&vs_p, &[("k", 0.8), ("v", 0.8), ("b", 0.8)]);
            assert_eq!(snapshot(&clipped), snapshot(&plain), "{kind:?} step {step}");
        }
    }
}

#[test]
fn removing_a_constraint_falls_back_to_the_rule_and_new_settings_apply_next_step() {
    let vs = model(Kind::Float, false, false);
    let mut r = Latent::build(&vs).unwrap();
    let (one, half) =
        (Constraint::weight_clip(1.0).unwrap(), Constraint::weight_clip(0.5).unwrap());
    r.set_rule_constraint(0, Some(one)).unwrap();
    r.set_constraint("k", Some(half)).unwrap();
    assert_eq!(
        (r.constraint("k"), r.constraint("v"), r.constraint("b")),
        (Some(half), Some(one), None)
    );
    r.set_constraint("k", None).unwrap();
    assert_eq!(r.constraint("k"), Some(one));
    r.set_rule_constraint(0, None).unwrap();
    assert_eq!((r.constraint("k"), r.rule_constraint(0)), (None, None));
    // Each optimizer holds what the router handed it.
    assert_eq!(r.optimizer(0).unwrap().constraint(0), None);
    r.set_rule_constraint(0, Some(half)).unwrap();
    assert_eq!(r.optimizer(0).unwrap().constraint(0), Some(half));
}

#[test]
fn a_refused_or_skipped_step_clips_nothing() {
    let vs = model(Kind::Float, false, false);
    let mut r = Latent::build(&vs).unwrap();
    // Values outside the bound, which any step would clip.
    r.set_rule_constraint(0, Some(Constraint::weight_clip(0.1).unwrap())).unwrap();
    r.set_constraint("b", Some(Constraint::weight_clip(0.1).unwrap())).unwrap();
    for variable in ["b", "k"] {
        set_grads(&mut r, &vs, 0, Some(variable));
        assert_refused_untouched(&mut r, variable);
    }
    r.set_non_finite_policy(caseopt::NonFinitePolicy::SkipStep);
    set_grads(&mut r, &vs, 0, Some("v"));
    let before = snapshot(&r);
    r.step().unwrap();
    assert_eq!(snapshot(&r), before);
    assert!(vs.variables()["k"].abs().max().double_value(&[]) > 0.1);
    // The next clean step clips.
    set_grads(&mut r, &vs, 1, None);
    r.step().unwrap();
    for name in ["k", "v", "b"] {
        // The bound as f32 rounds it.
        let bound = f64::from(0.1f32);
        assert!(vs.variables()[name].abs().max().double_value(&[]) <= bound, "{name}");
    }
}

#[test]
fn bad_constraints_and_unknown_names_are_typed_errors_that_change_nothing() {
    for bad in [-1.0, f64::NAN, -f64::INFINITY] {
        let err = Constraint::weight_clip(bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConstraint { constraint: "weight_clip", name: "clip_value", .. }
            ),
            "{err}"
        );
    }
    assert!(Constraint::weight_clip(0.0).is_ok() && Constraint::weight_clip(f64::INFINITY).is_ok());
    let vs = model(Kind::Float, false, false);
    let mut r = Latent::build(&vs).unwrap();
    let half = Constraint::weight_clip(0.5).unwrap();
    r.set_constraint("k", Some(half)).unwrap();
    let raw = Constraint::WeightClip { clip_value: -0.5 };
    assert!(matches!(r.set_constraint("k", Some(raw)), Err(Error::InvalidConstraint { .. })));
    assert!(matches!(r.set_rule_constraint(1, Some(raw)), Err(Error::InvalidConstraint { .. })));
    assert_eq!(r.constraint("k"), Some(half));
    assert_eq!(r.rule_constraint(1), None);
    let err = r.set_constraint("missing", Some(half)).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownVariable { variable, .. } if variable == "missing"),
        "{err}"
    );
    assert_eq!(err.to_string(), "no variable `missing` is trained here");
    let err = r.set_rule_constraint(2, Some(half)).unwrap_err();
    assert!(matches!(err, Error::NoSuchRule { rule: 2, rules: 2 }), "{err}");
    assert_eq!(r.constraint("missing"), None);
}

/// Each variable's sign changes between two copies, counted with tensor ops.
fn sign_changes(before: &[(String, Tensor)], vs: &nn::VarStore) -> Vec<(String, i64)> {
    let now = vs.variables();
    before
        .iter()
        .map(|(name, b)| {
            let changed = b.lt(0.0).ne_tensor(&now[name].lt(0.0)).sum(Kind::Int64);
            (name.clone(), changed.int64_value(&[]))
        })
        .collect()
}

fn set_backend_binary(r: &mut Binary, backend: Backend) {
    r.rule0_mut().set_backend(backend);
    r.rule1_mut().set_backend(backend);
    r.rule2_mut().set_backend(backend);
}

#[test]
fn flip_ratios_equal_a_count_of_sign_changes_on_every_path() {
    // Libtorch, fused in place (no non-finite check: nothing staged), fused staged (the default
    // check with a variable of 2^20 elements), in f32 and f64 (f64 is never staged).
    let cases = [
        (Backend::Torch, Kind::Float, false, true),
        (Backend::Torch, Kind::Double, false, false),
        (Backend::Fused, Kind::Float, false, false),
        (Backend::Fused, Kind::Double, false, false),
        (Backend::Fused, Kind::Float, true, true),
        (Backend::Auto, Kind::Float, true, true),
    ];
    // Without the `fused` feature there are no kernels: `Fused` would refuse every step.
    let cases = cases.into_iter().filter(|c| cfg!(feature = "fused") || c.0 != Backend::Fused);
    for (backend, kind, big, checked) in cases {
        let case = format!("{backend:?} {kind:?} big {big} checked {checked}");
        let vs = model(kind, true, big);
        let mut r = Binary::build(&vs).unwrap();
        set_backend_binary(&mut r, backend);
        if !checked {
            r.set_non_finite_policy(caseopt::NonFinitePolicy::Proceed);
        }
        assert_eq!(r.flip_ratios().unwrap(), None, "{case}: before the first step");
        let mut flipped_some = false;
        for step in 0..4 {
            set_grads(&mut r, &vs, step, None);
            // The binary optimizers' variables, in rule order, copied before the step.
            let binary: Vec<(String, Tensor)> = (0..2)
                .flat_map(|rule| r.optimizer(rule).unwrap().params())
                .map(|p| (p.info.name.clone(), p.tensor.copy()))
                .collect();
            r.step().unwrap();
            let ratios = r.flip_ratios().unwrap().expect("a step was taken");
            let counts = sign_changes(&binary, &vs);
            let names: Vec<&str> = ratios.per_variable.iter().map(|(n, _)| n.as_str()).collect();
            let want: Vec<&str> = counts.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, want, "{case}");
            let mut total = (0i64, 0i64);
            for ((name, ratio), (_, count)) in ratios.per_variable.iter().zip(&counts) {
                let n = vs.variables()[name].numel() as i64;
                assert_eq!(*ratio, *count as f64 / n as f64, "{case} step {step} {name}");
                total = (total.0 + count, total.1 + n);
                flipped_some |= *count > 0;
            }
            assert_eq!(
                (ratios.flipped, ratios.weights),
                (total.0 as u64, total.1 as u64),
                "{case}"
            );
            assert_eq!(ratios.total, total.0 as f64 / total.1 as f64, "{case}");
        }
        assert!(flipped_some, "{case}: the steps should flip weights");
    }
}

#[test]
fn flip_ratios_are_none_without_a_binary_optimizer() {
    let vs = model(Kind::Float, false, false);
    let mut r = LatentSgd::build(&vs).unwrap();
    set_grads(&mut r, &vs, 0, None);
    r.step().unwrap();
    assert_eq!(r.flip_ratios().unwrap(), None);
}

#[test]
fn a_clip_below_one_on_bop_is_its_step_then_clamp_and_a_clip_of_one_changes_nothing() {
    for &backend in BACKENDS {
        for clip in [0.5, 1.0] {
            let case = format!("{backend:?} clip {clip}");
            let (vs_c, vs_p) = (model(Kind::Float, true, false), model(Kind::Float, true, false));
            let mut clipped = Binary::build(&vs_c).unwrap();
            let mut plain = Binary::build(&vs_p).unwrap();
            set_backend_binary(&mut clipped, backend);
            set_backend_binary(&mut plain, backend);
            let c = Constraint::weight_clip(clip).unwrap();
            clipped.set_rule_constraint(0, Some(c)).unwrap();
            clipped.set_rule_constraint(1, Some(c)).unwrap();
            for step in 0..3 {
                set_grads(&mut clipped, &vs_c, step, None);
                set_grads(&mut plain, &vs_p, step, None);
                clipped.step().unwrap();
                plain.step().unwrap();
                clamp(&vs_p, &[("k", clip), ("v", clip)]);
                assert_eq!(snapshot(&clipped), snapshot(&plain), "{case} step {step}");
                // The flips are counted on the signs, whatever the clip made of the values.
                let (a, b) = (clipped.flip_ratios().unwrap(), plain.flip_ratios().unwrap());
                assert_eq!(a, b, "{case} step {step}");
            }
        }
    }
}
