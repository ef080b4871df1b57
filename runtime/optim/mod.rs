//! The optimizer trait and the optimizers: [`Bop`] and [`Bop2ndOrder`] (larq), and [`Sgd`],
//! [`Adam`], [`AdamW`], [`RmsProp`], [`Adagrad`] (torch.optim 2.13 semantics).
//!
//! Every optimizer is built from a `<Name>Config` whose `Default` is the reference default and
//! whose scalar hyperparameters are [`Schedule`]s, evaluated at the optimizer's own step count
//! (first step `t = 0`). Updates run in place, under `no_grad`, on the device and in the dtype
//! of each variable.

mod adagrad;
mod adam;
mod bop;
mod rmsprop;
mod sgd;

pub use adagrad::{Adagrad, AdagradConfig};
pub use adam::{Adam, AdamConfig, AdamW, AdamWConfig};
pub use bop::{Bop, Bop2ndOrder, Bop2ndOrderConfig, BopConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use sgd::{Sgd, SgdConfig};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{Kernel, Operands, StateOperand, Unfit, Workspace, MAX_STATES};
use crate::schedule::Schedule;
use crate::var::Param;

/// How an optimizer computes its updates. Every optimizer has `set_backend` and `backend`
/// (e.g. [`Adam::set_backend`]); the choice belongs to that optimizer alone.
///
/// Both backends give torch.optim's results within the parity tolerances (Bop and
/// Bop2ndOrder bit for bit); they differ in speed. The fused kernels read and write each
/// element once, batch all of an optimizer's variables into one pass split across threads,
/// and allocate nothing per step; the libtorch path issues one ATen op per term and tensor.
///
/// ```
/// use caseopt::{Backend, Bop, Optimizer, Param, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f32, -1.0]);
/// let mut bop = Bop::new(Default::default())?;
/// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
/// bop.set_backend(Backend::Fused); // fail rather than fall back
/// # #[cfg(feature = "fused")]
/// bop.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, 1.0]))])?;
/// # #[cfg(not(feature = "fused"))]
/// # assert!(matches!(
/// #     bop.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, 1.0]))]),
/// #     Err(caseopt::Error::FusedUnavailable { .. })
/// # ));
/// assert_eq!(bop.backend(), Backend::Fused);
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Fused CPU kernels for every variable they can take (a contiguous `f32` or `f64` CPU
    /// tensor with a contiguous gradient, sharing no memory with other operands), libtorch ops
    /// for the rest (CUDA, half precision, strided views) and for optimizers without kernels.
    /// Without the `fused` cargo feature, libtorch ops for every variable.
    #[default]
    Auto,
    /// libtorch ops for every variable (one ATen op per term, as torch.optim's single-tensor
    /// path).
    Torch,
    /// Fused kernels for every variable; a step that meets a variable they cannot take fails
    /// with [`Error::FusedUnavailable`] before changing anything. Optimizers without fused
    /// kernels (SGD, RMSprop, Adagrad) fail every step, and so does every optimizer when
    /// caseopt was built without the `fused` cargo feature.
    Fused,
}

/// Execution settings and scratch every built-in optimizer carries.
#[derive(Debug, Default)]
pub(crate) struct Exec {
    pub(crate) backend: Backend,
    /// Threads for the fused kernels; 0 follows `tch::get_num_threads()`.
    pub(crate) threads: usize,
    pub(crate) workspace: Workspace,
    /// Gradient handles of the current step (kept to reuse the allocation).
    pub(crate) grads: Vec<Option<Tensor>>,
    /// Variables the fused path refused this step, for the libtorch path.
    pub(crate) rest: Vec<usize>,
    /// Scratch for the fused path's refusals.
    pub(crate) refused: Vec<(usize, Unfit)>,
    /// State buffers made by [`new_states`]; never removed, so that slots stay valid.
    pub(crate) chunks: Vec<Tensor>,
    /// A second copy of each f32 state buffer, made when a step is first staged
    /// ([`Optimizer::stage_step`]): the staged state is written there and exchanged with the
    /// buffer at commit.
    pub(crate) alts: Vec<Option<Tensor>>,
    /// The step staged by the router and not yet committed or dropped.
    pub(crate) staged: Option<StagedStep>,
}

/// A staged step as its optimizer keeps it until the step it was staged for.
#[derive(Debug)]
pub(crate) struct StagedStep {
    /// The step count and hyperparameters it was computed with.
    pub(crate) steps: u64,
    pub(crate) hyperparameters: Vec<f64>,
    /// Each covered variable's gradient address.
    pub(crate) grads: Vec<(usize, usize)>,
    pub(crate) staged: crate::kernels::stage::Staged,
}

impl Exec {
    /// Forgets the staged step, if any (its scratch kept for the next).
    pub(crate) fn drop_staged(&mut self) {
        if let Some(st) = self.staged.take() {
            st.staged.recycle(&mut self.workspace);
        }
    }

    /// Takes the staged step if it was staged for exactly this step: the same step count,
    /// hyperparameters and gradient tensors.
    pub(crate) fn take_staged(
        &mut self,
        steps: u64,
        hyperparameters: &[f64],
        grads: &[Option<Tensor>],
    ) -> Option<StagedStep> {
        let st = self.staged.take()?;
        let same_grads = st.grads.iter().all(|&(i, addr)| {
            grads.get(i).and_then(Option::as_ref).is_some_and(|g| g.data_ptr() as usize == addr)
        });
        if st.steps == steps && st.hyperparameters == hyperparameters && same_grads {
            Some(st)
        } else {
            st.staged.recycle(&mut self.workspace);
            None
        }
    }
}

/// What staging a step found ([`Optimizer::stage_step`]).
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageReport {
    /// The variables whose gradients the staging checked (their update is staged).
    pub covered: Vec<usize>,
    /// The first of them whose gradient holds a NaN or an infinity.
    pub first_non_finite: Option<usize>,
}

impl Exec {
    pub(crate) fn threads(&self) -> usize {
        if self.threads == 0 {
            usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
        } else {
            self.threads
        }
    }

    /// For optimizers without fused kernels: fails under [`Backend::Fused`].
    pub(crate) fn torch_only(&self, optimizer: &'static str, params: &[Param]) -> Result<()> {
        if self.backend == Backend::Fused {
            return Err(Error::FusedUnavailable {
                optimizer,
                variable: params.first().map(|p| p.info.name.clone()).unwrap_or_default(),
                reason: format!("{optimizer} has no fused kernel"),
            });
        }
        Ok(())
    }
}

/// The state of a variable as a fused kernel sees it: its state tensors, in kernel order, and
/// where they live when they were made in a state buffer ([`new_states`]).
pub(crate) trait FusedState {
    fn operands(&self) -> [StateOperand<'_>; MAX_STATES];
    fn flat(&self) -> Option<FlatSlot>;
}

/// Where a variable's state tensors live inside one of its optimizer's state buffers
/// ([`Exec::chunks`]): buffer `chunk`, state `s` starting at element `offsets[s]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlatSlot {
    pub(crate) chunk: usize,
    pub(crate) offsets: [usize; MAX_STATES],
}

/// Elements each variable's run of a state buffer is rounded up to: 64 bytes of f32, so that
/// every run starts on its own cache line and at a vector boundary.
const FLAT_ALIGN: usize = 16;

/// A variable's new states: its index, its state tensors, and where they were put.
pub(crate) type NewStates = (usize, Vec<Tensor>, Option<FlatSlot>);

/// Zero states for every variable `i` with `wanted(i)`: `count` tensors of the parameter's
/// shape, dtype and device each, and where they were put.
///
/// The states of contiguous f32/f64 CPU variables created together share one new buffer per
/// element type (state 0 of every variable, then state 1, ...): the fused kernels then stream
/// each state through memory in order and read one buffer's metadata per step instead of one
/// per state tensor (on 2000 small variables, most of a step's cost was reading metadata).
/// The tensors returned are views into it, so the libtorch path and `state()` see the same
/// memory. Other variables get `zeros_like` tensors of their own.
pub(crate) fn new_states(
    exec: &mut Exec,
    params: &[Param],
    wanted: impl Fn(usize) -> bool,
    count: usize,
) -> Result<Vec<NewStates>> {
    let count = count.min(MAX_STATES);
    let mut out = Vec::new();
    let mut groups: [(Kind, Vec<usize>); 2] =
        [(Kind::Float, Vec::new()), (Kind::Double, Vec::new())];
    for (i, p) in params.iter().enumerate().filter(|(i, _)| wanted(*i)) {
        let t = &p.tensor;
        let flat = t.device() == Device::Cpu && t.is_contiguous();
        match groups.iter_mut().find(|(kind, _)| flat && t.kind() == *kind) {
            Some((_, members)) => members.push(i),
            None => {
                let states = (0..count).map(|_| t.f_zeros_like()).collect::<Result<_, _>>()?;
                out.push((i, states, None));
            }
        }
    }
    for (kind, members) in groups {
        if members.is_empty() {
            continue;
        }
        let run = |i: usize| params[i].tensor.numel().div_ceil(FLAT_ALIGN) * FLAT_ALIGN;
        let total: usize = members.iter().map(|&i| run(i)).sum();
        // Past i64, libtorch refuses the allocation with its own error.
        let len = i64::try_from(total.saturating_mul(count)).unwrap_or(i64::MAX);
        let buffer = Tensor::f_zeros([len], (kind, Device::Cpu))?;
        let chunk = exec.chunks.len();
        let mut start = 0;
        for &i in &members {
            let p = &params[i].tensor;
            let mut offsets = [0usize; MAX_STATES];
            let mut states = Vec::with_capacity(count);
            for (s, offset) in offsets.iter_mut().enumerate().take(count) {
                *offset = s * total + start;
                let view = buffer.f_narrow(0, *offset as i64, p.numel() as i64)?;
                states.push(view.f_view(p.size().as_slice())?);
            }
            start += run(i);
            out.push((i, states, Some(FlatSlot { chunk, offsets })));
        }
        exec.chunks.push(buffer);
    }
    out.sort_by_key(|(i, _, _)| *i);
    Ok(out)
}

/// Records that variable `index` cannot take the fused path: queued in `rest` for libtorch
/// under [`Backend::Auto`], an error under [`Backend::Fused`].
fn refuse(
    backend: Backend,
    rest: &mut Vec<usize>,
    optimizer: &'static str,
    params: &[Param],
    index: usize,
    unfit: Unfit,
) -> Result<()> {
    if backend == Backend::Fused {
        return Err(Error::FusedUnavailable {
            optimizer,
            variable: params[index].info.name.clone(),
            reason: unfit.to_string(),
        });
    }
    rest.push(index);
    Ok(())
}

/// The fused part of a step: runs `kernel` over every variable with a gradient that the
/// kernels can take, in one multi-tensor pass, and leaves in `exec.rest` the variables the
/// caller must update with libtorch ops (all of them under [`Backend::Torch`]). Every variable
/// with a gradient must have its state already. Fails, having written nothing, when the
/// backend is [`Backend::Fused`] and some variable cannot take it. `scalars` gives a state's
/// per-variable kernel scalars.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_step<S: FusedState, K: Kernel>(
    exec: &mut Exec,
    optimizer: &'static str,
    params: &[Param],
    states: &[Option<S>],
    grads: &[Option<Tensor>],
    kernel: &K,
    state_count: usize,
    mut scalars: impl FnMut(&S) -> [f64; 2],
) -> Result<()> {
    exec.rest.clear();
    let with_grads = |rest: &mut Vec<usize>| {
        rest.clear();
        rest.extend(grads.iter().enumerate().filter_map(|(i, g)| g.as_ref().map(|_| i)));
    };
    if exec.backend == Backend::Torch {
        check_grads(params, grads)?;
        with_grads(&mut exec.rest);
        // Forget the previous fused batch, so that `updated` reports nothing.
        let _ = exec.workspace.batch(0);
        return Ok(());
    }
    let threads = exec.threads();
    let mut refused = std::mem::take(&mut exec.refused);
    refused.clear();
    // A variable with a gradient but no state (not created by the caller) is refused here;
    // the others are checked together.
    for (i, (g, st)) in grads.iter().zip(states).enumerate() {
        if g.is_some() && st.is_none() {
            refused.push((i, Unfit::Unsupported("a variable without state")));
        }
    }
    let mut batch = exec.workspace.batch(state_count);
    let vars =
        params.iter().zip(grads).zip(states).enumerate().filter_map(|(index, ((p, g), st))| {
            let st = st.as_ref()?;
            let flat = st.flat().map(|f| (f.chunk, f.offsets));
            Some(Operands {
                index,
                param: &p.tensor,
                grad: g.as_ref()?,
                states: st.operands(),
                state_buffer: flat,
            })
        });
    batch.queue(vars, &exec.chunks, &mut refused);
    batch.set_scalars(|i| states[i].as_ref().map_or([0.0; 2], &mut scalars));
    // Refusals in variable order, so that errors name the first variable concerned.
    refused.sort_by_key(|(i, _)| *i);
    for (i, unfit) in refused.drain(..) {
        let p = &params[i];
        match unfit {
            Unfit::Grad(reason) => {
                return Err(Error::GradientMismatch { variable: p.info.name.clone(), reason })
            }
            unfit => {
                // The libtorch path still needs the gradient checked before anything changes.
                if let Some(g) = &grads[i] {
                    check_grad(p, g)?;
                }
                refuse(exec.backend, &mut exec.rest, optimizer, params, i, unfit)?;
            }
        }
    }
    exec.refused = refused;
    if let Err(unfit) = batch.run(kernel, threads) {
        let index = match unfit {
            Unfit::Overlap(index) => index,
            _ => 0,
        };
        refuse(exec.backend, &mut exec.rest, optimizer, params, index, unfit)?;
        // Nothing was written: every variable goes the libtorch way.
        with_grads(&mut exec.rest);
    }
    Ok(())
}

