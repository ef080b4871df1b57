//! The runtime's optimizers as the macro knows them: names, fields and the literal ranges of
//! their hyperparameters, mirroring the `hyperparameters!` invocations in runtime/optim/*.rs
//! (a unit test in the runtime's test suite compares the two).

/// A hyperparameter's accepted range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
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
    /// Whether `v` is accepted.
    pub fn contains(self, v: f64) -> bool {
        match self {
            Range::NonNegative => v >= 0.0,
            Range::Positive => v > 0.0,
            Range::UnitOpenClosed => v > 0.0 && v <= 1.0,
            Range::UnitClosedOpen => (0.0..1.0).contains(&v),
        }
    }

    /// The range in words, as the runtime's errors write it.
    pub fn describe(self) -> &'static str {
        match self {
            Range::NonNegative => ">= 0",
            Range::Positive => "> 0",
            Range::UnitOpenClosed => "in (0, 1]",
            Range::UnitClosedOpen => "in [0, 1)",
        }
    }
}

/// What kind of value a config field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A `Schedule` (a number or a schedule) with its range.
    Schedule(Range),
    /// A plain `f64` with its range.
    Float(Range),
    /// A `bool`.
    Bool,
}

/// One of the runtime's optimizers.
#[derive(Debug)]
pub struct Builtin {
    /// The type's name in `caseopt` (`Bop`).
    pub name: &'static str,
    /// Its config's fields.
    pub fields: &'static [(&'static str, Field)],
}

impl Builtin {
    /// The field named `key`, if the config has it.
    pub fn field(&self, key: &str) -> Option<Field> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
    }
}

use Field::{Bool, Float, Schedule};
use Range::{NonNegative, Positive, UnitClosedOpen, UnitOpenClosed};

const ADAM_FIELDS: &[(&str, Field)] = &[
    ("lr", Schedule(NonNegative)),
    ("beta1", Schedule(UnitClosedOpen)),
    ("beta2", Schedule(UnitClosedOpen)),
    ("eps", Schedule(Positive)),
    ("weight_decay", Schedule(NonNegative)),
    ("amsgrad", Bool),
    ("maximize", Bool),
];

/// Every optimizer a single-segment name in a rule refers to.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "Bop",
        fields: &[("threshold", Schedule(NonNegative)), ("gamma", Schedule(UnitOpenClosed))],
    },
    Builtin {
        name: "Bop2ndOrder",
        fields: &[
            ("threshold", Schedule(NonNegative)),
            ("gamma", Schedule(UnitOpenClosed)),
            ("sigma", Schedule(UnitOpenClosed)),
        ],
    },
    Builtin {
        name: "Sgd",
        fields: &[
            ("lr", Schedule(NonNegative)),
            ("momentum", Schedule(NonNegative)),
            ("dampening", Schedule(NonNegative)),
            ("weight_decay", Schedule(NonNegative)),
            ("nesterov", Bool),
            ("maximize", Bool),
        ],
    },
    Builtin { name: "Adam", fields: ADAM_FIELDS },
    Builtin { name: "AdamW", fields: ADAM_FIELDS },
    Builtin {
        name: "RmsProp",
        fields: &[
            ("lr", Schedule(NonNegative)),
            ("alpha", Schedule(NonNegative)),
            ("eps", Schedule(Positive)),
            ("weight_decay", Schedule(NonNegative)),
            ("momentum", Schedule(NonNegative)),
            ("centered", Bool),
            ("maximize", Bool),
        ],
    },
    Builtin {
        name: "Adagrad",
        fields: &[
            ("lr", Schedule(NonNegative)),
            ("lr_decay", Schedule(NonNegative)),
            ("weight_decay", Schedule(NonNegative)),
            ("initial_accumulator_value", Float(NonNegative)),
            ("eps", Schedule(Positive)),
            ("maximize", Bool),
        ],
    },
];

/// The built-in optimizer called `name`.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_the_runtime_wording() {
        assert!(UnitOpenClosed.contains(1.0) && !UnitOpenClosed.contains(0.0));
        assert!(UnitClosedOpen.contains(0.0) && !UnitClosedOpen.contains(1.0));
        assert!(!Positive.contains(0.0) && NonNegative.contains(0.0));
        assert!(!NonNegative.contains(f64::NAN));
        assert_eq!(find("Bop").and_then(|b| b.field("gamma")), Some(Schedule(UnitOpenClosed)));
        assert_eq!(
            find("Adagrad").and_then(|b| b.field("initial_accumulator_value")),
            Some(Float(NonNegative))
        );
        assert!(find("SGD").is_none());
    }
}
