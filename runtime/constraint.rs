//! Constraints applied to a variable after each of its updates: larq's (Keras's)
//! `kernel_constraint`, of which latent-weight BNN training uses `weight_clip`.
//!
//! A constraint is configuration, like a rule's optimizer: it is set on a router
//! ([`Router::set_constraint`](crate::Router::set_constraint),
//! [`Router::set_rule_constraint`](crate::Router::set_rule_constraint)) or on an optimizer
//! ([`Optimizer::set_constraint`](crate::Optimizer::set_constraint)), and checkpoints do not
//! hold it: set it again after building the router that loads one.

use std::fmt;

use tch::Tensor;

use crate::error::{Error, Result};

/// What to do with a variable's new values after each of its updates.
///
/// ```
/// use caseopt::Constraint;
///
/// let clip = Constraint::weight_clip(1.0)?;
/// assert_eq!(clip, Constraint::WeightClip { clip_value: 1.0 });
/// assert_eq!(clip.to_string(), "weight_clip(1)");
/// assert!(Constraint::weight_clip(-1.0).is_err());
/// assert!(Constraint::weight_clip(f64::NAN).is_err());
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Constraint {
    /// larq's `weight_clip(clip_value)` (`larq.constraints.WeightClip`): every value clipped to
    /// `[-clip_value, clip_value]`, NaN kept (as `torch.clamp_` keeps it). `clip_value` must be
    /// `>= 0` (infinity leaves every value as it is).
    WeightClip {
        /// The bound, `>= 0`; larq's default is 1.
        clip_value: f64,
    },
}

impl Constraint {
    /// larq's `weight_clip(clip_value)`, checked ([`Error::InvalidConstraint`] for a negative
    /// or NaN bound).
    ///
    /// ```
    /// let clip = caseopt::Constraint::weight_clip(0.5)?;
    /// assert_eq!(clip.clip_value(), 0.5);
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn weight_clip(clip_value: f64) -> Result<Constraint> {
        let c = Constraint::WeightClip { clip_value };
        c.validate()?;
        Ok(c)
    }

    /// Fails with [`Error::InvalidConstraint`] when the constraint's parameters are out of
    /// range (a value built directly as `Constraint::WeightClip { .. }` is checked here, when
    /// it is set).
    ///
    /// ```
    /// use caseopt::Constraint;
    /// assert!(Constraint::WeightClip { clip_value: -0.5 }.validate().is_err());
    /// assert!(Constraint::WeightClip { clip_value: 0.0 }.validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Constraint::WeightClip { clip_value } if clip_value.is_nan() || clip_value < 0.0 => {
                Err(Error::InvalidConstraint {
                    constraint: "weight_clip",
                    name: "clip_value",
                    value: clip_value,
                    expected: ">= 0",
                })
            }
            Constraint::WeightClip { .. } => Ok(()),
        }
    }

    /// The clipping bound: values end in `[-clip_value(), clip_value()]`.
    ///
    /// ```
    /// assert_eq!(caseopt::Constraint::weight_clip(2.0)?.clip_value(), 2.0);
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn clip_value(&self) -> f64 {
        match *self {
            Constraint::WeightClip { clip_value } => clip_value,
        }
    }

    /// Whether the constraint changes a value of -1 or +1 (what Bop and Bop2ndOrder write):
    /// a clip below 1.
    pub(crate) fn changes_signs_values(&self) -> bool {
        self.clip_value() < 1.0
    }

    /// Applies the constraint in place with libtorch ops (`clamp_`), on the tensor's device.
    pub(crate) fn apply(&self, t: &mut Tensor) -> Result<()> {
        let c = self.clip_value();
        if c.is_infinite() {
            return Ok(());
        }
        let _ = t.f_clamp_(-c, c)?;
        Ok(())
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Constraint::WeightClip { clip_value } => write!(f, "weight_clip({clip_value})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_keeps_nan_and_bounds_the_rest() {
        let mut t = Tensor::from_slice(&[-3.0f32, -0.5, 0.0, 2.0, f32::NAN, f32::INFINITY]);
        Constraint::weight_clip(1.0).unwrap().apply(&mut t).unwrap();
        let v = Vec::<f32>::try_from(&t).unwrap();
        assert_eq!(&v[..4], &[-1.0, -0.5, 0.0, 1.0]);
        assert!(v[4].is_nan());
        assert_eq!(v[5], 1.0);
        assert!(Constraint::weight_clip(0.9).unwrap().changes_signs_values());
        assert!(!Constraint::weight_clip(1.0).unwrap().changes_signs_values());
    }
}
