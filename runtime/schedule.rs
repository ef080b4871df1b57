//! Schedules for scalar hyperparameters (lr, gamma, threshold, sigma, momentum, ...).
//!
//! A schedule is evaluated at the optimizer's own step count, the first step being `t = 0`
//! (larq's and Keras's convention). Every hyperparameter field of every `<Name>Config` is a
//! [`Schedule`]; a plain number converts into a constant one.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A scalar hyperparameter as a function of the optimizer's step count `t` (first step `t = 0`).
///
/// ```
/// use caseopt::Schedule;
///
/// let lr = Schedule::cosine(0.1, 100).with_warmup(10, 0.0);
/// assert_eq!(lr.value(0), 0.0);
/// assert!((lr.value(5) - 0.05).abs() < 1e-12);
/// assert_eq!(lr.value(10), 0.1);
/// assert!(lr.value(110) < 1e-12);
///
/// let constant: Schedule = 0.01.into();
/// assert_eq!(constant.value(1_000), 0.01);
/// ```
#[derive(Clone)]
pub enum Schedule {
    /// The same value at every step.
    Constant(f64),
    /// `initial * gamma^floor(t / step_size)` (torch's `StepLR`).
    Step {
        /// Value at t = 0.
        initial: f64,
        /// Factor applied every `step_size` steps.
        gamma: f64,
        /// Steps between two decays (> 0).
        step_size: u64,
    },
    /// `initial * decay_rate^(t / decay_steps)`, the exponent floored when `staircase`
    /// (Keras's `ExponentialDecay`).
    Exponential {
        /// Value at t = 0.
        initial: f64,
        /// Factor applied per `decay_steps` steps.
        decay_rate: f64,
        /// Steps over which the value falls by `decay_rate` (> 0).
        decay_steps: u64,
        /// Decay in discrete jumps rather than continuously.
        staircase: bool,
    },
    /// `initial / (1 + decay_rate * t / decay_steps)`, the ratio floored when `staircase`
    /// (Keras's `InverseTimeDecay`).
    InverseTime {
        /// Value at t = 0.
        initial: f64,
        /// Rate of decay.
        decay_rate: f64,
        /// Steps per unit of decay (> 0).
        decay_steps: u64,
        /// Decay in discrete jumps rather than continuously.
        staircase: bool,
    },
    /// `(initial - end) * (1 - min(t, decay_steps) / decay_steps)^power + end`
    /// (Keras's `PolynomialDecay`, without cycling).
    Polynomial {
        /// Value at t = 0.
        initial: f64,
        /// Value from `decay_steps` on.
        end: f64,
        /// Steps to go from `initial` to `end` (> 0).
        decay_steps: u64,
        /// Exponent of the decay (1 is linear).
        power: f64,
    },
    /// Optional linear warmup from `warmup_start` to `peak` over `warmup_steps`, then cosine decay
    /// from `peak` to `peak * alpha` over `decay_steps` (Keras's `CosineDecay`).
    Cosine {
        /// Value reached at the end of the warmup, where the cosine starts.
        peak: f64,
        /// Steps of cosine decay after the warmup (> 0).
        decay_steps: u64,
        /// Final value as a fraction of `peak`.
        alpha: f64,
        /// Steps of linear warmup (0 for none).
        warmup_steps: u64,
        /// Value at t = 0 when there is a warmup.
        warmup_start: f64,
    },
    /// `values[i]` while `t < boundaries[i]`, the last value afterwards
    /// (`values.len() == boundaries.len() + 1`, boundaries strictly increasing).
    Piecewise {
        /// Steps at which the value changes.
        boundaries: Vec<u64>,
        /// One more value than boundaries.
        values: Vec<f64>,
    },
    /// Any function of the step count.
    Custom(Arc<dyn Fn(u64) -> f64 + Send + Sync>),
    /// Lowered when a metric the user reports stops improving (torch's `ReduceLROnPlateau`);
    /// the value is the plateau's current one, whatever the step. See [`Plateau`].
    Plateau(Plateau),
}

impl Schedule {
    /// A constant value.
    pub fn constant(value: f64) -> Self {
        Schedule::Constant(value)
    }

    /// `initial * gamma^floor(t / step_size)`.
    pub fn step(initial: f64, gamma: f64, step_size: u64) -> Self {
        Schedule::Step { initial, gamma, step_size }
    }

