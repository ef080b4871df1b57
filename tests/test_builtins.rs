//! Every built-in optimizer, from the registry (`caseopt::builtins()`) rather than a list of
//! names: each builds from its defaults, keeps exactly the state its declaration names, resumes
//! bit for bit from its exported state on every backend and from a router's checkpoint file,
//! and one that trains variables of one number of dimensions only refuses others by name when
//! a router is built. An optimizer added to the registry is covered here without a line of its
//! own (its parity with its reference: tests/test_parity.rs and tests/test_references.rs).

mod checkpoint_support;

use caseopt::{
    case_optimizer, Backend, BuiltinOptimizer, Constraint, Error, Execution, FromConfig, Optimizer,
    Param, PathExt, Result, Schedule, VarInfo,
};
use checkpoint_support::{model, model_values, scratch_dir, snapshot, train, ModelSpec};
use tch::{nn, Device, Kind, Tensor};

/// A 2-D f32 variable (Muon trains 2-D ones only) of +-1 values (what Bop's are), and the
/// gradients of `steps` steps, all from seeds.
fn variable_and_grads(steps: usize) -> (Tensor, Vec<Tensor>) {
    tch::manual_seed(7);
    let w = Tensor::randn([6, 5], (Kind::Float, Device::Cpu)).sign();
    let grads =
        (0..steps).map(|_| Tensor::randn([6, 5], (Kind::Float, Device::Cpu)) * 1e-2).collect();
    (w, grads)
}

fn built(name: &str, backend: Backend, w: &Tensor) -> Box<dyn BuiltinOptimizer> {
    let entry = caseopt::builtin(name).unwrap();
    let mut opt = entry.build(&serde_json::json!({})).unwrap();
    opt.set_backend(backend);
    opt.add_param(Param::new(VarInfo::of("w", w).with_bits(1), w.shallow_clone())).unwrap();
    opt
}

fn backends(name: &str) -> Vec<Backend> {
    let fused = caseopt::builtin(name).is_some_and(|b| b.has_fused_kernel());
    let mut out = vec![Backend::Auto, Backend::Torch, Backend::MultiTensor];
    if fused {
        out.push(Backend::Fused);
    }
    out
}

#[test]
fn every_builtin_resumes_bit_for_bit_from_its_exported_state() {
    assert!(caseopt::builtins().len() >= 12);
    for entry in caseopt::builtins() {
        let name = entry.type_name();
        for backend in backends(name) {
            let (w0, grads) = variable_and_grads(6);
            // The uninterrupted run.
            let w = w0.copy();
            let mut whole = built(name, backend, &w);
            for g in &grads {
                whole.step_with_grads(&[Some(g.copy())]).unwrap();
            }
            // Three steps, then a fresh optimizer from the exported state and step count.
            let v = w0.copy();
            let mut first = built(name, backend, &v);
            for g in &grads[..3] {
                first.step_with_grads(&[Some(g.copy())]).unwrap();
            }
            let state = first.state(0);
            let names: Vec<&str> = state.iter().map(|(n, _)| *n).collect();
            for n in &names {
                assert!(
                    first.state_names().contains(n),
                    "{name}: exports `{n}` it does not declare"
                );
            }
            // (SGD without momentum, its default, keeps none: the step count is all it needs.)
            let saved: Vec<(String, Tensor)> =
                state.into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect();
            let steps = first.step_count();
            drop(first);
            let resumed_w = v.copy();
            let mut resumed = built(name, backend, &resumed_w);
            resumed.set_state(0, saved).unwrap();
            resumed.set_step_count(steps);
            for g in &grads[3..] {
                resumed.step_with_grads(&[Some(g.copy())]).unwrap();
            }
            let same = w.equal(&resumed_w);
            assert!(same, "{name} on {backend:?}: the resumed run differs from the whole run");
        }
    }
}

