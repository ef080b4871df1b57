//! ATen's multi-tensor optimizer ops (`_fused_*_`, `_foreach_*`, the AMP non-finite check),
//! which tch does not expose: the C++ side is `shim/multi.cpp`, one function per optimizer,
//! each issuing for one (device, dtype) group what torch.optim 2.13 issues for it. The
//! multi-tensor backend (`runtime/optim/multi.rs`) groups the variables and calls these.
//!
//! Compiled with or without the `fused` feature, like `aten.rs`.

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::error::Result;

type T = *const c_void;

extern "C" {
    fn caseopt_multi_fused_adam(
        params: *const T,
        grads: *const T,
        exp_avgs: *const T,
        exp_avg_sqs: *const T,
        maxs: *const T,
        steps: *const T,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: bool,
        maximize: bool,
        decoupled: bool,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_fused_sgd(
        params: *const T,
        grads: *const T,
        bufs: *const T,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        dampening: f64,
        nesterov: bool,
        maximize: bool,
        is_first_step: bool,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_fused_adagrad(
        params: *const T,
        grads: *const T,
        sums: *const T,
        steps: *const T,
        n: usize,
        lr: f64,
        lr_decay: f64,
        weight_decay: f64,
        eps: f64,
        maximize: bool,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_rmsprop(
        params: *const T,
        grads: *const T,
        square_avgs: *const T,
        grad_avgs: *const T,
        bufs: *const T,
        n: usize,
        lr: f64,
        alpha: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        centered: bool,
        maximize: bool,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_radam(
        params: *const T,
        grads: *const T,
        exp_avgs: *const T,
        exp_avg_sqs: *const T,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
        maximize: bool,
        unrect_step_size: *const f64,
        bias_correction2: *const f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_nadam(
        params: *const T,
        grads: *const T,
        exp_avgs: *const T,
        exp_avg_sqs: *const T,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
        maximize: bool,
        bias_correction_sqrt: *const f64,
        step_size_grads: *const f64,
        step_size_expavg: *const f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_bop(
        weights: *const T,
        grads: *const T,
        ms: *const T,
        vs: *const T,
        n: usize,
        gamma: f64,
        sigma: f64,
        threshold: f64,
        eps: f64,
        flips: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_clamp_(
        ts: *const T,
        n: usize,
        lo: f64,
        hi: f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn caseopt_multi_nonfinite(
        ts: *const T,
        n: usize,
        found: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

/// One operand list: the handles of `n` live tensors, or none (an absent state).
pub(crate) struct List<'a> {
    ptrs: Vec<T>,
    _tensors: std::marker::PhantomData<&'a Tensor>,
}

impl<'a> List<'a> {
    /// The handles of `tensors`, borrowed for as long as the list lives.
    pub(crate) fn of(tensors: impl IntoIterator<Item = &'a Tensor>) -> Self {
        let ptrs = tensors.into_iter().map(|t| t.as_ptr() as T).collect();
        List { ptrs, _tensors: std::marker::PhantomData }
    }

    fn ptr(&self) -> *const T {
        self.ptrs.as_ptr()
    }

    fn len(&self) -> usize {
        self.ptrs.len()
    }
}

/// The null list of an absent state.
fn ptr_or_null(list: Option<&List<'_>>) -> *const T {
    list.map_or(std::ptr::null(), List::ptr)
}

/// Runs one shim call with an error buffer, after checking that every list has `n` handles
/// (the shim reads `n` of each).
fn call(
    n: usize,
    lists: &[Option<&List<'_>>],
    f: impl FnOnce(*mut c_char, usize) -> i32,
) -> Result<()> {
    if !lists.iter().flatten().all(|l| l.len() == n) {
        let msg = "caseopt: multi-tensor operand lists of different lengths".to_string();
        return Err(tch::TchError::Torch(msg).into());
    }
    super::aten::call(f)
}

/// Every per-variable scalar list must hold `n` values (the shim reads `n` of each).
fn scalars_cover(n: usize, lists: &[&[f64]]) -> Result<()> {
    if lists.iter().all(|l| l.len() == n) {
        return Ok(());
    }
    let msg = "caseopt: multi-tensor scalar lists of the wrong length".to_string();
    Err(tch::TchError::Torch(msg).into())
}

/// The scalars of one fused Adam/AdamW step (torch.optim's `_fused_adam` arguments).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamArgs {
    pub(crate) lr: f64,
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) weight_decay: f64,
    pub(crate) eps: f64,
    pub(crate) amsgrad: bool,
    pub(crate) maximize: bool,
    pub(crate) decoupled: bool,
}

/// `_foreach_add_(steps, 1)` then `_fused_adam_` (or `_fused_adamw_`) over one group.
pub(crate) fn fused_adam(
    ops: [&List<'_>; 4],
    maxs: Option<&List<'_>>,
    steps: &List<'_>,
    a: AdamArgs,
) -> Result<()> {
    let [p, g, m, v] = ops;
    let n = p.len();
    call(n, &[Some(g), Some(m), Some(v), maxs, Some(steps)], |e, len| {
        // SAFETY: every list holds `n` live tensor handles (checked by `call`), or is null
        // (`maxs` without AMSGrad); the shim catches every exception.
        unsafe {
            caseopt_multi_fused_adam(
                p.ptr(),
                g.ptr(),
                m.ptr(),
                v.ptr(),
                ptr_or_null(maxs),
                steps.ptr(),
                n,
                a.lr,
                a.beta1,
                a.beta2,
                a.weight_decay,
                a.eps,
                a.amsgrad,
                a.maximize,
                a.decoupled,
                e,
                len,
            )
        }
    })
}

/// The scalars of one fused SGD step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdArgs {
    pub(crate) lr: f64,
    pub(crate) momentum: f64,
    pub(crate) dampening: f64,
    pub(crate) weight_decay: f64,
    pub(crate) nesterov: bool,
    pub(crate) maximize: bool,
}

/// `_fused_sgd_` over one group; `bufs` absent without momentum.
pub(crate) fn fused_sgd(
    p: &List<'_>,
    g: &List<'_>,
    bufs: Option<&List<'_>>,
    a: SgdArgs,
    is_first_step: bool,
) -> Result<()> {
    let n = p.len();
    call(n, &[Some(g), bufs], |e, len| {
        // SAFETY: as in `fused_adam`.
        unsafe {
            caseopt_multi_fused_sgd(
                p.ptr(),
                g.ptr(),
                ptr_or_null(bufs),
                n,
                a.weight_decay,
                a.momentum,
                a.lr,
                a.dampening,
                a.nesterov,
                a.maximize,
                is_first_step,
                e,
                len,
            )
        }
    })
}

/// `_foreach_add_(steps, 1)` then `_fused_adagrad_` over one group:
/// `[lr, lr_decay, weight_decay, eps]`.
pub(crate) fn fused_adagrad(ops: [&List<'_>; 4], scalars: [f64; 4], maximize: bool) -> Result<()> {
    let [p, g, sums, steps] = ops;
    let n = p.len();
    let [lr, lr_decay, wd, eps] = scalars;
    call(n, &[Some(g), Some(sums), Some(steps)], |e, len| {
        // SAFETY: as in `fused_adam`.
        unsafe {
            caseopt_multi_fused_adagrad(
                p.ptr(),
                g.ptr(),
                sums.ptr(),
                steps.ptr(),
                n,
                lr,
                lr_decay,
                wd,
                eps,
                maximize,
                e,
                len,
            )
        }
    })
}

/// torch.optim's `_multi_tensor_rmsprop` over one group: `[lr, alpha, eps, weight_decay,
/// momentum]`, `grad_avgs` present when centered, `bufs` with momentum.
pub(crate) fn rmsprop(
    ops: [&List<'_>; 3],
    grad_avgs: Option<&List<'_>>,
    bufs: Option<&List<'_>>,
    scalars: [f64; 5],
    centered: bool,
    maximize: bool,
) -> Result<()> {
    let [p, g, sq] = ops;
    let n = p.len();
    let [lr, alpha, eps, wd, momentum] = scalars;
    call(n, &[Some(g), Some(sq), grad_avgs, bufs], |e, len| {
        // SAFETY: as in `fused_adam`.
        unsafe {
            caseopt_multi_rmsprop(
                p.ptr(),
                g.ptr(),
                sq.ptr(),
                ptr_or_null(grad_avgs),
                ptr_or_null(bufs),
                n,
                lr,
                alpha,
                eps,
                wd,
                momentum,
                centered,
                maximize,
                e,
                len,
            )
        }
    })
}

/// The scalars shared by RAdam's and NAdam's foreach steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MomentArgs {
    pub(crate) lr: f64,
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) eps: f64,
    pub(crate) weight_decay: f64,
    pub(crate) decoupled: bool,
    pub(crate) maximize: bool,
}

/// torch.optim's `_multi_tensor_radam` over one group, with its per-variable scalars.
pub(crate) fn radam(
    ops: [&List<'_>; 4],
    a: MomentArgs,
    unrect_step_size: &[f64],
    bias_correction2: &[f64],
) -> Result<()> {
    let [p, g, m, v] = ops;
    let n = p.len();
    scalars_cover(n, &[unrect_step_size, bias_correction2])?;
    call(n, &[Some(g), Some(m), Some(v)], |e, len| {
        // SAFETY: as in `fused_adam`; both scalar arrays hold at least `n` values (checked).
        unsafe {
            caseopt_multi_radam(
                p.ptr(),
                g.ptr(),
                m.ptr(),
                v.ptr(),
                n,
                a.lr,
                a.beta1,
                a.beta2,
                a.eps,
                a.weight_decay,
                a.decoupled,
                a.maximize,
                unrect_step_size.as_ptr(),
                bias_correction2.as_ptr(),
                e,
                len,
            )
        }
    })
}

/// torch.optim's `_multi_tensor_nadam` over one group, with its per-variable scalars
/// `[bias_correction_sqrt, step_size_grads, step_size_expavg]`.
pub(crate) fn nadam(ops: [&List<'_>; 4], a: MomentArgs, per_var: [&[f64]; 3]) -> Result<()> {
    let [p, g, m, v] = ops;
    let n = p.len();
    scalars_cover(n, &per_var)?;
    let [bc, sg, se] = per_var;
    call(n, &[Some(g), Some(m), Some(v)], |e, len| {
        // SAFETY: as in `radam`.
        unsafe {
            caseopt_multi_nadam(
                p.ptr(),
                g.ptr(),
                m.ptr(),
                v.ptr(),
                n,
                a.lr,
                a.beta1,
                a.beta2,
                a.eps,
                a.weight_decay,
                a.decoupled,
                a.maximize,
                bc.as_ptr(),
                sg.as_ptr(),
                se.as_ptr(),
                e,
                len,
            )
        }
    })
}

/// larq's Bop (`vs` absent) or Bop2ndOrder over one group: `[gamma, sigma, threshold, eps]`.
/// Returns each variable's flip count, a 0-dim int64 tensor on its device.
pub(crate) fn bop(
    ops: [&List<'_>; 3],
    vs: Option<&List<'_>>,
    scalars: [f64; 4],
) -> Result<Vec<Tensor>> {
    let [w, g, m] = ops;
    let n = w.len();
    let [gamma, sigma, threshold, eps] = scalars;
    let mut flips: Vec<*mut c_void> = vec![std::ptr::null_mut(); n];
    call(n, &[Some(g), Some(m), vs], |e, len| {
        // SAFETY: as in `fused_adam`; `flips` has room for `n` handles, which the shim fills
        // only when it succeeds.
        unsafe {
            caseopt_multi_bop(
                w.ptr(),
                g.ptr(),
                m.ptr(),
                ptr_or_null(vs),
                n,
                gamma,
                sigma,
                threshold,
                eps,
                flips.as_mut_ptr(),
                e,
                len,
            )
        }
    })?;
    // SAFETY: the call succeeded, so each entry is a fresh handle the shim allocated.
    Ok(flips.into_iter().map(|f| unsafe { super::aten::owned(f) }).collect())
}

/// Clamps every tensor of one group to `[lo, hi]`.
pub(crate) fn clamp_(ts: &List<'_>, lo: f64, hi: f64) -> Result<()> {
    let n = ts.len();
    // SAFETY: as in `fused_adam`.
    call(n, &[], |e, len| unsafe { caseopt_multi_clamp_(ts.ptr(), n, lo, hi, e, len) })
}

/// Whether any element of `ts` (non-empty, one device) is not finite, as a 0-dim f32 tensor on
/// their device (1 if so, 0 if not), computed in one multi-tensor pass with no host read.
pub(crate) fn nonfinite(ts: &List<'_>) -> Result<Tensor> {
    let n = ts.len();
    assert!(n > 0, "the non-finite check of an empty list");
    let mut found = std::ptr::null_mut();
    // SAFETY: as in `fused_adam`; on success the shim stores a fresh handle in `found`.
    call(n, &[], |e, len| unsafe { caseopt_multi_nonfinite(ts.ptr(), n, &mut found, e, len) })?;
    // SAFETY: the call succeeded.
    Ok(unsafe { super::aten::owned(found) })
}
