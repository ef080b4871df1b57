//! ZeRO stage 1 on a [`DataParallel`]: each rank keeps and updates the optimizer state of its
//! share of the variables only, then sends their new values to the others; checkpoints gather
//! every rank's state into one ordinary file on rank 0.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::error::{DistributedError, Result};
use crate::router::Router;
use crate::var::Param;

use super::buckets::{self, Bucket, DEFAULT_BUCKET_BYTES};
use super::data_parallel::{members, DataParallel};
use super::ffi;

/// Who owns what, and the flat buffers that carry each owner's updated variables.
#[derive(Debug)]
pub(crate) struct Sharding {
    /// Owner rank of each trainable variable (aligned with `DataParallel::params`).
    owners: Vec<usize>,
    by_name: HashMap<String, usize>,
    /// (owner, bucket over the variables it owns).
    buckets: Vec<(usize, Bucket)>,
    flats: Vec<Tensor>,
}

impl Sharding {
    fn owner(&self, variable: &str) -> Option<usize> {
        self.by_name.get(variable).map(|&i| self.owners[i])
    }

    /// Owners for `params`, balanced by bytes, and their buckets.
    fn new(params: &[Param], world: usize) -> Result<Self> {
        let owners = super::shard::partition(&bytes_of(params), world);
        let mut sharding =
            Sharding { owners, by_name: HashMap::new(), buckets: Vec::new(), flats: Vec::new() };
        sharding.lay_out(params, world)?;
        Ok(sharding)
    }

    /// Gives owners to the variables of `params` past those it knows (variables that joined
    /// after the start; every rank has the same ones): each, largest first, to the rank that
    /// owns the fewest bytes so far. The owners of the others do not change, since they hold
    /// those variables' optimizer state.
    pub(super) fn extend(&mut self, params: &[Param], world: usize) -> Result<()> {
        let bytes = bytes_of(params);
        let known = self.owners.len();
        let mut load = vec![0usize; world.max(1)];
        for (i, &owner) in self.owners.iter().enumerate() {
            load[owner] += bytes[i];
        }
        let mut new: Vec<usize> = (known..params.len()).collect();
        new.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
        self.owners.resize(params.len(), 0);
        for i in new {
            let lightest = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            self.owners[i] = lightest;
            load[lightest] += bytes[i];
        }
        self.lay_out(params, world)
    }

    /// The buckets that carry each owner's variables, from `owners`.
    fn lay_out(&mut self, params: &[Param], world: usize) -> Result<()> {
        let mut buckets = Vec::new();
        for owner in 0..world {
            let mine: Vec<usize> = (0..params.len()).filter(|&i| self.owners[i] == owner).collect();
            let sizes: Vec<(Kind, i64)> =
                mine.iter().map(|&i| (params[i].info.kind, params[i].info.numel())).collect();
            for mut bucket in buckets::plan(&sizes, DEFAULT_BUCKET_BYTES) {
                // Back from positions in `mine` to indices of `params`.
                for member in &mut bucket.members {
                    member.0 = mine[member.0];
                }
                buckets.push((owner, bucket));
            }
        }
        self.flats = buckets
            .iter()
            .map(|(_, b)| Tensor::f_zeros([b.len], (b.kind, Device::Cpu)))
            .collect::<std::result::Result<_, _>>()?;
        self.buckets = buckets;
        self.by_name = params.iter().enumerate().map(|(i, p)| (p.info.name.clone(), i)).collect();
        Ok(())
    }
}

/// For each variable (by index in `params`) that another rank owns and an optimizer that
/// counts flips trains: that optimizer's rule and the variable's index in it.
fn flip_counters<R: Router + ?Sized>(
    router: &mut R,
    rank: usize,
    sharding: &Sharding,
    params: &[Param],
) -> HashMap<usize, (usize, usize)> {
    let mut counted = HashMap::new();
    for rule in 0..router.rules().len() {
        let Some(opt) = router.optimizer_mut(rule) else { continue };
        // An index past its variables records nothing; the answer says whether it counts.
        if !opt.record_remote_flips(usize::MAX, 0) {
            continue;
        }
        for (index, p) in opt.params().iter().enumerate() {
            if let Some(&i) = sharding.by_name.get(&p.info.name) {
                if sharding.owners[i] != rank && i < params.len() {
                    counted.insert(i, (rule, index));
                }
            }
        }
    }
    counted
}

fn bytes_of(params: &[Param]) -> Vec<usize> {
    params
        .iter()
        .map(|p| p.info.numel().max(0) as usize * p.info.kind.elt_size_in_bytes())
        .collect()
}

