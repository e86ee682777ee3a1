#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <numeric>
#include <type_traits>

#include "experts_common.cuh"
#include "experts_grouped_gemm.cuh"
#include "experts_nf4_gemm.cuh"
#include "experts_stack_gemm.cuh"

namespace moequant {

QuantStackView PackedStack::view() const {
  QuantStackView v;
  v.type = type;
  v.data = packed.const_data_ptr();
  v.scales.blocks_per_matrix = is_4bit(type) ? rows * cols / blocksize : rows;
  v.scales.groups_per_matrix = (v.scales.blocks_per_matrix + kDoubleQuantGroup - 1) / kDoubleQuantGroup;
  if (double_quant()) {
    v.scales.code = absmax.const_data_ptr<uint8_t>();
    v.scales.scale = absmax_scale.const_data_ptr<float>();
    v.scales.offset = absmax_offset.const_data_ptr<float>();
  } else {
    v.scales.absmax = absmax.const_data_ptr<float>();
  }
  if (is_4bit(type)) v.codebook = codebook16(type);
  v.rows = rows;
  v.cols = cols;
  v.blocksize = blocksize;
  return v;
}

ScratchBudget experts_scratch_budget(const PackedStack& gate_up, const PackedStack& down) {
  if (const char* v = std::getenv("MOEQUANT_EXPERTS_SCRATCH_BYTES")) {
    const long long bytes = std::atoll(v);
    if (bytes > 0) return {bytes, /*fixed=*/true};
  }
  const int64_t layer_bf16 =
      2 * (gate_up.experts * gate_up.rows * gate_up.cols + down.experts * down.rows * down.cols);
  return {std::max<int64_t>(layer_bf16 / 20, std::min<int64_t>(layer_bf16, int64_t{8} << 20)), /*fixed=*/false};
}

namespace {

// A piece of work: experts active[first, first+count) with stored rows [row_begin, row_end).
// Row-sliced pieces hold one expert.
struct Chunk {
  int64_t first = 0, count = 0, row_begin = 0, row_end = 0;
};

// Experts a chunk needs for its GEMM to span a few waves of output tiles on every SM: with about
// one wave, the last one leaves most SMs idle (olmoe T=4096, 512 rows an expert: chunks of 5
// experts ran the products 1.6x slower than one grouped_mm over the whole stack).
int64_t experts_to_fill(const ExpertsRouting& r, int64_t out_dim) {
  constexpr int64_t kWaves = 4, kTileElems = 128 * 256;  // torch's large bf16 grouped GEMM tile
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_rows = (kWaves * sms * kTileElems + out_dim - 1) / std::max<int64_t>(out_dim, 1);
  const int64_t mean_rows = std::max<int64_t>(1, r.num_rows / std::max<int64_t>(1, r.active_experts.size()));
  return (target_rows + mean_rows - 1) / mean_rows;
}

std::vector<Chunk> plan_chunks(const PackedStack& w, const ExpertsRouting& r, int64_t in_dim, int64_t out_dim,
                               int64_t elem_bytes, const ScratchBudget& budget) {
  std::vector<Chunk> chunks;
  const int64_t n_active = static_cast<int64_t>(r.active_experts.size());
  const int64_t row_bytes = w.cols * elem_bytes;
  const int64_t expert_bytes = std::max<int64_t>(w.rows * row_bytes, 1);
  if (expert_bytes <= budget.bytes) {
    int64_t per_chunk = budget.bytes / expert_bytes;
    if (!budget.fixed) {
      // More experts per chunk where that fills the GPU, up to the bytes of the routed rows the
      // product reads: the scratch then never outgrows the activations a call holds anyway
      // (olmoe T=4096: 16 experts a chunk, 134 MB; the f+b peak 487 -> 555 MB, bf16 739 MB).
      const int64_t rows_bytes = r.num_rows * in_dim * elem_bytes;
      per_chunk = std::max(per_chunk, std::min(experts_to_fill(r, out_dim), rows_bytes / expert_bytes));
    }
    per_chunk = std::min<int64_t>(per_chunk, kMaxListedMatrices);
    for (int64_t i = 0; i < n_active; i += per_chunk) {
      chunks.push_back({i, std::min(per_chunk, n_active - i), 0, w.rows});
    }
    return chunks;
  }
  // Equal slices of whole 4-bit blocks (g rows hold a multiple of B elements) and of 128 rows: a
  // slice's rows are output columns of the GEMM, and a column offset that is not a multiple of
  // 8 elements misaligns the output for cuBLAS, which then falls back to an sm75 align1 kernel
  // (mixtral, H100: 21.5 of 24.4 ms per call before this rounding).
  const int64_t align =
      is_4bit(w.type) ? std::lcm<int64_t>(w.blocksize / std::gcd(w.cols, w.blocksize), 128) : int64_t{128};
  const int64_t budget_rows = std::max<int64_t>(align, (budget.bytes / row_bytes) / align * align);
  const int64_t num_slices = (w.rows + budget_rows - 1) / budget_rows;
  const int64_t slice_rows = ((w.rows + num_slices - 1) / num_slices + align - 1) / align * align;
  for (int64_t i = 0; i < n_active; ++i) {
    for (int64_t r0 = 0; r0 < w.rows; r0 += slice_rows) chunks.push_back({i, 1, r0, std::min(w.rows, r0 + slice_rows)});
  }
  return chunks;
}

// Dequantizes the chunk's experts (or row slice) into the front of `scratch`.
void dequant_chunk(const QuantStackView& view, const ExpertsRouting& r, const Chunk& c, at::Tensor& scratch) {
  MatrixSelection selection;
  selection.listed = true;
  selection.count = static_cast<int32_t>(c.count);
  for (int64_t g = 0; g < c.count; ++g) selection.ids[g] = r.active_experts[c.first + g];
  at::Tensor dst = scratch.narrow(0, 0, c.count * (c.row_end - c.row_begin) * view.cols);
  dequant_matrices(view, selection, c.row_begin, c.row_end, dst, /*streaming_store=*/false);
}

// Rung (a): chunk by chunk through the bounded dequant scratch.
void scratch_stack_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                        const ExpertsRouting& r, const ScratchBudget& budget) {
  const QuantStackView view = w.view();
  // One scratch buffer, reused chunk after chunk in stream order. (Double-buffering on a side
  // stream, each buffer half the budget, measured slower on H100: twice the chunks, and these
  // calls are launch-bound below a few thousand tokens.)
  const std::vector<Chunk> chunks = plan_chunks(w, r, in.size(1), out.size(1), in.element_size(), budget);
  int64_t buffer_elems = 0;
  for (const Chunk& c : chunks) buffer_elems = std::max(buffer_elems, c.count * (c.row_end - c.row_begin) * w.cols);
  at::Tensor scratch = at::empty({buffer_elems}, in.options());

  // Group offsets of every multi-expert chunk, relative to the chunk's first row: one copy.
  const bool grouped = grouped_mm_enabled(in.scalar_type());
  std::vector<int64_t> offs_start(chunks.size(), -1);
  at::Tensor offs_device;
  if (grouped) {
    std::vector<int32_t> offs;
    for (size_t i = 0; i < chunks.size(); ++i) {
      const Chunk& c = chunks[i];
      if (c.count < 2) continue;
      offs_start[i] = static_cast<int64_t>(offs.size());
      const int64_t base = r.row_offsets[r.active_experts[c.first]];
      for (int64_t g = 0; g < c.count; ++g) {
        offs.push_back(static_cast<int32_t>(r.row_offsets[r.active_experts[c.first + g] + 1] - base));
      }
    }
    if (!offs.empty()) {
      at::Tensor host = at::empty({static_cast<int64_t>(offs.size())}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
      std::copy(offs.begin(), offs.end(), host.mutable_data_ptr<int32_t>());
      offs_device = host.to(in.device(), /*non_blocking=*/true);
    }
  }

  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& c = chunks[i];
    dequant_chunk(view, r, c, scratch);
    const int64_t slice_rows = c.row_end - c.row_begin;
    const at::Tensor stored = scratch.narrow(0, 0, c.count * slice_rows * w.cols).view({c.count, slice_rows, w.cols});
    const int64_t row0 = r.row_offsets[r.active_experts[c.first]];
    const int64_t row1 = r.row_offsets[r.active_experts[c.first + c.count - 1] + 1];
    const at::Tensor mats = transpose_stored ? stored.transpose(1, 2) : stored;
    const at::Tensor rows_in = in.narrow(0, row0, row1 - row0);
    if (offs_start[i] >= 0 && grouped_mm_operands_ok(rows_in, mats)) {
      at::Tensor out_rows = out.narrow(0, row0, row1 - row0);
      grouped_mm_into(rows_in, mats, offs_device.narrow(0, offs_start[i], c.count), out_rows);
      continue;
    }
    for (int64_t g = 0; g < c.count; ++g) {
      const int32_t e = r.active_experts[c.first + g];
      const int64_t e0 = r.row_offsets[e], n = r.rows_of(e);
      const at::Tensor x = in.narrow(0, e0, n);
      at::Tensor y = out.narrow(0, e0, n);
      const at::Tensor s = stored.select(0, g);  // [slice_rows, K]
      if (transpose_stored) {  // stored rows are output features
        at::Tensor y_cols = y.narrow(1, c.row_begin, slice_rows);
        at::mm_out(y_cols, x, s.t());
      } else if (c.row_begin == 0) {  // stored rows are input features: accumulate over slices
        at::mm_out(y, x.narrow(1, 0, slice_rows), s);
      } else {
        y.addmm_(x.narrow(1, c.row_begin, slice_rows), s);
      }
    }
  }
}

}  // namespace

