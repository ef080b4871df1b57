//! Lion against optax's `lion` (tests/fixtures/gen_lion.py, optax 0.2.8), bit for bit, on every
//! backend; its checkpoint round trip; its config's checks.
//!
//! The fixture holds two trajectories per case: jitted optax, whose XLA loop rounds each
//! `a * b + c` once on a CPU with FMA, and optax op by op, which rounds twice. caseopt rounds as
//! ATen's kernels do on this CPU (once under AVX2/AVX-512, twice under the baseline), so each
//! run compares the trajectory of its ATen capability; `the_baseline_matches_optax_op_by_op`
//! runs the comparison again in a child process under `ATEN_CPU_CAPABILITY=default`.

mod checkpoint_support;

use std::collections::HashMap;
use std::fs;

use caseopt::{
    case_optimizer, Backend, Error, Execution, Lion, LionConfig, Optimizer, Param, VarInfo,
};
use checkpoint_support::{model, model_values, scratch_dir, snapshot, train, ModelSpec};
use tch::{Kind, Tensor};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lion.safetensors");
const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lion_cases.json");

/// The distance in f32 ulps between two values (the order of their bit patterns as integers;
/// +0 and -0 are 0 apart), `u64::MAX` when one is NaN and the other is not.
fn ulps(a: f32, b: f32) -> u64 {
    if a.is_nan() || b.is_nan() {
        return if a.is_nan() && b.is_nan() { 0 } else { u64::MAX };
    }
    let ordered = |x: f32| {
        let i = i64::from(x.to_bits() as i32);
        if i < 0 {
            -(i & 0x7fff_ffff)
        } else {
            i
        }
    };
    (ordered(a) - ordered(b)).unsigned_abs()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// The largest distance in ulps between two f32 tensors of the same shape.
fn max_ulps(a: &Tensor, e: &Tensor) -> u64 {
    assert_eq!(a.size(), e.size());
    values(a).iter().zip(values(e)).map(|(&x, y)| ulps(x, y)).max().unwrap_or(0)
}

/// Which of the fixture's trajectories this process must reproduce: `jit` where ATen's
/// kernels contract `a + b * c` (AVX2, AVX-512), `eager` under its baseline kernels.
fn variant() -> Option<&'static str> {
    match caseopt::__private::aten_cpu_capability() {
        "avx2" | "avx512" => Some("jit"),
        "default" => Some("eager"),
        _ => None,
    }
}

/// Replays every case of the fixture on `backend`; returns the largest distance in ulps from
/// optax over every parameter after every step and the final momenta, per case.
fn replay(backend: Backend, variant: &str) -> Vec<(String, u64)> {
    let tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(FIXTURE).unwrap().into_iter().collect();
    let cases: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(CASES).unwrap()).unwrap();
    let get = |key: String| tensors.get(&key).unwrap_or_else(|| panic!("{key}")).shallow_clone();
    let mut out = Vec::new();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let steps = case["steps"].as_i64().unwrap();
        let vars = case["shapes"].as_array().unwrap().len();
        let mut lion = Lion::new(LionConfig {
            lr: f("lr").into(),
            beta1: f("beta1").into(),
            beta2: f("beta2").into(),
            weight_decay: f("weight_decay").into(),
        })
        .unwrap();
        lion.set_backend(backend);
        let params: Vec<Tensor> =
            (0..vars).map(|j| get(format!("{name}.p{j}.init")).copy()).collect();
        for (j, p) in params.iter().enumerate() {
            lion.add_param(Param::new(VarInfo::of(format!("p{j}"), p), p.shallow_clone())).unwrap();
        }
        let mut worst = 0;
        for t in 0..steps {
            let grads: Vec<Option<Tensor>> =
                (0..vars).map(|j| Some(get(format!("{name}.g{j}")).get(t).copy())).collect();
            lion.step_with_grads(&grads).unwrap();
            for (j, p) in params.iter().enumerate() {
                let e = get(format!("{name}.{variant}.p{j}.after")).get(t);
                worst = worst.max(max_ulps(p, &e));
            }
        }
        for j in 0..vars {
            let state = lion.state(j);
            assert_eq!(state.len(), 1);
            assert_eq!(state[0].0, "exp_avg");
            worst = worst.max(max_ulps(&state[0].1, &get(format!("{name}.{variant}.m{j}"))));
        }
        out.push((name.to_string(), worst));
    }
    out
}

