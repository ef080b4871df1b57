//! Bop's staged steps: for the router's non-finite check, a large Bop computes its coming
//! step in the pass that checks its gradients, keeps it aside, and commits it once the router
//! has accepted the whole step (or drops it).
//!
//! This is Bop's own concern: the router reaches it through [`stage`] and [`drop_staged`],
//! which find a [`Bop`] behind any optimizer type by its type identity, so the public
//! [`Optimizer`] trait carries nothing for it.

use std::any::Any;

use tch::{Kind, Tensor};

use super::bop::{Bop, BopAlgorithm, BopValues};
use super::core::{Algorithm, Optim, VarState};
use super::hyper::Hyperparameters;
use super::{Backend, Optimizer};
use crate::error::Result;
use crate::kernels::math::BopScalars;
use crate::kernels::{stage, Operands, Workspace};
use crate::var::Param;

/// Elements below which a step is not staged: the router's separate scan of a few MiB of
/// gradients leaves them in cache for the update, and staging would cost a second state
/// buffer for no gain.
const STAGE_MIN_ELEMENTS: i64 = 1 << 20;

/// What staging a step found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StageReport {
    /// The variables whose gradients the staging checked (their update is staged).
    pub(crate) covered: Vec<usize>,
    /// The first of them whose gradient holds a NaN or an infinity.
    pub(crate) first_non_finite: Option<usize>,
}

/// Stages the coming step of `optimizer` with `grads`, when it is a [`Bop`] large enough to
/// gain from it; `None` when nothing was staged (the router then scans those gradients).
pub(crate) fn stage<O: Optimizer>(
    optimizer: &mut O,
    grads: &[Option<Tensor>],
) -> Result<Option<StageReport>> {
    match (optimizer as &mut dyn Any).downcast_mut::<Bop>() {
        Some(bop) => Staging::stage(bop, grads),
        None => Ok(None),
    }
}

/// Drops the step staged in `optimizer`, if any (the router refused the step).
pub(crate) fn drop_staged<O: Optimizer>(optimizer: &mut O) {
    if let Some(bop) = (optimizer as &mut dyn Any).downcast_mut::<Bop>() {
        BopAlgorithm::forget_staged(bop);
    }
}

/// A Bop's staging: a second copy of each f32 state buffer, where the staged state is
/// written and which is exchanged with the buffer at commit, and the staged step itself.
#[derive(Debug, Default)]
pub struct Staging {
    second_buffers: Vec<Option<Tensor>>,
    staged: Option<StagedStep>,
}

/// A staged step as Bop keeps it until the step it was staged for.
#[derive(Debug)]
struct StagedStep {
    /// The step count and hyperparameters it was computed with.
    steps: u64,
    hyperparameters: [f64; 2],
    /// Each covered variable's gradient address.
    grads: Vec<(usize, usize)>,
    staged: stage::Staged,
}

impl Staging {
    /// Forgets the staged step, if any (its scratch kept for the next).
    pub(crate) fn forget(&mut self, workspace: &mut Workspace) {
        if let Some(st) = self.staged.take() {
            st.staged.recycle(workspace);
        }
    }

    /// Stages the coming step (see the module docs): the variables whose state already lives
    /// in an f32 state buffer, when there are enough of them.
    fn stage(bop: &mut Bop, grads: &[Option<Tensor>]) -> Result<Option<StageReport>> {
        let Optim { config, params, states, steps, exec, extra: staging, .. } = bop;
        staging.forget(&mut exec.workspace);
        if matches!(exec.backend, Backend::Torch | Backend::MultiTensor)
            || grads.len() != params.len()
        {
            return Ok(None);
        }
        // The eligible variables' states lie in the state buffers without overlapping: their
        // sizes bound the eligible elements, so a small optimizer is passed over without a
        // look at each of its variables (on 1000 variables, 5 us of a router step).
        let capacity: i64 = exec.state_buffers.iter().map(Tensor::numel).map(|n| n as i64).sum();
        if capacity < STAGE_MIN_ELEMENTS {
            return Ok(None);
        }
        let eligible =
            |i: usize| grads[i].is_some() && states[i].as_ref().is_some_and(|s| s.slot.is_some());
        let elements: i64 =
            (0..params.len()).filter(|&i| eligible(i)).map(|i| params[i].info.numel()).sum();
        if elements < STAGE_MIN_ELEMENTS {
            return Ok(None);
        }
        let hp = config.values_at(*steps)?;
        let seconds = &mut staging.second_buffers;
        seconds.resize_with(exec.state_buffers.len(), || None);
        for (buffer, second) in exec.state_buffers.iter().zip(seconds.iter_mut()) {
            if second.is_none() && buffer.kind() == Kind::Float {
                *second = Some(buffer.f_empty_like()?);
            }
        }
        let threads = exec.threads();
        let mut refused = std::mem::take(&mut exec.refused);
        refused.clear();
        let mut batch = exec.workspace.batch(1);
        let vars = params.iter().zip(grads).zip(states.iter()).enumerate().filter_map(
            |(index, ((p, g), st))| {
                let st = st.as_ref()?;
                let slot = st.slot?;
                Some(Operands {
                    index,
                    param: &p.tensor,
                    grad: g.as_ref()?,
                    states: st.operands(),
                    state_buffer: Some((slot.buffer, slot.offsets)),
                })
            },
        );
        // Refused variables (on another path, or with a mismatched gradient) are simply not
        // covered: the step handles them as it would without staging.
        batch.queue(vars, &exec.state_buffers, &mut refused);
        refused.clear();
        exec.refused = refused;
        // As the kernel rounds them (`BopKernel`).
        let scalars = BopScalars { gamma: hp.gamma as f32, threshold: hp.threshold as f32 };
        let Ok(staged) = batch.stage_bop(scalars, &exec.state_buffers, seconds, threads) else {
            return Ok(None);
        };
        let report = StageReport {
            covered: staged.covered.clone(),
            first_non_finite: staged.first_non_finite,
        };
        let grads = staged
            .covered
            .iter()
            .filter_map(|&i| grads[i].as_ref().map(|g| (i, g.data_ptr() as usize)))
            .collect();
        staging.staged = Some(StagedStep {
            steps: *steps,
            hyperparameters: [hp.gamma, hp.threshold],
            grads,
            staged,
        });
        Ok(Some(report))
    }

