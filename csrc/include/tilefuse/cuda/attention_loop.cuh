// SPDX-License-Identifier: Apache-2.0
// The CUDA attention main loop: one forward and one backward kernel, templated on the element
// type and on a tile policy that wraps a shared mask policy (BandMask, WindowMask, BlockRows).
//
// Forward: one CTA (4 warps) per (query tile, head, sequence). For each key tile the policy
// lists: gather K/V rows into shared memory, S = Q K^T on tensor cores (wmma 16x16x16,
// fp16/bf16; a SIMT loop for fp32/fp64 so that those stay exact), mask + bias + online softmax
// in base 2 (one warp per row, which also rescales its row of the fp32 O accumulator), then
// O += P V on tensor cores with the accumulator held in shared memory. LSE is saved.
// Backward (FlashAttention-2 order): one CTA per (key tile, head, sequence) holds dK / dV in
// shared memory and visits the query tiles that see its keys: P from the saved LSE, dV += P^T dO,
// dP = dO V^T, dS = P (dP - delta), dK += dS^T Q, dQ += dS K through fp32 atomics.
// Tokens are gathered by index, so the same loop serves contiguous 1-D tiles, spatial boxes
// (neighborhood / Swin) and block-sparse blocks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <limits>
#include <type_traits>

#include "tilefuse/cuda/attention.h"

namespace tilefuse::cuda::detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <class T>
struct Traits;
template <>
struct Traits<float> {
  using Acc = float;
  using P = float;  // type of P / dS in shared memory (GEMM operand)
  static constexpr bool kTensorCore = false;
};
template <>
struct Traits<double> {
  using Acc = double;
  using P = double;
  static constexpr bool kTensorCore = false;
};
template <>
struct Traits<__half> {
  using Acc = float;
  using P = __half;
  static constexpr bool kTensorCore = true;
};
template <>
struct Traits<__nv_bfloat16> {
  using Acc = float;
  using P = __nv_bfloat16;
  static constexpr bool kTensorCore = true;
};

template <class To, class From>
__device__ __forceinline__ To cvt(From x) {
  if constexpr (std::is_same_v<From, __half>) {
    return cvt<To>(__half2float(x));
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return cvt<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }

template <class A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------
// Shared-memory layouts (computed identically by the host launcher and the kernel).

TF_HD size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

struct Layout {
  // Byte offsets of each array and leading dimensions (elements).
  size_t q = 0, k = 0, v = 0, dO = 0, s = 0, dp = 0, p = 0, ds = 0, o = 0, dk = 0, dv = 0;
  size_t row0 = 0, row1 = 0, qtok = 0, ktok = 0, meta = 0, total = 0;
  int ldq = 0, ldk = 0, ldv = 0, lddo = 0, lds = 0, ldp = 0, ldo = 0, lddk = 0, lddv = 0, lddq = 0;
};

/// esz / asz / psz: sizes of the element, accumulator and P types; tc: tensor-core path
/// (16-bit operands padded by 8 elements, fp32 accumulators by 4, wmma's alignment rules);
/// the SIMT path pads by one element against bank conflicts.
TF_HD Layout make_layout(bool backward, int BQ, int BK, int Dp, int Dvp, size_t esz, size_t asz,
                         size_t psz, bool tc, int meta_ints) {
  Layout L;
  const int pe = tc ? 8 : 1, pa = tc ? 4 : 1;
  L.ldq = Dp + pe;
  L.ldk = Dp + pe;
  L.ldv = Dvp + pe;
  L.lddo = Dvp + pe;
  L.lds = BK + pa;
  L.ldp = BK + pe;
  L.ldo = Dvp + pa;
  L.lddk = Dp + pa;
  L.lddv = Dvp + pa;
  L.lddq = Dp + pa;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align128(off + bytes);
    return at;
  };
  L.q = take(size_t(BQ) * L.ldq * esz);
  L.k = take(size_t(BK) * L.ldk * esz);
  L.v = take(size_t(BK) * L.ldv * esz);
  // s holds the logits / P (Acc); in the backward it is reused for the dQ tile.
  const int s_cols = backward && L.lddq > L.lds ? L.lddq : L.lds;
  L.s = take(size_t(BQ) * s_cols * asz);
  L.p = take(size_t(BQ) * L.ldp * psz);
  if (backward) {
    L.dO = take(size_t(BQ) * L.lddo * esz);
    L.dp = take(size_t(BQ) * L.lds * asz);
    L.ds = take(size_t(BQ) * L.ldp * psz);
    L.dk = take(size_t(BK) * L.lddk * asz);
    L.dv = take(size_t(BK) * L.lddv * asz);
  } else {
    L.o = take(size_t(BQ) * L.ldo * asz);
  }
  L.row0 = take(size_t(BQ) * asz);  // forward: running max m; backward: lse (base 2)
  L.row1 = take(size_t(BQ) * asz);  // forward: running sum l; backward: delta
  L.qtok = take(size_t(BQ) * sizeof(int64_t));
  L.ktok = take(size_t(BK) * sizeof(int64_t));
  L.meta = take(size_t(meta_ints > 0 ? meta_ints : 1) * sizeof(int));
  L.total = off;
  return L;
}

