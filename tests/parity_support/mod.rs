//! The parity harness shared by tests/test_parity.rs (CPU) and tests/test_cuda.rs: the fixtures
//! of tests/fixtures (see test_parity.rs for what they hold and the tolerances), the optimizers
//! they name, the run that compares every recorded step, and how the running libtorch rounds
//! compared with the one that made the fixtures.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use caseopt::{Backend, Optimizer, Param, Schedule, Sqrt, VarInfo};
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

/// The learning rate schedule a case sets in torch's param group before each step (see
/// gen_parity.py's `lr_at`), as caseopt's own schedule.
pub fn lr_schedule(case: &Value) -> Option<Schedule> {
    let s = case.get("lr_schedule").filter(|s| !s.is_null())?;
    let num = |k: &str| s[k].as_f64().unwrap();
    Some(match s["kind"].as_str().unwrap() {
        "step" => Schedule::step(num("initial"), num("gamma"), s["step_size"].as_u64().unwrap()),
        "piecewise" => Schedule::piecewise(
            s["boundaries"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect(),
            s["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect(),
        ),
        other => panic!("fixture names unknown schedule {other}"),
    })
}

/// How a libtorch's CPU ops round what torch.optim asks of them (docs/parity.md): whether its
/// kernels fuse `a + b * c` (ATen's AVX2 and AVX-512 builds) and whether its `sqrt` is MKL's
/// (one ulp off the correctly rounded root for some elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounding {
    pub fused_multiply_add: bool,
    pub mkl_sqrt: bool,
}

/// The rounding of the libtorch that made the fixtures, from their metadata.
pub fn fixture_rounding(meta: &Value) -> Rounding {
    let capability = meta["cpu_capability"].as_str().unwrap();
    Rounding {
        fused_multiply_add: matches!(capability, "AVX2" | "AVX512"),
        mkl_sqrt: meta["mkl"].as_bool().unwrap(),
    }
}

/// The rounding of the libtorch this test runs on, found by asking its ops: `lerp` with a
/// scalar weight (`a + w * (b - a)`) on elements where one rounding and two differ, and `sqrt`
/// on elements whose correctly rounded root MKL's misses.
pub fn running_rounding() -> Rounding {
    let n = 4096;
    let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.6180).sin()).collect();
    let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.618).cos()).collect();
    let w = 0.1f32;
    let got = Vec::<f32>::try_from(Tensor::from_slice(&a).lerp(&Tensor::from_slice(&b), w as f64))
        .unwrap();
    let (mut fused, mut separate) = (0, 0);
    for i in 0..n {
        let (once, twice) = (w.mul_add(b[i] - a[i], a[i]), a[i] + w * (b[i] - a[i]));
        if once != twice {
            fused += usize::from(got[i] == once);
            separate += usize::from(got[i] == twice);
        }
    }
    assert!(fused == 0 || separate == 0, "lerp rounds neither way throughout");
    let x: Vec<f32> = (1..=n).map(|i| (i as f32 * 0.37).sin().abs()).collect();
    let roots = Vec::<f32>::try_from(Tensor::from_slice(&x).sqrt()).unwrap();
    let mkl_sqrt = x.iter().zip(&roots).any(|(x, r)| x.sqrt() != *r);
    Rounding { fused_multiply_add: fused > 0, mkl_sqrt }
}

/// The CPU kernels ATen runs with here, as `torch.backends.cpu.get_cpu_capability()` names
/// them (lower case): ATen's own choice (`cpu/Utils`: AVX-512 with its F, BW, VL and DQ parts,
/// else AVX2 with FMA, else the baseline), lowered by `ATEN_CPU_CAPABILITY`; checked against
/// how the running ops round ([`running_rounding`]).
pub fn running_capability() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let cpu = if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("fma")
    {
        "avx512"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "avx2"
    } else {
        "default"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = "other";
    let asked = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default().to_lowercase();
    let capability = match (asked.as_str(), cpu) {
        ("default", _) => "default",
        ("avx2", "avx512") => "avx2",
        _ => cpu,
    };
    assert_eq!(
        running_rounding().fused_multiply_add,
        matches!(capability, "avx2" | "avx512"),
        "ATen rounds otherwise than capability {capability} would"
    );
    capability
}

/// Whether the built-in optimizer named `name` has a fused CPU kernel, as the registry says
/// (the others take `Backend::Fused` as an error).
pub fn has_fused_kernel(name: &str) -> bool {
    caseopt::builtin(name).is_some_and(|b| b.has_fused_kernel())
}

/// The optimizers tests/fixtures/parity_cases.json has cases for, by torch's names; with
/// `fused_only`, those of them with a fused CPU kernel.
pub fn fixture_optimizers(fused_only: bool) -> Vec<String> {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("parity_cases.json")).unwrap(),
    )
    .unwrap();
    let names: std::collections::BTreeSet<String> = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["optimizer"].as_str().unwrap().to_string())
        .filter(|name| !fused_only || has_fused_kernel(name))
        .collect();
    names.into_iter().collect()
}