/// The inherent `set_backend`, `backend`, `set_threads` and `threads` of a built-in optimizer.
macro_rules! exec_methods {
    ($ty:ident) => {
        /// Chooses how the updates are computed (see [`Backend`](crate::Backend)); the default
        /// is [`Backend::Auto`](crate::Backend::Auto).
        ///
        /// ```
        #[doc = concat!("let mut opt = caseopt::", stringify!($ty), "::new(Default::default())?;")]
        /// opt.set_backend(caseopt::Backend::Torch);
        /// assert_eq!(opt.backend(), caseopt::Backend::Torch);
        /// # Ok::<(), caseopt::Error>(())
        /// ```
        pub fn set_backend(&mut self, backend: $crate::optim::Backend) {
            self.exec.backend = backend;
        }

        /// The backend in use.
        ///
        /// ```
        #[doc = concat!("let opt = caseopt::", stringify!($ty), "::new(Default::default())?;")]
        /// assert_eq!(opt.backend(), caseopt::Backend::Auto);
        /// # Ok::<(), caseopt::Error>(())
        /// ```
        pub fn backend(&self) -> $crate::optim::Backend {
            self.exec.backend
        }

        /// Sets how many threads the fused kernels may use; 0 (the default) follows
        /// `tch::get_num_threads()`, libtorch's own setting. A step uses fewer when there is
        /// too little work to pay for a thread (under 2^18 elements each). The libtorch path
        /// always follows libtorch's setting.
        ///
        /// ```
        #[doc = concat!("let mut opt = caseopt::", stringify!($ty), "::new(Default::default())?;")]
        /// opt.set_threads(2);
        /// assert_eq!(opt.threads(), 2);
        /// # Ok::<(), caseopt::Error>(())
        /// ```
        pub fn set_threads(&mut self, threads: usize) {
            self.exec.threads = threads;
        }

        /// The thread setting of the fused kernels (0: follow libtorch).
        ///
        /// ```
        #[doc = concat!("let opt = caseopt::", stringify!($ty), "::new(Default::default())?;")]
        /// assert_eq!(opt.threads(), 0);
        /// # Ok::<(), caseopt::Error>(())
        /// ```
        pub fn threads(&self) -> usize {
            self.exec.threads
        }
    };
}
pub(crate) use exec_methods;

