//! The bookkeeping every built-in optimizer shares, written once: its variables, their states,
//! the step counter, the hyperparameters, state import and export, and the choice of backend.
//!
//! An optimizer file writes out only its algorithm, as an implementation of [`Algorithm`]:
//! its config, its per-variable state ([`VarState`]), torch's or larq's update of one variable
//! with libtorch ops, and, where it has one, its fused kernel. The optimizer itself is
//! [`Optim`] over that algorithm (`pub type Adam = Optim<AdamAlgorithm>`), which implements
//! [`Optimizer`], [`FromConfig`] and [`Execution`] once for all of them; the compiler checks
//! the contract, where a macro over field names could not.

use std::sync::{Mutex, OnceLock};

use caseopt_rules::OptimizerKind;
use tch::{Kind, Tensor};

use super::exec::Exec;
use super::flips::{FlipCounts, FlipRatios, PendingFlips};
use super::grad::check_grads;
use super::hyper::Hyperparameters;
use super::state::{StateLayout, StateSlot};
use super::{Backend, Execution, FromConfig, Optimizer, Sqrt};
use crate::constraint::Constraint;
use crate::error::{CheckpointError, Error, Result};
use crate::kernels::metadata::MetaReader;
use crate::kernels::{Kernel, StateOperand, MAX_STATES};
use crate::predicate::dtype_name;
use crate::schedule::Schedule;
use crate::var::Param;

/// One step's hyperparameter values of algorithm `A`.
pub type Values<A> = <<A as Algorithm>::Config as Hyperparameters>::Values;

/// A variable's state in a built-in optimizer.
pub trait VarState: std::fmt::Debug + Send + 'static {
    /// The names of the tensors it may hold, in declaration order (`var_state!` declares them
    /// once with the struct).
    const NAMES: &'static [&'static str];

    /// How the saved tensor `name` looks, or `None` for a name it does not hold.
    fn layout(name: &str) -> Option<StateLayout>;

    /// The named tensors that describe it, as [`Optimizer::state`] returns them (aliases).
    fn export(&self) -> Vec<(&'static str, Tensor)>;

    /// Its tensors in the fused kernel's order (for optimizers with a kernel).
    fn operands(&self) -> [StateOperand<'_>; MAX_STATES] {
        [None, None, None]
    }

    /// Where its tensors live when they were made in a state buffer.
    fn slot(&self) -> Option<StateSlot> {
        None
    }

    /// A fresh state from zero tensors made in a state buffer, in declaration order; `None`
    /// when there are too few.
    fn from_buffer(tensors: Vec<Tensor>, slot: Option<StateSlot>) -> Option<Self>
    where
        Self: Sized;
}

