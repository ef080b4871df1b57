//! How a quantized layer creates and initialises its kernel, declared with the precision of its
//! kernel quantizer.

use tch::{nn, Tensor};

use super::quantizer::Quantizer;
use super::quantizers::ste_sign;
use crate::error::{Error, Result};
use crate::var::PathExt;

/// How a quantized layer's kernel is initialised.
///
/// ```
/// use caseopt::bnn::KernelInit;
/// // A 3x3 convolution from 32 to 64 channels: fan in 288, fan out 576.
/// let limit = KernelInit::glorot_limit(288, 576);
/// assert!((limit - (6.0f64 / 864.0).sqrt()).abs() < 1e-15);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub enum KernelInit {
    /// Keras's `glorot_uniform` (larq's default): uniform in `+-sqrt(6 / (fan_in + fan_out))`.
    /// A binary kernel initialised this way is binarised by [`Bop`](crate::Bop)'s first step;
    /// until then the forward pass sees its sign through the kernel quantizer.
    #[default]
    GlorotUniform,
    /// `+1` or `-1` with equal probability: the signs of a Glorot-uniform kernel (or of any
    /// symmetric one), already binary, so a binary optimizer has nothing to binarise and the
    /// forward pass sees the same kernel it trains.
    RandomSign,
    /// Any tch initialiser, e.g. `nn::Init::Const(1.0)`.
    Torch(nn::Init),
}

impl KernelInit {
    /// Glorot's uniform bound for the given fans.
    pub fn glorot_limit(fan_in: i64, fan_out: i64) -> f64 {
        (6.0 / (fan_in + fan_out) as f64).sqrt()
    }

    fn to_init(self, fan_in: i64, fan_out: i64) -> nn::Init {
        match self {
            KernelInit::GlorotUniform => {
                let limit = Self::glorot_limit(fan_in, fan_out);
                nn::Init::Uniform { lo: -limit, up: limit }
            }
            // Signed afterwards, in `kernel`.
            KernelInit::RandomSign => nn::Init::Uniform { lo: -1.0, up: 1.0 },
            KernelInit::Torch(init) => init,
        }
    }
}

/// Creates a kernel through `path`, declared with the kernel quantizer's precision.
///
/// Fails on a non-positive dimension or a kernel quantizer with invalid parameters (checked here,
/// so a bad layer is refused when it is built rather than at its first forward pass).
pub(super) fn kernel(
    path: &nn::Path,
    quantizer: Quantizer,
    dims: &[i64],
    init: KernelInit,
    fans: (i64, i64),
) -> Result<Tensor> {
    if let Some(bad) = dims.iter().find(|&&d| d <= 0) {
        return Err(Error::InvalidLayer(format!(
            "kernel `{}` of shape {dims:?} has a non-positive dimension {bad}",
            path.path("weight")
        )));
    }
    quantizer.validate()?;
    let path = path.bits(quantizer.bits());
    let mut weight = path.f_var("weight", dims, init.to_init(fans.0, fans.1))?;
    if let KernelInit::RandomSign = init {
        let _guard = tch::no_grad_guard();
        let signs = ste_sign(&weight)?;
        weight.f_copy_(&signs)?;
    }
    Ok(weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glorot_limit_matches_keras_formula() {
        // Keras: limit = sqrt(6 / (fan_in + fan_out)).
        assert_eq!(KernelInit::glorot_limit(3, 3), 1.0);
        assert_eq!(KernelInit::glorot_limit(1, 5), 1.0);
        assert!((KernelInit::glorot_limit(576, 64) - (6.0f64 / 640.0).sqrt()).abs() < 1e-15);
    }
}
