//! larq's introductory binarized CNN for MNIST (larq 0.14 docs, "Introduction to BNNs with
//! Larq"), layer for layer (shown for MNIST's 28x28 images and 10 classes; other IDX data sets
//! change the spatial sizes, the flattened width and the last layer's width):
//!
//! ```text
//! QuantConv2D(32, 3x3)  binary kernel, real input    28x28x1 -> 26x26x32
//! MaxPool 2, BatchNorm(scale=False)                         -> 13x13x32
//! QuantConv2D(64, 3x3)  binary input and kernel             -> 11x11x64
//! MaxPool 2, BatchNorm(scale=False)                         -> 5x5x64
//! QuantConv2D(64, 3x3)  binary input and kernel             -> 3x3x64
//! BatchNorm(scale=False), Flatten                           -> 576
//! QuantDense(64)        binary input and kernel, BatchNorm  -> 64
//! QuantDense(10)        binary input and kernel, BatchNorm  -> 10, then softmax (in the loss)
//! ```
//!
//! No biases. Every kernel is binarised by `ste_sign` in the forward pass. With Bop the kernels
//! start as random +-1: larq starts them Glorot-uniform, but its forward pass only sees their
//! signs and Bop's first step binarises them, so only the first step's flip threshold differs
//! (`w * m` against 1e-6 with `|w| = 1` instead of `|w| < 0.5`). For latent-weight training
//! (Adam on real-valued kernels) they start Glorot-uniform, as larq's do. Batch norms have
//! Keras's defaults: momentum 0.99, epsilon 1e-3.

use caseopt::bnn::{
    self, BatchNorm, KernelInit, QuantConv2d, QuantConv2dConfig, QuantLinear, QuantLinearConfig,
    Quantizer,
};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The smallest image side the three valid 3x3 convolutions and two 2x2 poolings leave at least
/// one pixel of: 18 -> 16 -> 8 -> 6 -> 3 -> 1.
pub const MIN_SIDE: u32 = 18;

/// Why the network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The images are smaller than the convolutions need.
    #[error("images of {rows}x{cols} pixels are too small for the network, which needs at least {MIN_SIDE}x{MIN_SIDE}")]
    TooSmall { rows: u32, cols: u32 },
    /// A layer could not be created.
    #[error(transparent)]
    Layer(#[from] caseopt::Error),
}

/// The side of the last convolution's output for an input side `side` (at least [`MIN_SIDE`]).
fn last_feature_side(side: u32) -> i64 {
    let conv = |s: i64| s - 2; // 3x3, no padding
    let pool = |s: i64| s / 2; // 2x2, stride 2, floor
    conv(pool(conv(pool(conv(i64::from(side))))))
}

/// The network; its variables live in the `VarStore` it was built on.
#[derive(Debug)]
pub struct Net {
    conv1: QuantConv2d,
    bn1: BatchNorm,
    conv2: QuantConv2d,
    bn2: BatchNorm,
    conv3: QuantConv2d,
    bn3: BatchNorm,
    dense1: QuantLinear,
    bn4: BatchNorm,
    dense2: QuantLinear,
    bn5: BatchNorm,
}

impl Net {
    /// Creates the layers under `root` for one-channel images of `rows` x `cols` pixels and
    /// `classes` classes, the kernels initialised with `init`.
    pub fn new(
        root: &nn::Path,
        rows: u32,
        cols: u32,
        classes: u32,
        init: KernelInit,
    ) -> Result<Net, ModelError> {
        if rows < MIN_SIDE || cols < MIN_SIDE {
            return Err(ModelError::TooSmall { rows, cols });
        }
        let flattened = last_feature_side(rows) * last_feature_side(cols) * 64;
        let classes = i64::from(classes);
        let real_input = QuantConv2dConfig {
            input_quantizer: Quantizer::Identity,
            kernel_init: init,
            ..Default::default()
        };
        let binary = QuantConv2dConfig { kernel_init: init, ..Default::default() };
        let dense = QuantLinearConfig { kernel_init: init, ..Default::default() };
        let bn = |name: &str, n| bnn::batch_norm(root / name, n, Default::default());
        Ok(Net {
            conv1: bnn::quant_conv2d(root / "conv1", 1, 32, 3, real_input)?,
            bn1: bn("bn1", 32)?,
            conv2: bnn::quant_conv2d(root / "conv2", 32, 64, 3, binary)?,
            bn2: bn("bn2", 64)?,
            conv3: bnn::quant_conv2d(root / "conv3", 64, 64, 3, binary)?,
            bn3: bn("bn3", 64)?,
            dense1: bnn::quant_linear(root / "dense1", flattened, 64, dense)?,
            bn4: bn("bn4", 64)?,
            dense2: bnn::quant_linear(root / "dense2", 64, classes, dense)?,
            bn5: bn("bn5", classes)?,
        })
    }
}

impl Net {
    /// The batch norms, input side first.
    pub fn batch_norms(&self) -> [&BatchNorm; 5] {
        [&self.bn1, &self.bn2, &self.bn3, &self.bn4, &self.bn5]
    }
}

impl Net {
    /// Logits (the pre-softmax batch-norm output), `[N, classes]`, for images
    /// `[N, 1, rows, cols]`, or libtorch's error.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> caseopt::Result<Tensor> {
        // Channels-last from the start: every later convolution, pooling and batch norm keeps
        // that layout, and CPU max-pooling is much faster in it.
        let xs = bnn::channels_last(xs)?;
        let h = self.conv1.f_forward(&xs)?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let h = self.bn1.f_forward_t(&h, train)?;
        let h = self.conv2.f_forward(&h)?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let h = self.bn2.f_forward_t(&h, train)?;
        let h = self.bn3.f_forward_t(&self.conv3.f_forward(&h)?, train)?.f_flatten(1, -1)?;
        let h = self.bn4.f_forward_t(&self.dense1.f_forward(&h)?, train)?;
        self.bn5.f_forward_t(&self.dense2.f_forward(&h)?, train)
    }
}

impl ModuleT for Net {
    /// [`Net::f_forward_t`], panicking on libtorch errors as tch's own modules do.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(y) => y,
            Err(e) => panic!("Net: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_sides() {
        assert_eq!(last_feature_side(28), 3); // MNIST: 576 = 3 * 3 * 64
        assert_eq!(last_feature_side(MIN_SIDE), 1);
        assert_eq!(last_feature_side(20), 1);
        assert_eq!(last_feature_side(32), 4);
    }
}
