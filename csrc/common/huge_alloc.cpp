#include "common/huge_alloc.h"

#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace peftx {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = 2 * kHugePage;
constexpr size_t kPage = 4096;

// huge_page_clone: t's values in a fresh contiguous tensor; on the CPU in empty_huge_pages memory.
at::Tensor huge_page_clone(const at::Tensor& t) {
  if (!t.device().is_cpu()) return t.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = empty_huge_pages(t.sizes(), t.options());
  out.copy_(t);
  return out;
}

}  // namespace

at::Tensor empty_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_huge_pages: options must be for the CPU, got ", options.device());
  const int64_t numel = c10::multiply_integers(shape);
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kMinBytes) {
    const size_t len = (bytes + kPage - 1) / kPage * kPage;
    void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      // Keep the 2 MiB-aligned len bytes of the reservation; give the rest back.
      const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t a = (r + kHugePage - 1) & ~(kHugePage - 1);
      const uintptr_t end = r + len + kHugePage;
      if (a > r) munmap(raw, a - r);
      if (end > a + len) munmap(reinterpret_cast<void*>(a + len), end - (a + len));
      (void)madvise(reinterpret_cast<void*>(a), len, MADV_HUGEPAGE);  // a hint: failure leaves 4 KiB pages
      return at::from_blob(
          reinterpret_cast<void*>(a), shape, [len](void* p) { munmap(p, len); }, options);
    }
  }
#endif
  return at::empty(shape, options);
}

TORCH_LIBRARY_IMPL(peftx, CompositeExplicitAutograd, m) {
  m.impl("huge_page_clone", &huge_page_clone);
}

}  // namespace peftx
