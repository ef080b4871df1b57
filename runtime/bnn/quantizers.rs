//! larq 0.14's quantizers (`larq/quantizers.py`) as functions of a tch tensor.
//!
//! tch has no custom autograd functions, so every quantizer is built from ordinary
//! differentiable ops with one trick: the result is `value - (g.detach() - g)`, where `value` is
//! larq's forward value computed without autograd and `g` is any function of `x` whose gradient
//! is larq's (pseudo-)gradient. `g.detach() - g` is exactly `+0` wherever `g` is finite, and
//! `value - (+0)` is `value` bit for bit (a `-0` stays `-0`, which `value + (+0)` would not keep),
//! so the forward value is exactly larq's and the backward pass is exactly `g`'s. Every `g` below
//! keeps finite values for finite and infinite inputs alike, down to the dtype's largest values:
//! where a factor of `g` can be infinite (`swish_sign` beyond `FLT_MAX / beta`,
//! `magnitude_aware_sign`'s scale of a channel holding an infinity), `g` multiplies it with
//! `x - x.detach()`, which is +0 in the forward pass and `x` in the backward one.
//!
//! Where larq's gradient is `dy * c(x)` for a function `c`, `g` is `h(x) * c(x).detach()` (`h`
//! the identity, clipped where larq clips): libtorch's backward of a product is `dy * c`, one
//! rounding, the same as TensorFlow's. Where larq evaluates a longer expression in `dy`
//! (`swish_sign`'s `dy * beta * a / b`), `g` applies the same operations in reverse order, so the
//! backward pass evaluates larq's expression in larq's order.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Which operand of a layer a quantizer is applied to: it decides what "per channel" means for
/// [`magnitude_aware_sign`], the one quantizer whose result depends on the layout.
///
/// larq reduces over every axis but the last, which is the output channel of a TensorFlow
/// kernel (`[kh, kw, in, out]`, `[in, out]`) and the channel of an NHWC activation. caseopt's
/// tensors are in PyTorch's layout, so the same channels are dimension 0 of a kernel
/// (`[out, in, kh, kw]`, `[out, in]`) and dimension 1 of an activation (`NCHW`, `[N, C]`).
///
/// ```
/// use caseopt::bnn::{magnitude_aware_sign, Operand};
/// use tch::Tensor;
///
/// // Two output channels of a dense kernel [out = 2, in = 2]: one scale per row.
/// let w = Tensor::from_slice(&[0.5f32, -1.5, 2.0, 4.0]).view([2, 2]);
/// let q = magnitude_aware_sign(&w, Some(1.0), Operand::Kernel)?;
/// assert_eq!(Vec::<f32>::try_from(q.flatten(0, -1))?, [1.0, -1.0, 3.0, 3.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Operand {
    /// An activation, `[N, C, ...]`: channels are dimension 1 (dimension 0 of a 1-D tensor).
    #[default]
    Input,
    /// A kernel, `[out, in, ...]`: output channels are dimension 0.
    Kernel,
}

/// The two modes of larq's `DoReFa` quantizer.
///
/// ```
/// use caseopt::bnn::{dorefa, DoReFaMode};
/// let x = tch::Tensor::from_slice(&[-0.5f32, 0.2, 0.5, 0.9]);
/// let q = dorefa(&x, 2, DoReFaMode::Activations)?; // levels 0, 1/3, 2/3, 1
/// assert_eq!(Vec::<f32>::try_from(&q)?, [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DoReFaMode {
    /// `mode="activations"`: clip to `[0, 1]`, then quantize to `2^k - 1` steps.
    #[default]
    Activations,
    /// `mode="weights"`: `tanh`, scale by the tensor's largest magnitude into `[0, 1]`,
    /// quantize, and map back to `[-1, 1]`.
    Weights,
}

/// Sign with a straight-through gradient (larq's `ste_sign`, clip value 1).
///
/// Forward: `+1` where `x >= 0` (so `sign(0) = +1`), `-1` elsewhere; the values are exactly
/// `+-1` in `x`'s dtype. Backward: the incoming gradient where `|x| <= 1` (inclusive, as larq's
/// `tf.less_equal`), zero elsewhere. [`ste_sign_clipped`] takes another clip value.
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
    ste_sign_clipped(x, Some(1.0))
}

