//! Loss scaling for mixed-precision training: [`GradScaler`], torch.amp.GradScaler for routers.
//!
//! The scaler multiplies the loss by a large factor so that small f16/bf16 gradients do not
//! flush to zero, divides the router's gradients by it again before the step (one
//! multi-tensor pass per device and dtype, ATen's `_amp_foreach_non_finite_check_and_unscale_`),
//! skips the whole step when any gradient overflowed and adapts the factor
//! (`_amp_update_scale_`). What matches torch, what is refused and why:
//! docs/mixed-precision.md.
//!
//! [`Autocast`] is torch.autocast for CPU and CUDA alike: within it, ATen runs the ops of its
//! autocast lists (convolutions, matrix products) in bfloat16 or float16 and the
//! precision-sensitive ones (losses, reductions) in f32, while the variables stay what they are.

use std::marker::PhantomData;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, ScalerError};
use crate::kernels::amp;
use crate::router::scaled;
use crate::router::{Router, RouterParts};

/// A [`GradScaler`]'s configuration: torch.amp.GradScaler's arguments and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerConfig {
    /// The scale the first [`scale`](GradScaler::scale) uses (stored as f32; finite and above
    /// zero). Default 2^16.
    pub init_scale: f64,
    /// The factor the scale grows by after `growth_interval` clean steps in a row (finite,
    /// above 1). Default 2.
    pub growth_factor: f64,
    /// The factor the scale backs off by after a skipped step (in (0, 1)). Default 0.5.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows (1 to 2^31 - 1). Default 2000.
    pub growth_interval: u32,
    /// `false` makes every call a pass-through: `scale` returns the loss, `step` is the
    /// router's step, `unscale` and `update` do nothing. Default `true`.
    pub enabled: bool,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            enabled: true,
        }
    }
}

/// A [`GradScaler`]'s state, for a checkpoint: what torch's `state_dict()` holds (the scale,
/// the growth tracker and the three factors), as plain values. Read it after
/// [`update`](GradScaler::update), as torch advises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerState {
    /// The current scale (the f32 the scaler multiplies by).
    pub scale: f32,
    /// Clean steps in a row since the scale last changed.
    pub growth_tracker: i32,
    /// See [`GradScalerConfig::growth_factor`].
    pub growth_factor: f64,
    /// See [`GradScalerConfig::backoff_factor`].
    pub backoff_factor: f64,
    /// See [`GradScalerConfig::growth_interval`].
    pub growth_interval: u32,
}

/// What [`GradScaler::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaledStep {
    /// Every gradient was finite: the router stepped.
    Stepped,
    /// Some gradient held NaN or infinity: the router did not step (no parameter, optimizer
    /// state or step count moved), and the next [`update`](GradScaler::update) backs off.
    Skipped,
}

/// Where the scaler is within one training step (torch's per-optimizer `OptState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ready,
    Unscaled,
    Stepped,
}

/// This step's verdict, found by `unscale`.
#[derive(Debug)]
struct Verdict {
    /// Non-zero when some gradient was non-finite, on the scale's device (what
    /// `_amp_update_scale_` reads).
    found_inf: Tensor,
    /// The same, read on the host.
    non_finite: bool,
    /// The scale the gradients were divided by, read with `non_finite`.
    scale: f32,
}

