//! Parity with the references: torch.optim 2.13 for SGD, Adam, AdamW, RAdam, NAdam, RMSprop and
//! Adagrad, and docs/design.md's formulas (larq 0.14) for Bop and Bop2ndOrder.
//!
//! The fixtures were produced once by `scripts/env.sh python tests/fixtures/gen_parity.py` (the
//! script is the exact PyTorch code behind every expected number) and are committed as data; no
//! Python runs here. Each case trains two variables for 60 steps on random gradients; the second
//! variable has no gradient at four of the steps. Every step's result is compared.
//!
//! Tolerance, per element: |ours - torch| <= tol * max(|torch|, 1) with tol 1e-12 for f64 and 1e-6
//! for f32. The scale floor of 1 keeps elements that pass through zero from turning a 1-ulp
//! difference into a huge relative one. Differences come from fused multiply-adds inside
//! libtorch's vectorised kernels (torch.optim calls `add(x, alpha=a)` and `addcdiv(.., value=v)`,
//! which tch cannot express with the same fused rounding). Bop's sign decisions are exact: its
//! reference uses the same torch ops in the same order.

// The tests of the fused path itself are `cfg(feature = "fused")`; without it their helpers
// are unused.
#![cfg_attr(not(feature = "fused"), allow(dead_code, unused_imports))]

mod parity_support;

use caseopt::{
    Backend, Bop, Bop2ndOrder, Bop2ndOrderConfig, BopConfig, Execution, Optimizer, Param, VarInfo,
};
use parity_support::{run_parity, FUSED};
use tch::{Device, Tensor};

// Each dtype on each path: the libtorch ops, the fused kernels (forced: a variable they could
// not take would fail the step), and the automatic choice. Bop and Bop2ndOrder are bit-exact on
// every path.

fn check(dtype: &str, tol: f64, backend: Backend) {
    let worst = run_parity(dtype, tol, backend, Device::Cpu);
    let expected = if backend == Backend::Fused { FUSED.len() } else { 9 };
    assert_eq!(worst.len(), expected, "every optimizer is covered: {worst:?}");
    assert_eq!(worst["Bop"], 0.0);
    assert_eq!(worst["Bop2ndOrder"], 0.0);
}

#[test]
fn parity_f64_torch_within_1e_12() {
    check("f64", 1e-12, Backend::Torch);
}

#[cfg(feature = "fused")]
#[test]
fn parity_f64_fused_within_1e_12() {
    check("f64", 1e-12, Backend::Fused);
}

#[test]
fn parity_f64_auto_within_1e_12() {
    check("f64", 1e-12, Backend::Auto);
}

#[test]
fn parity_f32_torch_within_1e_6() {
    check("f32", 1e-6, Backend::Torch);
}

#[cfg(feature = "fused")]
#[test]
fn parity_f32_fused_within_1e_6() {
    check("f32", 1e-6, Backend::Fused);
}

#[test]
fn parity_f32_auto_within_1e_6() {
    check("f32", 1e-6, Backend::Auto);
}

fn bop_once(threshold: f64, gamma: f64, w: &[f64], g: &[f64], backend: Backend) -> Vec<f64> {
    let w = Tensor::from_slice(w);
    let mut bop = Bop::new(BopConfig { threshold: threshold.into(), gamma: gamma.into() }).unwrap();
    bop.set_backend(backend);
    bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    bop.step_with_grads(&[Some(Tensor::from_slice(g))]).unwrap();
    Vec::<f64>::try_from(&w).unwrap()
}

#[cfg(feature = "fused")]
#[test]
fn bop_worked_checks_from_design_hold_exactly() {
    for b in [Backend::Torch, Backend::Fused] {
        assert_eq!(
            bop_once(1e-8, 1e-4, &[1.0, -1.0, 1.0, -1.0], &[2e-4, 2e-4, -2e-4, 5e-5], b),
            vec![-1.0, -1.0, 1.0, -1.0]
        );
        assert_eq!(bop_once(0.5, 1.0, &[-1.0, 1.0], &[-0.5, 0.5], b), vec![1.0, 1.0]);
        assert_eq!(
            bop_once(0.05, 1.0, &[0.3, -0.2, 0.0], &[1.0, 1.0, 1.0], b),
            vec![-1.0, -1.0, 1.0]
        );
    }
}

#[cfg(feature = "fused")]
#[test]
fn bop_exact_equality_gives_plus_one() {
    for b in [Backend::Torch, Backend::Fused] {
        // w * m == threshold exactly: the inner sign is 0, the outer sign maps 0 to +1.
        assert_eq!(bop_once(0.25, 1.0, &[1.0, -1.0], &[0.25, -0.25], b), vec![1.0, 1.0]);
        // and on both sides of it: above flips, below stays.
        assert_eq!(bop_once(0.25, 1.0, &[1.0, -1.0], &[0.5, 0.125], b), vec![-1.0, -1.0]);
    }
}

#[cfg(feature = "fused")]
#[test]
fn bop2_worked_check() {
    for backend in [Backend::Torch, Backend::Fused] {
        // gamma = sigma = 1: m = g, v = g^2, signal = w * g / (|g| + 1e-10) ~= w * sign(g).
        let w = Tensor::from_slice(&[1.0f64, 1.0, -1.0]);
        let mut bop = Bop2ndOrder::new(Bop2ndOrderConfig {
            threshold: 0.5.into(),
            gamma: 1.0.into(),
            sigma: 1.0.into(),
        })
        .unwrap();
        bop.set_backend(backend);
        bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
        bop.step_with_grads(&[Some(Tensor::from_slice(&[3.0f64, -3.0, -1e-3]))]).unwrap();
        assert_eq!(Vec::<f64>::try_from(&w).unwrap(), vec![-1.0, 1.0, 1.0], "{backend:?}");
    }
}
