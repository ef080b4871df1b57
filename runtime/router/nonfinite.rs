//! Gradients holding NaN or infinity: what a step does with them ([`NonFinitePolicy`]) and
//! the search for the first one, across every rule, before any optimizer moves.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::kernels::finite::ScanScratch;
use crate::kernels::metadata::Grads;
use crate::kernels::multi::{self, List};

/// What a router's [`step`](crate::Router::step) does with a gradient that holds NaN or infinity.
///
/// The search covers every rule's gradients before any optimizer updates anything: a
/// multi-threaded scan of contiguous f32/f64 CPU gradients, and ATen's multi-tensor check
/// (torch's AMP check with a scale of 1) of the others, read back once per device
/// ([`Router::host_reads`](crate::Router::host_reads)); the gradients are checked one by one
/// only after a find, to name the variable.
///
/// ```
/// use caseopt::{case_optimizer, Error, NonFinitePolicy, Router};
/// use tch::Tensor;
///
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let w = vs.root().zeros("w", &[2]);
/// let mut opt = case_optimizer! { _ => Sgd<lr: 0.1> }.build(&vs)?;
/// opt.backward_step(&(&w * Tensor::from_slice(&[f32::NAN, 1.0])).sum(tch::Kind::Float))
///     .unwrap_err(); // Error::NonFiniteGradient { variable: "w" }, nothing changed
/// assert_eq!(opt.step_counts(), vec![0]);
///
/// opt.set_non_finite_policy(NonFinitePolicy::SkipStep);
/// opt.step()?;
/// assert_eq!((opt.step_counts(), opt.skipped_steps()), (vec![0], 1));
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// Refuse the whole step with [`Error::NonFiniteGradient`](crate::Error::NonFiniteGradient)
    /// naming the first such variable (in rule order); no parameter, state or step counter
    /// changes. The default: a NaN is almost always a bug or a diverging run, better stopped
    /// where it appears.
    #[default]
    Error,
    /// Skip the whole step as [`Error`](Self::Error) does, but return `Ok` and count it
    /// ([`Router::skipped_steps`](crate::Router::skipped_steps)), as mixed-precision loss
    /// scaling does with overflowing steps.
    SkipStep,
    /// No check: the optimizers use the gradients as they are (torch.optim's behaviour), so
    /// the values spread into parameters and state.
    Proceed,
}

