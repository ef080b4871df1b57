//! Building blocks for binarized and low-precision neural networks on tch, after larq 0.14's
//! layers and quantizers.
//!
//! - Quantizers (larq's `larq.quantizers`), as functions and as [`Quantizer`] values a layer
//!   holds for its input and its kernel. Forward values are exactly larq's; backward passes are
//!   larq's pseudo-gradients (tests/test_quantizers.rs holds both against fixtures recorded from
//!   larq 0.14, and `docs/bnn.md` has the measured agreement). `dy` is the incoming gradient,
//!   `sign(x)` is larq's `+1` for `x >= 0` and `-1` elsewhere (so `sign(-0) = +1`).
//!
//!   | function | larq | forward | backward | bits |
//!   |---|---|---|---|---|
//!   | [`ste_sign`], [`ste_sign_clipped`] | `ste_sign(clip_value=1)` | `sign(x)` | `dy` where `\|x\| <= clip` | 1 |
//!   | [`approx_sign`] | `approx_sign` | `sign(x)` | `(1 - \|x\|) * 2 * dy` where `\|x\| <= 1` | 1 |
//!   | [`swish_sign`] | `swish_sign(beta=5)` | `sign(x)` | `dy * beta * (2 - bx tanh(bx / 2)) / (1 + cosh(bx))`, `bx = beta x` | 1 |
//!   | [`ste_tern`] | `ste_tern(threshold_value=0.05, ternary_weight_networks=False, clip_value=1)` | `sign(sign(x + t) + sign(x - t))`, `t` the threshold or `0.7 mean(\|x\|)` | `dy` where `\|x\| <= clip` | 2 |
//!   | [`ste_heaviside`] | `ste_heaviside(clip_value=1)` | `1` where `x > 0`, else `0` | `dy` where `\|x\| <= clip` | 1 |
//!   | [`magnitude_aware_sign`] | `MagnitudeAwareSign(clip_value=1)` | `sign(x) * mean(\|x\|)` per channel ([`Operand`]) | `dy * mean` where `\|x\| <= clip` | 1 |
//!   | [`dorefa`] | `DoReFa(k_bit=2, mode="activations")` (`DoReFaQuantizer`) | `round(clip(x, 0, 1) * n) / n`, `n = 2^k - 1` | `dy` where `0 <= x <= 1` | `k` |
//!   | [`dorefa`] weights | `DoReFa(k_bit, mode="weights")` | `2 q(tanh(x) / (2 max\|tanh\|) + 1/2) - 1` | `2 dy / (2 max\|tanh\|) * (1 - tanh(x)^2)` | `k` |
//!   | [`Quantizer::NoOp`] | `NoOp(precision)` (`NoOpQuantizer`) | `x` | `dy` | `precision` |
//!   | [`Quantizer::Identity`] | `None` | `x` | `dy` | 32 |
//!
//!   "where" means: zero elsewhere. Clip values of `None` are larq's `clip_value=None` (no
//!   clipping). Parameters out of range are [`Error::InvalidQuantizer`](crate::Error) values,
//!   never panics.
//! - [`QuantConv2d`] and [`QuantLinear`] (larq's `QuantConv2D` and `QuantDense`): an input
//!   quantizer and a kernel quantizer around a plain convolution or matrix product. The kernel
//!   is declared in the `VarStore` with its quantizer's [`Quantizer::bits`] (through
//!   [`PathExt::bits`](crate::PathExt::bits)), so routing rules written with `binary` or
//!   `bits(N)` send it to the right optimizer, e.g. a 1-bit kernel to
//!   [`Bop`](crate::Bop) and a ternary one to Adam.
//! - [`BatchNorm`]: batch normalisation with Keras's defaults and larq's usual `scale=False`
//!   (no trainable scale: a binary layer after it only sees signs, which a positive scale cannot
//!   change).
//! - [`binary_kernel_checks`]: after training, confirms that every 1-bit variable holds only
//!   `+1` and `-1`.
//! - [`channels_last`]: the memory layout in which CPU convolutions and pooling run fastest.
//!
//! ```no_run
//! use caseopt::bnn::{self, Quantizer};
//! use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let root = vs.root();
//! // First layer: real-valued input, binary kernel.
//! let first = bnn::QuantConv2dConfig { input_quantizer: Quantizer::Identity, ..Default::default() };
//! let conv = bnn::quant_conv2d(&root / "conv1", 1, 8, 3, first)?;
//! let bn = bnn::batch_norm(&root / "bn1", 8, Default::default())?;
//! let x = Tensor::rand([4, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
//! let y = bn.forward_t(&conv.forward_t(&x, true), true);
//! assert_eq!(y.size(), [4, 8, 26, 26]);
//! assert!(caseopt::var_infos(&vs).iter().any(|v| v.name == "conv1.weight" && v.is_binary()));
//! # Ok::<(), caseopt::Error>(())
//! ```

mod batch_norm;
mod check;
mod conv;
mod init;
mod layout;
mod linear;
mod quantizer;
mod quantizers;

pub use batch_norm::{batch_norm, BatchNorm, BatchNormConfig};
pub use check::{binary_kernel_checks, BinaryKernelCheck};
pub use conv::{quant_conv2d, QuantConv2d, QuantConv2dConfig};
pub use init::KernelInit;
pub use layout::channels_last;
pub use linear::{quant_linear, QuantLinear, QuantLinearConfig};
pub use quantizer::Quantizer;
pub use quantizers::{
    approx_sign, dorefa, magnitude_aware_sign, ste_heaviside, ste_sign, ste_sign_clipped, ste_tern,
    swish_sign, DoReFaMode, Operand,
};
