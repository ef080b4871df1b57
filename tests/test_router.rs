//! Routers built by `case_optimizer!`: routing with larq's `CaseOptimizer` semantics, the
//! routing table, the training API, and user optimizers and predicates.

use std::sync::atomic::{AtomicUsize, Ordering};

use caseopt::{
    case_optimizer, Error, FromConfig, Optimizer, Param, PathExt, Result, Router, Schedule, VarInfo,
};
use tch::{nn, Device, Kind, Tensor};

/// A BNN-shaped store: a binary conv kernel and dense kernel, full-precision biases and a
/// batch-norm shift.
fn bnn_store() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = (&root / "conv1").binary().var("weight", &[2, 1, 3, 3], nn::Init::Const(1.0));
    let _ = (&root / "conv1").var("bias", &[2], nn::Init::Const(0.0));
    let _ = (&root / "bn1").var("beta", &[2], nn::Init::Const(0.0));
    let _ = (&root / "fc").binary().var("weight", &[2, 4], nn::Init::Const(-1.0));
    let _ = (&root / "fc").var("bias", &[2], nn::Init::Const(0.0));
    vs
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a float tensor")
}

fn var(vs: &nn::VarStore, name: &str) -> Tensor {
    vs.variables().remove(name).unwrap_or_else(|| panic!("no variable {name}"))
}

/// Gives every routed variable the gradient `grad(name)` (same shape) via one backward pass.
fn set_grads(vs: &nn::VarStore, grad: impl Fn(&str, &Tensor) -> Tensor) {
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (name, t) in vs.variables() {
        let g = grad(&name, &t).detach();
        loss += (&t * g).sum(Kind::Float);
    }
    for (_, t) in vs.variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    loss.backward();
}

#[test]
fn routes_a_bnn_store_like_larq_and_steps_each_optimizer() -> Result<()> {
    let vs = bnn_store();
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 0.5, gamma: 1.0>,
        _ => Adam<lr: 0.01>,
    }
    .build(&vs)?;
    let table = opt.routing_table();
    assert_eq!(table.variables_of(0), vec!["conv1.weight", "fc.weight"]);
    assert_eq!(table.variables_of(1), vec!["bn1.beta", "conv1.bias", "fc.bias"]);
    assert!(table.untrained().is_empty() && table.warnings().is_empty());
    assert_eq!(table.rule_of("fc.weight").map(|r| r.optimizer), Some("Bop"));

    // docs/design.md's second worked check, on fc.weight (all -1): gamma 1, threshold 0.5,
    // w = -1, g = -0.5 -> m = -0.5, w*m = 0.5 = threshold -> +1; with g = -1 it flips too.
    set_grads(&vs, |name, t| match name {
        "fc.weight" => {
            Tensor::from_slice(&[-0.5f32, -1.0, -0.25, -0.5, -0.5, -1.0, -0.25, -0.5]).view([2, 4])
        }
        _ => t.ones_like(),
    });
    opt.step()?;
    assert_eq!(values(&var(&vs, "fc.weight")), vec![1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0]);
    // Adam's first step moves each parameter by lr against the sign of its gradient.
    for b in values(&var(&vs, "fc.bias")) {
        assert!((b + 0.01).abs() < 1e-6, "{b}");
    }
    assert_eq!(opt.step_counts(), vec![1, 1]);
    Ok(())
}

#[test]
fn overlapping_predicates_are_an_error_naming_the_variable_and_the_rules() {
    let vs = bnn_store();
    // `binary` and `ndim(2)` are not disjoint in general, so the build checks them; fc.weight
    // is both.
    let err = case_optimizer! {
        binary & ndim(4) => Bop,
        ndim(2) => Sgd<lr: 0.1>,
        _ => Adam,
    }
    .build(&vs)
    .expect("`ndim(2)` and `binary & ndim(4)` are disjoint; build must succeed");
    assert_eq!(err.routing_table().rule_of("fc.weight").map(|r| r.index), Some(1));

    let err = case_optimizer! {
        binary => Bop,
        ndim(2) => Sgd<lr: 0.1>,
        _ => Adam,
    }
    .build(&vs)
    .unwrap_err();
    match err {
        Error::OverlappingRules { variable, rules } => {
            assert_eq!(variable, "fc.weight");
            assert_eq!(rules, vec!["binary => Bop", "ndim(2) => Sgd"]);
        }
        other => panic!("expected an overlap error, got {other}"),
    }
}

