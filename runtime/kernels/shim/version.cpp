// Bumps ATen's version counters of the tensors a fused pass wrote (runtime/kernels/version.rs
// is the Rust side), as an in-place libtorch op bumps its output's.
//
// The fused kernels write a tensor's memory directly, which ATen does not see: without this, a
// graph that saved a parameter before the step would differentiate through the new values
// instead of raising "one of the variables needed for gradient computation has been modified
// by an inplace operation", as torch's own path does. The counter is shared by a tensor and
// every view of it, so bumping a state buffer bumps every state tensor viewing it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstddef>

extern "C" {

// Bumps tensors [begin, end), nulling each handle it is done with; returns how many could not
// be bumped.
static size_t caseopt_bump_range(const at::Tensor** tensors, size_t begin, size_t end) {
  size_t refused = 0;
  for (size_t i = begin; i < end; i++) {
    const at::Tensor* t = tensors[i];
    tensors[i] = nullptr;
    if (t == nullptr || !t->defined()) {
      continue;
    }
    try {
      t->unsafeGetTensorImpl()->bump_version();
    } catch (...) {
      refused++;
    }
  }
  return refused;
}

// As in metadata.cpp: from this many tensors on, the list is split between libtorch's intra-op
// threads in contiguous shares, as the metadata read of the same pass split its list (which
// holds the same tensors in about the same order), so that each thread mostly bumps tensors
// whose C++ objects it read. Every bump is a locked increment that
// waits for its line: on one thread, 2002 bumps (many-small's parameters and state buffers)
// after a read split in two took 39-45 us (median of 3000; 9 us with every line in its own
// cache), the other core's lines coming across one by one; split as the read was, 7-9 us.
// Prefetching the handles, TensorImpls and counters ahead gained nothing either way.
#define CASEOPT_PARALLEL_BUMP 512

// Bumps the version counter of each of the `n` tensors (libtch handles, `at::Tensor*`; null
// and undefined ones are skipped), and nulls every handle: the list is the caller's scratch.
// Never throws: ATen refuses to bump an inference tensor outside inference mode (where an
// in-place op would have raised before writing); such a tensor was already written, so it is
// left as it is and counted in the result, the number of tensors not bumped.
size_t caseopt_bump_versions(const at::Tensor** tensors, size_t n) {
  std::atomic<size_t> refused{0};
  if (n >= CASEOPT_PARALLEL_BUMP) {
    try {
      at::parallel_for(0, static_cast<int64_t>(n), CASEOPT_PARALLEL_BUMP / 2,
                       [&](int64_t begin, int64_t end) {
                         refused += caseopt_bump_range(tensors, static_cast<size_t>(begin),
                                                       static_cast<size_t>(end));
                       });
      return refused;
    } catch (...) {
      // libtorch could not run the tasks (the ranges themselves never throw): what they did
      // not reach still has its handle, and is bumped below, each tensor once.
    }
  }
  return refused + caseopt_bump_range(tensors, 0, n);
}

}  // extern "C"
