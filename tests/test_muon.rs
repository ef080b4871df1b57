//! Muon: bit for bit against torch.optim.Muon 2.13 (tests/fixtures/gen_muon.py's trajectories),
//! a router's checkpoint resumes it bit for bit, and a variable that is not 2-D is refused by
//! name when the router is built.

mod checkpoint_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use caseopt::{
    case_optimizer, load_training, save_training, Error, Muon, MuonAdjustLr, MuonConfig, Optimizer,
    Param, PathExt, Schedule, VarInfo,
};
use checkpoint_support::{model, model_values, scratch_dir, snapshot, train, ModelSpec};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The key of the arithmetic ATen runs Muon with here, as gen_muon.py names it: its CPU
/// capability (from the processor and ATEN_CPU_CAPABILITY, as ATen decides), and whether its
/// bfloat16 matrix products are oneDNN's (x86-64 with AVX-512: F, BW, VL, DQ).
fn running_key() -> String {
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    #[cfg(target_arch = "x86_64")]
    let cpu = if avx512 && is_x86_feature_detected!("fma") {
        "avx512"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "avx2"
    } else {
        "default"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (avx512, cpu) = (false, "other");
    let asked = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default().to_lowercase();
    let capability = match (asked.as_str(), cpu) {
        ("default", _) => "default",
        ("avx2", "avx512") => "avx2",
        _ => cpu,
    };
    if avx512 {
        format!("{capability}+onednn_bf16")
    } else {
        capability.to_string()
    }
}

fn config_of(case: &Value) -> MuonConfig {
    let c = &case["config"];
    let d = MuonConfig::default();
    let f = |k: &str, default: f64| c[k].as_f64().unwrap_or(default);
    let lr = match case["lr_schedule"].as_object() {
        Some(s) => Schedule::Step {
            initial: s["initial"].as_f64().unwrap(),
            gamma: s["gamma"].as_f64().unwrap(),
            step_size: s["step_size"].as_u64().unwrap(),
        },
        None => Schedule::Constant(f("lr", 1e-3)),
    };
    let ns = c["ns_coefficients"].as_array().map(|v| {
        let x: Vec<f64> = v.iter().map(|x| x.as_f64().unwrap()).collect();
        (x[0], x[1], x[2])
    });
    MuonConfig {
        lr,
        weight_decay: f("weight_decay", 0.1).into(),
        momentum: f("momentum", 0.95).into(),
        nesterov: c["nesterov"].as_bool().unwrap_or(d.nesterov),
        ns_coefficients: ns.unwrap_or(d.ns_coefficients),
        eps: f("eps", d.eps),
        ns_steps: c["ns_steps"].as_u64().map_or(d.ns_steps, |n| n as usize),
        adjust_lr_fn: match c["adjust_lr_fn"].as_str() {
            None | Some("original") => MuonAdjustLr::Original,
            Some("match_rms_adamw") => MuonAdjustLr::MatchRmsAdamW,
            Some(other) => panic!("unknown adjust_lr_fn {other}"),
        },
    }
}

/// Runs every case of muon_cases.json against the fixture file of `key`; returns the largest
/// difference of any value from torch's, relative to how far torch moved that variable.
fn run_cases(meta: &Value, data: &BTreeMap<String, Tensor>) -> f64 {
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let snapshots: Vec<usize> = meta["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap() as usize)
        .collect();
    let vars = meta["shapes"].as_array().unwrap().len();
    let mut worst = 0f64;
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut muon = Muon::new(config_of(case)).unwrap();
        let inputs: Vec<(Tensor, Tensor, Tensor)> = (0..vars)
            .map(|j| {
                let key = format!("in.f32.p{j}");
                (
                    data[&format!("{key}.init")].copy(),
                    data[&format!("{key}.grads")].shallow_clone(),
                    data[&format!("{key}.mask")].shallow_clone(),
                )
            })
            .collect();
        for (j, (p, _, _)) in inputs.iter().enumerate() {
            muon.add_param(Param::new(VarInfo::of(format!("p{j}"), p), p.shallow_clone())).unwrap();
        }
        let mut seen = 0;
        for t in 0..steps {
            let grads: Vec<Option<Tensor>> = inputs
                .iter()
                .map(|(_, g, m)| (m.int64_value(&[t as i64]) != 0).then(|| g.get(t as i64).copy()))
                .collect();
            muon.step_with_grads(&grads).unwrap();
            if snapshots.contains(&t) {
                for (j, (p, _, _)) in inputs.iter().enumerate() {
                    let expected = data[&format!("{name}.f32.p{j}.expected")].get(seen);
                    let init = data[&format!("in.f32.p{j}.init")].shallow_clone();
                    let moved = (&expected - &init).abs().max().double_value(&[]);
                    let diff = (p - &expected).abs().max().double_value(&[]);
                    if diff != 0.0 {
                        eprintln!("{name} p{j} after step {t}: off by {diff:e} (moved {moved:e})");
                    }
                    worst = worst.max(diff / moved.max(f64::MIN_POSITIVE));
                }
                seen += 1;
            }
        }
    }
    worst
}

/// torch.optim.Muon's trajectories, bit for bit where the fixtures were made with this
/// machine's arithmetic; elsewhere (another processor's bfloat16 matrix products or rounding)
/// within 2% of each variable's movement, and the test says which comparison it made.
#[test]
fn muon_matches_torch_bit_for_bit() {
    tch::set_num_threads(1);
    let dir = fixtures_dir();
    let meta: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("muon_cases.json")).unwrap()).unwrap();
    let key = running_key();
    let files = meta["files"].as_object().unwrap();
    let (file, exact) = match files.get(&key) {
        Some(f) => (f.as_str().unwrap(), true),
        None => {
            let base = key.split('+').next().unwrap_or("default");
            let f = files.get(base).or_else(|| files.get("default")).unwrap();
            (f.as_str().unwrap(), false)
        }
    };
    println!("Muon fixtures for {key}: {file} ({})", if exact { "exact" } else { "near" });
    let data: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.join(file)).unwrap().into_iter().collect();
    let worst = run_cases(&meta, &data);
    if exact {
        assert_eq!(worst, 0.0, "Muon differs from torch.optim.Muon on {key}");
    } else {
        assert!(worst < 0.02, "Muon is {worst} of a movement away from torch's on {key}");
    }
}

