//! [`Quantizer`]: a quantizer as a value, what a quantized layer holds for its input and its
//! kernel, and the precision it declares the kernel with.

use tch::Tensor;

use super::quantizers::{
    approx_sign, check_clip, check_k_bit, dorefa, invalid, magnitude_aware_sign, ste_heaviside,
    ste_sign, ste_sign_clipped, ste_tern, swish_sign, DoReFaMode, Operand,
};
use crate::error::Result;
use crate::var::FULL_PRECISION_BITS;

/// What a quantized layer does to its input or its kernel before the convolution or product:
/// one of larq 0.14's quantizers, with its parameters.
///
/// A layer declares its kernel in the `VarStore` with the kernel quantizer's [`bits`]
/// (through [`PathExt::bits`](crate::PathExt::bits)), so routing rules written with `binary` or
/// `bits(N)` send the kernel to the right optimizer. The parameterised variants' defaults,
/// larq's, are the associated constants ([`Quantizer::STE_TERN`], ...). Parameters are checked
/// when a layer is built and whenever a quantizer is applied ([`validate`]).
///
/// ```
/// use caseopt::bnn::Quantizer;
/// let x = tch::Tensor::from_slice(&[-0.5f32, 0.0, 0.7]);
/// assert_eq!(Vec::<f32>::try_from(&Quantizer::SteSign.apply(&x)?)?, [-1.0, 1.0, 1.0]);
/// assert_eq!(Vec::<f32>::try_from(&Quantizer::Identity.apply(&x)?)?, [-0.5, 0.0, 0.7]);
/// assert_eq!(Vec::<f32>::try_from(&Quantizer::STE_TERN.apply(&x)?)?, [-1.0, 0.0, 1.0]);
/// assert_eq!((Quantizer::SteSign.bits(), Quantizer::STE_TERN.bits()), (1, 2));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`bits`]: Quantizer::bits
/// [`validate`]: Quantizer::validate
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Quantizer {
    /// Leave the tensor real-valued (larq's `None` quantizer); 32 bits.
    Identity,
    /// [`ste_sign`]: binarise to `+-1` with a straight-through gradient clipped at 1 (larq's
    /// `"ste_sign"`); 1 bit.
    #[default]
    SteSign,
    /// [`ste_sign_clipped`]: `ste_sign` with another clip value (`None`: no clipping); 1 bit.
    SteSignClipped {
        /// Gradients pass where `|x| <= clip_value`. larq's default 1.
        clip_value: Option<f64>,
    },
    /// [`approx_sign`]: sign with the gradient `2 - 2|x|` inside `[-1, 1]`; 1 bit.
    ApproxSign,
    /// [`swish_sign`]: sign with the SignSwish gradient; 1 bit.
    SwishSign {
        /// Steepness; larq's default 5.
        beta: f64,
    },
    /// [`ste_tern`]: `-1`, `0` or `+1` with a straight-through gradient; 2 bits.
    SteTern {
        /// The threshold `t` (`|x| < t` maps to 0). larq's default 0.05.
        threshold_value: f64,
        /// Use Ternary Weight Networks' threshold `0.7 mean(|x|)` instead. larq's default
        /// `false`.
        ternary_weight_networks: bool,
        /// Gradients pass where `|x| <= clip_value`. larq's default 1.
        clip_value: Option<f64>,
    },
    /// [`ste_heaviside`]: `1` where `x > 0`, else `0`, with a straight-through gradient; 1 bit.
    SteHeaviside {
        /// Gradients pass where `|x| <= clip_value`. larq's default 1.
        clip_value: Option<f64>,
    },
    /// [`magnitude_aware_sign`]: sign times the per-channel mean of `|x|`; 1 bit.
    MagnitudeAwareSign {
        /// Gradients pass where `|x| <= clip_value`. larq's default 1.
        clip_value: Option<f64>,
    },
    /// [`dorefa`]: `k_bit`-bit quantization (larq's `DoReFa`/`DoReFaQuantizer`); `k_bit` bits.
    DoReFa {
        /// Bits, `1..=8`. larq's default 2.
        k_bit: u8,
        /// Activations (clip to `[0, 1]`) or weights (`tanh`, norm, `[-1, 1]`). larq's default
        /// activations.
        mode: DoReFaMode,
    },
    /// The identity, declaring a precision (larq's `NoOp`/`NoOpQuantizer(precision)`): a
    /// latent kernel that an optimizer such as Bop keeps binary is marked `precision: 1`
    /// without being quantized in the forward pass.
    NoOp {
        /// The declared precision, `1..=32`.
        precision: u8,
    },
}

