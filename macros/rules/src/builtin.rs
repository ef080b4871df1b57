//! The runtime's built-in optimizers as data: their names (the Rust type's and torch's), their
//! config fields and the ranges of their hyperparameters. The one table: the macro checks a
//! rule's literals against it, and the runtime's `hyperparameters!` tables (runtime/optim/*.rs)
//! take every range from it at compile time, so the two cannot disagree. Needs no syntax crates,
//! so the runtime can share it.

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
    /// `v <= 0` (Adafactor's `beta2_decay`).
    NonPositive,
    /// `v >= 1` (Adafactor's clipping threshold `d`).
    AtLeastOne,
}

impl Range {
    /// Whether `v` is accepted.
    pub fn contains(self, v: f64) -> bool {
        match self {
            Range::NonNegative => v >= 0.0,
            Range::Positive => v > 0.0,
            Range::UnitOpenClosed => v > 0.0 && v <= 1.0,
            Range::UnitClosedOpen => (0.0..1.0).contains(&v),
            Range::NonPositive => v <= 0.0,
            Range::AtLeastOne => v >= 1.0,
        }
    }

    /// The range in words, as the runtime's errors write it.
    pub fn describe(self) -> &'static str {
        match self {
            Range::NonNegative => ">= 0",
            Range::Positive => "> 0",
            Range::UnitOpenClosed => "in (0, 1]",
            Range::UnitClosedOpen => "in [0, 1)",
            Range::NonPositive => "<= 0",
            Range::AtLeastOne => ">= 1",
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
    /// A value of the field's own type (a tuple, an integer, an enum), checked by rustc.
    Value,
}

/// The key every built-in optimizer takes besides its config's fields: `master_weights: true`
/// trains f16 and bf16 variables with f32 state (and, where the algorithm needs one, an f32
/// master copy). A literal `true` or `false`, since it fixes the state's layout when the router
/// is built; it is not a config field (`Optimizer::set_master_weights` in the runtime).
pub const MASTER_WEIGHTS: &str = "master_weights";

/// One of the runtime's optimizers: the one name a rule's single-segment optimizer path, the
/// runtime's type, its printed name and its checkpoints all derive from.
///
/// Adding an optimizer is one variant here plus one arm in each method below (the compiler
/// lists them), and one entry in [`OptimizerKind::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    /// `caseopt::Bop`: larq's Bop.
    Bop,
    /// `caseopt::Bop2ndOrder`: Bop with a second-moment estimate.
    Bop2ndOrder,
    /// `caseopt::Sgd`: torch's SGD.
    Sgd,
    /// `caseopt::Adam`: torch's Adam.
    Adam,
    /// `caseopt::AdamW`: torch's AdamW.
    AdamW,
    /// `caseopt::RAdam`: torch's RAdam.
    RAdam,
    /// `caseopt::NAdam`: torch's NAdam.
    NAdam,
    /// `caseopt::RmsProp`: torch's RMSprop.
    RmsProp,
    /// `caseopt::Adagrad`: torch's Adagrad.
    Adagrad,
    /// `caseopt::Lion`: optax's Lion.
    Lion,
    /// `caseopt::Adafactor`: torch's Adafactor.
    Adafactor,
    /// `caseopt::Muon`: torch's Muon (2-D variables only).
    Muon,
}

use Field::{Bool, Float, Schedule, Value};
use Range::{AtLeastOne, NonNegative, NonPositive, Positive, UnitClosedOpen, UnitOpenClosed};

const ADAM_FIELDS: &[(&str, Field)] = &[
    ("lr", Schedule(NonNegative)),
    ("beta1", Schedule(UnitClosedOpen)),
    ("beta2", Schedule(UnitClosedOpen)),
    ("eps", Schedule(Positive)),
    ("weight_decay", Schedule(NonNegative)),
    ("amsgrad", Bool),
    ("maximize", Bool),
];

