//! Shared by the checkpoint tests: a small model with binary and full-precision variables, a
//! `binary => Bop, _ => Adam` router, a fixed gradient sequence, and exact snapshots of a
//! router's and a model's state.

#![allow(dead_code)]

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use caseopt::{case_optimizer, PathExt, Router, Schedule};
use tch::{nn, Device, Kind, Tensor};

case_optimizer! {
    /// The BNN recipe most checkpoint tests use.
    pub struct BopAdam {
        binary => Bop<threshold: 1e-6, gamma: 1e-2>,
        _ => Adam<lr: 0.01>,
    }
}

/// `BopAdam` over `vs`.
pub fn bop_adam(vs: &nn::VarStore) -> BopAdam {
    BopAdam::build(vs).unwrap()
}

/// xorshift64*: a fixed sequence independent of libtorch's global generator (which tests
/// running in parallel threads would share).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The model's variables: `conv.weight` [4, 3, 2, 2] and `fc.weight` [hidden, 6] binary,
/// `fc.bias` [hidden] full precision, optionally `extra.bias` [3].
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub seed: u64,
    pub hidden: i64,
    pub kind: Kind,
    pub device: Device,
    pub extra: bool,
    pub without_bias: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            seed: 1,
            hidden: 5,
            kind: Kind::Float,
            device: Device::Cpu,
            extra: false,
            without_bias: false,
        }
    }
}

fn random(rng: &mut Rng, shape: &[i64], signs: bool) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x = rng.symmetric();
            if signs {
                if x < 0.0 {
                    -1.0
                } else {
                    1.0
                }
            } else {
                x
            }
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

pub fn model(spec: &ModelSpec) -> nn::VarStore {
    let mut vs = nn::VarStore::new(spec.device);
    let mut rng = Rng::new(spec.seed);
    let root = vs.root();
    let _ = root.sub("conv").binary().var_copy("weight", &random(&mut rng, &[4, 3, 2, 2], true));
    let _ = root.sub("fc").binary().var_copy("weight", &random(&mut rng, &[spec.hidden, 6], true));
    if !spec.without_bias {
        let _ = root.sub("fc").var_copy("bias", &random(&mut rng, &[spec.hidden], false));
    }
    if spec.extra {
        let _ = root.sub("extra").var_copy("bias", &random(&mut rng, &[3], false));
    }
    if spec.kind != Kind::Float {
        vs.set_kind(spec.kind);
    }
    vs
}

/// The fixed gradient of variable `name` at step `step`, scaled so that Bop flips some weights.
pub fn gradient(name: &str, step: u64, like: &Tensor) -> Tensor {
    let salt = name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = Rng::new(step.wrapping_mul(1_000_003) ^ salt);
    random(&mut rng, &like.size(), false)
        .f_mul_scalar(1e-2)
        .unwrap()
        .to_kind(like.kind())
        .to_device(like.device())
}

/// Steps `router` once per step in `steps`, with gradients that depend only on the step and
/// the variable; at step `lower_lr_at` rule 1's learning rate becomes 0.005.
pub fn train<R: Router + ?Sized>(
    router: &mut R,
    vs: &nn::VarStore,
    steps: Range<u64>,
    lower_lr_at: Option<u64>,
) {
    let mut vars: Vec<(String, Tensor)> = vs.trainable_variables_named();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for step in steps {
        if lower_lr_at == Some(step) {
            router
                .optimizer_mut(1)
                .unwrap()
                .set_hyperparameter("lr", Schedule::Constant(0.005))
                .unwrap();
        }
        let mut loss = Tensor::zeros([], (vars[0].1.kind(), vars[0].1.device()));
        for (name, t) in &vars {
            loss += (t * gradient(name, step, t)).sum(t.kind());
        }
        router.backward_step(&loss).unwrap();
    }
}

trait Named {
    fn trainable_variables_named(&self) -> Vec<(String, Tensor)>;
}

impl Named for nn::VarStore {
    fn trainable_variables_named(&self) -> Vec<(String, Tensor)> {
        caseopt::trainable_vars(self).into_iter().map(|p| (p.info.name, p.tensor)).collect()
    }
}

