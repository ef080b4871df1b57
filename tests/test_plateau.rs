//! The plateau schedule (`caseopt::Plateau`) against torch 2.13's `ReduceLROnPlateau` on
//! recorded metric sequences (tests/fixtures/gen_plateau.py), bit for bit; driving an optimizer
//! through `case_optimizer!`; its state through checkpoints (format version 2).

mod checkpoint_support;

use std::fs;

use caseopt::checkpoint::FORMAT_VERSION;
use caseopt::{
    case_optimizer, checkpoint_info, Adam, AdamConfig, Checkpoint, CheckpointError, Error, Plateau,
    PlateauConfig, PlateauMode, Router, ThresholdMode,
};
use checkpoint_support::{model, scratch_dir, snapshot, ModelSpec};
use serde_json::Value;
use tch::{nn, Tensor};

fn f64_bits(v: &Value) -> f64 {
    f64::from_bits(u64::from_str_radix(v.as_str().unwrap(), 16).unwrap())
}

fn config_of(case: &Value) -> PlateauConfig {
    let c = &case["config"];
    PlateauConfig {
        initial: f64_bits(&case["initial"]),
        mode: match c["mode"].as_str().unwrap() {
            "min" => PlateauMode::Min,
            _ => PlateauMode::Max,
        },
        factor: f64_bits(&c["factor"]),
        patience: c["patience"].as_u64().unwrap(),
        threshold: f64_bits(&c["threshold"]),
        threshold_mode: match c["threshold_mode"].as_str().unwrap() {
            "rel" => ThresholdMode::Rel,
            _ => ThresholdMode::Abs,
        },
        cooldown: c["cooldown"].as_u64().unwrap(),
        min_value: f64_bits(&c["min_lr"]),
        eps: f64_bits(&c["eps"]),
    }
}

/// Every case: after every report, the value and `best` have torch's bits and the counters
/// torch's values.
#[test]
fn plateau_matches_reduce_lr_on_plateau_bit_for_bit() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/plateau_cases.json");
    let meta: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let mut reductions = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let plateau = Plateau::new(config_of(case));
        let schedule = plateau.schedule();
        let metrics = case["metrics"].as_array().unwrap();
        for (t, (m, after)) in metrics.iter().zip(case["after"].as_array().unwrap()).enumerate() {
            reductions += usize::from(plateau.report(f64_bits(m)));
            let s = plateau.state();
            let what = format!("{name} report {t}");
            assert_eq!(schedule.value(0).to_bits(), f64_bits(&after["lr"]).to_bits(), "{what}");
            assert_eq!(s.best.to_bits(), f64_bits(&after["best"]).to_bits(), "{what}: best");
            assert_eq!(s.num_bad_epochs, after["num_bad_epochs"].as_u64().unwrap(), "{what}");
            assert_eq!(s.cooldown_counter, after["cooldown_counter"].as_u64().unwrap(), "{what}");
            assert_eq!(s.last_epoch, after["last_epoch"].as_u64().unwrap(), "{what}");
        }
    }
    assert!(reductions >= 20, "the cases reduce often: {reductions}");
}

/// A rule's learning rate follows the plateau the user reports to.
#[test]
fn a_rule_takes_a_plateau_and_the_next_step_uses_its_value() {
    let vs = model(&ModelSpec::default());
    let plateau = Plateau::new(PlateauConfig { initial: 0.1, patience: 0, ..Default::default() });
    let mut router = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-2>,
        _ => Sgd<lr: (plateau.schedule())>,
    }
    .build(&vs)
    .unwrap();
    let sgd = |r: &dyn Router| r.optimizer(1).unwrap().hyperparameter("lr").unwrap();
    assert_eq!(sgd(&router), 0.1);
    plateau.report(1.0);
    plateau.report(2.0); // no improvement, patience 0: lowered
    assert!((sgd(&router) - 0.01).abs() < 1e-17);
    // The step runs with the lowered value: b - 0.01 * 1.
    let b = vs.variables()["fc.bias"].shallow_clone();
    let before = b.copy();
    router.backward_step(&b.sum(b.kind())).unwrap();
    let moved: f64 = (&before - &b).mean(b.kind()).double_value(&[]);
    assert!((moved - 0.01).abs() < 1e-7, "{moved}");
}