/// The fused kernels whose update takes a square root that reaches the parameter: by default
/// ([`Sqrt::Fast`]) they take the correctly rounded one, where ATen's `sqrt` is MKL's on a
/// libtorch with MKL; with [`Sqrt::Aten`], ATen's.
pub const FUSED_SQRT: &[&str] = &["Adam", "AdamW"];

/// How a run executes: its optimizers' backend, and the fused Adam/AdamW's square root.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub backend: Backend,
    pub sqrt: Sqrt,
}

impl From<Backend> for Setting {
    /// The backend with the default square root.
    fn from(backend: Backend) -> Self {
        Setting { backend, sqrt: Sqrt::Fast }
    }
}

/// Builds the optimizer a fixture case names, from its torch-style keyword arguments, on
/// `path`.
pub fn build(optimizer: &str, c: &Value, path: Setting) -> Box<dyn Optimizer> {
    build_with_lr(optimizer, c, path, None)
}

/// [`build`], the learning rate following `lr` when given. The optimizer comes from the
/// registry of built-ins (`caseopt::builtin`), its config from the case's keyword arguments.
pub fn build_with_lr(
    optimizer: &str,
    c: &Value,
    path: Setting,
    lr: Option<Schedule>,
) -> Box<dyn Optimizer> {
    let Some(entry) = caseopt::builtin(optimizer) else {
        panic!("fixture names unknown optimizer {optimizer}")
    };
    let mut opt = entry.build(c).unwrap_or_else(|e| panic!("{optimizer} {c}: {e}"));
    if let Some(s) = lr {
        opt.set_hyperparameter("lr", s).unwrap();
    }
    opt.set_backend(path.backend);
    opt.set_sqrt(path.sqrt);
    opt
}

/// Max over elements of |a - e| / max(|e|, 1).
pub fn scaled_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let scale = e.abs().clamp_min(1.0);
    ((a - &e).abs() / scale).max().double_value(&[])
}

