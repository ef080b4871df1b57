//! Half-precision variables (issue 24, item 2): f16 and bf16 variables train with f32 state
//! and, where the algorithm needs one, an f32 master copy, when their rule says
//! `master_weights: true`; without it a router refuses them by name. Through the macro:
//! Adam with a master copy on a bf16 variable is f32 Adam's master trajectory rounded to bf16,
//! bit for bit; Bop on a bf16 binary kernel keeps only its f32 momentum and makes f32 Bop's
//! signs; a checkpoint resumes it exactly; and each optimizer's bytes per parameter, measured
//! from its state tensors, are the ones docs/mixed-precision.md states.

use caseopt::{
    case_optimizer, load_training, save_training, Adagrad, AdagradConfig, Adam, AdamConfig, AdamW,
    Backend, Bop, Bop2ndOrder, Error, Execution, FromConfig, NAdam, Optimizer, Param, PathExt,
    RAdam, RmsProp, RmsPropConfig, Router, Sgd, SgdConfig, VarInfo,
};
use tch::{nn, Device, Kind, Tensor};

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn state<O: Optimizer + ?Sized>(opt: &O, index: usize, name: &str) -> Tensor {
    opt.state(index)
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no state `{name}`"))
}

/// Deterministic values of `shape` without libtorch's global generator (tests run on
/// parallel threads that would share it): a sine of the index, scaled by `scale`.
fn wave(seed: i64, shape: &[i64], scale: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let x = Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.7548776662 + seed as f64 * 0.5698);
    (x.sin() * scale).to_kind(Kind::Float).view(shape)
}

/// Step `t`'s gradient, rounded to bf16 (so that the f32 reference sees the same values).
fn grad(t: i64, shape: &[i64]) -> Tensor {
    wave(1000 + t, shape, 0.1).to_kind(Kind::BFloat16)
}

/// +-1 of `shape`, deterministic.
fn signs(seed: i64, shape: &[i64]) -> Tensor {
    wave(seed, shape, 1.0).ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0
}

#[test]
fn adam_with_a_master_copy_is_f32_adams_master_rounded_to_bf16() {
    let vs = nn::VarStore::new(Device::Cpu);
    let init = wave(7, &[257], 1.5).to_kind(Kind::BFloat16);
    let w = vs.root().add("w", init.copy(), true);
    let mut opt = case_optimizer! { _ => Adam<lr: 0.01, weight_decay: 0.01, master_weights: true> }
        .build(&vs)
        .unwrap();
    // The reference: f32 Adam, op for op on ATen (the master copy steps on ATen's ops).
    let r = init.to_kind(Kind::Float);
    let mut reference =
        Adam::new(AdamConfig { lr: 0.01.into(), weight_decay: 0.01.into(), ..Default::default() })
            .unwrap();
    reference.set_backend(Backend::Torch);
    reference.add_param(Param::new(VarInfo::of("w", &r), r.shallow_clone())).unwrap();
    for t in 0..30 {
        let g = grad(t, &[257]);
        opt.backward_step(&(&w * &g).sum(Kind::Float)).unwrap();
        reference.step_with_grads(&[Some(g.to_kind(Kind::Float))]).unwrap();
        assert_eq!(w.kind(), Kind::BFloat16);
        assert_eq!(bytes(&w), bytes(&r.to_kind(Kind::BFloat16)), "step {t}: the variable");
        let adam = opt.optimizer(0).unwrap();
        assert_eq!(bytes(&state(adam, 0, "master")), bytes(&r), "step {t}: the master copy");
        for s in ["exp_avg", "exp_avg_sq"] {
            let mine = state(adam, 0, s);
            assert_eq!(mine.kind(), Kind::Float, "{s} is f32");
            assert_eq!(bytes(&mine), bytes(&state(&reference, 0, s)), "step {t}: {s}");
        }
    }
    assert_eq!(opt.step_counts(), vec![30]);
}

