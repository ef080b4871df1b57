//! Building blocks for binarized neural networks on tch, after larq 0.14's layers.
//!
//! - [`ste_sign`]: sign in the forward pass (with `sign(0) = +1`), straight-through estimator in
//!   the backward pass (the gradient passes where `|x| <= 1`, is zero elsewhere).
//! - [`QuantConv2d`] and [`QuantLinear`] (larq's `QuantConv2D` and `QuantDense`): an input
//!   quantizer and a kernel quantizer around a plain convolution or matrix product. A kernel
//!   whose quantizer is [`Quantizer::SteSign`] is declared 1-bit in the `VarStore` (through
//!   [`PathExt::binary`]), so routing rules written with `binary` send it to a binary optimizer
//!   such as [`Bop`](crate::Bop).
//! - [`BatchNorm`]: batch normalisation with Keras's defaults and larq's usual `scale=False`
//!   (no trainable scale: a binary layer after it only sees signs, which a positive scale cannot
//!   change).
//! - [`binary_kernel_checks`]: after training, confirms that every 1-bit variable holds only
//!   `+1` and `-1`.
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

use std::sync::atomic::{AtomicU64, Ordering};

use tch::{nn, Kind, Tensor};

use crate::error::{Error, Result};
use crate::var::{trainable_vars, PathExt, FULL_PRECISION_BITS};

/// Sign with a straight-through gradient (larq's `ste_sign`, clip value 1).
///
/// Forward: `+1` where `x >= 0` (so `sign(0) = +1`), `-1` elsewhere; the values are exactly
/// `+-1` in `x`'s dtype. Backward: the incoming gradient where `|x| <= 1` (inclusive, as larq's
/// `tf.less_equal`), zero elsewhere.
///
/// Built from ordinary differentiable ops, with no custom autograd function: the result is
/// `s + (c - c.detach())`, where `s` is the sign computed without autograd and `c` is any
/// function of `x` whose gradient is the clip mask. Its value is exactly `s` (`c - c` is exactly
/// zero) and its gradient is `c`'s. The tempting `c + (s - c).detach()` is not exact: `c + (s -
/// c)` rounds, so a "binary" activation could be `0.99999994`.
///
/// ```
/// use caseopt::bnn::ste_sign;
/// use tch::{Kind, Tensor};
///
/// let x = Tensor::from_slice(&[-2.0f32, -1.0, -0.3, 0.0, 0.3, 1.0, 2.0]).set_requires_grad(true);
/// let y = ste_sign(&x)?;
/// assert_eq!(Vec::<f32>::try_from(&y)?, [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]);
/// y.sum(Kind::Float).backward();
/// assert_eq!(Vec::<f32>::try_from(&x.grad())?, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ste_sign(x: &Tensor) -> Result<Tensor> {
    // larq's own `sign(sign(x) + 0.1)`: maps 0 (and -0) to +1 and stays exact. Comparison ops
    // (`x >= 0`, `where`) would say the same, but on CPU they go through bool tensors and are
    // several times slower than these float kernels.
    let sign = x.f_detach()?.f_sign()?.f_add_scalar(0.1)?.f_sign()?;
    if !x.requires_grad() {
        // Nothing to differentiate (data, or evaluation): skip the straight-through term.
        return Ok(sign);
    }
    let clipped = clip_for_gradient(x)?;
    let straight_through = clipped.f_sub(&clipped.f_detach()?)?;
    Ok(sign.f_add(&straight_through)?)
}

