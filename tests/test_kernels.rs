//! The fused CPU kernels against the libtorch path, and the choice between them.
//!
//! tests/test_parity.rs compares both paths with torch.optim on small tensors; here every
//! optimizer with a kernel runs on tensors large enough to split across threads (about 900K
//! elements, odd sizes, an empty one), in f32 and f64, and each path is forced through
//! `set_backend`: `Backend::Fused` fails instead of falling back, so a passing fused run proves
//! the kernels did the work. The configurations are the reference fixtures' cases of every
//! optimizer the registry says has a kernel (so a new kernel is covered without a line here).
//! Kernels must agree with libtorch bit for bit (parameters and state), but for Adam and AdamW
//! (their default square root, `FUSED_SQRT`): within the parity tolerances (f32 1e-6, f64 1e-12,
//! scaled by max(|x|, 1)).
//! Then: what Auto hands to libtorch (strided views, half precision, aliasing operands), what
//! Fused refuses, gradient errors on every path, thread counts, and state moving between paths.

// The tests of the fused path itself are `cfg(feature = "fused")`; without it their helpers
// are unused.
#![cfg_attr(not(feature = "fused"), allow(dead_code, unused_imports))]

mod parity_support;

use caseopt::{Backend, Error, Execution, Optimizer, Param, Schedule, Sgd, SgdConfig, VarInfo};
use parity_support::{fixtures_dir, lr_schedule, FUSED_SQRT};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Shapes of one test model: large enough for three threads (more than 3 x 2^18 elements in
/// all), sizes that are no multiple of a vector width, an empty tensor and a scalar-like one.
const SHAPES: &[&[i64]] = &[&[600, 1000], &[300_001], &[7], &[0], &[3, 4, 5]];
const STEPS: i64 = 5;

/// One optimizer configuration under test: a case of the reference fixtures.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    optimizer: String,
    config: Value,
    schedule: Option<Schedule>,
}

/// The configurations under test: every case of the reference fixtures whose optimizer has a
/// fused kernel, as the registry says (none in a build without the `fused` feature). An
/// optimizer given a kernel is tested here by its fixture cases, without a line of its own.
fn cases() -> Vec<Case> {
    all_cases().into_iter().filter(|c| parity_support::has_fused_kernel(&c.optimizer)).collect()
}

/// Every case of the reference fixtures (parity_cases.json and each fixture of the common
/// trajectory format, see tests/test_references.rs).
fn all_cases() -> Vec<Case> {
    let mut files = vec![fixtures_dir().join("parity_cases.json")];
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.to_string_lossy().ends_with("_cases.json")
            && text.contains("\"caseopt-trajectories/1\"")
        {
            files.push(path);
        }
    }
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for c in meta["cases"].as_array().unwrap() {
            let optimizer = c["optimizer"].as_str().unwrap();
            let mut config = c["config"].clone();
            let schedule = lr_schedule(c);
            if schedule.is_some() {
                config.as_object_mut().unwrap().remove("lr");
            }
            out.push(Case {
                name: c["name"].as_str().unwrap().to_string(),
                optimizer: optimizer.to_string(),
                config,
                schedule,
            });
        }
    }
    out
}

