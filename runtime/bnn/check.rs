//! After training: do the 1-bit variables hold only `+1` and `-1`?

use tch::{nn, Kind};

use crate::error::Result;
use crate::var::trainable_vars;

/// What [`binary_kernel_checks`] found in one 1-bit variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryKernelCheck {
    /// The variable's name in the `VarStore`.
    pub name: String,
    /// Its number of elements.
    pub numel: i64,
    /// How many of them are neither `+1` nor `-1` (0 for a properly binary kernel).
    pub non_binary: i64,
}

impl BinaryKernelCheck {
    /// Whether every element is `+1` or `-1`.
    pub fn is_binary(&self) -> bool {
        self.non_binary == 0
    }
}

/// Counts, for every variable of `vs` declared 1-bit, the elements that are not exactly `+-1`.
///
/// ```
/// use caseopt::PathExt;
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let k = vs.root().binary().var("k", &[2, 3], nn::Init::Const(1.0));
/// let _ = vs.root().var("real", &[2], nn::Init::Const(0.5)); // full precision: not checked
/// let checks = caseopt::bnn::binary_kernel_checks(&vs)?;
/// assert_eq!(checks.len(), 1);
/// assert!(checks[0].is_binary());
/// tch::no_grad(|| k.get(0).get(1).fill_(0.25));
/// assert_eq!(caseopt::bnn::binary_kernel_checks(&vs)?[0].non_binary, 1);
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn binary_kernel_checks(vs: &nn::VarStore) -> Result<Vec<BinaryKernelCheck>> {
    trainable_vars(vs)
        .into_iter()
        .filter(|p| p.info.is_binary())
        .map(|p| {
            let off = p.tensor.f_abs()?.f_ne(1.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            let numel = p.info.numel();
            Ok(BinaryKernelCheck { name: p.info.name, numel, non_binary: off })
        })
        .collect()
}
