//! caseopt on CUDA: the parity fixtures on a CUDA device, forced fused kernels refused there,
//! and a `case_optimizer!` router on a CUDA VarStore agreeing with the same router on the CPU.
//!
//! Every test returns early, printing a `skipped` line, when `tch::Cuda::is_available()` is
//! false, so the suite passes on machines without a GPU. On CUDA the optimizers take the
//! libtorch path (`Backend::Auto` chooses it off the CPU), so `Backend::Torch` and
//! `Backend::Auto` must both give the CPU parity results, within the same tolerances.

mod parity_support;

use caseopt::{case_optimizer, Backend, Bop, Error, Execution, Optimizer, Param, PathExt, VarInfo};
use parity_support::run_parity;
use tch::{nn, Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("skipped: no CUDA device (tch::Cuda::is_available() is false)");
        None
    }
}

fn parity_on_cuda(dtype: &str, tol: f64) {
    let Some(device) = cuda() else { return };
    for backend in [Backend::Torch, Backend::Auto] {
        let worst = run_parity(dtype, tol, backend, device);
        // The nine optimizers of tests/fixtures/parity_cases.json.
        let names: Vec<&str> = worst.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["Adagrad", "Adam", "AdamW", "Bop", "Bop2ndOrder", "NAdam", "RAdam", "RMSprop", "SGD"],
            "every optimizer is covered: {worst:?}"
        );
        assert_eq!(worst["Bop"], 0.0, "{backend:?}");
        assert_eq!(worst["Bop2ndOrder"], 0.0, "{backend:?}");
    }
}

#[test]
fn parity_f64_on_cuda_within_1e_12() {
    parity_on_cuda("f64", 1e-12);
}

#[test]
fn parity_f32_on_cuda_within_1e_6() {
    parity_on_cuda("f32", 1e-6);
}

#[test]
fn forced_fused_kernels_refuse_cuda_variables() {
    let Some(device) = cuda() else { return };
    let w = Tensor::ones([4], (Kind::Float, device));
    let mut bop = Bop::new(Default::default()).unwrap();
    bop.set_backend(Backend::Fused);
    bop.add_param(Param::new(VarInfo::of("w", &w).with_bits(1), w.shallow_clone())).unwrap();
    match bop.step_with_grads(&[Some(w.ones_like())]) {
        Err(Error::FusedUnavailable { variable, reason, .. }) => {
            assert_eq!(variable, "w");
            assert!(reason.contains("CPU"), "{reason}");
        }
        other => panic!("expected FusedUnavailable, got {other:?}"),
    }
    assert_eq!(bop.step_count(), 0);
}

/// A small BNN-shaped store on `device`: binary kernels and full-precision biases, the same
/// values on every device (computed on the CPU without libtorch's global generator, which
/// tests running in parallel share, then moved).
fn store(device: Device) -> (nn::VarStore, Vec<Tensor>) {
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let shapes: [(&str, &[i64], bool); 4] = [
        ("conv", &[16, 3, 3, 3], true),
        ("conv_bias", &[16], false),
        ("dense", &[10, 64], true),
        ("dense_bias", &[10], false),
    ];
    let mut vars = Vec::new();
    for (name, shape, binary) in shapes {
        let n = shape.iter().product::<i64>();
        let init = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.61).sin().view(shape);
        let init = if binary { init.sign() } else { init };
        let path = if binary { root.binary() } else { root.clone() };
        vars.push(path.var_copy(name, &init.to_device(device)));
    }
    (vs, vars)
}

#[test]
fn router_on_a_cuda_varstore_matches_the_cpu() {
    let Some(device) = cuda() else { return };
    let (cpu_vs, cpu_vars) = store(Device::Cpu);
    let (gpu_vs, gpu_vars) = store(device);
    let make = |vs: &nn::VarStore| {
        case_optimizer! {
            binary => Bop<threshold: 1e-6, gamma: 1e-2>,
            _ => Adam<lr: 0.01>,
        }
        .build(vs)
        .unwrap()
    };
    let (mut cpu, mut gpu) = (make(&cpu_vs), make(&gpu_vs));
    for step in 0..10 {
        // The same loss on both devices: sum(w * g) with g computed once on the CPU, so
        // grad = g on both.
        let gs: Vec<Tensor> = cpu_vars
            .iter()
            .map(|v| {
                let k = Tensor::arange(v.numel() as i64, (Kind::Float, Device::Cpu));
                (k.view(v.size().as_slice()) * (0.3 + step as f64)).cos() * 1e-2
            })
            .collect();
        for (vars, router, dev) in
            [(&cpu_vars, &mut cpu, Device::Cpu), (&gpu_vars, &mut gpu, device)]
        {
            let loss = vars
                .iter()
                .zip(&gs)
                .map(|(v, g)| (v * g.to_device(dev)).sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, dev)), |a, b| a + b);
            router.backward_step(&loss).unwrap();
        }
    }
    for (i, (c, g)) in cpu_vars.iter().zip(&gpu_vars).enumerate() {
        assert_eq!(g.device(), device, "variable {i} stayed on the GPU");
        let g = g.to_device(Device::Cpu);
        let err = (&g - c).abs().max().double_value(&[]);
        // Binary kernels: the same flips; biases: Adam within f32 rounding.
        let tol = if i % 2 == 0 { 0.0 } else { 1e-6 };
        assert!(err <= tol, "variable {i}: max difference {err:e}");
    }
    assert_eq!(cpu.step_counts(), gpu.step_counts());
}