/// torch.amp.GradScaler for a router built by `case_optimizer!`: scale the loss, then
/// [`step`](Self::step) the router through the scaler, then [`update`](Self::update).
///
/// `step` divides every gradient the router's step uses by the scale in one pass per device
/// and dtype, and steps the router only when all of them are finite; otherwise the whole step
/// is skipped (nothing moves, step counts stay) and `update` halves the scale. After
/// `growth_interval` clean steps in a row the scale doubles. Each step reads the host once (the
/// verdict, counted by [`host_reads`](Self::host_reads)). To clip, unscale first, as in torch:
/// `unscale`, then [`Router::clip_grad_norm`], then `step` (which does not unscale again).
///
/// Calls out of order, a second router within one step, float16 gradients and a scale that
/// would back off to zero are [`ScalerError`]s that change nothing.
///
/// ```
/// use caseopt::{case_optimizer, GradScaler, GradScalerConfig, Router, ScaledStep};
/// use tch::{nn, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let w = vs.root().ones("w", &[2]);
/// let mut opt = case_optimizer! { _ => Sgd<lr: 0.5> }.build(&vs)?;
/// let mut scaler = GradScaler::new(GradScalerConfig { growth_interval: 1, ..Default::default() })?;
///
/// let loss = (&w * Tensor::from_slice(&[1.0f32, -1.0])).sum(Kind::Float);
/// opt.zero_grad();
/// scaler.scale(&loss)?.backward(); // gradients are 65536 * [1, -1]
/// assert_eq!(scaler.step(&mut opt)?, ScaledStep::Stepped); // unscaled to [1, -1], stepped
/// scaler.update()?; // a clean step: with growth_interval 1, the scale doubles
/// assert_eq!(Vec::<f32>::try_from(&w)?, [0.5, 1.5]);
/// assert_eq!(scaler.scale_factor()?, 131072.0);
///
/// let loss = (&w * Tensor::from_slice(&[f32::INFINITY, 1.0])).sum(Kind::Float);
/// opt.zero_grad();
/// scaler.scale(&loss)?.backward();
/// assert_eq!(scaler.step(&mut opt)?, ScaledStep::Skipped); // nothing moved
/// scaler.update()?; // the scale backs off
/// assert_eq!((opt.step_counts(), scaler.scale_factor()?), (vec![1], 65536.0));
/// assert_eq!(Vec::<f32>::try_from(&w)?, [0.5, 1.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    /// The scale before the first `scale` places it on a device (or a state loaded then).
    init_scale: f32,
    init_growth_tracker: i32,
    /// The scale (f32) and the growth tracker (i32), zero-dimensional, on the first loss's
    /// device.
    tensors: Option<(Tensor, Tensor)>,
    stage: Stage,
    /// The router this step belongs to, from its first `unscale` to `update`.
    router: Option<u64>,
    verdict: Option<Verdict>,
    skipped_steps: u64,
    skipped_in_a_row: u64,
    host_reads: u64,
}

impl Default for GradScaler {
    /// torch's defaults ([`GradScalerConfig::default`]).
    fn default() -> Self {
        Self::new(GradScalerConfig::default()).expect("the default configuration is valid")
    }
}

/// `Err` naming `name` unless `ok`.
fn require(ok: bool, name: &'static str, value: f64, expected: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ScalerError::InvalidConfig { name, value, expected }.into())
    }
}

/// A scale the scaler can multiply by: finite and above zero once stored as f32.
fn check_scale(name: &'static str, value: f64) -> Result<f32> {
    let stored = value as f32;
    require(stored.is_finite() && stored > 0.0, name, value, "finite and above zero as an f32")?;
    Ok(stored)
}

fn check_factors(growth_factor: f64, backoff_factor: f64, growth_interval: u32) -> Result<()> {
    require(
        growth_factor.is_finite() && growth_factor > 1.0,
        "growth_factor",
        growth_factor,
        "finite and above 1",
    )?;
    require(
        backoff_factor > 0.0 && backoff_factor < 1.0,
        "backoff_factor",
        backoff_factor,
        "in (0, 1)",
    )?;
    require(
        growth_interval >= 1 && i32::try_from(growth_interval).is_ok(),
        "growth_interval",
        f64::from(growth_interval),
        "1 to 2^31 - 1",
    )
}