void packed_stack_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                       const ExpertsRouting& r, const ScratchBudget& scratch, const LowRankTerm& low_rank) {
  const int64_t in_dim = transpose_stored ? w.cols : w.rows;
  const int64_t out_dim = transpose_stored ? w.rows : w.cols;
  TORCH_CHECK(in.dim() == 2 && in.size(0) == r.num_rows && in.size(1) == in_dim,
              "moequant: packed_stack_gemm input must be ", dims_str({r.num_rows, in_dim}), ", got ", dims_str(in.sizes()));
  TORCH_CHECK(out.is_contiguous() && out.size(0) == r.num_rows && out.size(1) == out_dim &&
                  out.scalar_type() == in.scalar_type(),
              "moequant: packed_stack_gemm output must be contiguous ", dims_str({r.num_rows, out_dim}));
  if (r.num_rows == 0 || out_dim == 0) return;
  if (in_dim == 0) {
    out.zero_();
  } else if (nf4_grouped_gemm_applies(in, w, transpose_stored, r)) {  // rung (b): no scratch at all
    nf4_grouped_gemm(in, out, w, transpose_stored, r);
  } else {
    scratch_stack_gemm(in, out, w, transpose_stored, r, scratch);
  }
  if (low_rank.present()) add_low_rank_rows(out, low_rank, r);
}

}  // namespace moequant
