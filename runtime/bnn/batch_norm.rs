//! Batch normalisation with Keras's conventions, as larq's examples use it.

use std::sync::atomic::{AtomicU64, Ordering};

use tch::{nn, Tensor};

use crate::error::{Error, Result};

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