impl DataParallel {
    /// Turns on ZeRO stage 1: the trainable variables are partitioned across the ranks,
    /// balanced by bytes (largest first, each to the rank with the fewest bytes so far), and
    /// each rank's router steps, and so keeps optimizer state for, only the variables it owns;
    /// after every step each owner broadcasts its variables' new values (in flat buckets per
    /// owner and dtype). Optimizer memory per rank is about 1/N of the whole (variables are not
    /// split, so one large variable can make its owner's share larger); the results are
    /// bit for bit those of the unsharded run, since each variable's update sees the same
    /// averaged gradient and state.
    ///
    /// The router must be built over all the variables as usual. A step whose averaged
    /// gradients hold a NaN or an infinity is handed to every rank's router whole, so that the
    /// non-finite policy gives the same verdict on every rank. Every rank must turn it on: a
    /// step with ZeRO-1 on some ranks only is refused on every rank with
    /// [`DistributedError::Mismatch`](crate::DistributedError::Mismatch). The router's
    /// [`flip_ratios`](crate::Router::flip_ratios) stay the whole run's on every rank: the
    /// flips of the variables another rank stepped are counted as their new values arrive.
    ///
    /// ```no_run
    /// # use caseopt::{case_optimizer, distributed::{DataParallel, Rendezvous}};
    /// # let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    /// let mut dp = DataParallel::new(Rendezvous::from_env()?.connect()?, &vs)?.shard_optimizer_state()?;
    /// # let mut opt = case_optimizer! { _ => Adam<lr: 1e-3> }.build(&vs)?;
    /// # let loss = tch::Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
    /// dp.backward_step(&mut opt, &loss)?; // Adam keeps moments only for this rank's share
    /// dp.save_training("run/ckpt.safetensors", &vs, &mut opt)?; // one file, written by rank 0
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn shard_optimizer_state(mut self) -> Result<Self> {
        self.sharding = Some(Sharding::new(&self.params, self.group.world_size())?);
        Ok(self)
    }

    /// Whether ZeRO-1 is on.
    pub fn is_sharded(&self) -> bool {
        self.sharding.is_some()
    }

    /// The rank that owns `variable`'s optimizer state under ZeRO-1 (`None` when unsharded or
    /// for a variable this `DataParallel` does not know).
    pub fn owner_of(&self, variable: &str) -> Option<usize> {
        self.sharding.as_ref()?.owner(variable)
    }

