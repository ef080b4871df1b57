//! The gradient scaler's state in the router's checkpoint (format version 2, issue 24):
//! a run saved mid-way (after a skipped step and a growth of the scale) with `save_scaled` and
//! resumed with `load_scaled` into a fresh model, router and scaler equals the uninterrupted
//! run bit for bit; and the refusals: a scaled file loaded without its scaler, a plain file
//! loaded with one, a save or load in the middle of a step, a disabled scaler's file into an
//! enabled scaler, a file that does not fit the router (the scaler left as it was).

use caseopt::{
    case_optimizer, checkpoint_info, load_scaled, load_training, save_scaled, save_training,
    Checkpoint, CheckpointError, Error, GradScaler, GradScalerConfig, GradScalerState, PathExt,
    Router, ScaledStep, ScalerError,
};
use tch::{nn, Device, Kind, Tensor};

case_optimizer! {
    struct Rules { binary => Bop<threshold: 1e-6, gamma: 1e-2>, _ => Adam<lr: 0.01> }
}

case_optimizer! {
    struct Other { binary => Bop<threshold: 1e-6, gamma: 1e-2>, _ => Sgd<lr: 0.01> }
}

const STEPS: usize = 16;
/// The run is saved after this many steps: step 2 was skipped, the scale grew after step 5.
const SAVED_AT: usize = 8;
/// Steps whose loss is made infinite or NaN.
const NON_FINITE: [usize; 3] = [2, 9, 13];

/// A small binarized model: a 1-bit kernel (+-1), a real scale and a real bias.
fn model() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = (&root / "dense").binary().var("weight", &[6, 4], nn::Init::Const(1.0));
    let a = (&root / "dense").var("scale", &[6], nn::Init::Const(0.5));
    let b = (&root / "dense").var("bias", &[6], nn::Init::Const(0.0));
    tch::no_grad(|| {
        let x = Tensor::arange(24, (Kind::Float, Device::Cpu)).sin();
        let signs = (x.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0).view([6, 4]);
        w.shallow_clone().copy_(&signs);
        a.shallow_clone().copy_(&(Tensor::arange(6, (Kind::Float, Device::Cpu)) * 0.1));
        let _ = b;
    });
    vs
}

fn loss(vs: &nn::VarStore, t: usize) -> Tensor {
    let vars = vs.variables();
    let x = (Tensor::arange(32, (Kind::Float, Device::Cpu)) * (t as f64 + 1.0)).sin().view([8, 4]);
    let y = (Tensor::arange(48, (Kind::Float, Device::Cpu)) * 0.37 + t as f64).cos().view([8, 6]);
    let h = x.matmul(&vars["dense.weight"].tr()) * &vars["dense.scale"] + &vars["dense.bias"];
    let l = (h.tanh() - y).square().mean(Kind::Float);
    match t {
        2 | 13 => l * f64::INFINITY,
        9 => l * f64::NAN,
        _ => l,
    }
}

fn config() -> GradScalerConfig {
    GradScalerConfig { init_scale: 1024.0, growth_interval: 3, ..Default::default() }
}

/// Steps `from..to`, returning each step's outcome and the scale after its update.
fn train(
    vs: &nn::VarStore,
    opt: &mut Rules,
    scaler: &mut GradScaler,
    from: usize,
    to: usize,
) -> Vec<(ScaledStep, f64)> {
    (from..to)
        .map(|t| {
            Router::zero_grad(opt);
            scaler.scale(&loss(vs, t)).unwrap().backward();
            let outcome = scaler.step(opt).unwrap();
            scaler.update().unwrap();
            (outcome, scaler.scale_factor().unwrap())
        })
        .collect()
}

