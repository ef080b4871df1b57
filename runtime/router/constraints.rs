//! Constraints set on a router, per variable and per rule: each variable's (its own, else its
//! rule's) is handed to its optimizer, which applies it inside its step; the router applies
//! those an optimizer declines itself, after the step.
//!
//! Constraints are configuration: a checkpoint does not hold them, and loading one changes
//! none.

use std::collections::BTreeMap;

use super::parts::RouterParts;
use crate::constraint::Constraint;
use crate::error::{Error, Result};
use crate::kernels::metadata::Grads;

/// What a router keeps of its constraints.
#[derive(Debug, Default)]
pub(crate) struct Constraints {
    /// Set per variable, by name; wins over its rule's.
    by_variable: BTreeMap<String, Constraint>,
    /// Set per rule, by index.
    by_rule: Vec<Option<Constraint>>,
    /// (rule, variable index, constraint) that the optimizer declined: applied by the router
    /// after each step that updated the variable.
    after_step: Vec<(usize, usize, Constraint)>,
}

impl Constraints {
    /// Rule `rule`'s constraint.
    pub(crate) fn rule(&self, rule: usize) -> Option<Constraint> {
        self.by_rule.get(rule).copied().flatten()
    }

    /// The constraint variable `name` of rule `rule` gets: its own, else its rule's.
    fn effective(&self, name: &str, rule: usize) -> Option<Constraint> {
        self.by_variable.get(name).copied().or_else(|| self.rule(rule))
    }
}

/// Rule and index (in its optimizer) of the variable named `name`.
fn locate<R: RouterParts>(router: &R, name: &str) -> Result<(usize, usize)> {
    let unknown =
        |hint: &str| Error::UnknownVariable { variable: name.to_string(), hint: hint.to_string() };
    let route = router.core().table.route(name).ok_or_else(|| unknown(""))?;
    let rule = route.rule.ok_or_else(|| unknown(" (no rule claims it: it is left untrained)"))?;
    let index = router
        .dyn_optimizer(rule)
        .and_then(|o| o.params().iter().position(|p| p.info.name == name))
        .ok_or_else(|| unknown(""))?;
    Ok((rule, index))
}

/// Hands variable `index` of rule `rule` its constraint, and records whether the router must
/// apply it itself.
fn hand<R: RouterParts>(
    router: &mut R,
    rule: usize,
    index: usize,
    constraint: Option<Constraint>,
) -> Result<()> {
    let Some(optimizer) = router.dyn_optimizer_mut(rule) else {
        return Ok(());
    };
    let accepted = optimizer.set_constraint(index, constraint)?;
    let after = &mut router.core_mut().constraints.after_step;
    after.retain(|&(r, i, _)| (r, i) != (rule, index));
    if let (false, Some(c)) = (accepted, constraint) {
        after.push((rule, index, c));
    }
    Ok(())
}

/// See [`Router::set_constraint`](crate::Router::set_constraint).
pub(super) fn set_variable<R: RouterParts>(
    router: &mut R,
    name: &str,
    constraint: Option<Constraint>,
) -> Result<()> {
    if let Some(c) = &constraint {
        c.validate()?;
    }
    let (rule, index) = locate(router, name)?;
    let effective = constraint.or_else(|| router.core().constraints.rule(rule));
    hand(router, rule, index, effective)?;
    let by_variable = &mut router.core_mut().constraints.by_variable;
    match constraint {
        Some(c) => by_variable.insert(name.to_string(), c),
        None => by_variable.remove(name),
    };
    Ok(())
}

/// See [`Router::set_rule_constraint`](crate::Router::set_rule_constraint).
pub(super) fn set_rule<R: RouterParts>(
    router: &mut R,
    rule: usize,
    constraint: Option<Constraint>,
) -> Result<()> {
    if let Some(c) = &constraint {
        c.validate()?;
    }
    let rules = router.core().rules().len();
    if rule >= rules {
        return Err(Error::NoSuchRule { rule, rules });
    }
    let by_rule = &mut router.core_mut().constraints.by_rule;
    by_rule.resize(rules, None);
    by_rule[rule] = constraint;
    hand_rule(router, rule)
}

/// Hands every variable of rule `rule` its constraint (again).
fn hand_rule<R: RouterParts>(router: &mut R, rule: usize) -> Result<()> {
    let names: Vec<String> = router
        .dyn_optimizer(rule)
        .map(|o| o.params().iter().map(|p| p.info.name.clone()).collect())
        .unwrap_or_default();
    for (index, name) in names.iter().enumerate() {
        let effective = router.core().constraints.effective(name, rule);
        hand(router, rule, index, effective)?;
    }
    Ok(())
}

/// Gives the variables routed after the build their rule's constraint.
pub(super) fn after_routing<R: RouterParts>(router: &mut R) -> Result<()> {
    for rule in 0..router.core().rules().len() {
        if router.core().constraints.rule(rule).is_some() {
            hand_rule(router, rule)?;
        }
    }
    Ok(())
}

/// The variable's constraint (its own, else its rule's); `None` for a name the router does not
/// train.
pub(super) fn of_variable<R: RouterParts>(router: &R, name: &str) -> Option<Constraint> {
    let (rule, _) = locate(router, name).ok()?;
    router.core().constraints.effective(name, rule)
}

/// Applies the constraints that optimizers declined to the variables this step updated
/// (`grads`: the step's gradients, per rule).
pub(super) fn apply_declined<R: RouterParts>(router: &R, grads: &[Grads]) -> Result<()> {
    let after = &router.core().constraints.after_step;
    if after.is_empty() {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    for &(rule, index, c) in after {
        let updated =
            grads.get(rule).and_then(|g| g.handles.get(index)).is_some_and(Option::is_some);
        let param = router.dyn_optimizer(rule).and_then(|o| o.params().get(index));
        if let (true, Some(p)) = (updated, param) {
            c.apply(&mut p.tensor.shallow_clone())?;
        }
    }
    Ok(())
}
