//! larq 0.14's quantizers in `caseopt::bnn`: forward values and gradients against fixtures
//! recorded from larq itself (tests/fixtures/gen_quantizers.py), their declared precision, their
//! use as input and kernel quantizers of the quantized layers, routing of an n-bit kernel, and
//! typed errors for bad parameters.
//!
//! Forward values must equal larq's bit for bit (including the sign of zero). Gradients must
//! equal larq's as numbers (a masked gradient is `+0` in larq and may be `-0` here, because
//! libtorch's backward of a negation turns a masked `+0` into `-0`) wherever larq's gradient is
//! built from `+ - * /` and comparisons only: those round identically in TensorFlow and
//! libtorch. `swish_sign` (tanh, cosh) and DoReFa's weights mode (tanh) use transcendental
//! functions, which TensorFlow's Eigen and libtorch's Sleef round differently; their gradients
//! are held to `TRANSCENDENTAL_EPS` (see there).

use std::collections::BTreeMap;
use std::path::Path;

use caseopt::bnn::{
    self, quant_conv2d, quant_linear, DoReFaMode, Operand, QuantConv2dConfig, QuantLinearConfig,
    Quantizer,
};
use caseopt::{case_optimizer, var_infos, Error};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

/// Where larq's gradient involves tanh or cosh, the largest allowed `|caseopt - larq|`, in units
/// of float32's epsilon times the magnitude of the gradient's terms before they cancel
/// (`transcendental_scale`). One unit in the last place of tanh or cosh moves the gradient by
/// about one such unit, however much the terms cancel (swish_sign's `2 - beta x tanh(beta x / 2)`
/// near `beta x = 2.4`, DoReFa's `1 - tanh(x)^2` for large `|x|`), while a bound in units in the
/// last place of the gradient itself would have to grow with the cancellation (measured: up to
/// 436 ulp). Measured largest: see `docs/bnn.md`.
const TRANSCENDENTAL_EPS: f64 = 4.0;

fn fixtures() -> (Vec<Value>, BTreeMap<String, Tensor>) {
    let dir = match std::env::var_os("CASEOPT_FIXTURES") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    };
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quantizers_cases.json")).unwrap())
            .unwrap();
    let tensors = Tensor::read_safetensors(dir.join("quantizers.safetensors")).unwrap();
    (meta["cases"].as_array().unwrap().clone(), tensors.into_iter().collect())
}

/// The `Quantizer` a fixture case names, from larq's keyword arguments.
fn quantizer(case: &Value) -> Quantizer {
    let p = &case["params"];
    let clip = || p["clip_value"].as_f64();
    match case["quantizer"].as_str().unwrap() {
        "ste_sign" if clip() == Some(1.0) => Quantizer::SteSign,
        "ste_sign" => Quantizer::SteSignClipped { clip_value: clip() },
        "approx_sign" => Quantizer::ApproxSign,
        "swish_sign" => Quantizer::SwishSign { beta: p["beta"].as_f64().unwrap() },
        "ste_tern" => Quantizer::SteTern {
            threshold_value: p["threshold_value"].as_f64().unwrap(),
            ternary_weight_networks: p["ternary_weight_networks"].as_bool().unwrap(),
            clip_value: clip(),
        },
        "ste_heaviside" => Quantizer::SteHeaviside { clip_value: clip() },
        "magnitude_aware_sign" => Quantizer::MagnitudeAwareSign { clip_value: clip() },
        "dorefa" => Quantizer::DoReFa {
            k_bit: p["k_bit"].as_u64().unwrap() as u8,
            mode: match p["mode"].as_str().unwrap() {
                "activations" => DoReFaMode::Activations,
                _ => DoReFaMode::Weights,
            },
        },
        "noop" => Quantizer::NoOp { precision: p["precision"].as_u64().unwrap() as u8 },
        other => panic!("unknown quantizer {other}"),
    }
}

/// TensorFlow's layout to PyTorch's, and which operand the tensor is.
fn to_torch(layout: &str, t: &Tensor) -> (Tensor, Operand) {
    let (t, operand) = match layout {
        "tf_conv_kernel" => (t.permute([3, 2, 0, 1]), Operand::Kernel), // [kh,kw,in,out] -> [out,in,kh,kw]
        "tf_dense_kernel" => (t.permute([1, 0]), Operand::Kernel),      // [in,out] -> [out,in]
        "nhwc" => (t.permute([0, 3, 1, 2]), Operand::Input),            // -> NCHW
        "flat" | "nc" => (t.shallow_clone(), Operand::Input),
        other => panic!("unknown layout {other}"),
    };
    (t.contiguous(), operand)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().flatten(0, -1)).unwrap()
}

