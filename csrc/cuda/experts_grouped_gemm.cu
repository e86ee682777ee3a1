#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdlib>
#include <cstring>

#include "experts_grouped_gemm.cuh"

// torch._grouped_mm's bf16 CUTLASS kernel, which takes the output tensor (at::cuda::detail).
#if __has_include(<ATen/native/cuda/GroupMM.h>)
#include <ATen/native/cuda/GroupMM.h>
#define MOEQUANT_HAS_GROUPED_MM_INTO 1
#endif

namespace moequant {

bool grouped_mm_enabled(at::ScalarType dtype) {
  static const bool disabled = [] {
    const char* v = std::getenv("MOEQUANT_EXPERTS_GROUPED_MM");
    return v != nullptr && std::strcmp(v, "0") == 0;
  }();
  if (disabled || dtype != at::kBFloat16) return false;
  const int major = at::cuda::getCurrentDeviceProperties()->major;
  return major == 9 || major == 10;  // torch._grouped_mm's CUTLASS kernels
}

static bool matrix_ok(const at::Tensor& t) {
  constexpr int64_t kAlign = 8;  // bf16 elements in 16 bytes
  const int64_t d = t.dim();
  if (d < 2 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t rows = t.size(d - 2), cols = t.size(d - 1);
  const int64_t s_row = t.stride(d - 2), s_col = t.stride(d - 1);
  if (d == 3 && t.stride(0) % kAlign != 0) return false;
  return (s_col == 1 && s_row % kAlign == 0 && s_row >= cols) || (s_row == 1 && s_col % kAlign == 0 && s_col >= rows);
}

bool grouped_mm_operands_ok(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && matrix_ok(a) && matrix_ok(b);
}

void grouped_mm_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, at::Tensor& out) {
#ifdef MOEQUANT_HAS_GROUPED_MM_INTO
  // The kernel reads out's strides: any row-major view with a 16-byte aligned row stride works,
  // and the product lands in place (no temporary, no copy).
  if (out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.stride(1) == 1 && matrix_ok(out)) {
    at::cuda::detail::bf16bf16_grouped_mm(a, b, offs, std::nullopt, out);
    return;
  }
#endif
  out.copy_(at::_grouped_mm(a, b, offs));
}

at::Tensor stack_rows_gemm(const at::Tensor& in, const at::Tensor& mats, const ExpertsRouting& r) {
  const int64_t N = mats.size(2);
  const at::Tensor b = mats.to(in.scalar_type());
  if (r.num_rows == 0) return at::empty({0, N}, in.options());
  if (grouped_mm_enabled(in.scalar_type()) && grouped_mm_operands_ok(in, b)) {
    return at::_grouped_mm(in, b, r.group_ends);
  }
  at::Tensor out = at::empty({r.num_rows, N}, in.options());
  for (const int32_t e : r.active_experts) {
    const int64_t r0 = r.row_offsets[e], n = r.rows_of(e);
    at::Tensor o = out.narrow(0, r0, n);
    at::mm_out(o, in.narrow(0, r0, n), b.select(0, e));
  }
  return out;
}

at::Tensor stack_weight_grad(const at::Tensor& a, const at::Tensor& b, const ExpertsRouting& r) {
  const int64_t E = r.num_experts, M = a.size(1), N = b.size(1);
  if (r.num_rows == 0) return at::zeros({E, M, N}, a.options());
  if (grouped_mm_enabled(a.scalar_type()) && grouped_mm_operands_ok(a.t(), b)) {
    // An expert with no rows is an empty reduction: do not trust whatever the kernel left there.
    at::Tensor out = at::_grouped_mm(a.t(), b, r.group_ends);
    if (static_cast<int64_t>(r.active_experts.size()) < E) out.masked_fill_(r.expert_rows.eq(0).view({E, 1, 1}), 0);
    return out;
  }
  at::Tensor out = at::zeros({E, M, N}, a.options());
  for (const int32_t e : r.active_experts) {
    const int64_t r0 = r.row_offsets[e], n = r.rows_of(e);
    at::Tensor o = out.select(0, e);
    at::mm_out(o, a.narrow(0, r0, n).t(), b.narrow(0, r0, n));
  }
  return out;
}

}  // namespace moequant
