// CUDA kernels of experts_forward, _experts_forward_train and experts_backward (rungs (a) and (b)
// of DESIGN.md §4 behind packed_stack_gemm, plus the decode GEMV for few rows), for every stack
// format (NF4, FP4, int8; plain or double-quantized statistics: a format is data handed to the
// same kernels): route pairs by expert, gather rows, products with the packed stacks (fused
// 4-bit GEMM, or bounded dequant scratch + grouped GEMM), fused bias/activation, LoRA as low-rank per-expert products in the
// same routing order (the second factor added in place to each product's rows,
// experts_low_rank.cuh, so no [R, out] LoRA term ever exists), and a deterministic combine.
//
// Backward, per routed row (t, j) of expert e with weight w and gate_up output h:
//   z      = g[t] @ Wd_eff[e]                  (unweighted; Wd_eff includes the down LoRA)
//   grad_w = <z, act(h)> + <g[t], bd[e]>       (never needs the down-projection output)
//   dh     = act'(h) * (w z)
//   dx     = dh @ Wgu_eff[e], summed over the k slots of each token in slot order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "../experts_checks.h"
#include "../kernels.h"
#include "experts_activation.cuh"
#include "experts_common.cuh"
#include "experts_decode_gemv.cuh"
#include "experts_grouped_gemm.cuh"
#include "experts_low_rank.cuh"
#include "experts_routing.cuh"
#include "experts_rows.cuh"
#include "experts_stack_gemm.cuh"

