// ATen's own ops with the scalar arguments tch cannot pass (runtime/kernels/aten.rs is the Rust
// side), and the CPU capability ATen dispatches its kernels to.
//
// torch.optim calls `add(x, alpha=a)`, `addcmul(.., value=v)` and `addcdiv(.., value=v)`. On a
// CPU where ATen runs its AVX2 or AVX-512 kernels, `add` and `addcmul` round once per fused
// multiply-add, so the same result cannot be had from tch's separate `mul` and `add`: the
// libtorch path calls these instead, and gets torch.optim's bits on every device. Unlike the
// rest of the shim, this file is compiled with or without the `fused` feature (see build.rs).
#include <ATen/Config.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sqrt.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#if AT_MKL_ENABLED() && !defined(__APPLE__)
// MKL's vector square roots, which ATen's `sqrt` runs on a contiguous float or double tensor
// (`at::vml::vsqrt`, ATen/cpu/vml.h): their results differ from the correctly rounded square
// root in about 17% of f32 and 1.2% of f64 elements, by one ulp. MKL is linked into libtorch
// statically and its C entry points are not exported, but its Fortran ones are (LP64: a 32-bit
// count). Weak, so that a libtorch without them links too (and the pointer is null).
extern "C" {
void VMSSQRT_(const int32_t* n, const float* a, float* r, const int64_t* mode)
    __attribute__((weak));
void VMDSQRT_(const int32_t* n, const double* a, double* r, const int64_t* mode)
    __attribute__((weak));
}
#define CASEOPT_VML_SQRT 1
#endif

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

// `*out = self + alpha * other` (torch.add), a new handle the caller owns (as libtch's are).
int32_t caseopt_aten_add(const at::Tensor* self, const at::Tensor* other, double alpha,
                         at::Tensor** out, char* err, size_t len) {
  return guarded(err, len, [&] { *out = new at::Tensor(self->add(*other, alpha)); });
}

// `self += alpha * other` (Tensor.add_).
int32_t caseopt_aten_add_(at::Tensor* self, const at::Tensor* other, double alpha, char* err,
                          size_t len) {
  return guarded(err, len, [&] { self->add_(*other, alpha); });
}

// `*out = self + value * t1 * t2` (torch.addcmul), a new handle the caller owns.
int32_t caseopt_aten_addcmul(const at::Tensor* self, const at::Tensor* t1, const at::Tensor* t2,
                             double value, at::Tensor** out, char* err, size_t len) {
  return guarded(err, len, [&] { *out = new at::Tensor(self->addcmul(*t1, *t2, value)); });
}

// `self += value * t1 * t2` (Tensor.addcmul_).
int32_t caseopt_aten_addcmul_(at::Tensor* self, const at::Tensor* t1, const at::Tensor* t2,
                              double value, char* err, size_t len) {
  return guarded(err, len, [&] { self->addcmul_(*t1, *t2, value); });
}

// `self += value * t1 / t2` (Tensor.addcdiv_).
int32_t caseopt_aten_addcdiv_(at::Tensor* self, const at::Tensor* t1, const at::Tensor* t2,
                              double value, char* err, size_t len) {
  return guarded(err, len, [&] { self->addcdiv_(*t1, *t2, value); });
}

// `*out = beta * self + alpha * (mat1 @ mat2)` (torch.addmm with `beta` and `alpha`, as
// torch.optim.Muon's Newton-Schulz iteration calls it), a new handle the caller owns.
int32_t caseopt_aten_addmm(const at::Tensor* self, const at::Tensor* mat1, const at::Tensor* mat2,
                           double beta, double alpha, at::Tensor** out, char* err, size_t len) {
  return guarded(err, len,
                 [&] { *out = new at::Tensor(at::addmm(*self, *mat1, *mat2, beta, alpha)); });
}

// `*out = self.norm()` as Python's `Tensor.norm()` computes it: `torch.linalg.vector_norm(self,
// 2)` over every element, in the tensor's dtype (torch.functional.norm's route for p="fro").
int32_t caseopt_aten_vector_norm(const at::Tensor* self, at::Tensor** out, char* err,
                                 size_t len) {
  return guarded(err, len, [&] {
    *out = new at::Tensor(at::linalg_vector_norm(*self, 2, std::nullopt, false, std::nullopt));
  });
}

// `*out = self.clamp(min=min)` (aten::clamp with no upper bound), a new handle the caller owns.
int32_t caseopt_aten_clamp_min(const at::Tensor* self, double min, at::Tensor** out, char* err,
                               size_t len) {
  return guarded(err, len, [&] {
    *out = new at::Tensor(at::clamp(*self, at::Scalar(min), std::nullopt));
  });
}

// Whether `keep` (null, or a mask of an earlier step) can take a mask of `w` as it is: a dense
// bool tensor of `w`'s shape on its device, which an `_out` op then fills without resizing.
static bool reusable(const at::Tensor* keep, const at::Tensor& w) {
  return keep != nullptr && keep->defined() && keep->layout() == at::kStrided &&
         keep->scalar_type() == at::kBool && keep->device() == w.device() &&
         keep->sizes().equals(w.sizes()) && keep->is_contiguous() && keep->has_storage();
}

