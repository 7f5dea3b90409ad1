// SPDX-License-Identifier: Apache-2.0
// Torch-free interface of the CUDA attention kernels: one parameter struct for every mask
// family and one forward / backward launcher per family. The mask policies and index math are
// the shared headers' (tilefuse/attention/{mask,window,block_sparse}.h); the main loop is
// tilefuse/cuda/attention_loop.cuh. Launchers return nullptr on success or a message naming
// what the device cannot do; launch errors are left for the caller's cudaGetLastError check.
#pragma once
#include <cuda_runtime.h>

#include "tilefuse/attention/block_sparse.h"
#include "tilefuse/attention/mask.h"
#include "tilefuse/attention/window.h"

namespace tilefuse::cuda {

/// Element type of q, k, v, out and grad_out. "Acc" below is double for kF64, float otherwise.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

/// A token-major, heads-last operand: element (token t, head h, channel c) at
/// ptr[t * row + h * head + c] (unit channel stride).
struct CudaOperand {
  const void* ptr = nullptr;
  index_t row = 0, head = 0;
};

/// Attention over B sequences packed along a token axis: sequence b owns query tokens
/// [cu_q[b], cu_q[b+1]) and key tokens [cu_k[b], cu_k[b+1]). Head h reads KV head h / (H / Hkv).
struct CudaAttentionParams {
  DType dtype = DType::kF32;
  CudaOperand q, k, v, dout;
  const void* k_pad = nullptr;  // [Hkv, D]: key of padding positions (window policy; null: 0)
  const void* v_pad = nullptr;  // [Hkv, Dv]
  const int64_t* cu_q = nullptr;  // device memory, [B + 1]
  const int64_t* cu_k = nullptr;
  index_t B = 0, H = 0, Hkv = 0, D = 0, Dv = 0;
  index_t max_sq = 0, max_sk = 0;  // longest sequences (sizes the grid of the 1-D policies)
  double scale = 1;  // softmax scale applied to q . k

  // Forward outputs: o (dtype) [Tq, H, Dv] contiguous; lse (Acc) [Tq, H], natural log.
  void* o = nullptr;
  void* lse = nullptr;

  // Backward: lse_in and delta = rowsum(dO * O) - dLSE (Acc [Tq, H]); dq (Acc [Tq, H, D])
  // accumulated with atomics (zeroed by the caller); dk / dv (Acc [Tk, H, D | Dv]) per query
  // head, written once (GQA groups are summed by the caller); dk_pad / dv_pad (Acc [H, D | Dv],
  // zeroed) collect the gradients of the padding rows.
  const void* lse_in = nullptr;
  const void* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dk_pad = nullptr;
  void* dv_pad = nullptr;
};

/// Bias of the window policy: the canonical [H, R0, R1, R2] table (Acc) indexed by
/// (key - query) + bias_offset per axis, already multiplied by log2(e); dbias (Acc, zeroed)
/// receives its gradient through atomics.
struct CudaWindowBias {
  const void* bias = nullptr;
  void* dbias = nullptr;
  index_t R[3] = {1, 1, 1};
};

// Band masks (dense: left = right = -1; causal: right = 0; sliding windows).
const char* attention_fwd_band(const CudaAttentionParams& p, BandMask::Args m, cudaStream_t s);
const char* attention_bwd_band(const CudaAttentionParams& p, BandMask::Args m, cudaStream_t s);

// Neighborhood attention and Swin windows over B = batch * dilation-group sequences (the
// caller orders tokens by group, row-major inside it, as the CPU adapter does). The tile
// fields of `a` are chosen by the launcher.
const char* window_fwd(const CudaAttentionParams& p, WindowMask::Args a, const CudaWindowBias& x,
                       cudaStream_t s);
const char* window_bwd(const CudaAttentionParams& p, WindowMask::Args a, const CudaWindowBias& x,
                       cudaStream_t s);

// Block-sparse layouts (device memory): kv rows for the forward, the transposed q rows for
// the backward.
const char* block_sparse_fwd(const CudaAttentionParams& p, const BlockSparseArgs& a,
                             cudaStream_t s);
const char* block_sparse_bwd(const CudaAttentionParams& p, const BlockSparseArgs& a,
                             cudaStream_t s);

}  // namespace tilefuse::cuda
