//! Files of checkpoint format version 1 keep loading, and keep training the same, in every later
//! build (docs/checkpoints.md, "Compatibility").
//!
//! `tests/fixtures/checkpoint_v1.safetensors` is a `save_training` file written by the build that
//! introduced the version rule: a model of eleven variables under one router with all nine built-in
//! optimizers (a warmup-cosine schedule on Adam, a learning rate lowered mid-run on SGD, a
//! variable that skips its gradient every other step, one no rule claims, one not trainable),
//! after [`FIRST`] steps. `checkpoint_v1_continued.safetensors` is the same run after
//! [`SECOND`] more steps. The test loads the first into a freshly built model and router, trains
//! [`SECOND`] steps, and requires every model variable, state tensor, step counter and
//! hyperparameter to equal what the second holds, bit for bit. Both files are version 1 whatever
//! version this build writes: never regenerate them to make the test pass; a failure means this
//! build no longer reads version 1 (or no longer continues it) as it must.
//!
//! Regenerate (only when the generator itself changes, before anything reads the files):
//!
//! ```sh
//! scripts/env.sh cargo test --release --test test_checkpoint_v1 -- --ignored generate_v1_fixture
//! ```
//!
//! The continuation's bits depend on how libtorch's CPU kernels round (docs/parity.md): AVX2 and
//! AVX-512 (with FMA) give the same bits, and the generator checks that by regenerating under
//! `ATEN_CPU_CAPABILITY=avx2` is byte for byte the same; where the running libtorch rounds
//! otherwise (ATen's DEFAULT kernels, a libtorch without MKL's `sqrt`), the continuation is
//! compared within 1e-5 of max(|x|, 1) instead, and the load itself still exactly.

mod checkpoint_support;

use std::path::PathBuf;

use caseopt::{
    case_optimizer, load_training, save_training, Execution, Optimizer, PathExt, Schedule, Sqrt,
};
use checkpoint_support::{exact, gradient, model_values, snapshot, Exact, Rng, Snapshot};
use tch::{nn, Device, Kind, Tensor};

/// Steps before the first file.
const FIRST: u64 = 12;
/// Steps between the first file and the second.
const SECOND: u64 = 8;
/// The step at which SGD's learning rate is lowered (before the first file: a fresh router's
/// 0.05 must become the file's 0.02).
const LOWER_SGD_LR_AT: u64 = 6;

case_optimizer! {
    /// One rule per built-in optimizer, each with a non-default option where it has one.
    pub struct Nine {
        binary & name("bop.*") => Bop<threshold: 1e-4, gamma: 1e-2>,
        binary & name("bop2.*") => Bop2ndOrder<threshold: 1e-4, gamma: 1e-2, sigma: 1e-2>,
        name("sgd.*") => Sgd<lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1e-3>,
        name("adam.*") => Adam<lr: (Schedule::cosine(0.01, 40).with_warmup(4, 0.0))>,
        name("adamw.*") => AdamW<lr: 0.01, amsgrad: true>,
        name("radam.*") => RAdam<lr: 0.01, decoupled_weight_decay: true, weight_decay: 0.01>,
        name("nadam.*") => NAdam<lr: 0.01>,
        name("rms.*") => RmsProp<lr: 0.01, centered: true, momentum: 0.5>,
        name("adagrad.*") => Adagrad<lr: 0.1, lr_decay: 1e-3, initial_accumulator_value: 0.1>,
    }
}

/// The router, with the square root that makes the fused Adam and AdamW compute torch.optim's
/// bits, so that a build with or without the `fused` feature continues alike (docs/parity.md).
fn router(vs: &nn::VarStore) -> Nine {
    let mut r = Nine::build(vs).unwrap();
    r.rule3_mut().set_sqrt(Sqrt::Aten);
    r.rule4_mut().set_sqrt(Sqrt::Aten);
    r
}

fn values(rng: &mut Rng, shape: &[i64], signs: bool) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x = rng.symmetric();
            match (signs, x < 0.0) {
                (true, true) => -1.0,
                (true, false) => 1.0,
                (false, _) => x,
            }
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// The model; `fresh` fills it with other values (a load must restore every one of them).
fn model(fresh: bool) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut rng = Rng::new(if fresh { 99 } else { 2026 });
    let root = vs.root();
    let _ = root.sub("bop").binary().var_copy("w", &values(&mut rng, &[3, 4], true));
    let _ = root.sub("bop2").binary().var_copy("w", &values(&mut rng, &[2, 3, 2], true));
    for name in ["sgd", "adam", "adamw", "radam", "nadam", "rms", "adagrad"] {
        let _ = root.sub(name).var_copy("w", &values(&mut rng, &[4, 5], false));
    }
    let _ = root.sub("sgd").var_copy("b", &values(&mut rng, &[5], false));
    // Matched by no rule: untrained, but in the routing table and the model.
    let _ = root.sub("other").var_copy("w", &values(&mut rng, &[2], false));
    let mut running_mean = root.sub("bn").zeros_no_train("running_mean", &[5]);
    tch::no_grad(|| running_mean.copy_(&values(&mut rng, &[5], false)));
    vs
}

