//! Admission: which variables the fused kernels take. One variable's metadata (parameter,
//! gradient, state tensors or a run of a state buffer) is checked here and turned into a
//! [`KernelJob`] of validated addresses, or refused with the reason ([`Unfit`]).

use std::mem::{align_of, size_of};

use super::metadata::{same_shape, Status, TensorMeta, CPU, DOUBLE, FLOAT};
use super::{Unfit, MAX_STATES};

/// One variable's update, as validated addresses (plain integers, so that a job list can be
/// kept between steps and sent to threads without claiming anything about the memory).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelJob {
    /// Index of the variable in its optimizer.
    pub(crate) index: usize,
    pub(crate) len: usize,
    pub(crate) p: usize,
    pub(crate) g: usize,
    pub(crate) states: [usize; MAX_STATES],
    /// Per-variable scalars the kernel interprets (e.g. Adam's step size).
    pub(crate) scalars: [f64; 2],
    /// The variable's constraint: new values clamped to `[-clip, clip]` (infinity: none).
    pub(crate) clip: f64,
}

/// A variable's state operands: tensors of its own, or runs of a state buffer.
pub(crate) enum StateMetas<'a> {
    Own(&'a [TensorMeta]),
    InStateBuffer { buffer: &'a TensorMeta, offsets: [usize; MAX_STATES], count: usize },
}

/// Validates one variable's operands (parameter `p`, gradient `g`, the kernel's states) and
/// builds its job; the bool is true for f64.
pub(crate) fn admit(
    index: usize,
    p: &TensorMeta,
    g: &TensorMeta,
    states: StateMetas<'_>,
    names: &[&'static str; MAX_STATES],
) -> Result<(KernelJob, bool), Unfit> {
    usable(p)?;
    usable(g)?;
    if !same_shape(g.shape(), p.shape()) {
        return Err(Unfit::Grad(format!("shape {:?} != {:?}", g.shape(), p.shape())));
    }
    if g.dtype() != p.dtype() {
        return Err(Unfit::Grad(format!("dtype {} != {}", kind_name(g), kind_name(p))));
    }
    if g.device_code() != p.device_code() {
        return Err(Unfit::Grad(format!("device {:?} != {:?}", g.device(), p.device())));
    }
    if p.device_code() != CPU {
        return Err(Unfit::Device(p.device()));
    }
    let (f64, align) = match p.dtype() {
        FLOAT => (false, align_of::<f32>()),
        DOUBLE => (true, align_of::<f64>()),
        _ => return Err(p.kind().map_or(Unfit::Unsupported("an unknown dtype"), Unfit::Kind)),
    };
    if !p.contiguous() {
        return Err(Unfit::NotContiguous("param"));
    }
    if !g.contiguous() {
        return Err(Unfit::NotContiguous("grad"));
    }
    let len = p.numel();
    let mut addrs = [0usize; MAX_STATES];
    // Checks a state tensor, or a whole state buffer, against the parameter.
    let check = |s: &TensorMeta, name: &'static str, min_len: usize| -> Result<(), Unfit> {
        if s.status() == Status::Undefined {
            return Err(Unfit::Unsupported("a state tensor is missing"));
        }
        usable(s)?;
        if s.device_code() != CPU {
            return Err(Unfit::Device(s.device()));
        }
        if s.dtype() != p.dtype() {
            return Err(match s.kind() {
                Some(kind) => Unfit::KindMismatch { operand: name, kind },
                None => Unfit::Unsupported("a state of an unknown dtype"),
            });
        }
        if !s.contiguous() {
            return Err(Unfit::NotContiguous(name));
        }
        if s.numel() < min_len {
            return Err(Unfit::Length { operand: name, len: s.numel(), expected: min_len });
        }
        Ok(())
    };
    match states {
        StateMetas::Own(metas) => {
            for ((slot, s), &name) in addrs.iter_mut().zip(metas).zip(names) {
                check(s, name, len)?;
                if s.numel() != len {
                    return Err(Unfit::Length { operand: name, len: s.numel(), expected: len });
                }
                if len > 0 {
                    *slot = address(s, name, align)?;
                }
            }
        }
        StateMetas::InStateBuffer { buffer, offsets, count } => {
            let end = offsets[..count].iter().max().map_or(0, |&o| o + len);
            check(buffer, "state buffer", end)?;
            if len > 0 {
                let base = address(buffer, "state buffer", align)?;
                let size = if f64 { size_of::<f64>() } else { size_of::<f32>() };
                for (slot, &offset) in addrs.iter_mut().zip(&offsets).take(count) {
                    *slot = base + offset * size;
                }
            }
        }
    }
    // An empty variable is queued too (with no addresses), so that `updated` reports it: its
    // optimizer still counts the step for it, as torch.optim does.
    let (p, g) =
        if len == 0 { (0, 0) } else { (address(p, "param", align)?, address(g, "grad", align)?) };
    Ok((KernelJob { index, len, p, g, states: addrs, scalars: [0.0; 2], clip: f64::INFINITY }, f64))
}

/// Refuses a tensor whose metadata could not be read.
fn usable(m: &TensorMeta) -> Result<(), Unfit> {
    match m.status() {
        Status::Ok => Ok(()),
        Status::Undefined => Err(Unfit::Unsupported("an undefined tensor")),
        Status::NotStrided => Err(Unfit::Unsupported("a sparse or opaque tensor layout")),
        Status::TooManyDims => Err(Unfit::Unsupported("a tensor with more than 12 dimensions")),
        Status::Exception => Err(Unfit::Unsupported("a tensor whose metadata libtorch refused")),
    }
}

/// The data address of a non-empty tensor, which must be `align`-aligned.
fn address(m: &TensorMeta, name: &'static str, align: usize) -> Result<usize, Unfit> {
    m.aligned_data(align).ok_or(Unfit::Misaligned(name))
}

/// A dtype for a message.
fn kind_name(m: &TensorMeta) -> String {
    m.kind().map_or_else(|| format!("scalar type {}", m.dtype()), |k| format!("{k:?}"))
}