/// A built-in optimizer's algorithm; see the module docs.
///
/// The trait is public only so that [`Optim`]'s implementations can name it; it is sealed (its
/// module is private), so it is not part of the API.
pub trait Algorithm: Sized + Send + std::fmt::Debug + 'static {
    /// Which built-in optimizer this is: its one identity for rules, errors and checkpoints.
    const KIND: OptimizerKind;
    /// The optimizer's name as torch.optim or larq spell it (`"SGD"`, `"Bop"`).
    const NAME: &'static str = Self::KIND.display_name();
    /// Names of the per-variable state tensors it may keep: by default its state's (RAdam,
    /// which shares Adam's state, keeps fewer).
    const STATE_NAMES: &'static [&'static str] = <Self::State as VarState>::NAMES;
    /// Whether every update writes -1 or +1 (Bop, Bop2ndOrder): the optimizer then counts the
    /// weights each step flips, and applies a constraint only where it changes +-1.
    const BINARY: bool = false;
    /// Its configuration.
    type Config: Hyperparameters;
    /// A variable's state.
    type State: VarState;
    /// Its fused kernel ([`NoKernel`] for optimizers updated with libtorch ops only).
    type Kernel: Kernel;
    /// What else the optimizer keeps besides the shared bookkeeping (Bop: its staged step).
    type Extra: Default + std::fmt::Debug + Send;

    /// Rebuilds a variable's state from [`VarState::export`]'s tensors, checked against the
    /// variable.
    fn import_state(
        config: &Self::Config,
        state: &[(String, Tensor)],
        param: &Param,
    ) -> Result<Self::State>;

    /// The update of one variable with libtorch ops, op for op as the reference computes it;
    /// creates the state (`None` before the variable's first update). `step` is the
    /// optimizer's step count.
    fn update(
        config: &Self::Config,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<Self::State>,
        hp: &Values<Self>,
        step: u64,
    ) -> Result<()>;

    /// [`update`](Self::update), returning for a binary algorithm what counts the weights that
    /// changed sign when asked ([`PendingFlips`]); the default counts nothing. `spare` is what
    /// the variable's previous step returned, no longer needed: its memory may serve this
    /// step's.
    fn update_counting_flips(
        config: &Self::Config,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut Option<Self::State>,
        hp: &Values<Self>,
        step: u64,
        _spare: Option<PendingFlips>,
    ) -> Result<Option<PendingFlips>> {
        Self::update(config, param, grad, state, hp, step).map(|()| None)
    }

    /// The fused kernel for this step's values, or `None` (the default) when the optimizer
    /// has none.
    fn kernel(config: &Self::Config, hp: &Values<Self>) -> Option<Self::Kernel> {
        let _ = (config, hp);
        None
    }

    /// How many state tensors the kernel updates per variable.
    fn kernel_states(kernel: &Self::Kernel) -> usize {
        let _ = kernel;
        0
    }

    /// A fresh state from zero tensors made in a state buffer (`kernel_states` of them); by
    /// default the state's own ([`VarState::from_buffer`]).
    fn state_from_buffer(tensors: Vec<Tensor>, slot: Option<StateSlot>) -> Option<Self::State> {
        Self::State::from_buffer(tensors, slot)
    }

    /// The key of a variable's per-variable kernel scalars: variables with equal keys share
    /// them, so the core computes them once per key and step (Adam: the variable's step).
    fn scalars_key(state: &Self::State) -> u64 {
        let _ = state;
        0
    }

    /// The per-variable kernel scalars for a key (see [`scalars_key`](Self::scalars_key)).
    fn scalars(kernel: &Self::Kernel, key: u64) -> [f64; 2] {
        let _ = (kernel, key);
        [0.0; 2]
    }

    /// Bookkeeping after the kernel updated a variable (Adam counts the variable's step).
    fn after_kernel(state: &mut Self::State) {
        let _ = state;
    }

    /// One (device, dtype) group's step on ATen's multi-tensor ops ([`Backend::MultiTensor`]):
    /// the variables `group`, each with a gradient already checked against it, in one call set
    /// as torch.optim issues it (`fused=True` or `foreach=True`); creates their missing states
    /// and counts their steps and, for a binary algorithm, their flips. Constraints are the
    /// caller's. `multi.rs` has the shared parts.
    fn multi(
        this: &mut Optim<Self>,
        grads: &[Option<Tensor>],
        hp: &Values<Self>,
        group: &[usize],
    ) -> Result<()>;

    /// The step proper, after the gradients' count was checked and the hyperparameters
    /// evaluated. The default runs [`Optim::run_step`]; Bop also commits a staged step first.
    fn apply(this: &mut Optim<Self>, grads: &[Option<Tensor>], hp: &Values<Self>) -> Result<()> {
        this.run_step(grads, hp)
    }

    /// Forgets any step computed ahead of time (a variable or a state changed). None by
    /// default; Bop's staging overrides it.
    fn forget_staged(this: &mut Optim<Self>) {
        let _ = this;
    }
}

/// The kernel of optimizers that have none: a type with no values.
#[derive(Debug, Clone, Copy)]
pub enum NoKernel {}

impl Kernel for NoKernel {
    fn apply<T: crate::kernels::math::Real>(
        &self,
        _: [f64; 2],
        _: f64,
        _: &mut [T],
        _: &[T],
        _: [&mut [T]; MAX_STATES],
    ) -> usize {
        match *self {}
    }
}

/// What the router asks of a built-in optimizer, which it finds behind any optimizer type by
/// the type's identity ([`builtin_mut`](super::builtin_mut)), so that no other type can answer
/// for one.
pub(crate) trait BuiltinStep {
    /// Whether a step runs only caseopt's own code: none of its hyperparameters is a
    /// [`Schedule::custom`](crate::Schedule::custom) closure.
    fn runs_only_own_code(&self) -> bool;

    /// [`Optimizer::step_with_grads`] with `read`, the router's writable read of this step's
    /// variables and gradients ([`MetaReader::grads`]), lent to the fused pass, which takes the
    /// metadata of the operands it covers from it instead of reading them again
    /// ([`MetaReader::lent`]). `read` is given back as it was lent.
    fn step_with_read(&mut self, grads: &[Option<Tensor>], read: &mut MetaReader) -> Result<()>;
}

