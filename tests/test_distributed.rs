//! Data-parallel training across local processes, over c10d's Gloo on loopback.
//!
//! Each test starts its ranks as child processes running this same test binary (only the one
//! test, with `CASEOPT_DIST_*` variables saying which rank it is), on a free port of
//! 127.0.0.1, and waits for them with a deadline: a rank still running at the deadline is
//! killed and the test fails. Ranks report through lines `caseopt-result: KEY=VALUE` on stdout
//! and through files in a temporary directory.
#![cfg(feature = "distributed")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caseopt::distributed::{DataParallel, ProcessGroup, Rendezvous};
use caseopt::{case_optimizer, DistributedError, Error, PathExt, Result};
use tch::{nn, Device, Kind, Tensor};

/// How long any rank of any test may run.
const DEADLINE: Duration = Duration::from_secs(120);
/// The group timeout the ranks use: a dead peer must be reported well within the deadline.
const GROUP_TIMEOUT: Duration = Duration::from_secs(10);
const STEPS: i64 = 50;
const BATCH: i64 = 32;

/// What a child process knows about its role.
struct Worker {
    rank: usize,
    world: usize,
    port: u16,
    dir: PathBuf,
}

impl Worker {
    /// Joins the test's group on loopback, with the test timeout.
    fn connect(&self) -> Result<ProcessGroup> {
        let r = Rendezvous::new("127.0.0.1", self.port, self.rank, self.world)?;
        Ok(r.with_timeout(GROUP_TIMEOUT)?.connect()?)
    }
}

fn worker(test: &str) -> Option<Worker> {
    let var = |k: &str| std::env::var(k).ok();
    if var("CASEOPT_DIST_TEST")? != test {
        return None;
    }
    Some(Worker {
        rank: var("CASEOPT_DIST_RANK")?.parse().ok()?,
        world: var("CASEOPT_DIST_WORLD")?.parse().ok()?,
        port: var("CASEOPT_DIST_PORT")?.parse().ok()?,
        dir: PathBuf::from(var("CASEOPT_DIST_DIR")?),
    })
}

fn report(key: &str, value: impl std::fmt::Display) {
    println!("caseopt-result: {key}={value}");
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port on loopback");
    listener.local_addr().expect("its address").port()
}