/// A function of `x` whose gradient is 1 where `|x| <= 1` and 0 elsewhere (its value is not
/// used).
///
/// `x.clamp(-1, 1)` has exactly that gradient, but libtorch's CPU backward for it builds two
/// bool masks and a `where`, the slowest part of a binarized layer. `threshold(x, t, v)` passes
/// the gradient where `x > t` in one fused float kernel; with `t` the largest value below -1 in
/// `x`'s dtype, `x > t` is exactly `x >= -1`. Applied to `x` and then to the negated result it
/// gives the two-sided inclusive mask. Dtypes without a known spacing fall back to `clamp`.
fn clip_for_gradient(x: &Tensor) -> Result<Tensor> {
    let below_minus_one = match x.kind() {
        Kind::Float => -(1.0 + f64::from(f32::EPSILON)),
        Kind::Double => -(1.0 + f64::EPSILON),
        Kind::Half => -(1.0 + 2f64.powi(-10)),
        Kind::BFloat16 => -(1.0 + 2f64.powi(-7)),
        _ => return Ok(x.f_clamp(-1.0, 1.0)?),
    };
    let t = below_minus_one;
    // Where the lower threshold replaced x by t, the upper one sees -t > t and passes; the
    // lower one has already zeroed the gradient there.
    let lower = x.f_threshold(t, t)?;
    let upper = lower.f_neg()?.f_threshold(t, t)?;
    Ok(upper.f_neg()?)
}

/// The same 4-D tensor with channels-last strides (NHWC in memory, NCHW in shape); libtorch's
/// CPU convolutions then produce channels-last outputs too.
///
/// On CPU, libtorch's max-pooling is about ten times faster on channels-last tensors than on
/// contiguous NCHW ones, and oneDNN convolutions are no slower. A single-channel tensor (the
/// first layer's images) has the same memory either way, so only its strides change and nothing
/// is copied; others are copied once (differentiably).
///
/// ```
/// let x = tch::Tensor::zeros([2, 1, 4, 5], (tch::Kind::Float, tch::Device::Cpu));
/// let y = caseopt::bnn::channels_last(&x)?;
/// assert_eq!(y.size(), [2, 1, 4, 5]);
/// assert_eq!(y.stride(), [20, 1, 5, 1]);
/// let z = caseopt::bnn::channels_last(&tch::Tensor::zeros([2, 3, 4, 5], (tch::Kind::Float, tch::Device::Cpu)))?;
/// assert_eq!(z.stride(), [60, 1, 15, 3]);
/// # Ok::<(), caseopt::Error>(())
/// ```
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    let [n, c, h, w] = size[..] else {
        return Err(Error::InvalidLayer(format!("channels_last needs a 4-D tensor, got {size:?}")));
    };
    if c == 1 && x.is_contiguous() {
        // libtorch treats a size-1 channel as ambiguous and falls back to NCHW unless the
        // strides say channels-last explicitly.
        return Ok(x.f_as_strided([n, c, h, w], [h * w, 1, w, 1], None)?);
    }
    Ok(x.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?)
}

/// What a quantized layer does to its input or its kernel before the convolution or product.
///
/// ```
/// use caseopt::bnn::Quantizer;
/// let x = tch::Tensor::from_slice(&[-0.5f32, 0.0, 0.7]);
/// assert_eq!(Vec::<f32>::try_from(&Quantizer::SteSign.apply(&x)?)?, [-1.0, 1.0, 1.0]);
/// assert_eq!(Vec::<f32>::try_from(&Quantizer::Identity.apply(&x)?)?, [-0.5, 0.0, 0.7]);
/// assert_eq!(Quantizer::SteSign.bits(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantizer {
    /// Leave the tensor real-valued (larq's `None` quantizer).
    Identity,
    /// [`ste_sign`]: binarise to `+-1` with a straight-through gradient.
    #[default]
    SteSign,
}

impl Quantizer {
    /// The quantized tensor.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Quantizer::Identity => Ok(x.shallow_clone()),
            Quantizer::SteSign => ste_sign(x),
        }
    }

    /// Bits per element of the quantized tensor: what a kernel with this quantizer is declared
    /// as in the `VarStore`.
    pub fn bits(self) -> u8 {
        match self {
            Quantizer::Identity => FULL_PRECISION_BITS,
            Quantizer::SteSign => 1,
        }
    }
}

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
fn kernel(
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
    let path = path.bits(quantizer.bits());
    let mut weight = path.f_var("weight", dims, init.to_init(fans.0, fans.1))?;
    if let KernelInit::RandomSign = init {
        let _guard = tch::no_grad_guard();
        let signs = ste_sign(&weight)?;
        weight.f_copy_(&signs)?;
    }
    Ok(weight)
}

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
    let weight = kernel(path, config.kernel_quantizer, &dims, config.kernel_init, fans)?;
    let bias = if config.bias { Some(path.f_zeros("bias", &[out_channels])?) } else { None };
    Ok(QuantConv2d { weight, bias, config })
}