impl OptimizerKind {
    /// Every built-in optimizer, in the order the documentation lists them.
    pub const ALL: &'static [OptimizerKind] = &[
        OptimizerKind::Bop,
        OptimizerKind::Bop2ndOrder,
        OptimizerKind::Sgd,
        OptimizerKind::Adam,
        OptimizerKind::AdamW,
        OptimizerKind::RAdam,
        OptimizerKind::NAdam,
        OptimizerKind::RmsProp,
        OptimizerKind::Adagrad,
        OptimizerKind::Lion,
        OptimizerKind::Adafactor,
        OptimizerKind::Muon,
    ];

    /// The Rust type's name in `caseopt` (`Sgd`), which a rule names it by.
    pub const fn type_name(self) -> &'static str {
        match self {
            OptimizerKind::Bop => "Bop",
            OptimizerKind::Bop2ndOrder => "Bop2ndOrder",
            OptimizerKind::Sgd => "Sgd",
            OptimizerKind::Adam => "Adam",
            OptimizerKind::AdamW => "AdamW",
            OptimizerKind::RAdam => "RAdam",
            OptimizerKind::NAdam => "NAdam",
            OptimizerKind::RmsProp => "RmsProp",
            OptimizerKind::Adagrad => "Adagrad",
            OptimizerKind::Lion => "Lion",
            OptimizerKind::Adafactor => "Adafactor",
            OptimizerKind::Muon => "Muon",
        }
    }

    /// The name torch (or larq) gives it, which the runtime prints and stores in checkpoints
    /// (`SGD`, `RMSprop`).
    pub const fn display_name(self) -> &'static str {
        match self {
            OptimizerKind::Bop => "Bop",
            OptimizerKind::Bop2ndOrder => "Bop2ndOrder",
            OptimizerKind::Sgd => "SGD",
            OptimizerKind::Adam => "Adam",
            OptimizerKind::AdamW => "AdamW",
            OptimizerKind::RAdam => "RAdam",
            OptimizerKind::NAdam => "NAdam",
            OptimizerKind::RmsProp => "RMSprop",
            OptimizerKind::Adagrad => "Adagrad",
            OptimizerKind::Lion => "Lion",
            OptimizerKind::Adafactor => "Adafactor",
            OptimizerKind::Muon => "Muon",
        }
    }

    /// The number of dimensions every variable it trains must have (Muon: 2, as
    /// torch.optim.Muon), or `None` for any. The macro rejects a rule routing to it whose
    /// predicate does not imply `ndim(n)`; the runtime refuses any other variable.
    pub const fn required_ndim(self) -> Option<u64> {
        match self {
            OptimizerKind::Muon => Some(2),
            _ => None,
        }
    }

    /// The optimizer whose [`type_name`](Self::type_name) is `name`.
    pub fn from_type_name(name: &str) -> Option<OptimizerKind> {
        Self::ALL.iter().copied().find(|k| k.type_name() == name)
    }

    /// The optimizer whose [`display_name`](Self::display_name) is `name`.
    pub fn from_display_name(name: &str) -> Option<OptimizerKind> {
        Self::ALL.iter().copied().find(|k| k.display_name() == name)
    }

    /// Its config's fields, in declaration order, with what each holds.
    pub const fn fields(self) -> &'static [(&'static str, Field)] {
        match self {
            OptimizerKind::Bop => {
                &[("threshold", Schedule(NonNegative)), ("gamma", Schedule(UnitOpenClosed))]
            }
            OptimizerKind::Bop2ndOrder => &[
                ("threshold", Schedule(NonNegative)),
                ("gamma", Schedule(UnitOpenClosed)),
                ("sigma", Schedule(UnitOpenClosed)),
            ],
            OptimizerKind::Sgd => &[
                ("lr", Schedule(NonNegative)),
                ("momentum", Schedule(NonNegative)),
                ("dampening", Schedule(NonNegative)),
                ("weight_decay", Schedule(NonNegative)),
                ("nesterov", Bool),
                ("maximize", Bool),
            ],
            OptimizerKind::Adam | OptimizerKind::AdamW => ADAM_FIELDS,
            OptimizerKind::RAdam => &[
                ("lr", Schedule(NonNegative)),
                ("beta1", Schedule(UnitClosedOpen)),
                ("beta2", Schedule(UnitClosedOpen)),
                ("eps", Schedule(Positive)),
                ("weight_decay", Schedule(NonNegative)),
                ("decoupled_weight_decay", Bool),
                ("maximize", Bool),
            ],
            OptimizerKind::NAdam => &[
                ("lr", Schedule(NonNegative)),
                ("beta1", Schedule(UnitClosedOpen)),
                ("beta2", Schedule(UnitClosedOpen)),
                ("eps", Schedule(Positive)),
                ("weight_decay", Schedule(NonNegative)),
                ("momentum_decay", Schedule(NonNegative)),
                ("decoupled_weight_decay", Bool),
                ("maximize", Bool),
            ],
            OptimizerKind::RmsProp => &[
                ("lr", Schedule(NonNegative)),
                ("alpha", Schedule(NonNegative)),
                ("eps", Schedule(Positive)),
                ("weight_decay", Schedule(NonNegative)),
                ("momentum", Schedule(NonNegative)),
                ("centered", Bool),
                ("maximize", Bool),
            ],
            OptimizerKind::Adagrad => &[
                ("lr", Schedule(NonNegative)),
                ("lr_decay", Schedule(NonNegative)),
                ("weight_decay", Schedule(NonNegative)),
                ("initial_accumulator_value", Float(NonNegative)),
                ("eps", Schedule(Positive)),
                ("maximize", Bool),
            ],
            OptimizerKind::Lion => &[
                ("lr", Schedule(NonNegative)),
                ("beta1", Schedule(UnitClosedOpen)),
                ("beta2", Schedule(UnitClosedOpen)),
                ("weight_decay", Schedule(NonNegative)),
            ],
            // `eps1` (an `Option<f64>`, torch's `eps[0]`) is no literal a rule can give: set it
            // in an `AdafactorConfig`.
            OptimizerKind::Adafactor => &[
                ("lr", Schedule(NonNegative)),
                ("beta2_decay", Schedule(NonPositive)),
                ("eps2", Schedule(NonNegative)),
                ("d", Schedule(AtLeastOne)),
                ("weight_decay", Schedule(NonNegative)),
                ("maximize", Bool),
            ],
            OptimizerKind::Muon => &[
                ("lr", Schedule(NonNegative)),
                ("weight_decay", Schedule(NonNegative)),
                ("momentum", Schedule(NonNegative)),
                ("nesterov", Bool),
                ("ns_coefficients", Value),
                ("eps", Float(Positive)),
                ("ns_steps", Value),
                ("adjust_lr_fn", Value),
            ],
        }
    }

    /// The range of the scheduled hyperparameter `name`, for the runtime's
    /// `hyperparameters!` tables: evaluated at compile time there, so a name the table does not
    /// hold as a schedule stops the build (a panic in const evaluation) instead of drifting.
    pub const fn schedule_range(self, name: &str) -> Range {
        match self.find(name) {
            Some(Field::Schedule(range)) => range,
            _ => panic!("not a scheduled hyperparameter in the optimizer's table"),
        }
    }

    /// The range of the plain `f64` field `name` (Adagrad's `initial_accumulator_value`, Muon's
    /// `eps`); like [`schedule_range`](Self::schedule_range), a compile error for any other name.
    pub const fn float_range(self, name: &str) -> Range {
        match self.find(name) {
            Some(Field::Float(range)) => range,
            _ => panic!("not a plain float in the optimizer's table"),
        }
    }

    /// How many of its fields are schedules (`Field::Schedule`), or plain floats when
    /// `floats`: what the runtime's tables list must be as many (checked at compile time).
    pub const fn count(self, floats: bool) -> usize {
        let fields = self.fields();
        let (mut i, mut n) = (0, 0);
        while i < fields.len() {
            match fields[i].1 {
                Field::Schedule(_) if !floats => n += 1,
                Field::Float(_) if floats => n += 1,
                _ => {}
            }
            i += 1;
        }
        n
    }

    const fn find(self, name: &str) -> Option<Field> {
        let fields = self.fields();
        let mut i = 0;
        while i < fields.len() {
            if str_eq(fields[i].0, name) {
                return Some(fields[i].1);
            }
            i += 1;
        }
        None
    }

    /// The field named `key`, if the config has it.
    pub fn field(self, key: &str) -> Option<Field> {
        self.fields().iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
    }
}