/// Distance in units in the last place, with `-0` and `+0` at the same place.
fn ulps(a: f32, b: f32) -> i64 {
    if a.is_nan() || b.is_nan() {
        return if a.is_nan() && b.is_nan() { 0 } else { i64::MAX };
    }
    let ordered = |v: f32| {
        let bits = i64::from(v.to_bits() & 0x7fff_ffff);
        if v.is_sign_negative() {
            -bits
        } else {
            bits
        }
    };
    (ordered(a) - ordered(b)).abs()
}

/// For the cases whose gradient involves tanh or cosh, the magnitude of each element's gradient
/// terms before they cancel (in f64); `None` for the others, compared exactly.
///
/// - swish_sign: `dy * beta * (2 - p) / b` with `p = beta x tanh(beta x / 2)`,
///   `b = 1 + cosh(beta x)`: `|dy| beta (2 + |p|) / b`.
/// - DoReFa weights: `2 dy / d * (1 - t^2)` with `t = tanh(x)`, `d = 2 max|t|`:
///   `|2 dy / d| (1 + t^2)`.
fn transcendental_scale(case: &Value, x: &[f32], dy: &[f32]) -> Option<Vec<f64>> {
    let q = case["quantizer"].as_str().unwrap();
    let pairs = x.iter().zip(dy).map(|(&x, &dy)| (f64::from(x), f64::from(dy)));
    if q == "swish_sign" {
        let beta = case["params"]["beta"].as_f64().unwrap();
        let scale = pairs.map(|(x, dy)| {
            let bx = beta * x;
            dy.abs() * beta * (2.0 + (bx * (bx / 2.0).tanh()).abs()) / (1.0 + bx.cosh())
        });
        Some(scale.collect())
    } else if q == "dorefa" && case["params"]["mode"] == "weights" {
        let d = 2.0 * x.iter().map(|&x| f64::from(x).tanh().abs()).fold(0.0, f64::max);
        Some(pairs.map(|(x, dy)| (2.0 * dy / d).abs() * (1.0 + x.tanh().powi(2))).collect())
    } else {
        None
    }
}

#[test]
fn every_quantizer_matches_larq_forward_bit_for_bit_and_backward_as_stated() {
    let (cases, tensors) = fixtures();
    assert!(cases.len() >= 25, "only {} fixture cases", cases.len());
    let mut worst_transcendental = 0.0f64;
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let layout = case["layout"].as_str().unwrap();
        let get = |key: &str| to_torch(layout, &tensors[&format!("{name}.{key}")]).0;
        let (x, operand) = to_torch(layout, &tensors[&format!("{name}.x")]);
        let x = x.set_requires_grad(true);
        let q = quantizer(case);
        let y = q.apply_to(&x, operand).unwrap();
        assert_eq!(y.size(), x.size(), "{name}");

        let (got, want) = (f32s(&y), f32s(&get("y")));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g.to_bits() != w.to_bits() {
                failures
                    .push(format!("{name}: y[{i}] = {g:e}, larq {w:e} (x = {:e})", f32s(&x)[i]));
            }
        }

        (&y * get("upstream")).sum(Kind::Float).backward();
        let (got, want) = (f32s(&x.grad()), f32s(&get("dx")));
        let worst_ulps = got.iter().zip(&want).map(|(&g, &w)| ulps(g, w)).max().unwrap();
        let scale = transcendental_scale(case, &f32s(&x), &f32s(&get("upstream")));
        let mut case_worst = 0.0f64;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let error = match &scale {
                // Exact: equal as numbers (+0 == -0).
                None if g == w || (g.is_nan() && w.is_nan()) => 0.0,
                None => f64::INFINITY,
                Some(_) if g == w => 0.0,
                Some(s) => (f64::from(g) - f64::from(w)).abs() / (f64::from(f32::EPSILON) * s[i]),
            };
            let allowed = if scale.is_some() { TRANSCENDENTAL_EPS } else { 0.0 };
            if scale.is_some() {
                case_worst = case_worst.max(error);
            }
            if error.is_nan() || error > allowed {
                failures.push(format!(
                    "{name}: dx[{i}] = {g:e}, larq {w:e}: error {error:.2} > {allowed} (x = {:e})",
                    f32s(&x)[i]
                ));
            }
        }
        worst_transcendental = worst_transcendental.max(case_worst);
        let zero_signs =
            got.iter().zip(&want).filter(|(g, w)| g == w && g.to_bits() != w.to_bits());
        eprintln!(
            "{name}: largest gradient distance {worst_ulps} ulp, {case_worst:.3} eps x term, \
             {} zeros of the other sign",
            zero_signs.count()
        );
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    eprintln!(
        "largest error where tanh/cosh enter: {worst_transcendental:.3} eps x term magnitude"
    );
}

