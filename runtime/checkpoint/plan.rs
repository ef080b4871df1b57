//! Validating a parsed checkpoint against a router (and a model) and building everything a
//! load will change: the plan. Nothing is changed here; a plan is either whole or an error.

use std::collections::{BTreeSet, HashMap};

use caseopt_rules::OptimizerKind;
use tch::{nn, Kind, Tensor};

use super::format::{
    describe_route, parse_fingerprint, parse_hex64, parse_plateau_state, state_key, Meta,
    SavedHyperparameter, SavedModelVar, SavedOptimizer, SavedRoute, SavedVariable, MAX_STEP,
    MODEL_PREFIX,
};
use super::parse::Parsed;
use super::save::named_variables;
use crate::error::{CheckpointError, Error};
use crate::optim::state::{saved_state_layout, StateLayout};
use crate::optim::Optimizer;
use crate::predicate::dtype_name;
use crate::router::Router;
use crate::schedule::{PlateauState, Schedule};
use crate::var::Param;

/// Whether `optimizer` (an [`Optimizer::name`]) is one of this crate's, whose state tensors
/// follow the layout the planner checks before applying anything ([`saved_state_layout`]).
/// Other optimizers' states are checked by their own `set_state`, and undone on error.
fn is_built_in(optimizer: &str) -> bool {
    OptimizerKind::from_display_name(optimizer).is_some()
}