#[test]
fn without_a_default_unclaimed_variables_are_untrained_and_reported() -> Result<()> {
    let vs = bnn_store();
    let mut opt = case_optimizer! { binary => Bop<threshold: 0.0, gamma: 1.0> }.build(&vs)?;
    let table = opt.routing_table();
    assert_eq!(table.untrained(), vec!["bn1.beta", "conv1.bias", "fc.bias"]);
    assert_eq!(table.warnings().len(), 1);
    let warning = &table.warnings()[0];
    for name in ["`bn1.beta`", "`conv1.bias`", "`fc.bias`"] {
        assert!(warning.contains(name), "{warning}");
    }
    assert!(warning.contains("add `_ => Optimizer<...>`"), "{warning}");
    assert!(table.to_string().contains("(untrained)"));

    set_grads(&vs, |_, t| t.ones_like());
    opt.step()?;
    assert_eq!(values(&var(&vs, "fc.bias")), vec![0.0, 0.0], "untrained variables stay put");
    Ok(())
}

#[test]
fn a_rule_that_claims_nothing_is_an_error() {
    let vs = bnn_store();
    let err = case_optimizer! {
        bits(4) => Sgd<lr: 0.1>,
        _ => Adam,
    }
    .build(&vs)
    .unwrap_err();
    assert!(
        matches!(&err, Error::UnclaimedRule { rule } if rule == "bits(4) => Sgd"),
        "unexpected {err}"
    );
    assert_eq!(
        err.to_string(),
        "rule `bits(4) => Sgd` claims no variable; remove it or fix its predicate"
    );
}

#[test]
fn every_optimizers_state_and_hyperparameters_are_reachable() -> Result<()> {
    let vs = bnn_store();
    let mut opt = case_optimizer! {
        binary => Bop<gamma: 1e-3> as bop,
        name("*.bias") => Sgd<lr: 0.1, momentum: 0.9> as sgd,
        _ => Adam<lr: 1e-2>,
    }
    .build(&vs)?;
    set_grads(&vs, |_, t| t.ones_like());
    opt.step()?;
    // Typed accessors, by index and by name, reach the concrete optimizers.
    assert_eq!(opt.bop().state(0)[0].0, "m");
    assert_eq!(opt.rule0().params().len(), 2);
    let sgd_state = opt.sgd().state(0);
    assert_eq!(sgd_state[0].0, "momentum_buffer");
    assert_eq!(values(&sgd_state[0].1), vec![1.0, 1.0]);
    let adam: &dyn Optimizer = opt.optimizer(2).expect("rule 2");
    let names: Vec<&str> = adam.state(0).iter().map(|(n, _)| *n).collect();
    assert!(names.contains(&"exp_avg") && names.contains(&"exp_avg_sq"), "{names:?}");
    assert!(opt.optimizer(3).is_none());

    // Changing a hyperparameter while training, through both kinds of access.
    opt.bop_mut().set_hyperparameter("gamma", 0.5.into())?;
    assert_eq!(opt.rule0().hyperparameter("gamma")?, 0.5);
    opt.optimizer_mut(2).expect("rule 2").set_hyperparameter("lr", 0.5.into())?;
    assert_eq!(opt.rule2().hyperparameter("lr")?, 0.5);

    opt.rule1_mut().set_step_count(10);
    assert_eq!(opt.step_counts(), vec![1, 10, 1]);
    assert!(format!("{opt:?}").contains("step_counts: [1, 10, 1]"));
    Ok(())
}

case_optimizer! {
    /// The BNN recipe as a nameable type.
    pub struct BnnOptimizer {
        binary => Bop<threshold: 1e-6, gamma: 1e-3> as bop,
        _ => Adam<lr: 1e-2> as adam,
    }
}

/// A training loop's state, holding the router in a field.
struct Trainer {
    opt: BnnOptimizer,
    steps: usize,
}

