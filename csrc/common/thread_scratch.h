// Per-thread CPU scratch tensors that outlive the call. A fresh tensor of a few MiB per op call came
// from fresh pages whenever glibc had handed the last one back to the OS, and first-touch page faults
// cost about 4 us a page on the VMs we measure; mid-size temporaries allocated between a step's large
// tensors also split glibc's free chunks, so that the large ones came from fresh memory.
#pragma once

#include <ATen/ATen.h>

namespace peftx {

// The slots, one buffer each per thread:
//   0, 1: lora adapter_as (an adapter's copy in the activation dtype, A and B);
//   2, 3: lora's chunked dropout passes (on each worker);
//   4:    nf4_matmul / nf4_matmul_t's decoded tile of W, or nf4_matmul's fp32 slab of x (rows kernel);
//   5:    dense_lora_row_norm's block of W + scale B A (where it runs through BLAS).
constexpr int kScratchSlots = 6;
constexpr int kNf4TileSlot = 4;
constexpr int kDoraNormSlot = 5;

// A contiguous tensor of `sizes` over this thread's buffer `slot` (64-byte aligned), valid until the
// slot's next use on the thread. Uninitialized. The buffer only grows.
at::Tensor thread_scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace peftx
