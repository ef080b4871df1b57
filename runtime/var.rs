//! Variable metadata: what a routing predicate sees of a variable, and how a variable is marked
//! as quantized (1-bit, n-bit) in a tch `VarStore`.
//!
//! tch's `VarStore` records, for every trainable variable, a `group` number (tch's own optimizers
//! use it for per-group learning rates; caseopt's optimizers do not). caseopt stores a declared
//! precision there, as `1024 + bits`: a variable created through [`PathExt::bits`] or
//! [`PathExt::binary`] carries its bit count inside the store itself, needs no side table, and
//! survives being handed around with the store. Ordinary groups (0 to 1023) are left alone, and
//! the numbers stay small because tch's own optimizers create one parameter group for every
//! number up to the largest they meet (a tagged high number made them allocate billions).

use tch::{nn, Device, Kind, Tensor};

use crate::error::Error;

/// Bit count of a variable nobody marked: full precision.
pub const FULL_PRECISION_BITS: u8 = 32;

/// First group number that carries a bit count.
const BITS_GROUP_BASE: usize = 1024;

/// The group number tch stores for a variable declared with `bits` bits of precision.
///
/// ```
/// assert_eq!(caseopt::bits_from_group(caseopt::group_for_bits(1)), Some(1));
/// assert_eq!(caseopt::bits_from_group(0), None);
/// ```
pub fn group_for_bits(bits: u8) -> usize {
    BITS_GROUP_BASE + bits as usize
}

/// The declared bit count stored in a tch group number, if caseopt put one there.
///
/// ```
/// assert_eq!(caseopt::bits_from_group(caseopt::group_for_bits(4)), Some(4));
/// assert_eq!(caseopt::bits_from_group(3), None);
/// ```
pub fn bits_from_group(group: usize) -> Option<u8> {
    let bits = group.checked_sub(BITS_GROUP_BASE)?;
    u8::try_from(bits).ok()
}

/// Marks variables as quantized, in tch's `nn::Path` idiom.
///
/// ```no_run
/// use caseopt::PathExt;
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let root = vs.root();
/// // Every variable created through `root.binary()` is declared 1-bit.
/// let w = root.binary().var("kernel", &[64, 32], nn::Init::Const(1.0));
/// let infos = caseopt::var_infos(&vs);
/// assert!(infos[0].is_binary());
/// # let _ = w;
/// ```
pub trait PathExt<'a> {
    /// This path, with variables created through it declared `bits` bits wide.
    fn bits(&self, bits: u8) -> nn::Path<'a>;
    /// This path, with variables created through it declared 1-bit (`binary` in routing rules).
    fn binary(&self) -> nn::Path<'a> {
        self.bits(1)
    }
}

impl<'a> PathExt<'a> for nn::Path<'a> {
    fn bits(&self, bits: u8) -> nn::Path<'a> {
        self.set_group(group_for_bits(bits))
    }
}

/// What a routing predicate sees of one variable.
///
/// ```
/// use caseopt::VarInfo;
/// use tch::{Device, Kind};
///
/// let v = VarInfo::new("conv1.weight", &[32, 1, 3, 3], Kind::Float, Device::Cpu).with_bits(1);
/// assert!(v.is_binary());
/// assert_eq!(v.ndim(), 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VarInfo {
    /// Full name: the VarStore path (`"block1.conv.weight"`) or the name given in a list.
    pub name: String,
    /// Shape at the time the router was built.
    pub shape: Vec<i64>,
    /// Element type.
    pub kind: Kind,
    /// Device the variable lives on.
    pub device: Device,
    /// Declared precision in bits: 32 unless marked (1 for binary).
    pub bits: u8,
}

impl VarInfo {
    /// Metadata for a full-precision variable.
    pub fn new(name: impl Into<String>, shape: &[i64], kind: Kind, device: Device) -> Self {
        VarInfo {
            name: name.into(),
            shape: shape.to_vec(),
            kind,
            device,
            bits: FULL_PRECISION_BITS,
        }
    }

    /// Metadata read off a tensor, full precision.
    ///
    /// ```
    /// let t = tch::Tensor::zeros([3, 4], (tch::Kind::Double, tch::Device::Cpu));
    /// let v = caseopt::VarInfo::of("w", &t);
    /// assert_eq!(v.shape, vec![3, 4]);
    /// assert_eq!(v.kind, tch::Kind::Double);
    /// ```
    pub fn of(name: impl Into<String>, tensor: &Tensor) -> Self {
        Self::new(name, &tensor.size(), tensor.kind(), tensor.device())
    }

