// ATen's multi-tensor optimizer ops, for the multi-tensor backend (runtime/kernels/multi.rs is
// the Rust side). tch exposes none of them.
//
// Each function takes one (device, dtype) group of variables as arrays of tensor handles and
// issues, op for op, what torch.optim 2.13 issues for that group: `fused=True` for Adam, AdamW,
// SGD and Adagrad (the `_fused_*_` ops), `foreach=True` (`_multi_tensor_*`) for RMSprop, RAdam
// and NAdam, and larq's Bop on `_foreach_*` ops. On CUDA tensors these dispatch to the
// multi-tensor-apply kernels torch.optim itself launches; on CPU they run too, which is how the
// backend is proven bit for bit against torch.optim without a GPU (docs/parity.md). Like
// aten.cpp, this file is compiled with or without the `fused` feature.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_addcdiv.h>
#include <ATen/ops/_foreach_addcmul.h>
#include <ATen/ops/_foreach_clamp_max.h>
#include <ATen/ops/_foreach_clamp_min.h>
#include <ATen/ops/_foreach_div.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_neg.h>
#include <ATen/ops/_foreach_reciprocal.h>
#include <ATen/ops/_foreach_sign.h>
#include <ATen/ops/_foreach_sqrt.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_fused_adagrad.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

namespace {

template <typename Op>
int32_t guarded(char* err, size_t len, Op op) {
  try {
    op();
    return 0;
  } catch (const std::exception& e) {
    if (len > 0) std::snprintf(err, len, "%s", e.what());
  } catch (...) {
    if (len > 0) std::snprintf(err, len, "%s", "unknown C++ exception");
  }
  return 1;
}

// The handles of one operand list; an empty list for a null array (an absent state).
std::vector<at::Tensor> list(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  if (ts == nullptr) return out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

std::vector<at::Scalar> scalars(const double* xs, size_t n) {
  return std::vector<at::Scalar>(xs, xs + n);
}

// torch.optim's `grads = torch._foreach_neg(grads)` when maximizing, then the L2 decay
// `grads = torch._foreach_add(grads, params, alpha=weight_decay)` (in place on the negated
// copy, which is torch's own).
std::vector<at::Tensor> adjusted(std::vector<at::Tensor> grads, const std::vector<at::Tensor>& params,
                                 bool maximize, double weight_decay) {
  if (maximize) grads = at::_foreach_neg(grads);
  if (weight_decay != 0) {
    if (maximize) {
      at::_foreach_add_(grads, params, weight_decay);
    } else {
      grads = at::_foreach_add(grads, params, weight_decay);
    }
  }
  return grads;
}

}  // namespace

extern "C" {

// torch.optim.Adam/AdamW with fused=True for one group: `_foreach_add_(steps, 1)`, then
// `_fused_adam_` (or `_fused_adamw_`). `maxs` is null without AMSGrad; `steps` are 0-dim f32.
int32_t caseopt_multi_fused_adam(const at::Tensor* const* params, const at::Tensor* const* grads,
                                 const at::Tensor* const* exp_avgs,
                                 const at::Tensor* const* exp_avg_sqs,
                                 const at::Tensor* const* maxs, const at::Tensor* const* steps,
                                 size_t n, double lr, double beta1, double beta2,
                                 double weight_decay, double eps, bool amsgrad, bool maximize,
                                 bool decoupled, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n),
         mx = list(maxs, n), s = list(steps, n);
    at::_foreach_add_(s, 1);
    if (decoupled) {
      at::_fused_adamw_(p, g, m, v, mx, s, lr, beta1, beta2, weight_decay, eps, amsgrad,
                        maximize);
    } else {
      at::_fused_adam_(p, g, m, v, mx, s, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize);
    }
  });
}

// torch.optim.SGD with fused=True for one group. `bufs` is null without momentum; on the first
// step they are fresh `empty_like` tensors the kernel fills, as torch.optim makes them.
int32_t caseopt_multi_fused_sgd(const at::Tensor* const* params, const at::Tensor* const* grads,
                                const at::Tensor* const* bufs, size_t n, double weight_decay,
                                double momentum, double lr, double dampening, bool nesterov,
                                bool maximize, bool is_first_step, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), g = list(grads, n), b = list(bufs, n);
    at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov, maximize,
                    is_first_step);
  });
}

