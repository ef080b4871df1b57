//! Hyperparameters: their accepted ranges, and the [`Hyperparameters`] contract every built-in
//! optimizer's config fulfils through one declarative table ([`hyperparameters!`]).

use std::fmt::Debug;

use crate::error::{Error, Result};
use crate::schedule::Schedule;

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

    /// `v` itself when it is finite and in range, else the error naming the hyperparameter.
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

/// A built-in optimizer's configuration as the optimizer core uses it: its scheduled
/// hyperparameters by name, their values at one step, and its validation.
///
/// Implemented by [`hyperparameters!`]; configs with checks beyond the ranges (SGD's Nesterov
/// condition, Adagrad's initial accumulator) add them in [`extra_checks`](Self::extra_checks).
pub trait Hyperparameters: Clone + Debug + Default + Send + 'static {
    /// The values of every scheduled hyperparameter at one step.
    type Values: Copy + Debug;
    /// The optimizer's name in errors (`"Adam"`).
    const OPTIMIZER: &'static str;
    /// Names of the scheduled hyperparameters, in declaration order.
    const NAMES: &'static [&'static str];

    /// Every hyperparameter's value at step `t`, each checked against its range.
    fn values_at(&self, t: u64) -> Result<Self::Values>;

    /// Checks every schedule and the value each takes at step 0.
    fn validate_schedules(&self) -> Result<()>;

    /// The schedule named `name`.
    fn schedule(&self, name: &str) -> Result<&Schedule>;

    /// The schedule named `name`, to replace it.
    fn schedule_mut(&mut self, name: &str) -> Result<&mut Schedule>;

    /// Checks beyond the ranges of single values; none by default.
    fn extra_checks(&self) -> Result<()> {
        Ok(())
    }

    /// The whole validation of a config: its schedules, then [`extra_checks`](Self::extra_checks).
    fn validate(&self) -> Result<()> {
        self.validate_schedules()?;
        self.extra_checks()
    }

    /// Replaces a schedule, keeping the config unchanged when the result is invalid.
    fn set_schedule(&mut self, name: &str, value: Schedule) -> Result<()> {
        let mut next = self.clone();
        *next.schedule_mut(name)? = value;
        next.validate()?;
        *self = next;
        Ok(())
    }
}

/// The error for a hyperparameter name an optimizer does not have, listing those it has.
pub(crate) fn unknown(optimizer: &'static str, name: &str, known: &[&str]) -> Error {
    Error::UnknownHyperparameter {
        optimizer,
        name: name.to_string(),
        known: known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
    }
}

/// Declares a config's scheduled hyperparameters once, as a table of names and ranges: it
/// implements [`Hyperparameters`] for the config and defines the struct of their values at one
/// step. The contract is the trait's, checked by the compiler; the table only spares writing
/// each name four times.
macro_rules! hyperparameters {
    ($opt:literal, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? }) => {
        hyperparameters!(@impl $opt, $config, $values, {}, { $($field: $range),* });
    };
    ($opt:literal, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? },
     extra_checks = $extra:path) => {
        hyperparameters!(@impl $opt, $config, $values,
            { fn extra_checks(&self) -> $crate::error::Result<()> { $extra(self) } },
            { $($field: $range),* });
    };
    (@impl $opt:literal, $config:ident, $values:ident, { $($extra:tt)* },
     { $($field:ident : $range:ident),* }) => {
        /// Hyperparameter values at one step.
        #[derive(Debug, Clone, Copy)]
        pub struct $values {
            $(pub(crate) $field: f64,)*
        }

        impl $config {
            /// Names of the scheduled hyperparameters.
            pub fn names(&self) -> &'static [&'static str] {
                <Self as $crate::optim::hyper::Hyperparameters>::NAMES
            }
        }

        impl $crate::optim::hyper::Hyperparameters for $config {
            type Values = $values;
            const OPTIMIZER: &'static str = $opt;
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            fn values_at(&self, t: u64) -> $crate::error::Result<$values> {
                use $crate::optim::hyper::Range;
                Ok($values {
                    $($field: Range::$range.check($opt, stringify!($field), self.$field.value(t))?,)*
                })
            }

            fn validate_schedules(&self) -> $crate::error::Result<()> {
                use $crate::optim::hyper::Range;
                $(
                    self.$field.validate().map_err(|reason| $crate::error::Error::InvalidSchedule {
                        optimizer: $opt,
                        name: stringify!($field),
                        reason,
                    })?;
                    Range::$range.check($opt, stringify!($field), self.$field.value(0))?;
                )*
                Ok(())
            }

            fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&self.$field),)*
                    _ => Err($crate::optim::hyper::unknown($opt, name, Self::NAMES)),
                }
            }

            fn schedule_mut(
                &mut self,
                name: &str,
            ) -> $crate::error::Result<&mut $crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&mut self.$field),)*
                    _ => Err($crate::optim::hyper::unknown($opt, name, Self::NAMES)),
                }
            }

            $($extra)*
        }
    };
}
pub(crate) use hyperparameters;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_their_bounds_as_documented() {
        assert!(Range::NonNegative.check("X", "lr", 0.0).is_ok());
        assert!(Range::Positive.check("X", "eps", 0.0).is_err());
        assert!(Range::UnitOpenClosed.check("X", "gamma", 1.0).is_ok());
        assert!(Range::UnitOpenClosed.check("X", "gamma", 0.0).is_err());
        assert!(Range::UnitClosedOpen.check("X", "beta1", 0.0).is_ok());
        assert!(Range::UnitClosedOpen.check("X", "beta1", 1.0).is_err());
        assert!(Range::NonNegative.check("X", "lr", f64::NAN).is_err());
        assert!(Range::NonNegative.check("X", "lr", f64::INFINITY).is_err());
    }
}