    /// The same metadata, declared `bits` wide.
    pub fn with_bits(mut self, bits: u8) -> Self {
        self.bits = bits;
        self
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Declared 1-bit.
    pub fn is_binary(&self) -> bool {
        self.bits == 1
    }
}

/// A variable an optimizer updates: its metadata and a shallow handle to its tensor.
#[derive(Debug)]
pub struct Param {
    /// Metadata, as seen when the variable was routed.
    pub info: VarInfo,
    /// The variable itself (a shallow clone: updates go to the model's tensor).
    pub tensor: Tensor,
}

impl Param {
    /// Pairs metadata with its tensor.
    pub fn new(info: VarInfo, tensor: Tensor) -> Self {
        Param { info, tensor }
    }

    /// The tensor's gradient, or `None` when it has none (not yet computed, or frozen).
    pub fn grad(&self) -> Option<Tensor> {
        let g = self.tensor.grad();
        g.defined().then_some(g)
    }

    /// Whether metadata read in bulk (see `kernels::metadata`) shows the device, dtype and shape
    /// the variable was routed with; `false` sends the caller to
    /// [`check_unchanged`](Self::check_unchanged) for the details.
    pub(crate) fn matches(&self, m: &crate::kernels::metadata::TensorMeta) -> bool {
        m.is_ok()
            && m.device() == Some(self.info.device)
            && m.kind() == Some(self.info.kind)
            && crate::kernels::metadata::same_shape(m.shape(), &self.info.shape)
    }

    /// Checks that the tensor still has the device, dtype and shape it was routed with.
    pub fn check_unchanged(&self) -> Result<(), Error> {
        let (device, kind, shape) = (self.tensor.device(), self.tensor.kind(), self.tensor.size());
        if device != self.info.device || kind != self.info.kind || shape != self.info.shape {
            return Err(Error::VariableChanged {
                variable: self.info.name.clone(),
                was: format!("{:?} {:?} {:?}", self.info.kind, self.info.shape, self.info.device),
                now: format!("{kind:?} {shape:?} {device:?}"),
            });
        }
        Ok(())
    }
}

/// Every trainable variable of a `VarStore`, named by its path, sorted by name, with the
/// precision declared through [`PathExt`].
///
/// Frozen stores still list their trainable variables (tch keeps them, without
/// `requires_grad`); they simply have no gradients to apply.
pub fn trainable_vars(vs: &nn::VarStore) -> Vec<Param> {
    let vars = match vs.variables_.lock() {
        Ok(v) => v,
        Err(poisoned) => poisoned.into_inner(),
    };
    trainable_vars_in(&vars)
}

/// [`trainable_vars`] of a `VarStore`'s variables (for holders of its shared handle).
pub(crate) fn trainable_vars_in(vars: &nn::Variables) -> Vec<Param> {
    // Names by data address first (one lookup per variable instead of a scan of the store, which
    // made building a router on thousands of variables quadratic), confirmed with `is_set_to`;
    // zero-sized tensors, which may share an address, fall back to the scan.
    let mut by_address: std::collections::HashMap<usize, Vec<&String>> =
        std::collections::HashMap::with_capacity(vars.named_variables.len());
    for (name, t) in &vars.named_variables {
        by_address.entry(t.data_ptr() as usize).or_default().push(name);
    }
    let mut out = Vec::with_capacity(vars.trainable_variables.len());
    for var in &vars.trainable_variables {
        let quick = by_address.get(&(var.tensor.data_ptr() as usize)).and_then(|names| {
            names.iter().find(|n| same_tensor(&vars.named_variables[n.as_str()], &var.tensor))
        });
        let name = quick
            .map(|n| (*n).clone())
            .or_else(|| {
                vars.named_variables
                    .iter()
                    .find(|(_, t)| same_tensor(t, &var.tensor))
                    .map(|(n, _)| n.clone())
            })
            .unwrap_or_else(|| format!("<unnamed #{}>", out.len()));
        let bits = bits_from_group(var.group).unwrap_or(FULL_PRECISION_BITS);
        let info = VarInfo::of(name, &var.tensor).with_bits(bits);
        out.push(Param::new(info, var.tensor.shallow_clone()));
    }
    out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    out
}

/// Metadata of every trainable variable of a `VarStore`, sorted by name.
pub fn var_infos(vs: &nn::VarStore) -> Vec<VarInfo> {
    trainable_vars(vs).into_iter().map(|p| p.info).collect()
}

/// Whether two handles refer to the same tensor (same storage, offset, sizes and strides).
pub(crate) fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.f_is_set_to(b).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_round_trips_bits_and_leaves_plain_groups_alone() {
        for bits in [1u8, 2, 4, 8, 16, 32] {
            assert_eq!(bits_from_group(group_for_bits(bits)), Some(bits));
        }
        for plain in [0usize, 1, 7, 255, 1023, 1024 + 256, 1 << 20] {
            assert_eq!(bits_from_group(plain), None);
        }
    }
}
