// CPU kernels of the experts ops: route (stable counting sort of the T*k pairs by expert), then
// per expert run its two projections through the format layer (any quant_type, plain or
// double-quantized statistics) and reduce the k slots of each token in a fixed order. The
// products read the packed matrices through quant_matmul_cpu (decoded in L1-sized pieces for
// experts that few pairs reach, in reused million-weight pieces for BLAS otherwise); fp64 inputs
// dequantize each expert whole into fp64. Deterministic; the reference and oracle for the CUDA
// kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>

#include "../error_text.h"
#include "../experts_checks.h"
#include "../gated_activation.h"
#include "../kernels.h"
#include "../quant_checks.h"

namespace moequant {
namespace {

// Up to this many rows an expert's products decode its matrix on the fly; above, decoding
// pieces for BLAS's faster multiply wins (one expert on a 2-core Zen 3 EPYC with AVX2, qwen3 and
// olmoe shapes: even at about 28 rows forward, 45 with the backward).
// MOEQUANT_CPU_ON_THE_FLY_ROWS overrides it (0: always BLAS), read on every call.
constexpr int64_t kOnTheFlyRows = 24;

int64_t on_the_fly_rows() {
  const char* v = std::getenv("MOEQUANT_CPU_ON_THE_FLY_ROWS");
  if (v == nullptr) return kOnTheFlyRows;
  char* end = nullptr;
  const long long rows = std::strtoll(v, &end, 10);
  TORCH_CHECK(*v != '\0' && *end == '\0' && rows >= 0,
              "MOEQUANT_CPU_ON_THE_FLY_ROWS must be a non-negative integer, got \"", v, "\"");
  return rows;
}

// Pairs p = t*k + j grouped by expert (stable): rows [offsets[e], offsets[e+1]) of `order`.
// Sentinel pairs (index >= E) are left out.
struct CpuRouting {
  std::vector<int64_t> offsets;  // E + 1
  at::Tensor order;              // int64 [routed pairs]
};

CpuRouting route_cpu(const at::Tensor& top_k_index, int64_t experts) {
  const at::Tensor idx = top_k_index.to(at::kLong).contiguous().view(-1);
  const int64_t* ids = idx.const_data_ptr<int64_t>();
  const int64_t pairs = idx.numel();
  CpuRouting r;
  r.offsets.assign(experts + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ids[p] >= 0, "moequant.experts: top_k_index must be >= 0 (indices >= E are "
                "expert-parallel sentinels), got ", num_str(ids[p]), " at flat position ", num_str(p));
    if (ids[p] < experts) ++r.offsets[ids[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) r.offsets[e + 1] += r.offsets[e];
  r.order = at::empty({r.offsets[experts]}, idx.options());
  int64_t* order = r.order.mutable_data_ptr<int64_t>();
  std::vector<int64_t> cursor(r.offsets.begin(), r.offsets.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    if (ids[p] < experts) order[cursor[ids[p]]++] = p;
  }
  return r;
}

// One stack's tensors made contiguous, and its raw view for decoding.
struct CpuStack {
  at::Tensor packed, absmax, scale, offset;  // scale/offset undefined for plain statistics
  QuantMatrices view;
  int64_t rows = 0, cols = 0;
};

CpuStack cpu_stack(QuantType type, const at::Tensor& packed, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                   int64_t blocksize) {
  CpuStack s;
  s.packed = packed.contiguous();
  s.absmax = absmax.contiguous();
  if (scale.has_value()) s.scale = scale->contiguous();
  if (offset.has_value()) s.offset = offset->contiguous();
  StackShape shape;
  shape.type = type;
  shape.leading = {packed.sym_size(0)};
  shape.rows = packed.sym_size(1);
  shape.cols = is_4bit(type) ? packed.sym_size(2) * 2 : packed.sym_size(2);
  s.rows = shape.rows.expect_int();
  s.cols = shape.cols.expect_int();
  s.view.type = type;
  s.view.data = s.packed.const_data_ptr();
  s.view.scales = block_scales_of(shape, blocksize, s.absmax, scale.has_value() ? std::optional(s.scale) : std::nullopt,
                                  offset.has_value() ? std::optional(s.offset) : std::nullopt);
  s.view.scales.map = kDynamicMap;
  s.view.matrix_numel = s.rows * s.cols;
  s.view.block_numel = shape.block_numel(blocksize).expect_int();
  return s;
}

// The arguments of one call, converted to the compute dtype (dense LoRA factors one expert at a
// time: lora_factor).
struct CpuExperts {
  ExpertsProblem problem;
  at::ScalarType compute;
  CpuStack gate_up_stack, down_stack;
  bool transposed, interleaved;
  double alpha, limit;
  at::Tensor gate_up_bias, down_bias;                        // undefined when absent
  at::Tensor gu_A, gu_B, d_A, d_B;  // as lora_factor keeps them; undefined when absent
  double gu_scaling, d_scaling;
  int64_t on_the_fly_rows;  // experts reached by at most this many pairs decode on the fly

  // Expert e's dequantized matrix of a stack, in the compute dtype.
  at::Tensor weight(const CpuStack& stack, int64_t e) const {
    at::Tensor w = at::empty({stack.rows, stack.cols}, stack.packed.options().dtype(compute));
    if (compute == at::kDouble) {
      dequant_matrices_cpu<double>(stack.view, e, 1, w.mutable_data_ptr<double>());
    } else {
      dequant_matrices_cpu<float>(stack.view, e, 1, w.mutable_data_ptr<float>());
    }
    return w;
  }
  // Expert e's LoRA factor in the compute dtype (a no-op for factors lora_factor converted);
  // undefined when the factor is absent.
  at::Tensor factor(const at::Tensor& f, int64_t e) const { return f.defined() ? f[e].to(compute) : at::Tensor(); }
  // x times expert e's matrix of a stack as the forward applies it ([in, out]: S^T, or S for a
  // transposed stack), or with `backward` times its transpose.
  at::Tensor times(const CpuStack& stack, int64_t e, const at::Tensor& x, bool backward) const {
    const bool times_stored = transposed != backward;
    if (compute == at::kFloat) {
      return quant_matmul_cpu(stack.view, e, stack.rows, stack.cols, x, times_stored, on_the_fly_rows);
    }
    const at::Tensor w = weight(stack, e);  // fp64: dequantized whole, for BLAS
    return x.mm(times_stored ? w : w.t());
  }
  at::Tensor gate_up(const at::Tensor& x, int64_t e) const {
    at::Tensor h = times(gate_up_stack, e, x, /*backward=*/false);
    if (gate_up_bias.defined()) h += gate_up_bias[e];
    if (gu_A.defined()) h += x.mm(factor(gu_A, e).t()).mm(factor(gu_B, e).t()) * gu_scaling;
    return h;
  }
};

at::Tensor opt_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : at::Tensor();
}

// A LoRA factor as the call keeps it. Where each expert's slice is dense (contiguous factors, in
// any float dtype) it stays as given and CpuExperts::factor converts the routed experts' slices
// only (bf16 factors, qwen3-30b-a3b shapes, T=1, no grad: 8.0-9.7 -> 4.3 ms a call). An
// expert-minor view (B as PEFT passes it at inference) is converted whole: each expert's slice of
// it is a gather, dearer than one copy of all of them once a call routes to more than a few
// experts (T=8: 55-63 ms converted per expert against 49 ms whole).
// (benchmarks/results/bench_cpu_experts-lora_factor_storage-AMD_EPYC.json)
at::Tensor lora_factor(const std::optional<at::Tensor>& t, at::ScalarType compute) {
  if (!t.has_value()) return {};
  return t->size(0) == 0 || (*t)[0].is_contiguous() ? *t : t->to(compute).contiguous();
}

CpuExperts make_problem(const char* op, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                        const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS) {
  ExpertsProblem problem =
      check_experts_args(op, hidden_states, top_k_index, top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES);
  TORCH_CHECK(hidden_states.device().is_cpu(), op, " (CPU kernel): hidden_states must be on CPU");
  const at::ScalarType compute = hidden_states.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return CpuExperts{problem,
                    compute,
                    cpu_stack(problem.quant_type, gate_up_packed, gate_up_absmax, gate_up_absmax_scale,
                              gate_up_absmax_offset, blocksize),
                    cpu_stack(problem.quant_type, down_packed, down_absmax, down_absmax_scale, down_absmax_offset,
                              blocksize),
                    transposed,
                    interleaved,
                    act_alpha,
                    act_limit,
                    opt_to(gate_up_bias, compute),
                    opt_to(down_bias, compute),
                    lora_factor(gate_up_lora_A, compute),
                    lora_factor(gate_up_lora_B, compute),
                    lora_factor(down_lora_A, compute),
                    lora_factor(down_lora_B, compute),
                    gate_up_lora_scaling,
                    down_lora_scaling,
                    on_the_fly_rows()};
}

// Shared forward; also fills `gate_up_out` (routing order) when it is defined.
at::Tensor forward_cpu(const CpuExperts& c, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                       const at::Tensor& top_k_weights, at::Tensor gate_up_out) {
  const int64_t T = hidden_states.size(0), k = top_k_index.size(1), H = hidden_states.size(1);
  const int64_t E = c.problem.experts.expect_int();
  const CpuRouting r = route_cpu(top_k_index, E);
  const at::Tensor x = hidden_states.to(c.compute).contiguous();
  const at::Tensor w = top_k_weights.to(c.compute).contiguous().view(-1);
  at::Tensor y_pairs = at::zeros({T * k, H}, x.options());  // weighted expert outputs, pair order
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = r.offsets[e], end = r.offsets[e + 1];
    if (begin == end) continue;
    const at::Tensor pairs = r.order.slice(0, begin, end);
    const at::Tensor xe = x.index_select(0, at::floor_divide(pairs, k));
    const at::Tensor h = c.gate_up(xe, e);
    if (gate_up_out.defined()) gate_up_out.slice(0, begin, end).copy_(h);
    const at::Tensor a = gated_activation_forward(h, c.problem.activation, c.interleaved, c.alpha, c.limit);
    at::Tensor y = c.times(c.down_stack, e, a, /*backward=*/false);
    if (c.down_bias.defined()) y += c.down_bias[e];
    if (c.d_A.defined()) y += a.mm(c.factor(c.d_A, e).t()).mm(c.factor(c.d_B, e).t()) * c.d_scaling;
    y_pairs.index_copy_(0, pairs, y * w.index_select(0, pairs).unsqueeze(1));
  }
  // Fixed-order fp32 reduction over the k slots of each token.
  return y_pairs.view({T, k, H}).sum(1).to(hidden_states.scalar_type());
}

}  // namespace