/// What a validated checkpoint will do to one rule's optimizer.
pub(super) struct OptimizerPlan {
    pub(super) rule: usize,
    pub(super) step_count: u64,
    pub(super) constants: Vec<(&'static str, f64)>,
    /// The plateau schedules' states to restore, by hyperparameter.
    pub(super) plateaus: Vec<(&'static str, PlateauState)>,
    /// For every variable of the optimizer, by index: its state (empty = none yet).
    pub(super) states: Vec<Vec<(String, Tensor)>>,
}

/// Everything a load will change, built (on the target devices) before anything is changed.
pub(super) struct Plan {
    pub(super) optimizers: Vec<OptimizerPlan>,
    /// (the model's variable, its value from the file on the variable's device).
    pub(super) model: Vec<(Tensor, Tensor)>,
}

/// Why no plan could be made.
pub(super) enum PlanError {
    /// The checkpoint does not fit the router or the model.
    Problem(CheckpointError),
    /// libtorch failed while building a tensor (out of memory on the device, say).
    Torch(Error),
}

impl From<CheckpointError> for PlanError {
    fn from(p: CheckpointError) -> Self {
        PlanError::Problem(p)
    }
}

impl From<tch::TchError> for PlanError {
    fn from(e: tch::TchError) -> Self {
        PlanError::Torch(e.into())
    }
}

/// Checks the parsed checkpoint against the router (and the model) and builds every tensor to
/// restore; changes nothing.
pub(super) fn plan<R: Router + ?Sized>(
    parsed: &Parsed<'_>,
    router: &R,
    vs: Option<&nn::VarStore>,
) -> Result<Plan, PlanError> {
    use CheckpointError as E;
    let meta = &parsed.meta;
    let current_rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    let saved_fingerprint = parse_fingerprint(&meta.fingerprint)?;
    if saved_fingerprint != router.fingerprint() || meta.rules != current_rules {
        return Err(E::RulesDiffer {
            saved_fingerprint,
            current_fingerprint: router.fingerprint(),
            saved: meta.rules.clone(),
            current: current_rules,
        }
        .into());
    }
    check_routes(meta, router)?;
    if meta.optimizers.len() != current_rules.len() {
        return Err(E::Malformed(format!(
            "{} optimizers for {} rules",
            meta.optimizers.len(),
            current_rules.len()
        ))
        .into());
    }
    // Every tensor the metadata lists must be claimed by exactly one optimizer state or model
    // variable; unclaimed ones are extra data we refuse to ignore.
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut optimizers = Vec::with_capacity(meta.optimizers.len());
    for (rule, saved) in meta.optimizers.iter().enumerate() {
        let opt = router.optimizer(rule).ok_or_else(|| E::OptimizerMismatch {
            rule,
            reason: "this router has no optimizer for it".into(),
        })?;
        optimizers.push(plan_optimizer(parsed, rule, saved, opt, &mut claimed)?);
    }
    let model = match (vs, &meta.model) {
        (None, Some(saved)) => {
            // Not restored, but part of the file: account for it.
            for m in saved {
                let key = format!("{MODEL_PREFIX}{}", m.name);
                let Some((key, _)) = meta.tensors.get_key_value(&key) else {
                    return Err(E::Malformed(format!("tensor `{key}` is missing")).into());
                };
                claimed.insert(key.as_str());
            }
            Vec::new()
        }
        (None, None) => Vec::new(),
        (Some(_), None) => return Err(E::NoModel.into()),
        (Some(vs), Some(saved)) => plan_model(parsed, vs, saved, &mut claimed)?,
    };
    if let Some(extra) = meta.tensors.keys().find(|k| !claimed.contains(k.as_str())) {
        return Err(E::Malformed(format!("tensor `{extra}` belongs to no variable")).into());
    }
    Ok(Plan { optimizers, model })
}

/// The routing table in the file is this router's: every variable, its shape, dtype, precision
/// and rule.
fn check_routes<R: Router + ?Sized>(meta: &Meta, router: &R) -> Result<(), CheckpointError> {
    use CheckpointError as E;
    let current = router.routing_table().routes();
    let saved: HashMap<&str, &SavedRoute> =
        meta.routes.iter().map(|r| (r.variable.as_str(), r)).collect();
    if saved.len() != meta.routes.len() {
        return Err(E::Malformed("a variable is listed twice in the routing table".into()));
    }
    for route in current {
        let Some(s) = saved.get(route.variable.as_str()) else {
            return Err(E::MissingVariable { variable: route.variable.clone() });
        };
        let now = SavedRoute {
            variable: route.variable.clone(),
            shape: route.shape.clone(),
            dtype: dtype_name(route.kind).to_string(),
            bits: route.bits,
            rule: route.rule,
        };
        if **s != now {
            return Err(E::VariableMismatch {
                variable: route.variable.clone(),
                saved: describe_route(s),
                current: describe_route(&now),
            });
        }
    }
    if let Some(extra) =
        meta.routes.iter().find(|s| !current.iter().any(|r| r.variable == s.variable))
    {
        return Err(E::UnexpectedVariable { variable: extra.variable.clone() });
    }
    Ok(())
}

/// One rule's optimizer: the same type, the same hyperparameters (constants to restore,
/// schedules that agree), the same variables, and their state tensors built on each variable's
/// device.
fn plan_optimizer<'a>(
    parsed: &'a Parsed<'_>,
    rule: usize,
    saved: &'a SavedOptimizer,
    opt: &dyn Optimizer,
    claimed: &mut BTreeSet<&'a str>,
) -> Result<OptimizerPlan, PlanError> {
    check_identity(rule, saved, opt)?;
    if saved.step_count > MAX_STEP {
        return Err(CheckpointError::Malformed(format!(
            "rule {rule}: step count {} is beyond 2^53, more steps than any run takes",
            saved.step_count
        ))
        .into());
    }
    let (constants, plateaus) = plan_hyperparameters(rule, saved, opt)?;
    let params = opt.params();
    check_variable_count(rule, saved, params)?;
    let index_of: HashMap<&str, usize> =
        params.iter().enumerate().map(|(i, p)| (p.info.name.as_str(), i)).collect();
    let mut states: Vec<Option<Vec<(String, Tensor)>>> = (0..params.len()).map(|_| None).collect();
    for var in &saved.variables {
        let Some(&index) = index_of.get(var.name.as_str()) else {
            return Err(CheckpointError::UnexpectedVariable { variable: var.name.clone() }.into());
        };
        if states[index].is_some() {
            return Err(CheckpointError::Malformed(format!(
                "variable `{}` is listed twice in rule {rule}",
                var.name
            ))
            .into());
        }
        states[index] = Some(plan_states(parsed, rule, var, index, &params[index], opt, claimed)?);
    }
    Ok(OptimizerPlan {
        rule,
        step_count: saved.step_count,
        constants,
        plateaus,
        states: states.into_iter().map(Option::unwrap_or_default).collect(),
    })
}

/// The file lists the optimizer as this rule's, and of this optimizer's type.
fn check_identity(
    rule: usize,
    saved: &SavedOptimizer,
    opt: &dyn Optimizer,
) -> Result<(), CheckpointError> {
    let mismatch = |reason: String| CheckpointError::OptimizerMismatch { rule, reason };
    if saved.rule != rule {
        return Err(mismatch(format!("listed as rule {}", saved.rule)));
    }
    if saved.optimizer != opt.name() {
        return Err(mismatch(format!(
            "checkpoint has a {} optimizer, this router a {}",
            saved.optimizer,
            opt.name()
        )));
    }
    Ok(())
}

/// What a load restores of one hyperparameter.
enum Restore {
    /// Nothing: the same schedule on both sides.
    Nothing,
    /// A constant.
    Constant(f64),
    /// A plateau's state (the same plateau settings on both sides).
    Plateau(PlateauState),
}

/// The constants and the plateau states to restore, by hyperparameter.
type Restores = (Vec<(&'static str, f64)>, Vec<(&'static str, PlateauState)>);

/// The same hyperparameter names; the constants and plateau states to restore; schedules must
/// agree (see [`plan_hyperparameter`]).
fn plan_hyperparameters(
    rule: usize,
    saved: &SavedOptimizer,
    opt: &dyn Optimizer,
) -> Result<Restores, CheckpointError> {
    let names = opt.hyperparameter_names();
    if let Some(extra) = saved.hyperparameters.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(hyperparameter_error(
            rule,
            opt,
            extra,
            format!("{} has no such hyperparameter", opt.name()),
        ));
    }
    let (mut constants, mut plateaus) = (Vec::new(), Vec::new());
    for &name in names {
        let Some(hp) = saved.hyperparameters.get(name) else {
            return Err(hyperparameter_error(
                rule,
                opt,
                name,
                "missing from the checkpoint".into(),
            ));
        };
        match plan_hyperparameter(opt, name, hp)
            .map_err(|reason| hyperparameter_error(rule, opt, name, reason))?
        {
            Restore::Nothing => {}
            Restore::Constant(value) => constants.push((name, value)),
            Restore::Plateau(state) => plateaus.push((name, state)),
        }
    }
    Ok((constants, plateaus))
}

