// The process group of `caseopt::distributed`: libtorch's own c10d (the layer under
// torch.distributed), reached from Rust through a C interface. A TCPStore does the rendezvous and
// `ProcessGroupGloo` the collectives on CPU tensors; nothing here is a collective of our own.
//
// Every function catches what c10d throws and returns a status (see `Status`) with the message
// in the caller's buffer, so that no C++ exception crosses into Rust. Timeouts are c10d's own:
// the store's for the rendezvous, Gloo's for every collective, so a peer that died is an error
// after at most that long, never a hang.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Mirrored by `Status` in runtime/distributed/ffi.rs.
enum Status : int32_t {
  kOk = 0,
  kTimeout = 1,
  kPeerLost = 2,
  kFailed = 3,
  kUnreachable = 4,
  kInvalid = 5,
};

// A rendezvous that cannot form the group asked for (a rank claimed twice, ranks that disagree
// on the world size): reported as such, not as the timeout it would otherwise end in.
struct InvalidGroup : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
};

void write_message(const std::string& message, char* out, size_t capacity) {
  if (out == nullptr || capacity == 0) return;
  size_t n = std::min(message.size(), capacity - 1);
  std::memcpy(out, message.data(), n);
  out[n] = '\0';
}

bool contains(const std::string& haystack, const char* needle) {
  return haystack.find(needle) != std::string::npos;
}

// c10d and gloo report a dead peer and an expired timeout only in their messages (their
// exception types are c10::Error / DistBackendError for both), so the message decides.
Status classify(const std::string& message) {
  // Checked first: Gloo's messages about a refused connection may also quote its timeout, and
  // an address nobody listens on is not a peer that stopped answering.
  if (contains(message, "Connection refused") || contains(message, "ECONNREFUSED")) {
    return kUnreachable;
  }
  if (contains(message, "imed out") || contains(message, "imeout") ||
      contains(message, "timeout")) {
    return kTimeout;
  }
  if (contains(message, "Connection closed by peer") ||
      contains(message, "Connection reset") || contains(message, "Broken pipe") ||
      contains(message, "closed by peer")) {
    return kPeerLost;
  }
  return kFailed;
}

// Runs `body`, turning any exception into a status and a message.
template <typename F>
int32_t guarded(char* err, size_t err_capacity, F&& body) {
  try {
    body();
    return kOk;
  } catch (const InvalidGroup& e) {
    write_message(e.what(), err, err_capacity);
    return kInvalid;
  } catch (const c10::Error& e) {
    std::string message = e.what_without_backtrace();
    write_message(message, err, err_capacity);
    return classify(message);
  } catch (const std::exception& e) {
    std::string message = e.what();
    write_message(message, err, err_capacity);
    return classify(message);
  } catch (...) {
    write_message("unknown C++ exception", err, err_capacity);
    return kFailed;
  }
}

