// A fresh output of several MiB is first touched by the kernel that fills it, and each 4 KiB page
// fault costs microseconds (in a VM, more): a 32 MiB dequantized weight takes ~15 ms of faults for
// ~1 ms of decoding. Asking for transparent huge pages on the output's 2 MiB-aligned interior
// before the first write cuts the fault cost several times where THP is in madvise mode. A hint
// on memory the caller owns: errors are ignored; nothing happens off Linux.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace peftx {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace peftx
