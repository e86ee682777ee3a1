// Argument checks and output shapes of the NF4 ops, shared by the CPU, CUDA and Meta kernels so
// that every backend rejects the same inputs with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace moequant {

// Logical shape of an NF4 stack: leading dims, rows N, columns K.
// Sizes are SymInts so that the Meta kernels trace with dynamic shapes under torch.compile;
// the CPU/CUDA kernels read them back with `.expect_int()`.
struct NF4StackShape {
  std::vector<c10::SymInt> leading;  // e.g. {E}; empty for a 2-D weight
  c10::SymInt rows = 0;              // N
  c10::SymInt cols = 0;              // K (logical, unpacked)

  c10::SymInt matrices() const;  // product of leading dims (1 for a 2-D weight)
  c10::SymInt matrix_numel() const { return rows * cols; }
  c10::SymInt numel() const { return matrices() * matrix_numel(); }
  std::vector<c10::SymInt> weight_sizes() const;                  // [..., N, K]
  std::vector<c10::SymInt> packed_sizes() const;                  // [..., N, K/2]
  std::vector<c10::SymInt> absmax_sizes(int64_t blocksize) const;  // [..., N*K/B]
};

// Checks `blocksize` is a power of two in [32, 4096].
void check_blocksize(int64_t blocksize);

// Checks a weight for quantize_nf4 (dtype, rank, even K, whole blocks per matrix) and
// returns its logical shape.
NF4StackShape check_quantize_args(const at::Tensor& weight, int64_t blocksize);

// Checks packed/absmax/dtype/expert for dequant_expert and returns the stack's shape.
NF4StackShape check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, at::ScalarType dtype,
                                 std::optional<int64_t> expert);

// Output sizes of dequant_expert.
std::vector<c10::SymInt> dequant_output_sizes(const NF4StackShape& shape,
                                          std::optional<int64_t> expert);

}  // namespace moequant
