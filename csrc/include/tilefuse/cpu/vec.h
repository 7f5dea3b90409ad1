// SPDX-License-Identifier: Apache-2.0
// 32-byte vectors written with GCC vector extensions: one source that compiles to AVX2+FMA in
// the avx2 tier and to pairs of SSE2 ops in the generic tier. fp32 is the fast path (8 lanes);
// fp64 (4 lanes) exists so that gradcheck can run the same kernels in double. CPU only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tilefuse::cpu {

template <class T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
  static constexpr int W = 8;
};
template <>
struct VecTraits<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8)));
  static constexpr int W = 4;
};
template <class T>
using vec_t = typename VecTraits<T>::type;

template <class T>
static inline vec_t<T> loadv(const T* p) {
  return *reinterpret_cast<const typename VecTraits<T>::unaligned*>(p);
}
/// loadv whose result stays in a register: for a vector that several FMAs read (GCC otherwise
/// folds the load into each FMA's memory operand, one load per use, and a loop of 2 FMAs per
/// loaded vector becomes bound by the loads).
template <class T>
static inline vec_t<T> loadv_once(const T* p) {
  vec_t<T> v = loadv(p);
#if defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}
template <class T>
static inline void storev(T* p, vec_t<T> v) {
  *reinterpret_cast<typename VecTraits<T>::unaligned*>(p) = v;
}
template <class T>
static inline vec_t<T> splatv(T s) {
  return vec_t<T>{} + s;
}
template <class T>
static inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}
template <class T>
static inline T hmax(vec_t<T> v) {
  T m = v[0];
  for (int i = 1; i < VecTraits<T>::W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class T>
static inline T hsum(vec_t<T> v) {
  T s = 0;
  for (int i = 0; i < VecTraits<T>::W; ++i) s += v[i];
  return s;
}
// fp32: three shuffle steps instead of seven lane extractions.
typedef int32_t vec_i32 __attribute__((vector_size(32)));
template <>
inline float hmax<float>(vec_t<float> v) {
  vec_t<float> a = __builtin_shuffle(v, vec_i32{4, 5, 6, 7, 0, 1, 2, 3});
  v = v > a ? v : a;
  a = __builtin_shuffle(v, vec_i32{2, 3, 0, 1, 6, 7, 4, 5});
  v = v > a ? v : a;
  a = __builtin_shuffle(v, vec_i32{1, 0, 3, 2, 5, 4, 7, 6});
  v = v > a ? v : a;
  return v[0];
}
template <>
inline float hsum<float>(vec_t<float> v) {
  v += __builtin_shuffle(v, vec_i32{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, vec_i32{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, vec_i32{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}

/// \brief 2^x for 8 floats, relative error < 2e-7 over the normal range. x < -127 gives
/// exactly 0 (so masked logits of -inf vanish); NaN stays NaN.
static inline vec_t<float> exp2v(vec_t<float> x) {
  using v8f = vec_t<float>;
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8f lo = splatv(-127.f), hi = splatv(127.99f);
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v8f t = xc + magic;
  const v8f n = t - magic;
  const v8f f = xc - n;  // in [-0.5, 0.5]
  // 2^f = e^(f ln2): Taylor to degree 7 (error ~ (0.347)^8 / 8! < 2e-8).
  v8f p = splatv(1.5252733804059840e-05f);
  p = p * f + 1.5403530393381609e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  v8i ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const v8i e = (ti - 0x4B400000 + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const v8f r = p * scale;
  return x < lo ? v8f{} : r;
}

/// \brief 2^x for x <= 0 (softmax numerators: logits minus their row maximum or the LSE):
/// relative error ~1e-7 (degree-6 minimax polynomial on [-1/2, 1/2], one term fewer than
/// exp2v), no upper clamp and no final select: clamping at -127 already gives exactly 0 (the
/// scale's exponent field is then 0), so -inf (masked) and x < -127 map to 0; NaN propagates
/// (maxps returns its second operand when one is NaN). Small positive x (rounding) is fine.
static inline vec_t<float> exp2v_nonpos(vec_t<float> x) {
  using v8f = vec_t<float>;
  typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__AVX__)
  const v8f xc = __builtin_ia32_maxps256(splatv(-127.f), x);
#else
  const v8f lo = splatv(-127.f);
  const v8f xc = x < lo ? lo : x;  // NaN: the comparison is false, x is kept
#endif
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v8f t = xc + magic;
  const v8f f = xc - (t - magic);  // in [-1/2, 1/2]
  v8f p = splatv(1.5337832155637443e-04f);
  p = p * f + 1.3399862218648195e-03f;
  p = p * f + 9.6185188740491867e-03f;
  p = p * f + 5.5503290146589279e-02f;
  p = p * f + 2.4022646248340607e-01f;
  p = p * f + 6.9314718246459961e-01f;
  p = p * f + 1.0f;
  v8i ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const v8i e = (ti - (0x4B400000 - 127)) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

/// \brief 2^x for 4 doubles: libm per lane (the fp64 path is for checking, not speed).
static inline vec_t<double> exp2v(vec_t<double> x) {
  vec_t<double> r;
  for (int i = 0; i < 4; ++i) r[i] = std::exp2(x[i]);
  return r;
}
static inline vec_t<double> exp2v_nonpos(vec_t<double> x) { return exp2v(x); }

}  // namespace tilefuse::cpu
