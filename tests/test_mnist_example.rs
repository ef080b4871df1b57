//! The MNIST example (`examples/mnist_bnn.rs`) end to end, on a tiny synthetic IDX data set of
//! its own (256 training and 64 test images of 20x20 pixels, 3 classes, two files gzip'ed):
//! a resumed run gives the same bits as an uninterrupted one (with Bop, and with the
//! latent-weight recipe, whose clip is configuration and not in the checkpoint),
//! `metrics.jsonl` holds each epoch once (with Bop's flip ratio), resuming with other settings,
//! data, recipe or world size is refused by name, bad output paths fail before training, and
//! `--world-size 2` trains data-parallel on two processes and resumes bit for bit.
//!
//! The example binary is the one `cargo test` builds next to this test
//! (`target/<profile>/examples/mnist_bnn`). The IDX reader's own tests (malformed files) and
//! the rank slicing's run here too, through the modules included below.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(dead_code)]
#[path = "../examples/mnist_bnn/idx.rs"]
mod idx;
// For its unit tests (how a global batch is sliced over the ranks).
#[allow(dead_code)]
#[path = "../examples/mnist_bnn/ranks.rs"]
mod ranks;

const SIDE: u32 = 20;
const CLASSES: u8 = 3;

/// A temporary directory, removed when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new_named(tag: &str) -> Scratch {
        let dir = std::env::temp_dir()
            .join(format!("caseopt-mnist-example-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A small deterministic generator (a 64-bit LCG, Knuth's MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

/// `count` images whose class shows as a bright horizontal band, plus noise, and their labels.
fn split(count: u32, rng: &mut Lcg) -> (Vec<u8>, Vec<u8>) {
    let mut images = Vec::new();
    for x in [idx::IMAGES_MAGIC, count, SIDE, SIDE] {
        images.extend_from_slice(&x.to_be_bytes());
    }
    let mut labels = Vec::new();
    labels.extend_from_slice(&idx::LABELS_MAGIC.to_be_bytes());
    labels.extend_from_slice(&count.to_be_bytes());
    for i in 0..count {
        let class = (i % u32::from(CLASSES)) as u8;
        labels.push(class);
        let band = u32::from(class) * SIDE / u32::from(CLASSES);
        for row in 0..SIDE {
            for _ in 0..SIDE {
                let noise = rng.byte() / 4;
                let in_band = row >= band && row < band + SIDE / u32::from(CLASSES);
                images.push(if in_band { 192 + noise / 2 } else { noise });
            }
        }
    }
    (images, labels)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes the data set into `dir`: training images and test labels gzip'ed, the others raw.
fn write_data_set(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let mut rng = Lcg(seed);
    let (train_images, train_labels) = split(256, &mut rng);
    let (test_images, test_labels) = split(64, &mut rng);
    fs::write(dir.join(format!("{}.gz", idx::TRAIN_IMAGES)), gzip(&train_images)).unwrap();
    fs::write(dir.join(idx::TRAIN_LABELS), train_labels).unwrap();
    fs::write(dir.join(idx::TEST_IMAGES), test_images).unwrap();
    fs::write(dir.join(format!("{}.gz", idx::TEST_LABELS)), gzip(&test_labels)).unwrap();
}

/// The example binary `cargo test` built into this profile's directory. `cargo test` builds
/// examples, but `cargo test --test test_mnist_example` does not, so a binary older than the
/// sources it is built from is refused rather than tested.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/test_mnist_example-<hash> -> target/<profile>/examples/mnist_bnn
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin =
        profile_dir.join("examples").join(format!("mnist_bnn{}", std::env::consts::EXE_SUFFIX));
    let build = "build it with `cargo build --example mnist_bnn` (with this test's profile), or \
                 run `cargo test` without `--test`, which builds the examples";
    let built = fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {build}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["examples/mnist_bnn.rs", "examples/mnist_bnn", "runtime", "macros/src"];
    if let Some(newer) = sources.iter().find_map(|s| newer_file(&root.join(s), built)) {
        panic!("{} is older than {}; {build}", bin.display(), newer.display());
    }
    bin
}

/// A file under `path` (or `path` itself) modified after `time`.
fn newer_file(path: &Path, time: std::time::SystemTime) -> Option<PathBuf> {
    let meta = fs::metadata(path).ok()?;
    if meta.is_dir() {
        return fs::read_dir(path).ok()?.flatten().find_map(|e| newer_file(&e.path(), time));
    }
    (meta.modified().ok()? > time).then(|| path.to_path_buf())
}

/// Runs the example on `data` with quick, deterministic settings and `extra` arguments.
fn run(data: &Path, extra: &[&str]) -> Output {
    Command::new(example_binary())
        .arg("--data")
        .arg(data)
        .args(["--threads", "1", "--precise-bn-batches", "0", "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn succeeds(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "the example failed:\n{stdout}\n{stderr}");
    stdout
}

fn fails(out: Output) -> (String, String) {
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "the example should have failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// `metrics.jsonl` as (epoch, train_loss bits, test_acc bits) per line.
fn metrics(out_dir: &Path) -> Vec<(u64, u64, u64)> {
    fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let bits = |k: &str| v[k].as_f64().unwrap().to_bits();
            (v["epoch"].as_u64().unwrap(), bits("train_loss"), bits("test_acc"))
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Each line's `flip_ratio` field (`None` for `null`); panics when a line lacks the field.
fn flip_ratios(out_dir: &Path) -> Vec<Option<f64>> {
    fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let field = v.get("flip_ratio").unwrap_or_else(|| panic!("no flip_ratio: {line}"));
            field.as_f64()
        })
        .collect()
}

#[test]
fn resumed_run_is_bit_identical_and_refuses_other_settings() {
    let scratch = Scratch::new_named("resume");
    let dir = &scratch.0;
    let data = dir.join("data");
    write_data_set(&data, 1);

    // Uninterrupted: two epochs.
    let (full_out, full_ck) = (dir.join("full"), dir.join("full.safetensors"));
    let stdout = succeeds(run(
        &data,
        &["--epochs", "2", "--out", s(&full_out), "--checkpoint", s(&full_ck)],
    ));
    assert!(
        stdout.contains("256 training and 64 test images of 20x20 pixels, 3 classes"),
        "{stdout}"
    );
    assert!(stdout.contains("final test accuracy after 2 epoch(s): "), "{stdout}");
    // The run state is saved with the model but routed to no optimizer.
    assert!(!stdout.contains("run."), "{stdout}");
    let full_metrics = metrics(&full_out);
    assert_eq!(full_metrics.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
    // Bop flips weights; the epoch's mean flip ratio per step is a fraction.
    for ratio in flip_ratios(&full_out) {
        let ratio = ratio.expect("Bop's flip ratio");
        assert!(ratio > 0.0 && ratio <= 1.0, "{ratio}");
    }
    assert!(stdout.contains("flip ratio "), "{stdout}");

    // Interrupted after one epoch, then resumed to two.
    let (part_out, part_ck) = (dir.join("part"), dir.join("part.safetensors"));
    succeeds(run(&data, &["--epochs", "1", "--out", s(&part_out), "--checkpoint", s(&part_ck)]));
    let after_one = dir.join("after-one.safetensors");
    fs::copy(&part_ck, &after_one).unwrap();
    let resume = |from: &Path| {
        run(
            &data,
            &[
                "--epochs",
                "2",
                "--out",
                s(&part_out),
                "--checkpoint",
                s(&part_ck),
                "--resume",
                s(from),
            ],
        )
    };
    let stdout = succeeds(resume(&part_ck));
    assert!(stdout.contains("resumed from"), "{stdout}");
    assert!(stdout.contains("after 1 epoch(s)"), "{stdout}");
    assert!(
        stdout.contains(
            "final test accuracy after 2 epoch(s) (1 from the checkpoint, 1 in this run)"
        ),
        "{stdout}"
    );
    assert_eq!(fs::read(&part_ck).unwrap(), fs::read(&full_ck).unwrap(), "checkpoints differ");
    assert_eq!(metrics(&part_out), full_metrics);

    // A run stopped after writing epoch 2's metrics but before its checkpoint: resuming from
    // epoch 1 again must not leave epoch 2 twice.
    let stdout = succeeds(resume(&after_one));
    assert!(stdout.contains("1 line(s) of later or repeated epochs dropped"), "{stdout}");
    assert_eq!(metrics(&part_out), full_metrics);
    assert_eq!(fs::read(&part_ck).unwrap(), fs::read(&full_ck).unwrap(), "checkpoints differ");

    // Other settings are refused by name, before anything trains.
    let other = |extra: &[&str]| {
        let mut args = vec!["--epochs", "2", "--out", s(&part_out), "--resume", s(&after_one)];
        args.extend_from_slice(extra);
        fails(run(&data, &args))
    };
    let (stdout, stderr) = other(&["--batch-size", "32"]);
    assert!(stderr.contains("`--batch-size` differs"), "{stderr}");
    assert!(!stdout.contains("epoch 2/2"), "{stdout}");
    let (_, stderr) = other(&["--seed", "7", "--train-images", "200"]);
    assert!(
        stderr.contains("`--seed` differs") && stderr.contains("`--train-images` differs"),
        "{stderr}"
    );
    let other_data = dir.join("other-data");
    write_data_set(&other_data, 2);
    let (_, stderr) = fails(run(
        &other_data,
        &["--epochs", "2", "--out", s(&part_out), "--resume", s(&after_one)],
    ));
    assert!(stderr.contains("`--data` differs"), "{stderr}");
    let (_, stderr) = other(&["--recipe", "latent-adam"]);
    assert!(
        stderr
            .contains("`--recipe` differs: the checkpoint's run had bop, this run has latent-adam"),
        "{stderr}"
    );
    // The refused runs left the metrics alone.
    assert_eq!(metrics(&part_out), full_metrics);

    // Fewer epochs than the checkpoint has: an error; as many: the checkpoint, reported as is.
    let (_, stderr) =
        fails(run(&data, &["--epochs", "1", "--out", s(&part_out), "--resume", s(&full_ck)]));
    assert!(stderr.contains("already trained 2 epoch(s)"), "{stderr}");
    let stdout =
        succeeds(run(&data, &["--epochs", "2", "--out", s(&part_out), "--resume", s(&full_ck)]));
    assert!(
        stdout.contains("after 2 epoch(s), all from the checkpoint (none trained in this run)"),
        "{stdout}"
    );
    assert_eq!(metrics(&part_out), full_metrics);
}

#[test]
fn the_latent_weight_recipe_trains_clipped_kernels_and_resumes_bit_identically() {
    let scratch = Scratch::new_named("latent");
    let dir = &scratch.0;
    let data = dir.join("data");
    write_data_set(&data, 5);
    let latent = ["--recipe", "latent-adam"];
    let (full_out, full_ck) = (dir.join("full"), dir.join("full.safetensors"));
    let mut args = vec!["--epochs", "2", "--out", s(&full_out), "--checkpoint", s(&full_ck)];
    args.extend_from_slice(&latent);
    let out = run(&data, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = succeeds(out);
    // The kernels are latent weights, real values by design: nothing warns about them.
    assert!(!stderr.contains("declared 1-bit"), "{stderr}");
    assert!(stdout.contains("recipe latent-adam"), "{stdout}");
    assert!(stdout.contains("latent kernels lie in [-1, 1]"), "{stdout}");
    // Every variable with Adam; no binary optimizer, so no flip ratio.
    assert!(!stdout.contains("Bop") && !stdout.contains("flip ratio"), "{stdout}");
    assert_eq!(flip_ratios(&full_out), [None, None]);
    // Three well separated classes: far above chance after two epochs.
    let last_test_acc = f64::from_bits(metrics(&full_out)[1].2);
    assert!(last_test_acc > 0.6, "{last_test_acc}");

    let (part_out, part_ck) = (dir.join("part"), dir.join("part.safetensors"));
    let mut args = vec!["--epochs", "1", "--out", s(&part_out), "--checkpoint", s(&part_ck)];
    args.extend_from_slice(&latent);
    succeeds(run(&data, &args));
    let mut args = vec!["--epochs", "2", "--out", s(&part_out), "--checkpoint", s(&part_ck)];
    args.extend_from_slice(&latent);
    args.extend_from_slice(&["--resume", s(&part_ck)]);
    succeeds(run(&data, &args));
    assert_eq!(fs::read(&part_ck).unwrap(), fs::read(&full_ck).unwrap(), "checkpoints differ");
    assert_eq!(metrics(&part_out), metrics(&full_out));

    // And the other way round: a latent-weight checkpoint refuses Bop.
    let (_, stderr) =
        fails(run(&data, &["--epochs", "2", "--out", s(&part_out), "--resume", s(&full_ck)]));
    assert!(stderr.contains("`--recipe` differs"), "{stderr}");
}

#[cfg(feature = "distributed")]
#[test]
fn two_ranks_train_data_parallel_and_resume_bit_identically() {
    let scratch = Scratch::new_named("ranks");
    let dir = &scratch.0;
    let data = dir.join("data");
    write_data_set(&data, 9);
    let two = ["--world-size", "2"];
    let (full_out, full_ck) = (dir.join("full"), dir.join("full.safetensors"));
    let mut args = vec!["--epochs", "2", "--out", s(&full_out), "--checkpoint", s(&full_ck)];
    args.extend_from_slice(&two);
    let stdout = succeeds(run(&data, &args));
    // Rank 0 alone reports: one line per epoch, one metrics line per epoch.
    assert!(stdout.contains("starting 2 ranks"), "{stdout}");
    assert_eq!(stdout.matches("epoch 2/2:").count(), 1, "{stdout}");
    let lines = metrics(&full_out);
    assert_eq!(lines.len(), 2);
    assert!(f64::from_bits(lines[1].2) > 0.6, "test accuracy {}", f64::from_bits(lines[1].2));

    let (part_out, part_ck) = (dir.join("part"), dir.join("part.safetensors"));
    let mut args = vec!["--epochs", "1", "--out", s(&part_out), "--checkpoint", s(&part_ck)];
    args.extend_from_slice(&two);
    succeeds(run(&data, &args));
    let mut args = vec!["--epochs", "2", "--out", s(&part_out), "--checkpoint", s(&part_ck)];
    args.extend_from_slice(&two);
    args.extend_from_slice(&["--resume", s(&part_ck)]);
    succeeds(run(&data, &args));
    assert_eq!(fs::read(&part_ck).unwrap(), fs::read(&full_ck).unwrap(), "checkpoints differ");
    assert_eq!(metrics(&part_out), metrics(&full_out));

    // One process cannot continue a two-rank run bit for bit: refused by name.
    let (_, stderr) =
        fails(run(&data, &["--epochs", "3", "--out", s(&part_out), "--resume", s(&full_ck)]));
    assert!(stderr.contains("`--world-size` differs"), "{stderr}");
}

#[test]
fn bad_output_paths_fail_before_training() {
    let scratch = Scratch::new_named("paths");
    let dir = &scratch.0;
    let data = dir.join("data");
    write_data_set(&data, 3);
    let out = dir.join("out");
    let (stdout, stderr) = fails(run(&data, &["--out", s(&out), "--checkpoint", s(dir)]));
    assert!(stderr.contains("--checkpoint") && stderr.contains("is a directory"), "{stderr}");
    assert!(!stdout.contains("epoch 1/"), "{stdout}");
    assert!(!out.join("metrics.jsonl").exists());

    let (_, stderr) = fails(run(&data, &["--out", s(&data.join(idx::TRAIN_LABELS))]));
    assert!(stderr.contains("--out"), "{stderr}");
}

#[test]
fn malformed_data_is_a_clear_error() {
    let scratch = Scratch::new_named("malformed");
    let data = scratch.0.join("data");
    write_data_set(&data, 4);
    let labels = data.join(idx::TRAIN_LABELS);
    let mut bytes = fs::read(&labels).unwrap();
    bytes[8 + 5] = 7; // a label out of range for --classes 3
    fs::write(&labels, &bytes).unwrap();
    let (_, stderr) = fails(run(&data, &["--classes", "3", "--out", s(&scratch.0.join("out"))]));
    assert!(stderr.contains("train-labels-idx1-ubyte: label 7 at index 5"), "{stderr}");
}