/// Settings out of range are refused where the plateau is used, as every schedule's are.
#[test]
fn invalid_settings_are_refused() {
    for config in [
        PlateauConfig { factor: 1.0, ..Default::default() },
        PlateauConfig { factor: -0.5, ..Default::default() },
        PlateauConfig { threshold: f64::NAN, ..Default::default() },
        PlateauConfig { min_value: -1.0, ..Default::default() },
    ] {
        let lr = Plateau::new(config).schedule();
        let err = Adam::new(AdamConfig { lr, ..Default::default() }).unwrap_err();
        assert!(matches!(err, Error::InvalidSchedule { name: "lr", .. }), "{err}");
    }
}

case_optimizer! {
    struct SgdRouter {
        binary => Bop<threshold: 1e-6, gamma: 1e-2>,
        _ => Sgd<lr: 0.1, momentum: 0.9>,
    }
}

/// A router whose SGD learning rate is `plateau`'s.
fn with_plateau(vs: &nn::VarStore, plateau: &Plateau) -> SgdRouter {
    let mut r = SgdRouter::build(vs).unwrap();
    r.optimizer_mut(1).unwrap().set_hyperparameter("lr", plateau.schedule()).unwrap();
    r
}

/// Epochs of 3 steps each with a metric reported after each (a loss that stalls).
fn epochs(router: &mut SgdRouter, plateau: &Plateau, vs: &nn::VarStore, from: u64, to: u64) {
    let vars: Vec<Tensor> = caseopt::trainable_vars(vs).into_iter().map(|p| p.tensor).collect();
    for epoch in from..to {
        for step in 0..3 {
            let mut loss = Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
            for (i, t) in vars.iter().enumerate() {
                let g = ((epoch * 3 + step + i as u64) % 7) as f64 * 1e-2 - 0.03;
                loss += (t * g).sum(t.kind());
            }
            router.backward_step(&loss).unwrap();
        }
        plateau.report(1.0 / (1.0 + epoch.min(4) as f64));
    }
}

fn settings() -> PlateauConfig {
    PlateauConfig { initial: 0.1, factor: 0.5, patience: 1, cooldown: 1, ..Default::default() }
}

/// Saved mid-run (after reductions, inside a cooldown), loaded into a fresh router with a fresh
/// plateau of the same settings: the plateau's state and every value continue exactly as the
/// uninterrupted run.
#[test]
fn the_plateaus_state_resumes_through_a_checkpoint() {
    let spec = ModelSpec::default();
    let vs = model(&spec);
    let plateau = Plateau::new(settings());
    let mut straight = with_plateau(&vs, &plateau);
    epochs(&mut straight, &plateau, &vs, 0, 12);

    let dir = scratch_dir("plateau");
    let path = dir.join("ckpt.safetensors");
    let vs1 = model(&spec);
    let first_plateau = Plateau::new(settings());
    let mut first = with_plateau(&vs1, &first_plateau);
    epochs(&mut first, &first_plateau, &vs1, 0, 7);
    let saved = first_plateau.state();
    assert!(saved.value < 0.1 && saved.cooldown_counter + saved.num_bad_epochs > 0, "{saved:?}");
    first.save_checkpoint(&path).unwrap();
    assert_eq!(checkpoint_info(&path).unwrap().version, FORMAT_VERSION);
    assert_eq!(FORMAT_VERSION, 2);
    drop(first); // one router per variable at a time

    let second_plateau = Plateau::new(settings());
    let mut second = with_plateau(&vs1, &second_plateau);
    second.load_checkpoint(&path).unwrap();
    assert_eq!(second_plateau.state(), saved, "restored into the user's handle too");
    epochs(&mut second, &second_plateau, &vs1, 7, 12);
    assert_eq!(second_plateau.state(), plateau.state());
    assert_eq!(snapshot(&second), snapshot(&straight));
    drop(second);

    // Other settings, or a constant, in the loading router: refused, nothing changed.
    let other = Plateau::new(PlateauConfig { patience: 2, ..settings() });
    let mut r = with_plateau(&vs1, &other);
    let err = r.load_checkpoint(&path).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::BadCheckpoint { problem: CheckpointError::Hyperparameter { .. }, .. }
        ),
        "{err}"
    );
    assert_eq!(other.state(), Plateau::new(settings()).state());
    drop(r);
    let mut constant = SgdRouter::build(&vs1).unwrap();
    assert!(constant.load_checkpoint(&path).is_err());
    fs::remove_dir_all(dir).unwrap();
}