impl<A: Algorithm> BuiltinStep for Optim<A> {
    fn runs_only_own_code(&self) -> bool {
        <A::Config as Hyperparameters>::NAMES
            .iter()
            .all(|name| self.config.schedule(name).is_ok_and(|s| !s.calls_user_code()))
    }

    fn step_with_read(&mut self, grads: &[Option<Tensor>], read: &mut MetaReader) -> Result<()> {
        self.exec.workspace.lent = Some(std::mem::take(read));
        let stepped = self.step_with_grads(grads);
        if let Some(back) = self.exec.workspace.lent.take() {
            *read = back;
        }
        stepped
    }
}

/// A built-in optimizer: the bookkeeping every one of them shares (variables, their states,
/// the step counter, the hyperparameters, the backend) around the algorithm `A`.
///
/// Name it through the optimizers' own names, [`Adam`](crate::Adam), [`Bop`](crate::Bop), ...,
/// which are this type over each algorithm.
#[derive(Debug)]
pub struct Optim<A: Algorithm> {
    pub(crate) config: A::Config,
    pub(crate) params: Vec<Param>,
    /// Each variable's state, `None` before its first update.
    pub(crate) states: Vec<Option<A::State>>,
    /// Steps taken; schedules are evaluated at this count.
    pub(crate) steps: u64,
    pub(crate) exec: Exec,
    pub(crate) extra: A::Extra,
    /// Each variable's constraint, applied after each of its updates.
    pub(crate) constraints: Vec<Option<Constraint>>,
    /// The weights the last step flipped (binary algorithms only).
    pub(crate) flips: FlipCounts,
    /// Half-precision variables train with f32 state (and master copies): see
    /// [`Optimizer::set_master_weights`].
    pub(crate) master_weights: bool,
    /// Per variable: whether it is f16/bf16 and trained through f32 (`master_weights` on).
    pub(crate) half: Vec<bool>,
    /// Per variable: its f32 master copy (half-precision variables of non-binary algorithms
    /// under `master_weights`, from their first update).
    pub(crate) masters: Vec<Option<Tensor>>,
}

/// The state name of a half-precision variable's f32 master copy.
pub(crate) const MASTER: &str = "master";

/// Whether `kind` is one `master_weights` trains through f32.
fn is_half(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16)
}

/// `names` and [`MASTER`], made once per list for the process (a handful of lists, each
/// leaked once).
fn with_master(names: &'static [&'static str]) -> &'static [&'static str] {
    type Lists = Vec<(&'static [&'static str], &'static [&'static str])>;
    static LISTS: OnceLock<Mutex<Lists>> = OnceLock::new();
    let mut lists = LISTS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, out)) = lists.iter().find(|(k, _)| *k == names) {
        return out;
    }
    let mut all = names.to_vec();
    all.push(MASTER);
    let out: &'static [&'static str] = Box::leak(all.into_boxed_slice());
    lists.push((names, out));
    out
}

/// The algorithms whose updates write -1 or +1 (Bop, Bop2ndOrder), which count their flips.
pub trait BinaryAlgorithm: Algorithm {}