    /// `initial * decay_rate^(t / decay_steps)` (continuous).
    pub fn exponential(initial: f64, decay_rate: f64, decay_steps: u64) -> Self {
        Schedule::Exponential { initial, decay_rate, decay_steps, staircase: false }
    }

    /// `initial / (1 + decay_rate * t / decay_steps)` (continuous).
    pub fn inverse_time(initial: f64, decay_rate: f64, decay_steps: u64) -> Self {
        Schedule::InverseTime { initial, decay_rate, decay_steps, staircase: false }
    }

    /// Polynomial decay from `initial` to `end` over `decay_steps`.
    pub fn polynomial(initial: f64, end: f64, decay_steps: u64, power: f64) -> Self {
        Schedule::Polynomial { initial, end, decay_steps, power }
    }

    /// Cosine decay from `peak` to 0 over `decay_steps`, no warmup.
    pub fn cosine(peak: f64, decay_steps: u64) -> Self {
        Schedule::Cosine { peak, decay_steps, alpha: 0.0, warmup_steps: 0, warmup_start: 0.0 }
    }

    /// Piecewise-constant values between step boundaries.
    pub fn piecewise(boundaries: Vec<u64>, values: Vec<f64>) -> Self {
        Schedule::Piecewise { boundaries, values }
    }

    /// A user function of the step count.
    ///
    /// ```
    /// let s = caseopt::Schedule::custom(|t| if t < 10 { 1.0 } else { 0.5 });
    /// assert_eq!(s.value(12), 0.5);
    /// ```
    pub fn custom(f: impl Fn(u64) -> f64 + Send + Sync + 'static) -> Self {
        Schedule::Custom(Arc::new(f))
    }

    /// Exponential and inverse-time schedules that decay in jumps; others are unchanged.
    pub fn staircase(self) -> Self {
        match self {
            Schedule::Exponential { initial, decay_rate, decay_steps, .. } => {
                Schedule::Exponential { initial, decay_rate, decay_steps, staircase: true }
            }
            Schedule::InverseTime { initial, decay_rate, decay_steps, .. } => {
                Schedule::InverseTime { initial, decay_rate, decay_steps, staircase: true }
            }
            other => other,
        }
    }

    /// A cosine schedule's linear warmup from `start` over `steps`; others are unchanged.
    pub fn with_warmup(self, steps: u64, start: f64) -> Self {
        match self {
            Schedule::Cosine { peak, decay_steps, alpha, .. } => Schedule::Cosine {
                peak,
                decay_steps,
                alpha,
                warmup_steps: steps,
                warmup_start: start,
            },
            other => other,
        }
    }

    /// A cosine schedule's final value as a fraction of its peak; others are unchanged.
    pub fn with_alpha(self, alpha: f64) -> Self {
        match self {
            Schedule::Cosine { peak, decay_steps, warmup_steps, warmup_start, .. } => {
                Schedule::Cosine { peak, decay_steps, alpha, warmup_steps, warmup_start }
            }
            other => other,
        }
    }

    /// The constant value, if this schedule is constant.
    pub fn as_constant(&self) -> Option<f64> {
        match self {
            Schedule::Constant(v) => Some(*v),
            _ => None,
        }
    }

