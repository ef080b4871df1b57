// ATen's two gradient-scaling ops, which tch does not expose with a tensor list
// (runtime/kernels/amp.rs is the Rust side; runtime/amp.rs, `GradScaler`, the user).
// torch.amp.GradScaler calls exactly these, so calling them gives its bits and its one pass per
// (device, dtype) list. Compiled with or without the `fused` feature (see build.rs).
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

namespace {

// Runs `op`, returning 0; or 1 with the exception's message in `err` (truncated to `len`).
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

}  // namespace

extern "C" {

// `at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)`: multiplies
// every gradient by `inv_scale` in place and sets `found_inf` to 1 when any holds NaN or
// infinity. The gradients must share one device and dtype (ATen checks).
int32_t caseopt_amp_unscale(at::Tensor* const* grads, size_t count, at::Tensor* found_inf,
                            const at::Tensor* inv_scale, char* err, size_t len) {
  return guarded(err, len, [&] {
    // Copies of the handles share their TensorImpl: the op's in-place writes reach the
    // gradients themselves.
    std::vector<at::Tensor> list;
    list.reserve(count);
    for (size_t i = 0; i < count; ++i) list.push_back(*grads[i]);
    at::_amp_foreach_non_finite_check_and_unscale_(list, *found_inf, *inv_scale);
  });
}

// `at::_amp_update_scale_(scale, growth_tracker, found_inf, growth, backoff, interval)`.
int32_t caseopt_amp_update_scale(at::Tensor* scale, at::Tensor* growth_tracker,
                                 const at::Tensor* found_inf, double growth_factor,
                                 double backoff_factor, int64_t growth_interval, char* err,
                                 size_t len) {
  return guarded(err, len, [&] {
    at::_amp_update_scale_(*scale, *growth_tracker, *found_inf, growth_factor, backoff_factor,
                           growth_interval);
  });
}

}  // extern "C"
