// CPU kernel of quantize_nf4 for every format: one task per block of `blocksize` elements
// (4-bit) or per output row (int8), parallel over them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../kernels.h"
#include "../quant_checks.h"

namespace moequant {

// ~64K elements per task keeps scheduling cost negligible next to the work.
static int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, elements_per_item));
}

template <typename scalar_t>
static void quantize_4bit_blocks(QuantType type, const scalar_t* weight, uint8_t* packed, float* absmax,
                                 int64_t num_blocks, int64_t blocksize) {
  at::parallel_for(0, num_blocks, grain_for(blocksize), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* w = weight + b * blocksize;
      float amax = 0.0f;
      for (int64_t i = 0; i < blocksize; ++i) amax = nf4_absmax_step(amax, static_cast<float>(w[i]));
      absmax[b] = amax;
      const float scale = nf4_block_scale(amax);
      uint8_t* out = packed + b * (blocksize / 2);
      for (int64_t i = 0; i < blocksize / 2; ++i) {
        const uint8_t hi = quant4_encode(type, static_cast<float>(w[2 * i]) * scale);
        const uint8_t lo = quant4_encode(type, static_cast<float>(w[2 * i + 1]) * scale);
        out[i] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

template <typename scalar_t>
static void quantize_int8_rows(const scalar_t* weight, int8_t* codes, float* row_absmax, int64_t num_rows,
                               int64_t cols) {
  at::parallel_for(0, num_rows, grain_for(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* w = weight + r * cols;
      float amax = 0.0f;  // torch.max of |w|: NaN propagates
      for (int64_t i = 0; i < cols; ++i) amax = nf4_absmax_step(amax, static_cast<float>(w[i]));
      row_absmax[r] = amax;
      const float multiplier = int8_row_multiplier(amax);
      int8_t* out = codes + r * cols;
      for (int64_t i = 0; i < cols; ++i) out[i] = int8_encode(static_cast<float>(w[i]), multiplier);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight, int64_t blocksize,
                                                    c10::string_view quant_type) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape = check_quantize_args(weight, blocksize, type);
  TORCH_CHECK(weight.device().is_cpu(), "moequant.quantize_nf4 (CPU kernel): weight must be on CPU");
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::empty_symint(shape.packed_sizes(), w.options().dtype(shape.packed_dtype()));
  at::Tensor absmax = at::empty_symint(shape.absmax_sizes(blocksize), w.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_nf4_cpu", [&] {
    if (is_4bit(type)) {
      quantize_4bit_blocks<scalar_t>(type, w.const_data_ptr<scalar_t>(), packed.mutable_data_ptr<uint8_t>(),
                                     absmax.mutable_data_ptr<float>(), shape.numel().expect_int() / blocksize,
                                     blocksize);
    } else {
      const int64_t cols = shape.cols.expect_int();
      quantize_int8_rows<scalar_t>(w.const_data_ptr<scalar_t>(), packed.mutable_data_ptr<int8_t>(),
                                   absmax.mutable_data_ptr<float>(),
                                   (shape.matrices() * shape.rows).expect_int(), cols);
    }
  });
  return {packed, absmax};
}

}  // namespace moequant
