//! Hyperparameters: their accepted ranges, and the [`Hyperparameters`] contract every built-in
//! optimizer's config fulfils through one declarative table ([`hyperparameters!`]).

use std::fmt::Debug;

use crate::error::{Error, Result};
use crate::schedule::Schedule;

/// A hyperparameter's accepted range: the one table the macro checks literals against and the
/// runtime checks every value a schedule yields against.
pub(crate) use caseopt_rules::Range;

/// `v` itself when it is finite and in `range`, else the error naming the hyperparameter.
pub(crate) fn check(
    range: Range,
    optimizer: &'static str,
    name: &'static str,
    v: f64,
) -> Result<f64> {
    if v.is_finite() && range.contains(v) {
        Ok(v)
    } else {
        Err(Error::InvalidHyperparameter { optimizer, name, value: v, expected: range.describe() })
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
    /// Their ranges, aligned with [`NAMES`](Self::NAMES).
    const RANGES: &'static [Range];

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
    ($kind:ident, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? }) => {
        hyperparameters!(@impl $kind, $config, $values, {}, { $($field: $range),* });
    };
    ($kind:ident, $config:ident, $values:ident { $($field:ident : $range:ident),* $(,)? },
     extra_checks = $extra:path) => {
        hyperparameters!(@impl $kind, $config, $values,
            { fn extra_checks(&self) -> $crate::error::Result<()> { $extra(self) } },
            { $($field: $range),* });
    };
    (@impl $kind:ident, $config:ident, $values:ident, { $($extra:tt)* },
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
            const OPTIMIZER: &'static str = caseopt_rules::OptimizerKind::$kind.display_name();
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
            const RANGES: &'static [$crate::optim::hyper::Range] =
                &[$($crate::optim::hyper::Range::$range),*];

            fn values_at(&self, t: u64) -> $crate::error::Result<$values> {
                use $crate::optim::hyper::{check, Range};
                Ok($values {
                    $($field: check(Range::$range, Self::OPTIMIZER, stringify!($field), self.$field.value(t))?,)*
                })
            }

            fn validate_schedules(&self) -> $crate::error::Result<()> {
                use $crate::optim::hyper::{check, Range};
                $(
                    self.$field.validate().map_err(|reason| $crate::error::Error::InvalidSchedule {
                        optimizer: Self::OPTIMIZER,
                        name: stringify!($field),
                        reason,
                    })?;
                    check(Range::$range, Self::OPTIMIZER, stringify!($field), self.$field.value(0))?;
                )*
                Ok(())
            }

            fn schedule(&self, name: &str) -> $crate::error::Result<&$crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&self.$field),)*
                    _ => Err($crate::optim::hyper::unknown(Self::OPTIMIZER, name, Self::NAMES)),
                }
            }

            fn schedule_mut(
                &mut self,
                name: &str,
            ) -> $crate::error::Result<&mut $crate::schedule::Schedule> {
                match name {
                    $(stringify!($field) => Ok(&mut self.$field),)*
                    _ => Err($crate::optim::hyper::unknown(Self::OPTIMIZER, name, Self::NAMES)),
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
    fn values_are_checked_against_their_range() {
        assert_eq!(check(Range::NonNegative, "X", "lr", 0.0).unwrap(), 0.0);
        assert!(check(Range::Positive, "X", "eps", 0.0).is_err());
        assert!(check(Range::UnitOpenClosed, "X", "gamma", 1.0).is_ok());
        assert!(check(Range::UnitClosedOpen, "X", "beta1", 1.0).is_err());
        assert!(check(Range::NonNegative, "X", "lr", f64::NAN).is_err());
        assert!(check(Range::NonNegative, "X", "lr", f64::INFINITY).is_err());
    }
}