#[test]
fn a_state_that_does_not_fit_its_variable_is_refused_by_name() {
    for entry in caseopt::builtins() {
        let name = entry.type_name();
        let (w0, grads) = variable_and_grads(1);
        let w = w0.copy();
        let mut opt = built(name, Backend::Torch, &w);
        opt.step_with_grads(&[Some(grads[0].copy())]).unwrap();
        let state = opt.state(0);
        // Each tensor state (not the step counter) with one more row is refused, naming it.
        for (bad, _) in state.iter().filter(|(n, t)| *n != "step" && t.dim() > 0) {
            let forged: Vec<(String, Tensor)> = state
                .iter()
                .map(|(n, t)| {
                    let t = if n == bad { Tensor::cat(&[t.copy(), t.copy()], 0) } else { t.copy() };
                    (n.to_string(), t)
                })
                .collect();
            let err = opt.set_state(0, forged).err();
            let err = err.unwrap_or_else(|| panic!("{name}: a wrong `{bad}` was accepted"));
            assert!(err.to_string().contains(bad), "{name}: {err}");
        }
    }
}

/// Any built-in optimizer, by its registry name, as a type a rule can name: the registry's
/// optimizer behind [`Optimizer`]'s every method, so that one router here runs each of them.
pub struct Registered(pub Box<dyn BuiltinOptimizer>);

/// Which built-in [`Registered`] builds, with its default config.
#[derive(Clone)]
pub struct RegisteredConfig {
    pub name: &'static str,
}

impl Default for RegisteredConfig {
    fn default() -> Self {
        RegisteredConfig { name: "Sgd" }
    }
}

impl FromConfig for Registered {
    type Config = RegisteredConfig;
    fn from_config(config: RegisteredConfig) -> Result<Self> {
        let entry = caseopt::builtin(config.name).expect("a built-in");
        Ok(Registered(entry.build(&serde_json::json!({}))?))
    }
}

impl Optimizer for Registered {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn add_param(&mut self, param: Param) -> Result<()> {
        self.0.add_param(param)
    }
    fn params(&self) -> &[Param] {
        self.0.params()
    }
    fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.0.step_with_grads(grads)
    }
    fn step_count(&self) -> u64 {
        self.0.step_count()
    }
    fn set_step_count(&mut self, steps: u64) {
        self.0.set_step_count(steps)
    }
    fn hyperparameter_names(&self) -> &'static [&'static str] {
        self.0.hyperparameter_names()
    }
    fn schedule(&self, name: &str) -> Result<&Schedule> {
        self.0.schedule(name)
    }
    fn set_hyperparameter(&mut self, name: &str, value: Schedule) -> Result<()> {
        self.0.set_hyperparameter(name, value)
    }
    fn state_names(&self) -> &'static [&'static str] {
        self.0.state_names()
    }
    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)> {
        self.0.state(index)
    }
    fn set_state(&mut self, index: usize, state: Vec<(String, Tensor)>) -> Result<()> {
        self.0.set_state(index, state)
    }
    fn check_step(&self, grads: &[Option<Tensor>]) -> Result<()> {
        self.0.check_step(grads)
    }
    fn set_constraint(&mut self, index: usize, constraint: Option<Constraint>) -> Result<bool> {
        self.0.set_constraint(index, constraint)
    }
    fn constraint(&self, index: usize) -> Option<Constraint> {
        self.0.constraint(index)
    }
    fn execution(&self) -> Option<&dyn Execution> {
        self.0.execution()
    }
    fn set_master_weights(&mut self, on: bool) -> Result<bool> {
        self.0.set_master_weights(on)
    }
    fn master_weights(&self) -> bool {
        self.0.master_weights()
    }
    fn check_dtype(&self, param: &Param) -> Result<()> {
        self.0.check_dtype(param)
    }
    fn state_kind(&self, index: usize) -> Option<Kind> {
        self.0.state_kind(index)
    }
    fn record_remote_flips(&mut self, index: usize, flipped: u64) -> bool {
        self.0.record_remote_flips(index, flipped)
    }
}