impl QuantConv2d {
    /// The layer's output, or libtorch's error (e.g. for an input with the wrong channel count).
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.config.input_quantizer.apply(xs)?;
        let w = self.config.kernel_quantizer.apply(&self.weight)?;
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
    let weight = kernel(path, config.kernel_quantizer, &dims, config.kernel_init, fans)?;
    let bias = if config.bias { Some(path.f_zeros("bias", &[out_features])?) } else { None };
    Ok(QuantLinear { weight, bias, config })
}

impl QuantLinear {
    /// The layer's output, or libtorch's error (e.g. for an input with the wrong width).
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.config.input_quantizer.apply(xs)?;
        let w = self.config.kernel_quantizer.apply(&self.weight)?;
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

/// Configuration of [`BatchNorm`]; `Default` is Keras's `BatchNormalization(scale=False)` as in
/// larq's examples: a trainable shift, no trainable scale, momentum 0.99 (Keras's convention:
/// the weight of the old running value), epsilon 1e-3.
///
/// ```
/// let c = caseopt::bnn::BatchNormConfig::default();
/// assert!(c.center && !c.scale);
/// assert_eq!((c.momentum, c.epsilon), (0.99, 1e-3));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BatchNormConfig {
    /// Learn a shift `beta` (full precision). Default `true`.
    pub center: bool,
    /// Learn a scale `gamma` (full precision). Default `false`.
    pub scale: bool,
    /// Keras momentum: `running = momentum * running + (1 - momentum) * batch`, in `[0, 1]`.
    /// Default 0.99 (torch's `momentum=0.01`).
    pub momentum: f64,
    /// Added to the variance, `> 0`. Default 1e-3.
    pub epsilon: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig { center: true, scale: false, momentum: 0.99, epsilon: 1e-3 }
    }
}

/// Batch normalisation over dimension 1 of `[N, C]` or `[N, C, ...]` inputs, with optional
/// trainable shift and scale.
///
/// Variables: `beta` `[C]` (with `center`), `gamma` `[C]` (with `scale`), and the untrained
/// running statistics `moving_mean` and `moving_variance` (Keras's names).
///
/// ```no_run
/// use caseopt::bnn::batch_norm;
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let bn = batch_norm(&vs.root() / "bn", 3, Default::default())?;
/// let y = bn.forward_t(&Tensor::randn([8, 3, 5, 5], (Kind::Float, Device::Cpu)), true);
/// assert_eq!(y.size(), [8, 3, 5, 5]);
/// let names: Vec<String> = caseopt::var_infos(&vs).into_iter().map(|v| v.name).collect();
/// assert_eq!(names, ["bn.beta"]);
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug)]
pub struct BatchNorm {
    /// Trainable shift, when `center`.
    pub beta: Option<Tensor>,
    /// Trainable scale, when `scale`.
    pub gamma: Option<Tensor>,
    /// Running mean, updated in training mode.
    pub moving_mean: Tensor,
    /// Running (unbiased) variance, updated in training mode.
    pub moving_variance: Tensor,
    /// The configuration it was built with.
    pub config: BatchNormConfig,
    /// 0 normally; while re-estimating the statistics, 1 + the number of batches averaged.
    recalibration: AtomicU64,
}

