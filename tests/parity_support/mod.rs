//! The parity harness shared by tests/test_parity.rs (CPU) and tests/test_cuda.rs: the fixtures
//! of tests/fixtures (see test_parity.rs for what they hold and the tolerances), the optimizers
//! they name, and the run that compares every step.

use std::collections::BTreeMap;
use std::path::Path;

use caseopt::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, Backend, Bop, Bop2ndOrder,
    Bop2ndOrderConfig, BopConfig, Execution, NAdam, NAdamConfig, Optimizer, Param, RAdam,
    RAdamConfig, RmsProp, RmsPropConfig, Schedule, Sgd, SgdConfig, VarInfo,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The fixtures directory: `CASEOPT_FIXTURES` when set, because a test binary bundled by
/// scripts/gpu_bundle.sh runs on a machine where the build-time manifest path does not exist;
/// else this checkout's tests/fixtures.
pub fn fixtures_dir() -> std::path::PathBuf {
    match std::env::var_os("CASEOPT_FIXTURES") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn fixtures() -> (Value, BTreeMap<String, Tensor>) {
    let dir = fixtures_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("parity_cases.json")).unwrap())
            .unwrap();
    let tensors = Tensor::read_safetensors(dir.join("parity.safetensors")).unwrap();
    (meta, tensors.into_iter().collect())
}

fn f(config: &Value, key: &str) -> Option<Schedule> {
    config.get(key).and_then(Value::as_f64).map(Schedule::from)
}

fn b(config: &Value, key: &str) -> Option<bool> {
    config.get(key).and_then(Value::as_bool)
}

/// The optimizers with fused CPU kernels; the others take `Backend::Fused` as an error.
pub const FUSED: &[&str] = &["Bop", "Bop2ndOrder", "Adam", "AdamW"];

/// Boxes a built-in optimizer after choosing its backend.
fn boxed(backend: Backend, mut optimizer: impl Execution + Optimizer) -> Box<dyn Optimizer> {
    optimizer.set_backend(backend);
    Box::new(optimizer)
}

