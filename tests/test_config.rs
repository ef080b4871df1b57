//! Bad configuration gets a typed error, never a panic, mirroring torch.optim's ValueErrors.

use caseopt::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, Bop, Bop2ndOrder,
    Bop2ndOrderConfig, BopConfig, Error, Optimizer, Param, RmsProp, RmsPropConfig, Schedule, Sgd,
    SgdConfig, VarInfo,
};
use tch::Tensor;

fn invalid(r: Result<impl std::fmt::Debug, Error>, name: &str) {
    match r {
        Err(Error::InvalidHyperparameter { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected InvalidHyperparameter for `{name}`, got {other:?}"),
    }
}

#[test]
fn negative_learning_rates_are_rejected_everywhere() {
    let lr = || Schedule::from(-1e-3);
    invalid(Sgd::new(SgdConfig { lr: lr(), ..Default::default() }), "lr");
    invalid(Adam::new(AdamConfig { lr: lr(), ..Default::default() }), "lr");
    invalid(AdamW::new(AdamWConfig { lr: lr(), ..Default::default() }), "lr");
    invalid(RmsProp::new(RmsPropConfig { lr: lr(), ..Default::default() }), "lr");
    invalid(Adagrad::new(AdagradConfig { lr: lr(), ..Default::default() }), "lr");
}

#[test]
fn bop_gamma_sigma_and_threshold_ranges() {
    for gamma in [0.0, -0.1, 1.5, f64::NAN] {
        invalid(Bop::new(BopConfig { gamma: gamma.into(), ..Default::default() }), "gamma");
    }
    assert!(Bop::new(BopConfig { gamma: 1.0.into(), ..Default::default() }).is_ok());
    invalid(Bop::new(BopConfig { threshold: (-1e-8).into(), ..Default::default() }), "threshold");
    assert!(Bop::new(BopConfig { threshold: 0.0.into(), ..Default::default() }).is_ok());
    for sigma in [0.0, 1.01] {
        invalid(
            Bop2ndOrder::new(Bop2ndOrderConfig { sigma: sigma.into(), ..Default::default() }),
            "sigma",
        );
    }
}

#[test]
fn betas_must_lie_in_zero_one() {
    invalid(Adam::new(AdamConfig { beta1: 1.0.into(), ..Default::default() }), "beta1");
    invalid(Adam::new(AdamConfig { beta2: (-0.1).into(), ..Default::default() }), "beta2");
    invalid(AdamW::new(AdamWConfig { beta2: 1.0.into(), ..Default::default() }), "beta2");
    assert!(Adam::new(AdamConfig { beta1: 0.0.into(), ..Default::default() }).is_ok());
}

#[test]
fn eps_must_be_positive() {
    invalid(Adam::new(AdamConfig { eps: 0.0.into(), ..Default::default() }), "eps");
    invalid(RmsProp::new(RmsPropConfig { eps: (-1.0).into(), ..Default::default() }), "eps");
    invalid(Adagrad::new(AdagradConfig { eps: 0.0.into(), ..Default::default() }), "eps");
}

#[test]
fn other_torch_value_errors() {
    invalid(Sgd::new(SgdConfig { momentum: (-0.9).into(), ..Default::default() }), "momentum");
    invalid(
        Sgd::new(SgdConfig { weight_decay: (-1.0).into(), ..Default::default() }),
        "weight_decay",
    );
    invalid(RmsProp::new(RmsPropConfig { alpha: (-0.5).into(), ..Default::default() }), "alpha");
    invalid(
        RmsProp::new(RmsPropConfig { momentum: (-0.5).into(), ..Default::default() }),
        "momentum",
    );
    invalid(
        Adagrad::new(AdagradConfig { lr_decay: (-0.5).into(), ..Default::default() }),
        "lr_decay",
    );
    invalid(
        Adagrad::new(AdagradConfig { initial_accumulator_value: -0.5, ..Default::default() }),
        "initial_accumulator_value",
    );
}

#[test]
fn nesterov_needs_momentum_and_no_dampening() {
    let no_momentum = Sgd::new(SgdConfig { nesterov: true, ..Default::default() });
    assert!(matches!(no_momentum, Err(Error::InvalidConfig { .. })), "{no_momentum:?}");
    let dampened = Sgd::new(SgdConfig {
        nesterov: true,
        momentum: 0.9.into(),
        dampening: 0.1.into(),
        ..Default::default()
    });
    assert!(matches!(dampened, Err(Error::InvalidConfig { .. })), "{dampened:?}");
    assert!(
        Sgd::new(SgdConfig { nesterov: true, momentum: 0.9.into(), ..Default::default() }).is_ok()
    );
}

#[test]
fn invalid_schedules_are_rejected() {
    let r = Adam::new(AdamConfig { lr: Schedule::step(0.1, 0.5, 0), ..Default::default() });
    assert!(matches!(r, Err(Error::InvalidSchedule { name: "lr", .. })), "{r:?}");
    let r = Adam::new(AdamConfig {
        lr: Schedule::piecewise(vec![5, 10], vec![0.1]),
        ..Default::default()
    });
    assert!(matches!(r, Err(Error::InvalidSchedule { name: "lr", .. })), "{r:?}");
}

#[test]
fn a_schedule_that_leaves_the_range_fails_the_step_and_changes_nothing() {
    let w = Tensor::from_slice(&[1.0f64, 2.0]);
    // lr goes negative from step 2 on.
    let lr = Schedule::custom(|t| 0.1 - 0.1 * t as f64);
    let mut sgd = Sgd::new(SgdConfig { lr, ..Default::default() }).unwrap();
    sgd.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let g = || Some(Tensor::from_slice(&[1.0f64, 1.0]));
    sgd.step_with_grads(&[g()]).unwrap();
    sgd.step_with_grads(&[g()]).unwrap(); // lr = 0
    let before = Vec::<f64>::try_from(&w).unwrap();
    let err = sgd.step_with_grads(&[g()]).unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter { name: "lr", .. }), "{err}");
    assert_eq!(Vec::<f64>::try_from(&w).unwrap(), before);
    assert_eq!(sgd.step_count(), 2);
}

#[test]
fn setting_hyperparameters_validates_and_names_unknown_ones() {
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    assert!(adam.set_hyperparameter("lr", (-1.0).into()).is_err());
    assert_eq!(adam.hyperparameter("lr").unwrap(), 1e-3, "a rejected value changes nothing");
    let err = adam.set_hyperparameter("learning_rate", 0.1.into()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`learning_rate`") && msg.contains("`lr`"), "{msg}");
    assert!(adam.hyperparameter("momentum").is_err());
}

#[test]
fn error_messages_name_optimizer_and_range() {
    let err = Bop::new(BopConfig { gamma: 2.0.into(), ..Default::default() }).unwrap_err();
    assert_eq!(err.to_string(), "invalid Bop hyperparameter `gamma`: 2 (expected in (0, 1])");
}
