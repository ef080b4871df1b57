//! Every optimizer whose reference records trajectories in the common fixture format, bit for bit
//! against them on every backend, with no line per optimizer: each `tests/fixtures/*_cases.json`
//! whose `format` is [`FORMAT`] is read, its cases' optimizers are built from the registry
//! (`caseopt::builtin(name).build(&config)`) and replayed. An optimizer added with a generator of
//! its own (Lion against optax, Adafactor and Muon against torch.optim, each from
//! `tests/fixtures/gen_<name>.py`) is covered here by its fixture alone.
//!
//! # The format
//!
//! The JSON names the reference and its generator, and holds:
//!
//! - `files`: the safetensors file of each arithmetic the trajectories were recorded with, keyed
//!   by ATen's CPU capability (`default`, `avx2`, `avx512`, as
//!   `torch.backends.cpu.get_cpu_capability()` names them, lower case), and with `key` set to
//!   `capability+onednn_bf16`, also by whether oneDNN runs the bfloat16 matrix products
//!   (`avx512+onednn_bf16`: Muon's Newton-Schulz iteration). Keys with the same bits share a
//!   file; a key missing is an arithmetic no generator ran;
//! - `near` (optional): where no file has this process's key, the largest difference from the
//!   nearest file allowed, relative to how far the reference moved each variable; without it
//!   such a run compares nothing and says so;
//! - `dtypes`, `steps`, `shapes`, `snapshots` (the steps whose results were recorded; every step
//!   when absent), `final_state` (whether the state after the last step is recorded), and
//!   `cases`: `name`, `optimizer` (the registry's name), `config` (the config's fields by name,
//!   what the registry builds from; fields left out are the defaults, so a case with `{}` checks
//!   them against the reference's) and `lr_schedule` (the learning rate set before each step as
//!   caseopt's `Schedule` gives it).
//!
//! Its tensors: the inputs `in.<dtype>.p<j>.init`, `.grads` (every step's, stacked) and `.mask`
//! (0 where variable j has no gradient at that step), shared by the cases; per case
//! `<case>.<dtype>.p<j>.expected` (the values after each recorded step, stacked) and, with
//! `final_state`, `<case>.<dtype>.p<j>.<state>` for each state the optimizer exports (`step` as
//! the reference keeps it: a number).
//!
//! A run compares the file of its own key; `the_baseline_kernels_match_too` runs the comparison
//! again in a child process under `ATEN_CPU_CAPABILITY=default`, so both of ATen's roundings of
//! `a + b * c` are checked on every machine.

mod parity_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use caseopt::{Backend, Optimizer, Param, VarInfo};
use parity_support::{build_with_lr, fixtures_dir, lr_schedule, ulp_distance};
use serde_json::Value;
use tch::Tensor;

/// The `format` of a fixture this test reads.
const FORMAT: &str = "caseopt-trajectories/1";

