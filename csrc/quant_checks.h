// Argument checks and output shapes of the stack ops (quantize_nf4, dequant_expert,
// compress_statistics), shared by the CPU, CUDA and Meta kernels so that every backend rejects
// the same inputs with the same message. Formats: csrc/quant_format.h and the README.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "quant_format.h"

namespace moequant {

// "nf4", "fp4" or "int8"; anything else is an error that lists them.
QuantType parse_quant_type(c10::string_view name);
const char* quant_type_name(QuantType t);

// Logical shape of a quantized stack: leading dims, rows N, columns K, and its format.
// Sizes are SymInts so that the Meta kernels trace with dynamic shapes under torch.compile;
// the CPU/CUDA kernels read them back with `.expect_int()`.
struct StackShape {
  std::vector<c10::SymInt> leading;  // e.g. {E}; empty for a 2-D weight
  c10::SymInt rows = 0;              // N
  c10::SymInt cols = 0;              // K (logical, unpacked)
  QuantType type = QuantType::kNF4;

  c10::SymInt matrices() const;  // product of leading dims (1 for a 2-D weight)
  c10::SymInt matrix_numel() const { return rows * cols; }
  c10::SymInt numel() const { return matrices() * matrix_numel(); }
  // Statistics per matrix: one per block of `blocksize` (4-bit) or one per row (int8).
  c10::SymInt blocks_per_matrix(int64_t blocksize) const;
  // Elements behind one statistic: blocksize (4-bit) or K (int8).
  c10::SymInt block_numel(int64_t blocksize) const;
  // Double-quant groups per matrix: ceil(blocks / 256).
  c10::SymInt groups_per_matrix(int64_t blocksize) const;
  std::vector<c10::SymInt> weight_sizes() const;                      // [..., N, K]
  std::vector<c10::SymInt> packed_sizes() const;                      // [..., N, K/2] (int8: [..., N, K])
  std::vector<c10::SymInt> absmax_sizes(int64_t blocksize) const;     // [..., blocks]
  std::vector<c10::SymInt> scale_sizes(int64_t blocksize) const;      // [..., groups]
  at::ScalarType packed_dtype() const { return is_4bit(type) ? at::kByte : at::kChar; }
};

// Checks `blocksize` is a power of two in [32, 4096].
void check_blocksize(int64_t blocksize);

// Checks a weight for quantize_nf4 (dtype, rank; for 4-bit formats even K and whole blocks per
// matrix) and returns its logical shape.
StackShape check_quantize_args(const at::Tensor& weight, int64_t blocksize, QuantType type);

// Checks the statistics of one stack: plain fp32 absmax [..., blocks], or (4-bit only) uint8
// codes [..., blocks] with fp32 absmax_scale [..., ceil(blocks/256)] and absmax_offset [...].
// `op` and `name` prefix the messages (name: "" or "gate_up_"/"down_").
void check_statistics(const char* op, const std::string& name, const StackShape& shape, int64_t blocksize,
                      const at::Tensor& absmax, const std::optional<at::Tensor>& absmax_scale,
                      const std::optional<at::Tensor>& absmax_offset, const at::Tensor& packed);

// Checks packed/statistics/dtype/expert for dequant_expert and returns the stack's shape.
StackShape check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert, QuantType type,
                              const std::optional<at::Tensor>& absmax_scale,
                              const std::optional<at::Tensor>& absmax_offset);

// Checks the fp32 absmax [..., blocks] handed to compress_statistics.
void check_compress_statistics_args(const at::Tensor& absmax);

// compress_statistics' outputs for absmax [..., blocks], uninitialized, on absmax's device: codes
// uint8 [..., blocks], group scales fp32 [..., ceil(blocks / 256)], offsets fp32 [...]. Symbolic
// sizes, so the Meta kernel allocates them the same way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_compressed_statistics(const at::Tensor& absmax);

// Output sizes of dequant_expert.
std::vector<c10::SymInt> dequant_output_sizes(const StackShape& shape, std::optional<int64_t> expert);

// Raw view of checked, contiguous statistics (map left null: the caller points it at the
// dynamic map of its device).
BlockScales block_scales_of(const StackShape& shape, int64_t blocksize, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_offset);

}  // namespace moequant
