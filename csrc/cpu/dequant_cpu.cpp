// CPU kernel of dequant_expert: decode two codes per byte, scale by the block's absmax in fp32,
// round once into the output dtype. Parallel over blocks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../nf4_checks.h"
#include "../nf4_format.h"
#include "../kernels.h"

namespace moequant {

template <typename out_t>
void dequant_nf4_blocks_cpu(const uint8_t* packed, const float* absmax, out_t* out,
                            int64_t num_blocks, int64_t blocksize) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / blocksize);
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float amax = absmax[b];
      const uint8_t* in = packed + b * (blocksize / 2);
      out_t* o = out + b * blocksize;
      for (int64_t i = 0; i < blocksize / 2; ++i) {
        const uint8_t byte = in[i];
        o[2 * i] = static_cast<out_t>(nf4_decode(byte >> 4, amax, kNF4Values));
        o[2 * i + 1] = static_cast<out_t>(nf4_decode(byte & 0xF, amax, kNF4Values));
      }
    }
  });
}

template void dequant_nf4_blocks_cpu<float>(const uint8_t*, const float*, float*, int64_t, int64_t);
template void dequant_nf4_blocks_cpu<double>(const uint8_t*, const float*, double*, int64_t, int64_t);
template void dequant_nf4_blocks_cpu<at::Half>(const uint8_t*, const float*, at::Half*, int64_t, int64_t);
template void dequant_nf4_blocks_cpu<at::BFloat16>(const uint8_t*, const float*, at::BFloat16*, int64_t, int64_t);

at::Tensor dequant_expert_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert) {
  const NF4StackShape shape = check_dequant_args(packed, absmax, blocksize, dtype, expert);
  TORCH_CHECK(packed.device().is_cpu(), "moequant.dequant_expert (CPU kernel): packed must be on CPU");
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty_symint(dequant_output_sizes(shape, expert), p.options().dtype(dtype));
  // 64-bit offsets: a stack can exceed 2^31 elements.
  const int64_t matrix_numel = shape.matrix_numel().expect_int();
  const int64_t matrix_blocks = matrix_numel / blocksize;
  const int64_t first = expert.value_or(0);
  const int64_t num_blocks = expert.has_value() ? matrix_blocks : shape.numel().expect_int() / blocksize;
  const uint8_t* p_ptr = p.const_data_ptr<uint8_t>() + first * (matrix_numel / 2);
  const float* a_ptr = a.const_data_ptr<float>() + first * matrix_blocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequant_expert_cpu", [&] {
    dequant_nf4_blocks_cpu<scalar_t>(p_ptr, a_ptr, out.mutable_data_ptr<scalar_t>(), num_blocks, blocksize);
  });
  return out;
}

}  // namespace moequant