/// `ndim(2) => Muon, _ => AdamW`, 20 steps + save + load into a fresh model and router + 20,
/// is the 40 steps in one go, bit for bit (the momentum buffers and step counts travel).
#[test]
fn a_muon_router_resumes_bit_for_bit() {
    let make = |vs: &nn::VarStore| {
        case_optimizer! {
            ndim(2) => Muon<lr: 0.02, weight_decay: 0.01, adjust_lr_fn: MuonAdjustLr::MatchRmsAdamW>,
            _ => AdamW<lr: 0.01>,
        }
        .build(vs)
        .unwrap()
    };
    let spec = ModelSpec::default();
    let vs = model(&spec);
    let mut straight = make(&vs);
    train(&mut straight, &vs, 0..40, Some(10));

    let dir = scratch_dir("muon-resume");
    let path = dir.join("ckpt.safetensors");
    let vs1 = model(&spec);
    let mut first = make(&vs1);
    train(&mut first, &vs1, 0..20, Some(10));
    save_training(&path, &vs1, &first).unwrap();
    drop(first);
    let vs2 = model(&ModelSpec { seed: 99, ..spec });
    let mut second = make(&vs2);
    load_training(&path, &vs2, &mut second).unwrap();
    let state = second.optimizer(0).unwrap().state(0);
    assert_eq!(state.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["momentum_buffer"]);
    train(&mut second, &vs2, 20..40, Some(10));

    assert_eq!(snapshot(&second), snapshot(&straight));
    assert_eq!(model_values(&vs2), model_values(&vs));
    assert_eq!(second.step_counts(), vec![40, 40]);
    fs::remove_dir_all(dir).unwrap();
}

fn is_weight(v: &VarInfo) -> bool {
    v.name.ends_with("weight")
}

/// A rule the macro cannot decide (a user function) routes a 4-D conv kernel to Muon: the build
/// refuses it, naming the variable and the rule.
#[test]
fn a_variable_that_is_not_two_dimensional_is_refused_at_build() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = (&root / "conv").var("weight", &[4, 3, 3, 3], nn::Init::Const(0.1));
    let _ = (&root / "fc").var("weight", &[10, 8], nn::Init::Const(0.1));
    let _ = (&root / "fc").var("bias", &[10], nn::Init::Const(0.0));
    let err = case_optimizer! {
        where(is_weight) => Muon<lr: 0.02>,
        _ => AdamW,
    }
    .build(&vs)
    .unwrap_err();
    let text = err.to_string();
    let Error::Rule { source, .. } = err else { panic!("not a rule's error: {text}") };
    match *source {
        Error::UnsupportedVariable { optimizer, ref variable, ref shape, .. } => {
            assert_eq!(optimizer, "Muon");
            assert_eq!(variable, "conv.weight");
            assert_eq!(shape, &[4, 3, 3, 3]);
        }
        ref other => panic!("not UnsupportedVariable: {other}"),
    }
    assert!(text.contains("conv.weight") && text.contains("2-D"), "{text}");

    // Binary matrices may go to Muon too (their values are then no longer +-1): the 2-D rule
    // is about shape only.
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().binary().var("w", &[3, 2], nn::Init::Const(1.0));
    let _ = vs.root().var("b", &[2], nn::Init::Const(0.0));
    let r = case_optimizer! { ndim(2) => Muon, _ => AdamW }.build(&vs);
    assert!(r.is_ok());
}

/// Its saved state is checked against the variable, as every optimizer's.
#[test]
fn a_saved_momentum_buffer_must_fit_the_variable() {
    let w = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let mut muon = Muon::new(MuonConfig::default()).unwrap();
    muon.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let wrong = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    assert!(muon.set_state(0, vec![("momentum_buffer".into(), wrong)]).is_err());
    let right = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    muon.set_state(0, vec![("momentum_buffer".into(), right)]).unwrap();
    assert_eq!(muon.state(0)[0].1.sum(Kind::Float).double_value(&[]), 6.0);
}
