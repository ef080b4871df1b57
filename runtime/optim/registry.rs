//! The registry of built-in optimizers: one entry per optimizer, made by the `builtins!` line
//! in `runtime/optim/mod.rs`, in the identity table's order (`OptimizerKind::ALL`, checked at
//! compile time). Tests iterate it instead of keeping their own lists, the checkpoint planner
//! reads each optimizer's saved state layout from it, and users can build an optimizer by name
//! from a JSON config.

use caseopt_rules::OptimizerKind;
use serde::de::DeserializeOwned;

use super::core::{Algorithm, Optim, VarState};
use super::state::StateLayout;
use super::{Execution, FromConfig, Optimizer};
use crate::error::{Error, Result};

/// A built-in optimizer behind one box: the [`Optimizer`] interface and its [`Execution`]
/// settings (backend, threads, square root). `Box<dyn BuiltinOptimizer>` coerces to
/// `Box<dyn Optimizer>`.
pub trait BuiltinOptimizer: Optimizer + Execution {}

impl<T: Optimizer + Execution> BuiltinOptimizer for T {}

/// One built-in optimizer as the registry ([`builtins`]) lists it: its names, whether it has a
/// fused CPU kernel, the number of dimensions it requires, and a constructor from a config
/// given as JSON.
///
/// ```
/// let adam = caseopt::builtin("Adam").expect("a built-in");
/// assert_eq!((adam.type_name(), adam.name()), ("Adam", "Adam"));
/// assert_eq!(adam.has_fused_kernel(), cfg!(feature = "fused"));
/// assert_eq!(caseopt::builtin("SGD").map(|b| b.type_name()), Some("Sgd"));
/// ```
#[derive(Clone, Copy)]
pub struct Builtin {
    kind: OptimizerKind,
    fused: fn() -> bool,
    build: fn(&serde_json::Value) -> Result<Box<dyn BuiltinOptimizer>>,
    layout: fn(&str) -> Option<StateLayout>,
}

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builtin").field("name", &self.name()).finish_non_exhaustive()
    }
}

impl Builtin {
    /// The entry of the optimizer whose algorithm is `A`.
    pub(crate) const fn of<A: Algorithm>() -> Builtin
    where
        A::Config: DeserializeOwned,
    {
        Builtin {
            kind: A::KIND,
            fused: has_kernel::<A>,
            build: build::<A>,
            layout: <A::State as VarState>::layout,
        }
    }

    /// Its identity in the table the macro checks rules against.
    #[cfg(test)]
    pub(crate) const fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// The Rust type's name (`"Sgd"`), which a rule names it by.
    ///
    /// ```
    /// assert_eq!(caseopt::builtins()[0].type_name(), "Bop");
    /// ```
    pub fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }

    /// The name torch (or larq) gives it (`"SGD"`), which [`Optimizer::name`] returns and
    /// checkpoints carry.
    ///
    /// ```
    /// assert_eq!(caseopt::builtin("RmsProp").map(|b| b.name()), Some("RMSprop"));
    /// ```
    pub fn name(&self) -> &'static str {
        self.kind.display_name()
    }

    /// Whether it has a fused CPU kernel in this build ([`Backend::Fused`](super::Backend::Fused)
    /// is an error for the others, and for every optimizer in a build without the `fused`
    /// feature).
    ///
    /// ```
    /// let fused = cfg!(feature = "fused"); // the default
    /// assert_eq!(caseopt::builtin("Bop").map(|b| b.has_fused_kernel()), Some(fused));
    /// assert_eq!(caseopt::builtin("Muon").map(|b| b.has_fused_kernel()), Some(false));
    /// ```
    pub fn has_fused_kernel(&self) -> bool {
        (self.fused)()
    }

    /// The number of dimensions every variable it trains must have (Muon: 2), or `None`.
    ///
    /// ```
    /// assert_eq!(caseopt::builtin("Muon").and_then(|b| b.required_ndim()), Some(2));
    /// ```
    pub fn required_ndim(&self) -> Option<u64> {
        self.kind.required_ndim()
    }

    /// Builds it from a JSON object of its config's fields (the keys a rule gives it: `lr`,
    /// `beta1`, ...; absent fields take the reference default; a schedule is a number, the
    /// constant schedule) and, optionally, `master_weights`. An unknown key, a value of the
    /// wrong type or out of range is [`Error::InvalidConfig`] or
    /// [`Error::InvalidHyperparameter`].
    ///
    /// ```
    /// use caseopt::{Backend, Optimizer};
    ///
    /// let sgd = caseopt::builtin("Sgd").expect("a built-in");
    /// let mut opt = sgd.build(&serde_json::json!({"lr": 0.1, "momentum": 0.9, "nesterov": true}))?;
    /// opt.set_backend(Backend::Torch);
    /// assert_eq!(opt.schedule("momentum")?.value(0), 0.9);
    /// assert!(sgd.build(&serde_json::json!({"learning_rate": 0.1})).is_err());
    /// assert!(sgd.build(&serde_json::json!({"lr": -1.0})).is_err());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn build(&self, config: &serde_json::Value) -> Result<Box<dyn BuiltinOptimizer>> {
        (self.build)(config)
    }

    /// The layout of its saved state `name`, from its state's declaration.
    pub(crate) fn state_layout(&self, name: &str) -> Option<StateLayout> {
        (self.layout)(name)
    }
}