#[test]
fn the_item_form_declares_a_type_that_lives_in_a_struct_field() -> Result<()> {
    let vs = bnn_store();
    let mut trainer = Trainer { opt: BnnOptimizer::build(&vs)?, steps: 0 };
    set_grads(&vs, |_, t| t.ones_like());
    trainer.opt.step()?;
    trainer.steps += 1;
    assert_eq!(trainer.opt.adam().step_count(), 1);
    assert_eq!(trainer.opt.rules()[0].name, Some("bop"));
    assert_eq!(trainer.opt.rules()[1].to_string(), "_ => Adam");
    // The fingerprint is the rules'; a second router needs a model of its own.
    let again = BnnOptimizer::builder().build(&bnn_store())?;
    assert_eq!(again.fingerprint(), trainer.opt.fingerprint());
    assert_eq!(trainer.steps, 1);
    Ok(())
}

fn list(specs: &[(&str, &[i64], u8)]) -> Vec<Param> {
    specs
        .iter()
        .map(|(name, shape, bits)| {
            let t = Tensor::ones(*shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            Param::new(VarInfo::of(*name, &t).with_bits(*bits), t)
        })
        .collect()
}

#[test]
fn builds_from_an_explicit_list_and_rejects_duplicate_names() -> Result<()> {
    let vars = list(&[("emb", &[10, 4], 32), ("w", &[4, 4], 1), ("b", &[4], 32)]);
    let opt = BnnOptimizer::build_from(vars)?;
    assert_eq!(opt.routing_table().variables_of(0), vec!["w"]);
    assert_eq!(opt.routing_table().variables_of(1), vec!["emb", "b"]);
    assert!(opt.routing_table().route("emb").is_some());

    let err = BnnOptimizer::build_from(list(&[("w", &[2], 1), ("w", &[3], 32)])).unwrap_err();
    assert!(matches!(err, Error::DuplicateVariable { ref variable } if variable == "w"), "{err}");
    Ok(())
}

/// A user optimizer: sign SGD, `w <- w - lr * sign(g)`.
pub struct SignSgd {
    config: SignSgdConfig,
    params: Vec<Param>,
    steps: u64,
}

/// Its configuration.
#[derive(Clone)]
pub struct SignSgdConfig {
    /// Step size.
    pub lr: Schedule,
    /// Unused flag, to show plain fields next to schedules.
    pub verbose: bool,
}

impl Default for SignSgdConfig {
    fn default() -> Self {
        SignSgdConfig { lr: 0.1.into(), verbose: false }
    }
}

impl FromConfig for SignSgd {
    type Config = SignSgdConfig;
    fn from_config(config: SignSgdConfig) -> Result<Self> {
        Ok(SignSgd { config, params: Vec::new(), steps: 0 })
    }
}

impl Optimizer for SignSgd {
    fn name(&self) -> &'static str {
        "SignSgd"
    }
    fn add_param(&mut self, param: Param) -> Result<()> {
        self.params.push(param);
        Ok(())
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let lr = self.config.lr.value(self.steps);
        let _guard = tch::no_grad_guard();
        for (p, g) in self.params.iter().zip(grads) {
            if let Some(g) = g {
                let mut w = p.tensor.shallow_clone();
                let _ = w.f_sub_(&g.f_sign()?.f_mul_scalar(lr)?)?;
            }
        }
        self.steps += 1;
        Ok(())
    }
    fn step_count(&self) -> u64 {
        self.steps
    }
    fn set_step_count(&mut self, steps: u64) {
        self.steps = steps;
    }
    fn hyperparameter_names(&self) -> &'static [&'static str] {
        &["lr"]
    }
    fn schedule(&self, _: &str) -> Result<&Schedule> {
        Ok(&self.config.lr)
    }
    fn set_hyperparameter(&mut self, _: &str, value: Schedule) -> Result<()> {
        self.config.lr = value;
        Ok(())
    }
    fn state_names(&self) -> &'static [&'static str] {
        &[]
    }
    fn state(&self, _: usize) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }
    fn set_state(&mut self, _: usize, _: Vec<(String, Tensor)>) -> Result<()> {
        Ok(())
    }
}

mod predicates {
    pub fn is_embedding(v: &caseopt::VarInfo) -> bool {
        v.name.starts_with("emb")
    }
}

