// SPDX-License-Identifier: Apache-2.0
// Helpers of the CUDA ATen adapters (compiled by nvcc only): dtype mapping, operand views,
// launch checks. The kernels themselves stay torch-free (tilefuse/cuda/*.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "tilefuse/cuda/attention.h"

namespace tilefuse {

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::DType::kF16;
    case at::kBFloat16: return cuda::DType::kBF16;
    case at::kDouble: return cuda::DType::kF64;
    default: return cuda::DType::kF32;
  }
}

/// x itself when its last axis has unit stride, else a contiguous copy (the kernels gather
/// rows by token and read channels contiguously; token and head strides are free).
inline at::Tensor unit_channel_stride(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

/// A [T, H, C] tensor with unit channel stride as a kernel operand.
inline cuda::CudaOperand cuda_operand(const at::Tensor& x) {
  return {x.const_data_ptr(), x.stride(0), x.stride(1)};
}

/// Longest segment of host int64 boundaries [B + 1].
inline int64_t longest_segment(const at::Tensor& cu) {
  const int64_t* c = cu.const_data_ptr<int64_t>();
  int64_t m = 0;
  for (int64_t i = 0; i + 1 < cu.size(0); ++i) m = std::max(m, c[i + 1] - c[i]);
  return m;
}

/// A launcher's refusal (what the device cannot do) or a launch error as a torch error.
inline void check_cuda_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tilefuse