    /// The value at step `t` (first step `t = 0`).
    pub fn value(&self, t: u64) -> f64 {
        let tf = t as f64;
        match self {
            Schedule::Constant(v) => *v,
            Schedule::Step { initial, gamma, step_size } => {
                initial * gamma.powf((t / (*step_size).max(1)) as f64)
            }
            Schedule::Exponential { initial, decay_rate, decay_steps, staircase } => {
                let mut p = tf / (*decay_steps).max(1) as f64;
                if *staircase {
                    p = p.floor();
                }
                initial * decay_rate.powf(p)
            }
            Schedule::InverseTime { initial, decay_rate, decay_steps, staircase } => {
                let mut p = tf / (*decay_steps).max(1) as f64;
                if *staircase {
                    p = p.floor();
                }
                initial / (1.0 + decay_rate * p)
            }
            Schedule::Polynomial { initial, end, decay_steps, power } => {
                let steps = (*decay_steps).max(1) as f64;
                let frac = 1.0 - tf.min(steps) / steps;
                (initial - end) * frac.powf(*power) + end
            }
            Schedule::Cosine { peak, decay_steps, alpha, warmup_steps, warmup_start } => {
                if t < *warmup_steps {
                    return warmup_start + (peak - warmup_start) * tf / *warmup_steps as f64;
                }
                let steps = (*decay_steps).max(1) as f64;
                let done = ((t - warmup_steps) as f64).min(steps);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * done / steps).cos());
                peak * ((1.0 - alpha) * cosine + alpha)
            }
            Schedule::Piecewise { boundaries, values } => {
                let i = boundaries.iter().take_while(|&&b| t >= b).count();
                values.get(i).or(values.last()).copied().unwrap_or(f64::NAN)
            }
            Schedule::Custom(f) => f(t),
            Schedule::Plateau(p) => p.value(),
        }
    }

    /// Whether evaluating it calls user code (a [`custom`](Self::custom) closure).
    pub(crate) fn calls_user_code(&self) -> bool {
        matches!(self, Schedule::Custom(_))
    }

    /// Checks the schedule's own parameters (not the range of the hyperparameter it feeds;
    /// optimizers check each value when they use it).
    ///
    /// ```
    /// assert!(caseopt::Schedule::step(0.1, 0.5, 0).validate().is_err());
    /// assert!(caseopt::Schedule::piecewise(vec![10], vec![1.0]).validate().is_err());
    /// assert!(caseopt::Schedule::piecewise(vec![10], vec![1.0, 0.1]).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(format!("{name} must be at least 1"))
            } else {
                Ok(())
            }
        };
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be finite, got {v}"))
            }
        };
        match self {
            // A constant is the hyperparameter itself: its range check reports it by name.
            Schedule::Constant(_) => Ok(()),
            Schedule::Step { initial, gamma, step_size } => {
                finite("initial", *initial)?;
                finite("gamma", *gamma)?;
                positive("step_size", *step_size)
            }
            Schedule::Exponential { initial, decay_rate, decay_steps, .. }
            | Schedule::InverseTime { initial, decay_rate, decay_steps, .. } => {
                finite("initial", *initial)?;
                finite("decay_rate", *decay_rate)?;
                positive("decay_steps", *decay_steps)
            }
            Schedule::Polynomial { initial, end, decay_steps, power } => {
                finite("initial", *initial)?;
                finite("end", *end)?;
                finite("power", *power)?;
                positive("decay_steps", *decay_steps)
            }
            Schedule::Cosine { peak, decay_steps, alpha, warmup_start, .. } => {
                finite("peak", *peak)?;
                finite("alpha", *alpha)?;
                finite("warmup_start", *warmup_start)?;
                positive("decay_steps", *decay_steps)
            }
            Schedule::Piecewise { boundaries, values } => {
                if values.len() != boundaries.len() + 1 {
                    return Err(format!(
                        "piecewise schedule needs one more value than boundaries, got {} values for {} boundaries",
                        values.len(),
                        boundaries.len()
                    ));
                }
                if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("piecewise boundaries must be strictly increasing".into());
                }
                values.iter().try_for_each(|v| finite("value", *v))
            }
            Schedule::Custom(_) => Ok(()),
            Schedule::Plateau(p) => p.config.validate(),
        }
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant(v) => write!(f, "{v:?}"),
            Schedule::Step { initial, gamma, step_size } => {
                write!(f, "step({initial:?}, gamma={gamma:?}, every {step_size})")
            }
            Schedule::Exponential { initial, decay_rate, decay_steps, staircase } => write!(
                f,
                "exponential({initial:?}, rate={decay_rate:?}, steps={decay_steps}{})",
                if *staircase { ", staircase" } else { "" }
            ),
            Schedule::InverseTime { initial, decay_rate, decay_steps, staircase } => write!(
                f,
                "inverse_time({initial:?}, rate={decay_rate:?}, steps={decay_steps}{})",
                if *staircase { ", staircase" } else { "" }
            ),
            Schedule::Polynomial { initial, end, decay_steps, power } => {
                write!(f, "polynomial({initial:?} -> {end:?}, steps={decay_steps}, power={power:?})")
            }
            Schedule::Cosine { peak, decay_steps, alpha, warmup_steps, warmup_start } => write!(
                f,
                "cosine(peak={peak:?}, steps={decay_steps}, alpha={alpha:?}, warmup={warmup_steps} from {warmup_start:?})"
            ),
            Schedule::Piecewise { boundaries, values } => {
                write!(f, "piecewise({boundaries:?}, {values:?})")
            }
            Schedule::Custom(_) => write!(f, "custom(fn)"),
            Schedule::Plateau(p) => write!(f, "{p:?}"),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<Plateau> for Schedule {
    fn from(p: Plateau) -> Self {
        Schedule::Plateau(p)
    }
}

