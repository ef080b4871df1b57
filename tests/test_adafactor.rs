//! Adafactor against torch.optim.Adafactor 2.13 (tests/fixtures/gen_adafactor.py), bit for bit,
//! on every backend, f32 and f64; its factored state in checkpoints; its config's checks.
//!
//! The fixtures hold one trajectory file per CPU capability ATen can run with (its reductions
//! and its `a + b * c` round per capability); each run compares the file of its own, and
//! `the_baseline_matches_torch_too` runs the comparison again in a child process under
//! `ATEN_CPU_CAPABILITY=default`.

mod checkpoint_support;

use std::collections::HashMap;
use std::fs;

use caseopt::{
    case_optimizer, Adafactor, AdafactorConfig, Backend, Error, Execution, Optimizer, Param,
    Schedule, VarInfo,
};
use checkpoint_support::{model, model_values, scratch_dir, snapshot, train, ModelSpec};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn meta() -> Value {
    serde_json::from_str(&fs::read_to_string(format!("{DIR}/adafactor_cases.json")).unwrap())
        .unwrap()
}

/// Exact equality of two tensors' bits (NaN payloads included).
fn same_bits(a: &Tensor, e: &Tensor) -> bool {
    if a.size() != e.size() || a.kind() != e.kind() {
        return false;
    }
    let bytes = |t: &Tensor| {
        let t = t.contiguous();
        let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut b, t.numel());
        b
    };
    bytes(a) == bytes(e)
}

fn config(c: &Value, case: &Value) -> AdafactorConfig {
    let d = AdafactorConfig::default();
    let f = |k: &str| c.get(k).and_then(Value::as_f64).map(Schedule::from);
    let lr = match case.get("lr_schedule").filter(|s| !s.is_null()) {
        Some(s) => Schedule::step(
            s["initial"].as_f64().unwrap(),
            s["gamma"].as_f64().unwrap(),
            s["step_size"].as_u64().unwrap(),
        ),
        None => f("lr").unwrap_or(d.lr),
    };
    AdafactorConfig {
        lr,
        beta2_decay: f("beta2_decay").unwrap_or(d.beta2_decay),
        eps1: c.get("eps1").and_then(Value::as_f64),
        eps2: f("eps2").unwrap_or(d.eps2),
        d: f("d").unwrap_or(d.d),
        weight_decay: f("weight_decay").unwrap_or(d.weight_decay),
        maximize: c.get("maximize").and_then(Value::as_bool).unwrap_or(d.maximize),
    }
}

/// Replays every case of `file` on `backend`; returns the mismatches.
fn replay(file: &str, backend: Backend) -> Vec<String> {
    let meta = meta();
    let tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(format!("{DIR}/{file}")).unwrap().into_iter().collect();
    let get = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("{k}")).shallow_clone();
    let steps = meta["steps"].as_i64().unwrap();
    let vars = meta["shapes"].as_array().unwrap().len();
    let mut failures = Vec::new();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for dtype in ["f32", "f64"] {
            let mut opt = Adafactor::new(config(&case["config"], case)).unwrap();
            opt.set_backend(backend);
            let inputs: Vec<String> = (0..vars).map(|j| format!("in.{dtype}.p{j}")).collect();
            let params: Vec<Tensor> =
                inputs.iter().map(|k| get(&format!("{k}.init")).copy()).collect();
            for (j, p) in params.iter().enumerate() {
                let info = VarInfo::of(format!("p{j}"), p);
                opt.add_param(Param::new(info, p.shallow_clone())).unwrap();
            }
            for t in 0..steps {
                let grads: Vec<Option<Tensor>> = inputs
                    .iter()
                    .map(|k| {
                        let has = get(&format!("{k}.mask")).int64_value(&[t]) != 0;
                        has.then(|| get(&format!("{k}.grads")).get(t).copy())
                    })
                    .collect();
                opt.step_with_grads(&grads).unwrap();
                for (j, p) in params.iter().enumerate() {
                    let e = get(&format!("{name}.{dtype}.p{j}.expected")).get(t);
                    if !same_bits(p, &e) {
                        failures.push(format!("{name} {dtype} p{j} step {t} on {backend:?}"));
                    }
                }
            }
            for j in 0..vars {
                for (state, t) in opt.state(j) {
                    let e = get(&format!("{name}.{dtype}.p{j}.{state}"));
                    let ok = if state == "step" {
                        e.double_value(&[]) == t.int64_value(&[]) as f64
                    } else {
                        same_bits(&t, &e)
                    };
                    if !ok {
                        failures.push(format!("{name} {dtype} p{j} state {state} on {backend:?}"));
                    }
                }
            }
        }
    }
    failures
}