// torch.optim.Adagrad with fused=True for one group: `_foreach_add_(steps, 1)`, then
// `_fused_adagrad_`.
int32_t caseopt_multi_fused_adagrad(const at::Tensor* const* params,
                                    const at::Tensor* const* grads,
                                    const at::Tensor* const* sums,
                                    const at::Tensor* const* steps, size_t n, double lr,
                                    double lr_decay, double weight_decay, double eps,
                                    bool maximize, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), g = list(grads, n), s = list(sums, n), st = list(steps, n);
    at::_foreach_add_(st, 1);
    at::_fused_adagrad_(p, g, s, st, lr, lr_decay, weight_decay, eps, maximize);
  });
}

// torch.optim.RMSprop's `_multi_tensor_rmsprop` for one group (not capturable, lr a float).
// `grad_avgs` is null unless centered, `bufs` null without momentum. The step counters are the
// caller's (their values enter no op here).
int32_t caseopt_multi_rmsprop(const at::Tensor* const* params, const at::Tensor* const* grads,
                              const at::Tensor* const* square_avgs,
                              const at::Tensor* const* grad_avgs, const at::Tensor* const* bufs,
                              size_t n, double lr, double alpha, double eps, double weight_decay,
                              double momentum, bool centered, bool maximize, char* err,
                              size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), sq = list(square_avgs, n);
    auto g = adjusted(list(grads, n), p, maximize, weight_decay);
    at::_foreach_mul_(sq, alpha);
    at::_foreach_addcmul_(sq, g, g, 1 - alpha);
    std::vector<at::Tensor> avg;
    if (centered) {
      auto ga = list(grad_avgs, n);
      at::_foreach_lerp_(ga, g, 1 - alpha);
      avg = at::_foreach_addcmul(sq, ga, ga, -1);
      at::_foreach_sqrt_(avg);
      at::_foreach_add_(avg, eps);
    } else {
      avg = at::_foreach_sqrt(sq);
      at::_foreach_add_(avg, eps);
    }
    if (momentum > 0) {
      auto b = list(bufs, n);
      at::_foreach_mul_(b, momentum);
      at::_foreach_addcdiv_(b, g, avg);
      at::_foreach_add_(p, b, -lr);
    } else {
      at::_foreach_addcdiv_(p, g, avg, -lr);
    }
  });
}

// torch.optim.RAdam's `_multi_tensor_radam` for one group (not capturable): the per-variable
// scalars `unrect_step_size` and `bias_correction2` are computed by the caller from the steps,
// as torch computes them in Python from `step.item()`.
int32_t caseopt_multi_radam(const at::Tensor* const* params, const at::Tensor* const* grads,
                            const at::Tensor* const* exp_avgs,
                            const at::Tensor* const* exp_avg_sqs, size_t n, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, bool maximize, const double* unrect_step_size,
                            const double* bias_correction2, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    auto g = list(grads, n);
    if (maximize) g = at::_foreach_neg(g);
    if (weight_decay != 0) {
      if (decoupled) {
        at::_foreach_mul_(p, 1 - lr * weight_decay);
      } else if (maximize) {
        at::_foreach_add_(g, p, weight_decay);
      } else {
        g = at::_foreach_add(g, p, weight_decay);
      }
    }
    at::_foreach_lerp_(m, g, 1 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    auto buffer = at::_foreach_sqrt(v);
    at::_foreach_add_(buffer, eps);
    at::_foreach_div_(buffer, scalars(bias_correction2, n));
    at::_foreach_reciprocal_(buffer);
    at::_foreach_add_(buffer, scalars(unrect_step_size, n));
    at::_foreach_addcmul_(p, m, buffer);
  });
}

// torch.optim.NAdam's `_multi_tensor_nadam` for one group (not capturable): the per-variable
// scalars (`bias_correction_sqrt`, `step_size_grads`, `step_size_expavg`) are computed by the
// caller, as torch computes them in Python, and so is the `mu_product` update.
int32_t caseopt_multi_nadam(const at::Tensor* const* params, const at::Tensor* const* grads,
                            const at::Tensor* const* exp_avgs,
                            const at::Tensor* const* exp_avg_sqs, size_t n, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, bool maximize, const double* bias_correction_sqrt,
                            const double* step_size_grads, const double* step_size_expavg,
                            char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    auto g = list(grads, n);
    if (maximize) g = at::_foreach_neg(g);
    if (weight_decay != 0) {
      if (decoupled) {
        at::_foreach_mul_(p, 1 - lr * weight_decay);
      } else if (maximize) {
        at::_foreach_add_(g, p, weight_decay);
      } else {
        g = at::_foreach_add(g, p, weight_decay);
      }
    }
    at::_foreach_lerp_(m, g, 1 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, scalars(bias_correction_sqrt, n));
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(p, g, denom, scalars(step_size_grads, n));
    at::_foreach_addcdiv_(p, m, denom, scalars(step_size_expavg, n));
  });
}