/// Which way a [`Plateau`]'s metric improves (torch's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlateauMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// How a [`Plateau`]'s `threshold` measures a significant improvement (torch's
/// `threshold_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdMode {
    /// Relative: better than `best * (1 - threshold)` (`Min`) or `best * (1 + threshold)`
    /// (`Max`).
    Rel,
    /// Absolute: better than `best - threshold` (`Min`) or `best + threshold` (`Max`).
    Abs,
}

/// A [`Plateau`]'s settings; `Default` is torch's `ReduceLROnPlateau`'s, with an initial value
/// of 1e-3 (torch takes it from the optimizer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlateauConfig {
    /// The value before any reduction.
    pub initial: f64,
    /// Whether the metric should fall or rise. Default [`PlateauMode::Min`].
    pub mode: PlateauMode,
    /// The value is multiplied by it at each reduction, in [0, 1). Default 0.1.
    pub factor: f64,
    /// Reports without improvement tolerated before a reduction. Default 10.
    pub patience: u64,
    /// The least improvement that counts (>= 0). Default 1e-4.
    pub threshold: f64,
    /// How `threshold` is measured. Default [`ThresholdMode::Rel`].
    pub threshold_mode: ThresholdMode,
    /// Reports after a reduction during which bad reports are not counted. Default 0.
    pub cooldown: u64,
    /// The value is never lowered below it (>= 0). Default 0.
    pub min_value: f64,
    /// A reduction smaller than this is not made (>= 0). Default 1e-8.
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        PlateauConfig {
            initial: 1e-3,
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_value: 0.0,
            eps: 1e-8,
        }
    }
}

impl PlateauConfig {
    fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: f64, ok: bool, what: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("plateau {name} must be {what}, got {v}"))
            }
        };
        check("initial", self.initial, true, "finite")?;
        check("factor", self.factor, (0.0..1.0).contains(&self.factor), "in [0, 1)")?;
        check("threshold", self.threshold, self.threshold >= 0.0, ">= 0")?;
        check("min_value", self.min_value, self.min_value >= 0.0, ">= 0")?;
        check("eps", self.eps, self.eps >= 0.0, ">= 0")
    }

    /// The worst possible metric, where `best` starts: +inf for `Min`, -inf for `Max`.
    fn worst(&self) -> f64 {
        match self.mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        }
    }

    /// torch's `_is_better`, in the same f64 operations.
    fn is_better(&self, a: f64, best: f64) -> bool {
        match (self.mode, self.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < best * (1.0 - self.threshold),
            (PlateauMode::Min, ThresholdMode::Abs) => a < best - self.threshold,
            (PlateauMode::Max, ThresholdMode::Rel) => a > best * (self.threshold + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > best + self.threshold,
        }
    }
}

/// Where a [`Plateau`] stands: its value and the memory of past reports (torch's
/// `ReduceLROnPlateau` attributes of the same names). Checkpoints store it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlateauState {
    /// The current value.
    pub value: f64,
    /// The best metric reported so far (`best`).
    pub best: f64,
    /// Reports since the last improvement, not counting those in a cooldown.
    pub num_bad_epochs: u64,
    /// Reports left in the current cooldown.
    pub cooldown_counter: u64,
    /// Reports so far (`last_epoch`).
    pub last_epoch: u64,
}

