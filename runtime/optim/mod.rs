//! The optimizer traits and the optimizers: [`Bop`] and [`Bop2ndOrder`] (larq), and [`Sgd`],
//! [`Adam`], [`AdamW`], [`RAdam`], [`NAdam`], [`RmsProp`], [`Adagrad`], [`Muon`] (torch.optim
//! 2.13 semantics), [`Adafactor`] (torch.optim 2.13's) and [`Lion`] (optax's).
//!
//! Each optimizer's file holds its config and its algorithm; the bookkeeping they share
//! (variables, states, step counts, hyperparameters, checkpoint import and export, backend) is
//! written once in `core.rs`. docs/design.md's "Adding an optimizer" walks through adding one.
//!
//! Every optimizer is built from a `<Name>Config` whose `Default` is the reference default and
//! whose scalar hyperparameters are [`Schedule`]s, evaluated at the optimizer's own step count
//! (first step `t = 0`). Updates run in place, under `no_grad`, on the device and in the dtype
//! of each variable.

mod core;
mod exec;
mod flips;
pub(crate) mod grad;
pub(crate) mod hyper;
mod multi;
pub(crate) mod staging;
pub(crate) mod state;

pub(crate) use core::BuiltinStep;
pub use core::Optim;
pub use flips::FlipRatios;
pub use registry::{builtin, builtins, Builtin, BuiltinOptimizer};

mod registry;

/// Declares the built-in optimizers, one line each, in the identity table's order
/// (`caseopt_rules::OptimizerKind::ALL`, checked at compile time): the line declares the
/// optimizer's module, re-exports its public items here, at the crate root and for the code
/// `case_optimizer!` generates (through [`builtin_items`]), and enters its algorithm in the
/// registry ([`builtins`]).
macro_rules! builtins {
    ($($module:ident :: { $($public:ident),+ ; $algorithm:ident }),+ $(,)?) => {
        $(mod $module;)+
        $(pub use $module::{$($public,)+ $algorithm};)+

        /// The built-in optimizers' public items, which the crate root and the macro's support
        /// module re-export whole.
        #[doc(hidden)]
        pub mod builtin_items {
            $(pub use super::$module::{$($public),+};)+
        }

        /// `optimizer` as the built-in optimizer it is, or `None`: found by its type identity,
        /// which no other type can claim.
        pub(crate) fn builtin_mut<O: Optimizer>(optimizer: &mut O) -> Option<&mut dyn BuiltinStep> {
            let any = optimizer as &mut dyn std::any::Any;
            $(if any.is::<Optim<$algorithm>>() {
                return any.downcast_mut::<Optim<$algorithm>>().map(|o| o as &mut dyn BuiltinStep);
            })+
            None
        }

        /// The registry, in the identity table's order.
        const REGISTRY: &[Builtin] = &[$(Builtin::of::<$algorithm>()),+];
        const _: () = assert!(
            registry::matches_the_table(REGISTRY),
            "builtins! must list every optimizer of caseopt_rules::OptimizerKind::ALL, in order"
        );
    };
}

builtins! {
    bop::{Bop, BopConfig; BopAlgorithm},
    bop2nd::{Bop2ndOrder, Bop2ndOrderConfig; Bop2ndOrderAlgorithm},
    sgd::{Sgd, SgdConfig; SgdAlgorithm},
    adam::{Adam, AdamConfig; AdamAlgorithm},
    adamw::{AdamW, AdamWConfig; AdamWAlgorithm},
    radam::{RAdam, RAdamConfig; RAdamAlgorithm},
    nadam::{NAdam, NAdamConfig; NAdamAlgorithm},
    rmsprop::{RmsProp, RmsPropConfig; RmsPropAlgorithm},
    adagrad::{Adagrad, AdagradConfig; AdagradAlgorithm},
    lion::{Lion, LionConfig; LionAlgorithm},
    adafactor::{Adafactor, AdafactorConfig; AdafactorAlgorithm},
    muon::{Muon, MuonConfig, MuonAdjustLr; MuonAlgorithm},
}

use tch::{Kind, Tensor};

use crate::constraint::Constraint;
use crate::error::Result;
use crate::schedule::Schedule;
use crate::var::Param;