at::Tensor experts_forward_cpu(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                               const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS) {
  const CpuExperts c = make_problem("moequant.experts_forward", hidden_states, top_k_index, top_k_weights,
                                    MOEQUANT_EXPERTS_ARG_NAMES);
  return forward_cpu(c, hidden_states, top_k_index, top_k_weights, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> experts_forward_train_cpu(const at::Tensor& hidden_states,
                                                             const at::Tensor& top_k_index,
                                                             const at::Tensor& top_k_weights,
                                                             MOEQUANT_EXPERTS_PARAMS) {
  const CpuExperts c = make_problem("moequant._experts_forward_train", hidden_states, top_k_index, top_k_weights,
                                    MOEQUANT_EXPERTS_ARG_NAMES);
  const int64_t pairs = top_k_index.numel();
  const int64_t features = c.problem.intermediate.expect_int() * 2;
  // Sentinel rows at the tail stay zero.
  at::Tensor gate_up_out = at::zeros({pairs, features}, hidden_states.options());
  at::Tensor gate_up_compute = gate_up_out.scalar_type() == c.compute ? gate_up_out
                                                                       : at::zeros({pairs, features},
                                                                                   hidden_states.options().dtype(c.compute));
  at::Tensor out = forward_cpu(c, hidden_states, top_k_index, top_k_weights, gate_up_compute);
  if (!gate_up_compute.is_same(gate_up_out)) gate_up_out.copy_(gate_up_compute);
  return {out, gate_up_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const std::optional<at::Tensor>& gate_up_out, MOEQUANT_EXPERTS_PARAMS) {
  const char* op = "moequant.experts_backward";
  const CpuExperts c = make_problem(op, hidden_states, top_k_index, top_k_weights,
                                    MOEQUANT_EXPERTS_ARG_NAMES);
  const int64_t T = hidden_states.size(0), k = top_k_index.size(1), H = hidden_states.size(1);
  const int64_t E = c.problem.experts.expect_int();
  const int64_t features = c.problem.intermediate.expect_int() * 2;
  TORCH_CHECK(grad_out.sizes() == hidden_states.sizes(), op, ": grad_out must have shape ", dims_str(hidden_states.sizes()),
              ", got ", dims_str(grad_out.sizes()));
  if (gate_up_out.has_value()) {
    TORCH_CHECK(gate_up_out->dim() == 2 && gate_up_out->size(0) == T * k && gate_up_out->size(1) == features, op,
                ": gate_up_out must have shape [", num_str(T * k), ", ", num_str(features), "], got ", dims_str(gate_up_out->sizes()));
  }
  const CpuRouting r = route_cpu(top_k_index, E);
  const at::Tensor x = hidden_states.to(c.compute).contiguous();
  const at::Tensor g = grad_out.to(c.compute).contiguous();
  const at::Tensor w = top_k_weights.to(c.compute).contiguous().view(-1);
  at::Tensor grad_x_pairs = at::zeros({T * k, H}, x.options());
  at::Tensor grad_w = at::zeros({T * k}, x.options());
  auto zero_grad = [&](const at::Tensor& factor) {  // contiguous, in the compute dtype
    return factor.defined() ? at::zeros(factor.sizes(), x.options()) : at::Tensor();
  };
  at::Tensor g_guA = zero_grad(c.gu_A), g_guB = zero_grad(c.gu_B), g_dA = zero_grad(c.d_A), g_dB = zero_grad(c.d_B);

  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = r.offsets[e], end = r.offsets[e + 1];
    if (begin == end) continue;
    const at::Tensor pairs = r.order.slice(0, begin, end);
    const at::Tensor tokens = at::floor_divide(pairs, k);
    const at::Tensor xe = x.index_select(0, tokens);
    const at::Tensor ge = g.index_select(0, tokens);  // gradient of the token, before routing weight
    const at::Tensor we = w.index_select(0, pairs).unsqueeze(1);
    const at::Tensor h = gate_up_out.has_value() ? gate_up_out->slice(0, begin, end).to(c.compute)
                                                 : c.gate_up(xe, e);
    const at::Tensor a = gated_activation_forward(h, c.problem.activation, c.interleaved, c.alpha, c.limit);
    const at::Tensor guA = c.factor(c.gu_A, e), guB = c.factor(c.gu_B, e);
    const at::Tensor dA = c.factor(c.d_A, e), dB = c.factor(c.d_B, e);
    // ga = grad_out · W_d,eff (unweighted): gives both d(routing weight) and d(activation).
    at::Tensor ga = c.times(c.down_stack, e, ge, /*backward=*/true);
    if (dA.defined()) ga += ge.mm(dB).mm(dA) * c.d_scaling;
    at::Tensor gw = (ga * a).sum(1);
    if (c.down_bias.defined()) gw += ge.mv(c.down_bias[e]);
    grad_w.index_copy_(0, pairs, gw);
    const at::Tensor gy = ge * we;  // gradient of this expert's down output
    if (dA.defined()) {
      g_dB[e].copy_(gy.t().mm(a.mm(dA.t())) * c.d_scaling);
      g_dA[e].copy_(gy.mm(dB).t().mm(a) * c.d_scaling);
    }
    const at::Tensor dh = gated_activation_backward(h, ga * we, c.problem.activation, c.interleaved, c.alpha,
                                                    c.limit);
    at::Tensor dx = c.times(c.gate_up_stack, e, dh, /*backward=*/true);
    if (guA.defined()) {
      const at::Tensor dh_B = dh.mm(guB);
      dx += dh_B.mm(guA) * c.gu_scaling;
      g_guB[e].copy_(dh.t().mm(xe.mm(guA.t())) * c.gu_scaling);
      g_guA[e].copy_(dh_B.t().mm(xe) * c.gu_scaling);
    }
    grad_x_pairs.index_copy_(0, pairs, dx);
  }
  auto lora_grad = [&](const at::Tensor& grad, const std::optional<at::Tensor>& factor) {
    return grad.defined() ? grad.to(factor->scalar_type()) : at::empty({0}, hidden_states.options());
  };
  return {grad_x_pairs.view({T, k, H}).sum(1).to(hidden_states.scalar_type()),
          grad_w.view({T, k}).to(top_k_weights.scalar_type()),
          lora_grad(g_guA, gate_up_lora_A),
          lora_grad(g_guB, gate_up_lora_B),
          lora_grad(g_dA, down_lora_A),
          lora_grad(g_dB, down_lora_B)};
}

}  // namespace moequant