/// An optimizer: per-variable state, a step over (parameter, gradient) pairs, its own step
/// counter, and hyperparameters readable and settable while training.
///
/// Implement it for your own type to use it in `case_optimizer!` rules (together with
/// [`FromConfig`]).
///
/// ```
/// use caseopt::{Adam, AdamConfig, Optimizer, Param, VarInfo};
/// use tch::{Device, Kind, Tensor};
///
/// let w = Tensor::ones([3], (Kind::Double, Device::Cpu));
/// let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() })?;
/// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// let g = Tensor::from_slice(&[1.0f64, -1.0, 0.0]);
/// adam.step_with_grads(&[Some(g)])?;
/// assert_eq!(adam.step_count(), 1);
/// // Adam's first step moves each weight by lr * g / (|g| + eps): just under 0.1.
/// let moved: Vec<f64> = Vec::<f64>::try_from(&w)?.iter().map(|x| x - 1.0).collect();
/// assert!((moved[0] + 0.1).abs() < 1e-8 && (moved[1] - 0.1).abs() < 1e-8 && moved[2] == 0.0);
/// adam.set_hyperparameter("lr", 0.01.into())?;
/// assert_eq!(adam.hyperparameter("lr")?, 0.01);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Optimizer: Send {
    /// The algorithm's name, e.g. `"Adam"`.
    fn name(&self) -> &'static str;

    /// Adds a variable; its state is created (zeros, or the configured initial value) at its
    /// first update, as torch.optim does.
    fn add_param(&mut self, param: Param) -> Result<()>;

    /// The variables, in the order they were added.
    fn params(&self) -> &[Param];

    /// One step with explicit gradients, aligned with [`params`](Self::params); `None` leaves
    /// that variable and its state untouched. The step counter advances by one.
    fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()>;

    /// One step with each variable's own `.grad()`; variables without a gradient are skipped.
    fn step(&mut self) -> Result<()> {
        let grads: Vec<Option<Tensor>> = self.params().iter().map(Param::grad).collect();
        self.step_with_grads(&grads)
    }

    /// Sets every variable's gradient to zero (where it has one).
    fn zero_grad(&mut self) {
        for p in self.params() {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_zero_();
            }
        }
    }

    /// Steps taken so far; schedules are evaluated at this count.
    fn step_count(&self) -> u64;

    /// Sets the step counter (used when resuming).
    fn set_step_count(&mut self, steps: u64);

    /// Names of the hyperparameters [`hyperparameter`](Self::hyperparameter) accepts.
    fn hyperparameter_names(&self) -> &'static [&'static str];

    /// A hyperparameter's schedule.
    fn schedule(&self, name: &str) -> Result<&Schedule>;

    /// A hyperparameter's value at the current step count.
    fn hyperparameter(&self, name: &str) -> Result<f64> {
        Ok(self.schedule(name)?.value(self.step_count()))
    }

    /// Replaces a hyperparameter (a constant or a schedule) while training.
    fn set_hyperparameter(&mut self, name: &str, value: Schedule) -> Result<()>;

    /// Names of the per-variable state tensors this optimizer may keep.
    fn state_names(&self) -> &'static [&'static str];

    /// The state of variable `index` as named tensors; empty before its first update. Each is
    /// an alias of the optimizer's own state (shared memory, its own shape and strides), as
    /// torch.optim's `state` is: in-place edits reach the optimizer, a `resize_` or `set_` of the
    /// handle does not. `"step"` is a 0-dim int64 tensor (a copy) where the optimizer counts per
    /// variable.
    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)>;

    /// Replaces the state of variable `index` (from [`state`](Self::state) of an identical
    /// optimizer); an empty list clears it.
    fn set_state(&mut self, index: usize, state: Vec<(String, Tensor)>) -> Result<()>;

    /// For the router's non-finite check: computes the coming step with these gradients
    /// without changing anything visible, checking the gradients it reads, so that the next
    /// [`step_with_grads`](Self::step_with_grads) with the same gradients only commits it.
    /// `None` (the default) stages nothing. Not part of the stable API.
    #[doc(hidden)]
    fn stage_step(&mut self, grads: &[Option<Tensor>]) -> Result<Option<StageReport>> {
        let _ = grads;
        Ok(None)
    }

    /// Drops a staged step (the router refused it). Not part of the stable API.
    #[doc(hidden)]
    fn drop_staged(&mut self) {}
}

