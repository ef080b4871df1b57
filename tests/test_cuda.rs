//! caseopt on CUDA: the parity fixtures on a CUDA device, the multi-tensor backend against
//! torch.optim's own `fused=True`/`foreach=True` CUDA trajectories, forced fused kernels refused
//! there, and a `case_optimizer!` router on a CUDA VarStore agreeing with the same router on the
//! CPU.
//!
//! Every test returns early, printing a `skipped` line, when `tch::Cuda::is_available()` is
//! false, so the suite passes on machines without a GPU. On CUDA, `Backend::Torch` takes the
//! libtorch path (torch.optim's single-tensor ops) and must give the CPU parity results within
//! their tolerances; `Backend::Auto` takes the multi-tensor path there (torch.optim's GPU
//! default), which must give the Bop fixtures' bits, stay near the single-tensor ones, and give
//! the multi-tensor backend's bits. The trajectories the multi-tensor backend is compared with
//! bit for bit are made on the GPU machine itself, with the torch its libtorch comes from:
//! `python tests/fixtures/gen_multi.py --device cuda --out DIR` writes DIR/multi_cuda.safetensors,
//! found through `CASEOPT_MULTI_CUDA` (scripts/gpu_run.sh does both).

mod parity_support;

use caseopt::{
    case_optimizer, Adam, AdamConfig, Backend, Bop, Error, Execution, Optimizer, Param, PathExt,
    Router, VarInfo,
};
use parity_support::{
    fixture_optimizers, multi_meta, run_multi_parity, run_parity_values, Setting,
};
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
    // The multi-tensor ops round otherwise than the single-tensor trajectories of these
    // fixtures: near them only (the exact comparison is `multi_tensor_parity_*`).
    let near = if dtype == "f32" { 1e-3 } else { 1e-9 };
    for backend in [Backend::Torch, Backend::Auto] {
        let tol = |o: &str| match (backend, o) {
            (_, "Bop" | "Bop2ndOrder") => 0.0,
            (Backend::Torch, _) => tol,
            _ => near,
        };
        let worst = run_parity_values(dtype, &tol, Setting::from(backend), device).worst;
        // Every optimizer of tests/fixtures/parity_cases.json.
        let names: Vec<String> = worst.keys().cloned().collect();
        assert_eq!(names, fixture_optimizers(false), "every optimizer is covered: {worst:?}");
        assert_eq!(worst["Bop"], 0.0, "{backend:?}");
        assert_eq!(worst["Bop2ndOrder"], 0.0, "{backend:?}");
    }
}

/// The multi-tensor backend on CUDA against torch.optim's `fused=True`/`foreach=True` CUDA
/// trajectories made on this machine, bit for bit.
fn multi_tensor_parity_on_cuda(dtype: &str) {
    let Some(device) = cuda() else { return };
    let Some(path) = std::env::var_os("CASEOPT_MULTI_CUDA") else {
        eprintln!(
            "skipped: CASEOPT_MULTI_CUDA is not set (make the CUDA trajectories with \
             `python tests/fixtures/gen_multi.py --device cuda --out DIR` and point it at \
             DIR/multi_cuda.safetensors; scripts/gpu_run.sh does)"
        );
        return;
    };
    let tensors = Tensor::read_safetensors(path).unwrap().into_iter().collect();
    run_multi_parity(&multi_meta(), &tensors, dtype, device);
}

#[test]
fn multi_tensor_parity_f32_on_cuda_bit_for_bit() {
    multi_tensor_parity_on_cuda("f32");
}

#[test]
fn multi_tensor_parity_f64_on_cuda_bit_for_bit() {
    multi_tensor_parity_on_cuda("f64");
}

/// `Backend::Auto` sends CUDA variables to the multi-tensor path: the same bits as forcing it,
/// and a router's non-finite check reads one value per step.
#[test]
fn auto_takes_the_multi_tensor_path_on_cuda() {
    let Some(device) = cuda() else { return };
    let run = |backend: Backend| {
        let ws: Vec<Tensor> = [7i64, 1000, 33]
            .iter()
            .map(|&n| (Tensor::arange(n, (Kind::Float, device)) * 0.37).sin())
            .collect();
        let mut adam =
            Adam::new(AdamConfig { lr: 0.01.into(), amsgrad: true, ..Default::default() }).unwrap();
        adam.set_backend(backend);
        for (i, w) in ws.iter().enumerate() {
            adam.add_param(Param::new(VarInfo::of(format!("w{i}"), w), w.shallow_clone())).unwrap();
        }
        for step in 0..5 {
            let grads: Vec<Option<Tensor>> =
                ws.iter().map(|w| Some((w * (1.3 + step as f64)).cos())).collect();
            adam.step_with_grads(&grads).unwrap();
        }
        ws.iter().map(|w| w.to_device(Device::Cpu)).collect::<Vec<_>>()
    };
    let (auto, multi) = (run(Backend::Auto), run(Backend::MultiTensor));
    for (a, m) in auto.iter().zip(&multi) {
        assert!(a.equal(m), "Auto on CUDA is the multi-tensor path");
    }

    let (vs, vars) = store(device);
    let mut router = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-2>,
        _ => Adam<lr: 0.01>,
    }
    .build(&vs)
    .unwrap();
    for step in 0..3 {
        let loss = vars
            .iter()
            .map(|v| (v * (step as f64 + 0.5)).cos().sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
        router.backward_step(&loss).unwrap();
        // The first step also checks the 1-bit variables' values (one read).
        assert_eq!(router.host_reads(), if step == 0 { 2 } else { 1 }, "step {step}");
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