/// The first variable, in rule order, whose gradient holds NaN or infinity.
///
/// Contiguous f32/f64 CPU gradients of optimizers not on the multi-tensor backend are read in
/// one multi-threaded pass by the kernels module (four bytes per f32 element, no dispatch per
/// tensor). The others (CUDA, half precision, strided, and every gradient of an optimizer on
/// [`Backend::MultiTensor`](crate::Backend::MultiTensor), whose rules `multi` flags) are
/// checked by ATen's multi-tensor reduction, `_amp_foreach_non_finite_check_and_unscale_` with
/// a scale of 1 (values unchanged): one pass per (device, dtype) group, its flags summed on the
/// device and read back once per device, so once a step on one device whatever the number of
/// gradients (`reads` counts them). Only after a find are that device's gradients checked one
/// by one, in rule order, to name the first; the earlier of the two searches' finds, in rule
/// order, is reported.
///
/// `staged` is the earliest find of the optimizers' staged steps, whose gradients the scan
/// skips. The find is a (rule, variable) position.
pub(super) fn first_non_finite(
    grads: &mut [Grads],
    multi: &[bool],
    scratch: &mut ScanScratch,
    staged: Option<(usize, usize)>,
    reads: &mut u64,
) -> Result<Option<(usize, usize)>> {
    // The multi-tensor optimizers' gradients are not the CPU scan's.
    for (gs, _) in grads.iter_mut().zip(multi).filter(|(_, m)| **m) {
        for i in 0..gs.handles.len() {
            gs.mark_checked(i);
        }
    }
    let grads: &[Grads] = grads;
    // The scan's positions count the gradients present, in rule order: (rule, variable) of the
    // k-th, looked up only for what the scan reports.
    let nth_present = |k: usize| {
        grads.iter().enumerate().flat_map(|(r, gs)| gs.present().map(move |(i, _)| (r, i))).nth(k)
    };
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    let scan = crate::kernels::finite::scan_grads(grads, threads, scratch);
    let scanned_first = scan.first_non_finite.and_then(nth_present);
    if scan.unscanned.is_empty() && !multi.contains(&true) {
        // Every gradient was scanned (or staged): nothing for ATen's reduction, and no
        // per-gradient lists to build (on 2000 gradients, 50 KB of them per step).
        return Ok([scanned_first, staged].into_iter().flatten().min());
    }
    let mut rest: Vec<Vec<Option<Tensor>>> =
        grads.iter().map(|gs| gs.handles.iter().map(|_| None).collect()).collect();
    let present: Vec<(usize, usize)> = grads
        .iter()
        .enumerate()
        .flat_map(|(r, gs)| gs.present().map(move |(i, _)| (r, i)))
        .collect();
    for &k in &scan.unscanned {
        if let Some(&(r, i)) = present.get(k) {
            rest[r][i] = grads[r].handles[i].as_ref().map(Tensor::shallow_clone);
        }
    }
    for (r, gs) in grads.iter().enumerate().filter(|(r, _)| multi.get(*r) == Some(&true)) {
        for (i, g) in gs.handles.iter().enumerate() {
            rest[r][i] = g.as_ref().map(Tensor::shallow_clone);
        }
    }
    let torch_first = first_non_finite_multi(&rest, reads)?;
    Ok([scanned_first, torch_first, staged].into_iter().flatten().min())
}

/// [`first_non_finite`]'s search with ATen's multi-tensor reduction, as (rule, variable)
/// positions; `reads` counts the values read back.
fn first_non_finite_multi(
    grads: &[Vec<Option<Tensor>>],
    reads: &mut u64,
) -> Result<Option<(usize, usize)>> {
    // Per device, its (dtype, members) groups, in order of first appearance.
    type Members = Vec<(usize, usize)>;
    let mut devices: Vec<(Device, Vec<(Kind, Members)>)> = Vec::new();
    for (rule, rule_grads) in grads.iter().enumerate() {
        for (index, g) in rule_grads.iter().enumerate() {
            let Some(g) = g else { continue };
            if g.numel() == 0 {
                continue;
            }
            let (device, kind) = (g.device(), g.kind());
            let d = match devices.iter().position(|(d, _)| *d == device) {
                Some(d) => d,
                None => {
                    devices.push((device, Vec::new()));
                    devices.len() - 1
                }
            };
            let kinds = &mut devices[d].1;
            match kinds.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, members)) => members.push((rule, index)),
                None => kinds.push((kind, vec![(rule, index)])),
            }
        }
    }
    let mut suspects: Vec<(usize, usize)> = Vec::new();
    for (_, kinds) in &devices {
        let mut flags = Vec::with_capacity(kinds.len());
        for (_, members) in kinds {
            let list = List::of(members.iter().filter_map(|&(r, i)| grads[r][i].as_ref()));
            flags.push(multi::nonfinite(&list)?);
        }
        let any = match flags.len() {
            1 => flags.swap_remove(0),
            _ => Tensor::f_stack(&flags, 0)?.f_sum(Kind::Float)?,
        };
        *reads += 1;
        if any.f_double_value(&[])? != 0.0 {
            suspects.extend(kinds.iter().flat_map(|(_, m)| m.iter().copied()));
        }
    }
    suspects.sort_unstable();
    for (rule, index) in suspects {
        let Some(g) = &grads[rule][index] else { continue };
        *reads += 1;
        if g.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Ok(Some((rule, index)));
        }
    }
    Ok(None)
}