/// Every model variable, optimizer state tensor and step count, as bytes.
fn snapshot(vs: &nn::VarStore, opt: &Rules) -> Vec<(String, Vec<u8>)> {
    let bytes = |t: &Tensor| {
        let t = t.contiguous();
        let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut out, t.numel());
        out
    };
    let mut out: Vec<(String, Vec<u8>)> =
        vs.variables().iter().map(|(n, t)| (format!("model/{n}"), bytes(t))).collect();
    for rule in 0..2 {
        let o = opt.optimizer(rule).unwrap();
        for (i, p) in o.params().iter().enumerate() {
            for (s, t) in o.state(i) {
                out.push((format!("{rule}/{}/{s}", p.info.name), bytes(&t)));
            }
        }
        out.push((format!("{rule}/step_count"), o.step_count().to_le_bytes().to_vec()));
    }
    out.sort();
    out
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("caseopt-scaler-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn problem(e: Error) -> CheckpointError {
    match e {
        Error::BadCheckpoint { problem, .. } => problem,
        other => panic!("expected a checkpoint error, got {other}"),
    }
}

#[test]
fn a_scaled_run_resumes_bit_for_bit() {
    // Uninterrupted.
    let vs = model();
    let mut opt = Rules::build(&vs).unwrap();
    let mut scaler = GradScaler::new(config()).unwrap();
    let first = train(&vs, &mut opt, &mut scaler, 0, SAVED_AT);
    // What the saved state holds: a skipped step and a growth before it.
    assert_eq!(first[2], (ScaledStep::Skipped, 512.0));
    assert_eq!(first[5], (ScaledStep::Stepped, 1024.0));
    assert_eq!(first[7].1, 1024.0);
    assert_eq!(scaler.growth_tracker().unwrap(), 2);
    let path = temp("resume.safetensors");
    save_scaled(&path, Some(&vs), &opt, &scaler).unwrap();
    assert_eq!(checkpoint_info(&path).unwrap().version, 2);
    let rest = train(&vs, &mut opt, &mut scaler, SAVED_AT, STEPS);
    let skipped: Vec<usize> = first
        .iter()
        .chain(&rest)
        .enumerate()
        .filter(|(_, (o, _))| *o == ScaledStep::Skipped)
        .map(|(t, _)| t)
        .collect();
    assert_eq!(skipped, NON_FINITE);
    // The tracker carried across the save makes the scale grow at the first step after it.
    assert_eq!(rest[0].1, 2048.0);

    // Resumed: a fresh model, router and scaler of another configuration.
    let vs2 = model();
    tch::no_grad(|| vs2.variables().values().for_each(|v| drop(v.shallow_clone().fill_(0.25))));
    let mut opt2 = Rules::build(&vs2).unwrap();
    let mut scaler2 = GradScaler::default();
    load_scaled(&path, Some(&vs2), &mut opt2, &mut scaler2).unwrap();
    // The loaded state's factors (the initial scale is the new scaler's own configuration).
    assert_eq!(scaler2.config(), GradScalerConfig { init_scale: 65536.0, ..config() });
    let saved = GradScalerState {
        scale: 1024.0,
        growth_tracker: 2,
        growth_factor: 2.0,
        backoff_factor: 0.5,
        growth_interval: 3,
    };
    assert_eq!(scaler2.state().unwrap(), saved);
    let rest2 = train(&vs2, &mut opt2, &mut scaler2, SAVED_AT, STEPS);
    assert_eq!(rest2, rest);
    assert_eq!(scaler2.state().unwrap(), scaler.state().unwrap());
    assert_eq!(snapshot(&vs2, &opt2), snapshot(&vs, &opt));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_scaler_is_never_dropped_or_invented_silently() {
    let vs = model();
    let mut opt = Rules::build(&vs).unwrap();
    let mut scaler = GradScaler::new(config()).unwrap();
    train(&vs, &mut opt, &mut scaler, 0, 4);
    let scaled = temp("scaled.safetensors");
    let plain = temp("plain.safetensors");
    save_scaled(&scaled, Some(&vs), &opt, &scaler).unwrap();
    save_training(&plain, &vs, &opt).unwrap();
    let before = snapshot(&vs, &opt);

    // A scaled file without the scaler: refused, nothing changed.
    let e = problem(load_training(&scaled, &vs, &mut opt).unwrap_err());
    assert_eq!(e, CheckpointError::ScalerNotLoaded);
    let e = problem(opt.load_checkpoint(&scaled).unwrap_err());
    assert_eq!(e, CheckpointError::ScalerNotLoaded);
    // A plain file with a scaler: refused, scaler unchanged.
    let mut other = GradScaler::default();
    let e = problem(load_scaled(&plain, Some(&vs), &mut opt, &mut other).unwrap_err());
    assert_eq!(e, CheckpointError::NoScaler);
    assert_eq!(other.state().unwrap(), GradScaler::default().state().unwrap());
    // The router alone, with the scaler.
    load_scaled(&scaled, None, &mut opt, &mut other).unwrap();
    assert_eq!(other.state().unwrap(), scaler.state().unwrap());

    // A file that does not fit the router: the scaler too is left as it was.
    let mut fresh = GradScaler::default();
    let vs3 = model();
    let mut wrong = Other::build(&vs3).unwrap();
    let e = problem(load_scaled(&scaled, None, &mut wrong, &mut fresh).unwrap_err());
    assert!(matches!(e, CheckpointError::RulesDiffer { .. }), "{e}");
    assert_eq!(fresh.state().unwrap(), GradScaler::default().state().unwrap());

    // A disabled scaler's file into an enabled scaler is refused; into a disabled one, fine.
    let disabled = GradScaler::new(GradScalerConfig { enabled: false, ..config() }).unwrap();
    let off = temp("disabled.safetensors");
    save_scaled(&off, None, &opt, &disabled).unwrap();
    let e = problem(load_scaled(&off, None, &mut opt, &mut fresh).unwrap_err());
    assert!(matches!(e, CheckpointError::BadScaler(_)), "{e}");
    let mut also_off = GradScaler::new(GradScalerConfig { enabled: false, ..config() }).unwrap();
    load_scaled(&off, None, &mut opt, &mut also_off).unwrap();
    assert_eq!(snapshot(&vs, &opt), before);
    for p in [scaled, plain, off] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn mid_step_saves_and_loads_are_refused() {
    let vs = model();
    let mut opt = Rules::build(&vs).unwrap();
    let mut scaler = GradScaler::new(config()).unwrap();
    let path = temp("mid.safetensors");
    Router::zero_grad(&mut opt);
    scaler.scale(&loss(&vs, 0)).unwrap().backward();
    scaler.unscale(&mut opt).unwrap();
    let refused = |e: Error| match e {
        Error::Scaler(e) => e,
        other => panic!("expected a scaler error, got {other}"),
    };
    let e = refused(save_scaled(&path, Some(&vs), &opt, &scaler).unwrap_err());
    assert_eq!(e, ScalerError::MidStep { call: "save_scaled" });
    assert!(!path.exists());
    assert_eq!(scaler.step(&mut opt).unwrap(), ScaledStep::Stepped);
    let e = refused(save_scaled(&path, Some(&vs), &opt, &scaler).unwrap_err());
    assert_eq!(e, ScalerError::MidStep { call: "save_scaled" });
    scaler.update().unwrap();
    save_scaled(&path, Some(&vs), &opt, &scaler).unwrap();
    // Loading in the middle of a step: refused before the file is read.
    Router::zero_grad(&mut opt);
    scaler.scale(&loss(&vs, 1)).unwrap().backward();
    scaler.unscale(&mut opt).unwrap();
    let e = refused(load_scaled(&path, Some(&vs), &mut opt, &mut scaler).unwrap_err());
    assert_eq!(e, ScalerError::MidStep { call: "load_scaled" });
    scaler.step(&mut opt).unwrap();
    scaler.update().unwrap();
    load_scaled(&path, Some(&vs), &mut opt, &mut scaler).unwrap();
    assert_eq!(opt.step_counts(), vec![1, 1]);
    let _ = std::fs::remove_file(&path);
}
