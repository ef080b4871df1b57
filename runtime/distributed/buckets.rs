//! Which gradients travel together: DDP's flat buckets, planned once.
//!
//! One collective per tensor pays the collective's fixed cost (a round trip per ring step) once
//! per tensor, which dominates for the many small tensors of a BNN (batch-norm shifts, biases).
//! Gradients are instead copied into a few flat buffers, one dtype per buffer, each at most
//! `cap` bytes (a tensor larger than the cap gets a buffer of its own), and each buffer is
//! all-reduced as one tensor. torch's DDP does the same with a 25 MiB cap.

use tch::Kind;

/// DDP's default bucket size (`bucket_cap_mb=25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// One flat buffer: its dtype, its length in elements, and where each member lies in it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Bucket {
    pub kind: Kind,
    pub len: i64,
    /// (variable index, offset, number of elements), in variable order.
    pub members: Vec<(usize, i64, i64)>,
}

/// Plans the buckets for variables given as (dtype, number of elements), in order: variables of
/// one dtype fill that dtype's open bucket until the next would pass `cap` bytes.
pub(super) fn plan(vars: &[(Kind, i64)], cap: usize) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    // The open bucket of each dtype, by index into `buckets`.
    let mut open: Vec<(Kind, usize)> = Vec::new();
    for (index, &(kind, numel)) in vars.iter().enumerate() {
        let bytes_per = kind.elt_size_in_bytes() as i64;
        let slot = open.iter().position(|&(k, _)| k == kind);
        let fits = slot.is_some_and(|s| {
            let b = &buckets[open[s].1];
            ((b.len + numel) * bytes_per) as usize <= cap
        });
        match (slot, fits) {
            (Some(s), true) => {
                let b = &mut buckets[open[s].1];
                b.members.push((index, b.len, numel));
                b.len += numel;
            }
            _ => {
                buckets.push(Bucket { kind, len: numel, members: vec![(index, 0, numel)] });
                let at = buckets.len() - 1;
                match slot {
                    Some(s) => open[s].1 = at,
                    None => open.push((kind, at)),
                }
            }
        }
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_dtype_and_caps_by_bytes() {
        let vars = [(Kind::Float, 10), (Kind::Double, 3), (Kind::Float, 5), (Kind::Float, 20)];
        // 15 f32 fit in 64 bytes; the third f32 variable (20 elements = 80 bytes) starts a new one.
        let b = plan(&vars, 64);
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0],
            Bucket { kind: Kind::Float, len: 15, members: vec![(0, 0, 10), (2, 10, 5)] }
        );
        assert_eq!(b[1], Bucket { kind: Kind::Double, len: 3, members: vec![(1, 0, 3)] });
        assert_eq!(b[2], Bucket { kind: Kind::Float, len: 20, members: vec![(3, 0, 20)] });
    }

    #[test]
    fn every_variable_lands_once() {
        let vars: Vec<(Kind, i64)> = (0..100)
            .map(|i| (if i % 3 == 0 { Kind::Double } else { Kind::Float }, 1 + i % 7))
            .collect();
        let buckets = plan(&vars, 40);
        let mut seen: Vec<usize> =
            buckets.iter().flat_map(|b| b.members.iter().map(|m| m.0)).collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        for b in &buckets {
            let mut offset = 0;
            for &(i, at, n) in &b.members {
                assert_eq!((at, n, vars[i].0), (offset, vars[i].1, b.kind));
                offset += n;
            }
            assert_eq!(offset, b.len);
        }
    }
}