#[test]
fn bop_on_a_bf16_kernel_keeps_only_f32_momentum_and_makes_f32_bops_signs() {
    let vs = nn::VarStore::new(Device::Cpu);
    let signs = signs(11, &[16, 32]);
    let k = vs.root().binary().add("kernel", signs.to_kind(Kind::BFloat16), true);
    let b = vs.root().var("bias", &[16], nn::Init::Const(0.0));
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-2, master_weights: true>,
        _ => Adam<lr: 0.01>,
    }
    .build(&vs)
    .unwrap();
    let r = signs.copy();
    let mut reference = <Bop as FromConfig>::from_config(caseopt::BopConfig {
        threshold: 1e-6.into(),
        gamma: 1e-2.into(),
    })
    .unwrap();
    reference
        .add_param(Param::new(VarInfo::of("kernel", &r).with_bits(1), r.shallow_clone()))
        .unwrap();
    let mut flips = 0.0;
    for t in 0..25 {
        let g = grad(t, &[16, 32]);
        let loss = (&k * &g).sum(Kind::Float) + b.sum(Kind::Float);
        opt.backward_step(&loss).unwrap();
        reference.step_with_grads(&[Some(g.to_kind(Kind::Float))]).unwrap();
        assert_eq!(k.kind(), Kind::BFloat16);
        assert_eq!(bytes(&k.to_kind(Kind::Float)), bytes(&r), "step {t}: the signs");
        let bop = opt.optimizer(0).unwrap();
        let names: Vec<&str> = bop.state(0).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["m"], "Bop keeps its momentum and nothing else");
        let m = state(bop, 0, "m");
        assert_eq!(m.kind(), Kind::Float);
        assert_eq!(bytes(&m), bytes(&state(&reference, 0, "m")), "step {t}: the momentum");
        flips += opt.flip_ratios().unwrap().map_or(0.0, |f| f.total);
    }
    assert!(flips > 0.0, "Bop flipped nothing: the test would prove little");
}

#[test]
fn a_half_variable_without_master_weights_is_refused_by_name() {
    let rule_error = |e: Error| match e {
        Error::Rule { source, .. } => *source,
        other => panic!("expected a rule's error, got {other}"),
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let _b = vs.root().var("bias", &[4], nn::Init::Const(0.0));
    let _w =
        (vs.root() / "fc").add("weight", Tensor::ones([4, 4], (Kind::BFloat16, Device::Cpu)), true);
    let e = rule_error(case_optimizer! { _ => Adam<lr: 0.01> }.build(&vs).unwrap_err());
    match e {
        Error::UntrainableDtype { variable, dtype, optimizer, reason } => {
            assert_eq!((variable.as_str(), dtype, optimizer), ("fc.weight", "bf16", "Adam"));
            assert!(reason.contains("master_weights: true"), "{reason}");
        }
        other => panic!("expected UntrainableDtype, got {other}"),
    }
    // Bop on an f16 kernel, likewise.
    let vs = nn::VarStore::new(Device::Cpu);
    let _k = vs.root().binary().add("k", Tensor::ones([4], (Kind::Half, Device::Cpu)), true);
    let e = rule_error(case_optimizer! { _ => Bop }.build(&vs).unwrap_err());
    assert!(
        matches!(&e, Error::UntrainableDtype { variable, dtype: "f16", optimizer: "Bop", .. } if variable == "k"),
        "{e}"
    );
    // A half variable added after the build: the step refuses it and changes nothing.
    let vs = nn::VarStore::new(Device::Cpu);
    let a = vs.root().var("a", &[3], nn::Init::Const(1.0));
    let mut opt = case_optimizer! { _ => Sgd<lr: 0.5> }.build(&vs).unwrap();
    let late = vs.root().add("late", Tensor::ones([3], (Kind::BFloat16, Device::Cpu)), true);
    let loss = a.sum(Kind::Float) + late.sum(Kind::Float);
    let e = opt.backward_step(&loss).unwrap_err();
    assert!(matches!(&e, Error::UntrainableDtype { variable, .. } if variable == "late"), "{e}");
    assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [1.0; 3]);
    assert_eq!(opt.step_counts(), vec![0]);
    assert_eq!(opt.routing_table().routes().len(), 1);
}

#[test]
fn a_checkpoint_resumes_half_precision_training_bit_for_bit() {
    case_optimizer! {
        struct Half {
            binary => Bop<threshold: 1e-6, gamma: 1e-2, master_weights: true>,
            _ => Adam<lr: 0.01, master_weights: true>,
        }
    }
    let model = || {
        let vs = nn::VarStore::new(Device::Cpu);
        let signs = signs(3, &[8, 8]);
        let _ = vs.root().binary().add("k", signs.to_kind(Kind::BFloat16), true);
        let _ = vs.root().add("s", Tensor::ones([8], (Kind::BFloat16, Device::Cpu)), true);
        vs
    };
    let train = |vs: &nn::VarStore, opt: &mut Half, from: i64, to: i64| {
        let v = vs.variables();
        for t in from..to {
            let loss = ((&v["k"] * &grad(t, &[8, 8])).sum(Kind::Float)
                + (&v["s"] * &grad(t + 500, &[8])).square().sum(Kind::Float))
                * 0.5;
            opt.backward_step(&loss).unwrap();
        }
    };
    let snapshot = |vs: &nn::VarStore, opt: &Half| {
        let mut out: Vec<(String, Vec<u8>)> =
            vs.variables().iter().map(|(n, t)| (n.clone(), bytes(t))).collect();
        for rule in 0..2 {
            let o = opt.optimizer(rule).unwrap();
            for i in 0..o.params().len() {
                for (s, t) in o.state(i) {
                    out.push((format!("{rule}/{i}/{s}/{:?}", t.kind()), bytes(&t)));
                }
            }
        }
        out.sort();
        out
    };
    let vs = model();
    let mut opt = Half::build(&vs).unwrap();
    train(&vs, &mut opt, 0, 6);
    let path =
        std::env::temp_dir().join(format!("caseopt-half-{}.safetensors", std::process::id()));
    save_training(&path, &vs, &opt).unwrap();
    let at_save = snapshot(&vs, &opt);
    train(&vs, &mut opt, 6, 12);

    let vs2 = model();
    let mut opt2 = Half::build(&vs2).unwrap();
    load_training(&path, &vs2, &mut opt2).unwrap();
    assert_eq!(snapshot(&vs2, &opt2), at_save, "the load restores the saved state");
    train(&vs2, &mut opt2, 6, 12);
    let (a, b) = (snapshot(&vs, &opt), snapshot(&vs2, &opt2));
    assert!(a.iter().any(|(n, _)| n.ends_with("/master/Float")), "the master copy is state");
    assert_eq!(a, b);
    let _ = std::fs::remove_file(&path);
}

