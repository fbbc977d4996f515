#include "common/thread_scratch.h"

#include <c10/util/accumulate.h>

#include <vector>

namespace peftx {
namespace {

struct alignas(64) Line {
  unsigned char bytes[64];
};

}  // namespace

at::Tensor thread_scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(slot >= 0 && slot < kScratchSlots, "thread_scratch: no slot ", slot);
  thread_local std::vector<Line> buf[kScratchSlots];
  auto& b = buf[slot];
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  const size_t lines = (bytes + sizeof(Line) - 1) / sizeof(Line);
  if (b.size() < lines) b.resize(lines);
  return at::from_blob(b.data(), sizes, options);
}

}  // namespace peftx