/// A tensor's exact contents.
#[derive(Clone, PartialEq)]
pub struct Exact {
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Exact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hash = self.bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        write!(f, "{:?}{:?}#{hash:016x}", self.kind, self.shape)
    }
}

pub fn exact(t: &Tensor) -> Exact {
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel).unwrap();
    Exact { kind: t.kind(), shape: t.size(), bytes }
}

/// Everything a router's future depends on, exactly.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub step_counts: Vec<u64>,
    /// Per rule: (hyperparameter, schedule description), (variable, value), (variable, state).
    pub rules: Vec<RuleSnapshot>,
}

#[derive(Debug, PartialEq)]
pub struct RuleSnapshot {
    pub hyperparameters: Vec<(String, String)>,
    pub params: Vec<(String, Exact)>,
    pub states: Vec<(String, Vec<(String, Exact)>)>,
}

pub fn snapshot<R: Router + ?Sized>(router: &R) -> Snapshot {
    let rules = (0..router.rules().len())
        .map(|i| {
            let opt = router.optimizer(i).unwrap();
            RuleSnapshot {
                hyperparameters: opt
                    .hyperparameter_names()
                    .iter()
                    .map(|n| (n.to_string(), format!("{:?}", opt.schedule(n).unwrap())))
                    .collect(),
                params: opt
                    .params()
                    .iter()
                    .map(|p| (p.info.name.clone(), exact(&p.tensor)))
                    .collect(),
                states: (0..opt.params().len())
                    .map(|j| {
                        let state =
                            opt.state(j).into_iter().map(|(n, t)| (n.to_string(), exact(&t)));
                        (opt.params()[j].info.name.clone(), state.collect())
                    })
                    .collect(),
            }
        })
        .collect();
    Snapshot { step_counts: router.step_counts(), rules }
}

/// Steps `router` and asserts that the step is refused for a non-finite gradient in `variable`
/// and that it changed nothing.
pub fn assert_refused_untouched<R: Router + ?Sized>(router: &mut R, variable: &str) {
    let before = snapshot(router);
    let err = router.step().unwrap_err();
    assert!(
        matches!(&err, caseopt::Error::NonFiniteGradient { variable: v } if v == variable),
        "{err}"
    );
    assert_eq!(snapshot(router), before, "{variable}: a refused step changed something");
}

/// Every named variable of the model, exactly, sorted by name.
pub fn model_values(vs: &nn::VarStore) -> Vec<(String, Exact)> {
    let mut out: Vec<(String, Exact)> =
        vs.variables().into_iter().map(|(n, t)| (n, exact(&t))).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory for one test.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("caseopt-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Rewrites the checkpoint at `path` as a forger with caseopt's format in hand would: `edit`
/// changes the metadata JSON and tensors' bytes (each keeping its length), and every checksum is
/// then recomputed, so that only caseopt's own checks of the values stand in the way.
pub fn craft(
    path: &std::path::Path,
    edit: impl FnOnce(&mut serde_json::Value, &mut std::collections::BTreeMap<String, Vec<u8>>),
) {
    use serde_json::Value;
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let mut meta: Value =
        serde_json::from_str(header["__metadata__"]["caseopt"].as_str().unwrap()).unwrap();
    let offsets = |entry: &Value| {
        let o = entry["data_offsets"].as_array().unwrap();
        (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize)
    };
    let mut tensors = std::collections::BTreeMap::new();
    for (key, entry) in header.as_object().unwrap() {
        if key != "__metadata__" {
            let (b, e) = offsets(entry);
            tensors.insert(key.clone(), data[b..e].to_vec());
        }
    }
    edit(&mut meta, &mut tensors);
    for (key, new) in &tensors {
        let (b, e) = offsets(&header[key.as_str()]);
        assert_eq!(new.len(), e - b, "craft: `{key}` must keep its length");
        data[b..e].copy_from_slice(new);
        meta["tensors"][key.as_str()]["crc32"] = Value::from(crc32fast::hash(new));
    }
    let json = meta.to_string();
    header["__metadata__"]["caseopt.crc32"] =
        Value::from(crc32fast::hash(json.as_bytes()).to_string());
    header["__metadata__"]["caseopt"] = Value::from(json);
    let mut head = header.to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}
