//! Every built-in optimizer, from the registry (`caseopt::builtins()`) rather than a list of
//! names: each builds from its defaults, keeps exactly the state its declaration names, and
//! resumes bit for bit from its exported state on every backend. An optimizer added to the
//! registry is covered here without a line of its own.

use caseopt::{Backend, BuiltinOptimizer, Param, VarInfo};
use tch::{Device, Kind, Tensor};

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
