// See README.md. Declared (not defined) for ProcessGroupGloo::setTimeout's inline body, which the
// shim never calls.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