/// An optimizer built from a configuration struct; what `case_optimizer!` calls for a rule's
/// `Name<key: value, ...>`, which becomes `NameConfig { key: value, ..Default::default() }`.
///
/// ```
/// use caseopt::{Bop, FromConfig, Optimizer};
/// let bop = <Bop as FromConfig>::from_config(Default::default())?;
/// assert_eq!(bop.hyperparameter("threshold")?, 1e-8);
/// # Ok::<(), caseopt::Error>(())
/// ```
pub trait FromConfig: Optimizer + Sized {
    /// The configuration; `Default` is the reference default.
    type Config: Default;
    /// Validates the configuration and builds the optimizer.
    fn from_config(config: Self::Config) -> Result<Self>;
}

/// A hyperparameter's accepted range, checked on construction and on every value a schedule
/// yields.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Range {
    /// `v >= 0`.
    NonNegative,
    /// `v > 0`.
    Positive,
    /// `0 < v <= 1`.
    UnitOpenClosed,
    /// `0 <= v < 1`.
    UnitClosedOpen,
}

impl Range {
    fn contains(self, v: f64) -> bool {
        match self {
            Range::NonNegative => v >= 0.0,
            Range::Positive => v > 0.0,
            Range::UnitOpenClosed => v > 0.0 && v <= 1.0,
            Range::UnitClosedOpen => (0.0..1.0).contains(&v),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Range::NonNegative => ">= 0",
            Range::Positive => "> 0",
            Range::UnitOpenClosed => "in (0, 1]",
            Range::UnitClosedOpen => "in [0, 1)",
        }
    }

