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

/// \brief A strided [heads, tokens, C] view: element (h, t, c) at ptr[h*head_stride +
/// t*row_stride + c]. Used as a GEMM B operand it must have 16-padded readable columns.
template <class T>
struct Operand {
  const T* ptr = nullptr;
  index_t row_stride = 0, head_stride = 0;
  const T* at(index_t h, index_t t) const { return ptr + h * head_stride + t * row_stride; }
};

/// \brief Forward/backward attention over sequences packed along a token axis.
/// Sequence b owns query tokens [cu_q[b], cu_q[b+1]) and key tokens [cu_k[b], cu_k[b+1]).
/// T is the compute type (float; double for checking). Head h reads KV head h / (H / Hkv).
/// Feature dims D and Dv are padded to Dp, Dvp (multiples of 16) where an operand is a GEMM
/// B operand: k, q and dout in the backward, v in the forward; padding columns hold zeros.
template <class T>
struct AttentionParams {
  Operand<T> q;     // [H, Tq, D(p)]
  Operand<T> k;     // [Hkv, Tk, D(p)]
  Operand<T> v;     // [Hkv, Tk, Dvp] (forward), or panel-major when v_ps > 0
  index_t v_ps = 0;  // v panel-major: [Hkv][Dvp / 16][Tk][16], row_stride 16, panel stride v_ps
  Operand<T> dout;  // [H, Tq, Dvp] (backward)
  const T* kt = nullptr;  // [Hkv, D, ldkt]: K transposed, columns up to Tk + 16 readable
  const T* vt = nullptr;  // [Hkv, Dv, ldvt]: V transposed (backward)
  const int64_t* cu_q = nullptr;  // [B + 1]
  const int64_t* cu_k = nullptr;  // [B + 1]
  index_t B = 0, H = 0, Hkv = 0, Tq = 0, Tk = 0;
  index_t D = 0, Dv = 0, Dp = 0, Dvp = 0, ldkt = 0, ldvt = 0;
  T scale = 1;  // softmax scale applied to q . k

  // Forward outputs: o [Tq, H, Dv] (token-major, heads-last), lse [Tq, H] natural log.
  T* o = nullptr;
  T* lse = nullptr;

  // Backward inputs/outputs.
  const T* lse_in = nullptr;  // [Tq, H]
  const T* delta = nullptr;   // [Tq, H]: rowsum(dO * O) - dLSE
  T* dq = nullptr;            // [n_kv_chunks, H, Tq, Dp], zero-initialised; dQ / scale
  T* dk = nullptr;            // [H, Tk, Dp] per query head (GQA groups reduced by the caller)
  T* dv = nullptr;            // [H, Tk, Dvp]
  index_t n_kv_chunks = 1;    // backward splits each sequence's key tiles into this many chunks
  // dq, dk, dv are the caller's token-major outputs [T, H, D | Dv] instead of the buffers
  // above: dQ accumulated into dq and scaled in the kernel, dK (scaled) and dV stored. Saves
  // the buffers' allocation, zero fill and the copies back. Requires H == Hkv and
  // n_kv_chunks == 1; the dense / band backward also Dp == D and Dvp == Dv and a zeroed dq
  // (the window backward zeroes the dq rows of each item itself and takes any D).
  bool grads_token_major = false;
};

}  // namespace tilefuse

namespace tilefuse {

/// \brief Extra operands of the window (neighborhood / Swin) policy. The bias table is the
/// canonical [H, R0, R1, R2] layout indexed by (key - query) + (R - 1) / 2 per axis, already
/// multiplied by log2(e) (the loop works with base-2 logits). Per-item partial gradients are
/// indexed by the backward work item (head, sequence, chunk) and summed by the caller, so
/// the bias and padding gradients are deterministic without atomics.
template <class T>
struct WindowExtras {
  const T* bias = nullptr;  // [H, R0, R1, R2] or null
  index_t R[3] = {1, 1, 1};
  const T* k_pad = nullptr;  // [Hkv, D]: key of Swin padding positions (null: zeros)
  const T* v_pad = nullptr;  // [Hkv, Dv]
  T* dbias = nullptr;        // [items, R0 R1 R2]
  T* dk_pad = nullptr;       // [items, D]
  T* dv_pad = nullptr;       // [items, Dv]
};

}  // namespace tilefuse
