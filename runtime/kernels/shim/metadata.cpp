// Reads the metadata of many tensors in one call, for caseopt's fused CPU kernels and its
// router's checks (runtime/kernels/metadata.rs is the Rust side).
//
// Through libtch every field is its own foreign call plus a check of libtch's thread-local
// error (ten or more calls per tensor): on 2000 small variables those calls, not the
// arithmetic, were most of an optimizer step. Here one call walks all the tensors, and the
// next tensors' C++ objects are prefetched while the current one is read.
//
// Every tensor is read inside its own try/catch: no C++ exception crosses into Rust; a tensor
// whose metadata cannot be read is reported by its status instead.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// Keep in sync with `RawMeta` in runtime/kernels/metadata.rs.
enum caseopt_status : int32_t {
  CASEOPT_OK = 0,
  CASEOPT_UNDEFINED = 1,      // an undefined tensor (e.g. no gradient)
  CASEOPT_NOT_STRIDED = 2,    // sparse, mkldnn, ... layouts
  CASEOPT_EXCEPTION = 3,      // libtorch raised while reading
  CASEOPT_TOO_MANY_DIMS = 4,  // more dimensions than `sizes` holds
};

#define CASEOPT_MAX_DIMS 12

struct caseopt_meta {
  int64_t numel;
  // The data address, 0 when there is none (no storage, or zero elements).
  uintptr_t data;
  int32_t status;
  // c10::ScalarType.
  int32_t dtype;
  // libtch's convention: -1 for the CPU, the CUDA index otherwise, -2 for other devices.
  int32_t device;
  int32_t ndim;
  uint8_t contiguous;
  uint8_t requires_grad;
  uint8_t pad[6];
  int64_t sizes[CASEOPT_MAX_DIMS];
};

static void caseopt_read_one(const at::Tensor& t, bool writable, caseopt_meta& m) {
  m = caseopt_meta{};
  try {
    if (!t.defined()) {
      m.status = CASEOPT_UNDEFINED;
      return;
    }
    m.dtype = static_cast<int32_t>(t.scalar_type());
    const c10::Device d = t.device();
    m.device = d.is_cpu() ? -1 : (d.is_cuda() ? d.index() : -2);
    m.requires_grad = t.requires_grad();
    if (t.layout() != at::kStrided) {
      m.status = CASEOPT_NOT_STRIDED;
      return;
    }
    const int64_t ndim = t.dim();
    m.ndim = static_cast<int32_t>(ndim);
    if (ndim > CASEOPT_MAX_DIMS) {
      m.status = CASEOPT_TOO_MANY_DIMS;
      return;
    }
    const auto sizes = t.sizes();
    for (int64_t k = 0; k < ndim; k++) m.sizes[k] = sizes[k];
    m.numel = t.numel();
    m.contiguous = t.is_contiguous();
    if (m.numel > 0 && t.has_storage()) {
      // An operand that will be written asks for the mutable address, which first gives a
      // copy-on-write tensor its own memory, as any in-place libtorch op does.
      m.data = writable ? reinterpret_cast<uintptr_t>(t.mutable_data_ptr())
                        : reinterpret_cast<uintptr_t>(t.const_data_ptr());
    }
    m.status = CASEOPT_OK;
  } catch (...) {
    m = caseopt_meta{};
    m.status = CASEOPT_EXCEPTION;
  }
}

// Starts loading the C++ objects a read of `t` will touch (its TensorImpl, StorageImpl and
// AutogradMeta), so that the cache misses of several tensors overlap instead of queueing one
// after the other. Only addresses are computed, nothing is dereferenced beyond the handle and
// the TensorImpl, which the caller has prefetched earlier.
static inline void caseopt_prefetch_objects(const at::Tensor* t) {
  c10::TensorImpl* impl = t->unsafeGetTensorImpl();
  const char* p = reinterpret_cast<const char*>(impl);
  __builtin_prefetch(p + 64);
  __builtin_prefetch(p + 128);
  __builtin_prefetch(impl->autograd_meta());
  if (impl->has_storage()) {
    __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
  }
}

// Reads tensors [begin, end) for `caseopt_read_meta`.
static void caseopt_read_range(const at::Tensor* const* tensors, size_t begin, size_t end,
                               int32_t writable, caseopt_meta* out, caseopt_meta* grads,
                               at::Tensor** grad_handles, at::Tensor** recycled) {
  for (size_t i = begin; i < end; i++) {
    try {
      if (i + 12 < end && tensors[i + 12] != nullptr) {
        __builtin_prefetch(tensors[i + 12]);
      }
      if (i + 8 < end && tensors[i + 8] != nullptr) {
        __builtin_prefetch(tensors[i + 8]->unsafeGetTensorImpl());
      }
      if (i + 4 < end && tensors[i + 4] != nullptr && tensors[i + 4]->defined()) {
        caseopt_prefetch_objects(tensors[i + 4]);
      }
      if (grads != nullptr && i + 2 < end && tensors[i + 2] != nullptr &&
          tensors[i + 2]->defined()) {
        const at::Tensor& g = tensors[i + 2]->unsafeGetTensorImpl()->grad();
        if (g.defined()) {
          __builtin_prefetch(g.unsafeGetTensorImpl());
          __builtin_prefetch(reinterpret_cast<const char*>(g.unsafeGetTensorImpl()) + 64);
          __builtin_prefetch(reinterpret_cast<const char*>(g.unsafeGetTensorImpl()) + 128);
        }
      }
    } catch (...) {
      // Prefetching is only a hint.
    }
    const at::Tensor* t = tensors[i];
    if (grad_handles != nullptr) {
      grad_handles[i] = nullptr;
    }
    if (t == nullptr) {
      out[i] = caseopt_meta{};
      out[i].status = CASEOPT_UNDEFINED;
      if (grads != nullptr) {
        grads[i] = out[i];
      }
      continue;
    }
    caseopt_read_one(*t, writable != 0, out[i]);
    if (grads != nullptr) {
      try {
        if (t->defined()) {
          const at::Tensor& g = t->unsafeGetTensorImpl()->grad();
          caseopt_read_one(g, false, grads[i]);
          if (grad_handles != nullptr && g.defined()) {
            at::Tensor* h = recycled != nullptr ? recycled[i] : nullptr;
            if (h != nullptr) {
              *h = g;
              recycled[i] = nullptr;
            } else {
              h = new at::Tensor(g);
            }
            grad_handles[i] = h;
          }
        } else {
          grads[i] = caseopt_meta{};
          grads[i].status = CASEOPT_UNDEFINED;
        }
      } catch (...) {
        grads[i] = caseopt_meta{};
        grads[i].status = CASEOPT_EXCEPTION;
      }
    }
  }
}

