//! Behaviour of the BNN building blocks: `ste_sign`'s exact values and straight-through
//! gradient, quantized layers' outputs and 1-bit kernel declarations, Keras-style batch norm,
//! and one routed Bop + Adam step on a tiny binarized model.

use caseopt::bnn::{
    self, batch_norm, binary_kernel_checks, quant_conv2d, quant_linear, BatchNormConfig,
    QuantConv2dConfig, QuantLinearConfig, Quantizer,
};
use caseopt::{Adam, AdamConfig, Bop, BopConfig, Error, KernelInit, Optimizer};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn ste_sign_forward_is_exactly_plus_minus_one_with_sign_of_zero_plus_one() {
    let x = Tensor::from_slice(&[-3.0f64, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 7.0]);
    let y = caseopt::ste_sign(&x).unwrap();
    assert_eq!(y.kind(), Kind::Double);
    assert_eq!(
        Vec::<f64>::try_from(&y).unwrap(),
        [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "-0.0 >= 0 holds, so sign(-0) = +1 like sign(0)"
    );

    // With autograd attached the value must still be exactly +-1, for every input: the
    // straight-through term adds an exact zero.
    tch::manual_seed(0);
    let x = (Tensor::randn([10_000], (Kind::Float, CPU)) * 1.5).set_requires_grad(true);
    let y = caseopt::ste_sign(&x).unwrap();
    assert!(y.requires_grad());
    let off = y.abs().ne(1.0).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(off, 0, "{off} values are not exactly +-1");
    let expected = x.detach().ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    assert!(y.detach().equal(&expected));
}

#[test]
fn ste_sign_gradient_passes_where_abs_x_at_most_one_inclusive() {
    let x = Tensor::from_slice(&[-2.0f32, -1.0, -0.999, -0.25, 0.0, 0.25, 0.999, 1.0, 1.0001, 5.0])
        .set_requires_grad(true);
    // Distinct upstream gradients, so the test sees that each one is passed through unchanged.
    let upstream = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
    let y = caseopt::ste_sign(&x).unwrap();
    (y * &upstream).sum(Kind::Float).backward();
    assert_eq!(f32s(&x.grad()), [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]);
}

#[test]
fn ste_sign_gradient_edge_is_exact_in_every_float_dtype() {
    // The clip is inclusive at exactly +-1 and closed just beyond, at the next representable
    // value, in single and double precision alike.
    let e32 = f32::EPSILON;
    let x = Tensor::from_slice(&[-1.0 - e32, -1.0, 1.0, 1.0 + e32]).set_requires_grad(true);
    caseopt::ste_sign(&x).unwrap().sum(Kind::Float).backward();
    assert_eq!(f32s(&x.grad()), [0.0, 1.0, 1.0, 0.0]);

    let e64 = f64::EPSILON;
    let x = Tensor::from_slice(&[-1.0 - e64, -1.0, -1.0 + e64 / 2.0, 1.0, 1.0 + e64])
        .set_requires_grad(true);
    let y = caseopt::ste_sign(&x).unwrap();
    assert_eq!(Vec::<f64>::try_from(&y).unwrap(), [-1.0, -1.0, -1.0, 1.0, 1.0]);
    y.sum(Kind::Double).backward();
    assert_eq!(Vec::<f64>::try_from(&x.grad()).unwrap(), [0.0, 1.0, 1.0, 1.0, 0.0]);
}

#[test]
fn channels_last_keeps_values_and_convolutions_keep_the_layout() {
    tch::manual_seed(4);
    let x = Tensor::randn([2, 1, 6, 6], (Kind::Float, CPU));
    let y = bnn::channels_last(&x).unwrap();
    assert_eq!(y.stride(), [36, 1, 6, 1]);
    assert!(y.equal(&x));
    let x3 = Tensor::randn([2, 3, 4, 5], (Kind::Float, CPU)).set_requires_grad(true);
    let y3 = bnn::channels_last(&x3).unwrap();
    assert_eq!(y3.stride(), [60, 1, 15, 3]);
    assert!(y3.equal(&x3));
    // Differentiable: the gradient comes back in the input's own layout.
    (y3 * 2.0).sum(Kind::Float).backward();
    assert!(x3.grad().equal(&Tensor::full([2, 3, 4, 5], 2.0, (Kind::Float, CPU))));

    let vs = nn::VarStore::new(CPU);
    let first = QuantConv2dConfig { input_quantizer: Quantizer::Identity, ..Default::default() };
    let conv = quant_conv2d(&vs.root() / "c", 1, 8, 3, first).unwrap();
    let out = conv.forward(&y);
    assert_eq!(out.size(), [2, 8, 4, 4]);
    assert_eq!(out.stride(), [128, 1, 32, 8], "the output is channels-last too");
    assert!(out.allclose(&conv.forward(&x), 1e-5, 1e-5, false));

    assert!(matches!(
        bnn::channels_last(&Tensor::zeros([3, 4], (Kind::Float, CPU))),
        Err(Error::InvalidLayer(_))
    ));
}

#[test]
fn ste_sign_without_autograd_returns_the_plain_sign() {
    let x = Tensor::from_slice(&[-0.5f32, 0.0, 2.0]);
    let y = caseopt::ste_sign(&x).unwrap();
    assert!(!y.requires_grad());
    assert_eq!(f32s(&y), [-1.0, 1.0, 1.0]);
}

#[test]
fn quant_conv2d_declares_binary_kernel_and_convolves_signs() {
    let vs = nn::VarStore::new(CPU);
    let root = vs.root();
    let conv = quant_conv2d(&root / "conv", 2, 3, 3, QuantConv2dConfig::default()).unwrap();
    let real_kernel = QuantConv2dConfig {
        kernel_quantizer: Quantizer::Identity,
        bias: true,
        ..Default::default()
    };
    let _ = quant_conv2d(&root / "real", 2, 3, 3, real_kernel).unwrap();

    let infos = caseopt::var_infos(&vs);
    let by_name = |n: &str| infos.iter().find(|v| v.name == n).unwrap().clone();
    assert_eq!(by_name("conv.weight").bits, 1);
    assert_eq!(by_name("conv.weight").shape, [3, 2, 3, 3]);
    assert_eq!(by_name("real.weight").bits, 32);
    assert_eq!(by_name("real.bias").bits, 32);
    assert_eq!(infos.len(), 3, "no bias unless asked for: {infos:?}");

    // Glorot-uniform kernel: within +-sqrt(6 / (18 + 27)).
    let limit = KernelInit::glorot_limit(18, 27) as f32;
    assert!(f32s(&conv.weight).iter().all(|w| w.abs() <= limit));

    tch::manual_seed(1);
    let x = Tensor::randn([4, 2, 7, 9], (Kind::Float, CPU));
    let y = conv.forward(&x);
    assert_eq!(y.size(), [4, 3, 5, 7]);
    let sign = |t: &Tensor| t.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    let expected = sign(&x).conv2d(&sign(&conv.weight), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
    assert!(y.equal(&expected), "binary conv must be the integer conv of the signs");
    assert!(f32s(&y).iter().all(|v| v.fract() == 0.0 && v.abs() <= 18.0));

    let padded = QuantConv2dConfig { stride: 2, padding: 1, ..Default::default() };
    let strided = quant_conv2d(&root / "strided", 2, 5, 3, padded).unwrap();
    assert_eq!(strided.forward(&x).size(), [4, 5, 4, 5]);
}

#[test]
fn quant_linear_declares_binary_kernel_and_multiplies_signs() {
    let vs = nn::VarStore::new(CPU);
    let dense = quant_linear(&vs.root() / "dense", 6, 4, QuantLinearConfig::default()).unwrap();
    let infos = caseopt::var_infos(&vs);
    assert_eq!(infos.len(), 1);
    assert!(infos[0].is_binary());
    assert_eq!(infos[0].shape, [4, 6]);

    tch::manual_seed(2);
    let x = Tensor::randn([3, 6], (Kind::Float, CPU));
    let y = dense.forward(&x);
    assert_eq!(y.size(), [3, 4]);
    let sign = |t: &Tensor| t.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    assert!(y.equal(&sign(&x).matmul(&sign(&dense.weight).tr())));

    // A real-valued first layer passes its input through unquantized.
    let real_in = QuantLinearConfig { input_quantizer: Quantizer::Identity, ..Default::default() };
    let first = quant_linear(&vs.root() / "first", 6, 4, real_in).unwrap();
    assert!(first.forward(&x).allclose(&x.matmul(&sign(&first.weight).tr()), 1e-6, 1e-6, false));
}

#[test]
fn quantized_layers_pass_straight_through_gradients_to_kernels_and_inputs() {
    let vs = nn::VarStore::new(CPU);
    let init = QuantLinearConfig {
        kernel_init: KernelInit::Torch(nn::Init::Const(1.0)),
        ..Default::default()
    };
    let dense = quant_linear(&vs.root() / "d", 3, 2, init).unwrap();
    let x = Tensor::from_slice(&[0.5f32, -2.0, 1.0]).view([1, 3]).set_requires_grad(true);
    dense.forward(&x).sum(Kind::Float).backward();
    // Kernel all +1: d(sum)/dx_j = 2 for |x_j| <= 1, 0 for the clipped -2.0.
    assert_eq!(f32s(&x.grad()), [2.0, 0.0, 2.0]);
    // d(sum)/dw_ij = sign(x_j), passed through because |w| = 1 is inside the clip range.
    assert_eq!(f32s(&dense.weight.grad()), [1.0, -1.0, 1.0, 1.0, -1.0, 1.0]);
}

#[test]
fn batch_norm_has_only_beta_trainable_and_keras_momentum() {
    let vs = nn::VarStore::new(CPU);
    let bn = batch_norm(&vs.root() / "bn", 2, BatchNormConfig::default()).unwrap();
    let infos = caseopt::var_infos(&vs);
    assert_eq!(infos.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["bn.beta"]);
    assert_eq!(infos[0].bits, 32);

    // Channel 0 holds 1..=4, channel 1 holds 10 everywhere.
    let x = Tensor::from_slice(&[1.0f32, 10.0, 2.0, 10.0, 3.0, 10.0, 4.0, 10.0]).view([4, 2]);
    let y = bn.forward_t(&x, true);
    // Batch statistics: mean 2.5, biased variance 1.25, epsilon 1e-3.
    let expected0: Vec<f32> =
        [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| (v - 2.5) / (1.25f32 + 1e-3).sqrt()).collect();
    let got = f32s(&y.select(1, 0));
    for (g, e) in got.iter().zip(&expected0) {
        assert!((g - e).abs() < 1e-5, "{got:?} vs {expected0:?}");
    }
    // A constant channel normalises to (about) zero: its variance is 0 up to rounding.
    assert!(f32s(&y.select(1, 1)).iter().all(|v| v.abs() < 1e-3));
    // Keras momentum 0.99: running = 0.99 * running + 0.01 * batch (unbiased variance).
    let mean = f32s(&bn.moving_mean);
    assert!((mean[0] - 0.025).abs() < 1e-6 && (mean[1] - 0.1).abs() < 1e-6, "{mean:?}");
    let var = f32s(&bn.moving_variance);
    let unbiased = 5.0f32 / 3.0;
    assert!((var[0] - (0.99 + 0.01 * unbiased)).abs() < 1e-6, "{var:?}");

    // Evaluation uses the running statistics and leaves them alone.
    let before = bn.moving_mean.copy();
    let y_eval = bn.forward_t(&x, false);
    assert!(bn.moving_mean.equal(&before));
    let expected = (x.select(1, 0) - 0.025) / (var[0] as f64 + 1e-3).sqrt();
    assert!(y_eval.select(1, 0).allclose(&expected, 1e-5, 1e-5, false));

    let with_scale = BatchNormConfig { scale: true, ..Default::default() };
    let _ = batch_norm(&vs.root() / "bn2", 3, with_scale).unwrap();
    let names: Vec<String> = caseopt::var_infos(&vs).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["bn.beta", "bn2.beta", "bn2.gamma"]);
}

#[test]
fn impossible_layers_are_typed_errors_not_panics() {
    let vs = nn::VarStore::new(CPU);
    let root = vs.root();
    let bad_stride = QuantConv2dConfig { stride: 0, ..Default::default() };
    let errors = [
        quant_conv2d(&root / "a", 0, 4, 3, QuantConv2dConfig::default()).map(|_| ()),
        quant_conv2d(&root / "b", 2, 4, 3, bad_stride).map(|_| ()),
        quant_linear(&root / "c", 3, -1, QuantLinearConfig::default()).map(|_| ()),
        batch_norm(&root / "d", 0, BatchNormConfig::default()).map(|_| ()),
        batch_norm(&root / "e", 2, BatchNormConfig { momentum: 1.5, ..Default::default() })
            .map(|_| ()),
    ];
    for e in errors {
        match e {
            Err(Error::InvalidLayer(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected InvalidLayer, got {other:?}"),
        }
    }
    // A wrong input shape is libtorch's error, returned by the fallible forward.
    let conv = quant_conv2d(&root / "ok", 2, 4, 3, QuantConv2dConfig::default()).unwrap();
    let wrong = Tensor::zeros([1, 3, 8, 8], (Kind::Float, CPU));
    assert!(matches!(conv.f_forward(&wrong), Err(Error::Torch(_))));
}

/// A two-layer binarized model, routed by hand exactly as `case_optimizer!`'s
/// `binary => Bop, _ => Adam` would route it.
#[test]
fn one_routed_step_keeps_binary_kernels_binary_and_trains_the_rest() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(CPU);
    let root = vs.root();
    let first = QuantConv2dConfig { input_quantizer: Quantizer::Identity, ..Default::default() };
    let conv = quant_conv2d(&root / "conv", 1, 4, 3, first).unwrap();
    let bn1 = batch_norm(&root / "bn1", 4, BatchNormConfig::default()).unwrap();
    let dense = quant_linear(&root / "dense", 4 * 4 * 4, 3, QuantLinearConfig::default()).unwrap();
    let bn2 = batch_norm(&root / "bn2", 3, BatchNormConfig::default()).unwrap();
    let forward = |x: &Tensor| {
        let h = bn1.forward_t(&conv.forward(x).max_pool2d_default(2), true);
        bn2.forward_t(&dense.forward(&h.flatten(1, -1)), true)
    };

    // Kernels are Glorot-uniform before the first step, so not binary yet.
    assert!(binary_kernel_checks(&vs).unwrap().iter().all(|c| !c.is_binary()));

    let bop_config = BopConfig { threshold: 1e-6.into(), gamma: 1e-3.into() };
    let mut bop = Bop::new(bop_config).unwrap();
    let mut adam = Adam::new(AdamConfig { lr: 0.01.into(), ..Default::default() }).unwrap();
    for p in caseopt::trainable_vars(&vs) {
        if p.info.is_binary() {
            bop.add_param(p).unwrap();
        } else {
            adam.add_param(p).unwrap();
        }
    }
    let bop_names: Vec<&str> = bop.params().iter().map(|p| p.info.name.as_str()).collect();
    assert_eq!(bop_names, ["conv.weight", "dense.weight"]);
    assert_eq!(adam.params().len(), 2);

    let x = Tensor::rand([8, 1, 10, 10], (Kind::Float, CPU)) * 2.0 - 1.0;
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
    let beta_before = bn1.beta.as_ref().unwrap().copy();
    let loss = forward(&x).cross_entropy_for_logits(&y);
    assert!(loss.double_value(&[]).is_finite());
    loss.backward();
    bop.step().unwrap();
    adam.step().unwrap();

    let checks = binary_kernel_checks(&vs).unwrap();
    assert_eq!(checks.len(), 2);
    for c in &checks {
        assert!(c.is_binary(), "{} has {} non-binary values", c.name, c.non_binary);
    }
    assert!(!bn1.beta.as_ref().unwrap().equal(&beta_before), "Adam must move beta");
}

#[test]
fn recalibration_replaces_the_running_statistics_by_an_equal_weight_average() {
    let vs = nn::VarStore::new(CPU);
    let bn = batch_norm(&vs.root() / "bn", 2, BatchNormConfig::default()).unwrap();
    tch::manual_seed(5);
    let batches: Vec<Tensor> = (0..3)
        .map(|i| Tensor::randn([16, 2], (Kind::Float, CPU)) * (i + 1) as f64 + i as f64)
        .collect();
    // Ordinary training first, so there are stale statistics to discard.
    for b in &batches {
        let _ = bn.forward_t(b, true);
    }
    bn.start_recalibration();
    tch::no_grad(|| {
        for b in &batches {
            let _ = bn.forward_t(b, true);
        }
    });
    assert_eq!(bn.finish_recalibration(), 3);
    let means = Tensor::stack(
        &batches.iter().map(|b| b.mean_dim(0, false, Kind::Float)).collect::<Vec<_>>(),
        0,
    );
    let vars =
        Tensor::stack(&batches.iter().map(|b| b.var_dim(0, true, false)).collect::<Vec<_>>(), 0);
    assert!(bn.moving_mean.allclose(&means.mean_dim(0, false, Kind::Float), 1e-5, 1e-5, false));
    assert!(bn.moving_variance.allclose(&vars.mean_dim(0, false, Kind::Float), 1e-5, 1e-5, false));

    // Back to the configured momentum afterwards: one more batch moves the mean by 1% of the gap.
    let before = bn.moving_mean.copy();
    let extra = Tensor::full([16, 2], 10.0, (Kind::Float, CPU));
    let _ = bn.forward_t(&extra, true);
    let expected = &before * 0.99 + 0.1;
    assert!(bn.moving_mean.allclose(&expected, 1e-5, 1e-5, false));
    assert_eq!(bn.finish_recalibration(), 0, "not recalibrating any more");
}

#[test]
fn random_sign_kernels_are_binary_from_the_start() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(CPU);
    let config = QuantConv2dConfig { kernel_init: KernelInit::RandomSign, ..Default::default() };
    let conv = quant_conv2d(&vs.root() / "conv", 32, 64, 3, config).unwrap();
    let checks = binary_kernel_checks(&vs).unwrap();
    assert_eq!(checks.len(), 1);
    assert!(checks[0].is_binary(), "{checks:?}");
    assert!(conv.weight.requires_grad(), "still a trainable variable");
    // Both signs, in about equal numbers (18,432 draws: 5 sigma is 340).
    let plus = conv.weight.eq(1.0).sum(Kind::Int64).int64_value(&[]);
    assert!((plus - 9216).abs() < 340, "{plus} of 18432 are +1");
}
