//! The multi-tensor backend ([`Backend::MultiTensor`](super::Backend::MultiTensor)): what every
//! optimizer's step on ATen's multi-tensor ops shares. The variables with a gradient are
//! grouped by (device, dtype), as torch.optim's `_group_tensors_by_device_and_dtype` groups
//! them; each group takes one call set (`Algorithm::multi`, in each optimizer's file, through
//! `kernels/multi.rs` to the C++ shim), then one clamp per clip value for the constrained
//! ones. Nothing is read back to the host: the per-variable scalars torch computes from
//! `step.item()` come from the optimizer's own counts, and the step tensors the fused ops
//! want are kept on the device and derived from those counts whenever they disagree (after a
//! checkpoint was loaded, say), so that states move between backends freely.

use tch::{Device, Kind, Tensor};

use super::core::{Algorithm, Optim, Values};
use super::exec::Exec;
use crate::error::Result;
use crate::kernels::multi::{self, List};
use crate::var::Param;

/// The variables `which`, grouped by (device, dtype) in order of first appearance, each group
/// in variable order.
pub(crate) fn groups(params: &[Param], which: &[usize]) -> Vec<Vec<usize>> {
    let mut keys: Vec<(Device, Kind)> = Vec::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &i in which {
        let t = &params[i].tensor;
        let key = (t.device(), t.kind());
        match keys.iter().position(|k| *k == key) {
            Some(g) => out[g].push(i),
            None => {
                keys.push(key);
                out.push(vec![i]);
            }
        }
    }
    out
}

impl<A: Algorithm> Optim<A> {
    /// The multi-tensor step of the variables `which` (each with a checked gradient).
    pub(crate) fn multi_step(
        &mut self,
        grads: &[Option<Tensor>],
        hp: &Values<A>,
        which: &[usize],
    ) -> Result<()> {
        for group in groups(&self.params, which) {
            A::multi(self, grads, hp, &group)?;
            if !A::BINARY {
                self.clamp_multi(&group)?;
            }
        }
        Ok(())
    }

    /// The weight clips of a group's variables, one multi-tensor clamp per clip value (a
    /// binary algorithm's are applied after its step, as on every backend).
    fn clamp_multi(&mut self, group: &[usize]) -> Result<()> {
        let mut by_clip: Vec<(f64, Vec<usize>)> = Vec::new();
        for &i in group {
            let clip = self.exec.clips.get(i).copied().unwrap_or(f64::INFINITY);
            if clip.is_infinite() {
                continue;
            }
            match by_clip.iter_mut().find(|(c, _)| c.to_bits() == clip.to_bits()) {
                Some((_, members)) => members.push(i),
                None => by_clip.push((clip, vec![i])),
            }
        }
        for (clip, members) in by_clip {
            let list = List::of(members.iter().map(|&i| &self.params[i].tensor));
            multi::clamp_(&list, -clip, clip)?;
        }
        Ok(())
    }
}

impl Exec {
    /// The 0-dim f32 step tensors torch.optim's fused ops keep per variable, on each variable's
    /// device, holding `steps[k]` for variable `group[k]`: the ones kept from the previous step
    /// where they still agree with the optimizer's count, new ones where not.
    pub(crate) fn step_tensors(
        &mut self,
        params: &[Param],
        group: &[usize],
        steps: &[u64],
    ) -> Result<Vec<Tensor>> {
        if self.multi_steps.len() < params.len() {
            self.multi_steps.resize_with(params.len(), || None);
        }
        let mut out = Vec::with_capacity(group.len());
        for (&i, &step) in group.iter().zip(steps) {
            let device = params[i].tensor.device();
            let slot = &mut self.multi_steps[i];
            let fresh = match slot {
                Some((held, t)) if *held == step && t.device() == device => None,
                // torch keeps its fused step counters as f32: a count past 2^24 rounds.
                _ => Some(Tensor::from(step as f32).f_to_device(device)?),
            };
            if let Some(t) = fresh {
                *slot = Some((step, t));
            }
            if let Some((_, t)) = slot {
                out.push(t.shallow_clone());
            }
        }
        Ok(out)
    }

    /// After the fused ops advanced the step tensors of `group` (by one), or failed (`ok`
    /// false: forget them, a later step makes new ones from the counts).
    pub(crate) fn steps_advanced(&mut self, group: &[usize], ok: bool) {
        for &i in group {
            if let Some(slot) = self.multi_steps.get_mut(i) {
                match slot {
                    Some((held, _)) if ok => *held += 1,
                    _ => *slot = None,
                }
            }
        }
    }
}