impl GradScaler {
    /// A scaler with `config`; fails with [`ScalerError::InvalidConfig`] for a growth factor
    /// not above 1 or a backoff factor not below 1 (as torch asserts), and for what torch lets
    /// through but cannot work: an initial scale that is not a positive finite f32, a backoff
    /// factor not above 0, a growth interval of 0. A disabled scaler checks nothing.
    ///
    /// ```
    /// use caseopt::{GradScaler, GradScalerConfig};
    /// let bad = GradScalerConfig { backoff_factor: 1.0, ..Default::default() };
    /// assert!(GradScaler::new(bad).is_err());
    /// assert!(GradScaler::new(GradScalerConfig { enabled: false, ..bad }).is_ok());
    /// ```
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        let mut init_scale = 1.0;
        if config.enabled {
            check_factors(config.growth_factor, config.backoff_factor, config.growth_interval)?;
            init_scale = check_scale("init_scale", config.init_scale)?;
        }
        Ok(GradScaler {
            config,
            init_scale,
            init_growth_tracker: 0,
            tensors: None,
            stage: Stage::Ready,
            router: None,
            verdict: None,
            skipped_steps: 0,
            skipped_in_a_row: 0,
            host_reads: 0,
        })
    }

    /// The configuration (its factors as last loaded by [`load_state`](Self::load_state)).
    pub fn config(&self) -> GradScalerConfig {
        self.config
    }

    /// Whether the scaler is enabled.
    pub fn is_enabled(&self) -> bool {
        self.config.enabled
    }

    /// `loss` times the scale (torch's `scale`: the product with the f32 scale, moved to the
    /// loss's device). The first call places the scale on the loss's device. Disabled: `loss`
    /// itself. Reads nothing on the host: a NaN or infinite loss is found in the gradients it
    /// makes, and skips that step.
    pub fn scale(&mut self, loss: &Tensor) -> Result<Tensor> {
        if !self.config.enabled {
            return Ok(loss.shallow_clone());
        }
        let device = loss.device();
        let (scale, _) = self.tensors_on(device)?;
        let scale =
            if scale.device() == device { scale.shallow_clone() } else { scale.f_to(device)? };
        Ok(loss.f_mul(&scale)?)
    }

    /// The scale and the growth tracker, made on `device` at the first call.
    fn tensors_on(&mut self, device: Device) -> Result<&(Tensor, Tensor)> {
        if self.tensors.is_none() {
            let scale = Tensor::f_full([], f64::from(self.init_scale), (Kind::Float, device))?;
            let tracker =
                Tensor::f_full([], i64::from(self.init_growth_tracker), (Kind::Int, device))?;
            self.tensors = Some((scale, tracker));
        }
        Ok(self.tensors.as_ref().expect("just made"))
    }

    /// Refuses a call that belongs to another router than this step's.
    fn check_router<R: RouterParts>(&self, router: &R) -> Result<()> {
        match self.router {
            Some(id) if id != scaled::router_id(router) => Err(ScalerError::OtherRouter.into()),
            _ => Ok(()),
        }
    }

    /// Divides every gradient `router`'s next step uses by the scale, in place, in one pass
    /// per (device, dtype), and finds whether any of them holds NaN or infinity (one host
    /// read). Returns `true` when all are finite, i.e. when [`step`](Self::step) will step the
    /// router. Call it before [`Router::clip_grad_norm`] so that the norm is the true one; it is
    /// then `step` that does not unscale again.
    ///
    /// The gradients are the step's: variables added to the `VarStore` since the last step are
    /// routed first, frozen ones and ones without a gradient are left alone.
    ///
    /// Fails, changing nothing, with [`ScalerError::AlreadyUnscaled`] or
    /// [`ScalerError::UnscaleAfterStep`] before the next [`update`](Self::update),
    /// [`ScalerError::OtherRouter`] when this step belongs to another router,
    /// [`ScalerError::NotInitialised`] before any [`scale`](Self::scale),
    /// [`ScalerError::NoGradients`] and [`ScalerError::HalfGradient`]. Disabled: `Ok(true)`.
    pub fn unscale<R: RouterParts>(&mut self, router: &mut R) -> Result<bool> {
        if !self.config.enabled {
            return Ok(true);
        }
        self.check_router(router)?;
        match self.stage {
            Stage::Unscaled => return Err(ScalerError::AlreadyUnscaled.into()),
            Stage::Stepped => return Err(ScalerError::UnscaleAfterStep.into()),
            Stage::Ready => {}
        }
        let scale = match &self.tensors {
            Some((scale, _)) => scale.shallow_clone(),
            None => return Err(ScalerError::NotInitialised { call: "unscale" }.into()),
        };
        let grads = scaled::step_gradients(router)?;
        if grads.is_empty() {
            return Err(ScalerError::NoGradients.into());
        }
        if let Some((name, _)) = grads.iter().find(|(_, g)| g.kind() == Kind::Half) {
            return Err(ScalerError::HalfGradient { variable: name.clone() }.into());
        }
        let _guard = tch::no_grad_guard();
        // torch computes the reciprocal in f64: an f32 division may be imprecise.
        let inv_scale = scale.f_to_kind(Kind::Double)?.f_reciprocal()?.f_to_kind(Kind::Float)?;
        // One flag per device, shared by that device's dtypes, as torch replicates it.
        let mut per_device: Vec<(Device, Tensor, Tensor)> = Vec::new();
        let mut groups: Vec<((Device, Kind), Vec<Tensor>)> = Vec::new();
        for (_, g) in grads {
            let key = (g.device(), g.kind());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(g),
                None => groups.push((key, vec![g])),
            }
        }
        for ((device, _), mut list) in groups {
            let at = match per_device.iter().position(|(d, _, _)| *d == device) {
                Some(at) => at,
                None => {
                    let found = Tensor::f_zeros([], (Kind::Float, device))?;
                    let inv = inv_scale.f_to(device)?;
                    per_device.push((device, found, inv));
                    per_device.len() - 1
                }
            };
            let (_, found, inv) = &mut per_device[at];
            amp::unscale_(&mut list, found, inv)?;
        }
        let scale_device = scale.device();
        let mut found_inf: Option<Tensor> = None;
        for (_, found, _) in per_device {
            let found = found.f_to(scale_device)?;
            found_inf = Some(match found_inf {
                None => found,
                Some(sum) => sum.f_add(&found)?,
            });
        }
        let found_inf = found_inf.expect("at least one gradient");
        // The step's one host read: the verdict, with the scale it was reached at (which
        // `update` needs to refuse a backoff to zero without reading again).
        let both = Tensor::f_stack(&[found_inf.shallow_clone(), scale.shallow_clone()], 0)?;
        let host = Vec::<f32>::try_from(&both)?;
        self.host_reads += 1;
        let non_finite = host[0] != 0.0;
        self.verdict = Some(Verdict { found_inf, non_finite, scale: host[1] });
        self.stage = Stage::Unscaled;
        self.router = Some(scaled::router_id(router));
        Ok(!non_finite)
    }

    /// Unscales `router`'s gradients unless [`unscale`](Self::unscale) already did in this
    /// step, then steps the router if every gradient is finite; otherwise skips the whole step
    /// (no parameter, optimizer state or step count moves) and returns
    /// [`ScaledStep::Skipped`]. Stepping on a clean verdict skips the router's own
    /// [`NonFinitePolicy`](crate::NonFinitePolicy) search, which could find nothing new.
    ///
    /// Fails with [`ScalerError::AlreadyStepped`] before the next [`update`](Self::update),
    /// with [`unscale`](Self::unscale)'s errors, and with the router's step's (after which the
    /// gradients stay unscaled and `step` may be called again). Disabled: the router's step.
    pub fn step<R: RouterParts>(&mut self, router: &mut R) -> Result<ScaledStep> {
        if !self.config.enabled {
            Router::step(router)?;
            return Ok(ScaledStep::Stepped);
        }
        self.check_router(router)?;
        match self.stage {
            Stage::Stepped => return Err(ScalerError::AlreadyStepped.into()),
            Stage::Ready if self.tensors.is_none() => {
                return Err(ScalerError::NotInitialised { call: "step" }.into())
            }
            Stage::Ready => {
                self.unscale(router)?;
            }
            Stage::Unscaled => {}
        }
        let non_finite = self.verdict.as_ref().is_some_and(|v| v.non_finite);
        if non_finite {
            self.stage = Stage::Stepped;
            self.skipped_steps += 1;
            return Ok(ScaledStep::Skipped);
        }
        scaled::step_finite(router)?;
        self.stage = Stage::Stepped;
        Ok(ScaledStep::Stepped)
    }

    /// Ends the step: backs the scale off by `backoff_factor` if the step was skipped (and
    /// resets the growth tracker), else counts a clean step and multiplies the scale by
    /// `growth_factor` after `growth_interval` of them in a row (unless that product is not a
    /// finite f32: then the scale stays, as in torch). No host read.
    ///
    /// Fails, changing nothing, with [`ScalerError::NothingToUpdate`] when no
    /// [`step`](Self::step) or [`unscale`](Self::unscale) came since the last update, and with
    /// [`ScalerError::ScaleUnderflow`] when the backoff would bring the scale to zero (set one
    /// with [`update_to`](Self::update_to) or [`load_state`](Self::load_state) to go on).
    /// Disabled: nothing.
    pub fn update(&mut self) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let Some((scale, tracker)) = &mut self.tensors else {
            return Err(ScalerError::NotInitialised { call: "update" }.into());
        };
        let Some(verdict) = &self.verdict else {
            return Err(ScalerError::NothingToUpdate.into());
        };
        let GradScalerConfig { growth_factor, backoff_factor, growth_interval, .. } = self.config;
        // `_amp_update_scale_` computes `scale * backoff` in double and stores it as float:
        // the same product here says whether that store would be zero.
        if verdict.non_finite && (f64::from(verdict.scale) * backoff_factor) as f32 == 0.0 {
            return Err(ScalerError::ScaleUnderflow {
                scale: verdict.scale,
                skipped: self.skipped_in_a_row + 1,
            }
            .into());
        }
        amp::update_scale_(
            scale,
            tracker,
            &verdict.found_inf,
            growth_factor,
            backoff_factor,
            i64::from(growth_interval),
        )?;
        self.skipped_in_a_row = if verdict.non_finite { self.skipped_in_a_row + 1 } else { 0 };
        self.finish_step();
        Ok(())
    }

    /// Ends the step as [`update`](Self::update) does, but sets the scale to `new_scale`
    /// instead of adapting it (torch's `update(new_scale)`; the growth tracker is kept). Unlike
    /// `update`, it needs no step since the last update. Fails, changing nothing, with
    /// [`ScalerError::InvalidConfig`] for a scale that is not a positive finite f32.
    pub fn update_to(&mut self, new_scale: f64) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let value = check_scale("new_scale", new_scale)?;
        match &mut self.tensors {
            Some((scale, _)) => {
                let _ = scale.f_fill_(f64::from(value))?;
            }
            None => self.init_scale = value,
        }
        self.skipped_in_a_row = 0;
        self.finish_step();
        Ok(())
    }

    fn finish_step(&mut self) {
        self.stage = Stage::Ready;
        self.router = None;
        self.verdict = None;
    }

    /// The current scale (torch's `get_scale`; 1 when disabled). Reads the host once when the
    /// scale is on a device: not for the training loop.
    pub fn scale_factor(&self) -> Result<f64> {
        if !self.config.enabled {
            return Ok(1.0);
        }
        match &self.tensors {
            Some((scale, _)) => Ok(scale.f_double_value(&[])?),
            None => Ok(f64::from(self.init_scale)),
        }
    }

    /// Clean steps in a row since the scale last changed (torch's `_get_growth_tracker`).
    pub fn growth_tracker(&self) -> Result<i64> {
        match &self.tensors {
            Some((_, tracker)) => Ok(tracker.f_int64_value(&[])?),
            None => Ok(i64::from(self.init_growth_tracker)),
        }
    }

    /// Steps [`step`](Self::step) skipped so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// How many times this scaler's training calls (`scale`, `unscale`, `step`, `update`) have
    /// read a value from the scale's device on the host: one per step, in `unscale` (or the
    /// `step` that unscales). [`scale_factor`](Self::scale_factor),
    /// [`growth_tracker`](Self::growth_tracker) and [`state`](Self::state) read too and are not
    /// counted; nor are the router's own reads.
    pub fn host_reads(&self) -> u64 {
        self.host_reads
    }

    /// The state to checkpoint (torch's `state_dict`), read on the host.
    pub fn state(&self) -> Result<GradScalerState> {
        let (scale, growth_tracker) = match &self.tensors {
            Some((scale, tracker)) => {
                (scale.f_double_value(&[])? as f32, tracker.f_int64_value(&[])? as i32)
            }
            None => (self.init_scale, self.init_growth_tracker),
        };
        Ok(GradScalerState {
            scale,
            growth_tracker,
            growth_factor: self.config.growth_factor,
            backoff_factor: self.config.backoff_factor,
            growth_interval: self.config.growth_interval,
        })
    }

    /// Checks a state as [`load_state`](Self::load_state) does, returning its scale.
    pub(crate) fn check_state(state: &GradScalerState) -> Result<f32> {
        let scale = check_scale("scale", f64::from(state.scale))?;
        check_factors(state.growth_factor, state.backoff_factor, state.growth_interval)?;
        require(
            state.growth_tracker >= 0,
            "growth_tracker",
            f64::from(state.growth_tracker),
            ">= 0",
        )?;
        Ok(scale)
    }

    /// Refuses `call` unless the scaler is between two steps (no `unscale` or `step` since the
    /// last `update`): what a checkpoint holds is the state between steps.
    pub(crate) fn check_between_steps(&self, call: &'static str) -> Result<()> {
        if self.stage == Stage::Ready && self.verdict.is_none() {
            Ok(())
        } else {
            Err(ScalerError::MidStep { call }.into())
        }
    }

    /// Restores a [`state`](Self::state) (torch's `load_state_dict`): the scale, the tracker
    /// and the factors. Fails, changing nothing, with [`ScalerError::InvalidConfig`] for a
    /// value [`new`](Self::new) would refuse or a negative tracker. Disabled: nothing, as in
    /// torch.
    ///
    /// ```
    /// use caseopt::GradScaler;
    /// let mut a = GradScaler::default();
    /// let mut state = a.state()?;
    /// state.scale = 1024.0;
    /// let mut b = GradScaler::default();
    /// b.load_state(&state)?;
    /// assert_eq!(b.state()?, state);
    /// state.scale = f32::INFINITY;
    /// assert!(b.load_state(&state).is_err());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn load_state(&mut self, state: &GradScalerState) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let scale = Self::check_state(state)?;
        match &mut self.tensors {
            Some((s, t)) => {
                let _ = s.f_fill_(f64::from(scale))?;
                let _ = t.f_fill_(i64::from(state.growth_tracker))?;
            }
            None => {
                self.init_scale = scale;
                self.init_growth_tracker = state.growth_tracker;
            }
        }
        if let Some(verdict) = &mut self.verdict {
            verdict.scale = scale;
        }
        self.config.growth_factor = state.growth_factor;
        self.config.backoff_factor = state.backoff_factor;
        self.config.growth_interval = state.growth_interval;
        Ok(())
    }
}