/// One hyperparameter, by the rule documented on [`load_training`](super::load_training): a
/// constant in the file and in the router is restored as saved; a schedule on either side must
/// be the same schedule on the other (nothing to restore), and a plateau the same plateau, whose
/// state is restored. `Err` says why it cannot be restored.
fn plan_hyperparameter(
    opt: &dyn Optimizer,
    name: &str,
    saved: &SavedHyperparameter,
) -> Result<Restore, String> {
    let current = opt.schedule(name).map_err(|e| e.to_string())?;
    match saved {
        SavedHyperparameter::Constant { value, bits } => {
            let v = parse_hex64(bits)
                .map(f64::from_bits)
                .ok_or_else(|| format!("bits `{bits}` are not 16 hex digits"))?;
            if format!("{v:?}") != *value {
                return Err(format!("value `{value}` disagrees with its bits ({v:?})"));
            }
            if current.as_constant().is_none() {
                return Err(format!(
                    "the checkpoint holds the constant {value}, this router has schedule \
                     `{current:?}`; a load never replaces a schedule, set the constant before \
                     loading"
                ));
            }
            Ok(Restore::Constant(v))
        }
        SavedHyperparameter::Schedule { description } => {
            let now = format!("{current:?}");
            if now != *description {
                return Err(format!(
                    "the checkpoint was written with schedule `{description}`, this router has \
                     `{now}`; schedules are not stored, set the same one before loading"
                ));
            }
            if matches!(current, Schedule::Plateau(_)) {
                return Err("the checkpoint holds no state for this router's plateau".into());
            }
            Ok(Restore::Nothing)
        }
        SavedHyperparameter::Plateau { description, state } => {
            let now = format!("{current:?}");
            if !matches!(current, Schedule::Plateau(_)) || now != *description {
                return Err(format!(
                    "the checkpoint was written with `{description}`, this router has `{now}`; \
                     a plateau's state is restored into the same plateau, set it before loading"
                ));
            }
            parse_plateau_state(state).map(Restore::Plateau)
        }
    }
}