/// The bytes each parameter of a 1000-element variable of `kind` costs under `O` after one
/// step: the variable and every state tensor shaped like it (0-dim step counters left out).
fn bytes_per_parameter<O: Optimizer + FromConfig>(config: O::Config, kind: Kind) -> f64 {
    let w = wave(1, &[1000], 0.1).to_kind(kind);
    let mut opt = O::from_config(config).unwrap();
    assert!(opt.set_master_weights(kind != Kind::Float).unwrap());
    opt.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    let g = wave(2, &[1000], 0.1).to_kind(kind);
    opt.step_with_grads(&[Some(g)]).unwrap();
    let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let state: usize =
        opt.state(0).iter().filter(|(_, t)| t.numel() == 1000).map(|(_, t)| size(t)).sum();
    (size(&w) + state) as f64 / 1000.0
}

#[test]
fn bytes_per_parameter_are_the_documented_ones() {
    let momentum = || SgdConfig { lr: 0.1.into(), momentum: 0.9.into(), ..Default::default() };
    let rms = || RmsPropConfig { momentum: 0.9.into(), ..Default::default() };
    // (optimizer, bf16 with master_weights, f32)
    let rows: Vec<(&str, f64, f64)> = vec![
        (
            "Bop",
            bytes_per_parameter::<Bop>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<Bop>(Default::default(), Kind::Float),
        ),
        (
            "Bop2ndOrder",
            bytes_per_parameter::<Bop2ndOrder>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<Bop2ndOrder>(Default::default(), Kind::Float),
        ),
        (
            "SGD (momentum)",
            bytes_per_parameter::<Sgd>(momentum(), Kind::BFloat16),
            bytes_per_parameter::<Sgd>(momentum(), Kind::Float),
        ),
        (
            "Adam",
            bytes_per_parameter::<Adam>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<Adam>(Default::default(), Kind::Float),
        ),
        (
            "AdamW",
            bytes_per_parameter::<AdamW>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<AdamW>(Default::default(), Kind::Float),
        ),
        (
            "RAdam",
            bytes_per_parameter::<RAdam>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<RAdam>(Default::default(), Kind::Float),
        ),
        (
            "NAdam",
            bytes_per_parameter::<NAdam>(Default::default(), Kind::BFloat16),
            bytes_per_parameter::<NAdam>(Default::default(), Kind::Float),
        ),
        (
            "RMSprop (momentum)",
            bytes_per_parameter::<RmsProp>(rms(), Kind::BFloat16),
            bytes_per_parameter::<RmsProp>(rms(), Kind::Float),
        ),
        (
            "Adagrad",
            bytes_per_parameter::<Adagrad>(AdagradConfig::default(), Kind::BFloat16),
            bytes_per_parameter::<Adagrad>(AdagradConfig::default(), Kind::Float),
        ),
    ];
    println!("| optimizer | bf16, master_weights | f32 |");
    for (name, half, full) in &rows {
        println!("| {name} | {half} | {full} |");
    }
    let expected = [
        ("Bop", 6.0, 8.0),
        ("Bop2ndOrder", 10.0, 12.0),
        ("SGD (momentum)", 10.0, 8.0),
        ("Adam", 14.0, 12.0),
        ("AdamW", 14.0, 12.0),
        ("RAdam", 14.0, 12.0),
        ("NAdam", 14.0, 12.0),
        ("RMSprop (momentum)", 14.0, 12.0),
        ("Adagrad", 10.0, 8.0),
    ];
    assert_eq!(rows, expected);
}