/// Steps `from..to` with gradients that depend only on the step and the variable; `sgd.b`
/// has none at odd steps, and SGD's learning rate is lowered at [`LOWER_SGD_LR_AT`].
fn train(router: &mut Nine, vs: &nn::VarStore, from: u64, to: u64) {
    let mut vars: Vec<(String, Tensor)> =
        caseopt::trainable_vars(vs).into_iter().map(|p| (p.info.name, p.tensor)).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for step in from..to {
        if step == LOWER_SGD_LR_AT {
            router.rule2_mut().set_hyperparameter("lr", Schedule::Constant(0.02)).unwrap();
        }
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (name, t) in &vars {
            if name == "sgd.b" && step % 2 == 1 {
                continue;
            }
            loss += (t * gradient(name, step, t)).sum(Kind::Float);
        }
        router.backward_step(&loss).unwrap();
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

const V1: &str = "checkpoint_v1.safetensors";
const V1_CONTINUED: &str = "checkpoint_v1_continued.safetensors";

/// Whether the running libtorch rounds as the one that wrote the fixtures (AVX2 or AVX-512
/// kernels, which fuse `a + w * (b - a)` in `lerp`; MKL's `sqrt`): asked of its ops, as
/// tests/parity_support does.
fn rounds_like_the_fixtures() -> bool {
    let n = 4096;
    let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.6180).sin()).collect();
    let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.618).cos()).collect();
    let w = 0.1f32;
    let got = Vec::<f32>::try_from(Tensor::from_slice(&a).lerp(&Tensor::from_slice(&b), w as f64))
        .unwrap();
    let fused = (0..n).any(|i| {
        let (once, twice) = (w.mul_add(b[i] - a[i], a[i]), a[i] + w * (b[i] - a[i]));
        once != twice && got[i] == once
    });
    let x: Vec<f32> = (1..=n).map(|i| (i as f32 * 0.37).sin().abs()).collect();
    let roots = Vec::<f32>::try_from(Tensor::from_slice(&x).sqrt()).unwrap();
    let mkl_sqrt = x.iter().zip(&roots).any(|(x, r)| x.sqrt() != *r);
    fused && mkl_sqrt
}

/// `|a - b| <= 1e-5 * max(|b|, 1)` element by element, for tensors of the same kind and shape.
fn close(a: &Exact, b: &Exact) -> bool {
    let to_f64 = |e: &Exact| {
        let t = Tensor::f_from_data_size(&e.bytes, &e.shape, e.kind).unwrap();
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    };
    a.kind == b.kind
        && a.shape == b.shape
        && to_f64(a).iter().zip(to_f64(b)).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0))
}

fn assert_close(a: &Snapshot, b: &Snapshot) {
    assert_eq!(a.step_counts, b.step_counts);
    for (ra, rb) in a.rules.iter().zip(&b.rules) {
        assert_eq!(ra.hyperparameters, rb.hyperparameters);
        for ((na, ta), (nb, tb)) in ra.params.iter().zip(&rb.params) {
            assert!(na == nb && close(ta, tb), "{na}: {ta:?} vs {tb:?}");
        }
        for ((na, sa), (nb, sb)) in ra.states.iter().zip(&rb.states) {
            assert_eq!(na, nb);
            assert_eq!(sa.len(), sb.len(), "{na}");
            for ((ka, ta), (kb, tb)) in sa.iter().zip(sb) {
                assert!(ka == kb && close(ta, tb), "{na}/{ka}: {ta:?} vs {tb:?}");
            }
        }
    }
}

#[test]
fn version_1_loads_and_continues_bit_for_bit() {
    // Loading: the file's state exactly, whatever the build's kernels.
    let vs = model(true);
    let mut resumed = router(&vs);
    load_training(fixture(V1), &vs, &mut resumed).unwrap();
    assert_eq!(resumed.step_counts(), vec![FIRST; 9]);
    let info = caseopt::checkpoint_info(fixture(V1)).unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.step_counts, vec![FIRST; 9]);
    // The file's tensors, read by the safetensors crate alone, are what the router now holds.
    let bytes = std::fs::read(fixture(V1)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for rule in 0..9 {
        let opt = resumed.optimizer(rule).unwrap();
        for (index, param) in opt.params().iter().enumerate() {
            let state = opt.state(index);
            assert!(!state.is_empty(), "{} has no state", param.info.name);
            for (state, t) in state {
                let view = file.tensor(&format!("opt/{rule}/{}/{state}", param.info.name)).unwrap();
                assert_eq!(view.data(), exact(&t).bytes.as_slice(), "{}/{state}", param.info.name);
            }
        }
    }
    for (name, value) in model_values(&vs) {
        assert_eq!(file.tensor(&format!("model/{name}")).unwrap().data(), value.bytes.as_slice());
    }

    // Continuing: the second file's state.
    train(&mut resumed, &vs, FIRST, FIRST + SECOND);
    let expected_vs = model(true);
    let mut expected = router(&expected_vs);
    load_training(fixture(V1_CONTINUED), &expected_vs, &mut expected).unwrap();
    let (got, want) = (snapshot(&resumed), snapshot(&expected));
    if rounds_like_the_fixtures() {
        assert_eq!(got, want);
        assert_eq!(model_values(&vs), model_values(&expected_vs));
    } else {
        eprintln!("libtorch rounds unlike the fixtures' (AVX2/AVX-512, MKL): compared within 1e-5");
        assert_close(&got, &want);
    }
}

/// Writes both fixtures (see the module documentation); ignored, run by hand.
#[test]
#[ignore = "writes tests/fixtures/checkpoint_v1*.safetensors"]
fn generate_v1_fixture() {
    assert_eq!(caseopt::checkpoint::FORMAT_VERSION, 1, "the v1 fixtures are written by a v1 build");
    let vs = model(false);
    let mut r = router(&vs);
    train(&mut r, &vs, 0, FIRST);
    save_training(fixture(V1), &vs, &r).unwrap();
    train(&mut r, &vs, FIRST, FIRST + SECOND);
    save_training(fixture(V1_CONTINUED), &vs, &r).unwrap();
}
