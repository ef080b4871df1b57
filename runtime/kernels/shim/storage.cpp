// Committing a staged update (runtime/kernels/stage.rs): the new state was written into a
// second buffer of the same size, and now becomes the state by exchanging the two storages'
// memory. Every tensor viewing the state's storage (the optimizer's per-variable views, the
// aliases `state()` handed out) sees the new values at once, and no byte is copied.
#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// Exchanges the memory of the storages of `a[i]` and `b[i]` for every i < n: 0 on success; 1,
// having changed nothing, when a pair differs in size or device, is not a pair of distinct
// plain CPU storages, or libtorch raised while checking.
int32_t caseopt_swap_storages(const at::Tensor* const* a, const at::Tensor* const* b, size_t n) {
  try {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& x = *a[i];
      const at::Tensor& y = *b[i];
      if (!x.defined() || !y.defined() || !x.has_storage() || !y.has_storage()) return 1;
      c10::StorageImpl* sx = x.storage().unsafeGetStorageImpl();
      c10::StorageImpl* sy = y.storage().unsafeGetStorageImpl();
      // Gives a copy-on-write storage its own memory first, as any in-place op would.
      (void)sx->mutable_data_ptr();
      (void)sy->mutable_data_ptr();
      if (sx == sy || sx->nbytes() != sy->nbytes() || !sx->device().is_cpu() ||
          !sy->device().is_cpu() || sx->data() == nullptr || sy->data() == nullptr) {
        return 1;
      }
    }
  } catch (...) {
    return 1;
  }
  // Moving DataPtrs does not throw.
  for (size_t i = 0; i < n; ++i) {
    c10::StorageImpl* sx = a[i]->storage().unsafeGetStorageImpl();
    c10::StorageImpl* sy = b[i]->storage().unsafeGetStorageImpl();
    at::DataPtr px = std::move(sx->_mutable_data_ptr_no_checks());
    sx->set_data_ptr_noswap(std::move(sy->_mutable_data_ptr_no_checks()));
    sy->set_data_ptr_noswap(std::move(px));
  }
  return 0;
}

}  // extern "C"
