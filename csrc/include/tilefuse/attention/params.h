// SPDX-License-Identifier: Apache-2.0
// Parameters of the CPU attention kernels: raw fp32 pointers and strides, no torch.
#pragma once
#include <functional>

#include "tilefuse/common.h"

namespace tilefuse {

/// \brief Runs fn(worker) for worker in [0, n) on a thread pool (the ATen adapter passes
/// at::parallel_for), so the kernels stay torch-free and respect torch's thread settings.
struct ParallelRunner {
  index_t num_threads = 1;
  std::function<void(index_t n, const std::function<void(index_t)>& fn)> run;
};

/// \brief Forward/backward attention over sequences packed along a token axis.
/// Sequence b owns query tokens [cu_q[b], cu_q[b+1]) and key tokens [cu_k[b], cu_k[b+1]).
/// T is the compute type (float; double for checking). Operand buffers are T, head-major, feature dim padded to a multiple of 16 with zeros:
///   q  [H,   Tq, Dp]   pre-multiplied by scale * log2(e) (logits in base 2)
///   kt [Hkv, D,  ldkt] K transposed; columns up to Tk + 16 readable (values there unused)
///   k  [Hkv, Tk, Dp]   (backward only)
///   v  [Hkv, Tk, Dvp]
///   vt [Hkv, Dv, ldvt] (backward only)
/// Head h reads KV head h / (H / Hkv).
template <class T>
struct AttentionParams {
  const T* q = nullptr;
  const T* kt = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const T* vt = nullptr;
  const int64_t* cu_q = nullptr;  // [B + 1]
  const int64_t* cu_k = nullptr;  // [B + 1]
  index_t B = 0, H = 0, Hkv = 0, Tq = 0, Tk = 0;
  index_t D = 0, Dv = 0, Dp = 0, Dvp = 0, ldkt = 0, ldvt = 0;

  // Forward outputs: o [Tq, H, Dv] (token-major, heads-last), lse [Tq, H] natural log.
  T* o = nullptr;
  T* lse = nullptr;

  // Backward inputs/outputs.
  const T* dout = nullptr;   // [H, Tq, Dvp], zero padded
  const T* lse_in = nullptr; // [Tq, H]
  const T* delta = nullptr;  // [Tq, H]: rowsum(dO * O) - dLSE
  T* dq = nullptr;           // [n_kv_chunks, H, Tq, Dp], zero-initialised, in units of q-buffer
  T* dk = nullptr;           // [H, Tk, Dp] per query head (GQA groups reduced by the caller)
  T* dv = nullptr;           // [H, Tk, Dvp]
  index_t n_kv_chunks = 1;       // backward splits each sequence's key tiles into this many chunks
};

}  // namespace tilefuse