impl<A: Algorithm> Optim<A> {
    /// Validates `config` and builds the optimizer with no variables yet.
    ///
    /// ```
    /// use caseopt::{Adam, AdamConfig, Sgd, SgdConfig};
    ///
    /// let adam = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() })?;
    /// assert!(Adam::new(AdamConfig { lr: (-1.0).into(), ..Default::default() }).is_err());
    /// // Nesterov momentum needs a momentum.
    /// assert!(Sgd::new(SgdConfig { nesterov: true, ..Default::default() }).is_err());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn new(config: A::Config) -> Result<Self> {
        config.validate()?;
        Ok(Optim {
            config,
            params: Vec::new(),
            states: Vec::new(),
            steps: 0,
            exec: Exec::default(),
            extra: A::Extra::default(),
            constraints: Vec::new(),
            flips: FlipCounts::default(),
            master_weights: false,
            half: Vec::new(),
            masters: Vec::new(),
        })
    }

    /// The indices among `which` of variables trained through f32 (`master_weights`).
    fn split_half(&self, which: &mut Vec<usize>) -> Vec<usize> {
        if !self.half.iter().any(|&h| h) {
            return Vec::new();
        }
        let halves: Vec<usize> = which.iter().copied().filter(|&i| self.half[i]).collect();
        which.retain(|&i| !self.half[i]);
        halves
    }

    /// A binary algorithm's update of variable `i` in `w` (the variable, or its f32 copy),
    /// handing it the variable's previous flip masks to fill and keeping what counts this
    /// step's flips.
    fn update_binary(
        &mut self,
        i: usize,
        w: &mut Tensor,
        g: &Tensor,
        hp: &Values<A>,
    ) -> Result<()> {
        let spare = self.flips.spare(i);
        let state = &mut self.states[i];
        let flips = A::update_counting_flips(&self.config, w, g, state, hp, self.steps, spare)?;
        if let Some(flips) = flips {
            self.flips.pending(i, flips);
        }
        Ok(())
    }

    /// One half-precision variable's update through f32 (`master_weights`): the algorithm
    /// steps an f32 tensor with the f32 gradient and f32 state, and the variable receives
    /// the result rounded to its dtype. Non-binary algorithms step the variable's f32 master
    /// copy (made from the variable at its first update), so that updates below the half
    /// precision's resolution accumulate; binary ones (Bop) step an f32 copy of the variable,
    /// whose +-1 values are exact in any precision, and keep only their f32 state.
    fn half_update(&mut self, i: usize, grad: &Tensor, hp: &Values<A>) -> Result<()> {
        let mut p = self.params[i].tensor.shallow_clone();
        let grad = grad.f_to_kind(Kind::Float)?;
        let master = if A::BINARY { None } else { self.masters[i].as_ref() };
        let mut work = match master {
            Some(m) => m.shallow_clone(),
            None => p.f_to_kind(Kind::Float)?,
        };
        if A::BINARY {
            self.update_binary(i, &mut work, &grad, hp)?;
        } else {
            A::update(&self.config, &mut work, &grad, &mut self.states[i], hp, self.steps)?;
            if let Some(c) = &self.constraints[i] {
                c.apply(&mut work)?;
            }
            self.masters[i] = Some(work.shallow_clone());
        }
        p.f_copy_(&work)?;
        Ok(())
    }

    /// [`Optimizer::set_state`] for a variable trained through f32: the algorithm's state is
    /// checked against an f32 variable of the same shape, and non-binary algorithms need the
    /// master copy too.
    fn set_half_state(&mut self, index: usize, mut state: Vec<(String, Tensor)>) -> Result<()> {
        let param = &self.params[index];
        if state.is_empty() {
            self.states[index] = None;
            self.masters[index] = None;
            return Ok(());
        }
        let master = state.iter().position(|(n, _)| n == MASTER).map(|at| state.remove(at).1);
        let shape = param.tensor.size();
        let proxy = Param::new(
            param.info.clone(),
            Tensor::f_empty(shape.as_slice(), (Kind::Float, param.tensor.device()))?,
        );
        let new = A::import_state(&self.config, &state, &proxy)?;
        let master = match (A::BINARY, master) {
            (true, None) => None,
            (true, Some(_)) | (false, None) => {
                return Err(Error::Checkpoint(CheckpointError::StateMismatch {
                    variable: param.info.name.clone(),
                    state: MASTER.to_string(),
                    expected: if A::BINARY { "absent (Bop keeps none)" } else { "present" }
                        .to_string(),
                    found: if A::BINARY { "present" } else { "absent" }.to_string(),
                }))
            }
            (false, Some(m)) => {
                if m.size() != shape || m.kind() != Kind::Float {
                    return Err(Error::Checkpoint(CheckpointError::StateMismatch {
                        variable: param.info.name.clone(),
                        state: MASTER.to_string(),
                        expected: format!("{:?} {shape:?}", Kind::Float),
                        found: format!("{:?} {:?}", m.kind(), m.size()),
                    }));
                }
                Some(m.f_to_device(param.tensor.device())?.f_contiguous()?)
            }
        };
        self.states[index] = Some(new);
        self.masters[index] = master;
        Ok(())
    }

    /// This step's hyperparameter values, once the gradients' count is checked.
    fn step_values(&self, grads: &[Option<Tensor>]) -> Result<Values<A>> {
        if grads.len() != self.params.len() {
            return Err(Error::GradientCount {
                optimizer: A::NAME,
                expected: self.params.len(),
                got: grads.len(),
            });
        }
        self.config.values_at(self.steps)
    }

    /// The configuration (hyperparameters as schedules).
    ///
    /// ```
    /// let bop = caseopt::Bop::new(Default::default())?;
    /// assert_eq!(bop.config().gamma.value(0), 1e-4);
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn config(&self) -> &A::Config {
        &self.config
    }

    /// One step: the fused kernel over every variable it takes, libtorch ops for the rest, or
    /// libtorch ops only for optimizers without a kernel.
    pub(crate) fn run_step(&mut self, grads: &[Option<Tensor>], hp: &Values<A>) -> Result<()> {
        if self.exec.backend == Backend::MultiTensor {
            check_grads(&self.params, grads)?;
            let mut which: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
            let halves = self.split_half(&mut which);
            self.multi_step(grads, hp, &which)?;
            return self.libtorch(grads, hp, halves.into_iter());
        }
        match A::kernel(&self.config, hp) {
            Some(kernel) => {
                let kernel = kernel.with_sqrt(self.exec.sqrt);
                self.fused_then_libtorch(grads, hp, &kernel)
            }
            None => {
                self.exec.refuse_all_under_fused(A::NAME, &self.params)?;
                check_grads(&self.params, grads)?;
                self.libtorch(grads, hp, 0..grads.len())
            }
        }
    }

    fn fused_then_libtorch(
        &mut self,
        grads: &[Option<Tensor>],
        hp: &Values<A>,
        kernel: &A::Kernel,
    ) -> Result<()> {
        if self.exec.backend != Backend::Torch {
            let (states, half) = (&self.states, &self.half);
            // Half-precision variables under `master_weights` make their f32 state in their
            // own update, never in a buffer of their dtype.
            let missing = |i: usize| {
                grads[i].is_some() && states[i].is_none() && !half.get(i).copied().unwrap_or(false)
            };
            let made = self.exec.new_states(&self.params, missing, A::kernel_states(kernel))?;
            for (i, tensors, slot) in made {
                self.states[i] = A::state_from_buffer(tensors, slot);
            }
        }
        // Variables mostly share their kernel scalars: compute them once per key.
        let mut last: Option<(u64, [f64; 2])> = None;
        let scalars = |st: &A::State| {
            let key = A::scalars_key(st);
            match last {
                Some((k, s)) if k == key => s,
                _ => {
                    let s = A::scalars(kernel, key);
                    last = Some((key, s));
                    s
                }
            }
        };
        let count = A::kernel_states(kernel);
        self.exec.fused_step(A::NAME, &self.params, &self.states, grads, kernel, count, scalars)?;
        for i in self.exec.workspace.updated() {
            if let Some(st) = &mut self.states[i] {
                A::after_kernel(st);
            }
        }
        if A::BINARY {
            for (i, n) in self.exec.workspace.flipped() {
                self.flips.counted(i, n);
            }
        }
        let rest = std::mem::take(&mut self.exec.rest);
        let result = self.libtorch(grads, hp, rest.iter().copied());
        self.exec.rest = rest;
        result
    }

    /// A binary algorithm's constraints, after its step (fused, staged or libtorch alike): its
    /// updates wrote +-1, which a clip of 1 or more leaves as they are, so only a clip below 1
    /// costs a pass (a libtorch `clamp_`) over the variables the step updated.
    fn constrain_binary(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        for (i, c) in self.constraints.iter().enumerate() {
            if let (Some(c), Some(Some(_))) = (c, grads.get(i)) {
                if c.changes_signs_values() {
                    c.apply(&mut self.params[i].tensor.shallow_clone())?;
                }
            }
        }
        Ok(())
    }

    /// The libtorch update of the variables `which` that have a gradient.
    fn libtorch(
        &mut self,
        grads: &[Option<Tensor>],
        hp: &Values<A>,
        which: impl Iterator<Item = usize>,
    ) -> Result<()> {
        // Under `Auto`, CUDA variables take the multi-tensor path (torch.optim's default on
        // GPUs): a handful of launches per step instead of one per term and tensor.
        let mut which: Vec<usize> = which.collect();
        if self.exec.backend == Backend::Auto {
            let on_cuda = |i: &usize| {
                grads[*i].is_some() && self.params[*i].tensor.device().is_cuda() && !self.half[*i]
            };
            let cuda: Vec<usize> = which.iter().copied().filter(on_cuda).collect();
            if !cuda.is_empty() {
                which.retain(|i| !on_cuda(i));
                self.multi_step(grads, hp, &cuda)?;
            }
        }
        for i in which {
            if let (true, Some(g)) = (self.half[i], &grads[i]) {
                self.half_update(i, g, hp)?;
                continue;
            }
            if let Some(g) = &grads[i] {
                let mut p = self.params[i].tensor.shallow_clone();
                if A::BINARY {
                    self.update_binary(i, &mut p, g, hp)?;
                } else {
                    A::update(&self.config, &mut p, g, &mut self.states[i], hp, self.steps)?;
                    // Right after the update, as the fused kernels clamp before they store.
                    if let Some(c) = &self.constraints[i] {
                        c.apply(&mut p)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<A: Algorithm> Optimizer for Optim<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn add_param(&mut self, param: Param) -> Result<()> {
        if let Some(ndim) = A::KIND.required_ndim() {
            if param.info.ndim() as u64 != ndim {
                return Err(Error::UnsupportedVariable {
                    optimizer: A::NAME,
                    variable: param.info.name.clone(),
                    shape: param.info.shape.clone(),
                    reason: format!(
                        "it trains {ndim}-D variables only; route the others to another optimizer (a rule `ndim({ndim}) & ...`)"
                    ),
                });
            }
        }
        A::forget_staged(self);
        self.half.push(self.master_weights && is_half(param.tensor.kind()));
        self.masters.push(None);
        self.params.push(param);
        self.states.push(None);
        self.constraints.push(None);
        self.exec.clips.push(f64::INFINITY);
        Ok(())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn step(&mut self) -> Result<()> {
        // The gradient handles go in a kept vector: no allocation per step for the list.
        let mut grads = std::mem::take(&mut self.exec.grads);
        grads.clear();
        grads.extend(self.params.iter().map(Param::grad));
        let result = self.step_with_grads(&grads);
        grads.clear();
        self.exec.grads = grads;
        result
    }

    fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        // `apply` checks the gradients, together with the fused path's own checks so that
        // each tensor's metadata is read once per step, before anything changes.
        let hp = self.step_values(grads)?;
        let _guard = tch::no_grad_guard();
        if A::BINARY {
            self.flips.start(self.params.len());
        }
        A::apply(self, grads, &hp)?;
        if A::BINARY {
            self.flips.drop_spares();
            self.constrain_binary(grads)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn record_remote_flips(&mut self, index: usize, flipped: u64) -> bool {
        if A::BINARY {
            self.flips.counted(index, usize::try_from(flipped).unwrap_or(usize::MAX));
        }
        A::BINARY
    }

    fn set_constraint(&mut self, index: usize, constraint: Option<Constraint>) -> Result<bool> {
        if let Some(c) = &constraint {
            c.validate()?;
        }
        let Some(slot) = self.constraints.get_mut(index) else {
            let hint = format!(" ({} holds {} variables)", A::NAME, self.params.len());
            return Err(Error::UnknownVariable { variable: format!("#{index}"), hint });
        };
        *slot = constraint;
        // The Adam family's kernels clamp as they store; Bop's write +-1, constrained after
        // the step (`constrain_binary`).
        self.exec.clips[index] = match constraint {
            Some(c) if !A::BINARY => c.clip_value(),
            _ => f64::INFINITY,
        };
        Ok(true)
    }

    fn constraint(&self, index: usize) -> Option<Constraint> {
        self.constraints.get(index).copied().flatten()
    }

    fn execution(&self) -> Option<&dyn Execution> {
        Some(self)
    }

    fn check_step(&self, grads: &[Option<Tensor>]) -> Result<()> {
        // Each gradient's metadata is the router's to check, from its one read per step.
        self.step_values(grads).map(drop)
    }

    fn step_count(&self) -> u64 {
        self.steps
    }

    fn set_step_count(&mut self, steps: u64) {
        A::forget_staged(self);
        self.steps = steps;
    }

    fn hyperparameter_names(&self) -> &'static [&'static str] {
        <A::Config as Hyperparameters>::NAMES
    }

    fn schedule(&self, name: &str) -> Result<&Schedule> {
        self.config.schedule(name)
    }

    fn set_hyperparameter(&mut self, name: &str, value: Schedule) -> Result<()> {
        self.config.set_schedule(name, value)
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.master_weights && !A::BINARY {
            with_master(A::STATE_NAMES)
        } else {
            A::STATE_NAMES
        }
    }

    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)> {
        let mut out = match self.states.get(index) {
            Some(Some(s)) => s.export(),
            _ => Vec::new(),
        };
        if let Some(Some(m)) = self.masters.get(index) {
            out.push((MASTER, m.alias()));
        }
        out
    }

    fn set_master_weights(&mut self, on: bool) -> Result<bool> {
        if on != self.master_weights && self.states.iter().any(Option::is_some) {
            return Err(Error::InvalidConfig {
                optimizer: A::NAME,
                reason: "`master_weights` changes the state's layout: set it before the first \
                         step"
                    .into(),
            });
        }
        A::forget_staged(self);
        self.master_weights = on;
        self.half = self.params.iter().map(|p| on && is_half(p.tensor.kind())).collect();
        self.masters = self.params.iter().map(|_| None).collect();
        Ok(true)
    }

    fn master_weights(&self) -> bool {
        self.master_weights
    }

    fn check_dtype(&self, param: &Param) -> Result<()> {
        let kind = param.tensor.kind();
        if !is_half(kind) || self.master_weights {
            return Ok(());
        }
        let what = if A::BINARY {
            "would keep its state in that precision and lose the small updates it accumulates; \
             add `master_weights: true` to the rule (f32 state; the +-1 weights need no master \
             copy)"
        } else {
            "would keep its state in that precision and lose updates below its resolution; add \
             `master_weights: true` to the rule (f32 state and an f32 master copy)"
        };
        Err(Error::UntrainableDtype {
            variable: param.info.name.clone(),
            dtype: dtype_name(kind),
            optimizer: A::NAME,
            reason: what.to_string(),
        })
    }

    fn state_kind(&self, index: usize) -> Option<Kind> {
        self.half.get(index).copied().unwrap_or(false).then_some(Kind::Float)
    }

    fn set_state(&mut self, index: usize, state: Vec<(String, Tensor)>) -> Result<()> {
        A::forget_staged(self);
        let Some(param) = self.params.get(index) else {
            let optimizer = A::NAME.to_string();
            return Err(Error::Checkpoint(CheckpointError::NoSuchVariable { optimizer, index }));
        };
        if self.half[index] {
            return self.set_half_state(index, state);
        }
        let new = if state.is_empty() {
            None
        } else {
            Some(A::import_state(&self.config, &state, param)?)
        };
        self.states[index] = new;
        Ok(())
    }
}

impl<A: BinaryAlgorithm> Optim<A> {
    /// The fraction of each variable's weights whose sign flipped in the last step, and of
    /// all of them (see [`FlipRatios`]); `None` before the first step. Counted by the pass that
    /// flipped them (the fused kernels, the staged step, or a reduction over the libtorch
    /// path's new signs); reading a CUDA variable's count waits for the device.
    ///
    /// ```
    /// use caseopt::{Bop2ndOrder, Optimizer, Param, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[1.0f64, -1.0]);
    /// let mut bop = Bop2ndOrder::new(Default::default())?;
    /// bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone()))?;
    /// bop.step_with_grads(&[Some(Tensor::from_slice(&[1.0f64, 1.0]))])?;
    /// // The first weight flips (w * m > threshold), the second does not.
    /// assert_eq!(bop.flip_ratios()?.map(|r| r.total), Some(0.5));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn flip_ratios(&self) -> Result<Option<FlipRatios>> {
        let Some(counts) = self.flips.read()? else {
            return Ok(None);
        };
        let mut ratios = FlipRatios::empty();
        for (p, n) in self.params.iter().zip(counts) {
            ratios.push(&p.info.name, n, p.info.numel().max(0) as u64);
        }
        Ok(Some(ratios))
    }
}

impl<A: Algorithm> FromConfig for Optim<A> {
    type Config = A::Config;

    fn from_config(config: A::Config) -> Result<Self> {
        Self::new(config)
    }
}

impl<A: Algorithm> Execution for Optim<A> {
    fn set_backend(&mut self, backend: Backend) {
        A::forget_staged(self);
        self.exec.backend = backend;
    }

    fn backend(&self) -> Backend {
        self.exec.backend
    }

    fn set_threads(&mut self, threads: usize) {
        self.exec.threads = threads;
    }

    fn threads(&self) -> usize {
        self.exec.threads
    }

    fn set_sqrt(&mut self, sqrt: Sqrt) {
        self.exec.sqrt = sqrt;
    }

    fn sqrt(&self) -> Sqrt {
        self.exec.sqrt
    }
}