/// Each built-in trains the model's matrix (`ndim(2)`), and its other variables (a 4-D kernel
/// and a bias) too unless it trains one number of dimensions only (then Adam does): 20 steps,
/// `save_training`, a fresh model and router from another seed, `load_training`, 20 more steps
/// are the 40 steps in one go, bit for bit (every state and step count travels in the file).
#[test]
fn every_builtin_resumes_from_a_router_checkpoint_bit_for_bit() {
    for entry in caseopt::builtins() {
        let name = entry.type_name();
        let rest = if entry.required_ndim().is_some() { "Adam" } else { name };
        let make = |vs: &nn::VarStore| {
            case_optimizer! {
                ndim(2) => Registered<name: (name)>,
                _ => Registered<name: (rest)>,
            }
            .build(vs)
            .unwrap()
        };
        let spec = ModelSpec::default();
        let vs = model(&spec);
        let mut straight = make(&vs);
        train(&mut straight, &vs, 0..40, None);

        let dir = scratch_dir("builtin-resume");
        let path = dir.join("ckpt.safetensors");
        let vs1 = model(&spec);
        let mut first = make(&vs1);
        train(&mut first, &vs1, 0..20, None);
        caseopt::save_training(&path, &vs1, &first).unwrap();
        drop(first);
        let vs2 = model(&ModelSpec { seed: 99, ..spec });
        let mut second = make(&vs2);
        caseopt::load_training(&path, &vs2, &mut second).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(second.optimizer(0).unwrap().name(), entry.name());
        train(&mut second, &vs2, 20..40, None);

        assert_eq!(snapshot(&second), snapshot(&straight), "{name}");
        assert_eq!(model_values(&vs2), model_values(&vs), "{name}");
        assert_eq!(second.step_counts(), vec![40, 40], "{name}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn is_weight(v: &VarInfo) -> bool {
    v.name.ends_with("weight")
}

/// A built-in that trains variables of n dimensions only (Muon: 2), routed a variable of
/// another number by a rule the macro cannot decide (a user function), refuses it when the
/// router is built, naming the variable, its shape and the rule; one of n dimensions, binary or
/// not, is accepted.
#[test]
fn a_variable_of_another_rank_is_refused_at_build_by_name() {
    let mut checked = 0;
    for entry in caseopt::builtins() {
        let Some(n) = entry.required_ndim() else { continue };
        let name = entry.type_name();
        let other: Vec<i64> = (0..n + 2).map(|d| 3 + d as i64).collect();
        let right: Vec<i64> = (0..n).map(|d| 4 + d as i64).collect();
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = (&root / "conv").var("weight", &other, nn::Init::Const(0.1));
        let _ = (&root / "fc").var("weight", &right, nn::Init::Const(0.1));
        let _ = (&root / "fc").var("bias", &[4], nn::Init::Const(0.0));
        let err = case_optimizer! {
            where(is_weight) => Registered<name: (name)>,
            _ => AdamW,
        }
        .build(&vs)
        .err()
        .unwrap_or_else(|| panic!("{name}: conv.weight {other:?} was accepted"));
        let text = err.to_string();
        let Error::Rule { source, .. } = err else { panic!("{name}: not a rule's error: {text}") };
        match *source {
            Error::UnsupportedVariable { optimizer, ref variable, ref shape, .. } => {
                assert_eq!(optimizer, entry.name());
                assert_eq!(variable, "conv.weight");
                assert_eq!(shape, &other);
            }
            ref other => panic!("{name}: not UnsupportedVariable: {other}"),
        }
        assert!(text.contains("conv.weight") && text.contains(&format!("{n}-D")), "{text}");

        // The rule is about shape only: a binary variable of n dimensions may go there too.
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().binary().var("weight", &right, nn::Init::Const(1.0));
        let _ = vs.root().var("bias", &[2], nn::Init::Const(0.0));
        let built =
            case_optimizer! { where(is_weight) => Registered<name: (name)>, _ => AdamW }.build(&vs);
        assert!(built.is_ok(), "{name}: {:?}", built.err());
        checked += 1;
    }
    assert!(checked >= 1, "no built-in requires a number of dimensions");
}