    pub(crate) fn check(self, optimizer: &'static str, name: &'static str, v: f64) -> Result<f64> {
        if v.is_finite() && self.contains(v) {
            Ok(v)
        } else {
            Err(Error::InvalidHyperparameter {
                optimizer,
                name,
                value: v,
                expected: self.describe(),
            })
        }
    }
}

/// Declares a config's scheduled hyperparameters once: their names, ranges, by-name access and
/// a struct of their values at one step.
macro_rules! hyperparameters {
    ($opt:literal, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? }) => {
        /// Hyperparameter values at one step.
        #[derive(Debug, Clone, Copy)]
        pub(crate) struct $values {
            $(pub(crate) $field: f64,)*
        }

        impl $config {
            pub(crate) const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Names of the scheduled hyperparameters.
            pub fn names(&self) -> &'static [&'static str] {
                Self::NAMES
            }

            /// Checks every schedule and the value each takes at step 0.
            pub(crate) fn validate_schedules(&self) -> $crate::error::Result<()> {
                $(
                    self.$field.validate().map_err(|reason| $crate::error::Error::InvalidSchedule {
                        optimizer: $opt,
                        name: stringify!($field),
                        reason,
                    })?;
                    $crate::optim::Range::$range.check($opt, stringify!($field), self.$field.value(0))?;
                )*
                Ok(())
            }

            /// Every hyperparameter's value at step `t`, each checked against its range.
            pub(crate) fn values_at(&self, t: u64) -> $crate::error::Result<$values> {
                Ok($values {
                    $($field: $crate::optim::Range::$range.check($opt, stringify!($field), self.$field.value(t))?,)*
                })
            }

            pub(crate) fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&self.$field),)*
                    _ => Err($crate::optim::unknown($opt, name, Self::NAMES)),
                }
            }

            pub(crate) fn set_schedule(&mut self, name: &str, value: $crate::schedule::Schedule) -> $crate::error::Result<()> {
                let mut next = self.clone();
                match name {
                    $(stringify!($field) => next.$field = value,)*
                    _ => return Err($crate::optim::unknown($opt, name, Self::NAMES)),
                }
                next.validate()?;
                *self = next;
                Ok(())
            }
        }
    };
}
pub(crate) use hyperparameters;