/// Runs `test` as `world` ranks and returns each rank's reported values, in rank order.
/// Panics (failing the test) when a rank outlives the deadline or exits with a failure, unless
/// `may_fail` lists it.
fn launch(
    test: &str,
    world: usize,
    dir: &Path,
    may_fail: &[usize],
) -> Vec<HashMap<String, String>> {
    let port = free_port();
    let exe = std::env::current_exe().expect("the test binary");
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("CASEOPT_DIST_TEST", test)
                .env("CASEOPT_DIST_RANK", rank.to_string())
                .env("CASEOPT_DIST_WORLD", world.to_string())
                .env("CASEOPT_DIST_PORT", port.to_string())
                .env("CASEOPT_DIST_DIR", dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting a rank")
        })
        .collect();
    let started = Instant::now();
    let mut statuses = vec![None; world];
    while statuses.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_none() {
                statuses[rank] = child.try_wait().expect("polling a rank");
            }
        }
        if started.elapsed() > DEADLINE {
            for child in &mut children {
                let _ = child.kill();
            }
            panic!("{test}: ranks still running after {DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .enumerate()
        .map(|(rank, child)| {
            let out = child.wait_with_output().expect("a rank's output");
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() && !may_fail.contains(&rank) {
                panic!(
                    "{test}: rank {rank} failed ({}):\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let mut results: HashMap<String, String> = stdout
                .lines()
                // libtest may have written "test NAME ... " before it on the same line.
                .filter_map(|l| l.split_once("caseopt-result: ").map(|(_, r)| r))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            results.insert(
                "output".into(),
                format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
            );
            results
        })
        .collect()
}

/// A rank's reported `key`; fails the test with the rank's output when it reported none.
fn result<'a>(results: &'a HashMap<String, String>, key: &str) -> &'a str {
    results
        .get(key)
        .unwrap_or_else(|| panic!("no `{key}` reported; output:\n{}", results["output"]))
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("caseopt-dist-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// A small binarized model in f64 (exact comparisons need no f32 noise): a 1-bit kernel seen
/// through `ste_sign`, a real bias, a real output layer. Initialised from `seed`.
struct Model {
    vs: nn::VarStore,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Model {
    fn new(seed: i64, hidden: i64) -> Model {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let init = nn::Init::Randn { mean: 0.0, stdev: 1.0 };
        let w1 = (&root / "fc1").binary().var("weight", &[hidden, 16], init);
        let b1 = (&root / "fc1").var("bias", &[hidden], nn::Init::Const(0.0));
        let w2 = (&root / "fc2").var("weight", &[4, hidden], init);
        let b2 = (&root / "fc2").var("bias", &[4], nn::Init::Const(0.0));
        let _ = (&root / "bn").zeros_no_train("running_mean", &[4]);
        let mut vs = vs;
        vs.double();
        let vars = vs.variables();
        tch::no_grad(|| {
            let mut w = vars["fc1.weight"].shallow_clone();
            let signs = caseopt::ste_sign(&w).expect("signs");
            w.copy_(&signs);
        });
        let _ = (w1, b1, w2, b2);
        let get = |n: &str| vars[n].shallow_clone();
        Model {
            w1: get("fc1.weight"),
            b1: get("fc1.bias"),
            w2: get("fc2.weight"),
            b2: get("fc2.bias"),
            vs,
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let k = caseopt::ste_sign(&self.w1).expect("ste_sign");
        let h = (x.matmul(&k.tr()) + &self.b1).tanh();
        let logits = h.matmul(&self.w2.tr()) + &self.b2;
        logits.cross_entropy_for_logits(y)
    }
}

/// Step `step`'s whole global batch (the same on every rank).
fn global_batch(step: i64) -> (Tensor, Tensor) {
    tch::manual_seed(10_000 + step);
    let x = Tensor::randn([BATCH, 16], (Kind::Double, Device::Cpu));
    let y = x.narrow(1, 0, 4).argmax(1, false);
    (x, y)
}

/// This rank's share of a global batch.
fn share(x: &Tensor, y: &Tensor, rank: usize, world: usize) -> (Tensor, Tensor) {
    let n = BATCH / world as i64;
    (x.narrow(0, rank as i64 * n, n), y.narrow(0, rank as i64 * n, n))
}

/// Trains `STEPS` steps data-parallel (Bop on the 1-bit kernel, Adam on the rest) and saves
/// the model and optimizer state to `rank{r}.safetensors`.
fn train_and_save(w: &Worker, hidden: i64) -> Result<()> {
    tch::set_num_threads(1);
    // Different values on every rank: the broadcast must make them rank 0's.
    let model = Model::new(1 + w.rank as i64, hidden);
    let group = w.connect()?;
    let mut dp = DataParallel::new(group, &model.vs)?;
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-4, gamma: 0.1>,
        _ => Adam<lr: 0.01>,
    }
    .build(&model.vs)?;
    dp.check_router(&opt)?;
    for step in 0..STEPS {
        let (x, y) = global_batch(step);
        let (x, y) = share(&x, &y, w.rank, w.world);
        dp.backward_step(&mut opt, &model.loss(&x, &y))?;
    }
    caseopt::save_training(w.dir.join(format!("rank{}.safetensors", w.rank)), &model.vs, &opt)
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn two_ranks_stay_bit_identical() {
    const TEST: &str = "two_ranks_stay_bit_identical";
    if let Some(w) = worker(TEST) {
        train_and_save(&w, 32).expect("training");
        return;
    }
    let dir = temp_dir(TEST);
    launch(TEST, 2, &dir, &[]);
    let a = std::fs::read(dir.join("rank0.safetensors")).expect("rank 0's checkpoint");
    let b = std::fs::read(dir.join("rank1.safetensors")).expect("rank 1's checkpoint");
    // Every parameter, optimizer state and step counter, byte for byte.
    assert!(a == b, "the ranks' checkpoints differ after {STEPS} steps");
    // ... and they trained: the kernel moved away from rank 0's initial signs.
    let init = Model::new(1, 32);
    let saved = read(&dir.join("rank0.safetensors"));
    let w1 = &saved["model/fc1.weight"];
    let flipped = w1.ne_tensor(&init.w1).sum(Kind::Int64).int64_value(&[]);
    assert!(flipped > 0, "Bop flipped nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn half_batches_on_two_ranks_match_one_rank_with_the_whole_batch() {
    const TEST: &str = "half_batches_on_two_ranks_match_one_rank_with_the_whole_batch";
    if let Some(w) = worker(TEST) {
        train_and_save(&w, 32).expect("training");
        return;
    }
    let two = temp_dir(TEST);
    launch(TEST, 2, &two, &[]);
    let one = temp_dir(&format!("{TEST}-one"));
    launch(TEST, 1, &one, &[]);
    let a = read(&two.join("rank0.safetensors"));
    let b = read(&one.join("rank0.safetensors"));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        if name == "model/fc1.weight" {
            // Bop's flips: the same signs.
            assert!(x.equal(y), "{name}: different flips");
        } else if x.is_floating_point() {
            // The mean of two half-batch means is the whole batch's mean up to the order of
            // the additions (a few ulps of f64 per step); over 50 Adam steps that stays far
            // below 1e-9.
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff <= 1e-9, "{name}: differs by {diff:e}");
        } else {
            assert!(x.equal(y), "{name}");
        }
    }
    let _ = std::fs::remove_dir_all(&two);
    let _ = std::fs::remove_dir_all(&one);
}

/// `steps` data-parallel steps from step `first`, on a fresh model and router (ZeRO-1 when
/// `sharded`), optionally resuming from `resume` first; saves to `save` and returns the group
/// and the bytes of optimizer state this rank held.
fn zero_run(
    w: &Worker,
    group: ProcessGroup,
    sharded: bool,
    first: i64,
    steps: i64,
    resume: Option<&Path>,
    save: &Path,
) -> Result<(ProcessGroup, usize)> {
    let model = Model::new(1 + w.rank as i64, 32);
    let mut dp = DataParallel::new(group, &model.vs)?;
    if sharded {
        dp = dp.shard_optimizer_state()?;
    }
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-4, gamma: 0.1>,
        _ => Adam<lr: 0.01>,
    }
    .build(&model.vs)?;
    if let Some(path) = resume {
        dp.load_training(path, &model.vs, &mut opt)?;
    }
    for step in first..first + steps {
        let (x, y) = global_batch(step);
        let (x, y) = share(&x, &y, w.rank, w.world);
        dp.backward_step(&mut opt, &model.loss(&x, &y))?;
    }
    let state_bytes = DataParallel::optimizer_state_bytes(&opt);
    dp.save_training(save, &model.vs, &mut opt)?;
    Ok((dp.into_group(), state_bytes))
}

#[test]
fn zero1_matches_unsharded_bit_for_bit_and_resumes_exactly() {
    const TEST: &str = "zero1_matches_unsharded_bit_for_bit_and_resumes_exactly";
    if let Some(w) = worker(TEST) {
        tch::set_num_threads(1);
        let run = || -> Result<()> {
            let group = w.connect()?;
            let d = |name: &str| w.dir.join(name);
            let (group, plain) =
                zero_run(&w, group, false, 0, STEPS, None, &d("plain.safetensors"))?;
            let (group, sharded) =
                zero_run(&w, group, true, 0, STEPS, None, &d("zero.safetensors"))?;
            let half = STEPS / 2;
            let (group, _) = zero_run(&w, group, true, 0, half, None, &d("half.safetensors"))?;
            let mid = d("half.safetensors");
            let (_, _) =
                zero_run(&w, group, true, half, half, Some(&mid), &d("resumed.safetensors"))?;
            report("state_bytes", format!("{plain},{sharded}"));
            Ok(())
        };
        run().expect("the runs");
        return;
    }
    let dir = temp_dir(TEST);
    let results = launch(TEST, 2, &dir, &[]);
    let file = |name: &str| std::fs::read(dir.join(name)).expect(name);
    assert!(file("zero.safetensors") == file("plain.safetensors"), "ZeRO-1 differs from unsharded");
    assert!(file("resumed.safetensors") == file("zero.safetensors"), "the resumed run differs");
    // Each rank held about half of the state; together, all of it.
    let bytes: Vec<(usize, usize)> = results
        .iter()
        .map(|r| {
            let (a, b) = result(r, "state_bytes").split_once(',').expect("two numbers");
            (a.parse().expect("bytes"), b.parse().expect("bytes"))
        })
        .collect();
    let plain = bytes[0].0;
    assert_eq!(bytes[1].0, plain);
    assert_eq!(bytes[0].1 + bytes[1].1, plain, "{bytes:?}");
    assert!(bytes.iter().all(|&(_, s)| s < plain * 3 / 4), "{bytes:?}");
    // The gathered file is an ordinary checkpoint: it loads into an unsharded router.
    let model = Model::new(7, 32);
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-4, gamma: 0.1>,
        _ => Adam<lr: 0.01>,
    }
    .build(&model.vs)
    .expect("a router");
    caseopt::load_training(dir.join("zero.safetensors"), &model.vs, &mut opt).expect("loading");
    assert_eq!(opt.step_counts(), vec![STEPS as u64; 2]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_rank_is_a_typed_error_on_the_others() {
    const TEST: &str = "a_killed_rank_is_a_typed_error_on_the_others";
    if let Some(w) = worker(TEST) {
        tch::set_num_threads(1);
        let model = Model::new(1, 8);
        let run = || -> Result<()> {
            let group = w.connect()?;
            let mut dp = DataParallel::new(group, &model.vs)?;
            let mut opt = case_optimizer! { binary => Bop<threshold: 1e-4>, _ => Sgd<lr: 0.1> }
                .build(&model.vs)?;
            for step in 0..STEPS {
                if w.rank == 1 && step == 3 {
                    // A crash: no destructor runs, the sockets close with the process.
                    std::process::abort();
                }
                let (x, y) = global_batch(step);
                let (x, y) = share(&x, &y, w.rank, w.world);
                dp.backward_step(&mut opt, &model.loss(&x, &y))?;
            }
            Ok(())
        };
        let started = Instant::now();
        match run() {
            Err(Error::Distributed(DistributedError::PeerLost { .. })) => {
                report("error", "peer-lost")
            }
            Err(Error::Distributed(DistributedError::Timeout { .. })) => report("error", "timeout"),
            other => report("error", format!("unexpected: {other:?}")),
        }
        report("seconds", started.elapsed().as_secs_f64());
        return;
    }
    let dir = temp_dir(TEST);
    let results = launch(TEST, 2, &dir, &[1]);
    let error = results[0].get("error").map(String::as_str);
    assert!(matches!(error, Some("peer-lost" | "timeout")), "rank 0 reported {error:?}");
    let seconds: f64 = result(&results[0], "seconds").parse().expect("seconds");
    eprintln!("rank 0 saw the lost peer after {seconds:.2} s");
    assert!(seconds < GROUP_TIMEOUT.as_secs_f64() + 5.0, "took {seconds} s");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mismatched_shapes_are_named_on_every_rank() {
    const TEST: &str = "mismatched_shapes_are_named_on_every_rank";
    if let Some(w) = worker(TEST) {
        tch::set_num_threads(1);
        // Rank 1's hidden layer is wider.
        let model = Model::new(1, if w.rank == 1 { 16 } else { 8 });
        let result = w.connect().and_then(|g| DataParallel::new(g, &model.vs));
        match result {
            Err(e) => report("error", e),
            Ok(_) => report("error", "none"),
        }
        return;
    }
    let dir = temp_dir(TEST);
    for (rank, r) in launch(TEST, 2, &dir, &[]).iter().enumerate() {
        let e = result(r, "error");
        assert!(
            e.contains("rank 1 disagrees with rank 0") && e.contains("fc1.bias [16]"),
            "rank {rank}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mismatched_rules_are_named_on_every_rank() {
    const TEST: &str = "mismatched_rules_are_named_on_every_rank";
    if let Some(w) = worker(TEST) {
        tch::set_num_threads(1);
        let model = Model::new(1, 8);
        let run = || -> Result<()> {
            let group = w.connect()?;
            let dp = DataParallel::new(group, &model.vs)?;
            if w.rank == 0 {
                let opt = case_optimizer! { binary => Bop<threshold: 1e-4>, _ => Adam<lr: 0.01> }
                    .build(&model.vs)?;
                dp.check_router(&opt)
            } else {
                let opt = case_optimizer! { _ => Adam<lr: 0.01> }.build(&model.vs)?;
                dp.check_router(&opt)
            }
        };
        match run() {
            Err(e) => report("error", e),
            Ok(()) => report("error", "none"),
        }
        return;
    }
    let dir = temp_dir(TEST);
    for (rank, r) in launch(TEST, 2, &dir, &[]).iter().enumerate() {
        let e = result(r, "error");
        assert!(e.contains("rank 1 disagrees with rank 0: routing #0"), "rank {rank}: {e}");
        assert!(e.contains("_ => Adam") && e.contains("binary => Bop"), "rank {rank}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_non_finite_gradient_on_one_rank_refuses_the_step_on_every_rank() {
    const TEST: &str = "a_non_finite_gradient_on_one_rank_refuses_the_step_on_every_rank";
    if let Some(w) = worker(TEST) {
        tch::set_num_threads(1);
        let model = Model::new(1, 8);
        let run = || -> Result<String> {
            let group = w.connect()?;
            let mut dp = DataParallel::new(group, &model.vs)?;
            let mut opt = case_optimizer! { binary => Bop<threshold: 1e-4>, _ => Adam<lr: 0.01> }
                .build(&model.vs)?;
            let (x, y) = global_batch(0);
            let (x, y) = share(&x, &y, w.rank, w.world);
            if w.rank == 1 {
                let _ = x.get(0).get(0).fill_(f64::NAN);
            }
            let before = model.w2.copy();
            let verdict = match dp.backward_step(&mut opt, &model.loss(&x, &y)) {
                Err(Error::NonFiniteGradient { .. }) => "refused",
                Err(e) => return Err(e),
                Ok(()) => "stepped",
            };
            let unchanged = model.w2.equal(&before) && opt.step_counts().iter().all(|&c| c == 0);
            Ok(format!("{verdict},{unchanged}"))
        };
        match run() {
            Ok(v) => report("verdict", v),
            Err(e) => report("verdict", e),
        }
        return;
    }
    let dir = temp_dir(TEST);
    for (rank, r) in launch(TEST, 2, &dir, &[]).iter().enumerate() {
        assert_eq!(result(r, "verdict"), "refused,true", "rank {rank}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rendezvous_nobody_joins_times_out() {
    // Rank 1 of 2, with no rank 0 serving the store: the rendezvous must give up in time.
    let started = Instant::now();
    let result = Rendezvous::new("127.0.0.1", free_port(), 1, 2)
        .and_then(|r| r.with_timeout(Duration::from_secs(2)))
        .and_then(|r| r.connect());
    let elapsed = started.elapsed();
    match result {
        Err(DistributedError::Timeout { operation: "rendezvous", .. })
        | Err(DistributedError::PeerLost { operation: "rendezvous", .. })
        | Err(DistributedError::Failed { operation: "rendezvous", .. }) => {}
        other => panic!("expected a rendezvous error, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}