/// How an optimizer computes its updates. Every built-in optimizer has `set_backend` and
/// `backend` ([`Execution`]); the choice belongs to that optimizer alone.
///
/// On an x86-64 CPU the libtorch path gives torch.optim's results bit for bit, and so do the
/// fused kernels but for Adam/AdamW's square root, correctly rounded by default where ATen's is
/// MKL's (an ulp or two; [`Sqrt::Aten`] takes ATen's, to the bit and slower); Bop and
/// Bop2ndOrder give larq's (docs/parity.md). They differ in speed. The
/// fused kernels read and write each element once, batch all of an optimizer's variables into
/// one pass split across threads, and allocate nothing per step; the libtorch path issues one
/// ATen op per term and tensor; the multi-tensor path ([`Backend::MultiTensor`]) issues
/// torch.optim's own multi-tensor ops, a handful per step whatever the number of variables.
///
/// ```
/// use caseopt::{Backend, Bop, Execution, Optimizer, Param, VarInfo};
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
    /// tensor with a contiguous gradient, sharing no memory with other operands), ATen's
    /// multi-tensor ops ([`Backend::MultiTensor`]) for CUDA variables, libtorch ops for the rest
    /// (CPU half precision, strided views) and for optimizers without kernels. Without the
    /// `fused` cargo feature, libtorch ops for every CPU variable.
    #[default]
    Auto,
    /// libtorch ops for every variable (one ATen op per term, as torch.optim's single-tensor
    /// path).
    Torch,
    /// Fused kernels for every variable; a step that meets a variable they cannot take fails
    /// with [`Error::FusedUnavailable`](crate::Error::FusedUnavailable) before changing anything. Optimizers without fused
    /// kernels (SGD, RAdam, NAdam, RMSprop, Adagrad, Adafactor) fail every step, and so does every
    /// optimizer when caseopt was built without the `fused` cargo feature.
    Fused,
    /// ATen's multi-tensor optimizer ops for every variable, as torch.optim issues them on a
    /// GPU by default: per (device, dtype) group of variables and step, `fused=True`'s
    /// `_fused_adam_`, `_fused_adamw_`, `_fused_sgd_` and `_fused_adagrad_` for Adam, AdamW, SGD
    /// and Adagrad; `foreach=True`'s `_foreach_*` sequence, op for op, for RMSprop, RAdam and
    /// NAdam; for Bop and Bop2ndOrder `_foreach_*` ops that round as larq does. Results are
    /// torch.optim's with `fused=True` or `foreach=True` bit for bit (on CPU, proven by the
    /// parity tests; docs/optimizers.md), and no value is read back to the host. Variables of
    /// any device and floating dtype; under [`Backend::Auto`] the CUDA variables take this
    /// path.
    ///
    /// ```
    /// use caseopt::{Adam, Backend, Execution, Optimizer, Param, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[1.0f32, -1.0, 0.5]);
    /// let mut adam = Adam::new(Default::default())?;
    /// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
    /// adam.set_backend(Backend::MultiTensor); // torch.optim.Adam(fused=True)
    /// adam.step_with_grads(&[Some(Tensor::from_slice(&[0.3f32, -0.2, 0.1]))])?;
    /// assert_eq!(adam.state(0)[0].1.int64_value(&[]), 1); // the step, as on every backend
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    MultiTensor,
}

