// Running the fused kernels on libtorch's own intra-op thread pool (runtime/kernels/pool.rs).
//
// Threads of our own would compete with libtorch's OpenMP workers, which keep spinning for a
// while after every parallel op (the forward and backward passes just before a step): on two
// cores that contention cost more than the threads saved. at::parallel_for hands the tasks to
// those very workers.
#include <ATen/Parallel.h>

#include <cstdint>

extern "C" {

typedef void (*caseopt_task)(void* ctx, int64_t begin, int64_t end);

// Runs `task(ctx, begin, end)` over chunks of [0, n) on libtorch's intra-op pool, at least
// `grain` indices per chunk (ATen's meaning of a grain size). Returns 0, or 1 when
// libtorch raised (the task itself never throws: it is Rust code that catches its panics).
int32_t caseopt_parallel_for(int64_t n, int64_t grain, caseopt_task task, void* ctx) {
  try {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { task(ctx, begin, end); });
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"

