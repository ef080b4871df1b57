//! Applying a validated plan to a router and its model, with a journal to roll the optimizers
//! back should one refuse what it is given.

use tch::Tensor;

use super::plan::Plan;
use crate::error::{CheckpointError, Error};
use crate::router::Router;
use crate::schedule::{Plateau, PlateauState, Schedule};

/// How to put one optimizer back as it was.
struct Undo {
    rule: usize,
    step_count: u64,
    schedules: Vec<(&'static str, Schedule)>,
    plateaus: Vec<(Plateau, PlateauState)>,
    states: Vec<Vec<(String, Tensor)>>,
}

/// Applies a validated plan. Optimizers validate what they are given once more; should one
/// refuse (it cannot for the built-in ones after the checks above), every optimizer already
/// changed is restored from handles to its previous state.
pub(super) fn apply<R: Router + ?Sized>(
    router: &mut R,
    plan: Plan,
) -> std::result::Result<(), CheckpointError> {
    let mut journal: Vec<Undo> = Vec::with_capacity(plan.optimizers.len());
    for op in plan.optimizers {
        let rule = op.rule;
        let Some(opt) = router.optimizer_mut(rule) else {
            rollback(router, journal);
            let reason = "no optimizer".to_string();
            return Err(CheckpointError::Rejected { rule, reason, problem: None });
        };
        let mut undo = Undo {
            rule,
            step_count: opt.step_count(),
            schedules: Vec::with_capacity(op.constants.len()),
            plateaus: Vec::with_capacity(op.plateaus.len()),
            states: (0..opt.params().len())
                .map(|i| opt.state(i).into_iter().map(|(n, t)| (n.to_string(), t)).collect())
                .collect(),
        };
        let mut result = Ok(());
        for (name, value) in op.constants {
            match opt.schedule(name) {
                Ok(s) => undo.schedules.push((name, s.clone())),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Err(e) = opt.set_hyperparameter(name, Schedule::Constant(value)) {
                undo.schedules.pop();
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            // A plateau is a handle: its state is set in place, shared with the user's handle.
            for (name, state) in op.plateaus {
                if let Ok(Schedule::Plateau(p)) = opt.schedule(name) {
                    undo.plateaus.push((p.clone(), p.state()));
                    p.set_state(state);
                }
            }
        }
        if result.is_ok() {
            for (index, state) in op.states.into_iter().enumerate() {
                if let Err(e) = opt.set_state(index, state) {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            opt.set_step_count(op.step_count);
        }
        journal.push(undo);
        if let Err(e) = result {
            rollback(router, journal);
            return Err(rejected(rule, e));
        }
    }
    let _guard = tch::no_grad_guard();
    for (mut var, value) in plan.model {
        // Same shape, dtype and device, checked above: the copy cannot fail short of a libtorch
        // fault. Should it fail anyway, the optimizers are rolled back and the error says so.
        if let Err(e) = var.f_copy_(&value) {
            rollback(router, journal);
            return Err(CheckpointError::Rejected {
                rule: 0,
                reason: format!(
                    "copying a model variable failed ({e}); model variables may be partly restored"
                ),
                problem: None,
            });
        }
    }
    Ok(())
}

/// An optimizer's refusal, kept structured when it is a checkpoint problem.
fn rejected(rule: usize, error: Error) -> CheckpointError {
    let reason = error.to_string();
    let problem = match error {
        Error::Checkpoint(problem) => Some(Box::new(problem)),
        _ => None,
    };
    CheckpointError::Rejected { rule, reason, problem }
}

/// Puts every optimizer of the journal back as it was, newest first.
fn rollback<R: Router + ?Sized>(router: &mut R, journal: Vec<Undo>) {
    for undo in journal.into_iter().rev() {
        if let Some(opt) = router.optimizer_mut(undo.rule) {
            for (name, schedule) in undo.schedules.into_iter().rev() {
                let _ = opt.set_hyperparameter(name, schedule);
            }
            for (plateau, state) in undo.plateaus.into_iter().rev() {
                plateau.set_state(state);
            }
            for (index, state) in undo.states.into_iter().enumerate() {
                let _ = opt.set_state(index, state);
            }
            opt.set_step_count(undo.step_count);
        }
    }
}
