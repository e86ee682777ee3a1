// CPU kernel of quantize_nf4: one task per block of `blocksize` elements, parallel over blocks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../nf4_checks.h"
#include "../nf4_format.h"
#include "../kernels.h"

namespace moequant {

template <typename scalar_t>
static void quantize_blocks(const scalar_t* weight, uint8_t* packed, float* absmax,
                            int64_t num_blocks, int64_t blocksize) {
  // ~64K elements per task keeps scheduling cost negligible next to the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / blocksize);
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* w = weight + b * blocksize;
      float amax = 0.0f;
      for (int64_t i = 0; i < blocksize; ++i) amax = nf4_absmax_step(amax, static_cast<float>(w[i]));
      absmax[b] = amax;
      const float scale = nf4_block_scale(amax);
      uint8_t* out = packed + b * (blocksize / 2);
      for (int64_t i = 0; i < blocksize / 2; ++i) {
        const uint8_t hi = nf4_encode(static_cast<float>(w[2 * i]) * scale);
        const uint8_t lo = nf4_encode(static_cast<float>(w[2 * i + 1]) * scale);
        out[i] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight, int64_t blocksize) {
  const NF4StackShape shape = check_quantize_args(weight, blocksize);
  TORCH_CHECK(weight.device().is_cpu(), "moequant.quantize_nf4 (CPU kernel): weight must be on CPU");
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::empty_symint(shape.packed_sizes(), w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty_symint(shape.absmax_sizes(blocksize), w.options().dtype(at::kFloat));
  const int64_t num_blocks = shape.numel().expect_int() / blocksize;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_nf4_cpu", [&] {
    quantize_blocks<scalar_t>(w.const_data_ptr<scalar_t>(), packed.mutable_data_ptr<uint8_t>(),
                              absmax.mutable_data_ptr<float>(), num_blocks, blocksize);
  });
  return {packed, absmax};
}

}  // namespace moequant
