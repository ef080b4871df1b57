//! How a built-in optimizer executes a step: its backend and threads, its state buffers, and
//! the fused multi-tensor pass with its fallback to libtorch ops.

use tch::{Device, Kind, Tensor};

use super::core::VarState;
use super::grad::{check_grad, check_grads};
use super::state::StateSlot;
use super::{Backend, Sqrt};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Operands, Unfit, Workspace, MAX_STATES};
use crate::var::Param;

/// Execution settings and scratch every built-in optimizer carries.
#[derive(Debug, Default)]
pub struct Exec {
    pub(crate) backend: Backend,
    /// Threads for the fused kernels; 0 follows `tch::get_num_threads()`.
    pub(crate) threads: usize,
    pub(crate) workspace: Workspace,
    /// Gradient handles of the current step (kept to reuse the allocation).
    pub(crate) grads: Vec<Option<Tensor>>,
    /// Variables the fused path refused this step, for the libtorch path.
    pub(crate) rest: Vec<usize>,
    /// Scratch for the fused path's refusals.
    pub(crate) refused: Vec<(usize, Unfit)>,
    /// State buffers made by [`new_states`](Exec::new_states); never removed, so that slots
    /// stay valid.
    pub(crate) state_buffers: Vec<Tensor>,
    /// Each variable's clip for the fused kernels, which clamp their new values to
    /// `[-clip, clip]` before they store them (infinity: no constraint).
    pub(crate) clips: Vec<f64>,
    /// The square root the fused Adam/AdamW kernels take (the others ignore it).
    pub(crate) sqrt: Sqrt,
    /// Per variable, the step tensor the multi-tensor backend's fused ops advance, with the
    /// count it holds (`multi.rs`).
    pub(crate) multi_steps: Vec<Option<(u64, Tensor)>>,
}

/// Elements each variable's run of a state buffer is rounded up to: 64 bytes of f32, so that
/// every run starts on its own cache line and at a vector boundary.
const RUN_ALIGN: usize = 16;

/// A variable's new states: its index, its state tensors, and where they were put.
pub(crate) type NewStates = (usize, Vec<Tensor>, Option<StateSlot>);

impl Exec {
    /// The threads the fused kernels may use.
    pub(crate) fn threads(&self) -> usize {
        if self.threads == 0 {
            usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
        } else {
            self.threads
        }
    }

    /// For optimizers without fused kernels: fails under [`Backend::Fused`].
    pub(crate) fn refuse_all_under_fused(
        &self,
        optimizer: &'static str,
        params: &[Param],
    ) -> Result<()> {
        if self.backend == Backend::Fused {
            return Err(Error::FusedUnavailable {
                optimizer,
                variable: params.first().map(|p| p.info.name.clone()).unwrap_or_default(),
                reason: format!("{optimizer} has no fused kernel"),
            });
        }
        Ok(())
    }

    /// Zero states for every variable `i` with `wanted(i)`: `count` tensors of the parameter's
    /// shape, dtype and device each, and where they were put.
    ///
    /// The states of contiguous f32/f64 CPU variables created together share one new state
    /// buffer per element type (state 0 of every variable, then state 1, ...): the fused
    /// kernels then stream each state through memory in order and read one buffer's metadata
    /// per step instead of one per state tensor (on 2000 small variables, most of a step's cost
    /// was reading metadata). The tensors returned are views into it, so the libtorch path and
    /// `state()` see the same memory. Other variables get `zeros_like` tensors of their own.
    pub(crate) fn new_states(
        &mut self,
        params: &[Param],
        wanted: impl Fn(usize) -> bool,
        count: usize,
    ) -> Result<Vec<NewStates>> {
        let count = count.min(MAX_STATES);
        let mut out = Vec::new();
        let mut groups: [(Kind, Vec<usize>); 2] =
            [(Kind::Float, Vec::new()), (Kind::Double, Vec::new())];
        for (i, p) in params.iter().enumerate().filter(|(i, _)| wanted(*i)) {
            let t = &p.tensor;
            let in_buffer = t.device() == Device::Cpu && t.is_contiguous();
            match groups.iter_mut().find(|(kind, _)| in_buffer && t.kind() == *kind) {
                Some((_, members)) => members.push(i),
                None => {
                    let states = (0..count).map(|_| t.f_zeros_like()).collect::<Result<_, _>>()?;
                    out.push((i, states, None));
                }
            }
        }
        for (kind, members) in groups {
            if members.is_empty() {
                continue;
            }
            let run = |i: usize| params[i].tensor.numel().div_ceil(RUN_ALIGN) * RUN_ALIGN;
            let total: usize = members.iter().map(|&i| run(i)).sum();
            // Past i64, libtorch refuses the allocation with its own error.
            let len = i64::try_from(total.saturating_mul(count)).unwrap_or(i64::MAX);
            let buffer = Tensor::f_zeros([len], (kind, Device::Cpu))?;
            let buffer_index = self.state_buffers.len();
            let mut start = 0;
            for &i in &members {
                let p = &params[i].tensor;
                let mut offsets = [0usize; MAX_STATES];
                let mut states = Vec::with_capacity(count);
                for (s, offset) in offsets.iter_mut().enumerate().take(count) {
                    *offset = s * total + start;
                    let view = buffer.f_narrow(0, *offset as i64, p.numel() as i64)?;
                    states.push(view.f_view(p.size().as_slice())?);
                }
                start += run(i);
                out.push((i, states, Some(StateSlot { buffer: buffer_index, offsets })));
            }
            self.state_buffers.push(buffer);
        }
        out.sort_by_key(|(i, _, _)| *i);
        Ok(out)
    }