/// larq's `ste_sign(x, clip_value)`: sign forward, the incoming gradient where
/// `|x| <= clip_value` backward (everywhere with `None`, larq's `clip_value=None`).
///
/// Fails on a negative or NaN clip value.
///
/// ```
/// use caseopt::bnn::ste_sign_clipped;
/// use tch::{Kind, Tensor};
///
/// let x = Tensor::from_slice(&[-0.6f32, -0.5, 0.5, 0.6]).set_requires_grad(true);
/// ste_sign_clipped(&x, Some(0.5))?.sum(Kind::Float).backward();
/// assert_eq!(Vec::<f32>::try_from(&x.grad())?, [0.0, 1.0, 1.0, 0.0]);
/// assert!(ste_sign_clipped(&x, Some(-1.0)).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ste_sign_clipped(x: &Tensor, clip_value: Option<f64>) -> Result<Tensor> {
    check_clip("ste_sign", clip_value)?;
    let sign = larq_sign(&x.f_detach()?)?;
    if !x.requires_grad() {
        // Nothing to differentiate (data, or evaluation): skip the straight-through term.
        return Ok(sign);
    }
    with_gradient_of(&sign, &clipped_identity(x, clip_value)?)
}

/// larq's `approx_sign` (Bi-Real Net): sign forward; backward the incoming gradient times
/// `2 - 2|x|` where `|x| <= 1`, zero elsewhere (the derivative of a piecewise quadratic
/// approximation of the sign).
///
/// ```
/// use caseopt::bnn::approx_sign;
/// use tch::{Kind, Tensor};
///
/// let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.75]).set_requires_grad(true);
/// let y = approx_sign(&x)?;
/// assert_eq!(Vec::<f32>::try_from(&y)?, [-1.0, -1.0, 1.0, 1.0]);
/// y.sum(Kind::Float).backward();
/// assert_eq!(Vec::<f32>::try_from(&x.grad())?, [0.0, 1.0, 2.0, 0.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn approx_sign(x: &Tensor) -> Result<Tensor> {
    let xd = x.f_detach()?;
    let sign = larq_sign(&xd)?;
    if !x.requires_grad() {
        return Ok(sign);
    }
    // larq: `(1 - |x|) * 2 * dy`. The ReLU only zeroes the coefficient outside [-1, 1], where
    // the clipped identity masks the gradient anyway, and keeps `g` finite for infinite x.
    let coefficient = xd.f_abs()?.f_neg()?.f_add_scalar(1.0)?.f_relu()?.f_mul_scalar(2.0)?;
    let g = clipped_identity(x, Some(1.0))?.f_mul(&coefficient)?;
    with_gradient_of(&sign, &g)
}

/// larq's `swish_sign(x, beta)` (BNN+): sign forward; backward the incoming gradient times the
/// derivative of the SignSwish function,
/// `beta * (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))`.
///
/// The backward pass evaluates larq's expression `dy * beta * a / b` in larq's order, but `tanh`
/// and `cosh` are libtorch's, which round differently from TensorFlow's Eigen: gradients agree
/// with larq's to a few units in the last place (tests/test_quantizers.rs measures it). Fails
/// unless `beta` is finite and positive.
///
/// ```
/// use caseopt::bnn::swish_sign;
/// use tch::{Kind, Tensor};
///
/// let x = Tensor::from_slice(&[-1.0f32, 0.0, 1.0]).set_requires_grad(true);
/// swish_sign(&x, 5.0)?.sum(Kind::Float).backward();
/// let g = Vec::<f32>::try_from(&x.grad())?;
/// assert_eq!(g[1], 5.0); // beta * 2 / 2 at x = 0
/// assert!(g[0] == g[2] && g[0] < 0.0); // symmetric, negative beyond the peak
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn swish_sign(x: &Tensor, beta: f64) -> Result<Tensor> {
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(invalid("swish_sign", "beta", beta, "a finite number > 0"));
    }
    let xd = x.f_detach()?;
    let sign = larq_sign(&xd)?;
    if !x.requires_grad() {
        return Ok(sign);
    }
    let bx = xd.f_mul_scalar(beta)?;
    // a = 2 - bx * tanh(bx * 0.5); b = 1 + cosh(bx), as larq writes them. `a` is infinite
    // only where `bx` is (|x| beyond the dtype's largest value over beta, or x infinite),
    // where `b` is too and larq's gradient is `-inf / inf`, NaN: 0 in its place keeps `g`
    // finite and makes the gradient there +-0, the derivative's limit.
    let a = bx.f_mul(&bx.f_mul_scalar(0.5)?.f_tanh()?)?.f_neg()?.f_add_scalar(2.0)?;
    let a = a.f_nan_to_num(0.0, 0.0, 0.0)?;
    let b = bx.f_cosh()?.f_add_scalar(1.0)?;
    // Backward through `((d / b) * a) * beta` is `((dy * beta) * a) / b`: larq's order. `d`
    // is `x` in the backward pass and +0 in the forward one, so that `g` is +-0 (finite) even
    // where `b` is infinite and `a` the largest finite value: `x / b * a` was `0 * inf`, NaN,
    // and made the forward value NaN through the carrier.
    let g = zero_valued(&finite_identity(x)?)?.f_div(&b)?.f_mul(&a)?.f_mul_scalar(beta)?;
    with_gradient_of(&sign, &g)
}