namespace moequant {
namespace {

struct LoraFactors {
  at::Tensor A, B;  // [E, r, in], [E, out, r] in the compute dtype; undefined when absent
  double scaling = 1.0;
  at::ScalarType A_dtype = at::kFloat, B_dtype = at::kFloat;
  bool present() const { return A.defined(); }
};

// Everything one experts call needs, normalized once (contiguity, dtypes, shapes).
struct ExpertsCall {
  int64_t T = 0, k = 0, H = 0, I = 0, E = 0;
  at::ScalarType dtype = at::kBFloat16;
  bool transposed = false;
  PackedStack gate_up, down;
  ActivationSpec act;
  at::Tensor gate_up_bias, down_bias;  // float32 [E, 2I] / [E, H], or undefined
  LoraFactors gate_up_lora, down_lora;
  bool decode = false;  // the decode GEMV serves the call (its LoRA factors are decode_*_lora)
  DecodeLora decode_gate_up_lora, decode_down_lora;
  ScratchBudget scratch;
};

LoraFactors lora_factors(const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& B, double scaling,
                         at::ScalarType dtype) {
  LoraFactors f;
  if (!A.has_value()) return f;
  f.A_dtype = A->scalar_type();
  f.B_dtype = B->scalar_type();
  f.A = A->to(dtype).contiguous();
  f.B = B->to(dtype).contiguous();
  f.scaling = scaling;
  return f;
}

// The decode path's view of a projection's LoRA factors: as given when they are in the compute
// dtype or float32 (the kernels round float32 elements as they read them), A made contiguous and
// 16-byte aligned (the A product reads its rows in 16-byte pieces), B with its own strides.
// Converting them up front would copy every expert's factors on every call (PEFT's float32
// adapters: tens of MB per layer and decode step) for the few experts it reads.
DecodeLora decode_lora(const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& B, double scaling,
                       at::ScalarType dtype) {
  DecodeLora l;
  if (!A.has_value()) return l;
  auto readable = [&](const at::Tensor& t) {
    return t.scalar_type() == dtype || t.scalar_type() == at::kFloat ? t : t.to(dtype);
  };
  l.A = contiguous_aligned16(readable(*A));
  l.B = readable(*B);
  l.scaling = scaling;
  return l;
}

// One checked stack, its tensors made contiguous (codes 16-byte aligned) once for every kernel.
PackedStack packed_stack(QuantType type, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& absmax_scale, const std::optional<at::Tensor>& absmax_offset,
                         int64_t blocksize) {
  PackedStack s;
  s.type = type;
  s.packed = contiguous_aligned16(packed);
  s.absmax = absmax.contiguous();
  if (absmax_scale.has_value()) {
    s.absmax_scale = absmax_scale->contiguous();
    s.absmax_offset = absmax_offset->contiguous();
  }
  s.experts = packed.size(0);
  s.rows = packed.size(1);
  s.cols = is_4bit(type) ? packed.size(2) * 2 : packed.size(2);
  s.blocksize = blocksize;
  return s;
}

// `train`: the call keeps what backward needs (never the decode GEMV).
ExpertsCall prepare_call(const char* op, bool train, const at::Tensor& hidden, const at::Tensor& index,
                         const at::Tensor& weights, MOEQUANT_EXPERTS_PARAMS) {
  const ExpertsProblem p = check_experts_args(op, hidden, index, weights, MOEQUANT_EXPERTS_ARG_NAMES);
  TORCH_CHECK(hidden.is_cuda(), op, " (CUDA kernel): hidden_states must be a CUDA tensor");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kHalf ||
                  hidden.scalar_type() == at::kBFloat16,
              op, " (CUDA kernel): hidden_states must be float32, float16 or bfloat16, got ", hidden.scalar_type());
  ExpertsCall c;
  c.T = p.tokens.expect_int();
  c.k = p.top_k.expect_int();
  c.H = p.hidden.expect_int();
  c.I = p.intermediate.expect_int();
  c.E = p.experts.expect_int();
  c.dtype = hidden.scalar_type();
  c.transposed = transposed;
  c.gate_up = packed_stack(p.quant_type, gate_up_packed, gate_up_absmax, gate_up_absmax_scale, gate_up_absmax_offset,
                           blocksize);
  c.down = packed_stack(p.quant_type, down_packed, down_absmax, down_absmax_scale, down_absmax_offset, blocksize);
  c.act.kind = p.activation;
  c.act.interleaved = interleaved;
  c.act.alpha = static_cast<float>(act_alpha);
  c.act.limit = static_cast<float>(act_limit);
  if (gate_up_bias.has_value()) c.gate_up_bias = gate_up_bias->to(at::kFloat).contiguous();
  if (down_bias.has_value()) c.down_bias = down_bias->to(at::kFloat).contiguous();
  c.decode = !train && decode_gemv_applies(c.T * c.k, c.transposed, c.gate_up, c.down);
  if (c.decode) {
    c.decode_gate_up_lora = decode_lora(gate_up_lora_A, gate_up_lora_B, gate_up_lora_scaling, c.dtype);
    c.decode_down_lora = decode_lora(down_lora_A, down_lora_B, down_lora_scaling, c.dtype);
  } else {
    c.gate_up_lora = lora_factors(gate_up_lora_A, gate_up_lora_B, gate_up_lora_scaling, c.dtype);
    c.down_lora = lora_factors(down_lora_A, down_lora_B, down_lora_scaling, c.dtype);
  }
  c.scratch = experts_scratch_budget(c.gate_up, c.down);
  return c;
}

// The LoRA term of a projection's forward, scaling * (in A^T) B^T, as a low-rank term of the
// packed product; none when the projection has no LoRA or there are no rows.
LowRankTerm lora_forward_term(const LoraFactors& lora, const at::Tensor& in, const ExpertsRouting& r) {
  if (!lora.present() || r.num_rows == 0) return {};
  return {stack_rows_gemm(in, lora.A.transpose(1, 2), r), lora.B, static_cast<float>(lora.scaling)};
}

// The gate_up projection output with LoRA and bias, in routing order: fills h [R, 2I] and
// returns act(h) [R, I].
at::Tensor gate_up_forward(const ExpertsCall& c, const ExpertsRouting& r, const at::Tensor& x, at::Tensor& h) {
  packed_stack_gemm(x, h, c.gate_up, /*transpose_stored=*/!c.transposed, r, c.scratch,
                    lora_forward_term(c.gate_up_lora, x, r));
  return gate_up_bias_activation(h, c.gate_up_bias, r, c.act);
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, bool train, const at::Tensor& hidden,
                                                const at::Tensor& index, const at::Tensor& weights,
                                                MOEQUANT_EXPERTS_PARAMS) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const ExpertsCall c = prepare_call(op, train, hidden, index, weights, MOEQUANT_EXPERTS_ARG_NAMES);
  if (c.decode) {
    return {decode_gemv_forward(hidden, index, weights, c.gate_up, c.down, c.act,  // weights: no cast kernel
                                c.gate_up_bias, c.down_bias, c.decode_gate_up_lora, c.decode_down_lora),
            at::Tensor()};
  }
  const at::Tensor pair_weights = weights.to(at::kFloat).contiguous().view({-1});
  const ExpertsRouting r = route_pairs(op, index, c.E);
  at::Tensor gate_up_out, h;
  if (train) {
    gate_up_out = at::empty({r.num_pairs, 2 * c.I}, hidden.options());
    gate_up_out.narrow(0, r.num_rows, r.num_pairs - r.num_rows).zero_();  // sentinel rows
    h = gate_up_out.narrow(0, 0, r.num_rows);
  } else {
    h = at::empty({r.num_rows, 2 * c.I}, hidden.options());
  }
  // Each routing-order buffer is released as soon as its last reader has run: the peak is
  // what two consecutive products hold, not the whole chain.
  at::Tensor a = gate_up_forward(c, r, gather_rows(hidden.to(c.dtype), r), h);
  if (!train) h.reset();
  at::Tensor y = at::empty({r.num_rows, c.H}, hidden.options());
  packed_stack_gemm(a, y, c.down, /*transpose_stored=*/!c.transposed, r, c.scratch,
                    lora_forward_term(c.down_lora, a, r));
  a.reset();
  at::Tensor out = combine_rows(y, r, pair_weights, c.down_bias, c.T, c.dtype);
  return {out, gate_up_out};
}

