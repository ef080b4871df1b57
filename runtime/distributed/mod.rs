//! Data-parallel training over libtorch's c10d, the layer under `torch.distributed` (feature
//! `distributed`, on by default).
//!
//! - [`Rendezvous`]: where a rank finds its peers, from torchrun's environment
//!   ([`Rendezvous::from_env`]) or explicit settings, with a timeout that bounds the rendezvous
//!   and every collective after it.
//! - [`ProcessGroup`]: the joined group: c10d's TCPStore rendezvous and `ProcessGroupGloo`
//!   (libtorch's own Gloo backend, for CPU tensors) with all-reduce, broadcast and all-gather.
//! - [`DataParallel`]: DDP's recipe on a caseopt router: rank 0's values to every rank at the
//!   start, a check before every step that every rank is about to do the same thing (variables,
//!   buckets, routing, hyperparameter values, settings, gradients), and gradients averaged in a
//!   few flat bucketed all-reduces per dtype.
//!
//! Nothing here is a collective of our own: the C++ shim (`runtime/distributed/shim/c10d.cpp`)
//! only creates c10d's objects and calls them, and turns their exceptions into
//! [`DistributedError`]s. A peer that dies or stops answering is an error within the timeout
//! ([`DistributedError::PeerLost`], [`DistributedError::Timeout`]), never a hang or a panic.
//!
//! CUDA tensors need c10d's NCCL backend, which this module does not reach yet: they are
//! refused with [`DistributedError::Unsupported`]. See `docs/distributed.md` for launching,
//! costs and what is left.
//!
//! ```no_run
//! use caseopt::distributed::{DataParallel, Rendezvous};
//! use caseopt::case_optimizer;
//! use tch::{nn, Device};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! // ... the model ...
//! let mut dp = DataParallel::new(Rendezvous::from_env()?.connect()?, &vs)?;
//! let mut opt = case_optimizer! { _ => Adam<lr: 1e-3> }.build(&vs)?;
//! dp.check_router(&opt)?;
//! // per batch (this rank's share): dp.backward_step(&mut opt, &loss)?;
//! # Ok::<(), caseopt::Error>(())
//! ```

mod agreement;
mod buckets;
mod data_parallel;
#[allow(unsafe_code)]
mod ffi;
mod group;
mod rendezvous;
mod shard;
mod zero;

pub use crate::error::DistributedError;
pub use buckets::DEFAULT_BUCKET_BYTES;
pub use data_parallel::DataParallel;
pub use group::ProcessGroup;
pub use rendezvous::{Rendezvous, DEFAULT_TIMEOUT, MAX_TIMEOUT};