// ---------------------------------------------------------------------------------------
// Block-cooperative GEMMs on shared memory: C[M][N] (=|+=) op(A)[M][K] op(B)[K][N].
// A: A[m*lda + k], or A[k*lda + m] when TA. B: B[k*ldb + n], or B[n*ldb + k] when TB.
// M, N, K are multiples of 16.

template <bool TA, bool TB, bool ACCUM, class T>
__device__ void gemm_tc(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M, int N,
                        int K) {
  using namespace nvcuda;
  using LA = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
  using LB = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
  const int warp = threadIdx.x / 32;
  const int tn = N / 16, tiles = (M / 16) * tn;
  for (int f = warp; f < tiles; f += kWarps) {
    const int m0 = (f / tn) * 16, n0 = (f % tn) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if constexpr (ACCUM)
      wmma::load_matrix_sync(acc, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, TA ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
      wmma::load_matrix_sync(b, TB ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
  }
}

template <bool TA, bool TB, bool ACCUM, class T, class A>
__device__ void gemm_simt(const T* Am, int lda, const T* Bm, int ldb, A* C, int ldc, int M, int N,
                          int K) {
  for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
    const int m = idx / N, n = idx % N;
    A acc = ACCUM ? C[m * ldc + n] : A(0);
    for (int k = 0; k < K; ++k)
      acc += A(TA ? Am[k * lda + m] : Am[m * lda + k]) * A(TB ? Bm[n * ldb + k] : Bm[k * ldb + n]);
    C[m * ldc + n] = acc;
  }
}

template <bool TA, bool TB, bool ACCUM, class T, class A>
__device__ __forceinline__ void gemm(const T* Am, int lda, const T* Bm, int ldb, A* C, int ldc,
                                     int M, int N, int K) {
  if constexpr (Traits<T>::kTensorCore)
    gemm_tc<TA, TB, ACCUM>(Am, lda, Bm, ldb, C, ldc, M, N, K);
  else
    gemm_simt<TA, TB, ACCUM>(Am, lda, Bm, ldb, C, ldc, M, N, K);
}

/// dst[r][c] (r < rows_cap, c < cols) = row tok[r] of base (channels < C), the pad row for
/// tok < 0 (zeros when pad is null), zeros for r >= n and c >= C.
template <class T>
__device__ void load_rows(T* dst, int ld, int n, int rows_cap, int cols, int C,
                          const int64_t* tok, const T* base, index_t row_stride, const T* pad) {
  const T zero = cvt<T>(0.0f);
  for (int idx = threadIdx.x; idx < rows_cap * cols; idx += kThreads) {
    const int r = idx / cols, c = idx % cols;
    T val = zero;
    if (r < n && c < C) {
      const int64_t t = tok[r];
      if (t >= 0)
        val = base[t * row_stride + c];
      else if (pad)
        val = pad[c];
    }
    dst[r * ld + c] = val;
  }
}

// ---------------------------------------------------------------------------------------
// Tile policies. Each one is copied into every thread, bound to one sequence by init(), and
// then enumerates either the key tiles of one query tile (forward) or the query tiles of one
// key tile (backward); every thread of the CTA computes the same enumeration. After a
// *_tile() call, qm / kn are the tile's query / key counts, q_token / k_token map a row of
// the tile to a sequence-local token (-1: a padding key), allowed() is the element test of a
// partial tile (after load_*_meta), and bias() the additive base-2 bias.

/// Band masks over contiguous 1-D tiles (BandMask of tilefuse/attention/mask.h).
struct BandTiles {
  BandMask::Args args{-1, -1};
  static constexpr bool kBias = false;
  BandMask m{};
  int BQ = 0, BK = 0, qm = 0, kn = 0;
  index_t q0 = 0, k0 = 0, lo = 0, hi = 0;

  __host__ __device__ static int meta_ints(int, int) { return 0; }
  __device__ void init(index_t, index_t, index_t Sq, index_t Sk, int bq, int bk) {
    m = BandMask::make(args, Sq, Sk);
    BQ = bq;
    BK = bk;
  }
  __device__ bool fwd_begin(index_t t) {
    q0 = t * BQ;
    if (q0 >= m.Sq) return false;
    qm = static_cast<int>(imin(BQ, m.Sq - q0));
    m.key_range(q0, q0 + qm, lo, hi);
    return true;
  }
  __device__ index_t fwd_tiles() const { return hi > lo ? ceil_div(hi - lo, BK) : 0; }
  __device__ int fwd_tile(index_t n) {
    k0 = lo + n * BK;
    kn = static_cast<int>(imin(BK, hi - k0));
    return m.tile(q0, q0 + qm, k0, k0 + kn);
  }
  __device__ bool bwd_begin(index_t t) {
    k0 = t * BK;
    if (k0 >= m.Sk) return false;
    kn = static_cast<int>(imin(BK, m.Sk - k0));
    m.query_range(k0, k0 + kn, lo, hi);
    return true;
  }
  __device__ index_t bwd_tiles() const { return hi > lo ? ceil_div(hi - lo, BQ) : 0; }
  __device__ int bwd_tile(index_t n) {
    q0 = lo + n * BQ;
    qm = static_cast<int>(imin(BQ, hi - q0));
    return m.tile(q0, q0 + qm, k0, k0 + kn);
  }
  __device__ index_t q_token(int r) const { return q0 + r; }
  __device__ index_t k_token(int c) const { return k0 + c; }
  __device__ void load_query_meta(int*) const {}
  __device__ void load_key_meta(int*) const {}
  __device__ bool allowed(int r, int c, const int*) const { return m.allowed(q0 + r, k0 + c); }
  template <class A>
  __device__ A bias(index_t, int, int, const int*) const {
    return A(0);
  }
};

/// Neighborhood / Swin windows over spatial boxes (WindowMask of tilefuse/attention/window.h).
/// Meta: per query row its coordinates and window [lo, hi) per axis (9 ints), per key row its
/// coordinates (3 ints).
struct WindowTiles {
  WindowMask::Args args{};
  const void* bias_table = nullptr;  // Acc [H, R0 R1 R2] (times log2 e) or null
  index_t R[3] = {1, 1, 1};
  static constexpr bool kBias = true;
  WindowMask m{};
  Box qb{}, kb{};
  BoxSplit split{};
  bool any = false;
  int BQ = 0, BK = 0, qm = 0, kn = 0;

  __host__ __device__ static int meta_ints(int bq, int bk) { return 9 * bq + 3 * bk; }
  __device__ void init(index_t b, index_t, index_t, index_t, int bq, int bk) {
    m = WindowMask::make(args, b);
    BQ = bq;
    BK = bk;
  }
  __device__ static void coords(const Box& box, int r, index_t* x) {
    const index_t e2 = box.extent(2), e1 = box.extent(1);
    x[2] = box.lo[2] + r % e2;
    x[1] = box.lo[1] + (r / e2) % e1;
    x[0] = box.lo[0] + r / (e2 * e1);
  }
  __device__ bool fwd_begin(index_t t) {
    if (t >= m.num_query_tiles()) return false;
    qb = m.query_tile(t);
    qm = static_cast<int>(qb.size());
    split = BoxSplit::make(m.key_union(qb), BK);
    return true;
  }
  __device__ index_t fwd_tiles() const { return split.count(); }
  __device__ int fwd_tile(index_t n) {
    kb = split.piece(n);
    kn = static_cast<int>(kb.size());
    return m.tile(qb, kb);
  }
  __device__ bool bwd_begin(index_t t) {
    if (t >= m.num_key_tiles()) return false;
    kb = m.key_tile(t);
    kn = static_cast<int>(kb.size());
    Box u;
    any = m.query_union(kb, u);
    if (any) split = BoxSplit::make(u, BQ);
    return true;
  }
  __device__ index_t bwd_tiles() const { return any ? split.count() : 0; }
  __device__ int bwd_tile(index_t n) {
    qb = split.piece(n);
    qm = static_cast<int>(qb.size());
    return m.tile(qb, kb);
  }
  __device__ index_t q_token(int r) const {
    index_t x[3];
    coords(qb, r, x);
    return m.token(x[0], x[1], x[2]);
  }
  __device__ index_t k_token(int c) const {
    index_t y[3];
    coords(kb, c, y);
    return m.token(y[0], y[1], y[2]);
  }
  __device__ void load_query_meta(int* meta) const {
    for (int r = threadIdx.x; r < qm; r += kThreads) {
      index_t x[3];
      coords(qb, r, x);
      int* mr = meta + 9 * r;
      for (int ax = 0; ax < 3; ++ax) {
        index_t lo, hi;
        m.window(ax, x[ax], lo, hi);
        mr[ax] = static_cast<int>(x[ax]);
        mr[3 + ax] = static_cast<int>(lo);
        mr[6 + ax] = static_cast<int>(hi);
      }
    }
  }
  __device__ void load_key_meta(int* meta) const {
    int* km = meta + 9 * BQ;
    for (int c = threadIdx.x; c < kn; c += kThreads) {
      index_t y[3];
      coords(kb, c, y);
      for (int ax = 0; ax < 3; ++ax) km[3 * c + ax] = static_cast<int>(y[ax]);
    }
  }
  __device__ bool allowed(int r, int c, const int* meta) const {
    const int* mr = meta + 9 * r;
    const int* y = meta + 9 * BQ + 3 * c;
    for (int ax = 0; ax < 3; ++ax)
      if (y[ax] < mr[3 + ax] || y[ax] >= mr[6 + ax]) return false;
    return true;
  }
  __device__ index_t bias_index(int r, int c, const int* meta) const {
    const int* x = meta + 9 * r;
    const int* y = meta + 9 * BQ + 3 * c;
    return ((y[0] - x[0] + m.bias_offset(0)) * R[1] + (y[1] - x[1] + m.bias_offset(1))) * R[2] +
           (y[2] - x[2] + m.bias_offset(2));
  }
  template <class A>
  __device__ A bias(index_t h, int r, int c, const int* meta) const {
    if (!bias_table) return A(0);
    return static_cast<const A*>(bias_table)[h * R[0] * R[1] * R[2] + bias_index(r, c, meta)];
  }
};

/// Block-sparse layouts (BlockRows of tilefuse/attention/block_sparse.h). Layout blocks larger
/// than the CTA tile are visited in several sub-tiles; causal adds the bottom-right band.
struct BlockSparseTiles {
  BlockSparseArgs args{};
  static constexpr bool kBias = false;
  BandMask causal{};
  index_t b = 0, h = 0, row = 0, sub = 0, nsub_q = 1, nsub_k = 1, q0 = 0, k0 = 0;
  int BQ = 0, BK = 0, qm = 0, kn = 0;

  __host__ __device__ static int meta_ints(int, int) { return 0; }
  __device__ void init(index_t b_, index_t h_, index_t Sq, index_t Sk, int bq, int bk) {
    b = b_;
    h = h_;
    causal = BandMask::make(BandMask::Args{-1, 0}, Sq, Sk);
    BQ = bq;
    BK = bk;
    nsub_q = ceil_div(args.bq, BQ);
    nsub_k = ceil_div(args.bk, BK);
  }
  __device__ int state() const {
    if (qm <= 0 || kn <= 0) return kTileSkip;
    return args.causal ? causal.tile(q0, q0 + qm, k0, k0 + kn) : kTileFull;
  }
  // Rows [i*bq, (i+1)*bq) of a block, sub-tile s of BQ rows, cut at the sequence end.
  __device__ void query_part(index_t i, index_t s) {
    q0 = i * args.bq + s * BQ;
    qm = static_cast<int>(imax(0, imin(imin(BQ, (i + 1) * args.bq - q0), causal.Sq - q0)));
  }
  __device__ void key_part(index_t j, index_t s) {
    k0 = j * args.bk + s * BK;
    kn = static_cast<int>(imax(0, imin(imin(BK, (j + 1) * args.bk - k0), causal.Sk - k0)));
  }
  __device__ bool fwd_begin(index_t t) {
    row = t / nsub_q;
    if (row >= args.kv.n_rows) return false;
    query_part(row, t % nsub_q);
    return qm > 0;
  }
  __device__ index_t fwd_tiles() const { return args.kv.count(b, h, row) * nsub_k; }
  __device__ int fwd_tile(index_t n) {
    key_part(args.kv.at(b, h, row, n / nsub_k), n % nsub_k);
    return state();
  }
  __device__ bool bwd_begin(index_t t) {
    row = t / nsub_k;
    if (row >= args.q.n_rows) return false;
    key_part(row, t % nsub_k);
    return kn > 0;
  }
  __device__ index_t bwd_tiles() const { return args.q.count(b, h, row) * nsub_q; }
  __device__ int bwd_tile(index_t n) {
    query_part(args.q.at(b, h, row, n / nsub_q), n % nsub_q);
    return state();
  }
  __device__ index_t q_token(int r) const { return q0 + r; }
  __device__ index_t k_token(int c) const { return k0 + c; }
  __device__ void load_query_meta(int*) const {}
  __device__ void load_key_meta(int*) const {}
  __device__ bool allowed(int r, int c, const int*) const {
    return !args.causal || causal.allowed(q0 + r, k0 + c);
  }
  template <class A>
  __device__ A bias(index_t, int, int, const int*) const {
    return A(0);
  }
};

// ---------------------------------------------------------------------------------------
// Kernels.

struct Tiles {
  int BQ, BK;
};

template <class T, class Policy>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_kernel(const CudaAttentionParams p, const Policy pol0, const Tiles tl) {
  using Acc = typename Traits<T>::Acc;
  using PT = typename Traits<T>::P;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BQ = tl.BQ, BK = tl.BK;
  const index_t h = blockIdx.y, b = blockIdx.z;
  const index_t cq = p.cu_q[b], ck = p.cu_k[b];
  Policy pol = pol0;
  pol.init(b, h, p.cu_q[b + 1] - cq, p.cu_k[b + 1] - ck, BQ, BK);
  if (!pol.fwd_begin(blockIdx.x)) return;  // uniform over the CTA
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int Dp = (D + 15) / 16 * 16, Dvp = (Dv + 15) / 16 * 16;
  const Layout L = make_layout(false, BQ, BK, Dp, Dvp, sizeof(T), sizeof(Acc), sizeof(PT),
                               Traits<T>::kTensorCore, Policy::meta_ints(BQ, BK));
  T* sQ = reinterpret_cast<T*>(smem + L.q);
  T* sK = reinterpret_cast<T*>(smem + L.k);
  T* sV = reinterpret_cast<T*>(smem + L.v);
  Acc* sS = reinterpret_cast<Acc*>(smem + L.s);
  PT* sP = reinterpret_cast<PT*>(smem + L.p);
  Acc* sO = reinterpret_cast<Acc*>(smem + L.o);
  Acc* sM = reinterpret_cast<Acc*>(smem + L.row0);
  Acc* sL = reinterpret_cast<Acc*>(smem + L.row1);
  int64_t* qtok = reinterpret_cast<int64_t*>(smem + L.qtok);
  int64_t* ktok = reinterpret_cast<int64_t*>(smem + L.ktok);
  int* meta = reinterpret_cast<int*>(smem + L.meta);

  const int qm = pol.qm;
  const index_t hk = h / (p.H / p.Hkv);
  for (int r = tid; r < BQ; r += kThreads) {
    qtok[r] = r < qm ? cq + pol.q_token(r) : -1;
    sM[r] = neg_inf<Acc>();
    sL[r] = Acc(0);
  }
  for (int i = tid; i < BQ * Dvp; i += kThreads) sO[(i / Dvp) * L.ldo + i % Dvp] = Acc(0);
  pol.load_query_meta(meta);
  __syncthreads();
  load_rows(sQ, L.ldq, qm, BQ, Dp, D, qtok, static_cast<const T*>(p.q.ptr) + h * p.q.head,
            p.q.row, static_cast<const T*>(nullptr));

  const Acc scale2 = static_cast<Acc>(p.scale * kLog2ed);
  const T* kbase = static_cast<const T*>(p.k.ptr) + hk * p.k.head;
  const T* vbase = static_cast<const T*>(p.v.ptr) + hk * p.v.head;
  const T* kpad = p.k_pad ? static_cast<const T*>(p.k_pad) + hk * D : nullptr;
  const T* vpad = p.v_pad ? static_cast<const T*>(p.v_pad) + hk * Dv : nullptr;
  const index_t nt = pol.fwd_tiles();
  for (index_t n = 0; n < nt; ++n) {
    const int state = pol.fwd_tile(n);
    const int kn = pol.kn;
    if (state == kTileSkip || kn <= 0) continue;  // uniform over the CTA
    __syncthreads();  // the previous tile's readers of sK / sV / ktok / meta are done
    for (int c = tid; c < BK; c += kThreads) {
      const index_t t = c < kn ? pol.k_token(c) : -1;
      ktok[c] = t >= 0 ? ck + t : -1;
    }
    pol.load_key_meta(meta);
    __syncthreads();
    load_rows(sK, L.ldk, kn, BK, Dp, D, ktok, kbase, p.k.row, kpad);
    load_rows(sV, L.ldv, kn, BK, Dvp, Dv, ktok, vbase, p.v.row, vpad);
    __syncthreads();
    gemm<false, true, false>(sQ, L.ldq, sK, L.ldk, sS, L.lds, BQ, BK, Dp);
    __syncthreads();
    const bool partial = state == kTilePartial;
    for (int r = warp; r < BQ; r += kWarps) {
      Acc* srow = sS + r * L.lds;
      Acc mx = neg_inf<Acc>();
      if (r < qm) {
        for (int c = lane; c < BK; c += 32) {
          Acc x = neg_inf<Acc>();
          if (c < kn && (!partial || pol.allowed(r, c, meta)))
            x = srow[c] * scale2 + pol.template bias<Acc>(h, r, c, meta);
          srow[c] = x;
          mx = fmax(mx, x);
        }
      }
      mx = warp_max(mx);
      const Acc m_old = sM[r];
      const Acc m_new = fmax(m_old, mx);
      Acc sum = Acc(0);
      for (int c = lane; c < BK; c += 32) {
        const Acc pv = (r < qm && m_new != neg_inf<Acc>()) ? ex2(srow[c] - m_new) : Acc(0);
        sP[r * L.ldp + c] = cvt<PT>(pv);
        sum += pv;
      }
      sum = warp_sum(sum);
      const Acc alpha = m_new == neg_inf<Acc>() ? Acc(1) : ex2(m_old - m_new);
      for (int c = lane; c < Dvp; c += 32) sO[r * L.ldo + c] *= alpha;
      __syncwarp();
      if (lane == 0) {
        sM[r] = m_new;
        sL[r] = sL[r] * alpha + sum;
      }
    }
    __syncthreads();
    gemm<false, false, true>(sP, L.ldp, sV, L.ldv, sO, L.ldo, BQ, Dvp, BK);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.o);
  for (int i = tid; i < qm * Dv; i += kThreads) {
    const int r = i / Dv, c = i % Dv;
    const Acc l = sL[r];
    out[qtok[r] * p.H * Dv + h * Dv + c] = cvt<T>(l > Acc(0) ? sO[r * L.ldo + c] / l : Acc(0));
  }
  Acc* lse = static_cast<Acc*>(p.lse);
  for (int r = tid; r < qm; r += kThreads) {
    const Acc l = sL[r];
    lse[qtok[r] * p.H + h] =
        l > Acc(0) ? (sM[r] + lg2(l)) * static_cast<Acc>(kLn2d) : neg_inf<Acc>();
  }
}

template <class T, class Policy>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_kernel(const CudaAttentionParams p, const Policy pol0, const Tiles tl,
                         void* dbias) {
  using Acc = typename Traits<T>::Acc;
  using PT = typename Traits<T>::P;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BQ = tl.BQ, BK = tl.BK;
  const index_t h = blockIdx.y, b = blockIdx.z;
  const index_t cq = p.cu_q[b], ck = p.cu_k[b];
  Policy pol = pol0;
  pol.init(b, h, p.cu_q[b + 1] - cq, p.cu_k[b + 1] - ck, BQ, BK);
  if (!pol.bwd_begin(blockIdx.x)) return;  // uniform over the CTA
  const int tid = threadIdx.x;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int Dp = (D + 15) / 16 * 16, Dvp = (Dv + 15) / 16 * 16;
  const Layout L = make_layout(true, BQ, BK, Dp, Dvp, sizeof(T), sizeof(Acc), sizeof(PT),
                               Traits<T>::kTensorCore, Policy::meta_ints(BQ, BK));
  T* sQ = reinterpret_cast<T*>(smem + L.q);
  T* sK = reinterpret_cast<T*>(smem + L.k);
  T* sV = reinterpret_cast<T*>(smem + L.v);
  T* sdO = reinterpret_cast<T*>(smem + L.dO);
  Acc* sS = reinterpret_cast<Acc*>(smem + L.s);
  Acc* sdQ = sS;  // the dQ tile reuses the logits buffer (sized for both)
  Acc* sdP = reinterpret_cast<Acc*>(smem + L.dp);
  PT* sP = reinterpret_cast<PT*>(smem + L.p);
  PT* sdS = reinterpret_cast<PT*>(smem + L.ds);
  Acc* sdK = reinterpret_cast<Acc*>(smem + L.dk);
  Acc* sdV = reinterpret_cast<Acc*>(smem + L.dv);
  Acc* sLse = reinterpret_cast<Acc*>(smem + L.row0);
  Acc* sDelta = reinterpret_cast<Acc*>(smem + L.row1);
  int64_t* qtok = reinterpret_cast<int64_t*>(smem + L.qtok);
  int64_t* ktok = reinterpret_cast<int64_t*>(smem + L.ktok);
  int* meta = reinterpret_cast<int*>(smem + L.meta);

  const int kn = pol.kn;
  const index_t hk = h / (p.H / p.Hkv);
  const index_t H = p.H;
  for (int c = tid; c < BK; c += kThreads) {
    const index_t t = c < kn ? pol.k_token(c) : -1;
    ktok[c] = t >= 0 ? ck + t : -1;
  }
  for (int i = tid; i < BK * Dp; i += kThreads) sdK[(i / Dp) * L.lddk + i % Dp] = Acc(0);
  for (int i = tid; i < BK * Dvp; i += kThreads) sdV[(i / Dvp) * L.lddv + i % Dvp] = Acc(0);
  pol.load_key_meta(meta);
  __syncthreads();
  load_rows(sK, L.ldk, kn, BK, Dp, D, ktok, static_cast<const T*>(p.k.ptr) + hk * p.k.head,
            p.k.row, p.k_pad ? static_cast<const T*>(p.k_pad) + hk * D : nullptr);
  load_rows(sV, L.ldv, kn, BK, Dvp, Dv, ktok, static_cast<const T*>(p.v.ptr) + hk * p.v.head,
            p.v.row, p.v_pad ? static_cast<const T*>(p.v_pad) + hk * Dv : nullptr);

  const Acc scale2 = static_cast<Acc>(p.scale * kLog2ed);
  const Acc* lse_in = static_cast<const Acc*>(p.lse_in);
  const Acc* delta = static_cast<const Acc*>(p.delta);
  Acc* dq = static_cast<Acc*>(p.dq);
  index_t rp = 1;  // entries per head of the bias table
  if constexpr (Policy::kBias) rp = pol.R[0] * pol.R[1] * pol.R[2];
  const index_t nt = pol.bwd_tiles();
  for (index_t n = 0; n < nt; ++n) {
    const int state = pol.bwd_tile(n);
    const int qm = pol.qm;
    if (state == kTileSkip || qm <= 0) continue;  // uniform over the CTA
    __syncthreads();  // the previous tile's readers of qtok / meta / sQ / sdO / sdQ are done
    for (int r = tid; r < BQ; r += kThreads) qtok[r] = r < qm ? cq + pol.q_token(r) : -1;
    pol.load_query_meta(meta);
    __syncthreads();
    load_rows(sQ, L.ldq, qm, BQ, Dp, D, qtok, static_cast<const T*>(p.q.ptr) + h * p.q.head,
              p.q.row, static_cast<const T*>(nullptr));
    load_rows(sdO, L.lddo, qm, BQ, Dvp, Dv, qtok,
              static_cast<const T*>(p.dout.ptr) + h * p.dout.head, p.dout.row,
              static_cast<const T*>(nullptr));
    for (int r = tid; r < BQ; r += kThreads) {
      sLse[r] = r < qm ? lse_in[qtok[r] * H + h] * static_cast<Acc>(kLog2ed) : neg_inf<Acc>();
      sDelta[r] = r < qm ? delta[qtok[r] * H + h] : Acc(0);
    }
    __syncthreads();
    gemm<false, true, false>(sQ, L.ldq, sK, L.ldk, sS, L.lds, BQ, BK, Dp);
    __syncthreads();
    const bool partial = state == kTilePartial;
    for (int i = tid; i < BQ * BK; i += kThreads) {
      const int r = i / BK, c = i % BK;
      Acc pv = Acc(0);
      const Acc lse2 = sLse[r];
      if (r < qm && c < kn && lse2 != neg_inf<Acc>() && (!partial || pol.allowed(r, c, meta)))
        pv = ex2(sS[r * L.lds + c] * scale2 + pol.template bias<Acc>(h, r, c, meta) - lse2);
      sS[r * L.lds + c] = pv;
      sP[r * L.ldp + c] = cvt<PT>(pv);
    }
    __syncthreads();
    gemm<true, false, true>(sP, L.ldp, sdO, L.lddo, sdV, L.lddv, BK, Dvp, BQ);   // dV += P^T dO
    gemm<false, true, false>(sdO, L.lddo, sV, L.ldv, sdP, L.lds, BQ, BK, Dvp);  // dP = dO V^T
    __syncthreads();
    for (int i = tid; i < BQ * BK; i += kThreads) {
      const int r = i / BK, c = i % BK;
      const Acc ds = sS[r * L.lds + c] * (sdP[r * L.lds + c] - sDelta[r]);
      sdS[r * L.ldp + c] = cvt<PT>(ds);
      if constexpr (Policy::kBias) {
        if (dbias && r < qm && c < kn && (!partial || pol.allowed(r, c, meta)))
          atomicAdd(static_cast<Acc*>(dbias) + h * rp + pol.bias_index(r, c, meta), ds);
      }
    }
    __syncthreads();
    gemm<true, false, true>(sdS, L.ldp, sQ, L.ldq, sdK, L.lddk, BK, Dp, BQ);    // dK += dS^T Q
    gemm<false, false, false>(sdS, L.ldp, sK, L.ldk, sdQ, L.lddq, BQ, Dp, BK);  // dQ = dS K
    __syncthreads();
    const Acc sc = static_cast<Acc>(p.scale);
    for (int i = tid; i < qm * D; i += kThreads) {
      const int r = i / D, c = i % D;
      atomicAdd(dq + qtok[r] * H * D + h * D + c, sdQ[r * L.lddq + c] * sc);
    }
  }
  __syncthreads();
  const Acc sc = static_cast<Acc>(p.scale);
  Acc* dk = static_cast<Acc*>(p.dk);
  Acc* dv = static_cast<Acc*>(p.dv);
  for (int i = tid; i < kn * D; i += kThreads) {
    const int c = i / D, d = i % D;
    const Acc g = sdK[c * L.lddk + d] * sc;
    if (ktok[c] >= 0)
      dk[ktok[c] * H * D + h * D + d] = g;
    else if (p.dk_pad)
      atomicAdd(static_cast<Acc*>(p.dk_pad) + h * D + d, g);
  }
  for (int i = tid; i < kn * Dv; i += kThreads) {
    const int c = i / Dv, d = i % Dv;
    const Acc g = sdV[c * L.lddv + d];
    if (ktok[c] >= 0)
      dv[ktok[c] * H * Dv + h * Dv + d] = g;
    else if (p.dv_pad)
      atomicAdd(static_cast<Acc*>(p.dv_pad) + h * Dv + d, g);
  }
}

// ---------------------------------------------------------------------------------------
// Host side: tile sizes that fit the device's shared memory, then the launch.

template <class T, class Policy>
const char* pick_tiles(const CudaAttentionParams& p, bool backward, Tiles& tl, size_t& bytes) {
  using Acc = typename Traits<T>::Acc;
  using PT = typename Traits<T>::P;
  int dev = 0, limit = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "could not query the device's shared memory size";
  const int Dp = static_cast<int>(round_up(p.D, 16)), Dvp = static_cast<int>(round_up(p.Dv, 16));
  static const Tiles candidates[] = {{64, 64}, {64, 32}, {32, 32}, {32, 16}, {16, 16}};
  for (const Tiles& c : candidates) {
    const Layout L = make_layout(backward, c.BQ, c.BK, Dp, Dvp, sizeof(T), sizeof(Acc),
                                 sizeof(PT), Traits<T>::kTensorCore,
                                 Policy::meta_ints(c.BQ, c.BK));
    if (L.total <= static_cast<size_t>(limit)) {
      tl = c;
      bytes = L.total;
      return nullptr;
    }
  }
  return "head_dim too large for this device's shared memory";
}

template <class T, class Policy>
const char* launch(const CudaAttentionParams& p, const Policy& pol, bool backward, Tiles tl,
                   size_t bytes, index_t grid_x, void* dbias, cudaStream_t s) {
  if (grid_x <= 0 || p.B <= 0 || p.H <= 0) return nullptr;
  if (p.B > 65535 || p.H > 65535 || grid_x > 0x7fffffff)
    return "too many sequences or heads for one launch (limit 65535 each)";
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  if (backward) {
    auto* k = attention_bwd_kernel<T, Policy>;
    if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) != cudaSuccess)
      return "could not reserve shared memory for the attention backward kernel";
    k<<<grid, kThreads, bytes, s>>>(p, pol, tl, dbias);
  } else {
    auto* k = attention_fwd_kernel<T, Policy>;
    if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) != cudaSuccess)
      return "could not reserve shared memory for the attention forward kernel";
    k<<<grid, kThreads, bytes, s>>>(p, pol, tl);
  }
  return nullptr;
}

/// Calls fn(T{}) with the element type of p.dtype.
template <class Fn>
const char* with_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::kF16: return fn(__half{});
    case DType::kBF16: return fn(__nv_bfloat16{});
    case DType::kF64: return fn(double{});
    default: return fn(float{});
  }
}

}  // namespace tilefuse::cuda::detail