fn hyperparameter_error(
    rule: usize,
    opt: &dyn Optimizer,
    name: &str,
    reason: String,
) -> CheckpointError {
    CheckpointError::Hyperparameter {
        rule,
        optimizer: opt.name().to_string(),
        name: name.to_string(),
        reason,
    }
}

/// As many variables in the file as the optimizer has (which one is missing, when one is).
fn check_variable_count(
    rule: usize,
    saved: &SavedOptimizer,
    params: &[Param],
) -> Result<(), CheckpointError> {
    if saved.variables.len() == params.len() {
        return Ok(());
    }
    let saved_names: BTreeSet<&str> = saved.variables.iter().map(|v| v.name.as_str()).collect();
    if let Some(p) = params.iter().find(|p| !saved_names.contains(p.info.name.as_str())) {
        return Err(CheckpointError::MissingVariable { variable: p.info.name.clone() });
    }
    Err(CheckpointError::OptimizerMismatch {
        rule,
        reason: format!(
            "{} variables in the checkpoint, {} here",
            saved.variables.len(),
            params.len()
        ),
    })
}

/// One variable's state tensors: names the optimizer keeps, each listed once, present in the
/// file, and (for the built-in optimizers) of the shape and dtype the optimizer will accept;
/// built on the variable's device.
#[allow(clippy::too_many_arguments)]
fn plan_states<'a>(
    parsed: &'a Parsed<'_>,
    rule: usize,
    var: &SavedVariable,
    index: usize,
    param: &Param,
    opt: &dyn Optimizer,
    claimed: &mut BTreeSet<&'a str>,
) -> Result<Vec<(String, Tensor)>, PlanError> {
    let bad_state = |state: &str, reason: String| {
        PlanError::Problem(CheckpointError::BadState {
            rule,
            variable: var.name.clone(),
            state: state.to_string(),
            reason,
        })
    };
    let built_in = is_built_in(opt.name());
    let mut restored = Vec::with_capacity(var.states.len());
    for state in &var.states {
        if !opt.state_names().contains(&state.as_str()) {
            return Err(bad_state(state, format!("{} keeps no state of that name", opt.name())));
        }
        if restored.iter().any(|(n, _): &(String, Tensor)| n == state) {
            return Err(bad_state(state, "listed twice".into()));
        }
        let key = state_key(rule, &var.name, state);
        let Some((key, saved_tensor)) = parsed.meta.tensors.get_key_value(&key) else {
            return Err(bad_state(state, format!("tensor `{key}` is missing")));
        };
        if built_in {
            // A half-precision variable under `master_weights` keeps f32 state.
            let kind = opt.state_kind(index).unwrap_or(param.tensor.kind());
            let shape = param.tensor.size();
            let layout = saved_state_layout(opt.name(), state).unwrap_or(StateLayout::LikeVariable);
            let want_kind = if let StateLayout::Scalar(k) = layout { k } else { kind };
            let want_shape = layout.shape(&shape);
            if saved_tensor.dtype != dtype_name(want_kind) || saved_tensor.shape != want_shape {
                return Err(bad_state(
                    state,
                    format!(
                        "{} {:?} in the checkpoint, expected {} {:?}",
                        saved_tensor.dtype,
                        saved_tensor.shape,
                        dtype_name(want_kind),
                        want_shape
                    ),
                ));
            }
        }
        let cpu = tensor_from_file(parsed, key)?;
        if built_in && state == "step" {
            let step = cpu.f_int64_value(&[])?;
            if step < 0 {
                return Err(bad_state(state, "negative step count".into()));
            }
            if step.unsigned_abs() > MAX_STEP {
                return Err(bad_state(state, format!("step count {step} is beyond 2^53")));
            }
        }
        claimed.insert(key.as_str());
        // Built here, on the variable's device, so that an out-of-memory error happens before
        // anything is changed.
        restored.push((state.clone(), cpu.f_to_device(param.tensor.device())?));
    }
    Ok(restored)
}

