//! Gradients holding NaN or infinity: what a step does with them ([`NonFinitePolicy`]) and
//! the search for the first one, across every rule, before any optimizer moves.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::kernels::finite::ScanScratch;
use crate::kernels::metadata::Grads;

/// What a router's [`step`](crate::Router::step) does with a gradient that holds NaN or infinity.
///
/// The search covers every rule's gradients before any optimizer updates anything, and costs
/// one reduction per gradient (a sum, exact check only for a tensor whose sum is not finite)
/// and one synchronisation per step.
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

/// Gradients with at least this many elements are summed on their own; smaller ones are
/// concatenated and summed together, so that many small tensors cost a few ops rather than one
/// each.
const SUM_ALONE: i64 = 1 << 16;
/// Elements per concatenation of small gradients: bounds the temporary at 4 MiB of f32.
const SMALL_BATCH: i64 = 1 << 20;

/// Where a partial sum came from: (rule, variable index) of each gradient in it.
type Origin = Vec<(usize, usize)>;

/// Partial sums of the gradients of one device and accumulation dtype.
struct SumGroup {
    device: Device,
    kind: Kind,
    sums: Vec<Tensor>,
    origins: Vec<Origin>,
    small: Vec<Tensor>,
    small_origin: Origin,
    small_numel: i64,
}

impl SumGroup {
    fn flush_small(&mut self) -> Result<()> {
        if self.small.is_empty() {
            return Ok(());
        }
        let joined = Tensor::f_cat(&self.small, 0)?;
        self.sums.push(joined.f_sum(self.kind)?);
        self.origins.push(std::mem::take(&mut self.small_origin));
        self.small.clear();
        self.small_numel = 0;
        Ok(())
    }
}

/// The first variable, in rule order, whose gradient holds NaN or infinity.
///
/// Sums, not element-wise tests: a sum reads its input once and allocates nothing the size of
/// the tensor (accumulated in f32, f64 for f64 gradients). Large gradients are summed one by
/// one, small ones in concatenated batches; the partial sums are stacked and read back with one
/// synchronisation per device. NaN and infinities always make a sum non-finite; a finite
/// gradient's sum can only overflow to infinity, so the gradients behind a non-finite sum are
/// checked element by element before one is reported (only then are temporaries made).
///
/// Contiguous f32/f64 CPU gradients are read in one multi-threaded pass by the kernels module
/// (four bytes per f32 element, no dispatch per tensor); the others (CUDA, half precision,
/// strided) go through the libtorch search below, and the earlier of the two finds, in rule
/// order, is reported.
///
/// `staged` is the earliest find of the optimizers' staged steps, whose gradients the scan
/// skips. The find is a (rule, variable) position.
pub(super) fn first_non_finite(
    grads: &[Grads],
    scratch: &mut ScanScratch,
    staged: Option<(usize, usize)>,
) -> Result<Option<(usize, usize)>> {
    // The scan's positions count the gradients present, in rule order: (rule, variable) of the
    // k-th, looked up only for what the scan reports.
    let nth_present = |k: usize| {
        grads.iter().enumerate().flat_map(|(r, gs)| gs.present().map(move |(i, _)| (r, i))).nth(k)
    };
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    let scan = crate::kernels::finite::scan_grads(grads, threads, scratch);
    let scanned_first = scan.first_non_finite.and_then(nth_present);
    let torch_first = if scan.unscanned.is_empty() {
        None
    } else {
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
        first_non_finite_with_libtorch(&rest)?
    };
    Ok([scanned_first, torch_first, staged].into_iter().flatten().min())
}

/// [`first_non_finite`]'s search with libtorch ops, as (rule, variable) positions.
fn first_non_finite_with_libtorch(grads: &[Vec<Option<Tensor>>]) -> Result<Option<(usize, usize)>> {
    let mut groups: Vec<SumGroup> = Vec::new();
    for (rule, rule_grads) in grads.iter().enumerate() {
        for (index, g) in rule_grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let numel = g.numel() as i64;
            if numel == 0 {
                continue;
            }
            let (device, kind) =
                (g.device(), if g.kind() == Kind::Double { Kind::Double } else { Kind::Float });
            let group = match groups.iter().position(|s| s.device == device && s.kind == kind) {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(SumGroup {
                        device,
                        kind,
                        sums: Vec::new(),
                        origins: Vec::new(),
                        small: Vec::new(),
                        small_origin: Vec::new(),
                        small_numel: 0,
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            if numel >= SUM_ALONE {
                group.sums.push(g.f_sum(kind)?);
                group.origins.push(vec![(rule, index)]);
            } else {
                // One dimension and the group's dtype (half precision widened, small tensors
                // only), skipping the ops, each a dispatch, where there is nothing to do.
                let mut flat = if g.dim() == 1 { g.shallow_clone() } else { g.f_reshape([-1])? };
                if flat.kind() != kind {
                    flat = flat.f_to_kind(kind)?;
                }
                group.small.push(flat);
                group.small_origin.push((rule, index));
                group.small_numel += numel;
                if group.small_numel >= SMALL_BATCH {
                    group.flush_small()?;
                }
            }
        }
    }
    let mut suspects: Vec<(usize, usize)> = Vec::new();
    for group in &mut groups {
        group.flush_small()?;
        let stacked = Tensor::f_stack(&group.sums, 0)?.f_to_kind(Kind::Double)?;
        let values = Vec::<f64>::try_from(&stacked)?;
        for (value, origin) in values.iter().zip(&group.origins) {
            if !value.is_finite() {
                suspects.extend(origin);
            }
        }
    }
    suspects.sort_unstable();
    for (rule, index) in suspects {
        let Some(g) = &grads[rule][index] else { continue };
        if g.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Ok(Some((rule, index)));
        }
    }
    Ok(None)
}
