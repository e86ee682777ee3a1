#include <torch/library.h>

#include "../csrc/kernels.h"

TORCH_LIBRARY_IMPL(moequant, CUDA, m) {
  m.impl("quantize_nf4", &moequant::quantize_nf4_cuda);
  m.impl("compress_statistics", &moequant::compress_statistics_cuda);
  m.impl("dequant_expert", &moequant::dequant_expert_cuda);
  m.impl("experts_forward", &moequant::experts_forward_cuda);
  m.impl("_experts_forward_train", &moequant::experts_forward_train_cuda);
  m.impl("experts_backward", &moequant::experts_backward_cuda);
}
