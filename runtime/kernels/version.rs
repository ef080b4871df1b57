//! The version counters of the tensors a fused pass wrote (the C++ side is
//! `shim/version.cpp`): bumped after the pass, as an in-place libtorch op bumps its output's, so
//! that autograd refuses a graph that saved a tensor before the step exactly where torch's own
//! path refuses it.
//!
//! The kernels write memory ATen does not see, so the pass collects the handles of the tensors
//! it will write while it queues them ([`Written::push`]) and bumps them all in one foreign
//! call once it has written them ([`Written::bump`]); a pass that writes nothing (refused, or
//! failed before its kernels ran) bumps nothing ([`Written::clear`]).

use std::ffi::c_void;

use tch::Tensor;

extern "C" {
    fn caseopt_bump_versions(tensors: *mut *const c_void, n: usize) -> usize;
}

/// The tensors a pass will write, by handle, kept between steps so that a step allocates
/// nothing once the list has grown.
#[derive(Debug, Default)]
pub(super) struct Written {
    handles: Vec<*const c_void>,
}

// SAFETY: the handles are only scratch of one pass, between the `push`es of its queueing and
// the `bump` or `clear` that ends it, on the thread that runs the pass; they are never
// dereferenced from another thread.
unsafe impl Send for Written {}

impl Written {
    /// Forgets the handles (a pass that wrote nothing, or the start of a new one).
    pub(super) fn clear(&mut self) {
        self.handles.clear();
    }

    /// Records that the pass will write `t`.
    pub(super) fn push(&mut self, t: &Tensor) {
        self.handles.push(t.as_ptr() as *const c_void);
    }

    /// Bumps the version counter of every recorded tensor once and forgets them. Returns how
    /// many could not be bumped (inference tensors: see `shim/version.cpp`).
    ///
    /// # Safety
    /// Every tensor recorded since the last `clear` or `bump` must still be alive (its tch
    /// handle not dropped): in practice, borrowed by the batch that recorded it until the pass
    /// that wrote it has returned.
    pub(super) unsafe fn bump(&mut self) -> usize {
        let refused = if self.handles.is_empty() {
            0
        } else {
            // SAFETY: every handle is the `at::Tensor*` of a live tch tensor (this function's
            // contract); the C++ side skips null or undefined ones, catches every exception,
            // and changes nothing but the tensors' version counters and the list itself (it
            // nulls the handles, which are cleared just below).
            unsafe { caseopt_bump_versions(self.handles.as_mut_ptr(), self.handles.len()) }
        };
        self.handles.clear();
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn a_bump_reaches_every_view_and_happens_once_per_tensor() {
        let buffer = Tensor::zeros([8], (Kind::Float, Device::Cpu));
        let view = buffer.narrow(0, 2, 4).view([2, 2]);
        let other = Tensor::zeros([3], (Kind::Double, Device::Cpu));
        let undefined = Tensor::new();
        let before = (buffer.internal_version(), other.internal_version());
        let mut w = Written::default();
        w.push(&buffer);
        w.push(&other);
        w.push(&undefined);
        // SAFETY: all three tensors are alive.
        assert_eq!(unsafe { w.bump() }, 0);
        assert_eq!(buffer.internal_version(), before.0 + 1);
        assert_eq!(view.internal_version(), before.0 + 1, "views share the counter");
        assert_eq!(other.internal_version(), before.1 + 1);
        // The list was emptied: a second bump changes nothing.
        // SAFETY: nothing is recorded.
        assert_eq!(unsafe { w.bump() }, 0);
        assert_eq!(buffer.internal_version(), before.0 + 1);
        // A cleared list bumps nothing either.
        w.push(&buffer);
        w.clear();
        // SAFETY: nothing is recorded.
        unsafe { w.bump() };
        assert_eq!(buffer.internal_version(), before.0 + 1);
    }

    #[test]
    fn long_lists_are_bumped_on_several_threads_each_tensor_once() {
        // Past shim/version.cpp's CASEOPT_PARALLEL_BUMP (512) the list is split between
        // threads; one tensor twice in the list is bumped twice, as two in-place ops would.
        let ts: Vec<Tensor> =
            (0..1500).map(|i| Tensor::zeros([1 + i % 3], (Kind::Float, Device::Cpu))).collect();
        let mut w = Written::default();
        for t in ts.iter().step_by(2) {
            w.push(t);
        }
        w.push(&ts[0]);
        // SAFETY: every tensor is alive.
        unsafe { w.bump() };
        for (i, t) in ts.iter().enumerate() {
            let want = if i == 0 { 2 } else { i64::from(i % 2 == 0) };
            assert_eq!(t.internal_version(), want, "{i}");
        }
    }
}