/// torch.autocast for one device, on the current thread, until dropped: the ops of ATen's
/// autocast lists (convolutions, `linear`, matrix products) run in `kind` (bfloat16 or float16),
/// the precision-sensitive ones (losses, `softmax`, norms of the fp32 list) in f32; the
/// variables themselves keep their dtype, and so do their gradients. Dropping it leaves the
/// region as torch.autocast's `__exit__` does: the cache of casted weights is cleared when the
/// outermost region ends, and the previous setting is restored. Enter one per forward pass (the
/// cache holds the weights' casts: a region kept across an optimizer's step would reuse stale
/// ones). The backward pass needs no region: it runs in the dtypes the forward pass chose.
///
/// tch's own `tch::autocast` switches CUDA's autocast only; this one switches CPU's too
/// (`at::autocast::set_autocast_enabled(at::kCPU, ..)` through caseopt's shim). CPU autocast
/// runs in bfloat16 (float16 too, where the CPU kernels have it); bfloat16 has f32's exponent
/// range, so its gradients need no [`GradScaler`] (float16's do).
///
/// ```
/// use caseopt::amp::Autocast;
/// use tch::{Device, Kind, Tensor};
///
/// let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
/// let w = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
/// {
///     let _region = Autocast::enter(Device::Cpu, Kind::BFloat16)?;
///     assert!(Autocast::is_enabled(Device::Cpu)?);
///     assert_eq!(x.linear::<Tensor>(&w, None).kind(), Kind::BFloat16); // on the autocast list
///     assert_eq!(x.sum(Kind::Float).kind(), Kind::Float);
/// }
/// assert!(!Autocast::is_enabled(Device::Cpu)?);
/// assert_eq!(x.linear::<Tensor>(&w, None).kind(), Kind::Float);
/// assert!(Autocast::enter(Device::Cpu, Kind::Double).is_err());
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "autocast ends when the guard is dropped"]
pub struct Autocast {
    device_type: i32,
    previous_enabled: i32,
    previous_dtype: i32,
    /// Autocast's setting is per thread: the guard stays on the thread that entered.
    _thread: PhantomData<*const ()>,
}

