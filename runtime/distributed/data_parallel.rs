//! Data-parallel training: every rank holds the whole model, computes gradients on its share of
//! each batch, and the gradients are averaged before every rank takes the same step.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::router::Router;
use crate::var::{trainable_vars, trainable_vars_in, Param};

use crate::kernels::metadata::{MetaReader, Status, TensorMeta};

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
    /// Each variable's line of the step's description while it keeps the shape and dtype it
    /// joined with (aligned with `params`).
    lines: Vec<String>,
    routing: agreement::RoutingLines,
    reader: MetaReader,
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

/// The variable's line of the step's description, from what it joined the group with.
fn variable_line(p: &Param) -> String {
    let i = &p.info;
    format!("trainable {} {:?} {:?} {} bits", i.name, i.shape, i.kind, i.bits)
}

/// Whether a tensor read as `m` is a readable CPU tensor of `p`'s recorded shape and dtype;
/// otherwise what it is instead.
fn differs(p: &Param, m: &TensorMeta) -> Option<String> {
    let i = &p.info;
    match m.status() {
        Status::Ok => {}
        Status::NotStrided => return Some("not a dense tensor".into()),
        other => return Some(format!("unreadable ({other:?})")),
    }
    if m.device() != Some(Device::Cpu) {
        Some(format!("on {:?} (Gloo takes CPU tensors)", m.device()))
    } else if m.shape() != i.shape.as_slice() {
        Some(format!("shape {:?} != {:?}", m.shape(), i.shape))
    } else if m.kind() != Some(i.kind) {
        Some(format!("dtype {:?} != {:?}", m.kind(), i.kind))
    } else {
        None
    }
}

impl DataParallel {
    /// Joins the model in `vs` to the group: checks that every rank has the same variables
    /// (else [`DistributedError::Mismatch`](crate::DistributedError::Mismatch) naming the first
    /// difference, on every rank) and copies rank 0's values of all of them to the others.
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
            lines: Vec::new(),
            routing: agreement::RoutingLines::default(),
            reader: MetaReader::default(),
        };
        dp.lines = dp.params.iter().map(variable_line).collect();
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
        self.group.agree("routing", &agreement::router_lines(router))
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
        let known = self.params.len();
        let mut fresh: Vec<String> = found.params.iter().map(variable_line).collect();
        let all: Vec<&Param> = self.params.iter().chain(&found.params).collect();
        // Every variable's and gradient's metadata in one foreign call (tch's accessors cost
        // a call each, which on thousands of variables was most of the step's agreement).
        let (metas, gradients) =
            self.reader.grads(all.iter().map(|p| &p.tensor), Default::default(), false);
        let mut changed: Vec<Option<String>> = Vec::with_capacity(all.len());
        for (k, (p, m)) in all.iter().zip(metas).enumerate() {
            let now = differs(p, m);
            match &now {
                None if k < known => description.line(&self.lines[k]),
                None => description.line(&fresh[k - known]),
                Some(what) => description.line(&format!(
                    "trainable {} {what} (joined as {:?} {:?})",
                    p.info.name, p.info.shape, p.info.kind
                )),
            }
            changed.push(now);
        }
        for (n, t) in self.buffers.iter().chain(&found.buffers) {
            description.line(&buffer_line(n, t));
        }
        description.line(&format!(
            "buckets of at most {} bytes, ZeRO-1 {}",
            self.bucket_bytes,
            if self.sharding.is_some() { "on" } else { "off" }
        ));
        if let Some(router) = router {
            agreement::describe_router(router, &mut self.routing, &mut description);
        }
        description.start_gradients();
        let grad_metas = self.reader.grad_metas();
        let mut unfit: Option<(String, String)> = None;
        let mut grads: Vec<Option<Tensor>> = Vec::with_capacity(all.len());
        for (k, (p, handle)) in all.iter().zip(gradients.handles).enumerate() {
            let status = match (handle.is_some(), &changed[k], grad_metas.get(k)) {
                (false, _, _) => GradientStatus::Absent,
                (true, Some(what), _) => {
                    GradientStatus::Unfit(format!("the variable is now {what}"))
                }
                (true, None, Some(m)) => match differs(p, m) {
                    Some(what) => GradientStatus::Unfit(what),
                    None => GradientStatus::Present,
                },
                (true, None, None) => GradientStatus::Unfit("unreadable".into()),
            };
            description.gradient(&p.info.name, &status);
            match &status {
                GradientStatus::Present => grads.push(handle),
                GradientStatus::Unfit(reason) => {
                    unfit.get_or_insert_with(|| (p.info.name.clone(), reason.clone()));
                    grads.push(None);
                }
                GradientStatus::Absent => grads.push(None),
            }
        }
        let world = self.group.world_size();
        if world > 1 {
            let lines = description.text();
            let digests = self.group.all_gather_i64(agreement::digest(lines))?;
            if digests.iter().any(|&d| d != digests[0]) {
                let all = self.group.all_gather_bytes(lines.as_bytes())?;
                let all: Vec<String> =
                    all.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
                return Err(agreement::verdict(&all));
            }
        }
        // Every rank has the same statuses: a gradient that does not fit is refused everywhere.
        if let Some((variable, reason)) = unfit {
            return Err(Error::GradientMismatch { variable, reason });
        }
        self.lines.append(&mut fresh);
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