/// larq's `ste_tern(x, threshold_value, ternary_weight_networks, clip_value)`: `+1` above the
/// threshold, `-1` below its negative, `0` between (`sign(sign(x + t) + sign(x - t))`, so
/// `x = +-t` maps to `+-1`); backward the incoming gradient where `|x| <= clip_value`.
///
/// With `ternary_weight_networks` the threshold is `0.7 * sum(|x|) / numel(x)`, over the whole
/// tensor, and `threshold_value` is ignored. larq computes that sum with TensorFlow's
/// reduction, libtorch with its own: they can differ in the last bit for arbitrary values, and
/// then so can the threshold. Fails on a negative or NaN threshold or clip value.
///
/// ```
/// use caseopt::bnn::ste_tern;
/// let x = tch::Tensor::from_slice(&[-0.5f32, -0.05, 0.0, 0.04, 0.05, 2.0]);
/// let q = ste_tern(&x, 0.05, false, Some(1.0))?;
/// assert_eq!(Vec::<f32>::try_from(&q)?, [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ste_tern(
    x: &Tensor,
    threshold_value: f64,
    ternary_weight_networks: bool,
    clip_value: Option<f64>,
) -> Result<Tensor> {
    if threshold_value.is_nan() || threshold_value < 0.0 {
        return Err(invalid("ste_tern", "threshold_value", threshold_value, "a number >= 0"));
    }
    check_clip("ste_tern", clip_value)?;
    let xd = x.f_detach()?;
    let (above, below) = if ternary_weight_networks {
        // larq: 0.7 * reduce_sum(|x|) / size(x), in x's dtype.
        let count = xd.numel() as f64;
        let threshold = xd.f_abs()?.f_sum(xd.kind())?.f_mul_scalar(0.7)?.f_div_scalar(count)?;
        (xd.f_add(&threshold)?, xd.f_sub(&threshold)?)
    } else {
        (xd.f_add_scalar(threshold_value)?, xd.f_sub_scalar(threshold_value)?)
    };
    let tern = above.f_sign()?.f_add(&below.f_sign()?)?.f_sign()?;
    if !x.requires_grad() {
        return Ok(tern);
    }
    with_gradient_of(&tern, &clipped_identity(x, clip_value)?)
}

/// larq's `ste_heaviside(x, clip_value)`: `1` where `x > 0`, `0` elsewhere (including `-0`);
/// backward the incoming gradient where `|x| <= clip_value`.
///
/// Fails on a negative or NaN clip value.
///
/// ```
/// use caseopt::bnn::ste_heaviside;
/// let x = tch::Tensor::from_slice(&[-1.0f32, -0.0, 0.0, 1e-8, 3.0]);
/// let q = ste_heaviside(&x, Some(1.0))?;
/// assert_eq!(Vec::<f32>::try_from(&q)?, [0.0, 0.0, 0.0, 1.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ste_heaviside(x: &Tensor, clip_value: Option<f64>) -> Result<Tensor> {
    check_clip("ste_heaviside", clip_value)?;
    check_kind("ste_heaviside", x)?;
    // larq: sign(relu(x)). `threshold(x, 0, 0)` is that ReLU with a `+0` for `-0`, as
    // TensorFlow's.
    let step = x.f_detach()?.f_threshold(0.0, 0.0)?.f_sign()?;
    if !x.requires_grad() {
        return Ok(step);
    }
    with_gradient_of(&step, &clipped_identity(x, clip_value)?)
}

