//! Data-parallel training: every rank holds the whole model, computes gradients on its share of
//! each batch, and the gradients are averaged before every rank takes the same step.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::router::Router;
use crate::var::{trainable_vars, trainable_vars_in, Param};

use super::agreement::{self, Description, GradientStatus};
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
/// Before every step, and before any collective of it, the ranks check that they are about to
/// do the same thing: the same variables, bucket plan and sharding, the same routing, rules,
/// hyperparameter values at the current step, execution settings, constraints and non-finite
/// policy, and gradients for the same variables, each of its variable's shape and dtype (one
/// 8-byte all-gather of a digest; the details are traded only when the digests differ). A
/// difference is an error on every rank, with nothing changed:
/// [`DistributedError::Mismatch`](crate::DistributedError::Mismatch) naming the first line that
/// differs, [`Error::GradientMismatch`](crate::Error::GradientMismatch) naming the variable and
/// the rank, or [`DistributedError::GradientPresence`](crate::DistributedError::GradientPresence).
///
/// A variable added to the `VarStore` after [`new`](Self::new) joins at the first step that
/// sees it, once every rank has it: it takes rank 0's value and its gradient is averaged from
/// then on (under ZeRO-1 it also gets an owner).
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
    bucket_bytes: usize,
    /// The `VarStore`'s variables, to find those added after `new`.
    store: Arc<Mutex<nn::Variables>>,
    /// The lengths of the store's trainable and named lists when last looked at.
    seen: (usize, usize),
}

/// Variables found in the store that this `DataParallel` does not have yet.
#[derive(Default)]
struct Found {
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    seen: (usize, usize),
}