/// The fixture case `name` (the tests below that need one configuration name theirs).
fn case(name: &str) -> Case {
    all_cases().into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// The case's optimizer, from the registry, on `backend` with `threads` kernel threads.
fn make(case: &Case, backend: Backend, threads: usize) -> Box<dyn Optimizer> {
    let entry = caseopt::builtin(&case.optimizer).unwrap();
    let mut opt = entry.build(&case.config).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    if let Some(s) = &case.schedule {
        opt.set_hyperparameter("lr", s.clone()).unwrap();
    }
    opt.set_backend(backend);
    opt.set_threads(threads);
    opt
}

/// Whether the case's optimizer trains binary variables (Bop and Bop2ndOrder).
fn is_bop(case: &Case) -> bool {
    case.optimizer.starts_with("Bop")
}

/// The initial values of the model (binary for Bop, with one non-binary element that the
/// first step binarises) and the gradients of every step; the second variable has none at
/// steps 1 and 3.
struct Model {
    init: Vec<Tensor>,
    grads: Vec<Vec<Option<Tensor>>>,
}

fn model(kind: Kind, binary: bool, seed: i64) -> Model {
    tch::manual_seed(seed);
    let opts = (kind, Device::Cpu);
    let init = SHAPES
        .iter()
        .map(|s| {
            let t = Tensor::randn(*s, opts);
            if binary {
                let b = t.sign();
                if b.numel() > 0 {
                    let _ = b.view([-1]).get(0).fill_(0.5);
                }
                b
            } else {
                t
            }
        })
        .collect();
    let scale = if binary { 1e-3 } else { 1.0 };
    let grads = (0..STEPS)
        .map(|t| {
            SHAPES
                .iter()
                .enumerate()
                .map(|(j, s)| (j != 1 || t % 2 == 0).then(|| Tensor::randn(*s, opts) * scale))
                .collect()
        })
        .collect();
    Model { init, grads }
}

/// Trains a copy of `m` for all steps and returns the parameters and each one's state.
fn train(
    opt: &mut dyn Optimizer,
    m: &Model,
    binary: bool,
) -> Vec<(Tensor, Vec<(&'static str, Tensor)>)> {
    let vars: Vec<Tensor> = m.init.iter().map(Tensor::copy).collect();
    for (j, v) in vars.iter().enumerate() {
        let mut info = VarInfo::of(format!("v{j}"), v);
        if binary {
            info = info.with_bits(1);
        }
        opt.add_param(Param::new(info, v.shallow_clone())).unwrap();
    }
    for grads in &m.grads {
        opt.step_with_grads(grads).unwrap();
    }
    assert_eq!(opt.step_count(), STEPS as u64);
    vars.into_iter().enumerate().map(|(j, v)| (v, opt.state(j))).collect()
}

/// Max over elements of |a - e| / max(|e|, 1).
fn scaled_error(a: &Tensor, e: &Tensor) -> f64 {
    if e.numel() == 0 {
        return 0.0;
    }
    let (a, e) = (a.to_kind(Kind::Double), e.to_kind(Kind::Double));
    ((&a - &e).abs() / e.abs().clamp_min(1.0)).max().double_value(&[])
}

fn assert_close(a: &Tensor, e: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.size(), e.size(), "{what}");
    assert_eq!(a.kind(), e.kind(), "{what}");
    if tol == 0.0 {
        assert!(a.equal(e), "{what}: not bit-exact (scaled error {:e})", scaled_error(a, e));
    } else {
        let err = scaled_error(a, e);
        assert!(err <= tol, "{what}: scaled error {err:e} > {tol:e}");
    }
}

fn assert_same_training(
    a: &[(Tensor, Vec<(&'static str, Tensor)>)],
    e: &[(Tensor, Vec<(&'static str, Tensor)>)],
    tol: f64,
    what: &str,
) {
    for (j, ((pa, sa), (pe, se))) in a.iter().zip(e).enumerate() {
        assert_close(pa, pe, tol, &format!("{what}: v{j}"));
        assert_eq!(sa.len(), se.len(), "{what}: state of v{j}");
        for ((na, ta), (ne, te)) in sa.iter().zip(se) {
            assert_eq!(na, ne);
            let t = if *na == "step" { 0.0 } else { tol };
            assert_close(ta, te, t, &format!("{what}: {na} of v{j}"));
        }
    }
}

/// How far the fused kernel may be from the libtorch path: nowhere, but for the optimizers whose
/// fused update takes the correctly rounded square root where ATen's is MKL's (`Sqrt::Fast`,
/// the default), within the parity tolerances.
fn tolerance(case: &Case, kind: Kind) -> f64 {
    match (FUSED_SQRT.contains(&case.optimizer.as_str()), kind) {
        (false, _) => 0.0,
        (true, Kind::Float) => 1e-6,
        _ => 1e-12,
    }
}

fn fused_matches_libtorch(kind: Kind) {
    let all = cases();
    assert!(all.len() >= 10, "{all:?}");
    for (c, config) in all.iter().enumerate() {
        let binary = is_bop(config);
        let m = model(kind, binary, 100 + c as i64);
        let reference = train(&mut *make(config, Backend::Torch, 0), &m, binary);
        let tol = tolerance(config, kind);
        // Three threads over ~900K elements; and one thread, through Auto.
        let fused = train(&mut *make(config, Backend::Fused, 3), &m, binary);
        assert_same_training(
            &fused,
            &reference,
            tol,
            &format!("{} {kind:?} fused x3", config.name),
        );
        let auto = train(&mut *make(config, Backend::Auto, 1), &m, binary);
        assert_same_training(&auto, &reference, tol, &format!("{} {kind:?} auto x1", config.name));
    }
}

#[cfg(feature = "fused")]
#[test]
fn fused_kernels_match_the_libtorch_path_f32() {
    fused_matches_libtorch(Kind::Float);
}

#[cfg(feature = "fused")]
#[test]
fn fused_kernels_match_the_libtorch_path_f64() {
    fused_matches_libtorch(Kind::Double);
}

/// Every instruction set the kernels have on this processor, chosen through
/// `caseopt::__private::set_kernel_isa` (what `CASEOPT_ISA` and `bench_step --isa` cap), trains
/// to the baseline loop's bits: every optimizer with a kernel, f32 and f64, on three threads.
#[cfg(feature = "fused")]
#[test]
fn every_instruction_set_trains_to_the_baseline_loops_bits() {
    use caseopt::__private::{kernel_isas, set_kernel_isa};
    let isas = kernel_isas();
    eprintln!("instruction sets: {isas:?}");
    assert_eq!(isas[0], "baseline");
    for kind in [Kind::Float, Kind::Double] {
        for (c, config) in cases().iter().enumerate() {
            let binary = is_bop(config);
            let m = model(kind, binary, 200 + c as i64);
            assert_eq!(set_kernel_isa(Some("baseline")).unwrap(), "baseline");
            let base = train(&mut *make(config, Backend::Fused, 3), &m, binary);
            for isa in &isas[1..] {
                assert_eq!(set_kernel_isa(Some(isa)).unwrap(), *isa);
                let t = train(&mut *make(config, Backend::Fused, 3), &m, binary);
                assert_same_training(&t, &base, 0.0, &format!("{} {kind:?} {isa}", config.name));
            }
        }
    }
    set_kernel_isa(None).unwrap();
}

#[cfg(feature = "fused")]
#[test]
fn thread_count_does_not_change_a_single_bit() {
    for name in ["bop2_sigma", "x_adam_amsgrad_wd_maximize", "adamw_weight_decay"] {
        let config = &case(name);
        let binary = is_bop(config);
        let m = model(Kind::Float, binary, 7);
        let one = train(&mut *make(config, Backend::Fused, 1), &m, binary);
        let four = train(&mut *make(config, Backend::Fused, 4), &m, binary);
        assert_same_training(&four, &one, 0.0, name);
    }
}

#[cfg(feature = "fused")]
#[test]
fn f32_and_f64_variables_share_one_fused_step() {
    let vars = [
        Tensor::randn([1000], (Kind::Float, Device::Cpu)),
        Tensor::randn([513], (Kind::Double, Device::Cpu)),
    ];
    let grads: Vec<Option<Tensor>> = vars.iter().map(|v| Some(v.randn_like() * 0.1)).collect();
    let run = |backend| {
        let vs: Vec<Tensor> = vars.iter().map(Tensor::copy).collect();
        let mut adam = make(&case("x_adam_amsgrad_wd_maximize"), backend, 0);
        for (j, v) in vs.iter().enumerate() {
            adam.add_param(Param::new(VarInfo::of(format!("v{j}"), v), v.shallow_clone())).unwrap();
        }
        for _ in 0..3 {
            adam.step_with_grads(&grads).unwrap();
        }
        vs
    };
    let (fused, torch) = (run(Backend::Fused), run(Backend::Torch));
    assert_close(&fused[0], &torch[0], 1e-6, "f32 variable");
    assert_close(&fused[1], &torch[1], 1e-12, "f64 variable");
}

/// An optimizer over `vars`, named v0, v1, ...
fn with_vars(config: &str, backend: Backend, vars: &[Tensor]) -> Box<dyn Optimizer> {
    let mut opt = make(&case(config), backend, 0);
    for (j, v) in vars.iter().enumerate() {
        opt.add_param(Param::new(VarInfo::of(format!("v{j}"), v), v.shallow_clone())).unwrap();
    }
    opt
}

/// Variables and their gradients, for one step.
type VarsAndGrads = (Vec<Tensor>, Vec<Option<Tensor>>);

/// Variables the kernels cannot take, each next to ordinary ones, and what Fused says.
struct Awkward {
    what: &'static str,
    /// Builds fresh variables and their gradients.
    make: fn() -> VarsAndGrads,
    /// The variable Fused must name, and words its reason must contain.
    refused: (&'static str, &'static str),
}

fn awkward_cases() -> Vec<Awkward> {
    // Deterministic values without libtorch's global generator, which tests running in
    // parallel would share: each call must give the same tensor.
    fn plain(n: i64, seed: i64) -> Tensor {
        let t = Tensor::arange(n, (Kind::Float, Device::Cpu));
        (t * 0.37 + seed as f64).sin()
    }
    vec![
        Awkward {
            what: "a strided (transposed) parameter",
            make: || {
                let base = plain(48, 1).view([8, 6]);
                let vars = vec![plain(100, 2), base.tr()];
                let grads = vec![Some(plain(100, 3) * 0.1), Some(plain(48, 4).view([6, 8]) * 0.1)];
                (vars, grads)
            },
            refused: ("v1", "not contiguous"),
        },
        Awkward {
            what: "a strided gradient",
            make: || {
                let vars = vec![plain(100, 2), plain(48, 5).view([6, 8])];
                let g = (plain(48, 6).view([8, 6]) * 0.1).tr();
                (vars, vec![Some(plain(100, 3) * 0.1), Some(g)])
            },
            refused: ("v1", "`grad` is not contiguous"),
        },
        Awkward {
            what: "a half-precision parameter",
            make: || {
                let v = plain(64, 7).to_kind(Kind::Half);
                let g = (plain(64, 8) * 0.1).to_kind(Kind::Half);
                (vec![plain(100, 2), v], vec![Some(plain(100, 3) * 0.1), Some(g)])
            },
            refused: ("v1", "Half"),
        },
        Awkward {
            what: "a gradient that is its own parameter",
            make: || {
                let v = plain(64, 9);
                let g = v.shallow_clone();
                (vec![plain(100, 2), v], vec![Some(plain(100, 3) * 0.1), Some(g)])
            },
            refused: ("v1", "shares memory"),
        },
        Awkward {
            what: "one tensor given as two variables",
            make: || {
                let v = plain(64, 10);
                let vars = vec![v.shallow_clone(), v];
                (vars, vec![Some(plain(64, 11) * 0.1), Some(plain(64, 12) * 0.1)])
            },
            refused: ("v", "shares memory"),
        },
    ]
}

#[test]
fn auto_updates_what_the_kernels_cannot_take_with_libtorch_ops() {
    for case in awkward_cases() {
        for config in ["x_adam_amsgrad_wd_maximize", "bop_threshold_gamma"] {
            let run = |backend| {
                let (vars, grads) = (case.make)();
                let mut opt = with_vars(config, backend, &vars);
                for _ in 0..3 {
                    opt.step_with_grads(&grads).unwrap();
                }
                vars
            };
            let (auto, torch) = (run(Backend::Auto), run(Backend::Torch));
            for (j, (a, t)) in auto.iter().zip(&torch).enumerate() {
                let tol =
                    if config.starts_with("bop") || a.kind() == Kind::Half { 0.0 } else { 1e-6 };
                assert_close(a, t, tol, &format!("{} ({config}): v{j}", case.what));
            }
        }
    }
}

#[cfg(feature = "fused")]
#[test]
fn forced_fused_refuses_them_and_changes_nothing() {
    for case in awkward_cases() {
        let (vars, grads) = (case.make)();
        let before: Vec<Tensor> = vars.iter().map(Tensor::copy).collect();
        let mut opt = with_vars("adam_lr", Backend::Fused, &vars);
        match opt.step_with_grads(&grads) {
            Err(Error::FusedUnavailable { optimizer, variable, reason }) => {
                assert_eq!(optimizer, "Adam");
                assert!(variable.starts_with(case.refused.0), "{}: {variable}", case.what);
                assert!(reason.contains(case.refused.1), "{}: {reason}", case.what);
            }
            other => panic!("{}: expected FusedUnavailable, got {other:?}", case.what),
        }
        assert_eq!(opt.step_count(), 0, "{}", case.what);
        for (v, b) in vars.iter().zip(&before) {
            assert!(v.equal(b), "{}: a variable changed", case.what);
        }
    }
}

#[cfg(feature = "fused")]
#[test]
fn gradient_errors_are_the_same_on_every_path() {
    type MakeGrad = fn() -> Tensor;
    let bad: [(&str, MakeGrad); 3] = [
        ("shape", || Tensor::zeros([5], (Kind::Float, Device::Cpu))),
        ("dtype", || Tensor::zeros([4], (Kind::Double, Device::Cpu))),
        ("undefined", Tensor::new),
    ];
    for backend in [Backend::Auto, Backend::Fused, Backend::Torch] {
        for (what, g) in &bad {
            let v = Tensor::ones([4], (Kind::Float, Device::Cpu));
            let ok = Tensor::ones([3], (Kind::Float, Device::Cpu));
            let mut opt = with_vars("adam_lr", backend, &[ok.shallow_clone(), v.shallow_clone()]);
            let grads = [Some(ok.ones_like()), Some(g())];
            match opt.step_with_grads(&grads) {
                Err(Error::GradientMismatch { variable, reason }) => {
                    assert_eq!(variable, "v1", "{backend:?} {what}");
                    assert!(reason.contains(what), "{backend:?} {what}: {reason}");
                }
                other => panic!("{backend:?} {what}: expected GradientMismatch, got {other:?}"),
            }
            assert!(ok.equal(&ok.ones_like()), "{backend:?} {what}: a variable changed");
            assert_eq!(opt.step_count(), 0);
        }
    }
}

#[test]
fn optimizers_without_kernels_refuse_only_when_forced() {
    let v = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let g = [Some(v.ones_like())];
    for backend in [Backend::Auto, Backend::Torch, Backend::Fused] {
        let mut sgd = Sgd::new(SgdConfig { lr: 0.5.into(), ..Default::default() }).unwrap();
        sgd.set_backend(backend);
        sgd.add_param(Param::new(VarInfo::of("w", &v), v.shallow_clone())).unwrap();
        let result = sgd.step_with_grads(&g);
        if backend == Backend::Fused {
            assert!(matches!(result, Err(Error::FusedUnavailable { .. })), "{result:?}");
        } else {
            result.unwrap();
        }
    }
    assert_eq!(Vec::<f32>::try_from(&v).unwrap(), vec![0.0; 4]);
}

#[cfg(feature = "fused")]
#[test]
fn state_moves_between_paths_mid_training() {
    // Three fused steps, then the state goes to a libtorch-path optimizer for the last two: the
    // same as five libtorch steps, per-variable step counts included (v1 skips steps, v3 is
    // empty).
    let m = model(Kind::Double, false, 11);
    let (first, second) = m.grads.split_at(3);
    let vars: Vec<Tensor> = m.init.iter().map(Tensor::copy).collect();
    let mut fused = with_vars("x_adam_amsgrad_wd_maximize", Backend::Fused, &vars);
    for g in first {
        fused.step_with_grads(g).unwrap();
    }
    let mut torch = with_vars("x_adam_amsgrad_wd_maximize", Backend::Torch, &vars);
    torch.set_step_count(fused.step_count());
    for j in 0..vars.len() {
        let state = fused.state(j).into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect();
        torch.set_state(j, state).unwrap();
    }
    for g in second {
        torch.step_with_grads(g).unwrap();
    }
    let resumed: Vec<_> =
        vars.iter().enumerate().map(|(j, v)| (v.copy(), torch.state(j))).collect();
    // The same gradients, every step on libtorch ops.
    let reference =
        train(&mut *make(&case("x_adam_amsgrad_wd_maximize"), Backend::Torch, 0), &m, false);
    assert_same_training(&resumed, &reference, 1e-12, "fused then libtorch");
}
