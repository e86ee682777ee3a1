// Meta (fake) kernels: exact output shapes and dtypes, and the same argument checks as the real
// kernels, so torch.compile and opcheck see what the CPU/CUDA kernels would return.
#include <torch/library.h>

#include "../csrc/nf4_checks.h"

namespace moequant {

static std::tuple<at::Tensor, at::Tensor> quantize_nf4_meta(const at::Tensor& weight, int64_t blocksize) {
  const NF4StackShape shape = check_quantize_args(weight, blocksize);
  return {at::empty_symint(shape.packed_sizes(), weight.options().dtype(at::kByte)),
          at::empty_symint(shape.absmax_sizes(blocksize), weight.options().dtype(at::kFloat))};
}

static at::Tensor dequant_expert_meta(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                      at::ScalarType dtype, std::optional<int64_t> expert) {
  const NF4StackShape shape = check_dequant_args(packed, absmax, blocksize, dtype, expert);
  return at::empty_symint(dequant_output_sizes(shape, expert), packed.options().dtype(dtype));
}

}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, Meta, m) {
  m.impl("quantize_nf4", &moequant::quantize_nf4_meta);
  m.impl("dequant_expert", &moequant::dequant_expert_meta);
}