/// A tensor of the (already checksummed) file, as a new CPU tensor.
fn tensor_from_file(parsed: &Parsed<'_>, key: &str) -> Result<Tensor, PlanError> {
    let malformed = |why: &str| {
        PlanError::Problem(CheckpointError::Malformed(format!("tensor `{key}`: {why}")))
    };
    let view = parsed.file.tensor(key).map_err(|_| malformed("not in the file"))?;
    let kind = Kind::try_from(view.dtype()).map_err(|_| malformed("unsupported dtype"))?;
    let shape = view
        .shape()
        .iter()
        .map(|&d| i64::try_from(d).ok())
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| malformed("dimension too large"))?;
    // tch copies `numel * element size` bytes without checking the slice: check it here.
    let numel = view.shape().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes())) != Some(view.data().len()) {
        return Err(malformed("byte length disagrees with its shape"));
    }
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

/// The model's variables: exactly those of the file, by name, shape and dtype; their values built
/// on each variable's device.
fn plan_model<'a>(
    parsed: &'a Parsed<'_>,
    vs: &nn::VarStore,
    saved: &'a [SavedModelVar],
    claimed: &mut BTreeSet<&'a str>,
) -> Result<Vec<(Tensor, Tensor)>, PlanError> {
    use CheckpointError as E;
    let current = named_variables(vs);
    let model_error = |variable: &str, reason: String| {
        PlanError::Problem(E::ModelVariable { variable: variable.to_string(), reason })
    };
    let saved_names: BTreeSet<&str> = saved.iter().map(|m| m.name.as_str()).collect();
    if saved_names.len() != saved.len() {
        return Err(E::Malformed("a model variable is listed twice".into()).into());
    }
    let mut missing: Vec<&String> =
        current.keys().filter(|n| !saved_names.contains(n.as_str())).collect();
    missing.sort();
    if let Some(name) = missing.first() {
        return Err(model_error(name, "in the model but missing from the checkpoint".into()));
    }
    let mut out = Vec::with_capacity(saved.len());
    for m in saved {
        let Some(var) = current.get(&m.name) else {
            return Err(model_error(&m.name, "in the checkpoint but not in the model".into()));
        };
        let key = format!("{MODEL_PREFIX}{}", m.name);
        let Some((key, t)) = parsed.meta.tensors.get_key_value(&key) else {
            return Err(model_error(&m.name, format!("tensor `{key}` is missing")));
        };
        let (kind, shape) = (var.kind(), var.size());
        if t.dtype != dtype_name(kind)
            || t.shape != shape
            || m.dtype != t.dtype
            || m.shape != t.shape
        {
            return Err(model_error(
                &m.name,
                format!(
                    "{} {:?} in the checkpoint, {} {:?} in the model",
                    t.dtype,
                    t.shape,
                    dtype_name(kind),
                    shape
                ),
            ));
        }
        let value = tensor_from_file(parsed, key)?.f_to_device(var.device())?;
        claimed.insert(key.as_str());
        out.push((var.shallow_clone(), value));
    }
    Ok(out)
}