impl Quantizer {
    /// larq's `SwishSign()`: beta 5.
    pub const SWISH_SIGN: Quantizer = Quantizer::SwishSign { beta: 5.0 };
    /// larq's `SteTern()`: threshold 0.05, no Ternary Weight Networks, clip 1.
    pub const STE_TERN: Quantizer = Quantizer::SteTern {
        threshold_value: 0.05,
        ternary_weight_networks: false,
        clip_value: Some(1.0),
    };
    /// larq's `SteHeaviside()`: clip 1.
    pub const STE_HEAVISIDE: Quantizer = Quantizer::SteHeaviside { clip_value: Some(1.0) };
    /// larq's `MagnitudeAwareSign()`: clip 1.
    pub const MAGNITUDE_AWARE_SIGN: Quantizer =
        Quantizer::MagnitudeAwareSign { clip_value: Some(1.0) };
    /// larq's `DoReFa()`: 2 bits, activations.
    pub const DOREFA: Quantizer = Quantizer::DoReFa { k_bit: 2, mode: DoReFaMode::Activations };

    /// larq's name for this quantizer (its string alias, or its class name where it has none).
    ///
    /// ```
    /// assert_eq!(caseopt::bnn::Quantizer::DOREFA.larq_name(), "dorefa_quantizer");
    /// ```
    pub fn larq_name(self) -> &'static str {
        match self {
            Quantizer::Identity => "None",
            Quantizer::SteSign | Quantizer::SteSignClipped { .. } => "ste_sign",
            Quantizer::ApproxSign => "approx_sign",
            Quantizer::SwishSign { .. } => "swish_sign",
            Quantizer::SteTern { .. } => "ste_tern",
            Quantizer::SteHeaviside { .. } => "ste_heaviside",
            Quantizer::MagnitudeAwareSign { .. } => "magnitude_aware_sign",
            Quantizer::DoReFa { .. } => "dorefa_quantizer",
            Quantizer::NoOp { .. } => "NoOp",
        }
    }

    /// Checks the parameters: clip values and thresholds `>= 0` (not NaN), `beta > 0` and
    /// finite, `k_bit` in `1..=8`, a no-op's precision in `1..=32`.
    ///
    /// ```
    /// use caseopt::bnn::Quantizer;
    /// assert!(Quantizer::STE_TERN.validate().is_ok());
    /// assert!(Quantizer::SwishSign { beta: 0.0 }.validate().is_err());
    /// assert!(Quantizer::NoOp { precision: 0 }.validate().is_err());
    /// ```
    pub fn validate(self) -> Result<()> {
        let name = self.larq_name();
        match self {
            Quantizer::Identity | Quantizer::SteSign | Quantizer::ApproxSign => Ok(()),
            Quantizer::SteSignClipped { clip_value }
            | Quantizer::SteHeaviside { clip_value }
            | Quantizer::MagnitudeAwareSign { clip_value } => check_clip(name, clip_value),
            Quantizer::SwishSign { beta } if !(beta > 0.0 && beta.is_finite()) => {
                Err(invalid(name, "beta", beta, "a finite number > 0"))
            }
            Quantizer::SwishSign { .. } => Ok(()),
            Quantizer::SteTern { threshold_value, clip_value, .. } => {
                if threshold_value.is_nan() || threshold_value < 0.0 {
                    return Err(invalid(name, "threshold_value", threshold_value, "a number >= 0"));
                }
                check_clip(name, clip_value)
            }
            Quantizer::DoReFa { k_bit, .. } => check_k_bit(k_bit),
            Quantizer::NoOp { precision } if !(1..=FULL_PRECISION_BITS).contains(&precision) => {
                Err(invalid(name, "precision", f64::from(precision), "an integer in 1..=32"))
            }
            Quantizer::NoOp { .. } => Ok(()),
        }
    }

    /// The quantized tensor, for a layer's input (an activation: `[N, C, ...]`).
    ///
    /// ```
    /// use caseopt::bnn::Quantizer;
    /// let x = tch::Tensor::from_slice(&[-0.5f32, 0.2, 0.5, 2.0]);
    /// let q = Quantizer::DoReFa { k_bit: 1, mode: Default::default() }.apply(&x)?;
    /// assert_eq!(Vec::<f32>::try_from(&q)?, [0.0, 0.0, 0.0, 1.0]); // round(0.5) = 0, to even
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        self.apply_to(x, Operand::Input)
    }

    /// The quantized tensor, for a layer's kernel (`[out, in, ...]`): differs from
    /// [`apply`](Self::apply) only for [`Quantizer::MagnitudeAwareSign`], whose scale is per
    /// output channel.
    ///
    /// ```
    /// use caseopt::bnn::Quantizer;
    /// let w = tch::Tensor::from_slice(&[1.0f32, -3.0, 0.5, 0.5]).view([2, 2]);
    /// let q = Quantizer::MAGNITUDE_AWARE_SIGN.apply_kernel(&w)?;
    /// assert_eq!(Vec::<f32>::try_from(q.flatten(0, -1))?, [2.0, -2.0, 0.5, 0.5]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn apply_kernel(self, w: &Tensor) -> Result<Tensor> {
        self.apply_to(w, Operand::Kernel)
    }

    /// The quantized tensor, with the layout `operand` says.
    ///
    /// ```
    /// use caseopt::bnn::{Operand, Quantizer};
    /// let x = tch::Tensor::from_slice(&[0.3f32, -0.2]);
    /// let q = Quantizer::NoOp { precision: 1 }.apply_to(&x, Operand::Kernel)?;
    /// assert_eq!(Vec::<f32>::try_from(&q)?, [0.3, -0.2]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn apply_to(self, x: &Tensor, operand: Operand) -> Result<Tensor> {
        self.validate()?;
        match self {
            Quantizer::Identity | Quantizer::NoOp { .. } => Ok(x.shallow_clone()),
            Quantizer::SteSign => ste_sign(x),
            Quantizer::SteSignClipped { clip_value } => ste_sign_clipped(x, clip_value),
            Quantizer::ApproxSign => approx_sign(x),
            Quantizer::SwishSign { beta } => swish_sign(x, beta),
            Quantizer::SteTern { threshold_value, ternary_weight_networks, clip_value } => {
                ste_tern(x, threshold_value, ternary_weight_networks, clip_value)
            }
            Quantizer::SteHeaviside { clip_value } => ste_heaviside(x, clip_value),
            Quantizer::MagnitudeAwareSign { clip_value } => {
                magnitude_aware_sign(x, clip_value, operand)
            }
            Quantizer::DoReFa { k_bit, mode } => dorefa(x, k_bit, mode),
        }
    }

    /// Bits per element of the quantized tensor (larq's `precision`): what a kernel with this
    /// quantizer is declared as in the `VarStore`. Sign-like quantizers 1, `ste_tern` 2,
    /// DoReFa `k_bit`, the identity 32, a no-op its declared precision.
    ///
    /// ```
    /// use caseopt::bnn::{DoReFaMode, Quantizer};
    /// assert_eq!(Quantizer::DoReFa { k_bit: 4, mode: DoReFaMode::Weights }.bits(), 4);
    /// assert_eq!(Quantizer::NoOp { precision: 1 }.bits(), 1);
    /// assert_eq!(Quantizer::Identity.bits(), 32);
    /// ```
    pub fn bits(self) -> u8 {
        match self {
            Quantizer::Identity => FULL_PRECISION_BITS,
            Quantizer::SteSign
            | Quantizer::SteSignClipped { .. }
            | Quantizer::ApproxSign
            | Quantizer::SwishSign { .. }
            | Quantizer::SteHeaviside { .. }
            | Quantizer::MagnitudeAwareSign { .. } => 1,
            Quantizer::SteTern { .. } => 2,
            Quantizer::DoReFa { k_bit, .. } => k_bit,
            Quantizer::NoOp { precision } => precision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_follow_larq_precision() {
        assert_eq!(Quantizer::SteSign.bits(), 1);
        assert_eq!(Quantizer::Identity.bits(), FULL_PRECISION_BITS);
        assert_eq!(Quantizer::default(), Quantizer::SteSign);
        assert_eq!(Quantizer::SWISH_SIGN.bits(), 1);
        assert_eq!(Quantizer::STE_TERN.bits(), 2);
        assert_eq!(Quantizer::DOREFA.bits(), 2);
        assert_eq!(Quantizer::NoOp { precision: 8 }.bits(), 8);
    }

    #[test]
    fn defaults_are_larqs() {
        assert_eq!(Quantizer::SWISH_SIGN, Quantizer::SwishSign { beta: 5.0 });
        let Quantizer::SteTern { threshold_value, ternary_weight_networks, clip_value } =
            Quantizer::STE_TERN
        else {
            unreachable!("STE_TERN is a SteTern");
        };
        assert_eq!(
            (threshold_value, ternary_weight_networks, clip_value),
            (0.05, false, Some(1.0))
        );
        assert_eq!(
            Quantizer::DOREFA,
            Quantizer::DoReFa { k_bit: 2, mode: DoReFaMode::Activations }
        );
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = Quantizer::SteTern {
            threshold_value: -0.1,
            ternary_weight_networks: false,
            clip_value: None,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("ste_tern") && e.contains("threshold_value"), "{e}");
        let e = Quantizer::DoReFa { k_bit: 9, mode: DoReFaMode::Weights }.validate().unwrap_err();
        assert!(e.to_string().contains("k_bit"), "{e}");
        assert!(Quantizer::NoOp { precision: 33 }.validate().is_err());
        assert!(Quantizer::MagnitudeAwareSign { clip_value: Some(f64::NAN) }.validate().is_err());
    }
}