/// The parts of [`Optimizer`] every built-in optimizer shares, over fields `config`, `params`,
/// `states`, `steps` and `exec`, an inherent `apply(grads, values)` (the step proper, fused or
/// not), `import_state` and the state's `export`.
macro_rules! common_methods {
    ($opt:literal) => {
        fn name(&self) -> &'static str {
            $opt
        }

        fn add_param(&mut self, param: $crate::var::Param) -> $crate::error::Result<()> {
            self.exec.drop_staged();
            self.params.push(param);
            self.states.push(None);
            Ok(())
        }

        fn params(&self) -> &[$crate::var::Param] {
            &self.params
        }

        fn step_count(&self) -> u64 {
            self.steps
        }

        fn set_step_count(&mut self, steps: u64) {
            self.steps = steps;
        }

        fn hyperparameter_names(&self) -> &'static [&'static str] {
            self.config.names()
        }

        fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
            self.config.schedule(name)
        }

        fn set_hyperparameter(
            &mut self,
            name: &str,
            value: $crate::schedule::Schedule,
        ) -> $crate::error::Result<()> {
            self.config.set_schedule(name, value)
        }

        fn state_names(&self) -> &'static [&'static str] {
            Self::STATE_NAMES
        }

        fn state(&self, index: usize) -> Vec<(&'static str, tch::Tensor)> {
            match self.states.get(index) {
                Some(Some(s)) => s.export(),
                _ => Vec::new(),
            }
        }

        fn set_state(
            &mut self,
            index: usize,
            state: Vec<(String, tch::Tensor)>,
        ) -> $crate::error::Result<()> {
            let Some(param) = self.params.get(index) else {
                return Err($crate::error::Error::Checkpoint(format!(
                    "{} has no variable #{index}",
                    $opt
                )));
            };
            self.exec.drop_staged();
            let new = if state.is_empty() {
                None
            } else {
                Some(Self::import_state(&self.config, &state, param)?)
            };
            self.states[index] = new;
            Ok(())
        }

        fn step(&mut self) -> $crate::error::Result<()> {
            // The gradient handles go in a kept vector: no allocation per step for the list.
            let mut grads = std::mem::take(&mut self.exec.grads);
            grads.clear();
            grads.extend(self.params.iter().map($crate::var::Param::grad));
            let result = self.step_with_grads(&grads);
            grads.clear();
            self.exec.grads = grads;
            result
        }

        fn step_with_grads(&mut self, grads: &[Option<tch::Tensor>]) -> $crate::error::Result<()> {
            if grads.len() != self.params.len() {
                return Err($crate::error::Error::GradientCount {
                    optimizer: $opt,
                    expected: self.params.len(),
                    got: grads.len(),
                });
            }
            // `apply` checks the gradients, together with the fused path's own checks so that
            // each tensor's metadata is read once per step, before anything changes.
            let hp = self.config.values_at(self.steps)?;
            let _guard = tch::no_grad_guard();
            self.apply(grads, &hp)?;
            self.steps += 1;
            Ok(())
        }
    };
}
pub(crate) use common_methods;