#[test]
fn user_optimizers_user_predicates_and_expression_values() -> Result<()> {
    let vars =
        list(&[("emb", &[10, 4], 32), ("big", &[64, 4], 32), ("w", &[4, 4], 1), ("b", &[4], 32)]);
    let handles: Vec<Tensor> = vars.iter().map(|p| p.tensor.shallow_clone()).collect();
    let base_lr = 0.25;
    let mut opt = case_optimizer! {
        where(predicates::is_embedding) => SignSgd<lr: (base_lr * 2.0), verbose: true> as emb,
        !where(predicates::is_embedding) & where(|v| v.numel() > 100) => SignSgd<lr: (Schedule::step(1.0, 0.5, 1))>,
        binary => Bop,
        _ => Sgd<lr: { base_lr }>,
    }
    .build_from(vars)?;
    assert_eq!(opt.rules()[0].predicate, "where(predicates::is_embedding)");
    assert_eq!(
        opt.rules()[1].predicate,
        "!where(predicates::is_embedding) & where(|v| v.numel() > 100)"
    );
    assert_eq!(opt.rules()[0].optimizer, "SignSgd");
    assert!(opt.emb().config.verbose);
    assert_eq!(opt.routing_table().variables_of(1), vec!["big"]);
    for t in &handles {
        t.sum(Kind::Float).backward();
    }
    opt.step()?;
    opt.step()?;
    // emb: lr 0.5 twice; big: schedule 1.0 then 0.5; b: SGD lr 0.25 twice.
    assert_eq!(values(&handles[0])[0], 0.0);
    assert_eq!(values(&handles[1])[0], -0.5);
    assert_eq!(values(&handles[3])[0], 0.5);
    Ok(())
}

static COUNTED_CALLS: AtomicUsize = AtomicUsize::new(0);

fn counted(_: &VarInfo) -> bool {
    COUNTED_CALLS.fetch_add(1, Ordering::SeqCst);
    true
}

#[test]
fn pairs_proven_disjoint_at_compile_time_are_not_checked_at_build() -> Result<()> {
    let vars = list(&[("a", &[2], 1), ("b", &[2], 1), ("c", &[2], 32)]);
    COUNTED_CALLS.store(0, Ordering::SeqCst);
    let opt = case_optimizer! {
        binary => Bop,
        where(counted) & !binary => Adam,
    }
    .build_from(vars)?;
    // Only `c` reaches rule 1: for `a` and `b` the proof says rule 1 cannot match.
    assert_eq!(COUNTED_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(opt.routing_table().proven_disjoint(), &[(0, 1)]);
    assert!(opt.routing_table().checked_at_build().is_empty());

    let opt = case_optimizer! {
        binary => Bop,
        ndim(1) & !binary => Adam,
        where(counted) & ndim(2) => Sgd,
    }
    .build_from(list(&[("a", &[2], 1), ("c", &[2], 32), ("m", &[2, 2], 32)]))?;
    assert_eq!(opt.routing_table().proven_disjoint(), &[(0, 1), (1, 2)]);
    assert_eq!(opt.routing_table().checked_at_build(), vec![(0, 2)]);
    Ok(())
}

#[test]
fn clips_gradients_by_global_norm_and_per_rule() -> Result<()> {
    let build = || {
        let vars = list(&[("w", &[2], 1), ("b", &[2], 32)]);
        let handles: Vec<Tensor> = vars.iter().map(|p| p.tensor.shallow_clone()).collect();
        let opt = case_optimizer! { binary => Bop, _ => Sgd<lr: 1.0> }.build_from(vars);
        // grad(w) = [3, 4] (norm 5), grad(b) = [0, 12] (norm 12): global norm 13.
        let loss = (&handles[0] * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float)
            + (&handles[1] * Tensor::from_slice(&[0.0f32, 12.0])).sum(Kind::Float);
        loss.backward();
        (opt, handles)
    };
    let (opt, handles) = build();
    let mut opt = opt?;
    let norm = opt.clip_grad_norm(6.5)?;
    assert!((norm - 13.0).abs() < 1e-5, "{norm}");
    let scale = 6.5 / (13.0 + 1e-6);
    let gw = values(&handles[0].grad());
    assert!((gw[0] - 3.0 * scale).abs() < 1e-5 && (gw[1] - 4.0 * scale).abs() < 1e-5, "{gw:?}");

    let (opt, handles) = build();
    let mut opt = opt?;
    let norms = opt.clip_grad_norm_per_rule(6.0)?;
    assert!((norms[0] - 5.0).abs() < 1e-5 && (norms[1] - 12.0).abs() < 1e-5, "{norms:?}");
    assert_eq!(values(&handles[0].grad()), vec![3.0, 4.0], "under the bound: untouched");
    let gb = values(&handles[1].grad());
    assert!((gb[1] - 12.0 * 6.0 / (12.0 + 1e-6)).abs() < 1e-5, "{gb:?}");

    assert!(matches!(opt.clip_grad_norm(-1.0), Err(Error::InvalidMaxNorm { .. })));
    assert!(matches!(opt.clip_grad_norm(f64::NAN), Err(Error::InvalidMaxNorm { .. })));
    Ok(())
}

#[test]
fn backward_step_trains_a_model_through_the_router_trait() -> Result<()> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root() / "fc", 3, 1, Default::default());
    let x = Tensor::randn([64, 3], (Kind::Float, Device::Cpu));
    let y = x.matmul(&Tensor::from_slice(&[1.0f32, -2.0, 0.5]).view([3, 1])) + 0.3;
    let mut opt = case_optimizer! {
        name("*.weight") => Adam<lr: 0.05>,
        name("*.bias") => Sgd<lr: 0.1>,
    }
    .build(&vs)?;
    let router: &mut dyn Router = &mut opt;
    let loss_of = || nn::Module::forward(&linear, &x).mse_loss(&y, tch::Reduction::Mean);
    let first = loss_of().double_value(&[]);
    for _ in 0..200 {
        router.backward_step(&loss_of())?;
    }
    let last = loss_of().double_value(&[]);
    assert!(last < first * 1e-2, "loss {first} -> {last}");
    assert_eq!(router.step_counts(), vec![200, 200]);
    assert_eq!(router.rules()[1].predicate, "name(\"*.bias\")");
    Ok(())
}