/// `a == b`, in const evaluation.
const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl std::fmt::Display for OptimizerKind {
    /// The type name, as rules write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.type_name())
    }
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
        let find = OptimizerKind::from_type_name;
        assert_eq!(find("Bop").and_then(|b| b.field("gamma")), Some(Schedule(UnitOpenClosed)));
        assert_eq!(
            find("Adagrad").and_then(|b| b.field("initial_accumulator_value")),
            Some(Float(NonNegative))
        );
        assert!(find("SGD").is_none());
    }

    #[test]
    fn names_round_trip() {
        for &kind in OptimizerKind::ALL {
            assert_eq!(OptimizerKind::from_type_name(kind.type_name()), Some(kind));
            assert_eq!(OptimizerKind::from_display_name(kind.display_name()), Some(kind));
        }
        assert_eq!(OptimizerKind::from_display_name("RMSprop"), Some(OptimizerKind::RmsProp));
        assert_eq!(OptimizerKind::Sgd.display_name(), "SGD");
    }

    #[test]
    fn ranges_are_found_by_name_in_const_evaluation() {
        const LR: Range = OptimizerKind::Adam.schedule_range("lr");
        assert_eq!(LR, NonNegative);
        assert_eq!(OptimizerKind::Adagrad.float_range("initial_accumulator_value"), NonNegative);
        assert_eq!(OptimizerKind::Muon.float_range("eps"), Positive);
        assert_eq!(OptimizerKind::Adam.count(false), 5);
        assert_eq!(OptimizerKind::Muon.count(true), 1);
        assert!(!str_eq("lr", "lr_decay") && str_eq("", ""));
        let wrong = std::panic::catch_unwind(|| OptimizerKind::Adam.schedule_range("amsgrad"));
        assert!(wrong.is_err(), "a bool is no schedule");
    }

    #[test]
    fn only_muon_requires_a_number_of_dimensions() {
        for &kind in OptimizerKind::ALL {
            let expected = if kind == OptimizerKind::Muon { Some(2) } else { None };
            assert_eq!(kind.required_ndim(), expected, "{kind}");
        }
        assert_eq!(OptimizerKind::Muon.field("ns_steps"), Some(Value));
    }
}