// larq's Bop (`vs` null) or Bop2ndOrder for one group, on `_foreach_*` ops that round as the
// reference does: the moving average is `m + gamma * (g - m)` with the subtraction, the
// multiplication and the addition rounded separately (a `lerp` rounds once, and differs), and
// the flip rule is `sign(sign(-sign(signal - threshold) * w) + 0.1)`. `flips[i]` receives a new
// 0-dim int64 handle counting variable i's sign changes, left on the device (no host read).
int32_t caseopt_multi_bop(const at::Tensor* const* weights, const at::Tensor* const* grads,
                          const at::Tensor* const* ms, const at::Tensor* const* vs, size_t n,
                          double gamma, double sigma, double threshold, double eps,
                          at::Tensor** flips, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto w = list(weights, n), g = list(grads, n), m = list(ms, n);
    auto d = at::_foreach_sub(g, m);
    at::_foreach_mul_(d, gamma);
    at::_foreach_add_(m, d);
    auto signal = at::_foreach_mul(w, m);
    if (vs != nullptr) {
      auto v = list(vs, n);
      auto sq = at::_foreach_mul(g, g);
      auto dv = at::_foreach_sub(sq, v);
      at::_foreach_mul_(dv, sigma);
      at::_foreach_add_(v, dv);
      auto denom = at::_foreach_sqrt(v);
      at::_foreach_add_(denom, eps);
      at::_foreach_div_(signal, denom);
    }
    at::_foreach_sub_(signal, threshold);
    at::_foreach_sign_(signal);
    at::_foreach_neg_(signal);
    at::_foreach_mul_(signal, w);
    at::_foreach_sign_(signal);
    at::_foreach_add_(signal, 0.1);
    at::_foreach_sign_(signal);
    // A weight flips where `w * new < 0` (flips.rs's `count_flips`).
    auto prod = at::_foreach_mul(w, signal);
    std::vector<at::Tensor> counts;
    counts.reserve(n);
    for (size_t i = 0; i < n; ++i) counts.push_back(at::lt(prod[i], 0).sum(at::kLong));
    // Last, so that a failure above leaves every weight as it was.
    for (size_t i = 0; i < n; ++i) w[i].copy_(signal[i]);
    for (size_t i = 0; i < n; ++i) flips[i] = new at::Tensor(std::move(counts[i]));
  });
}

// A weight clip for one group: each tensor clamped to [lo, hi] (`clamp_min_` then `clamp_max_`,
// the same values as `clamp_`, NaN included).
int32_t caseopt_multi_clamp_(const at::Tensor* const* ts, size_t n, double lo, double hi,
                             char* err, size_t len) {
  return guarded(err, len, [&] {
    auto t = list(ts, n);
    at::_foreach_clamp_min_(t, lo);
    at::_foreach_clamp_max_(t, hi);
  });
}

// Whether any element of the tensors (one device) is not finite, as one 0-dim f32 tensor on
// their device, left there (`*found`, a new handle): ATen's AMP check with an inverse scale of
// 1, which leaves every value as it was (x * 1 == x) while it scans them all in one
// multi-tensor pass.
int32_t caseopt_multi_nonfinite(const at::Tensor* const* ts, size_t n, at::Tensor** found,
                                char* err, size_t len) {
  return guarded(err, len, [&] {
    auto t = list(ts, n);
    // The check writes `x * 1` back in place: a gradient whose elements share memory (an
    // expanded one) is checked through a copy instead.
    for (auto& g : t) {
      if (!g.is_non_overlapping_and_dense()) g = g.contiguous();
    }
    auto opts = t.at(0).options().dtype(at::kFloat);
    auto flag = at::zeros({1}, opts);
    auto one = at::ones({1}, opts);
    at::_amp_foreach_non_finite_check_and_unscale_(t, flag, one);
    *found = new at::Tensor(flag.reshape({}));
  });
}

}  // extern "C"
