#include <torch/library.h>

#include "../csrc/kernels.h"

TORCH_LIBRARY_IMPL(moequant, CPU, m) {
  m.impl("quantize_nf4", &moequant::quantize_nf4_cpu);
  m.impl("compress_statistics", &moequant::compress_statistics_cpu);
  m.impl("dequant_expert", &moequant::dequant_expert_cpu);
  m.impl("experts_forward", &moequant::experts_forward_cpu);
  m.impl("_experts_forward_train", &moequant::experts_forward_train_cpu);
  m.impl("experts_backward", &moequant::experts_backward_cpu);
}
