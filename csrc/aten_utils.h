// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the ATen adapters (not by kernels, which stay torch-free).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "tilefuse/attention/params.h"

namespace tilefuse {

/// Compute type of the kernels (and dtype of LSE): double for float64 inputs, float otherwise.
inline at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// \brief A ParallelRunner on torch's intra-op thread pool (honours torch.set_num_threads).
inline ParallelRunner aten_runner() {
  ParallelRunner r;
  r.num_threads = at::get_num_threads();
  r.run = [](index_t n, const std::function<void(index_t)>& fn) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(i);
    });
  };
  return r;
}

}  // namespace tilefuse
