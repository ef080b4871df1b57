//! Memory layout helpers for convolutional networks on CPU.

use tch::Tensor;

use crate::error::{Error, Result};

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