#[test]
fn the_routing_table_prints_an_aligned_table() -> Result<()> {
    let vs = bnn_store();
    let opt = case_optimizer! {
        binary => Bop,
        name("bn*") => Sgd<lr: 0.1>,
    }
    .build(&vs)?;
    let expected = "\
variable      shape         dtype  bits  rule            optimizer
bn1.beta      [2]           f32    32    #1 name(\"bn*\")  Sgd
conv1.bias    [2]           f32    32    -               (untrained)
conv1.weight  [2, 1, 3, 3]  f32    1     #0 binary       Bop
fc.bias       [2]           f32    32    -               (untrained)
fc.weight     [2, 4]        f32    1     #0 binary       Bop
warning: no default rule `_`: 2 variables claimed by no rule are left untrained: `conv1.bias`, `fc.bias`; add `_ => Optimizer<...>` as the last rule to train them
";
    assert_eq!(opt.routing_table().to_string(), expected);
    Ok(())
}

#[test]
fn fingerprints_depend_on_the_rules_only() -> Result<()> {
    let vars = || list(&[("w", &[2], 1), ("b", &[2], 32)]);
    let a = case_optimizer! { binary => Bop<gamma: 0.1>, _ => Adam }.build_from(vars())?;
    let b = case_optimizer! { binary => Bop<gamma: 0.2>, _ => Adam }.build_from(vars())?;
    let c = case_optimizer! { binary => Bop, _ => AdamW }.build_from(vars())?;
    assert_eq!(a.fingerprint(), b.fingerprint(), "hyperparameters are not part of it");
    assert_ne!(a.fingerprint(), c.fingerprint());
    assert_eq!(a.fingerprint(), caseopt::fingerprint(a.rules()));
    Ok(())
}

