//! Data-parallel training: every rank holds the whole model, computes gradients on its share of
//! each batch, and the gradients are averaged before every rank takes the same step.

use tch::{nn, Device, Kind, Tensor};

use crate::error::{DistributedError, Result};
use crate::router::Router;
use crate::var::{trainable_vars, Param};

use super::buckets::{self, Bucket, DEFAULT_BUCKET_BYTES};
use super::ffi;
use super::group::{check_communicable, ProcessGroup};

/// A bucket's members with the tensors `of` gives (by variable index), for `ffi::pack`/`unpack`.
pub(super) fn members<'a>(bucket: &Bucket, of: &'a [Option<Tensor>]) -> ffi::Members<'a> {
    ffi::Members {
        tensors: bucket.members.iter().map(|m| of[m.0].as_ref()).collect(),
        offsets: bucket.members.iter().map(|m| m.1).collect(),
        lengths: bucket.members.iter().map(|m| m.2).collect(),
    }
}

/// A model trained data-parallel over a [`ProcessGroup`], torch DDP's way: at the start every
/// rank checks that it has the same variables (names, shapes, dtypes, precisions) as rank 0
/// and takes rank 0's values of all of them, trainable and not (batch-norm statistics
/// included); before every step the gradients are averaged across ranks in a few flat
/// all-reduces per dtype ([buckets](Self::with_bucket_bytes), 25 MiB by default), so every rank
/// steps with the same gradients and stays bit-identical to the others.
///
/// Since the averaged gradients are the same bits on every rank, the router's checks give the
/// same verdict everywhere: a gradient with a NaN or an infinity on one rank is in the average
/// of all, and the step is refused on every rank or on none.
///
/// ```no_run
/// use caseopt::{case_optimizer, distributed::{DataParallel, Rendezvous}};
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// // ... build the model under vs.root() ...
/// let mut dp = DataParallel::new(Rendezvous::from_env()?.connect()?, &vs)?;
/// let mut opt = case_optimizer! { binary => Bop<threshold: 1e-6>, _ => Adam<lr: 0.01> }.build(&vs)?;
/// dp.check_router(&opt)?; // every rank routes the same way
/// # let loss = tch::Tensor::zeros([], (tch::Kind::Float, Device::Cpu));
/// // for each batch: this rank's share of it, then
/// dp.backward_step(&mut opt, &loss)?;
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
pub struct DataParallel {
    pub(super) group: ProcessGroup,
    pub(super) params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    pub(super) buckets: Vec<Bucket>,
    pub(super) flats: Vec<Tensor>,
    /// With ZeRO-1 ([`shard_optimizer_state`](Self::shard_optimizer_state)): each trainable
    /// variable's owner, and the buckets (with their owner) that carry the updated values.
    pub(super) sharding: Option<super::zero::Sharding>,
}