pub(crate) fn unknown(optimizer: &'static str, name: &str, known: &[&str]) -> Error {
    Error::UnknownHyperparameter {
        optimizer,
        name: name.to_string(),
        known: known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
    }
}

/// Every gradient given must match its variable (see [`check_grad`]).
pub(crate) fn check_grads(params: &[Param], grads: &[Option<Tensor>]) -> Result<()> {
    for (p, g) in params.iter().zip(grads) {
        if let Some(g) = g {
            check_grad(p, g)?;
        }
    }
    Ok(())
}

/// A gradient must be defined and have its variable's shape, dtype and device.
pub(crate) fn check_grad(p: &Param, g: &Tensor) -> Result<()> {
    if !g.defined() {
        let reason = "the gradient is an undefined tensor".to_string();
        return Err(Error::GradientMismatch { variable: p.info.name.clone(), reason });
    }
    let (ps, gs) = (p.tensor.size(), g.size());
    let reason = if ps != gs {
        format!("shape {gs:?} != {ps:?}")
    } else if p.tensor.kind() != g.kind() {
        format!("dtype {:?} != {:?}", g.kind(), p.tensor.kind())
    } else if p.tensor.device() != g.device() {
        format!("device {:?} != {:?}", g.device(), p.tensor.device())
    } else {
        return Ok(());
    };
    Err(Error::GradientMismatch { variable: p.info.name.clone(), reason })
}

