//! larq's `QuantDense`: a fully connected layer with quantized input and kernel.

use tch::{nn, Tensor};

use super::init::{kernel, KernelInit};
use super::quantizer::Quantizer;
use crate::error::Result;

/// Configuration of [`QuantLinear`]; `Default` is larq's binary `QuantDense`: `ste_sign` on input
/// and kernel, no bias, Glorot-uniform kernel.
///
/// ```
/// let c = caseopt::bnn::QuantLinearConfig::default();
/// assert_eq!(c.input_quantizer, caseopt::bnn::Quantizer::SteSign);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct QuantLinearConfig {
    /// Applied to the layer's input. Default [`Quantizer::SteSign`].
    pub input_quantizer: Quantizer,
    /// Applied to the kernel; [`Quantizer::SteSign`] declares the kernel 1-bit. Default
    /// [`Quantizer::SteSign`].
    pub kernel_quantizer: Quantizer,
    /// Whether to add a full-precision bias. Default `false`.
    pub bias: bool,
    /// Kernel initialiser. Default [`KernelInit::GlorotUniform`].
    pub kernel_init: KernelInit,
}

impl Default for QuantLinearConfig {
    fn default() -> Self {
        QuantLinearConfig {
            input_quantizer: Quantizer::SteSign,
            kernel_quantizer: Quantizer::SteSign,
            bias: false,
            kernel_init: KernelInit::GlorotUniform,
        }
    }
}

/// A fully connected layer with quantized input and kernel (larq's `QuantDense`).
///
/// Variables: `weight` `[out, in]` (tch's layout; 1-bit when the kernel quantizer is binary)
/// and, with `bias`, `bias` `[out]`.
///
/// ```no_run
/// use caseopt::bnn::{quant_linear, QuantLinearConfig};
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let dense = quant_linear(&vs.root() / "dense1", 576, 64, QuantLinearConfig::default())?;
/// let y = dense.forward(&Tensor::randn([2, 576], (Kind::Float, Device::Cpu)));
/// assert_eq!(y.size(), [2, 64]);
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
pub struct QuantLinear {
    /// The kernel, `[out, in]`.
    pub weight: Tensor,
    /// The bias, when configured.
    pub bias: Option<Tensor>,
    /// The configuration it was built with.
    pub config: QuantLinearConfig,
}

/// Creates a [`QuantLinear`] from `in_features` to `out_features` under `path`.
///
/// Fails on a non-positive feature count.
pub fn quant_linear<'a, P: std::borrow::Borrow<nn::Path<'a>>>(
    path: P,
    in_features: i64,
    out_features: i64,
    config: QuantLinearConfig,
) -> Result<QuantLinear> {
    let path = path.borrow();
    let dims = [out_features, in_features];
    let fans = (in_features, out_features);
    config.input_quantizer.validate()?;
    let weight = kernel(path, config.kernel_quantizer, &dims, config.kernel_init, fans)?;
    let bias = if config.bias { Some(path.f_zeros("bias", &[out_features])?) } else { None };
    Ok(QuantLinear { weight, bias, config })
}

impl QuantLinear {
    /// The layer's output, or libtorch's error (e.g. for an input with the wrong width).
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.config.input_quantizer.apply(xs)?;
        let w = self.config.kernel_quantizer.apply_kernel(&self.weight)?;
        Ok(x.f_linear(&w, self.bias.as_ref())?)
    }
}

impl nn::Module for QuantLinear {
    /// Panics on libtorch errors, as tch's own layers do; use
    /// [`f_forward`](QuantLinear::f_forward) to get them as values.
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.f_forward(xs) {
            Ok(y) => y,
            Err(e) => panic!("QuantLinear: {e}"),
        }
    }
}
