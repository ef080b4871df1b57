// ATen's two gradient-scaling ops, which tch does not expose with a tensor list
// (runtime/kernels/amp.rs is the Rust side; runtime/amp.rs, `GradScaler`, the user).
// torch.amp.GradScaler calls exactly these, so calling them gives its bits and its one pass per
// (device, dtype) list. Compiled with or without the `fused` feature (see build.rs).
#include <ATen/Functions.h>
#include <ATen/autocast_mode.h>
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

// Enters an autocast region for `device_type` (c10::DeviceType) in `dtype` (c10::ScalarType),
// as torch.autocast's __enter__ does: the previous flag and dtype are written to `prev_enabled`
// and `prev_dtype` for `caseopt_autocast_exit`; the nesting count goes up. tch's own
// `autocast` switches CUDA's flag only; this one switches any device's, CPU's included.
int32_t caseopt_autocast_enter(int32_t device_type, int32_t dtype, int32_t* prev_enabled,
                               int32_t* prev_dtype, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto device = static_cast<c10::DeviceType>(device_type);
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
  });
}

// Leaves an autocast region, as torch.autocast's __exit__: the cast cache is cleared when the
// outermost region ends (cached casts of the weights would be stale after the optimizer's
// step), and the previous flag and dtype are restored.
int32_t caseopt_autocast_exit(int32_t device_type, int32_t prev_enabled, int32_t prev_dtype,
                              char* err, size_t len) {
  return guarded(err, len, [&] {
    auto device = static_cast<c10::DeviceType>(device_type);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(prev_dtype));
  });
}

// Whether autocast is on for `device_type`, written to `enabled`.
int32_t caseopt_autocast_is_enabled(int32_t device_type, int32_t* enabled, char* err,
                                    size_t len) {
  return guarded(err, len, [&] {
    *enabled = at::autocast::is_autocast_enabled(static_cast<c10::DeviceType>(device_type)) ? 1
                                                                                           : 0;
  });
}

}  // extern "C"