#[test]
fn bits_are_larqs_precision() {
    let cases = [
        (Quantizer::Identity, 32),
        (Quantizer::SteSign, 1),
        (Quantizer::SteSignClipped { clip_value: None }, 1),
        (Quantizer::ApproxSign, 1),
        (Quantizer::SWISH_SIGN, 1),
        (Quantizer::STE_TERN, 2),
        (Quantizer::STE_HEAVISIDE, 1),
        (Quantizer::MAGNITUDE_AWARE_SIGN, 1),
        (Quantizer::DoReFa { k_bit: 3, mode: DoReFaMode::Activations }, 3),
        (Quantizer::DoReFa { k_bit: 8, mode: DoReFaMode::Weights }, 8),
        (Quantizer::NoOp { precision: 1 }, 1),
        (Quantizer::NoOp { precision: 4 }, 4),
    ];
    for (q, bits) in cases {
        assert_eq!(q.bits(), bits, "{q:?}");
    }
}

/// Every quantizer, once as a layer's input quantizer and once as its kernel quantizer.
fn all_quantizers() -> Vec<Quantizer> {
    vec![
        Quantizer::Identity,
        Quantizer::SteSign,
        Quantizer::SteSignClipped { clip_value: Some(0.5) },
        Quantizer::ApproxSign,
        Quantizer::SWISH_SIGN,
        Quantizer::STE_TERN,
        Quantizer::SteTern {
            threshold_value: 0.0,
            ternary_weight_networks: true,
            clip_value: None,
        },
        Quantizer::STE_HEAVISIDE,
        Quantizer::MAGNITUDE_AWARE_SIGN,
        Quantizer::DOREFA,
        Quantizer::DoReFa { k_bit: 4, mode: DoReFaMode::Weights },
        Quantizer::NoOp { precision: 1 },
    ]
}

#[test]
fn each_quantizer_trains_inside_quant_conv2d_and_quant_linear() {
    tch::manual_seed(7);
    for q in all_quantizers() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let conv_cfg =
            QuantConv2dConfig { input_quantizer: q, kernel_quantizer: q, ..Default::default() };
        let conv = quant_conv2d(&root / "conv", 2, 3, 3, conv_cfg).unwrap();
        let dense_cfg =
            QuantLinearConfig { input_quantizer: q, kernel_quantizer: q, ..Default::default() };
        let dense = quant_linear(&root / "dense", 3 * 4 * 4, 5, dense_cfg).unwrap();

        let x = Tensor::randn([2, 2, 6, 6], (Kind::Float, Device::Cpu));
        let h = conv.f_forward(&x).unwrap();
        assert_eq!(h.size(), [2, 3, 4, 4], "{q:?}");
        let y = dense.f_forward(&h.flatten(1, -1)).unwrap();
        assert_eq!(y.size(), [2, 5], "{q:?}");
        y.square().sum(Kind::Float).backward();
        for w in [&conv.weight, &dense.weight] {
            let g = w.grad();
            assert!(g.defined(), "{q:?}: no gradient reached the kernel");
            assert!(f32s(&g).iter().all(|v| v.is_finite()), "{q:?}: non-finite kernel gradient");
        }

        let bits: BTreeMap<String, u8> =
            var_infos(&vs).into_iter().map(|v| (v.name.clone(), v.bits)).collect();
        assert_eq!(bits["conv.weight"], q.bits(), "{q:?}");
        assert_eq!(bits["dense.weight"], q.bits(), "{q:?}");
    }
}