/// The square root the fused Adam/AdamW kernels take of the second moment (set with
/// [`Execution::set_sqrt`]). It matters only where libtorch computes `sqrt` with MKL (every
/// x86-64 Linux wheel): ATen's CPU `sqrt` is then MKL's vector square root, one ulp off the
/// correctly rounded root in about 17% of f32 elements (1.2% of f64), which moves an Adam
/// update by an ulp or two (docs/parity.md). Where libtorch has no MKL the two are the same
/// correctly rounded root. The libtorch path always calls ATen's `sqrt`, and the other
/// optimizers' kernels take no square root: they ignore the setting.
///
/// ```
/// use caseopt::{Adam, Backend, Execution, Optimizer, Param, Sqrt, VarInfo};
/// use tch::Tensor;
///
/// let w = Tensor::from_slice(&[1.0f32, -1.0, 0.5]);
/// let mut adam = Adam::new(Default::default())?;
/// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
/// assert_eq!(adam.sqrt(), Sqrt::Fast);
/// adam.set_sqrt(Sqrt::Aten); // torch.optim's bits on every backend, slower
/// adam.step_with_grads(&[Some(Tensor::from_slice(&[0.3f32, -0.2, 0.1]))])?;
///
/// // The same step on the libtorch path, which calls ATen's own ops.
/// let u = Tensor::from_slice(&[1.0f32, -1.0, 0.5]);
/// let mut torch = Adam::new(Default::default())?;
/// torch.add_param(Param::new(VarInfo::of("u", &u), u.shallow_clone()))?;
/// torch.set_backend(Backend::Torch);
/// torch.step_with_grads(&[Some(Tensor::from_slice(&[0.3f32, -0.2, 0.1]))])?;
/// assert!(w.equal(&u));
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sqrt {
    /// The correctly rounded root of each element, computed in the kernels' vectorised loop:
    /// within an ulp or two of torch.optim where ATen's `sqrt` is MKL's, equal elsewhere.
    #[default]
    Fast,
    /// ATen's own square root: MKL's vector square root where libtorch has MKL, called a block
    /// of 256 elements at a time, for torch.optim's results bit for bit; the fused Adam step
    /// then takes longer (docs/parity.md has the measured factor). Where libtorch has no MKL,
    /// the same as [`Sqrt::Fast`].
    Aten,
}

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
pub trait Optimizer: Send + 'static {
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

    /// Validates the coming step with `grads` without changing anything: a router calls it for
    /// every rule before any optimizer moves, so that a step one optimizer would refuse is
    /// refused whole. The router has already checked each gradient's shape, dtype, device and
    /// layout against its variable; check here what else
    /// [`step_with_grads`](Self::step_with_grads) would reject. The built-in optimizers check
    /// the gradients' count and every hyperparameter's value at the current step. The default
    /// accepts everything.
    fn check_step(&self, grads: &[Option<Tensor>]) -> Result<()> {
        let _ = grads;
        Ok(())
    }

    /// Applies `constraint` to variable `index` after each of its updates, inside the step
    /// (Keras applies a variable's constraint the same way, right after the optimizer's
    /// update); `None` removes it. A variable the step does not update is not constrained.
    ///
    /// Returns whether this optimizer applies constraints itself. The default declines
    /// (`Ok(false)`): a router then applies them after the step with libtorch ops. The
    /// built-in optimizers accept, and fail on an index past their variables or an invalid
    /// constraint ([`Constraint::validate`]). The Adam family's fused kernels clamp each new
    /// value before they store it; the libtorch path clamps (`clamp_`) right after the
    /// variable's update; Bop and Bop2ndOrder write +-1, which they clamp only when the clip
    /// is below 1.
    ///
    /// ```
    /// use caseopt::{Adam, AdamConfig, Constraint, Optimizer, Param, VarInfo};
    /// use tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[0.95f32, -0.5]);
    /// let mut adam = Adam::new(AdamConfig { lr: 0.1.into(), ..Default::default() })?;
    /// adam.add_param(Param::new(VarInfo::of("w", &w), w.shallow_clone()))?;
    /// assert!(adam.set_constraint(0, Some(Constraint::weight_clip(1.0)?))?);
    /// adam.step_with_grads(&[Some(Tensor::from_slice(&[-1.0f32, 1.0]))])?;
    /// // 0.95 + 0.1 is clipped to 1; -0.5 - 0.1 is inside.
    /// let w = Vec::<f32>::try_from(&w)?;
    /// assert_eq!(w[0], 1.0);
    /// assert!((w[1] + 0.6).abs() < 1e-6);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn set_constraint(&mut self, index: usize, constraint: Option<Constraint>) -> Result<bool> {
        let _ = (index, constraint);
        Ok(false)
    }

    /// The constraint this optimizer applies to variable `index` (see
    /// [`set_constraint`](Self::set_constraint)); the default applies none.
    fn constraint(&self, index: usize) -> Option<Constraint> {
        let _ = index;
        None
    }

    /// How this optimizer executes its steps, where it says ([`Execution`]): every built-in
    /// optimizer does; the default says nothing. A router reads it to check the gradients of
    /// optimizers on [`Backend::MultiTensor`] with ATen's multi-tensor reduction too.
    ///
    /// ```
    /// use caseopt::{Backend, Execution, Optimizer, Sgd};
    ///
    /// let mut sgd = Sgd::new(Default::default())?;
    /// sgd.set_backend(Backend::MultiTensor);
    /// let dynamic: &dyn Optimizer = &sgd;
    /// assert_eq!(dynamic.execution().map(|e| e.backend()), Some(Backend::MultiTensor));
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn execution(&self) -> Option<&dyn Execution> {
        None
    }

    /// Asks the optimizer to train f16 and bf16 variables with f32 state and, where its
    /// algorithm needs one, an f32 master copy (the rule key `master_weights: true`; see
    /// docs/mixed-precision.md). Returns whether it does: the built-in optimizers accept before
    /// their first step (and fail after it: the state's layout would change); the default
    /// declines (`Ok(false)`).
    fn set_master_weights(&mut self, on: bool) -> Result<bool> {
        let _ = on;
        Ok(false)
    }

    /// Whether [`set_master_weights`](Self::set_master_weights) is on; the default says no.
    fn master_weights(&self) -> bool {
        false
    }

    /// Checks, before a router hands `param` to [`add_param`](Self::add_param), that this
    /// optimizer can train the variable's dtype as configured; a refusal names the variable
    /// ([`Error::UntrainableDtype`](crate::Error::UntrainableDtype)). The built-in optimizers
    /// refuse f16 and bf16 variables unless [`master_weights`](Self::master_weights) is on:
    /// state kept in half precision loses the small updates (an Adam moment, Bop's momentum)
    /// that training is made of. The default accepts everything.
    ///
    /// ```
    /// use caseopt::{Adam, Optimizer, Param, VarInfo};
    /// use tch::{Kind, Tensor};
    ///
    /// let w = Tensor::ones([3], (Kind::BFloat16, tch::Device::Cpu));
    /// let param = Param::new(VarInfo::of("w", &w), w.shallow_clone());
    /// let mut adam = Adam::new(Default::default())?;
    /// assert!(adam.check_dtype(&param).is_err());
    /// adam.set_master_weights(true)?;
    /// adam.check_dtype(&param)?;
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn check_dtype(&self, param: &Param) -> Result<()> {
        let _ = param;
        Ok(())
    }

    /// The dtype of variable `index`'s state tensors shaped like it, where it is not the
    /// variable's own (f32 for a half-precision variable under
    /// [`master_weights`](Self::master_weights)); checkpoints check saved states against it.
    /// The default: `None`, the variable's dtype.
    fn state_kind(&self, index: usize) -> Option<Kind> {
        let _ = index;
        None
    }

    /// Records that the last step flipped `flipped` weights of variable `index` where that
    /// step was taken by another process (data-parallel ZeRO-1, whose owner of the variable
    /// sends its new values), so that the flip ratios count the whole run. Returns whether the
    /// optimizer counts flips at all (Bop and Bop2ndOrder do); the default does not.
    #[doc(hidden)]
    fn record_remote_flips(&mut self, index: usize, flipped: u64) -> bool {
        let _ = (index, flipped);
        false
    }
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

