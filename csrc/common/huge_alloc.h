// Host memory for large, long-lived tensors (the packed NF4 weights). A 4-bit weight is read in
// strided passes (the transposed products walk its rows K / 2 bytes apart) that touch a new 4 KiB
// page at almost every step; once other work has evicted the page-table entries, each touch is a
// page walk. Backing the tensor with 2 MiB pages (transparent huge pages, asked for before the
// first write) removes them. A QLoRA step (4096 x 4096, bf16, after HF PEFT's step in the same
// loop) on the 2-core Zen 5 VM we measure: 1.49-1.53 -> 1.40-1.42 ms at 1 token, 3.25-3.33 ->
// 3.14-3.23 ms at 16; unchanged at 512.
#pragma once

#include <ATen/ATen.h>

namespace peftx {

// An uninitialised contiguous CPU tensor. From 4 MiB up (on Linux) it is a private anonymous
// mapping starting on a 2 MiB boundary, advised MADV_HUGEPAGE before any page is touched, and
// unmapped when the storage dies; smaller tensors (and other systems) come from at::empty. Where
// transparent huge pages are off it is ordinary memory.
at::Tensor empty_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace peftx