/// A hyperparameter lowered when a metric stops improving, with torch 2.13's
/// `ReduceLROnPlateau` semantics (mode, factor, patience, threshold and its mode, cooldown,
/// minimum, eps), bit for bit.
///
/// A `Plateau` is a handle: its clones share one state. Give a clone to the optimizer as the
/// hyperparameter's schedule ([`Plateau::schedule`], or `lr: (plateau.schedule())` in a
/// `case_optimizer!` rule) and [`report`](Plateau::report) the metric on the one you keep,
/// after each epoch, where torch calls `scheduler.step(metric)`: the optimizer's next step
/// uses the new value. Checkpoints save and restore its state with the router's.
///
/// ```
/// use caseopt::{Plateau, PlateauConfig};
///
/// let plateau = Plateau::new(PlateauConfig { initial: 0.1, patience: 1, ..Default::default() });
/// let lr = plateau.schedule(); // lr: (plateau.schedule()) in a rule
/// for loss in [1.0, 0.5, 0.6, 0.55] {
///     plateau.report(loss);
/// }
/// // Two reports without improvement on 0.5, more than the patience of 1: lowered tenfold.
/// assert!((lr.value(0) - 0.01).abs() < 1e-15);
/// assert_eq!(plateau.state().best, 0.5);
/// ```
#[derive(Clone)]
pub struct Plateau {
    config: PlateauConfig,
    state: Arc<Mutex<PlateauState>>,
}

impl Plateau {
    /// A plateau at `config.initial`, with no report yet. Its settings are checked where it is
    /// used, as every schedule's are (an optimizer refuses it with
    /// [`InvalidSchedule`](crate::Error::InvalidSchedule)).
    pub fn new(config: PlateauConfig) -> Self {
        let state = PlateauState {
            value: config.initial,
            best: config.worst(),
            num_bad_epochs: 0,
            cooldown_counter: 0,
            last_epoch: 0,
        };
        Plateau { config, state: Arc::new(Mutex::new(state)) }
    }

    /// The schedule that reads this plateau's value (a clone of the handle).
    pub fn schedule(&self) -> Schedule {
        Schedule::Plateau(self.clone())
    }

    /// Its settings.
    pub fn config(&self) -> PlateauConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlateauState> {
        // The state is plain numbers, whole after any panic: a poisoned lock holds a valid one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current value.
    pub fn value(&self) -> f64 {
        self.lock().value
    }

    /// Where it stands.
    pub fn state(&self) -> PlateauState {
        *self.lock()
    }

    /// Replaces where it stands (what a checkpoint's load does).
    pub fn set_state(&self, state: PlateauState) {
        *self.lock() = state;
    }

    /// Reports the metric of an epoch (torch's `scheduler.step(metrics)`): counts it as an
    /// improvement or not, and lowers the value by `factor` (not below `min_value`) once more
    /// than `patience` reports in a row, outside a cooldown, brought no improvement. Returns
    /// whether the value was lowered. A NaN metric is never an improvement.
    pub fn report(&self, metric: f64) -> bool {
        let c = &self.config;
        let mut s = self.lock();
        s.last_epoch += 1;
        if c.is_better(metric, s.best) {
            s.best = metric;
            s.num_bad_epochs = 0;
        } else {
            s.num_bad_epochs += 1;
        }
        if s.cooldown_counter > 0 {
            s.cooldown_counter -= 1;
            s.num_bad_epochs = 0;
        }
        let mut lowered = false;
        if s.num_bad_epochs > c.patience {
            let old = s.value;
            // Python's `max(old * factor, min_lr)`: the first unless the second is larger.
            let scaled = old * c.factor;
            let new = if c.min_value > scaled { c.min_value } else { scaled };
            if old - new > c.eps {
                s.value = new;
                lowered = true;
            }
            s.cooldown_counter = c.cooldown;
            s.num_bad_epochs = 0;
        }
        lowered
    }
}

impl fmt::Debug for Plateau {
    /// Its settings, not its state: the description a checkpoint compares (the state is saved
    /// beside it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(
            f,
            "plateau(initial={:?}, mode={:?}, factor={:?}, patience={}, threshold={:?} {:?}, \
             cooldown={}, min={:?}, eps={:?})",
            c.initial,
            c.mode,
            c.factor,
            c.patience,
            c.threshold,
            c.threshold_mode,
            c.cooldown,
            c.min_value,
            c.eps
        )
    }
}

impl From<f64> for Schedule {
    fn from(v: f64) -> Self {
        Schedule::Constant(v)
    }
}