/// Every case, f32 and f64, on every backend: each value after each step and the final state
/// (`row_var`, `col_var` or `variance`, `step`) are torch's bits.
#[test]
fn adafactor_matches_torch_bit_for_bit() {
    let capability = caseopt::__private::aten_cpu_capability();
    let Some(file) = meta()["files"][capability].as_str().map(String::from) else {
        println!("no Adafactor fixtures for CPU capability {capability}: not compared");
        return;
    };
    println!("Adafactor fixtures of capability {capability}: {file}");
    for backend in [Backend::Auto, Backend::Torch, Backend::MultiTensor] {
        let failures = replay(&file, backend);
        assert!(failures.is_empty(), "{} mismatches: {failures:#?}", failures.len());
    }
}

/// The same comparison in a child process whose ATen runs its baseline kernels.
#[test]
fn the_baseline_matches_torch_too() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "adafactor_matches_torch_bit_for_bit",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("ATEN_CPU_CAPABILITY", "default")
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed: {status}");
}

/// A router with Adafactor on `fc.weight` (a matrix: factored) and `fc.bias` (a vector: not)
/// saved after 20 steps and loaded into a fresh router and model resumes exactly as the
/// uninterrupted run.
#[test]
fn adafactor_resumes_bit_for_bit() {
    case_optimizer! {
        struct BopAdafactor {
            name("conv.*") => Bop<threshold: 1e-6, gamma: 1e-2>,
            _ => Adafactor<lr: 0.01, weight_decay: 0.1, d: 1.5>,
        }
    }
    let spec = ModelSpec::default();
    let vs = model(&spec);
    let mut straight = BopAdafactor::build(&vs).unwrap();
    train(&mut straight, &vs, 0..40, Some(10));

    let dir = scratch_dir("adafactor");
    let path = dir.join("ckpt.safetensors");
    let vs1 = model(&spec);
    let mut first = BopAdafactor::build(&vs1).unwrap();
    train(&mut first, &vs1, 0..20, Some(10));
    caseopt::save_training(&path, &vs1, &first).unwrap();
    drop(first);
    let vs2 = model(&ModelSpec { seed: 99, ..spec.clone() });
    let mut second = BopAdafactor::build(&vs2).unwrap();
    caseopt::load_training(&path, &vs2, &mut second).unwrap();
    let names: Vec<&str> = {
        let opt = second.optimizer(1).unwrap();
        (0..opt.params().len()).flat_map(|j| opt.state(j)).map(|(n, _)| n).collect()
    };
    assert!(names.contains(&"row_var") && names.contains(&"variance"), "{names:?}");
    train(&mut second, &vs2, 20..40, Some(10));

    assert_eq!(snapshot(&second), snapshot(&straight));
    assert_eq!(model_values(&vs2), model_values(&vs));
    fs::remove_dir_all(dir).unwrap();
}

/// A saved factor of the wrong shape is refused, naming the variable and the state.
#[test]
fn a_misshapen_factor_is_refused() {
    let w = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    let mut opt = Adafactor::new(Default::default()).unwrap();
    opt.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    opt.step_with_grads(&[Some(w.ones_like())]).unwrap();
    let mut state: Vec<(String, Tensor)> =
        opt.state(0).into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect();
    assert_eq!(state[1].1.size(), [4, 1]);
    assert_eq!(state[2].1.size(), [1, 3]);
    state[1].1 = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
    let err = opt.set_state(0, state).unwrap_err().to_string();
    assert!(err.contains("row_var") && err.contains('w'), "{err}");
}

/// Ranges: lr, eps1, eps2 and weight decay >= 0, beta2_decay <= 0, d >= 1; torch's defaults.
#[test]
fn adafactor_config_is_checked() {
    let invalid = |c: AdafactorConfig, name: &str| match Adafactor::new(c) {
        Err(Error::InvalidHyperparameter { name: n, .. }) => assert_eq!(n, name),
        other => panic!("{name}: {other:?}"),
    };
    invalid(AdafactorConfig { lr: (-1.0).into(), ..Default::default() }, "lr");
    invalid(AdafactorConfig { beta2_decay: 0.1.into(), ..Default::default() }, "beta2_decay");
    invalid(AdafactorConfig { eps1: Some(-1.0), ..Default::default() }, "eps1");
    invalid(AdafactorConfig { eps2: (-1.0).into(), ..Default::default() }, "eps2");
    invalid(AdafactorConfig { d: 0.5.into(), ..Default::default() }, "d");
    invalid(AdafactorConfig { weight_decay: (-0.1).into(), ..Default::default() }, "weight_decay");
    let opt = Adafactor::new(Default::default()).unwrap();
    let c = opt.config();
    assert_eq!(
        [c.lr.value(0), c.beta2_decay.value(0), c.eps2.value(0), c.d.value(0)],
        [1e-2, -0.8, 1e-3, 1.0]
    );
    assert_eq!((c.eps1, c.weight_decay.value(0), c.maximize), (None, 0.0, false));
    assert_eq!(opt.name(), "Adafactor");
}
