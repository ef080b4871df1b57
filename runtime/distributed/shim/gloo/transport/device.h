// See ../README.md. Opaque: only held through std::shared_ptr / std::unique_ptr.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