/// The largest distance in units in the last place between two tensors of one float dtype,
/// counted along the ordered integers the IEEE formats map to (so +0 and -0 are 0 apart).
pub fn ulp_distance(a: &Tensor, b: &Tensor) -> u64 {
    let ordered = |t: &Tensor| -> Vec<i64> {
        let t = t.to_device(Device::Cpu).flatten(0, -1);
        if t.kind() == Kind::Float {
            Vec::<f32>::try_from(&t)
                .unwrap()
                .into_iter()
                .map(|x| {
                    let i = x.to_bits() as i32 as i64;
                    if i < 0 {
                        i32::MIN as i64 - i
                    } else {
                        i
                    }
                })
                .collect()
        } else {
            Vec::<f64>::try_from(&t)
                .unwrap()
                .into_iter()
                .map(|x| {
                    let i = x.to_bits() as i64;
                    if i < 0 {
                        i64::MIN - i
                    } else {
                        i
                    }
                })
                .collect()
        }
    };
    let (a, b) = (ordered(a), ordered(b));
    a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// What one run over the fixtures found.
pub struct Parity {
    /// The largest scaled error per optimizer.
    pub worst: BTreeMap<String, f64>,
    /// The largest ulp distance per optimizer.
    pub ulps: BTreeMap<String, u64>,
    /// Every compared value, by `<optimizer>/<variable key>.<step>`, for comparing two backends'
    /// runs.
    pub values: BTreeMap<String, Tensor>,
}

/// Runs every fixture case of one dtype through the optimizers on `backend` (under
/// `Backend::Fused`, the cases of optimizers that have fused kernels) and returns the largest
/// scaled error per optimizer; fails when one exceeds `tol`.
pub fn run_parity(
    dtype: &str,
    tol: f64,
    backend: Backend,
    device: Device,
) -> BTreeMap<String, f64> {
    run_parity_values(dtype, &|_| tol, backend.into(), device).worst
}

/// [`run_parity`] with a tolerance per optimizer, returning the ulp distances and the values
/// themselves too.
pub fn run_parity_values(
    dtype: &str,
    tol: &dyn Fn(&str) -> f64,
    path: Setting,
    device: Device,
) -> Parity {
    let backend = path.backend;
    let (meta, tensors) = fixtures();
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut ulps: BTreeMap<String, u64> = BTreeMap::new();
    let mut values = BTreeMap::new();
    let mut failures = Vec::new();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let optimizer = case["optimizer"].as_str().unwrap();
        if backend == Backend::Fused && !has_fused_kernel(optimizer) {
            continue;
        }
        let mut config = case["config"].clone();
        let schedule = lr_schedule(case);
        if schedule.is_some() {
            // The schedule below replaces the constant.
            config.as_object_mut().unwrap().remove("lr");
        }
        let mut opt = build_with_lr(optimizer, &config, path, schedule);
        let tol = tol(optimizer);
        let data = case["data"].as_str().unwrap();
        let count = case["vars"].as_u64().unwrap();
        let steps = case["steps"].as_u64().unwrap() as i64;
        // The steps whose results were recorded: every step unless the case names some.
        let snapshots: Vec<i64> = match case.get("snapshots") {
            Some(s) => s.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect(),
            None => (0..steps).collect(),
        };
        let inputs: Vec<String> = (0..count).map(|j| format!("{data}.{dtype}.p{j}")).collect();
        let outputs: Vec<String> = (0..count).map(|j| format!("{name}.{dtype}.p{j}")).collect();
        let vars: Vec<Tensor> =
            inputs.iter().map(|k| tensors[&format!("{k}.init")].to_device(device).copy()).collect();
        for (k, v) in outputs.iter().zip(&vars) {
            let mut info = VarInfo::of(k.clone(), v);
            if optimizer.starts_with("Bop") {
                info = info.with_bits(1);
            }
            opt.add_param(Param::new(info, v.shallow_clone())).unwrap();
        }
        for t in 0..steps {
            let grads: Vec<Option<Tensor>> = inputs
                .iter()
                .map(|k| {
                    let has = tensors[&format!("{k}.mask")].int64_value(&[t]) != 0;
                    has.then(|| tensors[&format!("{k}.grads")].get(t).to_device(device).copy())
                })
                .collect();
            opt.step_with_grads(&grads).unwrap();
            let Some(row) = snapshots.iter().position(|&s| s == t) else { continue };
            for (k, v) in outputs.iter().zip(&vars) {
                let actual = v.to_device(Device::Cpu);
                let expected = tensors[&format!("{k}.expected")].get(row as i64);
                let err = scaled_error(&actual, &expected);
                let w = worst.entry(optimizer.to_string()).or_insert(0.0);
                *w = w.max(err);
                let u = ulps.entry(optimizer.to_string()).or_insert(0);
                *u = (*u).max(ulp_distance(&actual, &expected));
                if err > tol || err.is_nan() {
                    failures.push(format!("{k} step {t}: scaled error {err:e} > {tol:e}"));
                }
                values.insert(format!("{optimizer}/{k}.{t}"), actual);
            }
        }
        assert_eq!(opt.step_count(), steps as u64, "{name}");
    }
    for (opt, err) in &worst {
        println!(
            "parity {device:?} {dtype} {backend:<5?} {:<4?} {opt:<12} max scaled error {err:.3e}, {} ulp",
            path.sqrt, ulps[opt]
        );
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:#?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
    Parity { worst, ulps, values }
}

/// The multi-tensor backend with the default square root (which it ignores).
pub const MULTI: Setting = Setting { backend: Backend::MultiTensor, sqrt: Sqrt::Fast };

/// tests/fixtures/multi_cases.json (gen_multi.py): the cases and which file holds each CPU
/// capability's trajectories.
pub fn multi_meta() -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join("multi_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs every multi-tensor case of one dtype on `device` with the backend forced and asserts
/// that every recorded value is the fixture's, bit for bit.
pub fn run_multi_parity(
    meta: &Value,
    tensors: &BTreeMap<String, Tensor>,
    dtype: &str,
    device: Device,
) {
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let optimizer = case["optimizer"].as_str().unwrap();
        let mut config = case["config"].clone();
        let schedule = lr_schedule(case);
        if schedule.is_some() {
            config.as_object_mut().unwrap().remove("lr");
        }
        let mut opt = build_with_lr(optimizer, &config, MULTI, schedule);
        let data = case["data"].as_str().unwrap();
        let count = case["vars"].as_u64().unwrap();
        let steps = case["steps"].as_u64().unwrap() as i64;
        let snapshots: Vec<i64> =
            case["snapshots"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
        let inputs: Vec<String> = (0..count).map(|j| format!("{data}.{dtype}.p{j}")).collect();
        let vars: Vec<Tensor> =
            inputs.iter().map(|k| tensors[&format!("{k}.init")].to_device(device).copy()).collect();
        for (j, v) in vars.iter().enumerate() {
            opt.add_param(Param::new(VarInfo::of(format!("p{j}"), v), v.shallow_clone())).unwrap();
        }
        for t in 0..steps {
            let grads: Vec<Option<Tensor>> = inputs
                .iter()
                .map(|k| {
                    let has = tensors[&format!("{k}.mask")].int64_value(&[t]) != 0;
                    has.then(|| tensors[&format!("{k}.grads")].get(t).to_device(device).copy())
                })
                .collect();
            opt.step_with_grads(&grads).unwrap();
            let Some(row) = snapshots.iter().position(|&s| s == t) else { continue };
            for (j, v) in vars.iter().enumerate() {
                let actual = v.to_device(Device::Cpu);
                let expected = tensors[&format!("{name}.{dtype}.p{j}.expected")].get(row as i64);
                *covered.entry(optimizer.to_string()).or_default() += 1;
                if !actual.equal(&expected) {
                    let ulps = ulp_distance(&actual, &expected);
                    failures.push(format!("{name} {dtype} p{j} step {t}: {ulps} ulp"));
                }
            }
        }
    }
    println!("multi-tensor parity {device:?} {dtype}: values compared per optimizer {covered:?}");
    assert_eq!(covered.len(), 7, "every torch.optim optimizer is covered: {covered:?}");
    assert!(
        failures.is_empty(),
        "{} differ, first: {:#?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
}