    /// The fused part of a step: runs `kernel` over every variable with a gradient that the
    /// kernels can take, in one multi-tensor pass, and leaves in `self.rest` the variables the
    /// caller must update with libtorch ops (all of them under [`Backend::Torch`]). Every
    /// variable with a gradient must have its state already. Fails, having written nothing,
    /// when the backend is [`Backend::Fused`] and some variable cannot take it. `scalars`
    /// gives a state's per-variable kernel scalars.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fused_step<S: VarState, K: Kernel>(
        &mut self,
        optimizer: &'static str,
        params: &[Param],
        states: &[Option<S>],
        grads: &[Option<Tensor>],
        kernel: &K,
        state_count: usize,
        mut scalars: impl FnMut(&S) -> [f64; 2],
    ) -> Result<()> {
        self.rest.clear();
        let with_grads = |rest: &mut Vec<usize>| {
            rest.clear();
            rest.extend(grads.iter().enumerate().filter_map(|(i, g)| g.as_ref().map(|_| i)));
        };
        if self.backend == Backend::Torch {
            check_grads(params, grads)?;
            with_grads(&mut self.rest);
            // Forget the previous fused batch, so that `updated` reports nothing.
            let _ = self.workspace.batch(0);
            return Ok(());
        }
        let threads = self.threads();
        let mut refused = std::mem::take(&mut self.refused);
        refused.clear();
        // A variable with a gradient but no state (not created by the caller) is refused
        // here; the others are checked together.
        for (i, (g, st)) in grads.iter().zip(states).enumerate() {
            if g.is_some() && st.is_none() {
                refused.push((i, Unfit::Unsupported("a variable without state")));
            }
        }
        let mut batch = self.workspace.batch(state_count);
        let vars =
            params.iter().zip(grads).zip(states).enumerate().filter_map(|(index, ((p, g), st))| {
                let st = st.as_ref()?;
                let state_buffer = st.slot().map(|s| (s.buffer, s.offsets));
                Some(Operands {
                    index,
                    param: &p.tensor,
                    grad: g.as_ref()?,
                    states: st.operands(),
                    state_buffer,
                })
            });
        batch.queue(vars, &self.state_buffers, &mut refused);
        batch.set_scalars(|i| states[i].as_ref().map_or([0.0; 2], &mut scalars));
        let clips = &self.clips;
        batch.set_clips(|i| clips.get(i).copied().unwrap_or(f64::INFINITY));
        // Refusals in variable order, so that errors name the first variable concerned.
        refused.sort_by_key(|(i, _)| *i);
        for (i, unfit) in refused.drain(..) {
            let p = &params[i];
            match unfit {
                Unfit::Grad(reason) => {
                    return Err(Error::GradientMismatch { variable: p.info.name.clone(), reason })
                }
                unfit => {
                    // The libtorch path still needs the gradient checked before anything
                    // changes.
                    if let Some(g) = &grads[i] {
                        check_grad(p, g)?;
                    }
                    refuse(self.backend, &mut self.rest, optimizer, params, i, unfit)?;
                }
            }
        }
        self.refused = refused;
        if let Err(unfit) = batch.run(kernel, threads) {
            let index = match unfit {
                Unfit::Overlap(index) => index,
                _ => 0,
            };
            refuse(self.backend, &mut self.rest, optimizer, params, index, unfit)?;
            // Nothing was written: every variable goes the libtorch way.
            with_grads(&mut self.rest);
        }
        Ok(())
    }
}

/// Records that variable `index` cannot take the fused path: queued in `rest` for libtorch
/// under [`Backend::Auto`], an error under [`Backend::Fused`].
fn refuse(
    backend: Backend,
    rest: &mut Vec<usize>,
    optimizer: &'static str,
    params: &[Param],
    index: usize,
    unfit: Unfit,
) -> Result<()> {
    if backend == Backend::Fused {
        return Err(Error::FusedUnavailable {
            optimizer,
            variable: params[index].info.name.clone(),
            reason: unfit.to_string(),
        });
    }
    rest.push(index);
    Ok(())
}
