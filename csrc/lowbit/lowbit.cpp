// SPDX-License-Identifier: Apache-2.0
// Schemas of the low-bit GEMM family. 4-bit weights travel as bitsandbytes-layout tensors plus
// their quantisation state spelled out (fmt, block sizes, absmax or its double-quantised form,
// int4 zero points), so that the ops stay plain-tensor and torch.compile-friendly; the Python
// QuantState bundles them.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tilefuse, m) {
  m.def("quantize_int8(Tensor w) -> (Tensor qweight, Tensor scale)");
  m.def(
      "int8_linear(Tensor x, Tensor qweight, Tensor weight_scale, Tensor? bias, float threshold) "
      "-> Tensor");
  m.def(
      "quantize_4bit(Tensor w, str fmt, int block_size) -> (Tensor packed, Tensor absmax, "
      "Tensor zero)");
  m.def(
      "quantize_blockwise_8bit(Tensor x, Tensor code, int block_size) -> (Tensor q, Tensor "
      "absmax)");
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? zero, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, str fmt, int block_size, int nested_block_size, "
      "int[] shape, ScalarType dtype) -> Tensor");
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? zero, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, str fmt, int block_size, int nested_block_size, "
      "int[] shape, Tensor? bias) -> Tensor");
}
