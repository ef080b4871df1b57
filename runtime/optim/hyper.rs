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

/// Declares a config's scheduled hyperparameters by name: it implements [`Hyperparameters`]
/// for the config and defines the struct of their values at one step. Every range comes from the
/// optimizer's entry in the identity table (`caseopt_rules::OptimizerKind::fields`, which the
/// macro checks rules against), read in const evaluation: a name that is no schedule there, or
/// a list shorter or longer than the table's, stops the build. `floats = [...]` names the plain
/// `f64` fields with a range (Adagrad's `initial_accumulator_value`), checked by `validate`;
/// `extra_checks = path` adds checks beyond ranges.
macro_rules! hyperparameters {
    ($kind:ident, $config:ident, $values:ident { $($field:ident),* $(,)? }
     $(, floats = [$($float:ident),* $(,)?])?
     $(, extra_checks = $extra:path)? $(,)?) => {
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

        // The table lists exactly the identity table's schedules and plain floats.
        const _: () = {
            use caseopt_rules::OptimizerKind;
            assert!(
                OptimizerKind::$kind.count(false) == {
                    let fields: &[&str] = &[$(stringify!($field)),*];
                    fields.len()
                },
                "the hyperparameters! table must list every schedule of the identity table"
            );
            assert!(
                OptimizerKind::$kind.count(true) == {
                    let floats: &[&str] = &[$($(stringify!($float)),*)?];
                    floats.len()
                },
                "the hyperparameters! table must list every plain float of the identity table"
            );
        };

        impl $crate::optim::hyper::Hyperparameters for $config {
            type Values = $values;
            const OPTIMIZER: &'static str = caseopt_rules::OptimizerKind::$kind.display_name();
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
            const RANGES: &'static [$crate::optim::hyper::Range] =
                &[$(caseopt_rules::OptimizerKind::$kind.schedule_range(stringify!($field))),*];

            fn values_at(&self, t: u64) -> $crate::error::Result<$values> {
                use $crate::optim::hyper::check;
                Ok($values {
                    $($field: check(
                        const { caseopt_rules::OptimizerKind::$kind.schedule_range(stringify!($field)) },
                        Self::OPTIMIZER,
                        stringify!($field),
                        self.$field.value(t),
                    )?,)*
                })
            }

            fn validate_schedules(&self) -> $crate::error::Result<()> {
                use $crate::optim::hyper::check;
                $(
                    self.$field.validate().map_err(|reason| $crate::error::Error::InvalidSchedule {
                        optimizer: Self::OPTIMIZER,
                        name: stringify!($field),
                        reason,
                    })?;
                    check(
                        const { caseopt_rules::OptimizerKind::$kind.schedule_range(stringify!($field)) },
                        Self::OPTIMIZER,
                        stringify!($field),
                        self.$field.value(0),
                    )?;
                )*
                $($(
                    check(
                        const { caseopt_rules::OptimizerKind::$kind.float_range(stringify!($float)) },
                        Self::OPTIMIZER,
                        stringify!($float),
                        self.$float,
                    )?;
                )*)?
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

            $(
                fn extra_checks(&self) -> $crate::error::Result<()> {
                    $extra(self)
                }
            )?
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