/// Creates a [`BatchNorm`] over `num_features` channels under `path`.
///
/// Fails on a non-positive channel count, a momentum outside `[0, 1]` or a non-positive
/// epsilon.
pub fn batch_norm<'a, P: std::borrow::Borrow<nn::Path<'a>>>(
    path: P,
    num_features: i64,
    config: BatchNormConfig,
) -> Result<BatchNorm> {
    let path = path.borrow();
    let valid = num_features > 0
        && (0.0..=1.0).contains(&config.momentum)
        && config.epsilon > 0.0
        && config.epsilon.is_finite();
    if !valid {
        return Err(Error::InvalidLayer(format!(
            "batch norm `{}`: need channels > 0, momentum in [0, 1] and epsilon > 0; got {num_features}, {}, {}",
            path.path("beta"),
            config.momentum,
            config.epsilon
        )));
    }
    let dims = [num_features];
    let beta = if config.center { Some(path.f_zeros("beta", &dims)?) } else { None };
    let gamma = if config.scale { Some(path.f_ones("gamma", &dims)?) } else { None };
    Ok(BatchNorm {
        beta,
        gamma,
        moving_mean: path.f_zeros_no_train("moving_mean", &dims)?,
        moving_variance: path.f_ones_no_train("moving_variance", &dims)?,
        config,
        recalibration: AtomicU64::new(0),
    })
}

impl BatchNorm {
    /// The normalised input, or libtorch's error (e.g. for a wrong channel count). In training
    /// mode it uses the batch's statistics and updates the running ones; otherwise it uses the
    /// running ones.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // torch weighs the new batch statistic; Keras weighs the old running value.
        let mut torch_momentum = 1.0 - self.config.momentum;
        let averaged = self.recalibration.load(Ordering::Relaxed);
        if train && averaged > 0 {
            // Cumulative average: the k-th batch gets weight 1/k.
            torch_momentum = 1.0 / averaged as f64;
            self.recalibration.store(averaged + 1, Ordering::Relaxed);
        }
        Ok(Tensor::f_batch_norm(
            xs,
            self.gamma.as_ref(),
            self.beta.as_ref(),
            Some(&self.moving_mean),
            Some(&self.moving_variance),
            train,
            torch_momentum,
            self.config.epsilon,
            false,
        )?)
    }

    /// Starts re-estimating the running statistics for the current weights ("precise batch
    /// norm", Wu & Johnson 2021, <https://arxiv.org/abs/2105.07576>): until
    /// [`finish_recalibration`](Self::finish_recalibration), every training-mode forward pass
    /// contributes its batch statistics with equal weight, and the old running values are
    /// discarded by the first one.
    ///
    /// The exponential average kept while training lags behind the weights; in a binarized
    /// network, where optimizers like Bop flip kernel signs every step, that lag can cost
    /// several points of test accuracy. Run the passes under `no_grad`, on training data.
    ///
    /// ```
    /// use caseopt::bnn::batch_norm;
    /// use tch::{nn, Device, Kind, Tensor};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let bn = batch_norm(&vs.root() / "bn", 1, Default::default())?;
    /// bn.start_recalibration();
    /// for v in [2.0f32, 4.0] {
    ///     let batch = Tensor::from_slice(&[v - 1.0, v + 1.0]).view([2, 1]);
    ///     tch::no_grad(|| bn.f_forward_t(&batch, true))?;
    /// }
    /// bn.finish_recalibration();
    /// assert_eq!(Vec::<f32>::try_from(&bn.moving_mean)?, [3.0]); // (2 + 4) / 2
    /// assert_eq!(Vec::<f32>::try_from(&bn.moving_variance)?, [2.0]); // unbiased, both batches
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn start_recalibration(&self) {
        self.recalibration.store(1, Ordering::Relaxed);
    }

    /// Ends [`start_recalibration`](Self::start_recalibration): training-mode passes go back
    /// to the configured momentum. Returns how many batches were averaged.
    pub fn finish_recalibration(&self) -> u64 {
        self.recalibration.swap(0, Ordering::Relaxed).saturating_sub(1)
    }
}

impl nn::ModuleT for BatchNorm {
    /// Panics on libtorch errors, as tch's own layers do; use
    /// [`f_forward_t`](BatchNorm::f_forward_t) to get them as values.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(y) => y,
            Err(e) => panic!("BatchNorm: {e}"),
        }
    }
}

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

    #[test]
    fn quantizer_bits() {
        assert_eq!(Quantizer::SteSign.bits(), 1);
        assert_eq!(Quantizer::Identity.bits(), FULL_PRECISION_BITS);
        assert_eq!(Quantizer::default(), Quantizer::SteSign);
    }
}