// Bop's flip of one variable (runtime/optim/bop.rs's `libtorch_step`), in `signal`'s memory:
// `w` becomes -1 exactly where `x = signal - threshold` and `w` are both positive or both
// negative, +1 elsewhere (larq's `sign(sign(-sign(x) * w) + 0.1)`, 0 and NaN included).
// `sign(x) * w` is exact (a product by -1, 0 or 1), and positive exactly there. Returns the
// masks that count the flips: `w < 0` before and after.
//
// `keep_was` and `keep_neg`, when not null, are the masks of this variable's previous step,
// which the caller gives up: where both can hold this step's (`reusable`), the masks are
// computed into them (`lt_out`, `gt_out`: the same kernels, the same values) and both out
// handles are set to null; otherwise two new handles are stored there. On 1000 variables of
// 256, the step without the two allocations took 0.68-0.77x the time (docs/performance.md).
static void bop_flip(at::Tensor& w, at::Tensor& signal, double threshold, at::Tensor* keep_was,
                     at::Tensor* keep_neg, at::Tensor** was_negative, at::Tensor** negative) {
  signal.sub_(threshold);
  signal.sign_();
  signal.mul_(w);
  const bool reuse = reusable(keep_was, w) && reusable(keep_neg, w) &&
                     !keep_was->storage().is_alias_of(keep_neg->storage());
  at::Tensor neg = reuse ? at::gt_out(*keep_neg, signal, 0) : signal.gt(0);
  at::Tensor was = reuse ? at::lt_out(*keep_was, w, 0) : w.lt(0);
  w.fill_(1);
  w.masked_fill_(neg, -1);
  *was_negative = reuse ? nullptr : new at::Tensor(std::move(was));
  *negative = reuse ? nullptr : new at::Tensor(std::move(neg));
}

// `*m += rate * (x - m)` as larq writes it, the subtraction, the product and the sum each rounded
// (a `lerp` or an `add(.., alpha)` rounds once where ATen contracts, and differs): the difference
// is scaled in its own memory, returned for the caller's next temporary.
static at::Tensor moving_average(at::Tensor& m, at::Tensor d, double rate) {
  d.mul_(rate);
  m.add_(d);
  return d;
}

// `flip` alone, for the tests that try it on every kind of signal; new handles in the masks.
int32_t caseopt_aten_bop_flip(at::Tensor* w, at::Tensor* signal, double threshold,
                              at::Tensor** was_negative, at::Tensor** negative, char* err,
                              size_t len) {
  return guarded(err, len, [&] {
    bop_flip(*w, *signal, threshold, nullptr, nullptr, was_negative, negative);
  });
}

// One variable's Bop step (`v` null) or Bop2ndOrder step on libtorch ops (runtime/optim/bop.rs's
// `libtorch_step`), in one call: on small tensors each op's cost is mostly the way to it (tch's
// FFI, boxed handles, error checks), which this pays once. Bop:
// `m += gamma * (g - m); w = flip(w, w * m - threshold)`; Bop2ndOrder also
// `v += sigma * (g * g - v)` and divides `w * m` by `sqrt(v) + eps`. The masks: in `keep_was`
// and `keep_neg` (the previous step's, or null) with both outs null, or in two new handles
// (see `bop_flip`).
int32_t caseopt_aten_bop(at::Tensor* w, const at::Tensor* g, at::Tensor* m, at::Tensor* v,
                         double gamma, double sigma, double threshold, double eps,
                         at::Tensor* keep_was, at::Tensor* keep_neg, at::Tensor** was_negative,
                         at::Tensor** negative, char* err, size_t len) {
  return guarded(err, len, [&] {
    at::Tensor signal = moving_average(*m, g->sub(*m), gamma);
    if (v == nullptr) {
      at::mul_out(signal, *w, *m);
    } else {
      at::Tensor dv = g->mul(*g);
      dv.sub_(*v);
      at::Tensor denom = moving_average(*v, std::move(dv), sigma);
      at::sqrt_out(denom, *v);
      denom.add_(eps);
      at::mul_out(signal, *w, *m);
      signal.div_(denom);
    }
    bop_flip(*w, signal, threshold, keep_was, keep_neg, was_negative, negative);
  });
}

// The function ATen's CPU `sqrt` computes a contiguous f32 (`dtype` 0) or f64 (1) run with: MKL's
// `v?Sqrt` through its Fortran entry point (`(n, in, out, mode)`, all by address), to be called
// with `mode` VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE as ATen calls it; or null where this
// libtorch has no MKL, and ATen's vectorised `sqrt` is the correctly rounded one.
void* caseopt_aten_vml_sqrt(int32_t dtype) {
#ifdef CASEOPT_VML_SQRT
  if (dtype == 0) return reinterpret_cast<void*>(&VMSSQRT_);
  if (dtype == 1) return reinterpret_cast<void*>(&VMDSQRT_);
#endif
  (void)dtype;
  return nullptr;
}

// The kernels ATen's CPU ops dispatch to, from the name `torch.backends.cpu.get_cpu_capability()`
// returns (the exported `at::get_cpu_capability`; DispatchStub's enum is not exported): 0
// (DEFAULT), 1 (AVX2), 2 (AVX512), or -1 for any other name (another architecture's builds) or
// a failure. ATen chooses once per process, from the processor and the ATEN_CPU_CAPABILITY
// environment variable.
int32_t caseopt_aten_cpu_capability() {
  try {
    const std::string name = at::get_cpu_capability();
    if (name == "DEFAULT") return 0;
    if (name == "AVX2") return 1;
    if (name == "AVX512") return 2;
  } catch (...) {
  }
  return -1;
}

// The TensorImpl behind a handle (runtime/router/ownership.rs): the one identity of a variable
// that every shallow clone shares and that `set_data` keeps (it swaps the storage, and with it
// the data address, under the same TensorImpl); null for an undefined tensor. Does not throw.
const void* caseopt_tensor_impl(const at::Tensor* t) {
  return t->defined() ? static_cast<const void*>(t->unsafeGetTensorImpl()) : nullptr;
}

}  // extern "C"
