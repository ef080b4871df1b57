//! Checkpoints: bit-for-bit resume with every optimizer, validation before anything changes,
//! atomic writes, model variables, cross-device loading.

mod checkpoint_support;

use std::fs;
use std::path::PathBuf;

use caseopt::{
    case_optimizer, checkpoint_info, load_training, save_training, Checkpoint, CheckpointError,
    Error, Router, Schedule,
};
use checkpoint_support::{
    bop_adam, craft, model, model_values, scratch_dir, snapshot, train, ModelSpec,
};
use tch::{nn, Device, Kind, Tensor};

/// Trains `40` steps in one go and `20 + save + load into a fresh router (and, with
/// `with_model`, a fresh model) + 20`, and requires every parameter, state tensor, step
/// counter and hyperparameter to be identical, bit for bit.
fn resume_matches_uninterrupted<R: Router>(make: impl Fn(&nn::VarStore) -> R, with_model: bool) {
    let spec = ModelSpec::default();
    // Uninterrupted. The learning rate is lowered at step 10 in both runs: the checkpoint must
    // carry the changed constant.
    let vs = model(&spec);
    let mut straight = make(&vs);
    train(&mut straight, &vs, 0..40, Some(10));

    // Interrupted.
    let dir = scratch_dir("resume");
    let path = dir.join("ckpt.safetensors");
    let vs1 = model(&spec);
    let mut first = make(&vs1);
    train(&mut first, &vs1, 0..20, Some(10));
    if with_model {
        save_training(&path, &vs1, &first).unwrap();
    } else {
        first.save_checkpoint(&path).unwrap();
    }
    drop(first);

    let (vs2, mut second) = if with_model {
        // A fresh model, initialised differently: everything must come from the file.
        let vs2 = model(&ModelSpec { seed: 99, ..spec.clone() });
        let mut r = make(&vs2);
        load_training(&path, &vs2, &mut r).unwrap();
        (vs2, r)
    } else {
        // The same model object (the router checkpoint holds no model variables), a fresh
        // router.
        let mut r = make(&vs1);
        r.load_checkpoint(&path).unwrap();
        (vs1, r)
    };
    train(&mut second, &vs2, 20..40, Some(10));

    assert_eq!(snapshot(&second), snapshot(&straight));
    assert_eq!(model_values(&vs2), model_values(&vs));
    assert_eq!(second.step_counts(), vec![40, 40]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bop_and_adam_resume_bit_for_bit() {
    resume_matches_uninterrupted(bop_adam, false);
}

#[test]
fn bop_and_adam_resume_bit_for_bit_with_the_model() {
    resume_matches_uninterrupted(bop_adam, true);
}

#[test]
fn bop2ndorder_and_sgd_resume_bit_for_bit() {
    resume_matches_uninterrupted(
        |vs| {
            case_optimizer! {
                binary => Bop2ndOrder<threshold: 1e-4, gamma: 1e-2, sigma: 1e-2>,
                _ => Sgd<lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1e-3>,
            }
            .build(vs)
            .unwrap()
        },
        true,
    );
}

#[test]
fn adamw_with_amsgrad_and_a_schedule_resumes_bit_for_bit() {
    // A warmup-cosine schedule on `weight_decay` (the learning rate is replaced by a constant
    // at step 10): the restored step counter must resume it at the same position.
    resume_matches_uninterrupted(
        |vs| {
            case_optimizer! {
                binary => Bop<threshold: 1e-6, gamma: 1e-2>,
                _ => AdamW<
                    lr: 0.01,
                    amsgrad: true,
                    weight_decay: (Schedule::cosine(0.1, 30).with_warmup(5, 0.0)),
                >,
            }
            .build(vs)
            .unwrap()
        },
        false,
    );
}

#[test]
fn rmsprop_centered_with_momentum_resumes_bit_for_bit() {
    resume_matches_uninterrupted(
        |vs| {
            case_optimizer! {
                binary => Bop<threshold: 1e-6, gamma: 1e-2>,
                _ => RmsProp<lr: 0.01, centered: true, momentum: 0.5>,
            }
            .build(vs)
            .unwrap()
        },
        true,
    );
}

#[test]
fn adagrad_resumes_bit_for_bit() {
    resume_matches_uninterrupted(
        |vs| {
            case_optimizer! {
                binary => Bop<threshold: 1e-6, gamma: 1e-2>,
                _ => Adagrad<lr: 0.1, lr_decay: 1e-3, initial_accumulator_value: 0.1>,
            }
            .build(vs)
            .unwrap()
        },
        false,
    );
}

/// Loads `path` into `router` expecting an error; the router must be exactly as before.
fn assert_refused<R: Router>(router: &mut R, path: &std::path::Path) -> CheckpointError {
    let before = snapshot(router);
    let err = router.load_checkpoint(path).unwrap_err();
    assert_eq!(snapshot(router), before, "a failed load changed the router ({err})");
    match err {
        Error::BadCheckpoint { problem, path: p } => {
            assert_eq!(p, path);
            problem
        }
        other => panic!("expected BadCheckpoint, got {other}"),
    }
}

/// `router` after a few steps on other gradients than the checkpoints', so that a partial load
/// would show.
fn trained<R: Router>(mut router: R, vs: &nn::VarStore) -> R {
    train(&mut router, vs, 100..103, None);
    router
}

/// A checkpoint of `BopAdam` after 5 steps, in `dir`.
fn saved_checkpoint(dir: &std::path::Path) -> PathBuf {
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..5, None);
    let path = dir.join("ckpt.safetensors");
    r.save_checkpoint(&path).unwrap();
    path
}

#[test]
fn other_rules_are_refused_with_both_rule_lists() {
    let dir = scratch_dir("rules");
    let path = saved_checkpoint(&dir);
    let vs = model(&ModelSpec::default());
    let sgd = case_optimizer! { binary => Bop<threshold: 1e-6, gamma: 1e-2>, _ => Sgd }.build(&vs);
    let mut other = trained(sgd.unwrap(), &vs);
    match assert_refused(&mut other, &path) {
        CheckpointError::RulesDiffer { saved, current, .. } => {
            assert_eq!(saved, vec!["binary => Bop", "_ => Adam"]);
            assert_eq!(current, vec!["binary => Bop", "_ => Sgd"]);
        }
        other => panic!("unexpected {other}"),
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_and_extra_variables_are_named() {
    let dir = scratch_dir("vars");
    let path = saved_checkpoint(&dir);
    // One more full-precision variable than the checkpoint has.
    let vs = model(&ModelSpec { extra: true, ..Default::default() });
    let mut more = trained(bop_adam(&vs), &vs);
    assert_eq!(
        assert_refused(&mut more, &path),
        CheckpointError::MissingVariable { variable: "extra.bias".into() }
    );
    // One fewer.
    let vs = model(&ModelSpec { without_bias: true, ..Default::default() });
    let mut fewer = trained(bop_adam(&vs), &vs);
    assert_eq!(
        assert_refused(&mut fewer, &path),
        CheckpointError::UnexpectedVariable { variable: "fc.bias".into() }
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shape_and_dtype_differences_are_named() {
    let dir = scratch_dir("shape");
    let path = saved_checkpoint(&dir);
    let vs = model(&ModelSpec { hidden: 7, ..Default::default() });
    let mut wider = trained(bop_adam(&vs), &vs);
    match assert_refused(&mut wider, &path) {
        CheckpointError::VariableMismatch { variable, saved, current } => {
            assert_eq!(variable, "fc.bias");
            assert!(saved.contains("[5]") && current.contains("[7]"), "{saved} / {current}");
        }
        other => panic!("unexpected {other}"),
    }
    let vs = model(&ModelSpec { kind: Kind::Double, ..Default::default() });
    let mut double = trained(bop_adam(&vs), &vs);
    match assert_refused(&mut double, &path) {
        CheckpointError::VariableMismatch { saved, current, .. } => {
            assert!(saved.starts_with("f32") && current.starts_with("f64"), "{saved} / {current}");
        }
        other => panic!("unexpected {other}"),
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_different_schedule_is_refused_and_constants_are_restored() {
    let dir = scratch_dir("schedule");
    let vs = model(&ModelSpec::default());
    let cosine = |vs: &nn::VarStore, steps: u64| {
        case_optimizer! {
            binary => Bop<threshold: 1e-6, gamma: 1e-2>,
            _ => Adam<lr: (Schedule::cosine(0.01, steps))>,
        }
        .build(vs)
        .unwrap()
    };
    let mut r = cosine(&vs, 100);
    train(&mut r, &vs, 0..3, None);
    let path = dir.join("ckpt.safetensors");
    r.save_checkpoint(&path).unwrap();
    // A variable belongs to one router at a time: each router below trains the same model.
    drop(r);

    let mut other = trained(cosine(&vs, 200), &vs);
    match assert_refused(&mut other, &path) {
        CheckpointError::Hyperparameter { rule, name, reason, .. } => {
            assert_eq!((rule, name.as_str()), (1, "lr"));
            assert!(reason.contains("steps=100") && reason.contains("steps=200"), "{reason}");
        }
        other => panic!("unexpected {other}"),
    }
    drop(other);

    // A constant is restored whatever the router had.
    let mut constant = cosine(&vs, 100);
    constant.optimizer_mut(0).unwrap().set_hyperparameter("threshold", 0.5.into()).unwrap();
    constant.load_checkpoint(&path).unwrap();
    assert_eq!(constant.optimizer(0).unwrap().hyperparameter("threshold").unwrap(), 1e-6);
    assert_eq!(constant.step_counts(), vec![3, 3]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn model_variables_are_validated_before_anything_changes() {
    let dir = scratch_dir("model");
    let spec = ModelSpec::default();
    let vs = model(&spec);
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..4, None);
    let path = dir.join("training.safetensors");
    save_training(&path, &vs, &r).unwrap();
    let plain = dir.join("optimizer.safetensors");
    r.save_checkpoint(&plain).unwrap();

    // A model with an extra non-trainable variable: the router matches, the model does not.
    let vs2 = model(&spec);
    let _running_mean = vs2.root().sub("bn").zeros_no_train("running_mean", &[3]);
    let mut r2 = trained(bop_adam(&vs2), &vs2);
    let (before, model_before) = (snapshot(&r2), model_values(&vs2));
    let err = load_training(&path, &vs2, &mut r2).unwrap_err();
    assert!(
        matches!(&err, Error::BadCheckpoint { problem: CheckpointError::ModelVariable { variable, .. }, .. } if variable == "bn.running_mean"),
        "{err}"
    );
    assert_eq!((snapshot(&r2), model_values(&vs2)), (before, model_before));

    // A router-only checkpoint has no model to restore.
    let err = load_training(&plain, &vs2, &mut r2).unwrap_err();
    assert!(matches!(err, Error::BadCheckpoint { problem: CheckpointError::NoModel, .. }), "{err}");

    // load_checkpoint accepts a training checkpoint and restores the router only.
    let vs3 = model(&spec);
    let mut r3 = bop_adam(&vs3);
    let model_before = model_values(&vs3);
    r3.load_checkpoint(&path).unwrap();
    assert_eq!(model_values(&vs3), model_before);
    assert_eq!(r3.step_counts(), vec![4, 4]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_files_are_io_errors() {
    let vs = model(&ModelSpec::default());
    let mut r = trained(bop_adam(&vs), &vs);
    let before = snapshot(&r);
    let err = r.load_checkpoint("/nonexistent/caseopt/ckpt.safetensors").unwrap_err();
    assert!(
        matches!(err, Error::Io { ref context, .. } if context.contains("reading checkpoint")),
        "{err}"
    );
    assert_eq!(snapshot(&r), before);
}

#[test]
fn saving_is_atomic_and_cleans_up_after_a_failure() {
    let dir = scratch_dir("atomic");
    let vs = model(&ModelSpec::default());
    let mut r = trained(bop_adam(&vs), &vs);
    // Overwriting an existing checkpoint replaces it whole.
    let path = dir.join("ckpt.safetensors");
    r.save_checkpoint(&path).unwrap();
    train(&mut r, &vs, 200..202, None);
    r.save_checkpoint(&path).unwrap();
    assert_eq!(checkpoint_info(&path).unwrap().step_counts, vec![5, 5]);
    // The rename onto a directory fails: the error is reported, the directory is untouched and
    // no temporary file is left behind.
    let occupied = dir.join("occupied");
    fs::create_dir(&occupied).unwrap();
    fs::write(occupied.join("keep"), b"keep").unwrap();
    let err = r.save_checkpoint(&occupied).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(fs::read(occupied.join("keep")).unwrap(), b"keep");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["ckpt.safetensors", "occupied"]);
    // A directory that does not exist.
    assert!(matches!(
        r.save_checkpoint(dir.join("no/such/dir/c.safetensors")),
        Err(Error::Io { .. })
    ));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_file_is_plain_safetensors_with_documented_keys() {
    let dir = scratch_dir("format");
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..2, None);
    let path = dir.join("training.safetensors");
    save_training(&path, &vs, &r).unwrap();
    // tch's own reader (no caseopt involved) sees the documented keys.
    let tensors = Tensor::read_safetensors(&path).unwrap();
    let mut keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "model/conv.weight",
            "model/fc.bias",
            "model/fc.weight",
            "opt/0/conv.weight/m",
            "opt/0/fc.weight/m",
            "opt/1/fc.bias/exp_avg",
            "opt/1/fc.bias/exp_avg_sq",
            "opt/1/fc.bias/step",
        ]
    );
    let step = tensors.iter().find(|(k, _)| k == "opt/1/fc.bias/step").unwrap();
    assert_eq!((step.1.kind(), step.1.int64_value(&[])), (Kind::Int64, 2));
    let info = checkpoint_info(&path).unwrap();
    assert_eq!(info.fingerprint, r.fingerprint());
    assert_eq!(info.step_counts, vec![2, 2]);
    assert_eq!(info.variables, vec!["conv.weight", "fc.bias", "fc.weight"]);
    assert_eq!(info.model_variables, vec!["conv.weight", "fc.bias", "fc.weight"]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_checkpoint_written_on_cuda_loads_on_the_cpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: the CUDA-to-CPU load is checked on GPU machines only");
        return;
    }
    let dir = scratch_dir("cuda");
    let path = dir.join("ckpt.safetensors");
    let spec = ModelSpec::default();
    let cuda = ModelSpec { device: Device::Cuda(0), ..spec.clone() };
    // 20 steps on CUDA, saved; 20 more on the CPU after loading. Compared with the same 40
    // steps on CUDA: Bop's flips are exact; Adam may differ in the last bits between devices.
    let vs_gpu = model(&cuda);
    let mut gpu = bop_adam(&vs_gpu);
    train(&mut gpu, &vs_gpu, 0..20, None);
    save_training(&path, &vs_gpu, &gpu).unwrap();
    let vs_cpu = model(&ModelSpec { seed: 7, ..spec });
    let mut cpu = bop_adam(&vs_cpu);
    load_training(&path, &vs_cpu, &mut cpu).unwrap();
    assert_eq!(model_values(&vs_cpu), model_values(&vs_gpu));
    assert_eq!(snapshot(&cpu), snapshot(&gpu));
    train(&mut cpu, &vs_cpu, 20..40, None);
    train(&mut gpu, &vs_gpu, 20..40, None);
    assert_eq!(cpu.step_counts(), gpu.step_counts());
    let (c, g) = (vs_cpu.variables(), vs_gpu.variables());
    for (name, t) in &c {
        let other = g[name].to_device(Device::Cpu);
        assert!(t.allclose(&other, 1e-5, 1e-6, false), "{name} differs after resuming on the CPU");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_router_that_never_stepped_round_trips() {
    // No state tensors at all (a file with only metadata), then a trained router loading it
    // goes back to having no state.
    let dir = scratch_dir("fresh");
    let vs = model(&ModelSpec::default());
    let fresh = bop_adam(&vs);
    let path = dir.join("fresh.safetensors");
    fresh.save_checkpoint(&path).unwrap();
    assert_eq!(checkpoint_info(&path).unwrap().step_counts, vec![0, 0]);
    // A variable belongs to one router at a time: the trained router below shares the model.
    let fresh_snapshot = snapshot(&fresh);
    drop(fresh);
    let mut trained = trained(bop_adam(&vs), &vs);
    assert_ne!(snapshot(&trained), fresh_snapshot);
    trained.load_checkpoint(&path).unwrap();
    let (a, b) = (snapshot(&trained), fresh_snapshot);
    // The variables are shared (same model): only the optimizer side is compared.
    assert_eq!(a.step_counts, b.step_counts);
    for (ra, rb) in a.rules.iter().zip(&b.rules) {
        assert_eq!((&ra.hyperparameters, &ra.states), (&rb.hyperparameters, &rb.states));
        assert!(ra.states.iter().all(|(_, s)| s.is_empty()));
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn optimizers_refuse_bad_saved_state_with_errors_to_match_on() {
    use caseopt::{Adam, AdamConfig, Bop, BopConfig, Optimizer, Param, VarInfo};
    let w = Tensor::from_slice(&[1.0f64, 2.0]);
    let mut bop = Bop::new(BopConfig::default()).unwrap();
    bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    let zeros = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
    match bop.set_state(0, vec![("m".into(), zeros(3))]) {
        Err(Error::Checkpoint(CheckpointError::StateMismatch {
            variable,
            state,
            expected,
            found,
        })) => {
            assert_eq!((variable.as_str(), state.as_str()), ("w", "m"));
            assert_eq!((expected.as_str(), found.as_str()), ("Double [2]", "Double [3]"));
        }
        other => panic!("expected StateMismatch, got {other:?}"),
    }
    assert!(matches!(
        bop.set_state(0, vec![("v".into(), zeros(2))]),
        Err(Error::Checkpoint(CheckpointError::StateMissing { variable, state }))
            if variable == "w" && state == "m"
    ));
    assert!(matches!(
        bop.set_state(5, vec![]),
        Err(Error::Checkpoint(CheckpointError::NoSuchVariable { optimizer, index: 5 }))
            if optimizer == "Bop"
    ));
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone())).unwrap();
    let state = vec![
        ("step".to_string(), Tensor::from(-1i64)),
        ("exp_avg".to_string(), zeros(2)),
        ("exp_avg_sq".to_string(), zeros(2)),
    ];
    assert!(matches!(
        adam.set_state(0, state),
        Err(Error::Checkpoint(CheckpointError::BadStepCounter { variable, .. })) if variable == "w"
    ));
}

/// The directory's file names, sorted.
fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn a_variable_that_changed_is_refused_at_save_and_the_old_file_stays() {
    // The router's step refuses a variable whose dtype or shape changed since it was routed;
    // a checkpoint of that state could never be loaded, so saving refuses it too, naming the
    // variable, and writes nothing.
    type Change = fn(&Tensor) -> Tensor;
    let changes: [(&str, Change); 2] =
        [("fc.bias", |t| t.to_kind(Kind::Double)), ("conv.weight", |t| t.reshape([4, 12]))];
    for (variable, change) in changes {
        let dir = scratch_dir("changed");
        let vs = model(&ModelSpec::default());
        let mut r = bop_adam(&vs);
        train(&mut r, &vs, 0..2, None);
        let path = dir.join("training.safetensors");
        save_training(&path, &vs, &r).unwrap();
        let before = fs::read(&path).unwrap();
        let mut var = vs.variables()[variable].shallow_clone();
        tch::no_grad(|| var.set_data(&change(&var)));
        let refused = |result: caseopt::Result<()>| match result {
            Err(Error::VariableChanged { variable: v, .. }) => v == variable,
            _ => false,
        };
        assert!(refused(r.step()), "{variable}: the step is refused");
        assert!(refused(save_training(&path, &vs, &r)), "{variable}: save_training");
        assert!(refused(r.save_checkpoint(&path)), "{variable}: save_checkpoint");
        assert!(refused(r.save_checkpoint(dir.join("new.safetensors"))), "{variable}: new file");
        assert_eq!(fs::read(&path).unwrap(), before, "{variable}: the old file changed");
        assert_eq!(file_names(&dir), vec!["training.safetensors"], "{variable}");
        fs::remove_dir_all(dir).unwrap();
    }
}

/// Waits until some other open file description holds the lock on `path`.
#[cfg(target_os = "linux")]
fn wait_until_locked(path: &std::path::Path) {
    let probe = fs::OpenOptions::new().write(true).open(path).unwrap();
    for _ in 0..1000 {
        if probe.try_lock().is_err() {
            return;
        }
        probe.unlock().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("nothing locked {}", path.display());
}

#[test]
fn the_next_save_removes_the_temporaries_of_dead_writers_only() {
    let dir = scratch_dir("stale");
    let vs = model(&ModelSpec::default());
    let r = trained(bop_adam(&vs), &vs);
    let path = dir.join("ckpt.safetensors");
    let write = |name: &str| fs::write(dir.join(name), vec![0u8; 1000]).unwrap();
    // What a writer killed during a save leaves: its temporary, named as documented, which no
    // process holds a lock on (the kernel dropped the dead writer's).
    let stale = [
        ".ckpt.safetensors.4194000.0.tmp".to_string(),
        format!(".ckpt.safetensors.{}.999999.tmp", std::process::id()),
    ];
    // Not this target's temporaries: left alone.
    let others = [
        ".ckpt.safetensors.1.tmp",
        ".ckpt.safetensors.1.2.3.tmp",
        "ckpt.safetensors.1.2.tmp",
        ".ckpt.safetensors.1.2.tmp.bak",
        ".other.safetensors.1.2.tmp",
        "notes.txt",
    ];
    stale.iter().map(String::as_str).chain(others).for_each(write);
    // A live writer's temporary (its lock held, here through another open file description,
    // which `flock` treats as another writer): left alone, removed once the writer is gone.
    let live = dir.join(".ckpt.safetensors.4194001.0.tmp");
    fs::write(&live, b"half").unwrap();
    let writer = fs::OpenOptions::new().write(true).open(&live).unwrap();
    writer.lock().unwrap();
    r.save_checkpoint(&path).unwrap();
    let mut expected: Vec<String> = others.iter().map(|s| s.to_string()).collect();
    expected.extend(["ckpt.safetensors".into(), ".ckpt.safetensors.4194001.0.tmp".into()]);
    expected.sort();
    assert_eq!(file_names(&dir), expected);
    drop(writer);
    r.save_checkpoint(&path).unwrap();
    expected.retain(|n| n != ".ckpt.safetensors.4194001.0.tmp");
    assert_eq!(file_names(&dir), expected);

    // A writer process killed with SIGKILL while holding its temporary's lock (util-linux
    // `flock` holds it, `cat` waits on its stdin).
    #[cfg(target_os = "linux")]
    {
        use std::process::{Command, Stdio};
        let killed = dir.join(".ckpt.safetensors.4194002.0.tmp");
        fs::write(&killed, b"half").unwrap();
        let spawned =
            Command::new("flock").arg("-o").arg(&killed).arg("cat").stdin(Stdio::piped()).spawn();
        match spawned {
            Err(e) => eprintln!("no `flock` command ({e}): the SIGKILL case is skipped"),
            Ok(mut child) => {
                wait_until_locked(&killed);
                r.save_checkpoint(&path).unwrap();
                assert!(killed.exists(), "a live writer's temporary was removed");
                child.kill().unwrap();
                child.wait().unwrap();
                r.save_checkpoint(&path).unwrap();
                assert!(!killed.exists(), "a killed writer's temporary was left");
            }
        }
    }
    assert_eq!(checkpoint_info(&path).unwrap().step_counts, vec![3, 3]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_constant_and_a_schedule_never_replace_each_other_in_either_direction() {
    let dir = scratch_dir("kinds");
    let vs = model(&ModelSpec::default());
    let scheduled = |vs: &nn::VarStore| {
        case_optimizer! {
            binary => Bop<threshold: 1e-6, gamma: 1e-2>,
            _ => Adam<lr: (Schedule::cosine(0.01, 100))>,
        }
        .build(vs)
        .unwrap()
    };
    let hyperparameter = |problem: CheckpointError| match problem {
        CheckpointError::Hyperparameter { rule, name, reason, .. } => {
            assert_eq!((rule, name.as_str()), (1, "lr"));
            reason
        }
        other => panic!("unexpected {other}"),
    };

    // A constant in the file, a schedule in the router: refused, the router keeps its schedule.
    let mut constant = bop_adam(&vs);
    train(&mut constant, &vs, 0..3, None);
    let constant_file = dir.join("constant.safetensors");
    constant.save_checkpoint(&constant_file).unwrap();
    // A variable belongs to one router at a time: each router below trains the same model.
    drop(constant);
    let mut router = trained(scheduled(&vs), &vs);
    let reason = hyperparameter(assert_refused(&mut router, &constant_file));
    assert!(reason.contains("constant 0.01") && reason.contains("cosine"), "{reason}");
    drop(router);

    // A schedule in the file, a constant in the router: refused as well.
    let mut schedule = scheduled(&vs);
    train(&mut schedule, &vs, 0..3, None);
    let schedule_file = dir.join("schedule.safetensors");
    schedule.save_checkpoint(&schedule_file).unwrap();
    drop(schedule);
    let mut router = trained(bop_adam(&vs), &vs);
    let reason = hyperparameter(assert_refused(&mut router, &schedule_file));
    assert!(reason.contains("cosine") && reason.contains("`0.01`"), "{reason}");
    drop(router);

    // The same kind on both sides loads: constants as saved, schedules kept.
    let mut router = trained(bop_adam(&vs), &vs);
    router.optimizer_mut(1).unwrap().set_hyperparameter("lr", 0.5.into()).unwrap();
    router.load_checkpoint(&constant_file).unwrap();
    assert_eq!(router.optimizer(1).unwrap().hyperparameter("lr").unwrap(), 0.01);
    drop(router);
    let mut router = trained(scheduled(&vs), &vs);
    router.load_checkpoint(&schedule_file).unwrap();
    assert_eq!(router.step_counts(), vec![3, 3]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_of_a_newer_version_is_refused_naming_both_versions() {
    let dir = scratch_dir("newer");
    let path = saved_checkpoint(&dir);
    // A version 3 file as a later build might write it: a field version 2 does not have, and
    // every checksum right.
    craft(&path, |meta, _| {
        meta["version"] = 3.into();
        meta["a_later_field"] = serde_json::json!({ "best": 0.5 });
    });
    let vs = model(&ModelSpec::default());
    let mut r = trained(bop_adam(&vs), &vs);
    let problem = assert_refused(&mut r, &path);
    assert_eq!(problem, CheckpointError::UnsupportedVersion { found: 3, supported: 2 });
    let text = problem.to_string();
    assert!(text.contains("version 3") && text.contains("versions 1 to 2"), "{text}");
    let err = checkpoint_info(&path).unwrap_err();
    assert!(matches!(
        err,
        Error::BadCheckpoint { problem: CheckpointError::UnsupportedVersion { found: 3, .. }, .. }
    ));
    // A field that version 2 does not define, in a file that says version 2, is not skipped.
    let path = saved_checkpoint(&dir);
    craft(&path, |meta, _| meta["plateau"] = serde_json::json!({ "best": 0.5 }));
    assert!(matches!(assert_refused(&mut r, &path), CheckpointError::Malformed(_)));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn step_counters_out_of_range_are_refused_before_anything_changes() {
    let dir = scratch_dir("steps");
    let vs = model(&ModelSpec::default());
    let mut r = trained(bop_adam(&vs), &vs);
    // The optimizers' step counts: u64::MAX made the next step overflow after Bop had moved.
    for count in [u64::MAX, (1 << 53) + 1] {
        for rule in [0, 1] {
            let path = saved_checkpoint(&dir);
            craft(&path, |meta, _| meta["optimizers"][rule]["step_count"] = count.into());
            let problem = assert_refused(&mut r, &path);
            assert!(
                matches!(&problem, CheckpointError::Malformed(m) if m.contains("step count")),
                "{problem}"
            );
        }
    }
    // A variable's own step counter.
    for step in [i64::MAX, (1i64 << 53) + 1] {
        let path = saved_checkpoint(&dir);
        craft(&path, |_, tensors| {
            let key = tensors.keys().find(|k| k.ends_with("/step")).unwrap().clone();
            tensors.insert(key, step.to_le_bytes().to_vec());
        });
        let problem = assert_refused(&mut r, &path);
        assert!(
            matches!(&problem, CheckpointError::BadState { state, .. } if state == "step"),
            "{problem}"
        );
    }
    // The router still steps as before.
    r.step().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_checkpoint_saved_after_a_variable_was_added_loads_into_a_fresh_router() {
    let dir = scratch_dir("added");
    let vs = model(&ModelSpec::default());
    let mut r = bop_adam(&vs);
    train(&mut r, &vs, 0..3, None);
    // Added after the build and saved before any step routed it.
    let _late = vs.root().sub("late").var_copy("bias", &Tensor::from_slice(&[0.5f32, -0.5]));
    let path = dir.join("ckpt.safetensors");
    save_training(&path, &vs, &r).unwrap();
    assert!(checkpoint_info(&path).unwrap().variables.iter().any(|v| v == "late.bias"));
    // A router built afresh over the same model routes `late.bias` at its build; the file must
    // route it too (it used to say "routed by this router but missing from the checkpoint").
    let vs2 = model(&ModelSpec { seed: 7, ..Default::default() });
    let _late2 = vs2.root().sub("late").zeros("bias", &[2]);
    let mut fresh = bop_adam(&vs2);
    load_training(&path, &vs2, &mut fresh).unwrap();
    // The router that wrote it loads it too: it routes the variable first, as its next step
    // would have.
    load_training(&path, &vs, &mut r).unwrap();
    assert_eq!(snapshot(&fresh), snapshot(&r));
    assert_eq!(model_values(&vs2), model_values(&vs));
    // And both continue alike.
    train(&mut r, &vs, 3..6, None);
    train(&mut fresh, &vs2, 3..6, None);
    assert_eq!(snapshot(&fresh), snapshot(&r));
    fs::remove_dir_all(dir).unwrap();
}