/// Every case, on the fused kernels (`Auto`), libtorch ops and the multi-tensor backend: the
/// parameters after every step and the final momenta are optax's, to the bit.
#[test]
fn lion_matches_optax_bit_for_bit() {
    let Some(variant) = variant() else {
        eprintln!("skipped: ATen runs no capability this fixture has a trajectory for");
        return;
    };
    for backend in [Backend::Auto, Backend::Torch, Backend::MultiTensor] {
        let worst = replay(backend, variant);
        eprintln!("{backend:?} against optax ({variant}): {worst:?}");
        assert_eq!(worst.len(), 5);
        for (case, ulps) in worst {
            assert_eq!(ulps, 0, "{case} on {backend:?}: {ulps} ulps from optax ({variant})");
        }
    }
}

/// The same comparison in a child process whose ATen runs its baseline kernels (and so does
/// caseopt), against optax op by op.
#[test]
fn the_baseline_matches_optax_op_by_op() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lion_matches_optax_bit_for_bit", "--nocapture", "--test-threads", "1"])
        .env("ATEN_CPU_CAPABILITY", "default")
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed: {status}");
}

/// A `binary => Bop, _ => Lion` router saved after 20 steps and loaded into a fresh router and
/// model resumes exactly as the uninterrupted run (the momentum travels as `exp_avg`).
#[test]
fn lion_resumes_bit_for_bit() {
    case_optimizer! {
        struct BopLion {
            binary => Bop<threshold: 1e-6, gamma: 1e-2>,
            _ => Lion<lr: 0.01, weight_decay: 0.1>,
        }
    }
    let spec = ModelSpec::default();
    let vs = model(&spec);
    let mut straight = BopLion::build(&vs).unwrap();
    train(&mut straight, &vs, 0..40, Some(10));

    let dir = scratch_dir("lion");
    let path = dir.join("ckpt.safetensors");
    let vs1 = model(&spec);
    let mut first = BopLion::build(&vs1).unwrap();
    train(&mut first, &vs1, 0..20, Some(10));
    caseopt::save_training(&path, &vs1, &first).unwrap();
    drop(first);
    let vs2 = model(&ModelSpec { seed: 99, ..spec.clone() });
    let mut second = BopLion::build(&vs2).unwrap();
    caseopt::load_training(&path, &vs2, &mut second).unwrap();
    assert_eq!(second.optimizer(1).unwrap().name(), "Lion");
    assert_eq!(second.optimizer(1).unwrap().state_names(), ["exp_avg"]);
    train(&mut second, &vs2, 20..40, Some(10));

    assert_eq!(snapshot(&second), snapshot(&straight));
    assert_eq!(model_values(&vs2), model_values(&vs));
    fs::remove_dir_all(dir).unwrap();
}

/// A saved momentum that does not fit its variable is refused, naming the variable.
#[test]
fn a_mismatched_momentum_is_refused() {
    let w = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
    let mut lion = Lion::new(Default::default()).unwrap();
    lion.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let bad = vec![("exp_avg".to_string(), Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)))];
    let err = lion.set_state(0, bad).unwrap_err();
    assert!(err.to_string().contains('w'), "{err}");
    let missing = lion.set_state(0, vec![("m".to_string(), w.copy())]).unwrap_err();
    assert!(missing.to_string().contains("exp_avg"), "{missing}");
}

/// Ranges: lr and weight decay >= 0, betas in [0, 1); optax's defaults.
#[test]
fn lion_config_is_checked() {
    let invalid = |c: LionConfig, name: &str| match Lion::new(c) {
        Err(Error::InvalidHyperparameter { name: n, .. }) => assert_eq!(n, name),
        other => panic!("{name}: {other:?}"),
    };
    invalid(LionConfig { lr: (-1.0).into(), ..Default::default() }, "lr");
    invalid(LionConfig { beta1: 1.0.into(), ..Default::default() }, "beta1");
    invalid(LionConfig { beta2: (-0.1).into(), ..Default::default() }, "beta2");
    invalid(LionConfig { weight_decay: (-1e-3).into(), ..Default::default() }, "weight_decay");
    let lion = Lion::new(Default::default()).unwrap();
    let c = lion.config();
    let at0 = |s: &caseopt::Schedule| s.value(0);
    assert_eq!(
        [at0(&c.lr), at0(&c.beta1), at0(&c.beta2), at0(&c.weight_decay)],
        [1e-4, 0.9, 0.99, 1e-3]
    );
    assert_eq!(lion.name(), "Lion");
}
