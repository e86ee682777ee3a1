// The inner loops of the CPU kernels for one instruction set: AVX2 where the CPU has it (chosen
// at run time), else portable C++. Both do the same fp32 operations in the same order, so every
// result is bitwise the same on any x86-64 CPU; MOEQUANT_CPU_SIMD=0 forces the portable loops.
#pragma once

#include <cstdint>

#include "../kernels.h"

namespace moequant {

struct CpuLoops {
  // `pairs` bytes of 4-bit codes (high nibble first) -> 2 * pairs values codebook[code] * scale.
  void (*decode_4bit)(const uint8_t* codes, int64_t pairs, float scale, const float* codebook, float* out);
  // The same values in split order, for pairs % 8 == 0: each 8 bytes give the values of their 8
  // high nibbles, then of their 8 low nibbles (on AVX2, one lookup per 8 values, no interleave).
  void (*decode_4bit_split)(const uint8_t* codes, int64_t pairs, float scale, const float* codebook, float* out);
  // int8 codes of one row -> (q * row_absmax) * (1/127).
  void (*decode_int8)(const int8_t* codes, int64_t count, float row_absmax, float* out);
  // out[r * out_stride] = sum_i w[i] * x[r * x_stride + i] for r < x_rows, each sum in 32
  // interleaved lanes (lane i % 32) reduced by one fixed pairwise tree.
  void (*dots)(const float* w, const float* x, int64_t x_stride, int64_t x_rows, int64_t n, float* out,
               int64_t out_stride);
  // Dot product of elements [begin, begin + count) of a 4-bit matrix, decoded in split order,
  // with x (split order too): bitwise what decode(..., split) then dots gives, without storing
  // the decoded values. For one activation row.
  float (*row_dot_4bit_split)(const QuantMatrices& m, int64_t matrix, int64_t begin, int64_t count, const float* x);
  // y[i] = (...((y[i] + a[0] * x[0][i]) + a[1] * x[1][i]) ...) + a[count-1] * x[count-1][i], x[j]
  // at x + j * x_stride, for count <= kMaxAxpyRows: the same sums, in the same order, as
  // `count` single-row updates, with one load and store of y (multiplies and adds never fused).
  static constexpr int kMaxAxpyRows = 4;
  void (*axpys)(const float* a, int count, const float* x, int64_t x_stride, float* y, int64_t n);

  // Elements [begin, begin + count) of matrix `matrix` (flat, row-major) decoded to fp32: exactly
  // dequant_expert's values. 4-bit pieces start and end on whole bytes (even offsets); with
  // `split` (4-bit only), in split order, which needs begin, count and the blocksize to be
  // multiples of 16.
  void decode(const QuantMatrices& m, int64_t matrix, int64_t begin, int64_t count, float* out,
              bool split = false) const;

  // The loops for this CPU and the MOEQUANT_CPU_SIMD setting (read on every call).
  static CpuLoops for_this_cpu();
};

}  // namespace moequant