#[test]
fn a_configuration_the_optimizer_rejects_names_the_rule() {
    let lr = -1.0; // not a literal, so only the build can see it
    let err =
        case_optimizer! { _ => Adam<lr: (lr)> }.build_from(list(&[("w", &[2], 32)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rule `_ => Adam`: invalid Adam hyperparameter `lr`: -1 (expected >= 0)"
    );
}

#[test]
fn radam_and_nadam_are_built_ins_a_rule_can_name() -> Result<()> {
    let vs = bnn_store();
    let mut opt = case_optimizer! {
        ndim(4) => RAdam<lr: 0.01, decoupled_weight_decay: true, weight_decay: 0.1>,
        _ => NAdam<lr: 0.01, momentum_decay: 4e-3>,
    }
    .build(&vs)?;
    let table = opt.routing_table();
    assert_eq!(table.rule_of("conv1.weight").map(|r| r.optimizer), Some("RAdam"));
    assert_eq!(table.rule_of("fc.weight").map(|r| r.optimizer), Some("NAdam"));
    let names: Vec<_> = (0..2).filter_map(|i| opt.optimizer(i).map(|o| o.name())).collect();
    assert_eq!(names, vec!["RAdam", "NAdam"]);
    set_grads(&vs, |_, t| t.ones_like());
    opt.step()?;
    // RAdam's first step is momentum SGD on the bias-corrected average (after the decoupled
    // decay, 1 * (1 - 0.01 * 0.1)); NAdam's moves each weight against its gradient.
    for w in values(&var(&vs, "conv1.weight")) {
        assert!((w - (0.999 - 0.01)).abs() < 1e-6, "{w}");
    }
    for b in values(&var(&vs, "fc.bias")) {
        assert!(b < 0.0 && b > -0.02, "{b}");
    }
    assert_eq!(opt.step_counts(), vec![1, 1]);
    Ok(())
}

#[test]
fn ownership_follows_the_variable_through_new_storage() -> Result<()> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[1 << 10], nn::Init::Const(1.0));
    // A view keeps the first storage alive: the variable's new storage has another address.
    let old_storage = w.detach();
    let mut first = case_optimizer! { _ => Sgd<lr: 0.5> }.build(&vs)?;
    // `set_data` under the same variable twice; the first router steps it as before.
    vs.half();
    vs.float();
    assert_ne!(w.data_ptr(), old_storage.data_ptr());
    let second = case_optimizer! { _ => Sgd<lr: 0.5> }.build(&vs);
    match second {
        Err(Error::VariableInAnotherRouter { variable, other }) => {
            assert_eq!((variable.as_str(), other.as_str()), ("w", "w"));
        }
        other => panic!("expected VariableInAnotherRouter, got {:?}", other.map(|_| ())),
    }
    // One step moves it once.
    set_grads(&vs, |_, t| t.ones_like());
    first.step()?;
    assert_eq!(values(&w).first().copied(), Some(0.5));
    Ok(())
}

#[test]
fn a_variable_belongs_to_one_router_at_a_time() -> Result<()> {
    let vs = bnn_store();
    let first = BnnOptimizer::build(&vs)?;
    // A second router over the same variables would step each of them twice per step.
    match BnnOptimizer::build(&vs) {
        Err(Error::VariableInAnotherRouter { variable, other }) => {
            // The first in rule order.
            assert_eq!(variable, "conv1.weight");
            assert_eq!(other, "conv1.weight");
        }
        other => panic!("expected VariableInAnotherRouter, got {other:?}"),
    }
    // The same through the expression form, and a variable added to the store later is
    // claimed by the router that routes it.
    let expression = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs);
    assert!(matches!(expression, Err(Error::VariableInAnotherRouter { .. })));
    drop(first);
    let mut second = BnnOptimizer::build(&vs)?;
    let _ = (vs.root() / "late").var("bias", &[2], nn::Init::Const(0.0));
    set_grads(&vs, |_, t| t.ones_like());
    second.step()?;
    assert!(second.routing_table().route("late.bias").is_some());
    let shared = vs.variables().remove("late.bias").expect("the late variable");
    let third = case_optimizer! { _ => Sgd<lr: 0.1> }
        .build_from(vec![Param::new(VarInfo::of("shared", &shared), shared.shallow_clone())]);
    assert!(
        matches!(third, Err(Error::VariableInAnotherRouter { variable, .. }) if variable == "shared")
    );
    Ok(())
}