/// How a built-in optimizer executes its steps: its [`Backend`] and the threads of its fused
/// kernels. Implemented by every optimizer of this crate; your own optimizers need not.
///
/// ```
/// use caseopt::{Adam, Backend, Execution};
///
/// let mut adam = Adam::new(Default::default())?;
/// assert_eq!((adam.backend(), adam.threads()), (Backend::Auto, 0));
/// adam.set_backend(Backend::Torch);
/// adam.set_threads(2);
/// assert_eq!((adam.backend(), adam.threads()), (Backend::Torch, 2));
/// # Ok::<(), caseopt::Error>(())
/// ```
pub trait Execution {
    /// Chooses how the updates are computed; the default is [`Backend::Auto`].
    fn set_backend(&mut self, backend: Backend);

    /// The backend in use.
    fn backend(&self) -> Backend;

    /// Sets how many threads the fused kernels may use; 0 (the default) follows
    /// `tch::get_num_threads()`, libtorch's own setting. A step uses fewer when there is too
    /// little work to pay for a thread (under 2^16 elements each). The libtorch path always
    /// follows libtorch's setting.
    fn set_threads(&mut self, threads: usize);

    /// The thread setting of the fused kernels (0: follow libtorch).
    fn threads(&self) -> usize;

    /// Chooses the square root of the fused Adam/AdamW kernels ([`Sqrt`]); the default is
    /// [`Sqrt::Fast`]. [`Sqrt::Aten`] makes their results torch.optim's bit for bit, at a
    /// cost in speed. The other optimizers, and the libtorch path, ignore it (the default
    /// implementation, for optimizers without such a kernel, too).
    ///
    /// ```
    /// use caseopt::{AdamW, Execution, Sqrt};
    ///
    /// let mut adamw = AdamW::new(Default::default())?;
    /// adamw.set_sqrt(Sqrt::Aten);
    /// assert_eq!(adamw.sqrt(), Sqrt::Aten);
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    fn set_sqrt(&mut self, sqrt: Sqrt) {
        let _ = sqrt;
    }

    /// The square root setting (see [`set_sqrt`](Self::set_sqrt)); the default implementation
    /// says [`Sqrt::Fast`].
    fn sqrt(&self) -> Sqrt {
        Sqrt::Fast
    }
}