impl DataParallel {
    /// Joins the model in `vs` to the group: checks that every rank has the same variables
    /// (else [`DistributedError::Mismatch`] naming the first difference, on every rank) and
    /// copies rank 0's values of all of them to the others.
    pub fn new(group: ProcessGroup, vs: &nn::VarStore) -> Result<Self> {
        let params = trainable_vars(vs);
        let mut buffers: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| params.iter().all(|p| &p.info.name != name))
            .collect();
        buffers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut lines: Vec<String> = params
            .iter()
            .map(|p| {
                let i = &p.info;
                format!("trainable {} {:?} {:?} {} bits", i.name, i.shape, i.kind, i.bits)
            })
            .collect();
        lines.extend(
            buffers.iter().map(|(n, t)| format!("buffer {n} {:?} {:?}", t.size(), t.kind())),
        );
        group.agree("variable", &lines)?;
        for p in &params {
            check_communicable(&p.info.name, &p.tensor)?;
        }
        for (name, t) in &buffers {
            check_communicable(name, t)?;
        }
        let mut dp = DataParallel {
            group,
            params,
            buffers,
            buckets: Vec::new(),
            flats: Vec::new(),
            sharding: None,
        };
        dp.plan(DEFAULT_BUCKET_BYTES)?;
        dp.broadcast_variables()?;
        Ok(dp)
    }

    /// The same, with gradients grouped into buckets of at most `bytes` bytes (a variable
    /// larger than that travels alone). Fewer, larger buckets pay the collective's fixed cost
    /// fewer times; every rank must use the same size.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Result<Self> {
        self.plan(bytes.max(1))?;
        Ok(self)
    }

    fn plan(&mut self, cap: usize) -> Result<()> {
        let sizes: Vec<(Kind, i64)> =
            self.params.iter().map(|p| (p.info.kind, p.info.numel())).collect();
        self.buckets = buckets::plan(&sizes, cap);
        self.flats = self
            .buckets
            .iter()
            .map(|b| Tensor::f_zeros([b.len], (b.kind, Device::Cpu)))
            .collect::<std::result::Result<_, _>>()?;
        Ok(())
    }

    /// Copies rank 0's values of every variable, trainable and not, to every other rank (done
    /// by [`new`](Self::new); call it again after loading a checkpoint on rank 0 only).
    pub fn broadcast_variables(&self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let tensors: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .chain(self.buffers.iter().map(|(_, t)| t.shallow_clone()))
            .collect();
        self.group.broadcast(&tensors, 0)
    }

    /// Checks that every rank's router has the same rules (its fingerprint) and routes every
    /// variable to the same rule; else [`DistributedError::Mismatch`] on every rank.
    pub fn check_router<R: Router + ?Sized>(&self, router: &R) -> Result<()> {
        let mut lines = vec![format!(
            "rules {} (fingerprint {:016x})",
            router
                .rules()
                .iter()
                .map(|r| format!("{} => {}", r.predicate, r.optimizer))
                .collect::<Vec<_>>()
                .join(", "),
            router.fingerprint()
        )];
        lines.extend(router.routing_table().routes().iter().map(|r| {
            format!(
                "route {} {:?} {:?} {} bits -> rule {:?}",
                r.variable, r.shape, r.kind, r.bits, r.rule
            )
        }));
        self.group.agree("routing", &lines)
    }

    /// Replaces every trainable variable's gradient by its mean over the ranks.
    ///
    /// A variable without a gradient on every rank keeps none; one with a gradient on some
    /// ranks only is [`DistributedError::GradientPresence`] on every rank, with no gradient
    /// changed (torch's DDP requires the same: every rank computes every gradient).
    pub fn average_gradients(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Option<Tensor>> = self.params.iter().map(Param::grad).collect();
        let world = self.group.world_size();
        if world == 1 {
            return Ok(());
        }
        let presence: Vec<f32> =
            grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
        let counts = Tensor::from_slice(&presence);
        self.group.all_reduce_sum(&[counts.shallow_clone()])?;
        let counts = Vec::<f32>::try_from(&counts)?;
        for (p, &c) in self.params.iter().zip(&counts) {
            let with = c.round() as usize;
            if with != 0 && with != world {
                return Err(DistributedError::GradientPresence {
                    variable: p.info.name.clone(),
                    with,
                    world_size: world,
                }
                .into());
            }
        }
        for (bucket, flat) in self.buckets.iter().zip(&self.flats) {
            ffi::pack(flat, &members(bucket, &grads))?;
        }
        self.group.all_reduce_sum(&self.flats)?;
        for (bucket, flat) in self.buckets.iter().zip(&self.flats) {
            ffi::unpack(flat, &members(bucket, &grads), world as f64)?;
        }
        Ok(())
    }

    /// [`average_gradients`](Self::average_gradients), then the router's step (with ZeRO-1,
    /// each rank steps only the variables it owns and then sends their new values to the
    /// others).
    pub fn step<R: Router + ?Sized>(&mut self, router: &mut R) -> Result<()> {
        self.average_gradients()?;
        if self.sharding.is_some() {
            return self.step_sharded(router);
        }
        router.step()
    }

    /// The router's `zero_grad`, `loss.backward()`, then [`step`](Self::step).
    pub fn backward_step<R: Router + ?Sized>(
        &mut self,
        router: &mut R,
        loss: &Tensor,
    ) -> Result<()> {
        router.zero_grad();
        loss.f_backward()?;
        self.step(router)
    }

    /// The group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// Gives the group back (to build another `DataParallel` on it, e.g. for a new model).
    pub fn into_group(self) -> ProcessGroup {
        self.group
    }

    /// The number of all-reduces per step (one per bucket, plus one small one that checks
    /// which gradients exist) and the bytes each rank sends into them.
    pub fn traffic(&self) -> (usize, usize) {
        let bytes =
            self.buckets.iter().map(|b| b.len as usize * b.kind.elt_size_in_bytes()).sum::<usize>()
                + 4 * self.params.len();
        (self.buckets.len() + 1, bytes)
    }
}
