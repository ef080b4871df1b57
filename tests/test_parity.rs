//! Parity with the references: torch.optim 2.13 for SGD, Adam, AdamW, RMSprop and Adagrad, and
//! design.md's formulas (larq 0.14) for Bop and Bop2ndOrder.
//!
//! The fixtures were produced once by `scripts/env.sh python tests/fixtures/gen_parity.py` (the
//! script is the exact PyTorch code behind every expected number) and are committed as data; no
//! Python runs here. Each case trains two variables for 60 steps on random gradients; the second
//! variable has no gradient at four of the steps. Every step's result is compared.
//!
//! Tolerance, per element: |ours - torch| <= tol * max(|torch|, 1) with tol 1e-12 for f64 and 1e-6
//! for f32. The scale floor of 1 keeps elements that pass through zero from turning a 1-ulp
//! difference into a huge relative one. Differences come from fused multiply-adds inside
//! libtorch's vectorised kernels (torch.optim calls `add(x, alpha=a)` and `addcdiv(.., value=v)`,
//! which tch cannot express with the same fused rounding). Bop's sign decisions are exact: its
//! reference uses the same torch ops in the same order.

use std::collections::BTreeMap;
use std::path::Path;

use caseopt::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, Backend, Bop, Bop2ndOrder,
    Bop2ndOrderConfig, BopConfig, Optimizer, Param, RmsProp, RmsPropConfig, Schedule, Sgd,
    SgdConfig, VarInfo,
};
use serde_json::Value;
use tch::{Kind, Tensor};