// Below this many tensors a list is read on the calling thread; above, it is split between
// libtorch's intra-op threads. The reads are cache misses on C++ objects, one tensor after
// another, a fifth of a router step on 2000 variables; split in two, the step took 0.87-0.89x
// the time (medians of 40 paired in-process rounds of 50 steps, three comparisons).
#define CASEOPT_PARALLEL_READ 512

// Reads `n` tensors (libtch handles, that is `at::Tensor*`) into `out`. With `grads` not null,
// also reads each tensor's `.grad()` into `grads[i]` (undefined when it has none); with
// `grad_handles` not null too, stores in `grad_handles[i]` a handle to each defined gradient,
// else null: the same handle `at_grad` makes, without its dispatch through the autograd hooks,
// for the caller to free as libtch's `at_free` does (`delete`). `recycled`, when not null, holds
// `n` handles the caller owns, each null or an undefined `at::Tensor` from an earlier step
// (`caseopt_release_handles`): a gradient's handle is then made by assigning into
// `recycled[i]`, which moves to `grad_handles[i]` (and `recycled[i]` becomes null), instead of
// allocating one; on 2000 variables, allocating and freeing a handle per gradient per step was
// a tenth of a router step. `writable` picks the mutable data address for the tensors (never
// for their gradients). Never throws.
//
// The objects behind a handle are chained (handle -> TensorImpl -> StorageImpl, AutogradMeta),
// so they are prefetched in stages: the handle 12 tensors ahead, its TensorImpl 8 ahead, the
// rest 4 ahead, the gradient's TensorImpl 2 ahead.
void caseopt_read_meta(const at::Tensor* const* tensors, size_t n, int32_t writable,
                       caseopt_meta* out, caseopt_meta* grads, at::Tensor** grad_handles,
                       at::Tensor** recycled) {
  if (n >= CASEOPT_PARALLEL_READ) {
    try {
      at::parallel_for(0, static_cast<int64_t>(n), CASEOPT_PARALLEL_READ / 2,
                       [&](int64_t begin, int64_t end) {
                         caseopt_read_range(tensors, static_cast<size_t>(begin),
                                            static_cast<size_t>(end), writable, out, grads,
                                            grad_handles, recycled);
                       });
      return;
    } catch (...) {
      // libtorch could not run the tasks (the ranges themselves never throw): give back any
      // handle made so far (to `recycled`, emptied, or freed) and read everything here.
      if (grad_handles != nullptr) {
        for (size_t i = 0; i < n; i++) {
          at::Tensor* h = grad_handles[i];
          grad_handles[i] = nullptr;
          if (h == nullptr) continue;
          if (recycled != nullptr && recycled[i] == nullptr) {
            *h = at::Tensor();
            recycled[i] = h;
          } else {
            delete h;
          }
        }
      }
    }
  }
  caseopt_read_range(tensors, 0, n, writable, out, grads, grad_handles, recycled);
}

// Drops the tensor each non-null handle of `handles` holds (its reference count goes down, the
// handle becomes an undefined tensor), keeping the handles for `caseopt_read_meta` to reuse.
// Split between threads as the read that made them was, so that each thread mostly releases
// the gradients whose counts it raised (a count's line stays in the cache of the core that
// last changed it; on one thread, the other core's lines came across one by one). Never throws.
static void caseopt_release_range(at::Tensor** handles, size_t begin, size_t end) {
  for (size_t i = begin; i < end; i++) {
    if (handles[i] != nullptr) {
      *handles[i] = at::Tensor();
    }
  }
}

void caseopt_release_handles(at::Tensor** handles, size_t n) {
  if (n >= CASEOPT_PARALLEL_READ) {
    try {
      at::parallel_for(0, static_cast<int64_t>(n), CASEOPT_PARALLEL_READ / 2,
                       [&](int64_t begin, int64_t end) {
                         caseopt_release_range(handles, static_cast<size_t>(begin),
                                               static_cast<size_t>(end));
                       });
      return;
    } catch (...) {
      // libtorch could not run the tasks: release what is left here (a released handle is
      // undefined, releasing it again changes nothing).
    }
  }
  caseopt_release_range(handles, 0, n);
}

// How many references `t`'s tensor has (0 for an undefined one), for the Rust side's tests of
// the handle pool.
size_t caseopt_use_count(const at::Tensor* t) { return t->use_count(); }

// The size of `caseopt_meta`, checked by the Rust side once.
size_t caseopt_meta_size(void) { return sizeof(caseopt_meta); }

}  // extern "C"