// Starts one collective per tensor, then waits for all: Gloo runs them on its own threads, so
// the buckets' transfers overlap each other.
template <typename Start>
void run_each(const at::Tensor* const* tensors, size_t n, Start&& start) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> one{*tensors[i]};
    works.push_back(start(one));
  }
  // Waits for every work even after one failed, so none is left running against freed memory.
  std::exception_ptr first;
  for (auto& work : works) {
    try {
      work->wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace

extern "C" {

// Joins the group: rank `rank` of `size`, rendezvous at `host:port` (rank 0 serves the store
// when `serve_store` is 1; 0 when an agent such as torchrun serves it), Gloo over the interface
// `interface` when not empty, else over the address `device_host` when not empty, else over the
// address this machine's hostname resolves to (c10d's default device).
//
// `budget_ms` (what is left of the timeout when the caller is done waiting for the store to
// answer) bounds the rest of the rendezvous: every wait gets what is left of it, so that the
// phases do not add up to several timeouts. `timeout_ms` then bounds every collective.
//
// Keys go under `prefix` (one per torchrun attempt, so that a restarted attempt never reads the
// Gloo addresses its dead predecessor left in torchrun's store). Before Gloo connects, every
// rank registers under the prefix and checks that no rank is claimed twice and that every rank
// has the same world size, so those mistakes are errors at once rather than Gloo timeouts.
//
// With `torch_compatible` set, the keys are instead those `torch.distributed.
// init_process_group("gloo", init_method="env://")` uses for its default group (see
// docs/distributed.md), the registration is skipped (torch's ranks do not register) and, as
// torch does, the group's sequence number is set through the store.
int32_t caseopt_c10d_connect(const char* host, uint16_t port, int32_t rank, int32_t size,
                             int64_t timeout_ms, int64_t budget_ms, int32_t serve_store,
                             const char* interface,
                             const char* device_host, const char* prefix, int32_t torch_compatible,
                             void** out, char* err, size_t err_capacity) {
  *out = nullptr;
  return guarded(err, err_capacity, [&] {
    using clock = std::chrono::steady_clock;
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto deadline = clock::now() + std::chrono::milliseconds(budget_ms);
    auto remaining = [&] {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
      return std::max(left, std::chrono::milliseconds(1));
    };
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = serve_store != 0 && rank == 0;
    options.numWorkers = static_cast<size_t>(size);
    options.waitWorkers = true;
    options.timeout = remaining();
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    tcp->setTimeout(remaining());
    c10::intrusive_ptr<c10d::Store> store;
    if (torch_compatible != 0) {
      // distributed_c10d.py: PrefixStore("default_pg", store), then f"{group_name}/" with the
      // default group's name "0", then f"{device}/" for the first device of the backend ("cpu":
      // "gloo" serves "cpu" and "cuda", and torch builds one Gloo group for both).
      auto default_pg = c10::make_intrusive<c10d::PrefixStore>(
          "0/", c10::make_intrusive<c10d::PrefixStore>("default_pg", tcp));
      store = c10::make_intrusive<c10d::PrefixStore>("cpu/", default_pg);
    } else {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
      std::string me = std::to_string(rank);
      int64_t claims = store->add("caseopt/claims/" + me, 1);
      store->set("caseopt/world/" + me, std::to_string(size));
      if (claims > 1) {
        throw InvalidGroup("rank " + me + " is claimed by " + std::to_string(claims) +
                           " processes (RANK given twice?)");
      }
      for (int32_t other = 0; other < size; ++other) {
        if (other == rank) continue;
        std::string them = std::to_string(other);
        store->wait({"caseopt/world/" + them}, remaining());
        auto bytes = store->get("caseopt/world/" + them);
        std::string world(bytes.begin(), bytes.end());
        if (world != std::to_string(size)) {
          throw InvalidGroup("rank " + them + " was started with a world size of " + world +
                             ", this rank (" + me + ") with " + std::to_string(size) +
                             " (WORLD_SIZE differs)");
        }
        int64_t theirs = store->add("caseopt/claims/" + them, 0);
        if (theirs > 1) {
          throw InvalidGroup("rank " + them + " is claimed by " + std::to_string(theirs) +
                             " processes (RANK given twice?)");
        }
      }
    }
    auto device = [&] {
      if (interface != nullptr && interface[0] != '\0') {
        return c10d::ProcessGroupGloo::createDeviceForInterface(std::string(interface));
      }
      if (device_host != nullptr && device_host[0] != '\0') {
        return c10d::ProcessGroupGloo::createDeviceForHostname(std::string(device_host));
      }
      return c10d::ProcessGroupGloo::createDefaultDevice();
    };
    auto join = [&](const c10::intrusive_ptr<c10d::Store>& on) {
      tcp->setTimeout(remaining());
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(remaining());
      gloo_options->devices.push_back(device());
      auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(on, rank, size, gloo_options);
      if (torch_compatible != 0) gloo->setSequenceNumberForGroup();
      // The rendezvous's share of the timeout is spent; collectives get the whole of it.
      gloo->setTimeout(timeout);
      return gloo;
    };
    auto gloo = join(store);
    tcp->setTimeout(timeout);
    auto* group = new Group{store, gloo};
    *out = group;
  });
}

void caseopt_c10d_free(void* group) { delete static_cast<Group*>(group); }

// Sums each tensor (dense, contiguous, CPU) across the group in place.
int32_t caseopt_c10d_all_reduce_sum(void* group, const at::Tensor* const* tensors, size_t n,
                                    char* err, size_t err_capacity) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, err_capacity, [&] {
    run_each(tensors, n, [&](std::vector<at::Tensor>& one) {
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp::SUM;
      return g->gloo->allreduce(one, options);
    });
  });
}

// Overwrites each tensor with rank `root`'s.
int32_t caseopt_c10d_broadcast(void* group, const at::Tensor* const* tensors, size_t n,
                               int32_t root, char* err, size_t err_capacity) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, err_capacity, [&] {
    run_each(tensors, n, [&](std::vector<at::Tensor>& one) {
      c10d::BroadcastOptions options;
      options.rootRank = root;
      options.rootTensor = 0;
      return g->gloo->broadcast(one, options);
    });
  });
}