/// Builds the optimizer a fixture case names, from its torch-style keyword arguments, on
/// `backend`.
pub fn build(optimizer: &str, c: &Value, backend: Backend) -> Box<dyn Optimizer> {
    match optimizer {
        "SGD" => {
            let d = SgdConfig::default();
            boxed(
                backend,
                Sgd::new(SgdConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    momentum: f(c, "momentum").unwrap_or(d.momentum),
                    dampening: f(c, "dampening").unwrap_or(d.dampening),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    nesterov: b(c, "nesterov").unwrap_or(d.nesterov),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "Adam" => {
            let d = AdamConfig::default();
            boxed(
                backend,
                Adam::new(AdamConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    beta1: f(c, "beta1").unwrap_or(d.beta1),
                    beta2: f(c, "beta2").unwrap_or(d.beta2),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    amsgrad: b(c, "amsgrad").unwrap_or(d.amsgrad),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "AdamW" => {
            let d = AdamWConfig::default();
            boxed(
                backend,
                AdamW::new(AdamWConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    beta1: f(c, "beta1").unwrap_or(d.beta1),
                    beta2: f(c, "beta2").unwrap_or(d.beta2),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    amsgrad: b(c, "amsgrad").unwrap_or(d.amsgrad),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "RMSprop" => {
            let d = RmsPropConfig::default();
            boxed(
                backend,
                RmsProp::new(RmsPropConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    alpha: f(c, "alpha").unwrap_or(d.alpha),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    momentum: f(c, "momentum").unwrap_or(d.momentum),
                    centered: b(c, "centered").unwrap_or(d.centered),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "RAdam" => {
            let d = RAdamConfig::default();
            boxed(
                backend,
                RAdam::new(RAdamConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    beta1: f(c, "beta1").unwrap_or(d.beta1),
                    beta2: f(c, "beta2").unwrap_or(d.beta2),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    decoupled_weight_decay: b(c, "decoupled_weight_decay")
                        .unwrap_or(d.decoupled_weight_decay),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "NAdam" => {
            let d = NAdamConfig::default();
            boxed(
                backend,
                NAdam::new(NAdamConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    beta1: f(c, "beta1").unwrap_or(d.beta1),
                    beta2: f(c, "beta2").unwrap_or(d.beta2),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    momentum_decay: f(c, "momentum_decay").unwrap_or(d.momentum_decay),
                    decoupled_weight_decay: b(c, "decoupled_weight_decay")
                        .unwrap_or(d.decoupled_weight_decay),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "Adagrad" => {
            let d = AdagradConfig::default();
            boxed(
                backend,
                Adagrad::new(AdagradConfig {
                    lr: f(c, "lr").unwrap_or(d.lr),
                    lr_decay: f(c, "lr_decay").unwrap_or(d.lr_decay),
                    weight_decay: f(c, "weight_decay").unwrap_or(d.weight_decay),
                    initial_accumulator_value: c
                        .get("initial_accumulator_value")
                        .and_then(Value::as_f64)
                        .unwrap_or(d.initial_accumulator_value),
                    eps: f(c, "eps").unwrap_or(d.eps),
                    maximize: b(c, "maximize").unwrap_or(d.maximize),
                })
                .unwrap(),
            )
        }
        "Bop" => {
            let d = BopConfig::default();
            boxed(
                backend,
                Bop::new(BopConfig {
                    threshold: f(c, "threshold").unwrap_or(d.threshold),
                    gamma: f(c, "gamma").unwrap_or(d.gamma),
                })
                .unwrap(),
            )
        }
        "Bop2ndOrder" => {
            let d = Bop2ndOrderConfig::default();
            boxed(
                backend,
                Bop2ndOrder::new(Bop2ndOrderConfig {
                    threshold: f(c, "threshold").unwrap_or(d.threshold),
                    gamma: f(c, "gamma").unwrap_or(d.gamma),
                    sigma: f(c, "sigma").unwrap_or(d.sigma),
                })
                .unwrap(),
            )
        }
        other => panic!("fixture names unknown optimizer {other}"),
    }
}

/// Max over elements of |a - e| / max(|e|, 1).
pub fn scaled_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let scale = e.abs().clamp_min(1.0);
    ((a - &e).abs() / scale).max().double_value(&[])
}

/// Runs every fixture case of one dtype through the optimizers on `backend` (under
/// `Backend::Fused`, the cases of optimizers that have fused kernels) and returns the largest
/// scaled error per optimizer.
pub fn run_parity(
    dtype: &str,
    tol: f64,
    backend: Backend,
    device: Device,
) -> BTreeMap<String, f64> {
    let (meta, tensors) = fixtures();
    let steps = meta["steps"].as_u64().unwrap() as i64;
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let optimizer = case["optimizer"].as_str().unwrap();
        if backend == Backend::Fused && !FUSED.contains(&optimizer) {
            continue;
        }
        let mut opt = build(optimizer, &case["config"], backend);
        let keys: Vec<String> = (0..2).map(|j| format!("{name}.{dtype}.p{j}")).collect();
        let vars: Vec<Tensor> =
            keys.iter().map(|k| tensors[&format!("{k}.init")].to_device(device).copy()).collect();
        for (k, v) in keys.iter().zip(&vars) {
            let mut info = VarInfo::of(k.clone(), v);
            if optimizer.starts_with("Bop") {
                info = info.with_bits(1);
            }
            opt.add_param(Param::new(info, v.shallow_clone())).unwrap();
        }
        for t in 0..steps {
            let grads: Vec<Option<Tensor>> = keys
                .iter()
                .map(|k| {
                    let has = tensors[&format!("{k}.mask")].int64_value(&[t]) != 0;
                    has.then(|| tensors[&format!("{k}.grads")].get(t).to_device(device).copy())
                })
                .collect();
            opt.step_with_grads(&grads).unwrap();
            for (k, v) in keys.iter().zip(&vars) {
                let err = scaled_error(
                    &v.to_device(Device::Cpu),
                    &tensors[&format!("{k}.expected")].get(t),
                );
                let w = worst.entry(optimizer.to_string()).or_insert(0.0);
                *w = w.max(err);
                if err > tol || err.is_nan() {
                    failures.push(format!("{k} step {t}: scaled error {err:e} > {tol:e}"));
                }
            }
        }
        assert_eq!(opt.step_count(), steps as u64, "{name}");
    }
    for (opt, err) in &worst {
        println!("parity {device:?} {dtype} {backend:<5?} {opt:<12} max scaled error {err:.3e}");
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:#?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
    worst
}