/// larq's `MagnitudeAwareSign(clip_value)` (Bi-Real Net): `sign(x)` times the mean of `|x|` per
/// channel, the mean treated as a constant by the backward pass; backward the incoming gradient
/// times that mean where `|x| <= clip_value`.
///
/// The channels are [`Operand`]'s: per output channel of a kernel (`Operand::Kernel`,
/// dimension 0 of `[out, in, kh, kw]` or `[out, in]`), per channel of an activation
/// (`Operand::Input`, dimension 1 of `NCHW` or `[N, C]`), which are the channels larq's "every
/// axis but the last" means in TensorFlow's layout. A 1-D or 0-D tensor is its own channel
/// per element there too (larq reduces over no axis): the scale is `|x|`. The mean is the
/// channel's sum over its element count, as larq's `reduce_mean`; the sums run in libtorch's
/// order, which can differ from TensorFlow's in the last bit. Fails on a negative or NaN clip
/// value.
///
/// ```
/// use caseopt::bnn::{magnitude_aware_sign, Operand};
/// use tch::Tensor;
///
/// // An NCHW activation with 2 channels of 2 pixels: channel 0 has mean |x| 1, channel 1 has 3.
/// let x = Tensor::from_slice(&[0.5f32, -1.5, 2.0, -4.0]).view([1, 2, 2, 1]);
/// let q = magnitude_aware_sign(&x, Some(1.0), Operand::Input)?;
/// assert_eq!(Vec::<f32>::try_from(q.flatten(0, -1))?, [1.0, -1.0, 3.0, -3.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn magnitude_aware_sign(
    x: &Tensor,
    clip_value: Option<f64>,
    operand: Operand,
) -> Result<Tensor> {
    check_clip("magnitude_aware_sign", clip_value)?;
    let xd = x.f_detach()?;
    let scale = channel_mean_abs(&xd, operand)?;
    let value = larq_sign(&xd)?.f_mul(&scale)?;
    if !x.requires_grad() {
        return Ok(value);
    }
    // `d * scale` with `d` zero-valued: a channel whose mean |x| is infinite (an element at
    // +-inf, or sums past the dtype's largest value) made `x * scale` infinite, and the carrier
    // `inf - inf`, NaN. The largest finite value stands in for an infinite scale in the
    // backward pass (larq's gradient is infinite there).
    let finite_scale = scale.f_nan_to_num(0.0, None, None)?;
    let g = zero_valued(&clipped_identity(x, clip_value)?)?.f_mul(&finite_scale)?;
    with_gradient_of(&value, &g)
}

/// larq's `DoReFa(k_bit, mode)` (`DoReFaQuantizer`): quantize to `n = 2^k_bit - 1` steps,
/// `round(u * n) / n` (round half to even, as `tf.round`), with an identity gradient through the
/// rounding.
///
/// - [`DoReFaMode::Activations`]: `u = clip(x, 0, 1)`; the gradient passes where
///   `0 <= x <= 1`.
/// - [`DoReFaMode::Weights`]: `u = tanh(x) / (2 max|tanh(x)|) + 1/2` (the maximum treated as a
///   constant; an all-zero tensor gives `u = 1/2`, as larq's `divide_no_nan`), and the result
///   is `2 q - 1`, in `[-1, 1]`. The gradient is `2 dy / (2 max) * (1 - tanh(x)^2)`; `tanh` is
///   libtorch's, which rounds differently from TensorFlow's, so gradients agree with larq's to
///   a few units in the last place.
///
/// Fails unless `1 <= k_bit <= 8`.
///
/// ```
/// use caseopt::bnn::{dorefa, DoReFaMode};
/// let w = tch::Tensor::from_slice(&[-2.0f32, -0.1, 0.1, 2.0]);
/// let q = dorefa(&w, 1, DoReFaMode::Weights)?; // 1 bit: -1 or +1
/// assert_eq!(Vec::<f32>::try_from(&q)?, [-1.0, -1.0, 1.0, 1.0]);
/// assert!(dorefa(&w, 0, DoReFaMode::Weights).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dorefa(x: &Tensor, k_bit: u8, mode: DoReFaMode) -> Result<Tensor> {
    check_k_bit(k_bit)?;
    check_kind("dorefa_quantizer", x)?;
    let steps = f64::from((1u16 << k_bit) - 1);
    match mode {
        DoReFaMode::Activations => quantize_k(&x.f_clamp(0.0, 1.0)?, steps),
        DoReFaMode::Weights => {
            let limited = tanh_with_tensorflows_gradient(x)?;
            let divisor = limited.f_detach()?.f_abs()?.f_max()?.f_mul_scalar(2.0)?;
            let unit = if divisor.f_double_value(&[])? == 0.0 {
                // divide_no_nan: an all-zero tensor stays zero (and so does its gradient).
                limited.f_mul_scalar(0.0)?.f_add_scalar(0.5)?
            } else {
                limited.f_div(&divisor)?.f_add_scalar(0.5)?
            };
            Ok(quantize_k(&unit, steps)?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?)
        }
    }
}

