//! `GradScaler` against torch.amp.GradScaler("cpu") 2.13 driving torch.optim (foreach=False),
//! from the fixtures of tests/fixtures/gen_scaler.py: the scale and growth tracker after every
//! update, the skipped steps and every parameter after every step, to the bit. Then the
//! scaler's refusals (docs/mixed-precision.md): each changes nothing.
//!
//! The fixtures were checked identical under ATen's AVX2 and AVX-512 kernels when generated;
//! on a libtorch that rounds otherwise (no fused multiply-add, or another `sqrt`; see
//! docs/parity.md) the parameters are held to a relative 1e-5 instead, the scale and the skips
//! still exactly.

mod parity_support;

use std::collections::BTreeMap;

use caseopt::router::RouterParts;
use caseopt::{
    case_optimizer, Error, Execution, GradScaler, GradScalerConfig, NonFinitePolicy, Param, Router,
    ScaledStep, ScalerError, Sqrt, VarInfo,
};
use parity_support::{fixtures_dir, running_rounding, scaled_error, Rounding};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixtures() -> (Value, BTreeMap<String, Tensor>) {
    let dir = fixtures_dir();
    let text = std::fs::read_to_string(dir.join("scaler_cases.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let tensors = Tensor::read_safetensors(dir.join("scaler.safetensors")).unwrap();
    (meta, tensors.into_iter().collect())
}

fn params(tensors: &BTreeMap<String, Tensor>, n: usize) -> (Vec<Tensor>, Vec<Param>) {
    let vars: Vec<Tensor> =
        (0..n).map(|j| tensors[&format!("p{j}.init")].copy().set_requires_grad(true)).collect();
    let params = vars
        .iter()
        .enumerate()
        .map(|(j, v)| Param::new(VarInfo::of(format!("p{j}"), v), v.shallow_clone()))
        .collect();
    (vars, params)
}

fn scaler_config(case: &Value) -> GradScalerConfig {
    let s = &case["scaler"];
    let d = GradScalerConfig::default();
    GradScalerConfig {
        init_scale: s.get("init_scale").and_then(Value::as_f64).unwrap_or(d.init_scale),
        growth_factor: s.get("growth_factor").and_then(Value::as_f64).unwrap_or(d.growth_factor),
        backoff_factor: s.get("backoff_factor").and_then(Value::as_f64).unwrap_or(d.backoff_factor),
        growth_interval: s["growth_interval"].as_u64().unwrap() as u32,
        enabled: true,
    }
}

/// Trains the case's variables with `opt` through a scaler, comparing every step.
fn run_case<R: RouterParts>(
    mut opt: R,
    vars: &[Tensor],
    case: &Value,
    meta: &Value,
    tensors: &BTreeMap<String, Tensor>,
    exact: bool,
) {
    let name = case["name"].as_str().unwrap();
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let skipped: Vec<usize> =
        case["skipped"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert!(!skipped.is_empty() && skipped.len() < steps, "{name}: the fixture skips some steps");
    let mut scaler = GradScaler::new(scaler_config(case)).unwrap();
    let mut stepped = 0;
    for t in 0..steps {
        opt.zero_grad();
        let zero = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let loss = vars.iter().enumerate().fold(zero, |loss, (j, v)| {
            let g = tensors[&format!("p{j}.grads")].get(t as i64);
            loss + (v * g).sum(Kind::Float)
        });
        scaler.scale(&loss).unwrap().backward();
        let outcome = scaler.step(&mut opt).unwrap();
        let want = if skipped.contains(&t) { ScaledStep::Skipped } else { ScaledStep::Stepped };
        assert_eq!(outcome, want, "{name}: step {t}");
        stepped += u64::from(want == ScaledStep::Stepped);
        assert_eq!(opt.step_counts(), vec![stepped], "{name}: step {t}: a skip moves no count");
        scaler.update().unwrap();
        let scale = case["scales"][t].as_f64().unwrap();
        let tracker = case["growth_trackers"][t].as_i64().unwrap();
        assert_eq!(scaler.scale_factor().unwrap(), scale, "{name}: scale after step {t}");
        assert_eq!(scaler.growth_tracker().unwrap(), tracker, "{name}: tracker after step {t}");
        for (j, v) in vars.iter().enumerate() {
            let want = tensors[&format!("{name}.p{j}.after")].get(t as i64);
            if exact {
                let same = v.view_dtype(Kind::Int).equal(&want.view_dtype(Kind::Int));
                assert!(same, "{name}: p{j} after step {t} differs from torch's bits");
            } else {
                let err = scaled_error(v, &want);
                assert!(err <= 1e-5, "{name}: p{j} after step {t}: error {err}");
            }
        }
    }
    assert_eq!(scaler.skipped_steps(), skipped.len() as u64);
    assert_eq!(scaler.host_reads(), steps as u64, "{name}: one host read per step");
}

#[test]
fn matches_torch_grad_scaler() {
    let (meta, tensors) = fixtures();
    let n = meta["shapes"].as_array().unwrap().len();
    let fixture = Rounding { fused_multiply_add: true, mkl_sqrt: meta["mkl"].as_bool().unwrap() };
    let exact = running_rounding() == fixture;
    if !exact {
        eprintln!("this libtorch rounds otherwise than the fixtures' ({fixture:?}): relative 1e-5");
    }
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let (vars, ps) = params(&tensors, n);
        match case["name"].as_str().unwrap() {
            "sgd_momentum" => {
                let opt = case_optimizer! { _ => Sgd<lr: 0.05, momentum: 0.9> }.build_from(ps);
                run_case(opt.unwrap(), &vars, case, &meta, &tensors, exact);
            }
            "sgd_plain_wd" => {
                let opt = case_optimizer! { _ => Sgd<lr: 0.1, weight_decay: 0.01> }.build_from(ps);
                run_case(opt.unwrap(), &vars, case, &meta, &tensors, exact);
            }
            "adam_default" => {
                let mut opt = case_optimizer! { _ => Adam<lr: 0.01> }.build_from(ps).unwrap();
                // ATen's sqrt, as torch.optim's Adam takes it (docs/parity.md).
                opt.rule0_mut().set_sqrt(Sqrt::Aten);
                run_case(opt, &vars, case, &meta, &tensors, exact);
            }
            "adam_factors" => {
                let mut opt = case_optimizer! { _ => Adam<lr: 0.02, weight_decay: 0.1> }
                    .build_from(ps)
                    .unwrap();
                opt.rule0_mut().set_sqrt(Sqrt::Aten);
                run_case(opt, &vars, case, &meta, &tensors, exact);
            }
            other => panic!("unknown case {other}"),
        }
    }
}

/// A router over two variables `a` and `b` whose loss is `sum(a * ga) + sum(b * gb)`.
fn two_vars() -> (Tensor, Tensor, impl RouterParts) {
    let a = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32, 0.25]).set_requires_grad(true);
    let vars = vec![
        Param::new(VarInfo::of("a", &a), a.shallow_clone()),
        Param::new(VarInfo::of("b", &b), b.shallow_clone()),
    ];
    let opt = case_optimizer! { _ => Adam<lr: 0.1> }.build_from(vars).unwrap();
    (a, b, opt)
}

