// CPU kernel of dequant_expert, and the decode every CPU experts kernel uses: a block's scale
// through BlockScales (plain or double-quantized), its codes through the format's decode,
// rounded once into the output dtype. Parallel over blocks; fp32 output takes CpuLoops' decode
// (AVX2 where the CPU has it), which gives the same values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../kernels.h"
#include "../quant_checks.h"
#include "cpu_loops.h"

namespace moequant {

template <typename out_t>
void dequant_matrices_cpu(const QuantMatrices& m, int64_t first, int64_t count, out_t* out) {
  if (m.block_numel == 0 || count == 0) return;
  const int64_t blocks_per_matrix = m.matrix_numel / m.block_numel;
  const int64_t num_blocks = count * blocks_per_matrix;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / m.block_numel);
  const float* codebook = is_4bit(m.type) ? codebook_of(m.type) : nullptr;
  if constexpr (std::is_same_v<out_t, float>) {
    const CpuLoops loops = CpuLoops::for_this_cpu();
    at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
      // Runs of blocks within one matrix.
      for (int64_t b = begin; b < end;) {
        const int64_t matrix = b / blocks_per_matrix;
        const int64_t stop = std::min(end, (matrix + 1) * blocks_per_matrix);
        loops.decode(m, first + matrix, (b - matrix * blocks_per_matrix) * m.block_numel,
                     (stop - b) * m.block_numel, out + b * m.block_numel);
        b = stop;
      }
    });
    return;
  }
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t matrix = first + b / blocks_per_matrix;
      const float scale = m.scales(matrix, b % blocks_per_matrix);
      // 64-bit offsets: a stack can exceed 2^31 elements.
      const int64_t element = (first * blocks_per_matrix + b) * m.block_numel;
      out_t* o = out + b * m.block_numel;
      if (codebook != nullptr) {
        const uint8_t* in = static_cast<const uint8_t*>(m.data) + element / 2;
        for (int64_t i = 0; i < m.block_numel / 2; ++i) {
          const uint8_t byte = in[i];
          o[2 * i] = static_cast<out_t>(nf4_decode(byte >> 4, scale, codebook));
          o[2 * i + 1] = static_cast<out_t>(nf4_decode(byte & 0xF, scale, codebook));
        }
      } else {
        const int8_t* in = static_cast<const int8_t*>(m.data) + element;
        for (int64_t i = 0; i < m.block_numel; ++i) o[i] = static_cast<out_t>(int8_decode(in[i], scale));
      }
    }
  });
}

template void dequant_matrices_cpu<float>(const QuantMatrices&, int64_t, int64_t, float*);
template void dequant_matrices_cpu<double>(const QuantMatrices&, int64_t, int64_t, double*);
template void dequant_matrices_cpu<at::Half>(const QuantMatrices&, int64_t, int64_t, at::Half*);
template void dequant_matrices_cpu<at::BFloat16>(const QuantMatrices&, int64_t, int64_t, at::BFloat16*);

at::Tensor dequant_expert_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert, c10::string_view quant_type,
                              const std::optional<at::Tensor>& absmax_scale,
                              const std::optional<at::Tensor>& absmax_offset) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape =
      check_dequant_args(packed, absmax, blocksize, dtype, expert, type, absmax_scale, absmax_offset);
  TORCH_CHECK(packed.device().is_cpu(), "moequant.dequant_expert (CPU kernel): packed must be on CPU");
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const std::optional<at::Tensor> scale = absmax_scale.has_value() ? std::optional(absmax_scale->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> offset = absmax_offset.has_value() ? std::optional(absmax_offset->contiguous()) : std::nullopt;
  at::Tensor out = at::empty_symint(dequant_output_sizes(shape, expert), p.options().dtype(dtype));
  QuantMatrices m;
  m.type = type;
  m.data = p.const_data_ptr();
  m.scales = block_scales_of(shape, blocksize, a, scale, offset);
  m.scales.map = kDynamicMap;
  m.matrix_numel = shape.matrix_numel().expect_int();
  m.block_numel = shape.block_numel(blocksize).expect_int();
  const int64_t first = expert.value_or(0);
  const int64_t count = expert.has_value() ? 1 : shape.matrices().expect_int();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequant_expert_cpu", [&] {
    dequant_matrices_cpu<scalar_t>(m, first, count, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace moequant
