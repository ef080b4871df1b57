//! larq's `QuantConv2D`: a 2-D convolution with quantized input and kernel.

use tch::{nn, Tensor};

use super::init::{kernel, KernelInit};
use super::quantizer::Quantizer;
use crate::error::{Error, Result};

/// Configuration of [`QuantConv2d`]; `Default` is larq's binary `QuantConv2D` as used in its
/// examples: stride 1, `valid` padding, `ste_sign` on input and kernel, no bias, Glorot-uniform
/// kernel.
///
/// ```
/// use caseopt::bnn::{QuantConv2dConfig, Quantizer};
/// // The first layer of a BNN sees real pixels.
/// let first = QuantConv2dConfig { input_quantizer: Quantizer::Identity, ..Default::default() };
/// assert_eq!(first.kernel_quantizer, Quantizer::SteSign);
/// assert!(!first.bias);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct QuantConv2dConfig {
    /// Stride in both dimensions. Default 1.
    pub stride: i64,
    /// Zero padding on every side (0 is Keras's `valid`). Default 0.
    pub padding: i64,
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

impl Default for QuantConv2dConfig {
    fn default() -> Self {
        QuantConv2dConfig {
            stride: 1,
            padding: 0,
            input_quantizer: Quantizer::SteSign,
            kernel_quantizer: Quantizer::SteSign,
            bias: false,
            kernel_init: KernelInit::GlorotUniform,
        }
    }
}

/// A 2-D convolution with quantized input and kernel (larq's `QuantConv2D`), NCHW.
///
/// Variables: `weight` `[out, in, k, k]` (1-bit when the kernel quantizer is binary) and, with
/// `bias`, `bias` `[out]` (full precision).
///
/// ```no_run
/// use caseopt::bnn::{quant_conv2d, QuantConv2dConfig};
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let conv = quant_conv2d(&vs.root() / "conv2", 32, 64, 3, QuantConv2dConfig::default())?;
/// let y = conv.forward(&Tensor::randn([2, 32, 13, 13], (Kind::Float, Device::Cpu)));
/// assert_eq!(y.size(), [2, 64, 11, 11]);
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
pub struct QuantConv2d {
    /// The kernel, `[out, in, k, k]`.
    pub weight: Tensor,
    /// The bias, when configured.
    pub bias: Option<Tensor>,
    /// The configuration it was built with.
    pub config: QuantConv2dConfig,
}

/// Creates a [`QuantConv2d`] with square `kernel_size` kernels under `path`.
///
/// Fails on a non-positive channel count, kernel size or stride, or a negative padding.
pub fn quant_conv2d<'a, P: std::borrow::Borrow<nn::Path<'a>>>(
    path: P,
    in_channels: i64,
    out_channels: i64,
    kernel_size: i64,
    config: QuantConv2dConfig,
) -> Result<QuantConv2d> {
    let path = path.borrow();
    if config.stride <= 0 || config.padding < 0 {
        return Err(Error::InvalidLayer(format!(
            "convolution `{}`: stride {} must be > 0 and padding {} >= 0",
            path.path("weight"),
            config.stride,
            config.padding
        )));
    }
    let dims = [out_channels, in_channels, kernel_size, kernel_size];
    let area = kernel_size * kernel_size;
    let fans = (in_channels * area, out_channels * area);
    config.input_quantizer.validate()?;
    let weight = kernel(path, config.kernel_quantizer, &dims, config.kernel_init, fans)?;
    let bias = if config.bias { Some(path.f_zeros("bias", &[out_channels])?) } else { None };
    Ok(QuantConv2d { weight, bias, config })
}

impl QuantConv2d {
    /// The layer's output, or libtorch's error (e.g. for an input with the wrong channel count).
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.config.input_quantizer.apply(xs)?;
        let w = self.config.kernel_quantizer.apply_kernel(&self.weight)?;
        let (s, p) = (self.config.stride, self.config.padding);
        Ok(x.f_conv2d(&w, self.bias.as_ref(), [s, s], [p, p], [1, 1], 1)?)
    }
}

impl nn::Module for QuantConv2d {
    /// Panics on libtorch errors, as tch's own layers do; use
    /// [`f_forward`](QuantConv2d::f_forward) to get them as values.
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.f_forward(xs) {
            Ok(y) => y,
            Err(e) => panic!("QuantConv2d: {e}"),
        }
    }
}