    /// Commits the step staged in `bop` for exactly these gradients and hyperparameters, if
    /// any: returns the gradients still to apply (the covered ones removed), or `None` when
    /// there was nothing to commit (the whole step then runs as usual).
    pub(crate) fn commit(
        bop: &mut Bop,
        grads: &[Option<Tensor>],
        hp: &BopValues,
    ) -> Option<Vec<Option<Tensor>>> {
        let Optim { params, steps, exec, extra: staging, flips, .. } = bop;
        let st = staging.staged.take()?;
        let same_grads = st.grads.iter().all(|&(i, addr)| {
            grads.get(i).and_then(Option::as_ref).is_some_and(|g| g.data_ptr() as usize == addr)
        });
        if st.steps != *steps || st.hyperparameters != [hp.gamma, hp.threshold] || !same_grads {
            st.staged.recycle(&mut exec.workspace);
            return None;
        }
        let staged = st.staged;
        let committed = stage::commit(
            &staged,
            &mut exec.workspace,
            |i| params.get(i).map(|p: &Param| &p.tensor),
            &exec.state_buffers,
            &staging.second_buffers,
        );
        if committed.is_ok() {
            for &(i, n) in &staged.flipped {
                flips.counted(i, n);
            }
        }
        let rest = committed.is_ok().then(|| {
            let mut rest: Vec<Option<Tensor>> =
                grads.iter().map(|g| g.as_ref().map(Tensor::shallow_clone)).collect();
            for &i in &staged.covered {
                rest[i] = None;
            }
            rest
        });
        staged.recycle(&mut exec.workspace);
        rest
    }
}

// Staging is the fused kernels' (without the `fused` feature nothing is ever staged).
#[cfg(all(test, feature = "fused"))]
mod tests {
    //! Staging against Bop's in-place step, bit for bit. The router's side (commit or drop
    //! as the whole step is accepted or refused) is tested in tests/test_staged.rs.

    use super::*;
    use crate::var::VarInfo;

    /// A xorshift generator, so that the tests need no dependency for their data.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        /// Uniform in [-1, 1).
        fn symmetric(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// A tensor's bytes, for comparisons to the bit.
    fn exact(t: &Tensor) -> (Kind, Vec<i64>, Vec<u8>) {
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).unwrap();
        (t.kind(), t.size(), bytes)
    }

    use crate::optim::BopConfig;

    /// Enough elements to be staged (2^20 at least), not a multiple of 16.
    const BIG: i64 = (1 << 20) + 37;

    /// Weights of +-1 (and one 0.5, binarised by the first update) in `n` elements.
    fn weights(n: i64, rng: &mut Rng) -> Tensor {
        let mut v: Vec<f32> =
            (0..n).map(|_| if rng.symmetric() >= 0.0 { 1.0 } else { -1.0 }).collect();
        v[0] = 0.5;
        Tensor::from_slice(&v)
    }

    /// Gradients whose moving averages cross the threshold both ways over a few steps.
    fn gradient(n: i64, rng: &mut Rng) -> Tensor {
        let v: Vec<f32> = (0..n).map(|_| rng.symmetric() * 1e-3).collect();
        Tensor::from_slice(&v)
    }

    fn bop() -> Bop {
        Bop::new(BopConfig { threshold: 1e-7.into(), gamma: 1e-1.into() }).unwrap()
    }

