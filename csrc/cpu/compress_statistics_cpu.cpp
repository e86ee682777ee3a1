// CPU kernel of compress_statistics: bitsandbytes' compress_statistics on each matrix's block
// absmax row: offset = mean, then 8-bit dynamic-map codes of (absmax - offset) in groups of 256
// with one fp32 group absmax each. Parallel over groups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include "../kernels.h"
#include "../quant_checks.h"

namespace moequant {

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cpu(const at::Tensor& absmax) {
  check_compress_statistics_args(absmax);
  TORCH_CHECK(absmax.device().is_cpu(), "moequant.compress_statistics (CPU kernel): absmax must be on CPU");
  const at::Tensor a = absmax.contiguous();
  const int64_t blocks = a.size(-1);
  const int64_t groups = (blocks + kDoubleQuantGroup - 1) / kDoubleQuantGroup;
  const int64_t matrices = c10::multiply_integers(a.sizes().slice(0, a.dim() - 1));
  auto [codes, scale, offset] = empty_compressed_statistics(a);
  if (matrices == 0) return {codes, scale, offset};
  // The offset is torch's fp32 mean of one matrix's row, as bitsandbytes computes it on that
  // matrix alone (at::mean over a 1-D contiguous row: the same reduction order).
  const at::Tensor rows = a.view({matrices, blocks});
  float* offset_ptr = offset.mutable_data_ptr<float>();
  for (int64_t e = 0; e < matrices; ++e) offset_ptr[e] = at::mean(rows[e]).item<float>();

  const float* in = a.const_data_ptr<float>();
  uint8_t* out = codes.mutable_data_ptr<uint8_t>();
  float* scale_ptr = scale.mutable_data_ptr<float>();
  at::parallel_for(0, matrices * groups, 64, [&](int64_t begin, int64_t end) {
    float shifted[kDoubleQuantGroup];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t e = g / groups, first = (g % groups) * kDoubleQuantGroup;
      const int64_t n = std::min<int64_t>(kDoubleQuantGroup, blocks - first);
      const float* x = in + e * blocks + first;
      float amax = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        shifted[i] = x[i] - offset_ptr[e];  // fp32, as bitsandbytes' `absmax - offset`
        amax = dynamic_absmax_step(amax, shifted[i]);
      }
      scale_ptr[g] = amax;
      uint8_t* q = out + e * blocks + first;
      if (amax == 0.0f) {
        std::fill(q, q + n, uint8_t{0});
        continue;
      }
      const float inv = 1.0f / amax;
      for (int64_t i = 0; i < n; ++i) q[i] = dynamic_map_encode(shifted[i], inv, kDynamicMap);
    }
  });
  return {codes, scale, offset};
}

}  // namespace moequant