fn lock(store: &Mutex<nn::Variables>) -> std::sync::MutexGuard<'_, nn::Variables> {
    match store.lock() {
        Ok(v) => v,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn buffer_line(name: &str, t: &Tensor) -> String {
    format!("buffer {name} {:?} {:?}", t.size(), t.kind())
}

/// Whether `p`'s gradient can go through the buckets planned for `p`'s recorded shape and
/// dtype (the shim copies that many elements), with the gradient when it can; `var_shape` and
/// `var_kind` are the variable's own now.
fn gradient_status(
    p: &Param,
    var_shape: &[i64],
    var_kind: Kind,
) -> (Option<Tensor>, GradientStatus) {
    let Some(g) = p.grad() else { return (None, GradientStatus::Absent) };
    let i = &p.info;
    let reason = if var_shape != i.shape.as_slice() || var_kind != i.kind {
        Some(format!(
            "the variable is now {var_shape:?} {var_kind:?}, {:?} {:?} when it joined the group",
            i.shape, i.kind
        ))
    } else if g.is_sparse() {
        Some("a sparse gradient (Gloo takes dense CPU tensors)".to_string())
    } else if g.device() != Device::Cpu {
        Some(format!("a gradient on {:?} (Gloo takes dense CPU tensors)", g.device()))
    } else if g.size() != i.shape {
        Some(format!("shape {:?} != {:?}", g.size(), i.shape))
    } else if g.kind() != i.kind {
        Some(format!("dtype {:?} != {:?}", g.kind(), i.kind))
    } else {
        None
    };
    match reason {
        Some(r) => (None, GradientStatus::Unfit(r)),
        None => (Some(g), GradientStatus::Present),
    }
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
        let store = vs.variables_.clone();
        let seen = {
            let vars = lock(&store);
            (vars.trainable_variables.len(), vars.named_variables.len())
        };
        let mut dp = DataParallel {
            group,
            params,
            buffers,
            buckets: Vec::new(),
            flats: Vec::new(),
            sharding: None,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            store,
            seen,
        };
        dp.plan(DEFAULT_BUCKET_BYTES)?;
        dp.broadcast_variables()?;
        Ok(dp)
    }

    /// The same, with gradients grouped into buckets of at most `bytes` bytes (a variable
    /// larger than that travels alone). Fewer, larger buckets pay the collective's fixed cost
    /// fewer times. Every rank must use the same size: a rank with another one is refused at
    /// the next step, on every rank, with
    /// [`DistributedError::Mismatch`](crate::DistributedError::Mismatch).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Result<Self> {
        self.bucket_bytes = bytes.max(1);
        self.plan(self.bucket_bytes)?;
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

    /// Checks that every rank's router has the same rules (its fingerprint), routes every
    /// variable to the same rule, and has the same hyperparameter values (at its current step),
    /// execution settings, constraints and non-finite policy; else
    /// [`DistributedError::Mismatch`](crate::DistributedError::Mismatch) naming the first
    /// difference, on every rank. [`step`](Self::step) checks the same before every step; this
    /// says so before the first one.
    pub fn check_router<R: Router + ?Sized>(&self, router: &R) -> Result<()> {
        self.group.agree("routing", &agreement::describe_router(router))
    }

    /// Replaces every trainable variable's gradient by its mean over the ranks.
    ///
    /// A variable without a gradient on every rank keeps none; one with a gradient on some
    /// ranks only is [`DistributedError::GradientPresence`](crate::DistributedError::GradientPresence)
    /// on every rank, and a gradient whose shape, dtype, device or layout is not its variable's
    /// is [`Error::GradientMismatch`](crate::Error::GradientMismatch) on every rank, with no
    /// gradient changed (torch's DDP requires the same: every rank computes every gradient).
    /// The ranks also check that they have the same variables and bucket plan (not the router:
    /// [`step`](Self::step) checks that too).
    pub fn average_gradients(&mut self) -> Result<()> {
        self.synchronise::<dyn Router>(None)
    }

    /// Finds new variables, agrees with the other ranks on the step (see the type's docs),
    /// takes in the new variables and averages the gradients.
    fn synchronise<R: Router + ?Sized>(&mut self, router: Option<&R>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let found = self.find_new_variables();
        let mut description = Description::default();
        let mut grads: Vec<Option<Tensor>> =
            Vec::with_capacity(self.params.len() + found.params.len());
        for p in self.params.iter().chain(&found.params) {
            let (shape, kind) = (p.tensor.size(), p.tensor.kind());
            let i = &p.info;
            description
                .config
                .push(format!("trainable {} {shape:?} {kind:?} {} bits", i.name, i.bits));
            let (g, status) = gradient_status(p, &shape, kind);
            grads.push(g);
            description.gradients.push((i.name.clone(), status));
        }
        description
            .config
            .extend(self.buffers.iter().chain(&found.buffers).map(|(n, t)| buffer_line(n, t)));
        description.config.push(format!(
            "buckets of at most {} bytes, ZeRO-1 {}",
            self.bucket_bytes,
            if self.sharding.is_some() { "on" } else { "off" }
        ));
        if let Some(router) = router {
            description.config.extend(agreement::describe_router(router));
        }
        let world = self.group.world_size();
        if world > 1 {
            let lines = description.lines();
            let digests = self.group.all_gather_i64(agreement::digest(&lines))?;
            if digests.iter().any(|&d| d != digests[0]) {
                let all = self.group.all_gather_bytes(lines.as_bytes())?;
                let all: Vec<String> =
                    all.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
                return Err(agreement::verdict(&all));
            }
        }
        // Every rank has the same statuses: a gradient that does not fit is refused everywhere.
        if let Some((variable, GradientStatus::Unfit(reason))) =
            description.gradients.iter().find(|(_, s)| matches!(s, GradientStatus::Unfit(_)))
        {
            return Err(Error::GradientMismatch {
                variable: variable.clone(),
                reason: reason.clone(),
            });
        }
        self.take_in(found)?;
        if world == 1 {
            return Ok(());
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

    /// Variables in the store that joined it after this `DataParallel` last looked.
    fn find_new_variables(&self) -> Found {
        let vars = lock(&self.store);
        let seen = (vars.trainable_variables.len(), vars.named_variables.len());
        if seen == self.seen {
            return Found { seen, ..Found::default() };
        }
        let known: HashSet<&str> = self
            .params
            .iter()
            .map(|p| p.info.name.as_str())
            .chain(self.buffers.iter().map(|(n, _)| n.as_str()))
            .collect();
        let params: Vec<Param> = trainable_vars_in(&vars)
            .into_iter()
            .filter(|p| !known.contains(p.info.name.as_str()))
            .collect();
        let trainable: HashSet<&str> = params.iter().map(|p| p.info.name.as_str()).collect();
        let mut buffers: Vec<(String, Tensor)> = vars
            .named_variables
            .iter()
            .filter(|(n, _)| !known.contains(n.as_str()) && !trainable.contains(n.as_str()))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        buffers.sort_by(|a, b| a.0.cmp(&b.0));
        Found { params, buffers, seen }
    }

    /// Makes the new variables part of the group (the ranks agreed they all have them): rank
    /// 0's values, a new bucket plan, and under ZeRO-1 owners for them.
    fn take_in(&mut self, found: Found) -> Result<()> {
        self.seen = found.seen;
        if found.params.is_empty() && found.buffers.is_empty() {
            return Ok(());
        }
        for p in &found.params {
            check_communicable(&p.info.name, &p.tensor)?;
        }
        for (name, t) in &found.buffers {
            check_communicable(name, t)?;
        }
        let tensors: Vec<Tensor> = found
            .params
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .chain(found.buffers.iter().map(|(_, t)| t.shallow_clone()))
            .collect();
        self.group.broadcast(&tensors, 0)?;
        let new_params = !found.params.is_empty();
        self.params.extend(found.params);
        self.buffers.extend(found.buffers);
        if new_params {
            self.plan(self.bucket_bytes)?;
            if let Some(sharding) = self.sharding.as_mut() {
                sharding.extend(&self.params, self.group.world_size())?;
            }
        }
        Ok(())
    }

    /// [`average_gradients`](Self::average_gradients), then the router's step (with ZeRO-1,
    /// each rank steps only the variables it owns and then sends their new values to the
    /// others).
    pub fn step<R: Router + ?Sized>(&mut self, router: &mut R) -> Result<()> {
        self.synchronise(Some(&*router))?;
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

    /// The number of collectives per step (an all-reduce per bucket, plus the 8-byte
    /// all-gather of the step's digest that the ranks agree on first) and the bytes each rank
    /// sends into them.
    pub fn traffic(&self) -> (usize, usize) {
        let bytes =
            self.buckets.iter().map(|b| b.len as usize * b.kind.elt_size_in_bytes()).sum::<usize>()
                + 8;
        (self.buckets.len() + 1, bytes)
    }
}