// Rows scaled by float32 per-row factors, rounded back to the rows' dtype once.
at::Tensor scale_rows(const at::Tensor& rows, const at::Tensor& row_factors) {
  return (rows.to(at::kFloat) * row_factors.unsqueeze(1)).to(rows.scalar_type());
}

// A LoRA factor's gradient in the factor's dtype. Its scaling is already in the small [R, r]
// operand of the product (a pass over [R, r] instead of one over [E, D, r]).
at::Tensor lora_grad(const at::Tensor& g, at::ScalarType dtype) {
  return g.to(dtype).contiguous();
}

}  // namespace

at::Tensor experts_forward_cuda(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                                const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS) {
  return std::get<0>(forward_impl("moequant.experts_forward", /*train=*/false, hidden_states, top_k_index,
                                  top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES));
}

std::tuple<at::Tensor, at::Tensor> experts_forward_train_cuda(const at::Tensor& hidden_states,
                                                              const at::Tensor& top_k_index,
                                                              const at::Tensor& top_k_weights,
                                                              MOEQUANT_EXPERTS_PARAMS) {
  return forward_impl("moequant._experts_forward_train", /*train=*/true, hidden_states, top_k_index, top_k_weights,
                      MOEQUANT_EXPERTS_ARG_NAMES);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const std::optional<at::Tensor>& gate_up_out, MOEQUANT_EXPERTS_PARAMS) {
  const char* op = "moequant.experts_backward";
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  const ExpertsCall c =
      prepare_call(op, /*train=*/true, hidden_states, top_k_index, top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES);
  TORCH_CHECK(grad_out.sizes() == hidden_states.sizes(), op, ": grad_out must have shape ",
              dims_str(hidden_states.sizes()), " like hidden_states, got ", dims_str(grad_out.sizes()));
  TORCH_CHECK(grad_out.device() == hidden_states.device(), op, ": grad_out must be on hidden_states' device");
  const ExpertsRouting r = route_pairs(op, top_k_index, c.E);
  const auto opts = hidden_states.options();
  const at::Tensor pair_weights = top_k_weights.to(at::kFloat).contiguous().view({-1});
  const at::Tensor row_weights = pair_weights.index_select(0, r.sorted_pair.narrow(0, 0, r.num_rows));

  at::Tensor h;
  if (gate_up_out.has_value()) {
    TORCH_CHECK(gate_up_out->dim() == 2 && gate_up_out->size(0) == r.num_pairs && gate_up_out->size(1) == 2 * c.I,
                op, ": gate_up_out must be [T*k, 2I] = ", dims_str({r.num_pairs, 2 * c.I}),
                " (from _experts_forward_train), got ", dims_str(gate_up_out->sizes()));
    TORCH_CHECK(gate_up_out->device() == hidden_states.device(), op,
                ": gate_up_out must be on hidden_states' device");
    h = gate_up_out->to(c.dtype).contiguous().narrow(0, 0, r.num_rows);
  } else {
    h = at::empty({r.num_rows, 2 * c.I}, opts);
    gate_up_forward(c, r, gather_rows(hidden_states, r), h);
  }
  // Each routing-order buffer is released as soon as its last reader has run (g and z before
  // x is gathered, x before dx is allocated): the peak is what one product holds, not the chain.
  const bool has_rows = r.num_rows > 0;
  at::Tensor dh, grad_pair_weights;
  at::Tensor grad_dA = at::empty({0}, opts), grad_dB = at::empty({0}, opts);
  {
    // Down projection, transposed: z = g @ Wd_eff (unweighted), the down LoRA term
    // scaling * (g B_d) A_d folded in.
    const at::Tensor g = gather_rows(grad_out.to(c.dtype), r);  // [R, H]
    at::Tensor z = at::empty({r.num_rows, c.I}, opts);
    const at::Tensor g_down_B = c.down_lora.present() && has_rows ? stack_rows_gemm(g, c.down_lora.B, r) : at::Tensor();
    const LowRankTerm down_term =
        g_down_B.defined() ? LowRankTerm{g_down_B, c.down_lora.A.transpose(1, 2).contiguous(),
                                         static_cast<float>(c.down_lora.scaling)}
                           : LowRankTerm{};
    packed_stack_gemm(g, z, c.down, /*transpose_stored=*/c.transposed, r, c.scratch, down_term);
    ActivationGrads ag =  // with down LoRA, ag.act is z's buffer overwritten by act(h)
        gate_up_activation_backward(h, z, row_weights, g, c.down_bias, r, c.act, c.down_lora.present());
    if (c.down_lora.present()) {
      if (has_rows) {
        const at::Tensor u = stack_rows_gemm(ag.act, c.down_lora.A.transpose(1, 2), r);  // a @ A_d^T [R, r]
        const at::Tensor scaled_weights = row_weights * c.down_lora.scaling;
        grad_dB = lora_grad(stack_weight_grad(g, scale_rows(u, scaled_weights), r), c.down_lora.B_dtype);
        grad_dA = lora_grad(stack_weight_grad(scale_rows(g_down_B, scaled_weights), ag.act, r), c.down_lora.A_dtype);
      } else {
        grad_dA = at::zeros(c.down_lora.A.sizes(), opts.dtype(c.down_lora.A_dtype));
        grad_dB = at::zeros(c.down_lora.B.sizes(), opts.dtype(c.down_lora.B_dtype));
      }
    }
    dh = std::move(ag.grad_gate_up);
    grad_pair_weights = std::move(ag.grad_pair_weights);
  }
  h.reset();

  // Gate_up projection, transposed: dx = dh @ Wgu_eff, the gate_up LoRA term
  // scaling * (dh B) A folded in.
  at::Tensor grad_guA = at::empty({0}, opts), grad_guB = at::empty({0}, opts);
  LowRankTerm gate_up_term;
  if (c.gate_up_lora.present()) {
    const LoraFactors& l = c.gate_up_lora;
    if (has_rows) {
      const at::Tensor dh_B = stack_rows_gemm(dh, l.B, r);  // [R, rank]
      const at::Tensor x = gather_rows(hidden_states, r);
      const at::Tensor u = stack_rows_gemm(x, l.A.transpose(1, 2), r);  // x @ A^T [R, r]
      grad_guB = lora_grad(stack_weight_grad(dh, u.mul(l.scaling), r), l.B_dtype);
      grad_guA = lora_grad(stack_weight_grad(dh_B.mul(l.scaling), x, r), l.A_dtype);
      gate_up_term = {dh_B, l.A.transpose(1, 2).contiguous(), static_cast<float>(l.scaling)};
    } else {
      grad_guA = at::zeros(l.A.sizes(), opts.dtype(l.A_dtype));
      grad_guB = at::zeros(l.B.sizes(), opts.dtype(l.B_dtype));
    }
  }
  at::Tensor dx = at::empty({r.num_rows, c.H}, opts);
  packed_stack_gemm(dh, dx, c.gate_up, /*transpose_stored=*/c.transposed, r, c.scratch, gate_up_term);
  dh.reset();
  at::Tensor grad_hidden = combine_rows(dx, r, at::Tensor(), at::Tensor(), c.T, c.dtype);
  at::Tensor grad_weights = grad_pair_weights.view({c.T, c.k}).to(top_k_weights.scalar_type());
  return {grad_hidden, grad_weights, grad_guA, grad_guB, grad_dA, grad_dB};
}

}  // namespace moequant