/// A schedule read from a config file (see [`Builtin::build`](crate::Builtin::build)) is a
/// number, the constant schedule; other schedules are built in code.
///
/// ```
/// let s: caseopt::Schedule = serde_json::from_str("0.01")?;
/// assert_eq!(s.value(1000), 0.01);
/// assert!(serde_json::from_str::<caseopt::Schedule>("\"cosine\"").is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        f64::deserialize(d).map(Schedule::Constant)
    }
}

impl From<f32> for Schedule {
    fn from(v: f32) -> Self {
        Schedule::Constant(v as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_decays_every_step_size() {
        let s = Schedule::step(1.0, 0.5, 10);
        assert_eq!(s.value(0), 1.0);
        assert_eq!(s.value(9), 1.0);
        assert_eq!(s.value(10), 0.5);
        assert_eq!(s.value(25), 0.25);
    }

    #[test]
    fn exponential_continuous_and_staircase() {
        let s = Schedule::exponential(1.0, 0.5, 10);
        assert!((s.value(5) - 0.5f64.sqrt()).abs() < 1e-15);
        assert_eq!(s.clone().staircase().value(15), 0.5);
        assert_eq!(s.value(20), 0.25);
    }

    #[test]
    fn inverse_time_matches_keras_formula() {
        let s = Schedule::inverse_time(1.0, 0.5, 2);
        assert_eq!(s.value(4), 0.5);
        assert_eq!(s.clone().staircase().value(3), 1.0 / 1.5);
    }

    #[test]
    fn polynomial_reaches_end_and_stays() {
        let s = Schedule::polynomial(1.0, 0.1, 10, 1.0);
        assert_eq!(s.value(0), 1.0);
        assert!((s.value(5) - 0.55).abs() < 1e-15);
        assert!((s.value(10) - 0.1).abs() < 1e-15);
        assert!((s.value(100) - 0.1).abs() < 1e-15);
    }

    #[test]
    fn cosine_with_warmup_and_alpha() {
        let s = Schedule::cosine(1.0, 10).with_alpha(0.1).with_warmup(4, 0.2);
        assert_eq!(s.value(0), 0.2);
        assert!((s.value(2) - 0.6).abs() < 1e-15);
        assert_eq!(s.value(4), 1.0);
        assert!((s.value(9) - (0.9 * 0.5 + 0.1)).abs() < 1e-12);
        assert!((s.value(14) - 0.1).abs() < 1e-15);
        assert!((s.value(1000) - 0.1).abs() < 1e-15);
    }

    #[test]
    fn piecewise_switches_at_boundaries() {
        let s = Schedule::piecewise(vec![10, 20], vec![1.0, 0.5, 0.1]);
        assert_eq!(s.value(9), 1.0);
        assert_eq!(s.value(10), 0.5);
        assert_eq!(s.value(19), 0.5);
        assert_eq!(s.value(20), 0.1);
        assert!(s.validate().is_ok());
        assert!(Schedule::piecewise(vec![20, 10], vec![1.0, 0.5, 0.1]).validate().is_err());
    }

    #[test]
    fn custom_and_conversions() {
        let s = Schedule::custom(|t| t as f64 * 2.0);
        assert_eq!(s.value(21), 42.0);
        assert_eq!(Schedule::from(0.5f32).as_constant(), Some(0.5));
        assert!(Schedule::exponential(1.0, 0.5, 0).validate().is_err());
    }

    #[test]
    fn plateau_follows_reduce_lr_on_plateau() {
        // min/rel, patience 2, cooldown 1: torch's sequence worked by hand.
        let p = Plateau::new(PlateauConfig {
            initial: 1.0,
            factor: 0.5,
            patience: 2,
            cooldown: 1,
            min_value: 0.2,
            ..Default::default()
        });
        let s = p.schedule();
        let values: Vec<f64> = [5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
            .iter()
            .map(|&m| {
                p.report(m);
                s.value(99)
            })
            .collect();
        // Bad reports: 3 at the 5th report (> patience 2) -> 0.5, then a cooldown of 1 and
        // three more bad -> 0.25 at the 9th, then 0.2 (the minimum) at the 13th.
        assert_eq!(values, [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.2]);
        assert_eq!(p.state().last_epoch, 13);
        assert!(format!("{s:?}").starts_with("plateau(initial=1.0, mode=Min"));
        assert!(Schedule::from(Plateau::new(PlateauConfig { factor: 1.0, ..Default::default() }))
            .validate()
            .is_err());
    }
}