#[test]
fn magnitude_aware_sign_scales_a_kernel_per_output_channel_and_an_input_per_channel() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = QuantLinearConfig {
        input_quantizer: Quantizer::MAGNITUDE_AWARE_SIGN,
        kernel_quantizer: Quantizer::MAGNITUDE_AWARE_SIGN,
        kernel_init: bnn::KernelInit::Torch(nn::Init::Const(0.0)),
        ..Default::default()
    };
    let dense = quant_linear(vs.root() / "d", 2, 2, cfg).unwrap();
    tch::no_grad(|| {
        let rows = Tensor::from_slice(&[1.0f32, -3.0, 0.5, 0.25]).view([2, 2]);
        dense.weight.shallow_clone().copy_(&rows);
    });
    // Input [N = 2, C = 2]: channel means of |x| are 2 and 1; kernel row means are 2 and 0.375.
    let x = Tensor::from_slice(&[1.0f32, -1.0, -3.0, 1.0]).view([2, 2]);
    let y = dense.f_forward(&x).unwrap();
    // Quantized input [[2, -1], [-2, 1]], kernel [[2, -2], [0.375, 0.375]].
    assert_eq!(f32s(&y), [6.0, 0.375, -6.0, -0.375]);
}

#[test]
fn a_bits_2_rule_routes_a_ternary_kernel() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let ternary = QuantConv2dConfig {
        input_quantizer: Quantizer::Identity,
        kernel_quantizer: Quantizer::STE_TERN,
        bias: true,
        ..Default::default()
    };
    let conv = quant_conv2d(&root / "conv", 1, 4, 3, ternary).unwrap();
    let dense = quant_linear(&root / "dense", 4 * 4 * 4, 3, QuantLinearConfig::default()).unwrap();
    let mut opt = case_optimizer! {
        binary => Bop<threshold: 1e-6, gamma: 1e-3>,
        bits(2) => Adam<lr: 0.01>,
        _ => Adam<lr: 0.001>,
    }
    .build(&vs)
    .unwrap();
    let table = opt.routing_table();
    assert_eq!(table.variables_of(0), vec!["dense.weight"]);
    assert_eq!(table.variables_of(1), vec!["conv.weight"]);
    assert_eq!(table.variables_of(2), vec!["conv.bias"]);

    let before = conv.weight.detach().copy();
    let x = Tensor::randn([2, 1, 6, 6], (Kind::Float, Device::Cpu));
    let loss = dense
        .f_forward(&conv.f_forward(&x).unwrap().flatten(1, -1))
        .unwrap()
        .square()
        .sum(Kind::Float);
    opt.backward_step(&loss).unwrap();
    assert!(!conv.weight.detach().equal(&before), "Adam did not move the ternary kernel");
}

