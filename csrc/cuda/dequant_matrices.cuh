// Dequantization of whole matrices (or row slices of them) of a quantized stack on the GPU, for
// every format: dequant_expert and the experts' scratch rung both call it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "quant_decode.cuh"

namespace moequant {

// Device pointers of one quantized stack [E, N, K] (packed / int8 codes and its statistics).
struct QuantStackView {
  QuantType type = QuantType::kNF4;
  const void* data = nullptr;  // uint8 [E, N, K/2] (4-bit) or int8 [E, N, K]
  BlockScales scales;          // map left null: the kernels point it at their shared copy
  Codebook16 codebook{};       // 4-bit formats
  int64_t rows = 0, cols = 0, blocksize = 64;
};

constexpr int kMaxListedMatrices = 256;

// The matrices one launch decodes, one per blockIdx.y: `first + y`, or ids[y] when listed (the
// experts of one scratch chunk). Passed by value as a kernel parameter.
struct MatrixSelection {
  int64_t first = 0;
  int32_t count = 0;
  bool listed = false;
  int32_t ids[kMaxListedMatrices];
  __device__ __forceinline__ int64_t operator()(int y) const { return listed ? ids[y] : first + y; }
};

// Decodes rows [row_begin, row_end) of each selected matrix into out[i] = [row_end - row_begin,
// K] (out contiguous [count, rows, K] of a floating dtype, 16-byte aligned). For 4-bit formats
// row_begin * K must be a multiple of the blocksize. Streaming stores suit outputs not re-read
// soon (dequant_expert); scratch about to feed a GEMM keeps plain stores.
void dequant_matrices(const QuantStackView& stack, const MatrixSelection& selection, int64_t row_begin,
                      int64_t row_end, at::Tensor& out, bool streaming_store);

}  // namespace moequant