/// The fixtures directory: `CASEOPT_FIXTURES` when set, because a test binary bundled by
/// scripts/gpu_bundle.sh runs on a machine where the build-time manifest path does not exist;
/// else this checkout's tests/fixtures.
fn fixtures_dir() -> std::path::PathBuf {
    match std::env::var_os("CASEOPT_FIXTURES") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

fn fixtures() -> (Value, BTreeMap<String, Tensor>) {
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
const FUSED: &[&str] = &["Bop", "Bop2ndOrder", "Adam", "AdamW"];

/// `set_backend` is inherent to each optimizer type; this lets `build` call it on any of them.
trait WithBackend {
    fn boxed(self, backend: Backend) -> Box<dyn Optimizer>;
}

macro_rules! with_backend {
    ($($ty:ty),*) => {$(
        impl WithBackend for $ty {
            fn boxed(mut self, backend: Backend) -> Box<dyn Optimizer> {
                self.set_backend(backend);
                Box::new(self)
            }
        }
    )*};
}
with_backend!(Sgd, Adam, AdamW, RmsProp, Adagrad, Bop, Bop2ndOrder);

fn boxed(backend: Backend, optimizer: impl WithBackend) -> Box<dyn Optimizer> {
    optimizer.boxed(backend)
}

/// Builds the optimizer a fixture case names, from its torch-style keyword arguments, on
/// `backend`.
fn build(optimizer: &str, c: &Value, backend: Backend) -> Box<dyn Optimizer> {
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
fn scaled_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let scale = e.abs().clamp_min(1.0);
    ((a - &e).abs() / scale).max().double_value(&[])
}

/// Runs every fixture case of one dtype through the optimizers on `backend` (under
/// `Backend::Fused`, the cases of optimizers that have fused kernels) and returns the largest
/// scaled error per optimizer.
fn run_parity(dtype: &str, tol: f64, backend: Backend) -> BTreeMap<String, f64> {
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
        let vars: Vec<Tensor> = keys.iter().map(|k| tensors[&format!("{k}.init")].copy()).collect();
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
                    has.then(|| tensors[&format!("{k}.grads")].get(t).copy())
                })
                .collect();
            opt.step_with_grads(&grads).unwrap();
            for (k, v) in keys.iter().zip(&vars) {
                let err = scaled_error(v, &tensors[&format!("{k}.expected")].get(t));
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
        println!("parity {dtype} {backend:<5?} {opt:<12} max scaled error {err:.3e}");
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:#?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
    worst
}

// Each dtype on each path: the libtorch ops, the fused kernels (forced: a variable they could
// not take would fail the step), and the automatic choice. Bop and Bop2ndOrder are bit-exact on
// every path.

fn check(dtype: &str, tol: f64, backend: Backend) {
    let worst = run_parity(dtype, tol, backend);
    let expected = if backend == Backend::Fused { FUSED.len() } else { 7 };
    assert_eq!(worst.len(), expected, "every optimizer is covered: {worst:?}");
    assert_eq!(worst["Bop"], 0.0);
    assert_eq!(worst["Bop2ndOrder"], 0.0);
}

#[test]
fn parity_f64_torch_within_1e_12() {
    check("f64", 1e-12, Backend::Torch);
}

#[test]
fn parity_f64_fused_within_1e_12() {
    check("f64", 1e-12, Backend::Fused);
}

#[test]
fn parity_f64_auto_within_1e_12() {
    check("f64", 1e-12, Backend::Auto);
}

#[test]
fn parity_f32_torch_within_1e_6() {
    check("f32", 1e-6, Backend::Torch);
}

#[test]
fn parity_f32_fused_within_1e_6() {
    check("f32", 1e-6, Backend::Fused);
}

#[test]
fn parity_f32_auto_within_1e_6() {
    check("f32", 1e-6, Backend::Auto);
}

fn bop_once(threshold: f64, gamma: f64, w: &[f64], g: &[f64], backend: Backend) -> Vec<f64> {
    let w = Tensor::from_slice(w);
    let mut bop = Bop::new(BopConfig { threshold: threshold.into(), gamma: gamma.into() }).unwrap();
    bop.set_backend(backend);
    bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    bop.step_with_grads(&[Some(Tensor::from_slice(g))]).unwrap();
    Vec::<f64>::try_from(&w).unwrap()
}

#[test]
fn bop_worked_checks_from_design_hold_exactly() {
    for b in [Backend::Torch, Backend::Fused] {
        assert_eq!(
            bop_once(1e-8, 1e-4, &[1.0, -1.0, 1.0, -1.0], &[2e-4, 2e-4, -2e-4, 5e-5], b),
            vec![-1.0, -1.0, 1.0, -1.0]
        );
        assert_eq!(bop_once(0.5, 1.0, &[-1.0, 1.0], &[-0.5, 0.5], b), vec![1.0, 1.0]);
        assert_eq!(
            bop_once(0.05, 1.0, &[0.3, -0.2, 0.0], &[1.0, 1.0, 1.0], b),
            vec![-1.0, -1.0, 1.0]
        );
    }
}

#[test]
fn bop_exact_equality_gives_plus_one() {
    for b in [Backend::Torch, Backend::Fused] {
        // w * m == threshold exactly: the inner sign is 0, the outer sign maps 0 to +1.
        assert_eq!(bop_once(0.25, 1.0, &[1.0, -1.0], &[0.25, -0.25], b), vec![1.0, 1.0]);
        // and on both sides of it: above flips, below stays.
        assert_eq!(bop_once(0.25, 1.0, &[1.0, -1.0], &[0.5, 0.125], b), vec![-1.0, -1.0]);
    }
}

#[test]
fn bop2_worked_check() {
    for backend in [Backend::Torch, Backend::Fused] {
        // gamma = sigma = 1: m = g, v = g^2, signal = w * g / (|g| + 1e-10) ~= w * sign(g).
        let w = Tensor::from_slice(&[1.0f64, 1.0, -1.0]);
        let mut bop = Bop2ndOrder::new(Bop2ndOrderConfig {
            threshold: 0.5.into(),
            gamma: 1.0.into(),
            sigma: 1.0.into(),
        })
        .unwrap();
        bop.set_backend(backend);
        bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
        bop.step_with_grads(&[Some(Tensor::from_slice(&[3.0f64, -3.0, -1e-3]))]).unwrap();
        assert_eq!(Vec::<f64>::try_from(&w).unwrap(), vec![-1.0, 1.0, 1.0], "{backend:?}");
    }
}
