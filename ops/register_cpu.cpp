#include <torch/library.h>

#include "../csrc/kernels.h"

TORCH_LIBRARY_IMPL(moequant, CPU, m) {
  m.impl("quantize_nf4", &moequant::quantize_nf4_cpu);
  m.impl("dequant_expert", &moequant::dequant_expert_cpu);
}