/// Every fixture in the common format: its file name and metadata.
fn fixtures() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with("_cases.json") {
            continue;
        }
        let meta: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        if meta["format"] == FORMAT {
            out.push((name, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The key of the arithmetic this process runs, as the fixture keys its files: ATen's CPU
/// capability (asked of ATen: the processor's, lowered by `ATEN_CPU_CAPABILITY`) and, where the
/// fixture's `key` asks, whether oneDNN runs bfloat16 matrix products (x86-64 with AVX-512 F,
/// BW, VL and DQ, as `torch.ops.mkldnn._is_mkldnn_bf16_supported()` decides).
fn running_key(meta: &Value) -> String {
    let capability = caseopt::__private::aten_cpu_capability().to_string();
    if meta["key"] != "capability+onednn_bf16" {
        return capability;
    }
    #[cfg(target_arch = "x86_64")]
    let onednn_bf16 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    #[cfg(not(target_arch = "x86_64"))]
    let onednn_bf16 = false;
    if onednn_bf16 {
        format!("{capability}+onednn_bf16")
    } else {
        capability
    }
}

/// How a run compares with the file it reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Compare {
    /// Equal bits.
    Exact,
    /// Within this fraction of how far the reference moved each variable.
    Near(f64),
}

/// The file this process compares against and how, or why it compares none.
fn choose(meta: &Value) -> Result<(String, Compare), String> {
    let key = running_key(meta);
    let files = &meta["files"];
    if let Some(file) = files[&key].as_str() {
        return Ok((file.to_string(), Compare::Exact));
    }
    let Some(near) = meta["near"].as_f64() else {
        return Err(format!("no trajectories recorded with arithmetic {key}"));
    };
    let capability = key.split('+').next().unwrap();
    match files[capability].as_str().or_else(|| files["default"].as_str()) {
        Some(file) => Ok((file.to_string(), Compare::Near(near))),
        None => Err(format!("no trajectories near arithmetic {key}")),
    }
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

fn backends(optimizer: &str) -> Vec<Backend> {
    let mut out = vec![Backend::Auto, Backend::Torch, Backend::MultiTensor];
    if parity_support::has_fused_kernel(optimizer) {
        out.push(Backend::Fused);
    }
    out
}

/// Replays every case of one fixture on `backend`; returns the mismatches found and how many
/// values were compared.
fn replay(
    meta: &Value,
    data: &BTreeMap<String, Tensor>,
    compare: Compare,
    backend: Backend,
) -> (Vec<String>, usize) {
    let get = |k: &str| data.get(k).unwrap_or_else(|| panic!("the fixture lacks {k}"));
    let steps = meta["steps"].as_i64().unwrap();
    let vars = meta["shapes"].as_array().unwrap().len();
    let snapshots: Vec<i64> = match meta["snapshots"].as_array() {
        Some(s) => s.iter().map(|t| t.as_i64().unwrap()).collect(),
        None => (0..steps).collect(),
    };
    let (mut failures, mut compared) = (Vec::new(), 0);
    for dtype in meta["dtypes"].as_array().unwrap() {
        let dtype = dtype.as_str().unwrap();
        for case in meta["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let optimizer = case["optimizer"].as_str().unwrap();
            if backend == Backend::Fused && !parity_support::has_fused_kernel(optimizer) {
                continue;
            }
            let mut config = case["config"].clone();
            let schedule = lr_schedule(case);
            if schedule.is_some() {
                config.as_object_mut().unwrap().remove("lr");
            }
            let mut opt = build_with_lr(optimizer, &config, backend.into(), schedule);
            let inputs: Vec<String> = (0..vars).map(|j| format!("in.{dtype}.p{j}")).collect();
            let params: Vec<Tensor> =
                inputs.iter().map(|k| get(&format!("{k}.init")).copy()).collect();
            for (j, p) in params.iter().enumerate() {
                opt.add_param(Param::new(VarInfo::of(format!("p{j}"), p), p.shallow_clone()))
                    .unwrap();
            }
            let mut row = 0;
            for t in 0..steps {
                let grads: Vec<Option<Tensor>> = inputs
                    .iter()
                    .map(|k| {
                        let has = get(&format!("{k}.mask")).int64_value(&[t]) != 0;
                        has.then(|| get(&format!("{k}.grads")).get(t).copy())
                    })
                    .collect();
                opt.step_with_grads(&grads).unwrap();
                if !snapshots.contains(&t) {
                    continue;
                }
                for (j, p) in params.iter().enumerate() {
                    let expected = get(&format!("{name}.{dtype}.p{j}.expected")).get(row);
                    compared += 1;
                    let off = match compare {
                        Compare::Exact => !same_bits(p, &expected),
                        Compare::Near(tol) => {
                            let init = get(&format!("in.{dtype}.p{j}.init"));
                            let moved = (&expected - init).abs().max().double_value(&[]);
                            let diff = (p - &expected).abs().max().double_value(&[]);
                            diff > tol * moved || diff.is_nan()
                        }
                    };
                    if off {
                        let ulps = ulp_distance(p, &expected);
                        failures.push(format!(
                            "{name} ({optimizer}) {dtype} p{j} step {t} on {backend:?}: {ulps} ulp"
                        ));
                    }
                }
                row += 1;
            }
            assert_eq!(row as usize, snapshots.len(), "{name}: recorded steps not reached");
            if meta["final_state"] == true && compare == Compare::Exact {
                failures.extend(compare_state(&*opt, name, dtype, vars, data, backend));
                compared += vars;
            }
        }
    }
    (failures, compared)
}

/// The state after the last step, each exported tensor against the reference's.
fn compare_state(
    opt: &dyn Optimizer,
    case: &str,
    dtype: &str,
    vars: usize,
    data: &BTreeMap<String, Tensor>,
    backend: Backend,
) -> Vec<String> {
    let mut failures = Vec::new();
    for j in 0..vars {
        for (state, t) in opt.state(j) {
            let key = format!("{case}.{dtype}.p{j}.{state}");
            let Some(e) = data.get(&key) else {
                failures.push(format!("{key}: exported on {backend:?}, not in the fixture"));
                continue;
            };
            let same = if state == "step" {
                e.double_value(&[]) == t.double_value(&[])
            } else {
                same_bits(&t, e)
            };
            if !same {
                failures.push(format!("{key} on {backend:?}: differs"));
            }
        }
    }
    failures
}

/// Every fixture in the common format, every case, dtype and backend: the values after every
/// recorded step, and the final state where recorded, are the reference's bits (or, where the
/// fixture allows it and no file has this arithmetic, near them; the test prints which).
#[test]
fn every_reference_trajectory_is_reproduced() {
    // The fixtures were recorded with one thread (Muon's matrix products sum per thread).
    tch::set_num_threads(1);
    let all = fixtures();
    assert!(all.len() >= 3, "trajectory fixtures found: {:?}", all.iter().map(|f| &f.0));
    let mut failures = Vec::new();
    for (json, meta) in &all {
        let (file, compare) = match choose(meta) {
            Ok(chosen) => chosen,
            Err(why) => {
                println!("{json}: {why}; not compared");
                continue;
            }
        };
        let data: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures_dir().join(&file)).unwrap().into_iter().collect();
        let optimizers: BTreeSet<&str> = meta["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["optimizer"].as_str().unwrap())
            .collect();
        for optimizer in &optimizers {
            for backend in backends(optimizer) {
                let (found, compared) = replay(meta, &data, compare, backend);
                println!(
                    "{json} ({}): {file}, {compare:?}, {optimizer} on {backend:?}: {compared} \
                     values compared, {} differ",
                    meta["reference"].as_str().unwrap_or("?"),
                    found.len()
                );
                assert!(compared > 0, "{json}: nothing compared");
                failures.extend(found);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differ, first: {:#?}",
        failures.len(),
        &failures[..10.min(failures.len())]
    );
}

/// The same comparison in a child process whose ATen runs its baseline kernels (each product
/// and sum rounded on its own), against the trajectories recorded so.
#[test]
fn the_baseline_kernels_match_too() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "every_reference_trajectory_is_reproduced", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("ATEN_CPU_CAPABILITY", "default")
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed: {status}");
}

/// Every built-in optimizer has a reference trajectory: cases in tests/fixtures/parity_cases.json
/// (torch.optim's single-tensor optimizers, Bop and Bop2ndOrder) or in a fixture of the common
/// format. An optimizer added without parity cases fails here.
#[test]
fn every_builtin_has_reference_cases() {
    let mut named: Vec<String> = fixtures()
        .iter()
        .flat_map(|(_, meta)| meta["cases"].as_array().unwrap().clone())
        .map(|c| c["optimizer"].as_str().unwrap().to_string())
        .collect();
    named.extend(parity_support::fixture_optimizers(false));
    // Fixtures name an optimizer as its reference does (torch's `SGD`) or by its type.
    let unknown: Vec<&String> = named.iter().filter(|n| caseopt::builtin(n).is_none()).collect();
    assert!(unknown.is_empty(), "fixtures name optimizers the registry lacks: {unknown:?}");
    let covered: BTreeSet<&str> =
        named.iter().filter_map(|n| caseopt::builtin(n)).map(|b| b.type_name()).collect();
    let missing: Vec<&str> = caseopt::builtins()
        .iter()
        .map(|b| b.type_name())
        .filter(|n| !covered.contains(n))
        .collect();
    assert!(missing.is_empty(), "built-ins without reference cases: {missing:?}");
}
