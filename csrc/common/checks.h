// Argument checks shared by the CPU and CUDA registrations. Messages name the op and the argument.
#pragma once

#include <ATen/ATen.h>

#define PEFTX_CHECK_DTYPE_FLOAT(op, name, t)                                                  \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||           \
                  (t).scalar_type() == at::kBFloat16,                                        \
              op, ": ", name, " must be float32, float16 or bfloat16, got ", (t).scalar_type())

#define PEFTX_CHECK_DTYPE(op, name, t, dtype) \
  TORCH_CHECK((t).scalar_type() == (dtype), op, ": ", name, " must be ", dtype, ", got ", (t).scalar_type())

#define PEFTX_CHECK_SAME_DEVICE(op, name, t, ref)                                              \
  TORCH_CHECK((t).device() == (ref).device(), op, ": ", name, " must be on ", (ref).device(),    \
              " like the other arguments, got ", (t).device())

namespace peftx {

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

}  // namespace peftx
