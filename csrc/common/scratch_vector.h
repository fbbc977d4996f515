// Per-thread growable buffers for kernels that need a few KiB to a few MiB of scratch per call
// (no torch headers, so the raw-pointer kernel files use it too).
#pragma once

#include <cstddef>
#include <vector>

namespace peftx {

// The first n elements of a buffer that outlives the call (a thread_local vector: the calling
// thread's, and the OpenMP workers', which persist): grown only when too small, so repeated calls
// neither allocate nor clear it. A fresh buffer of this size per call would be page-faulted in again
// every time, and the calling thread's 16-256 KiB temporaries, allocated between a step's 4 MiB
// tensors, fragmented glibc's heap (see adapter_as in lora_base.h). Callers write what they read.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace peftx
