// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the ATen adapters (not by kernels, which stay torch-free).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <sys/mman.h>

#include <cstdint>

#include "tilefuse/attention/params.h"

namespace tilefuse {

/// Compute type of the kernels (and dtype of LSE): double for float64 inputs, float otherwise.
inline at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// Asks for transparent huge pages on the 2 MB-aligned interior of a large, not yet touched
/// buffer. The operand copies are fresh allocations on every call (torch's CPU allocator
/// returns large blocks to the OS), and in this VM a 4 KB page fault costs ~4 us: a 32 MB copy
/// paid ~35 ms of faults for ~5 ms of copying. A no-op where THP is disabled.
inline void advise_huge_pages(const at::Tensor& t) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < 2 * kHuge) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}

/// at::empty with huge pages advised (large scratch and result buffers of the adapters).
inline at::Tensor empty_huge(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  advise_huge_pages(t);
  return t;
}
/// at::zeros with huge pages advised before the zero fill touches the pages.
inline at::Tensor zeros_huge(at::IntArrayRef shape, const at::TensorOptions& opts) {
  return empty_huge(shape, opts).zero_();
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