fn loss(a: &Tensor, b: &Tensor, ga: &[f32], gb: &[f32]) -> Tensor {
    (a * Tensor::from_slice(ga)).sum(Kind::Float) + (b * Tensor::from_slice(gb)).sum(Kind::Float)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t).unwrap()
}

fn scaler_error(e: Error) -> ScalerError {
    match e {
        Error::Scaler(e) => e,
        other => panic!("expected a scaler error, got {other}"),
    }
}

#[test]
fn unscale_once_then_clip_then_step() {
    let (a, b, mut opt) = two_vars();
    let mut scaler = GradScaler::default();
    opt.zero_grad();
    scaler.scale(&loss(&a, &b, &[3.0, 0.0, 0.0], &[0.0, 4.0])).unwrap().backward();
    assert_eq!(values(&a.grad()), [196608.0, 0.0, 0.0]);
    assert!(scaler.unscale(&mut opt).unwrap());
    assert_eq!(values(&a.grad()), [3.0, 0.0, 0.0]);
    // The norm clipping sees is the true one: 5, clipped to 1.
    let norm = opt.clip_grad_norm(1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6, "{norm}");
    let (ga, gb) = (values(&a.grad()), values(&b.grad()));
    // A second unscale in the same step is refused and leaves the gradients alone.
    let err = scaler_error(scaler.unscale(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::AlreadyUnscaled);
    assert_eq!((values(&a.grad()), values(&b.grad())), (ga.clone(), gb.clone()));
    // `step` does not unscale again: the clipped gradients are the ones Adam sees.
    assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Stepped);
    assert_eq!((values(&a.grad()), values(&b.grad())), (ga, gb));
    assert_eq!(opt.step_counts(), vec![1]);
    assert_eq!(scaler.host_reads(), 1, "unscale, clip and step: one read");
    let err = scaler_error(scaler.unscale(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::UnscaleAfterStep);
    let err = scaler_error(scaler.step(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::AlreadyStepped);
    scaler.update().unwrap();
    let err = scaler_error(scaler.update().unwrap_err());
    assert_eq!(err, ScalerError::NothingToUpdate);
    // The router's own policy is back after the scaler's step.
    assert_eq!(opt.non_finite_policy(), NonFinitePolicy::Error);
}

#[test]
fn calls_before_scale_are_refused() {
    let (a, b, mut opt) = two_vars();
    let mut scaler = GradScaler::default();
    loss(&a, &b, &[1.0, 1.0, 1.0], &[1.0, 1.0]).backward();
    let before = values(&a.grad());
    let err = scaler_error(scaler.step(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::NotInitialised { call: "step" });
    let err = scaler_error(scaler.update().unwrap_err());
    assert_eq!(err, ScalerError::NotInitialised { call: "update" });
    assert_eq!((values(&a.grad()), opt.step_counts()), (before, vec![0]));
}

#[test]
fn nan_loss_skips_the_step_and_backs_off() {
    let (a, b, mut opt) = two_vars();
    let mut scaler = GradScaler::default();
    let (a0, b0) = (values(&a), values(&b));
    opt.zero_grad();
    let nan = loss(&a, &b, &[1.0, 1.0, 1.0], &[1.0, 1.0]) * f64::NAN;
    scaler.scale(&nan).unwrap().backward();
    assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Skipped);
    assert_eq!((values(&a), values(&b), opt.step_counts()), (a0, b0, vec![0]));
    scaler.update().unwrap();
    assert_eq!(scaler.scale_factor().unwrap(), 32768.0);
    assert_eq!(scaler.skipped_steps(), 1);
}

#[test]
fn a_scale_that_would_reach_zero_is_refused() {
    let (a, b, mut opt) = two_vars();
    // Twice the smallest subnormal: one backoff halves it, the next would round to zero.
    let tiny = 2.0 * f64::from(f32::from_bits(1));
    let mut scaler =
        GradScaler::new(GradScalerConfig { init_scale: tiny, ..Default::default() }).unwrap();
    let mut nan_step = |scaler: &mut GradScaler| {
        opt.zero_grad();
        let nan = loss(&a, &b, &[1.0, 1.0, 1.0], &[1.0, 1.0]) * f64::NAN;
        scaler.scale(&nan).unwrap().backward();
        assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Skipped);
    };
    nan_step(&mut scaler);
    scaler.update().unwrap();
    assert_eq!(scaler.scale_factor().unwrap(), f64::from(f32::from_bits(1)));
    nan_step(&mut scaler);
    let err = scaler_error(scaler.update().unwrap_err());
    assert_eq!(err, ScalerError::ScaleUnderflow { scale: f32::from_bits(1), skipped: 2 });
    // Nothing changed: the scale stays, and the step is still waiting for its update.
    assert_eq!(scaler.scale_factor().unwrap(), f64::from(f32::from_bits(1)));
    assert_eq!(scaler_error(scaler.unscale(&mut opt).unwrap_err()), ScalerError::UnscaleAfterStep);
    // A scale set by hand ends the step.
    scaler.update_to(1024.0).unwrap();
    assert_eq!(scaler.scale_factor().unwrap(), 1024.0);
}

#[test]
fn a_scale_never_overflows() {
    let (a, b, mut opt) = two_vars();
    let config = GradScalerConfig {
        init_scale: 1e30,
        growth_factor: 1e30,
        growth_interval: 1,
        ..Default::default()
    };
    let mut scaler = GradScaler::new(config).unwrap();
    opt.zero_grad();
    scaler.scale(&loss(&a, &b, &[1e-30, 0.0, 0.0], &[0.0, 0.0])).unwrap().backward();
    assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Stepped);
    scaler.update().unwrap();
    // 1e60 is no f32: the scale stays (torch's rule) and the tracker restarts.
    assert_eq!(scaler.scale_factor().unwrap(), f64::from(1e30f32));
    assert_eq!(scaler.growth_tracker().unwrap(), 0);
    // Scales that are no finite positive f32 are refused wherever they come in.
    for bad in [f64::INFINITY, 1e39, f64::NAN, 0.0, -1.0, 1e-50] {
        let config = GradScalerConfig { init_scale: bad, ..Default::default() };
        assert!(matches!(
            scaler_error(GradScaler::new(config).unwrap_err()),
            ScalerError::InvalidConfig { name: "init_scale", .. }
        ));
        assert!(scaler.update_to(bad).is_err());
        let mut state = scaler.state().unwrap();
        state.scale = bad as f32;
        assert!(scaler.load_state(&state).is_err());
    }
    assert_eq!(scaler.scale_factor().unwrap(), f64::from(1e30f32));
    for (growth, backoff, interval) in [(1.0, 0.5, 1), (2.0, 1.0, 1), (2.0, 0.0, 1), (2.0, 0.5, 0)]
    {
        let config = GradScalerConfig {
            growth_factor: growth,
            backoff_factor: backoff,
            growth_interval: interval,
            ..Default::default()
        };
        assert!(GradScaler::new(config).is_err(), "{growth} {backoff} {interval}");
    }
}