    pub(super) fn step_sharded<R: Router + ?Sized>(&mut self, router: &mut R) -> Result<()> {
        let rank = self.group.rank();
        let world = self.group.world_size();
        let _guard = tch::no_grad_guard();
        let mut finite = true;
        for flat in &self.flats {
            finite &= flat.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
        }
        let Some(sharding) = self.sharding.as_ref() else { return router.step() };
        // Hide the others' variables from the router for this step: it skips frozen ones.
        let mut hidden = Vec::new();
        if finite {
            for (p, &owner) in self.params.iter().zip(&sharding.owners) {
                if owner != rank && p.tensor.requires_grad() {
                    hidden.push(p.tensor.shallow_clone());
                }
            }
        }
        for t in &hidden {
            let _ = t.shallow_clone().f_requires_grad_(false)?;
        }
        let result = router.step();
        for t in &hidden {
            let _ = t.shallow_clone().f_requires_grad_(true)?;
        }
        // The verdicts must agree before anyone sends values: a rank whose step was refused
        // has changed nothing, and the others must not have changed anything either.
        let failed = Tensor::from_slice(&[f32::from(u8::from(result.is_err()))]);
        self.group.all_reduce_sum(&[failed.shallow_clone()])?;
        let failures = failed.double_value(&[0]).round() as usize;
        if failures != 0 && failures != world {
            return Err(DistributedError::Mismatch {
                rank: if result.is_err() { rank } else { 0 },
                what: format!(
                    "the step was refused on {failures} of {world} ranks and taken on the others{}",
                    result.as_ref().err().map(|e| format!(" (here: {e})")).unwrap_or_default()
                ),
            }
            .into());
        }
        result?;
        if !finite {
            // Every rank stepped every variable (and refused or skipped alike): nothing to send.
            return Ok(());
        }
        let values: Vec<Option<Tensor>> =
            self.params.iter().map(|p| Some(p.tensor.shallow_clone())).collect();
        for ((owner, bucket), flat) in sharding.buckets.iter().zip(&sharding.flats) {
            if *owner == rank {
                ffi::pack(flat, &members(bucket, &values))?;
            }
        }
        for owner in 0..world {
            let theirs: Vec<Tensor> = sharding
                .buckets
                .iter()
                .zip(&sharding.flats)
                .filter(|((o, _), _)| *o == owner)
                .map(|(_, f)| f.shallow_clone())
                .collect();
            if !theirs.is_empty() {
                self.group.broadcast(&theirs, owner)?;
            }
        }
        let counted = flip_counters(router, rank, sharding, &self.params);
        let mut remote_flips = Vec::new();
        for ((owner, bucket), flat) in sharding.buckets.iter().zip(&sharding.flats) {
            if *owner != rank {
                // The flips of the binary variables another rank stepped, counted as their new
                // values arrive (Bop's own rule: `w * new < 0`), so that every rank's flip
                // ratios are the whole run's.
                for &(i, offset, length) in &bucket.members {
                    if let Some(&(rule, index)) = counted.get(&i) {
                        let new = flat.f_narrow(0, offset, length)?;
                        let old = self.params[i].tensor.f_reshape([-1])?;
                        let n =
                            old.f_mul(&new)?.f_lt(0.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                        remote_flips.push((rule, index, u64::try_from(n).unwrap_or(0)));
                    }
                }
                // Division by 1 is exact: the owner's bits.
                ffi::unpack(flat, &members(bucket, &values), 1.0)?;
            }
        }
        for (rule, index, n) in remote_flips {
            if let Some(opt) = router.optimizer_mut(rule) {
                opt.record_remote_flips(index, n);
            }
        }
        Ok(())
    }

    /// Writes one checkpoint of the model and the router, as
    /// [`save_training`](crate::save_training) would for the whole run, from rank 0. Under
    /// ZeRO-1 every rank sends its share of the optimizer state to rank 0 first, and rank 0
    /// drops the others' state again once the file is written; the file is an ordinary
    /// checkpoint, which loads into an unsharded router as well. Every rank must call it.
    pub fn save_training<R: Router + ?Sized>(
        &self,
        path: impl AsRef<Path>,
        vs: &nn::VarStore,
        router: &mut R,
    ) -> Result<()> {
        let rank = self.group.rank();
        let Some(sharding) = &self.sharding else {
            return if rank == 0 { crate::save_training(path, vs, router) } else { Ok(()) };
        };
        // This rank's owned state, as named tensors `<rule>/<index>/<state>`.
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for rule in 0..router.rules().len() {
            let Some(opt) = router.optimizer(rule) else { continue };
            for (i, p) in opt.params().iter().enumerate() {
                if sharding.owner(&p.info.name).unwrap_or(0) == rank {
                    for (state, t) in opt.state(i) {
                        named.push((format!("{rule}/{i}/{state}"), t.f_contiguous()?));
                    }
                }
            }
        }
        let mut blob = Vec::new();
        if !named.is_empty() {
            Tensor::save_multi_to_stream(&named, &mut blob)?;
        }
        let blobs = self.group.all_gather_bytes(&blob)?;
        if rank != 0 {
            return Ok(());
        }
        let mut installed: Vec<(usize, usize)> = Vec::new();
        let mut result = Ok(());
        for (from, blob) in blobs.iter().enumerate().skip(1) {
            if blob.is_empty() {
                continue;
            }
            let tensors = Tensor::load_multi_from_stream(Cursor::new(blob))?;
            let mut grouped: HashMap<(usize, usize), Vec<(String, Tensor)>> = HashMap::new();
            for (key, t) in tensors {
                let mut parts = key.splitn(3, '/');
                let (Some(rule), Some(index), Some(state)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(DistributedError::Failed {
                        operation: "gathering optimizer state",
                        message: format!("rank {from} sent a malformed key `{key}`"),
                    }
                    .into());
                };
                let rule: usize = rule.parse().unwrap_or(usize::MAX);
                let index: usize = index.parse().unwrap_or(usize::MAX);
                grouped.entry((rule, index)).or_default().push((state.to_string(), t));
            }
            for ((rule, index), state) in grouped {
                let Some(opt) = router.optimizer_mut(rule) else { continue };
                if let Err(e) = opt.set_state(index, state) {
                    result = Err(e);
                    break;
                }
                installed.push((rule, index));
            }
        }
        if result.is_ok() {
            result = crate::save_training(path, vs, router);
        }
        // Back to this rank's share, whatever happened.
        for (rule, index) in installed {
            if let Some(opt) = router.optimizer_mut(rule) {
                let _ = opt.set_state(index, Vec::new());
            }
        }
        result
    }

    /// Loads a checkpoint written by [`save_training`](Self::save_training) (or by
    /// [`crate::save_training`] in a run of any world size) on every rank, from the same path
    /// (a file every rank can read); under ZeRO-1 each rank then drops the state of the
    /// variables it does not own. Every rank must call it.
    pub fn load_training<R: Router + ?Sized>(
        &self,
        path: impl AsRef<Path>,
        vs: &nn::VarStore,
        router: &mut R,
    ) -> Result<()> {
        crate::load_training(path, vs, router)?;
        let Some(sharding) = &self.sharding else { return Ok(()) };
        let rank = self.group.rank();
        for rule in 0..router.rules().len() {
            let Some(opt) = router.optimizer_mut(rule) else { continue };
            let others: Vec<usize> = opt
                .params()
                .iter()
                .enumerate()
                .filter(|(_, p)| sharding.owner(&p.info.name).is_some_and(|o| o != rank))
                .map(|(i, _)| i)
                .collect();
            for i in others {
                opt.set_state(i, Vec::new())?;
            }
        }
        Ok(())
    }

    /// Bytes of optimizer state this rank's router holds (to see ZeRO-1's saving).
    pub fn optimizer_state_bytes<R: Router + ?Sized>(router: &R) -> usize {
        let mut bytes = 0;
        for rule in 0..router.rules().len() {
            if let Some(opt) = router.optimizer(rule) {
                for i in 0..opt.params().len() {
                    bytes += opt
                        .state(i)
                        .iter()
                        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
                        .sum::<usize>();
                }
            }
        }
        bytes
    }
}
