//! The aliasing proof: before any `&mut` slice of a pass exists, no byte written through one
//! operand may belong to another operand of any variable of the pass. Gradients, only read,
//! may share memory with each other, never with anything written.
//!
//! The proof sorts every operand's byte range and sweeps once; it is kept, and a later pass
//! over the same addresses (the common case: an optimizer's tensors do not move between steps)
//! reuses it after one comparison.

use std::mem::size_of;

use super::admit::KernelJob;

/// A byte range one operand of one job covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Region {
    pub(crate) start: usize,
    pub(crate) end: usize,
    writable: bool,
    /// The variable the operand belongs to.
    pub(crate) index: usize,
}

/// The proof's scratch, kept between passes, with the last regions proven disjoint.
#[derive(Debug, Default)]
pub(crate) struct AliasProof {
    /// This pass's regions, in queue order.
    regions: Vec<Region>,
    /// The regions of the last pass proven disjoint, in queue order.
    verified: Vec<Region>,
    /// Sorting scratch.
    sorted: Vec<Region>,
    /// How many times [`prove`](Self::prove) ran, for tests.
    #[cfg(test)]
    pub(crate) runs: usize,
}

impl AliasProof {
    /// Checks that every byte some job of `f32_jobs` and `f64_jobs` writes (its parameter and
    /// its first `states` states) belongs to exactly one operand of one job; readers
    /// (gradients) may share memory with each other, not with anything written. The error is
    /// the index of a variable involved in an overlap.
    pub(crate) fn prove(
        &mut self,
        f32_jobs: &[KernelJob],
        f64_jobs: &[KernelJob],
        states: usize,
    ) -> Result<(), usize> {
        #[cfg(test)]
        {
            self.runs += 1;
        }
        self.regions.clear();
        for (jobs, size) in [(f32_jobs, size_of::<f32>()), (f64_jobs, size_of::<f64>())] {
            for j in jobs.iter().filter(|j| j.len > 0) {
                let bytes = j.len * size;
                let mut add = |addr: usize, writable: bool| {
                    let index = j.index;
                    self.regions.push(Region { start: addr, end: addr + bytes, writable, index })
                };
                add(j.p, true);
                add(j.g, false);
                for &s in &j.states[..states] {
                    add(s, true);
                }
            }
        }
        if self.regions == self.verified {
            return Ok(());
        }
        self.sorted.clear();
        self.sorted.extend_from_slice(&self.regions);
        self.sorted.sort_unstable();
        let (mut end_any, mut end_written) = (0usize, 0usize);
        for r in &self.sorted {
            if r.start < end_written || (r.writable && r.start < end_any) {
                return Err(r.index);
            }
            end_any = end_any.max(r.end);
            if r.writable {
                end_written = end_written.max(r.end);
            }
        }
        std::mem::swap(&mut self.verified, &mut self.regions);
        Ok(())
    }

    /// The regions of the last pass proven disjoint.
    pub(crate) fn verified(&self) -> &[Region] {
        &self.verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(list: &[(usize, usize, usize, usize)]) -> Vec<KernelJob> {
        list.iter()
            .enumerate()
            .map(|(index, &(p, g, m, len))| KernelJob {
                index,
                len,
                p,
                g,
                states: [m, 0, 0],
                scalars: [0.0; 2],
                clip: f64::INFINITY,
            })
            .collect()
    }

    fn prove(list: &[(usize, usize, usize, usize)]) -> Result<(), usize> {
        AliasProof::default().prove(&jobs(list), &[], 1)
    }

    #[test]
    fn disjointness_allows_shared_reads_only() {
        // Separate buffers of 4 f32 (16 bytes) each.
        assert_eq!(prove(&[(0, 16, 32, 4), (48, 64, 80, 4)]), Ok(()));
        // Two variables reading the same gradient: fine.
        assert_eq!(prove(&[(0, 100, 32, 4), (48, 100, 80, 4)]), Ok(()));
        // A gradient that is its own parameter.
        assert_eq!(prove(&[(0, 0, 32, 4)]), Err(0));
        // A state overlapping the next variable's parameter by one element.
        assert!(prove(&[(0, 16, 32, 4), (44, 64, 80, 4)]).is_err());
        // A gradient reading memory another variable writes.
        assert!(prove(&[(0, 52, 32, 4), (48, 100, 80, 4)]).is_err());
        // Only the operands a kernel uses count: a stale second state slot is ignored.
        let mut js = jobs(&[(0, 16, 32, 4)]);
        js[0].states[1] = 0;
        assert_eq!(AliasProof::default().prove(&js, &[], 1), Ok(()));
    }

    #[test]
    fn a_verified_plan_is_reused_and_a_changed_one_rechecked() {
        let mut proof = AliasProof::default();
        let mut js = jobs(&[(0, 16, 32, 4)]);
        assert_eq!(proof.prove(&js, &[], 1), Ok(()));
        assert_eq!(proof.verified().len(), 3);
        assert_eq!(proof.prove(&js, &[], 1), Ok(()));
        js[0].g = 0;
        assert_eq!(proof.prove(&js, &[], 1), Err(0));
    }
}