    /// Two identical Bops over three variables: a large one, a small one, and a large one that
    /// starts at an odd offset of its storage (so that its lines are not cache-line aligned).
    fn twins() -> (Bop, Bop, Vec<Tensor>, Vec<Tensor>) {
        let mut rng = Rng::new(7);
        let big = weights(BIG, &mut rng);
        let small = weights(1000, &mut rng);
        let offset = weights(BIG + 3, &mut rng).narrow(0, 3, BIG);
        let (mut a, mut b) = (bop(), bop());
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        for (i, t) in [big, small, offset].into_iter().enumerate() {
            let copy = t.copy();
            let info = VarInfo::of(format!("w{i}"), &t).with_bits(1);
            a.add_param(Param::new(info.clone(), t.shallow_clone())).unwrap();
            b.add_param(Param::new(info, copy.shallow_clone())).unwrap();
            pa.push(t);
            pb.push(copy);
        }
        (a, b, pa, pb)
    }

    fn grads_for(params: &[Tensor], rng: &mut Rng) -> Vec<Option<Tensor>> {
        params.iter().map(|p| Some(gradient(p.numel() as i64, rng))).collect()
    }

    fn same_state(a: &Bop, b: &Bop) {
        for i in 0..a.params().len() {
            let sa: Vec<_> = a.state(i).iter().map(|(n, t)| (*n, exact(t))).collect();
            let sb: Vec<_> = b.state(i).iter().map(|(n, t)| (*n, exact(t))).collect();
            assert_eq!(sa, sb, "state of variable {i}");
            assert_eq!(exact(&a.params()[i].tensor), exact(&b.params()[i].tensor), "variable {i}");
        }
    }

    #[test]
    fn staged_steps_equal_in_place_steps_bit_for_bit() {
        let (mut a, mut b, pa, _) = twins();
        let mut rng = Rng::new(11);
        let mut alias = None;
        let mut flips = 0;
        for step in 0..6 {
            let grads = grads_for(&pa, &mut rng);
            let report = stage(&mut a, &grads).unwrap();
            if step == 0 {
                // No state yet: nothing to stage.
                assert_eq!(report, None);
            } else {
                // Every variable whose state lives in a state buffer is staged, the small one
                // too (the whole optimizer is large enough).
                let report = report.expect("a large step is staged");
                assert_eq!(report.covered, vec![0, 1, 2]);
                assert_eq!(report.first_non_finite, None);
            }
            let before = exact(&pa[0]);
            a.step_with_grads(&grads).unwrap();
            b.step_with_grads(&grads).unwrap();
            if exact(&pa[0]) != before {
                flips += 1;
            }
            same_state(&a, &b);
            // An alias of the state handed out earlier still shows the current state.
            let current = a.state(0).remove(0).1;
            let held = alias.get_or_insert_with(|| current.alias());
            assert_eq!(exact(held), exact(&current));
        }
        assert!(flips >= 3, "the steps should flip weights ({flips})");
    }

    #[test]
    fn a_dropped_or_mismatched_staging_changes_nothing() {
        let (mut a, mut b, pa, _) = twins();
        let mut rng = Rng::new(3);
        let grads = grads_for(&pa, &mut rng);
        a.step_with_grads(&grads).unwrap();
        b.step_with_grads(&grads).unwrap();
        // Staged, then dropped: nothing moved.
        let grads = grads_for(&pa, &mut rng);
        assert!(stage(&mut a, &grads).unwrap().is_some());
        drop_staged(&mut a);
        same_state(&a, &b);
        // Staged for some gradients, stepped with others: the staging is not used.
        assert!(stage(&mut a, &grads).unwrap().is_some());
        let other = grads_for(&pa, &mut rng);
        a.step_with_grads(&other).unwrap();
        b.step_with_grads(&other).unwrap();
        same_state(&a, &b);
        // Staged, then a hyperparameter changed: not used either.
        let grads = grads_for(&pa, &mut rng);
        assert!(stage(&mut a, &grads).unwrap().is_some());
        a.set_hyperparameter("gamma", 0.2.into()).unwrap();
        b.set_hyperparameter("gamma", 0.2.into()).unwrap();
        a.step_with_grads(&grads).unwrap();
        b.step_with_grads(&grads).unwrap();
        same_state(&a, &b);
    }

    #[test]
    fn a_staging_finds_a_single_bad_value_anywhere() {
        let (mut a, _, pa, _) = twins();
        let mut rng = Rng::new(5);
        let grads = grads_for(&pa, &mut rng);
        a.step_with_grads(&grads).unwrap();
        for (var, at, value) in
            [(0, 0, f32::NAN), (0, BIG - 1, f32::INFINITY), (2, BIG / 2, f32::NEG_INFINITY)]
        {
            let grads = grads_for(&pa, &mut rng);
            let _ = grads[var].as_ref().unwrap().get(at).fill_(f64::from(value));
            let report = stage(&mut a, &grads).unwrap().expect("staged");
            assert_eq!(report.first_non_finite, Some(var), "{var} {at}");
            drop_staged(&mut a);
        }
    }
}