fn has_kernel<A: Algorithm>() -> bool {
    cfg!(feature = "fused")
        && std::any::TypeId::of::<A::Kernel>() != std::any::TypeId::of::<super::core::NoKernel>()
}

fn build<A: Algorithm>(config: &serde_json::Value) -> Result<Box<dyn BuiltinOptimizer>>
where
    A::Config: DeserializeOwned,
{
    let invalid = |reason: String| Error::InvalidConfig { optimizer: A::NAME, reason };
    let mut fields = match config {
        serde_json::Value::Object(map) => map.clone(),
        other => return Err(invalid(format!("a config is a JSON object, got {other}"))),
    };
    let master = match fields.remove(caseopt_rules::builtin::MASTER_WEIGHTS) {
        None => false,
        Some(serde_json::Value::Bool(on)) => on,
        Some(other) => {
            return Err(invalid(format!("master_weights is true or false, got {other}")))
        }
    };
    let config: A::Config = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| invalid(e.to_string()))?;
    let mut optimizer = Optim::<A>::from_config(config)?;
    if master {
        optimizer.set_master_weights(true)?;
    }
    Ok(Box::new(optimizer))
}

/// Every built-in optimizer, in the order the documentation lists them.
///
/// ```
/// let names: Vec<&str> = caseopt::builtins().iter().map(|b| b.type_name()).collect();
/// assert!(names.contains(&"Lion") && names.contains(&"Adafactor"));
/// for b in caseopt::builtins() {
///     assert_eq!(b.build(&serde_json::json!({}))?.name(), b.name());
/// }
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn builtins() -> &'static [Builtin] {
    super::REGISTRY
}

/// The built-in optimizer named `name`, by its Rust type's name (`"Sgd"`) or torch's (`"SGD"`).
///
/// ```
/// assert_eq!(caseopt::builtin("AdamW").map(|b| b.name()), Some("AdamW"));
/// assert!(caseopt::builtin("Adamax").is_none());
/// ```
pub fn builtin(name: &str) -> Option<&'static Builtin> {
    builtins().iter().find(|b| b.type_name() == name || b.name() == name)
}

/// The entry whose [`Builtin::name`] is `name` (what [`Optimizer::name`] returns).
pub(crate) fn by_display_name(name: &str) -> Option<&'static Builtin> {
    builtins().iter().find(|b| b.name() == name)
}

/// Whether `registry` lists exactly the identity table's optimizers, in its order.
pub(crate) const fn matches_the_table(registry: &[Builtin]) -> bool {
    let all = OptimizerKind::ALL;
    if registry.len() != all.len() {
        return false;
    }
    let mut i = 0;
    while i < all.len() {
        if registry[i].kind as usize != all[i] as usize {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_builds_with_its_defaults_and_names_itself() {
        assert!(matches_the_table(builtins()));
        for b in builtins() {
            let opt = b.build(&serde_json::json!({})).unwrap();
            assert_eq!(opt.name(), b.name());
            assert_eq!(by_display_name(b.name()).map(|e| e.kind()), Some(b.kind()));
            for name in opt.state_names() {
                assert!(b.state_layout(name).is_some(), "{}: {name}", b.name());
            }
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let adam = builtin("Adam").unwrap();
        for bad in [
            serde_json::json!([1, 2]),
            serde_json::json!({"lr": "fast"}),
            serde_json::json!({"betas": [0.9, 0.99]}),
            serde_json::json!({"master_weights": 1}),
        ] {
            let err = adam.build(&bad).err().expect("refused");
            assert!(matches!(err, Error::InvalidConfig { optimizer: "Adam", .. }), "{err}");
        }
        let err = adam.build(&serde_json::json!({"beta1": 1.0})).err().expect("refused");
        assert!(matches!(err, Error::InvalidHyperparameter { name: "beta1", .. }), "{err}");
        let on = adam.build(&serde_json::json!({"master_weights": true})).unwrap();
        assert!(on.master_weights());
    }
}