impl Autocast {
    fn device_type(device: Device) -> Result<i32> {
        match device {
            Device::Cpu => Ok(amp::DEVICE_CPU),
            Device::Cuda(_) => Ok(amp::DEVICE_CUDA),
            other => Err(Error::Autocast(format!("no autocast for device {other:?}"))),
        }
    }

    /// Turns autocast on for `device`'s type (CPU, or CUDA) in `kind` (`Kind::BFloat16` or
    /// `Kind::Half`) until the guard is dropped; [`Error::Autocast`] for another device or
    /// dtype.
    pub fn enter(device: Device, kind: Kind) -> Result<Autocast> {
        let device_type = Self::device_type(device)?;
        let dtype = match kind {
            Kind::BFloat16 => amp::SCALAR_BFLOAT16,
            Kind::Half => amp::SCALAR_HALF,
            other => {
                return Err(Error::Autocast(format!(
                    "autocast runs in BFloat16 or Half, not {other:?}"
                )))
            }
        };
        let (previous_enabled, previous_dtype) = amp::autocast_enter(device_type, dtype)?;
        Ok(Autocast { device_type, previous_enabled, previous_dtype, _thread: PhantomData })
    }

    /// Whether autocast is on for `device`'s type on this thread.
    pub fn is_enabled(device: Device) -> Result<bool> {
        amp::autocast_is_enabled(Self::device_type(device)?)
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // The shim catches every exception; these calls set thread-local flags and cannot fail.
        let _ = amp::autocast_exit(self.device_type, self.previous_enabled, self.previous_dtype);
    }
}
