// SPDX-License-Identifier: Apache-2.0
// Schemas of the neighborhood / window attention family, and the index-math debug ops.
// int[] arguments hold one entry per spatial axis (1, 2 or 3). Optional gradients that do not
// exist (no rpb, no pad_kv) are returned as empty tensors of shape [0].
#include <ATen/ATen.h>
#include <torch/library.h>

#include "tilefuse/attention/window.h"

namespace {

/// Window [start, end) of every position of one axis, in the axis' own coordinates (with
/// dilation: the first key and one past the last key of the window, keys step by dilation).
at::Tensor na_window_debug(int64_t length, int64_t kernel, int64_t dilation, int64_t stride,
                           bool causal) {
  TORCH_CHECK_VALUE(length >= 1 && kernel >= 1 && dilation >= 1 && stride >= 1 &&
                        stride <= kernel && kernel * dilation <= length,
                    "_na_window: need length >= kernel_size * dilation, 1 <= stride <= "
                    "kernel_size, got length=", length, " kernel_size=", kernel, " dilation=",
                    dilation, " stride=", stride);
  at::Tensor out = at::empty({length, 2}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t x = 0; x < length; ++x) {
    const int64_t g = x % dilation, i = x / dilation;
    const int64_t L = tilefuse::dilation_group_length(length, dilation, g);
    int64_t s, e;
    tilefuse::na_window(i, L, kernel, stride, causal, s, e);
    o[2 * x] = g + dilation * s;
    o[2 * x + 1] = g + dilation * (e - 1) + 1;
  }
  return out;
}

/// Swin window [start, end) of every position of an axis padded to a multiple of window.
at::Tensor swin_window_debug(int64_t length, int64_t window, int64_t shift) {
  TORCH_CHECK_VALUE(length >= 1 && window >= 1 && shift >= 0 && shift < window,
                    "_swin_window: need length >= 1, window_size >= 1, 0 <= shift_size < "
                    "window_size, got ", length, ", ", window, ", ", shift);
  const int64_t Lp = tilefuse::round_up(length, window);
  at::Tensor out = at::empty({Lp, 2}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t y = 0; y < Lp; ++y) tilefuse::swin_window(y, Lp, window, shift, o[2 * y], o[2 * y + 1]);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tilefuse, m) {
  m.def(
      "na_fwd(Tensor q, Tensor k, Tensor v, Tensor? rpb, int[] kernel_size, int[] dilation, "
      "int[] stride, bool[] is_causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "na_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor? rpb, "
      "Tensor out, Tensor lse, int[] kernel_size, int[] dilation, int[] stride, bool[] is_causal, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rpb)");
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor? k_pad, "
      "Tensor? v_pad, int[] window_size, int[] shift_size, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "window_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor? rpb, Tensor? k_pad, Tensor? v_pad, Tensor out, Tensor lse, int[] window_size, "
      "int[] shift_size, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_rpb, Tensor grad_k_pad, Tensor grad_v_pad)");
  m.def("_na_window(int length, int kernel_size, int dilation, int stride, bool is_causal) -> Tensor",
        &na_window_debug);
  m.def("_swin_window(int length, int window_size, int shift_size) -> Tensor", &swin_window_debug);
}