#[test]
fn bad_parameters_are_typed_errors() {
    let bad = [
        Quantizer::SteSignClipped { clip_value: Some(-1.0) },
        Quantizer::SwishSign { beta: 0.0 },
        Quantizer::SwishSign { beta: -2.0 },
        Quantizer::SwishSign { beta: f64::INFINITY },
        Quantizer::SteTern {
            threshold_value: -0.05,
            ternary_weight_networks: false,
            clip_value: None,
        },
        Quantizer::SteTern {
            threshold_value: f64::NAN,
            ternary_weight_networks: true,
            clip_value: None,
        },
        Quantizer::SteTern {
            threshold_value: 0.05,
            ternary_weight_networks: false,
            clip_value: Some(-0.5),
        },
        Quantizer::SteHeaviside { clip_value: Some(f64::NAN) },
        Quantizer::MagnitudeAwareSign { clip_value: Some(-3.0) },
        Quantizer::DoReFa { k_bit: 0, mode: DoReFaMode::Activations },
        Quantizer::DoReFa { k_bit: 9, mode: DoReFaMode::Weights },
        Quantizer::NoOp { precision: 0 },
        Quantizer::NoOp { precision: 33 },
    ];
    let x = Tensor::from_slice(&[0.5f32, -0.5]);
    for q in bad {
        assert!(matches!(q.validate(), Err(Error::InvalidQuantizer { .. })), "{q:?}");
        assert!(matches!(q.apply(&x), Err(Error::InvalidQuantizer { .. })), "{q:?}");
        // Refused when the layer is built, as its input or its kernel quantizer.
        let vs = nn::VarStore::new(Device::Cpu);
        let as_input = QuantLinearConfig { input_quantizer: q, ..Default::default() };
        let as_kernel = QuantConv2dConfig { kernel_quantizer: q, ..Default::default() };
        assert!(matches!(
            quant_linear(vs.root() / "a", 2, 2, as_input),
            Err(Error::InvalidQuantizer { .. })
        ));
        assert!(matches!(
            quant_conv2d(vs.root() / "b", 1, 1, 1, as_kernel),
            Err(Error::InvalidQuantizer { .. })
        ));
        assert!(vs.variables().is_empty(), "{q:?}: a refused layer created variables");
    }
    // The free functions check their parameters too.
    assert!(matches!(
        bnn::ste_sign_clipped(&x, Some(-1.0)),
        Err(Error::InvalidQuantizer { name: "clip_value", .. })
    ));
    assert!(matches!(bnn::swish_sign(&x, 0.0), Err(Error::InvalidQuantizer { name: "beta", .. })));
    assert!(matches!(
        bnn::ste_tern(&x, -1.0, false, None),
        Err(Error::InvalidQuantizer { name: "threshold_value", .. })
    ));
    assert!(matches!(bnn::ste_heaviside(&x, Some(-1.0)), Err(Error::InvalidQuantizer { .. })));
    assert!(matches!(
        bnn::magnitude_aware_sign(&x, Some(-1.0), Operand::Input),
        Err(Error::InvalidQuantizer { .. })
    ));
    assert!(matches!(
        bnn::dorefa(&x, 0, DoReFaMode::Activations),
        Err(Error::InvalidQuantizer { name: "k_bit", .. })
    ));
    let e = bnn::dorefa(&x, 12, DoReFaMode::Weights).unwrap_err().to_string();
    assert!(e.contains("dorefa_quantizer") && e.contains("k_bit") && e.contains("12"), "{e}");
}

#[test]
fn an_all_zero_kernel_under_dorefa_weights_stays_finite() {
    // larq's divide_no_nan: max |tanh(w)| = 0 gives u = 1/2, no NaN, a zero gradient.
    let w = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let q = bnn::dorefa(&w, 2, DoReFaMode::Weights).unwrap();
    // round(0.5 * 3) / 3 = 2/3, then 2 * 2/3 - 1.
    let level = 2.0f32 * (2.0f32 / 3.0) - 1.0;
    assert!(f32s(&q).iter().all(|&v| v == level), "{:?}", f32s(&q));
    q.sum(Kind::Float).backward();
    assert!(f32s(&w.grad()).iter().all(|&v| v == 0.0));
}

/// larq's forward values at the largest inputs: swish_sign is the sign, magnitude_aware_sign the
/// scaled sign, with or without `requires_grad` (the gradient carrier made them NaN there, so
/// training and inference disagreed), and the gradients finite where larq's is finite.
#[test]
fn huge_and_infinite_inputs_give_larqs_values_with_and_without_gradients() {
    let big = [f32::MAX, -f32::MAX, f32::INFINITY, f32::NEG_INFINITY, 1e38, -1e38, 3.0, -0.5];
    let signs: Vec<f32> = big.iter().map(|&v| if v >= 0.0 { 1.0 } else { -1.0 }).collect();
    for grad in [false, true] {
        let x = Tensor::from_slice(&big).set_requires_grad(grad);
        for beta in [1.0, 5.0, 10.0] {
            let y = bnn::swish_sign(&x, beta).unwrap();
            assert_eq!(f32s(&y), signs, "swish_sign beta {beta}, requires_grad {grad}");
            if grad {
                y.sum(Kind::Float).backward();
                let g = f32s(&x.grad());
                // Far out the derivative of SignSwish is 0 (larq: -0 or +0, or NaN at inf).
                assert!(g[..6].iter().all(|v| *v == 0.0), "beta {beta}: {g:?}");
                assert!(g[6..].iter().all(|v| v.is_finite()), "beta {beta}: {g:?}");
                let mut g = x.grad();
                let _ = g.zero_();
            }
        }
        // A 1-D tensor is its own channel per element: the scale is |x|.
        let y = bnn::magnitude_aware_sign(&x, Some(1.0), Operand::Input).unwrap();
        let want: Vec<f32> =
            big.iter().map(|v| if *v >= 0.0 { v.abs() } else { -v.abs() }).collect();
        assert_eq!(f32s(&y), want, "magnitude_aware_sign, requires_grad {grad}");
        // Channels whose mean |x| overflows or is infinite: +-inf, as larq's `sign * mean`.
        let x2 = Tensor::from_slice(&[f32::MAX, f32::MAX, -0.5, 0.25, f32::INFINITY, -1.0])
            .view([3, 2])
            .set_requires_grad(grad);
        let y2 = bnn::magnitude_aware_sign(&x2, Some(1.0), Operand::Kernel).unwrap();
        let (inf, m) = (f32::INFINITY, (0.5f32 + 0.25) / 2.0);
        assert_eq!(f32s(&y2), [inf, inf, -m, m, inf, -inf], "requires_grad {grad}");
        if grad {
            y2.sum(Kind::Float).backward();
            let g = f32s(&x2.grad());
            // Outside the clip value larq's gradient is 0; inside it is the channel's scale.
            assert_eq!(g[..4], [0.0, 0.0, m, m], "{g:?}");
            assert_eq!(g[4], 0.0, "{g:?}");
            assert!(g[5].is_finite() && g[5] > 0.0, "{g:?}");
        }
    }
}