/// `tanh(x)`, whose backward pass is TensorFlow's `TanhGrad`, `dy * (1 - t * t)` with `t * t`
/// rounded before the subtraction. libtorch's `tanh_backward` rounds `1 - t * t` once (a fused
/// multiply-add), which differed from larq's gradient in the last bit (at x = 1.0, -0.21792345
/// against larq's -0.21792346).
fn tanh_with_tensorflows_gradient(x: &Tensor) -> Result<Tensor> {
    let t = x.f_detach()?.f_tanh()?;
    if !x.requires_grad() {
        return Ok(t);
    }
    // 1 - t*t in two roundings: the product, then the difference (negation is exact).
    let factor = t.f_mul(&t)?.f_neg()?.f_add_scalar(1.0)?;
    // The backward of `x * factor` is `dy * factor`, one rounding, as TanhGrad's last product.
    with_gradient_of(&t, &finite_identity(x)?.f_mul(&factor)?)
}

/// `round(u * steps) / steps`, with an identity gradient.
fn quantize_k(unit: &Tensor, steps: f64) -> Result<Tensor> {
    let levels = unit.f_detach()?.f_mul_scalar(steps)?.f_round()?.f_div_scalar(steps)?;
    // `+ 0` turns the `-0` that clipping `-0` leaves into `+0`, as TensorFlow's vectorised
    // `clip_by_value` does (its scalar loop for the last few elements keeps `-0`); other
    // values are unchanged.
    let levels = levels.f_add_scalar(0.0)?;
    if !unit.requires_grad() {
        return Ok(levels);
    }
    with_gradient_of(&levels, unit)
}

/// larq's `math.sign`: `sign(sign(x) + 0.1)`, which maps 0 (and -0) to +1 and stays exact.
/// Comparison ops (`x >= 0`, `where`) would say the same, but on CPU they go through bool
/// tensors and are several times slower than these float kernels.
fn larq_sign(detached: &Tensor) -> Result<Tensor> {
    Ok(detached.f_sign()?.f_add_scalar(0.1)?.f_sign()?)
}

/// `value` in the forward pass, `g`'s gradient in the backward pass (see the module docs).
fn with_gradient_of(value: &Tensor, g: &Tensor) -> Result<Tensor> {
    let zero = g.f_detach()?.f_sub(g)?;
    Ok(value.f_sub(&zero)?)
}

/// The per-channel mean of `|x|` (see [`magnitude_aware_sign`]), shaped to broadcast against x.
fn channel_mean_abs(detached: &Tensor, operand: Operand) -> Result<Tensor> {
    let magnitude = detached.f_abs()?;
    let size = detached.size();
    if size.len() <= 1 {
        return Ok(magnitude);
    }
    let channel = match operand {
        Operand::Input => 1,
        Operand::Kernel => 0,
    };
    let dims: Vec<i64> = (0..size.len() as i64).filter(|&d| d != channel).collect();
    let count: i64 = dims.iter().map(|&d| size[d as usize]).product();
    let sum = magnitude.f_sum_dim_intlist(dims.as_slice(), true, detached.kind())?;
    Ok(sum.f_div_scalar(count as f64)?)
}

/// A function of `x` whose gradient is 1 where `|x| <= clip_value` and 0 elsewhere, 1 at every
/// finite `x` with `None` (its value is finite and not used).
///
/// `x.clamp(-c, c)` has exactly that gradient, but libtorch's CPU backward for it builds two
/// bool masks and a `where`, the slowest part of a binarized layer. `threshold(x, t, v)` passes
/// the gradient where `x > t` in one fused float kernel; with `t` the largest value below `-c`
/// in `x`'s dtype, `x > t` is exactly `x >= -c`. Applied to `x` and then to the negated result
/// it gives the two-sided inclusive mask. The clip value is rounded to `x`'s dtype first, as
/// TensorFlow converts larq's Python float. Other dtypes fall back to `clamp`.
fn clipped_identity(x: &Tensor, clip_value: Option<f64>) -> Result<Tensor> {
    let Some(clip) = clip_value else {
        return finite_identity(x);
    };
    let below = match x.kind() {
        Kind::Float => {
            let clip = clip as f32;
            clip.is_finite().then(|| f64::from((-clip).next_down()))
        }
        Kind::Double => clip.is_finite().then(|| (-clip).next_down()),
        _ => return Ok(x.f_clamp(-clip, clip)?),
    };
    let Some(t) = below else {
        return finite_identity(x);
    };
    // Where the lower threshold replaced x by t, the upper one sees -t > t and passes; the
    // lower one has already zeroed the gradient there.
    let lower = x.f_threshold(t, t)?;
    let upper = lower.f_neg()?.f_threshold(t, t)?;
    Ok(upper.f_neg()?)
}

