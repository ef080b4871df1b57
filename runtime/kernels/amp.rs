//! ATen's gradient-scaling ops (the C++ side is `shim/amp.cpp`), for
//! [`GradScaler`](crate::GradScaler): tch has `_amp_update_scale_` but not
//! `_amp_foreach_non_finite_check_and_unscale_`, whose tensor list is updated in place.
//! Both go through the shim so that the scaler issues exactly torch.amp.GradScaler's ops.
//! Also `at::autocast`'s switches for any device ([`Autocast`](crate::amp::Autocast)): tch's
//! `autocast` turns CUDA's on only.

use std::ffi::{c_char, c_void};

use tch::{TchError, Tensor};

use crate::error::Result;

extern "C" {
    fn caseopt_amp_unscale(
        grads: *const *mut c_void,
        count: usize,
        found_inf: *mut c_void,
        inv_scale: *const c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_amp_update_scale(
        scale: *mut c_void,
        growth_tracker: *mut c_void,
        found_inf: *const c_void,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_autocast_enter(
        device_type: i32,
        dtype: i32,
        prev_enabled: *mut i32,
        prev_dtype: *mut i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_autocast_exit(
        device_type: i32,
        prev_enabled: i32,
        prev_dtype: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_autocast_is_enabled(
        device_type: i32,
        enabled: *mut i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

/// Room for the message of an exception ATen raised.
const MESSAGE: usize = 512;

/// Calls one shim function with an error buffer and turns a failure into tch's error.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0u8; MESSAGE];
    if f(err.as_mut_ptr().cast(), MESSAGE) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(MESSAGE);
    Err(TchError::Torch(String::from_utf8_lossy(&err[..end]).into_owned()).into())
}

/// Multiplies every gradient of `grads` (one device, one dtype) by `inv_scale` in place and
/// sets `found_inf` (a one-element f32 tensor on that device) to 1 when any of them holds NaN
/// or infinity: one multi-tensor pass.
pub(crate) fn unscale_(
    grads: &mut [Tensor],
    found_inf: &mut Tensor,
    inv_scale: &Tensor,
) -> Result<()> {
    // The handles are read by the shim only while this call lasts; `grads` is borrowed mutably
    // because the op writes the gradients' data.
    let handles: Vec<*mut c_void> = grads.iter_mut().map(|g| g.as_mut_ptr().cast()).collect();
    // SAFETY: every pointer is a live tch tensor handle borrowed for this call (the list's
    // `count` is its length); the shim catches every exception.
    call(|e, n| unsafe {
        caseopt_amp_unscale(
            handles.as_ptr(),
            handles.len(),
            found_inf.as_mut_ptr().cast(),
            inv_scale.as_ptr().cast(),
            e,
            n,
        )
    })
}

/// `_amp_update_scale_`: backs `scale` off when `found_inf` is set, else counts a clean step in
/// `growth_tracker` and grows the scale after `growth_interval` of them.
pub(crate) fn update_scale_(
    scale: &mut Tensor,
    growth_tracker: &mut Tensor,
    found_inf: &Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
) -> Result<()> {
    // SAFETY: live tch tensor handles, the two written ones borrowed mutably; the shim catches
    // every exception.
    call(|e, n| unsafe {
        caseopt_amp_update_scale(
            scale.as_mut_ptr().cast(),
            growth_tracker.as_mut_ptr().cast(),
            found_inf.as_ptr().cast(),
            growth_factor,
            backoff_factor,
            growth_interval,
            e,
            n,
        )
    })
}

/// `c10::DeviceType::CPU`.
pub(crate) const DEVICE_CPU: i32 = 0;
/// `c10::DeviceType::CUDA`.
pub(crate) const DEVICE_CUDA: i32 = 1;
/// `c10::ScalarType::Half`.
pub(crate) const SCALAR_HALF: i32 = 5;
/// `c10::ScalarType::BFloat16`.
pub(crate) const SCALAR_BFLOAT16: i32 = 15;

/// Turns autocast on for `device_type` in `dtype` (torch.autocast's `__enter__`), returning
/// the previous flag and dtype for [`autocast_exit`].
pub(crate) fn autocast_enter(device_type: i32, dtype: i32) -> Result<(i32, i32)> {
    let (mut enabled, mut previous) = (0i32, 0i32);
    // SAFETY: the two out-pointers are live locals; the shim catches every exception.
    call(|e, n| unsafe {
        caseopt_autocast_enter(device_type, dtype, &mut enabled, &mut previous, e, n)
    })?;
    Ok((enabled, previous))
}

/// Leaves the region [`autocast_enter`] entered, restoring what it returned.
pub(crate) fn autocast_exit(device_type: i32, enabled: i32, dtype: i32) -> Result<()> {
    // SAFETY: plain values; the shim catches every exception.
    call(|e, n| unsafe { caseopt_autocast_exit(device_type, enabled, dtype, e, n) })
}

/// Whether autocast is on for `device_type` on this thread.
pub(crate) fn autocast_is_enabled(device_type: i32) -> Result<bool> {
    let mut enabled = 0i32;
    // SAFETY: the out-pointer is a live local; the shim catches every exception.
    call(|e, n| unsafe { caseopt_autocast_is_enabled(device_type, &mut enabled, e, n) })?;
    Ok(enabled != 0)
}
