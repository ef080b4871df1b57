//! A router's step is all or nothing: whatever is wrong with the input of one rule (a schedule
//! that yields an invalid value at this step, a gradient of the wrong shape or dtype, a gradient
//! holding NaN), no optimizer moves, whichever rule it is in and whatever the
//! [`NonFinitePolicy`].

mod checkpoint_support;

use caseopt::{case_optimizer, Error, NonFinitePolicy, PathExt, Router, Schedule};
use checkpoint_support::{assert_refused_untouched, snapshot};
use tch::{nn, Device, Kind, Tensor};

case_optimizer! {
    struct One {
        _ => Bop<threshold: 1e-6, gamma: 1e-2>,
    }
}

case_optimizer! {
    struct Two {
        name("r0.*") => Bop<threshold: 1e-6, gamma: 1e-2>,
        _ => Adam<lr: 0.01>,
    }
}

case_optimizer! {
    struct Three {
        name("r0.*") => Bop<threshold: 1e-6, gamma: 1e-2>,
        name("r1.*") => Sgd<lr: 0.1, momentum: 0.9>,
        _ => Adam<lr: 0.01>,
    }
}

case_optimizer! {
    struct Four {
        name("r0.*") => Bop<threshold: 1e-6, gamma: 1e-2>,
        name("r1.*") => Adam<lr: 0.01>,
        name("r2.*") => RmsProp<lr: 0.01>,
        _ => Sgd<lr: 0.1, momentum: 0.9>,
    }
}

/// What is wrong with rule k's input.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Its first hyperparameter's schedule yields NaN from step 5 on.
    NanSchedule,
    /// Its variable's gradient is resized to 7 elements.
    WrongShape,
    /// Its variable's gradient is replaced by an f64 copy.
    WrongDtype,
    /// Its variable's gradient holds one NaN.
    NonFiniteGradient,
}

const FAULTS: [Fault; 4] =
    [Fault::NanSchedule, Fault::WrongShape, Fault::WrongDtype, Fault::NonFiniteGradient];
const POLICIES: [NonFinitePolicy; 3] =
    [NonFinitePolicy::Error, NonFinitePolicy::SkipStep, NonFinitePolicy::Proceed];

/// One variable `r{i}.w` per rule; rule 0's is 1-bit and large enough for Bop to stage its
/// step while checking the gradient.
fn model(rules: usize) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.sub("r0").binary().var("w", &[1024, 1025], nn::Init::Const(1.0));
    for i in 1..rules {
        let _ = root.sub(format!("r{i}")).var("w", &[3, 4], nn::Init::Const(0.5));
    }
    vs
}

/// Gives every variable a gradient (different at each `step`) through one backward pass.
fn set_grads(router: &mut impl Router, vs: &nn::VarStore, step: u64) {
    router.zero_grad();
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (_, t)) in variables.into_iter().enumerate() {
        let scale = 1e-3 * (1 + i as u64 + step) as f64;
        let sign = if step.is_multiple_of(2) { 1.0 } else { -1.0 };
        loss += (&t * (t.ones_like() * scale * sign)).sum(Kind::Float);
    }
    loss.backward();
}

fn gradient_of(vs: &nn::VarStore, variable: &str) -> Tensor {
    vs.variables()[variable].grad()
}

/// Trains `router` for five clean steps, injects `fault` into rule `k`'s input and checks that
/// the step is refused (or skipped) with nothing changed.
fn refuses_whole<R: Router>(build: fn(&nn::VarStore) -> R, rules: usize, k: usize, fault: Fault) {
    for policy in POLICIES {
        if matches!(fault, Fault::NonFiniteGradient) && policy == NonFinitePolicy::Proceed {
            // Proceed does not look, by definition.
            continue;
        }
        let vs = model(rules);
        let mut router = build(&vs);
        router.set_non_finite_policy(policy);
        for step in 0..5 {
            set_grads(&mut router, &vs, step);
            router.step().unwrap();
        }
        assert_eq!(router.step_counts(), vec![5; rules]);
        set_grads(&mut router, &vs, 5);
        let variable = format!("r{k}.w");
        let case = format!("{rules} rules, fault {fault:?} in rule {k}, {policy:?}");
        match fault {
            Fault::NanSchedule => {
                let optimizer = router.optimizer_mut(k).unwrap();
                let name = optimizer.hyperparameter_names()[0];
                let value = optimizer.hyperparameter(name).unwrap();
                let schedule = Schedule::custom(move |t| if t < 5 { value } else { f64::NAN });
                optimizer.set_hyperparameter(name, schedule).unwrap();
            }
            Fault::WrongShape => {
                let _ = gradient_of(&vs, &variable).resize_([7]);
            }
            Fault::WrongDtype => {
                let mut g = gradient_of(&vs, &variable);
                g.set_data(&g.to_kind(Kind::Double));
            }
            Fault::NonFiniteGradient => {
                let _ = gradient_of(&vs, &variable).flatten(0, -1).get(0).fill_(f64::NAN);
            }
        }
        let before = snapshot(&router);
        let skipped = router.skipped_steps();
        match (fault, policy) {
            (Fault::NonFiniteGradient, NonFinitePolicy::Error) => {
                assert_refused_untouched(&mut router, &variable);
            }
            (Fault::NonFiniteGradient, _) => {
                router.step().unwrap();
                assert_eq!(router.skipped_steps(), skipped + 1, "{case}");
                assert_eq!(snapshot(&router), before, "{case}: a skipped step changed something");
                continue;
            }
            (Fault::NanSchedule, _) => {
                let err = router.step().unwrap_err();
                assert!(matches!(err, Error::InvalidHyperparameter { .. }), "{case}: {err}");
            }
            (Fault::WrongShape | Fault::WrongDtype, _) => {
                let err = router.step().unwrap_err();
                assert!(
                    matches!(&err, Error::GradientMismatch { variable: v, .. } if *v == variable),
                    "{case}: {err}"
                );
            }
        }
        assert_eq!(snapshot(&router), before, "{case}: a refused step changed something");
        assert_eq!(router.step_counts(), vec![5; rules], "{case}");
        assert_eq!(router.skipped_steps(), skipped, "{case}");
    }
}

fn every_fault_in_every_rule<R: Router>(build: fn(&nn::VarStore) -> R, rules: usize) {
    for k in 0..rules {
        for fault in FAULTS {
            refuses_whole(build, rules, k, fault);
        }
    }
}

#[test]
fn one_rule() {
    every_fault_in_every_rule(|vs| One::build(vs).unwrap(), 1);
}

#[test]
fn two_rules() {
    every_fault_in_every_rule(|vs| Two::build(vs).unwrap(), 2);
}

#[test]
fn three_rules() {
    every_fault_in_every_rule(|vs| Three::build(vs).unwrap(), 3);
}

#[test]
fn four_rules() {
    every_fault_in_every_rule(|vs| Four::build(vs).unwrap(), 4);
}