// `output` (flat, `size` times `input`'s length, same dtype) receives every rank's `input`,
// in rank order.
int32_t caseopt_c10d_all_gather(void* group, const at::Tensor* input, const at::Tensor* output,
                                char* err, size_t err_capacity) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, err_capacity, [&] {
    at::Tensor out = *output;
    at::Tensor in = *input;
    g->gloo->_allgather_base(out, in)->wait();
  });
}

// Copies `n` gradients into the flat bucket `flat` at `offsets` (in elements), or zeroes the
// region where a gradient is absent (null): one call per bucket instead of a libtorch op per
// variable, which on thousands of small tensors cost more than the all-reduce itself.
int32_t caseopt_c10d_pack(const at::Tensor* flat, const at::Tensor* const* grads,
                          const int64_t* offsets, const int64_t* lengths, size_t n, char* err,
                          size_t err_capacity) {
  return guarded(err, err_capacity, [&] {
    const at::Tensor& f = *flat;
    char* base = static_cast<char*>(f.data_ptr());
    size_t elt = f.element_size();
    for (size_t i = 0; i < n; ++i) {
      char* dst = base + offsets[i] * elt;
      size_t bytes = static_cast<size_t>(lengths[i]) * elt;
      if (grads[i] == nullptr) {
        std::memset(dst, 0, bytes);
        continue;
      }
      const at::Tensor& g = *grads[i];
      if (g.is_contiguous() && g.scalar_type() == f.scalar_type() && g.is_cpu()) {
        std::memcpy(dst, g.data_ptr(), bytes);
      } else {
        f.narrow(0, offsets[i], lengths[i]).copy_(g.reshape({-1}));
      }
    }
  });
}

// The reverse of `caseopt_c10d_pack`, dividing by `divisor` on the way (the mean over the
// ranks, as DDP divides by the world size); absent gradients (null) are skipped.
int32_t caseopt_c10d_unpack(const at::Tensor* flat, const at::Tensor* const* grads,
                            const int64_t* offsets, const int64_t* lengths, size_t n,
                            double divisor, char* err, size_t err_capacity) {
  return guarded(err, err_capacity, [&] {
    const at::Tensor& f = *flat;
    for (size_t i = 0; i < n; ++i) {
      if (grads[i] == nullptr) continue;
      at::Tensor g = *grads[i];
      if (g.is_contiguous() && g.scalar_type() == f.scalar_type() && g.is_cpu()) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "unpack", [&] {
          const scalar_t* src = f.data_ptr<scalar_t>() + offsets[i];
          scalar_t* dst = g.data_ptr<scalar_t>();
          using acc_t = at::opmath_type<scalar_t>;
          acc_t d = static_cast<acc_t>(divisor);
          for (int64_t k = 0; k < lengths[i]; ++k) {
            dst[k] = static_cast<scalar_t>(static_cast<acc_t>(src[k]) / d);
          }
        });
      } else {
        g.copy_(f.narrow(0, offsets[i], lengths[i]).div(divisor).view(g.sizes()));
      }
    }
  });
}

}  // extern "C"