/// Quantizers on bool and complex tensors: typed errors (`Error::Torch`), never a panic inside
/// tch.
#[test]
fn bool_and_complex_tensors_are_errors_not_panics() {
    let b = Tensor::from_slice(&[true, false]);
    let c = Tensor::from_slice(&[0.5f32, -0.5]).to_kind(Kind::ComplexFloat);
    for x in [&b, &c] {
        assert!(matches!(bnn::ste_heaviside(x, Some(1.0)), Err(Error::Torch(_))), "{:?}", x.kind());
        assert!(matches!(bnn::ste_heaviside(x, None), Err(Error::Torch(_))), "{:?}", x.kind());
        for mode in [DoReFaMode::Activations, DoReFaMode::Weights] {
            assert!(matches!(bnn::dorefa(x, 2, mode), Err(Error::Torch(_))), "{:?}", x.kind());
        }
    }
    let e = bnn::ste_heaviside(&c, Some(1.0)).unwrap_err().to_string();
    assert!(e.contains("ste_heaviside") && e.contains("ComplexFloat"), "{e}");
}

/// DoReFa's weights gradient is larq's: TensorFlow's `TanhGrad`, `u * (1 - t * t)` with `t * t`
/// rounded first (libtorch's `tanh_backward` rounds `1 - t * t` once, a last-bit difference
/// from larq, e.g. -0.21792345 against larq's -0.21792346). The expected values are that formula
/// evaluated in f32 with the tanh libtorch computes (equal to TensorFlow's, per the issue's
/// larq run), `u` the gradient arriving at tanh.
#[test]
fn dorefa_weights_gradient_rounds_as_tensorflows_tanh_grad() {
    let n = 4096;
    let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7548).sin() * 3.0).collect();
    let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3247).cos()).collect();
    let x = Tensor::from_slice(&xs).set_requires_grad(true);
    let q = bnn::dorefa(&x, 2, DoReFaMode::Weights).unwrap();
    (&q * Tensor::from_slice(&dy)).sum(Kind::Float).backward();
    let got = f32s(&x.grad());
    let t = f32s(&Tensor::from_slice(&xs).tanh());
    let divisor = 2.0 * t.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (mut twice, mut once) = (0, 0);
    for i in 0..n {
        // dy * 2 (the `2 q - 1`), through the rounding, divided by `2 max|t|`, then TanhGrad.
        let u = (dy[i] * 2.0) / divisor;
        let want = u * (1.0 - t[i] * t[i]);
        assert_eq!(got[i].to_bits(), want.to_bits(), "x = {}: {} vs {want}", xs[i], got[i]);
        let fused = u * (-t[i]).mul_add(t[i], 1.0);
        twice += usize::from(fused != want);
        once += usize::from(fused == want);
    }
    // The inputs do tell the two roundings apart.
    assert!(twice > 0 && once > 0, "{twice} {once}");
}
