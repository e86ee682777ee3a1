// Products of activation rows with one quantized matrix of a stack, without an fp32 copy of the
// whole matrix:
// - few rows (decode, small batches): each stored row, or a piece of it, is decoded into L1 and
//   used at once by every activation row (one row: decoded straight into its dot product);
// - more rows: pieces of about a million weights are decoded into one reused buffer and
//   multiplied with ATen's BLAS-backed mm. Dequantizing a whole expert instead spends most of
//   its time faulting in fresh pages (an fp32 mixtral expert is 470 MB).
// The decoded values are exactly dequant_expert's, and no sum depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_loops.h"

namespace moequant {
namespace {

constexpr int64_t kPieceWeights = int64_t{1} << 20;

// 4-bit rows of whole 16-element groups decode in CpuLoops' split order (cheaper); the other
// operand is put in the same order. Block boundaries fall on whole groups (blocksize >= 32).
bool use_split_order(const QuantMatrices& m, int64_t cols) {
  return is_4bit(m.type) && cols % 16 == 0 && m.block_numel % 16 == 0;
}

// x (count a multiple of 16) in split order: in each group of 16, the even elements, then the odd.
std::vector<float> to_split_order(const float* x, int64_t count) {
  std::vector<float> out(count);
  for (int64_t g = 0; g < count; g += 16) {
    for (int j = 0; j < 8; ++j) {
      out[g + j] = x[g + 2 * j];
      out[g + 8 + j] = x[g + 2 * j + 1];
    }
  }
  return out;
}

// out[r, n] = x[r, :] . S[n, :]: each stored row decoded once, then dotted with every x row (in
// split order, x too: a dot product does not care which order its terms come in). A lone 4-bit
// row decodes straight into its sums, with the same result as the two steps.
void times_transposed_on_the_fly(const CpuLoops& loops, const QuantMatrices& m, int64_t matrix, int64_t rows,
                                 int64_t cols, const float* x, int64_t x_rows, float* out) {
  const bool split = use_split_order(m, cols);
  std::vector<float> x_split;
  if (split) x_split = to_split_order(x, x_rows * cols);
  const float* xs = split ? x_split.data() : x;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1));
  if (split && x_rows == 1) {
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) out[n] = loops.row_dot_4bit_split(m, matrix, n * cols, cols, xs);
    });
    return;
  }
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    std::vector<float> row(cols);
    for (int64_t n = first; n < last; ++n) {
      loops.decode(m, matrix, n * cols, cols, row.data(), split);
      loops.dots(row.data(), xs, cols, x_rows, cols, out + n, rows);
    }
  });
}

// out[r, c] = sum_i x[r, i] * S[i, c]. The stored rows go in fixed groups of kGroupRows, each
// summed in row order into its own partial output, and the partials are added in group order:
// the sums do not depend on the thread count. Work units are (group, column range); the
// partials are kept in split order when the rows decode in it.
void times_stored_on_the_fly(const CpuLoops& loops, const QuantMatrices& m, int64_t matrix, int64_t rows,
                             int64_t cols, const float* x, int64_t x_rows, float* out) {
  constexpr int64_t kGroupRows = 256;
  constexpr int kStep = CpuLoops::kMaxAxpyRows;
  const bool split = use_split_order(m, cols);
  const int64_t align = split ? 16 : 8;  // column ranges: whole split groups, whole bytes
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows;
  const int64_t wanted = (4 * std::max<int64_t>(1, at::get_num_threads()) + groups - 1) / groups;
  const int64_t ranges = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, cols / 256));
  const int64_t columns = ((cols + ranges - 1) / ranges + align - 1) / align * align;
  std::vector<float> partial(groups * x_rows * cols, 0.0f);
  at::parallel_for(0, groups * ranges, 1, [&](int64_t first, int64_t last) {
    std::vector<float> piece(kStep * columns);
    float coefficients[kStep];
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t g = unit / ranges, c0 = (unit % ranges) * columns;
      if (c0 >= cols) continue;
      const int64_t width = std::min(columns, cols - c0);
      float* y = partial.data() + g * x_rows * cols + c0;
      for (int64_t i = g * kGroupRows, end = std::min(rows, i + kGroupRows); i < end; i += kStep) {
        const int step = static_cast<int>(std::min<int64_t>(kStep, end - i));
        for (int j = 0; j < step; ++j) {
          loops.decode(m, matrix, (i + j) * cols + c0, width, piece.data() + j * columns, split);
        }
        for (int64_t r = 0; r < x_rows; ++r) {
          for (int j = 0; j < step; ++j) coefficients[j] = x[r * rows + i + j];
          loops.axpys(coefficients, step, piece.data(), columns, y + r * cols, width);
        }
      }
    }
  });
  for (int64_t g = 1; g < groups; ++g) {
    const float* p = partial.data() + g * x_rows * cols;
    for (int64_t e = 0; e < x_rows * cols; ++e) partial[e] = partial[e] + p[e];
  }
  if (!split) {
    std::copy(partial.begin(), partial.begin() + x_rows * cols, out);
    return;
  }
  for (int64_t q = 0; q < x_rows * cols; q += 16) {
    for (int j = 0; j < 8; ++j) {
      out[q + 2 * j] = partial[q + j];
      out[q + 2 * j + 1] = partial[q + 8 + j];
    }
  }
}

// Stored rows [r0, r0 + count) of the matrix decoded into `piece` (parallel over rows).
void decode_rows(const CpuLoops& loops, const QuantMatrices& m, int64_t matrix, int64_t cols, int64_t r0,
                 int64_t count, float* piece) {
  at::parallel_for(0, count, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t first, int64_t last) {
                     loops.decode(m, matrix, (r0 + first) * cols, (last - first) * cols, piece + first * cols);
                   });
}

}  // namespace

at::Tensor quant_matmul_cpu(const QuantMatrices& m, int64_t matrix, int64_t rows, int64_t cols, const at::Tensor& x,
                            bool times_stored, int64_t on_the_fly_rows) {
  const int64_t x_rows = x.size(0);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros({x_rows, times_stored ? cols : rows}, x.options());
  if (x_rows == 0 || rows == 0 || cols == 0) return out;
  const CpuLoops loops = CpuLoops::for_this_cpu();
  if (x_rows <= on_the_fly_rows) {
    (times_stored ? times_stored_on_the_fly : times_transposed_on_the_fly)(
        loops, m, matrix, rows, cols, xc.const_data_ptr<float>(), x_rows, out.mutable_data_ptr<float>());
    return out;
  }
  const int64_t piece_rows = std::clamp<int64_t>(kPieceWeights / std::max<int64_t>(cols, 1), 1, rows);
  at::Tensor piece = at::empty({piece_rows, cols}, x.options());
  for (int64_t r0 = 0; r0 < rows; r0 += piece_rows) {
    const int64_t count = std::min(piece_rows, rows - r0);
    const at::Tensor w = piece.narrow(0, 0, count);
    decode_rows(loops, m, matrix, cols, r0, count, w.mutable_data_ptr<float>());
    if (times_stored) {
      out.addmm_(xc.narrow(1, r0, count), w);  // pieces added in order
    } else {
      out.narrow(1, r0, count).copy_(xc.mm(w.t()));
    }
  }
  return out;
}

}  // namespace moequant