/// Takes the named tensor out of a saved state, checking it against its variable.
pub(crate) fn take_state(state: &[(String, Tensor)], name: &str, param: &Param) -> Result<Tensor> {
    let t = find_state(state, name, param)?;
    let p = &param.tensor;
    if t.size() != p.size() || t.kind() != p.kind() {
        return Err(Error::Checkpoint(format!(
            "state `{name}` of `{}` is {:?} {:?}, the variable is {:?} {:?}",
            param.info.name,
            t.kind(),
            t.size(),
            p.kind(),
            p.size()
        )));
    }
    Ok(t.f_to_device(p.device())?.f_contiguous()?)
}

/// The per-variable step counter from a saved state.
pub(crate) fn take_step(state: &[(String, Tensor)], param: &Param) -> Result<u64> {
    let t = find_state(state, "step", param)?;
    let v = t.f_int64_value(&[]).map_err(|e| {
        Error::Checkpoint(format!("state `step` of `{}` is not a scalar: {e}", param.info.name))
    })?;
    u64::try_from(v).map_err(|_| {
        Error::Checkpoint(format!("state `step` of `{}` is negative", param.info.name))
    })
}

pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::from(step as i64)
}

fn find_state<'a>(state: &'a [(String, Tensor)], name: &str, param: &Param) -> Result<&'a Tensor> {
    state.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
        Error::Checkpoint(format!("state `{name}` of `{}` is missing", param.info.name))
    })
}

/// `grad` negated when maximizing and with `weight_decay * param` added, as torch.optim does
/// before any other use of the gradient.
pub(crate) fn adjusted_grad(
    param: &Tensor,
    grad: &Tensor,
    maximize: bool,
    weight_decay: f64,
) -> Result<Tensor> {
    let mut g = if maximize { grad.f_neg()? } else { grad.shallow_clone() };
    if weight_decay != 0.0 {
        g = g.f_add(&param.f_mul_scalar(weight_decay)?)?;
    }
    Ok(g)
}