#[test]
fn one_router_per_step() {
    let (a, b, mut first) = two_vars();
    let (c, d, mut second) = two_vars();
    let mut scaler = GradScaler::default();
    first.zero_grad();
    second.zero_grad();
    scaler.scale(&loss(&a, &b, &[1.0, 1.0, 1.0], &[1.0, 1.0])).unwrap().backward();
    scaler.scale(&loss(&c, &d, &[1.0, 1.0, 1.0], &[1.0, 1.0])).unwrap().backward();
    assert!(scaler.unscale(&mut first).unwrap());
    let scaled = values(&c.grad());
    for err in [scaler.unscale(&mut second).unwrap_err(), scaler.step(&mut second).unwrap_err()] {
        assert_eq!(scaler_error(err), ScalerError::OtherRouter);
    }
    assert_eq!((values(&c.grad()), second.step_counts()), (scaled, vec![0]));
    scaler.step(&mut first).unwrap();
    scaler.update().unwrap();
    // After the update, the next step may belong to the other router.
    assert_eq!(scaler.step(&mut second).unwrap(), ScaledStep::Stepped);
    assert_eq!(second.step_counts(), vec![1]);
}

#[test]
fn half_gradients_are_refused() {
    let w = Tensor::from_slice(&[1.0f32, 2.0]).to_kind(Kind::Half).set_requires_grad(true);
    let vars = vec![Param::new(VarInfo::of("w", &w), w.shallow_clone())];
    // An f16 variable trains only with f32 state (`master_weights`); its gradient is still f16.
    let mut opt =
        case_optimizer! { _ => Sgd<lr: 0.1, master_weights: true> }.build_from(vars).unwrap();
    let mut scaler =
        GradScaler::new(GradScalerConfig { init_scale: 4.0, ..Default::default() }).unwrap();
    scaler.scale(&w.sum(Kind::Float)).unwrap().backward();
    let err = scaler_error(scaler.step(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::HalfGradient { variable: "w".into() });
    assert_eq!(Vec::<f32>::try_from(w.grad().to_kind(Kind::Float)).unwrap(), [4.0, 4.0]);
    assert_eq!(opt.step_counts(), vec![0]);
}

#[test]
fn no_gradient_is_refused() {
    let (_a, _b, mut opt) = two_vars();
    let mut scaler = GradScaler::default();
    let _ = scaler.scale(&Tensor::from(1.0f32)).unwrap();
    let err = scaler_error(scaler.step(&mut opt).unwrap_err());
    assert_eq!(err, ScalerError::NoGradients);
}

#[test]
fn state_resumes_bit_for_bit() {
    let config = GradScalerConfig { growth_interval: 2, ..Default::default() };
    // Growth across the resumption (the tracker carries), overflow, NaN: the scale goes above
    // and below its start.
    let grads: [[f32; 3]; 7] = [
        [1.0, 2.0, 3.0],
        [0.5, 0.5, 0.5],
        [f32::INFINITY, 1.0, 1.0],
        [0.25, -1.0, 2.0],
        [3.0, 2.0, 1.0],
        [1e38, 1.0, 1.0],
        [f32::NAN, 1.0, 1.0],
    ];
    let run = |from: usize, scaler: &mut GradScaler, a: &Tensor, b: &Tensor, opt: &mut _| {
        let mut scales = Vec::new();
        for g in &grads[from..] {
            Router::zero_grad(opt);
            scaler.scale(&loss(a, b, g, &[1.0, 1.0])).unwrap().backward();
            scaler.step(opt).unwrap();
            scaler.update().unwrap();
            scales.push((scaler.scale_factor().unwrap(), scaler.growth_tracker().unwrap()));
        }
        scales
    };
    let (a, b, mut opt) = two_vars();
    let mut whole = GradScaler::new(config).unwrap();
    let all = run(0, &mut whole, &a, &b, &mut opt);
    assert!(all.iter().any(|&(s, _)| s > 65536.0) && all.iter().any(|&(s, _)| s < 65536.0));

    let mut resumed = GradScaler::new(GradScalerConfig::default()).unwrap();
    // Stopped after four steps: a fresh scaler given the state goes on as the first would.
    let mut prefix = GradScaler::new(config).unwrap();
    let (e, f, mut third) = two_vars();
    let mut early = Vec::new();
    for g in &grads[..4] {
        Router::zero_grad(&mut third);
        prefix.scale(&loss(&e, &f, g, &[1.0, 1.0])).unwrap().backward();
        prefix.step(&mut third).unwrap();
        prefix.update().unwrap();
        early.push((prefix.scale_factor().unwrap(), prefix.growth_tracker().unwrap()));
    }
    resumed.load_state(&prefix.state().unwrap()).unwrap();
    assert_eq!(resumed.config(), config);
    early.extend(run(4, &mut resumed, &e, &f, &mut third));
    assert_eq!(early, all);
    assert_eq!(values(&e), values(&a));
}

#[test]
fn disabled_is_a_pass_through() {
    let (a, b, mut opt) = two_vars();
    let mut scaler =
        GradScaler::new(GradScalerConfig { enabled: false, ..Default::default() }).unwrap();
    let l = loss(&a, &b, &[1.0, 1.0, 1.0], &[1.0, 1.0]);
    let scaled = scaler.scale(&l).unwrap();
    assert_eq!(scaled.double_value(&[]), l.double_value(&[]));
    scaled.backward();
    assert!(scaler.unscale(&mut opt).unwrap());
    assert_eq!(values(&a.grad()), [1.0, 1.0, 1.0]);
    assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Stepped);
    scaler.update().unwrap();
    assert_eq!((opt.step_counts(), scaler.scale_factor().unwrap()), (vec![1], 1.0));
    assert_eq!(scaler.host_reads(), 0);
}