/// `x` with infinities and NaN replaced by finite values: the identity's gradient at every
/// finite `x`, zero elsewhere. larq's unclipped gradient also passes at `+-inf`; a finite `g`
/// is what keeps the forward value exact there.
fn finite_identity(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_nan_to_num(0.0, None, None)?)
}

/// `x - x.detach()`: `x`'s gradient, and +0 for a value wherever `x` is finite, so that a
/// product with it stays finite whatever the other factor's size.
fn zero_valued(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_sub(&x.f_detach()?)?)
}

/// Refuses the dtypes whose ops with a scalar argument (`threshold`, `clamp`) leave a libtorch
/// error pending that tch then unwraps while dropping the scalar, a panic instead of an error:
/// bool and complex tensors, which no quantizer supports, are [`Error::Torch`] up front.
fn check_kind(quantizer: &'static str, x: &Tensor) -> Result<()> {
    let kind = x.f_kind()?;
    if matches!(kind, Kind::Bool | Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble) {
        return Err(Error::Torch(tch::TchError::Kind(format!(
            "{quantizer} does not support {kind:?} tensors (bool and complex tensors have no \
             sign, order or rounding)"
        ))));
    }
    Ok(())
}

/// Checks a clip value: `None` (no clipping) or a number `>= 0`.
pub(super) fn check_clip(quantizer: &'static str, clip_value: Option<f64>) -> Result<()> {
    match clip_value {
        Some(c) if c.is_nan() || c < 0.0 => {
            Err(invalid(quantizer, "clip_value", c, "a number >= 0, or None for no clipping"))
        }
        _ => Ok(()),
    }
}

/// Checks DoReFa's bit count.
pub(super) fn check_k_bit(k_bit: u8) -> Result<()> {
    if (1..=8).contains(&k_bit) {
        Ok(())
    } else {
        Err(invalid("dorefa_quantizer", "k_bit", f64::from(k_bit), "an integer in 1..=8"))
    }
}

pub(super) fn invalid(
    quantizer: &'static str,
    name: &'static str,
    value: f64,
    expected: &'static str,
) -> Error {
    Error::InvalidQuantizer { quantizer, name, value, expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_checks() {
        assert!(check_clip("ste_sign", None).is_ok());
        assert!(check_clip("ste_sign", Some(0.0)).is_ok());
        assert!(check_clip("ste_sign", Some(f64::INFINITY)).is_ok());
        assert!(check_clip("ste_sign", Some(-1e-9)).is_err());
        assert!(check_clip("ste_sign", Some(f64::NAN)).is_err());
        assert!(check_k_bit(0).is_err() && check_k_bit(9).is_err());
        assert!((1..=8).all(|k| check_k_bit(k).is_ok()));
    }

    #[test]
    fn the_threshold_mask_is_the_inclusive_clip_in_f32() {
        // For clip 0.3 (not representable), the mask must be |x| <= 0.3f32, inclusive.
        let c = 0.3f32;
        let xs = [(-c).next_down(), -c, (-c).next_up(), 0.0, c.next_down(), c, c.next_up()];
        let x = Tensor::from_slice(&xs).set_requires_grad(true);
        clipped_identity(&x, Some(0.3)).unwrap().sum(Kind::Float).backward();
        let g = Vec::<f32>::try_from(&x.grad()).unwrap();
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn the_gradient_carrier_keeps_values_and_negative_zero() {
        let value = Tensor::from_slice(&[-0.0f32, 1.0, f32::MAX]);
        let x = Tensor::from_slice(&[f32::INFINITY, -3.0, 0.5]).set_requires_grad(true);
        let y = with_gradient_of(&value, &finite_identity(&x).unwrap()).unwrap();
        let bits: Vec<u32> =
            Vec::<f32>::try_from(&y).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, [(-0.0f32).to_bits(), 1.0f32.to_bits(), f32::MAX.to_bits()]);
    }
}
