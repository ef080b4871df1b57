//! A joined process group and its collectives: c10d's Gloo backend, on CPU tensors.

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::error::{DistributedError, Error, Result};

use super::ffi::RawGroup;

/// One rank's membership of a group of processes, from [`Rendezvous::connect`]: c10d's
/// TCPStore rendezvous and `ProcessGroupGloo` (libtorch's own, as torch.distributed uses).
///
/// Every rank must call the same collectives in the same order with tensors of the same sizes
/// and dtypes (as in torch.distributed). Each call blocks until it completes; a peer that died
/// or stopped answering makes it fail within the group's timeout with
/// [`DistributedError::PeerLost`] or [`DistributedError::Timeout`], never hang.
///
/// [`Rendezvous::connect`]: super::Rendezvous::connect
///
/// ```no_run
/// use caseopt::distributed::Rendezvous;
/// use tch::Tensor;
///
/// let group = Rendezvous::new("127.0.0.1", 29500, 0, 2)?.connect()?;
/// let t = Tensor::from_slice(&[1.0f32, 2.0]);
/// group.all_reduce_sum(&[t.shallow_clone()])?; // every rank now holds the sum
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
pub struct ProcessGroup {
    raw: RawGroup,
    rank: usize,
    world_size: usize,
}

impl ProcessGroup {
    pub(super) fn new(raw: RawGroup, rank: usize, world_size: usize) -> Self {
        ProcessGroup { raw, rank, world_size }
    }

    /// This process's rank, from 0.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums every tensor across the group, in place (each tensor its own collective, started
    /// together so that their transfers overlap). Tensors must be dense, contiguous and on the
    /// CPU.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            check_communicable(&format!("#{i}"), t)?;
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        Ok(self.raw.all_reduce_sum(&refs)?)
    }

    /// Overwrites every tensor with rank `root`'s (dense, contiguous CPU tensors).
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(DistributedError::InvalidRendezvous(format!(
                "broadcast from rank {root} in a world of {}",
                self.world_size
            ))
            .into());
        }
        for (i, t) in tensors.iter().enumerate() {
            check_communicable(&format!("#{i}"), t)?;
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        Ok(self.raw.broadcast(&refs, root)?)
    }

    /// Every rank's `value`, in rank order: one all-gather of fixed size, safe to call before
    /// the ranks know they agree on anything else.
    pub(super) fn all_gather_i64(&self, value: i64) -> Result<Vec<i64>> {
        let input = Tensor::from_slice(&[value]);
        let output = Tensor::zeros([self.world_size as i64], (Kind::Int64, Device::Cpu));
        self.raw.all_gather(&input, &output)?;
        Ok(Vec::<i64>::try_from(&output)?)
    }

    /// Every rank's `bytes`, in rank order (their lengths may differ).
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = self.world_size as i64;
        let length = Tensor::from_slice(&[bytes.len() as i64]);
        let lengths = Tensor::zeros([world], (Kind::Int64, Device::Cpu));
        self.raw.all_gather(&length, &lengths)?;
        let lengths = Vec::<i64>::try_from(&lengths)?;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut padded = bytes.to_vec();
        padded.resize(usize::try_from(longest).unwrap_or(0), 0);
        let input = Tensor::from_slice(&padded);
        let output = Tensor::zeros([world * longest], (Kind::Uint8, Device::Cpu));
        self.raw.all_gather(&input, &output)?;
        let all = Vec::<u8>::try_from(&output)?;
        Ok(lengths
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let start = r * longest as usize;
                all[start..start + n as usize].to_vec()
            })
            .collect())
    }

    /// Checks that every rank describes `what` with the same lines (e.g. one per variable:
    /// name, shape, dtype), and otherwise fails on every rank with
    /// [`DistributedError::Mismatch`] naming the first rank and the first line that differ
    /// from rank 0's.
    pub fn agree(&self, what: &str, lines: &[String]) -> Result<()> {
        let joined = lines.join("\n");
        let all = self.all_gather_bytes(joined.as_bytes())?;
        let reference: Vec<&str> = std::str::from_utf8(&all[0]).unwrap_or("").split('\n').collect();
        for (rank, bytes) in all.iter().enumerate().skip(1) {
            let theirs: Vec<&str> = std::str::from_utf8(bytes).unwrap_or("").split('\n').collect();
            if let Some(what) = first_difference(what, &reference, &theirs) {
                return Err(DistributedError::Mismatch { rank, what }.into());
            }
        }
        Ok(())
    }

    /// The timeout every collective of this group runs under.
    pub fn timeout(&self) -> Duration {
        self.raw.timeout()
    }
}

/// The first line where `theirs` (another rank's) differs from `reference` (rank 0's), in words.
pub(super) fn first_difference(what: &str, reference: &[&str], theirs: &[&str]) -> Option<String> {
    for (i, (ours, other)) in reference.iter().zip(theirs).enumerate() {
        if ours != other {
            return Some(format!("{what} #{i}: `{other}` there, `{ours}` on rank 0"));
        }
    }
    match reference.len().cmp(&theirs.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!(
            "{what}: {} entries there, {} on rank 0 (first extra: `{}`)",
            theirs.len(),
            reference.len(),
            theirs[reference.len()]
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "{what}: {} entries there, {} on rank 0 (first missing: `{}`)",
            theirs.len(),
            reference.len(),
            reference[theirs.len()]
        )),
    }
}

/// Collectives take dense, contiguous CPU tensors (Gloo's; CUDA tensors need NCCL, which this
/// module does not reach yet).
pub(super) fn check_communicable(name: &str, t: &Tensor) -> Result<()> {
    let reason = if t.device() != Device::Cpu {
        Some(format!("it is on {:?}; the Gloo backend takes CPU tensors", t.device()))
    } else if !t.is_contiguous() || t.is_sparse() {
        Some("it is not a dense contiguous tensor".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => {
            Err(Error::Distributed(DistributedError::Unsupported { variable: name.into(), reason }))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::first_difference;

    #[test]
    fn names_the_first_difference() {
        let a = ["w [2] f32", "b [3] f32"];
        assert_eq!(first_difference("variable", &a, &a), None);
        let b = ["w [2] f32", "b [4] f32"];
        assert_eq!(
            first_difference("variable", &a, &b).unwrap(),
            "variable #1: `b [4] f32` there, `b [3] f32` on rank 0"
        );
        let c = ["w [2] f32"];
        assert!(first_difference("variable", &a, &c)
            .unwrap()
            .contains("first missing: `b [3] f32`"));
        assert!(first_difference("variable", &c, &a).unwrap().contains("first extra: `b [3] f32`"));
    }
}
