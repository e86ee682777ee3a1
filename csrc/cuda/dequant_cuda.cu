// CUDA kernels of dequant_expert (every format) and of the experts' scratch rung: whole matrices or
// row slices of a stack into a dense output. The output is split into 16-byte chunks (8
// bf16/fp16 values, or 4 fp32); each warp decodes one tile of 32 * kChunks consecutive chunks of
// one matrix (dequant_warp_tile / dequant_int8_warp_tile, quant_decode.cuh), blockIdx.y picks
// the matrix, and the grid covers the whole output, one tile per warp. H200
// (benchmarks/nf4_dequant_variants.cu, same-run copy = 1.0): one tile per warp 0.94-1.02 against
// 0.87-0.94 for a persistent grid-stride loop over the same tiles; 4/8/16 chunks per lane,
// 128/256/512 threads, plain stores and TMA bulk stores from shared memory all landed within 2%
// of the grid-stride loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../kernels.h"
#include "../quant_checks.h"
#include "cuda_utils.cuh"
#include "dequant_matrices.cuh"
#include "quant_decode.cuh"

// fp32, fp16, bf16 only (the checks reject other dtypes; no dead double kernels).
#define MOEQUANT_DISPATCH_DEQUANT_TYPES(TYPE, NAME, ...)                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moequant {
namespace {

constexpr int kDequantThreads = 256;
constexpr int kDequantChunks = 8;  // 16-byte output chunks per lane: 8 loads in flight before the first decode
constexpr int64_t kChunksPerCta = int64_t{kDequantThreads} * kDequantChunks;
constexpr int64_t kMaxGridY = 65535;

template <typename T, bool kDoubleQuant, bool kStreamingStore>
__global__ void __launch_bounds__(kDequantThreads)
dequant_4bit_kernel(const uint8_t* __restrict__ packed, const BlockScales scales, const Codebook16 codebook,
                    const MatrixSelection selection, T* __restrict__ out, int64_t matrix_numel, int64_t first_elem,
                    int64_t chunks_per_matrix, int log2_chunks_per_block, int log2_blocksize) {
  constexpr int kElems = 16 / sizeof(T);
  __shared__ float values[16];
  __shared__ float map[kDoubleQuant ? 256 : 1];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) values[i] = codebook.v[i];
  }
  if constexpr (kDoubleQuant) fill_dynamic_map(map);
  __syncthreads();
  const int64_t m = selection(blockIdx.y);
  const MatrixScales<kDoubleQuant> matrix_scales(scales, m, map);
  const int64_t src0 = (m * matrix_numel + first_elem) / kElems;  // first chunk of the slice
  const int64_t warp = (int64_t{blockIdx.x} * kDequantThreads + threadIdx.x) / 32;
  dequant_warp_tile<T, kDequantChunks, kStreamingStore, kDoubleQuant>(
      reinterpret_cast<const PackedChunk<T>*>(packed) + src0, matrix_scales, first_elem >> log2_blocksize,
      reinterpret_cast<uint4*>(out) + int64_t{blockIdx.y} * chunks_per_matrix, warp * 32 * kDequantChunks,
      chunks_per_matrix, log2_chunks_per_block, values);
}

template <typename T, bool kStreamingStore>
__global__ void __launch_bounds__(kDequantThreads)
dequant_int8_kernel(const int8_t* __restrict__ codes, const float* __restrict__ row_absmax,
                    const MatrixSelection selection, T* __restrict__ out, int64_t rows, int64_t cols,
                    int64_t row_begin, int64_t chunks_per_matrix, RowDivider divider, bool chunk_in_one_row) {
  constexpr int kElems = 16 / sizeof(T);
  const int64_t first_row = selection(blockIdx.y) * rows + row_begin;
  const int64_t warp = (int64_t{blockIdx.x} * kDequantThreads + threadIdx.x) / 32;
  dequant_int8_warp_tile<T, kDequantChunks, kStreamingStore>(
      reinterpret_cast<const Int8Chunk<T>*>(codes + first_row * cols), row_absmax + first_row, divider,
      chunk_in_one_row, reinterpret_cast<uint4*>(out) + int64_t{blockIdx.y} * chunks_per_matrix,
      warp * 32 * kDequantChunks, chunks_per_matrix);
  static_assert(kElems * sizeof(T) == 16);
}

// int8 slices whose chunks do not start 8-byte aligned (rows * cols not a multiple of the chunk):
// one element per thread.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
dequant_int8_elementwise_kernel(const int8_t* __restrict__ codes, const float* __restrict__ row_absmax,
                                const MatrixSelection selection, T* __restrict__ out, int64_t rows, int64_t cols,
                                int64_t row_begin, int64_t slice_numel) {
  const int64_t first_row = selection(blockIdx.y) * rows + row_begin;
  T* const dst = out + int64_t{blockIdx.y} * slice_numel;
  for (int64_t i = int64_t{blockIdx.x} * kDequantThreads + threadIdx.x; i < slice_numel;
       i += int64_t{gridDim.x} * kDequantThreads) {
    const int64_t r = first_row + i / cols;
    dst[i] = from_float<T>(int8_decode(codes[first_row * cols + i], row_absmax[r]));
  }
}

template <typename T, bool kStreamingStore>
void launch_dequant(const QuantStackView& s, const MatrixSelection& selection, int64_t row_begin, int64_t row_end,
                    T* out) {
  constexpr int kElems = 16 / sizeof(T);
  const int64_t slice_numel = (row_end - row_begin) * s.cols;
  const int64_t chunks = slice_numel / kElems;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, (chunks + kChunksPerCta - 1) / kChunksPerCta)),
                  static_cast<unsigned>(selection.count));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (is_4bit(s.type)) {
    const int log2_blocksize = __builtin_ctzll(static_cast<unsigned long long>(s.blocksize));
    const int log2_chunks_per_block = __builtin_ctzll(static_cast<unsigned long long>(s.blocksize / kElems));
    auto go = [&](auto kernel) {
      kernel<<<grid, kDequantThreads, 0, stream>>>(static_cast<const uint8_t*>(s.data), s.scales, s.codebook,
                                                   selection, out, s.rows * s.cols, row_begin * s.cols, chunks,
                                                   log2_chunks_per_block, log2_blocksize);
    };
    if (s.scales.double_quant()) go(dequant_4bit_kernel<T, true, kStreamingStore>);
    else go(dequant_4bit_kernel<T, false, kStreamingStore>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int8_t* codes = static_cast<const int8_t*>(s.data);
  // The vector kernel needs every slice to start on a chunk of codes and of output, and 32-bit
  // element offsets within a slice.
  const bool vector = (s.rows * s.cols) % kElems == 0 && (row_begin * s.cols) % kElems == 0 &&
                      slice_numel % kElems == 0 && slice_numel < (int64_t{1} << 32) && is_aligned(codes, 16) &&
                      s.cols < (int64_t{1} << 32);
  if (vector) {
    dequant_int8_kernel<T, kStreamingStore><<<grid, kDequantThreads, 0, stream>>>(
        codes, s.scales.absmax, selection, out, s.rows, s.cols, row_begin, chunks,
        RowDivider(static_cast<uint32_t>(s.cols)), s.cols % kElems == 0);
  } else {
    const dim3 grid_e(static_cast<unsigned>(std::clamp<int64_t>((slice_numel + kDequantThreads - 1) / kDequantThreads,
                                                                1, 65536)),
                      static_cast<unsigned>(selection.count));
    dequant_int8_elementwise_kernel<T><<<grid_e, kDequantThreads, 0, stream>>>(
        codes, s.scales.absmax, selection, out, s.rows, s.cols, row_begin, slice_numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dequant_matrices(const QuantStackView& stack, const MatrixSelection& selection, int64_t row_begin,
                      int64_t row_end, at::Tensor& out, bool streaming_store) {
  TORCH_CHECK(selection.count > 0 && selection.count <= kMaxGridY, "moequant: dequant_matrices takes 1 to ",
              kMaxGridY, " matrices per launch");
  TORCH_CHECK(is_aligned(out.const_data_ptr(), 16), "moequant: dequant_matrices needs a 16-byte aligned output");
  if (row_end <= row_begin || stack.cols == 0) return;
  MOEQUANT_DISPATCH_DEQUANT_TYPES(out.scalar_type(), "moequant_dequant_matrices", [&] {
    using T = typename native<scalar_t>::type;
    T* dst = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    if (streaming_store) launch_dequant<T, true>(stack, selection, row_begin, row_end, dst);
    else launch_dequant<T, false>(stack, selection, row_begin, row_end, dst);
  });
}

at::Tensor dequant_expert_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::ScalarType dtype, std::optional<int64_t> expert, c10::string_view quant_type,
                               const std::optional<at::Tensor>& absmax_scale,
                               const std::optional<at::Tensor>& absmax_offset) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape =
      check_dequant_args(packed, absmax, blocksize, dtype, expert, type, absmax_scale, absmax_offset);
  TORCH_CHECK(packed.is_cuda(), "moequant.dequant_expert (CUDA kernel): packed must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = contiguous_aligned16(packed);
  const at::Tensor a = absmax.contiguous();
  const std::optional<at::Tensor> scale = absmax_scale ? std::optional(absmax_scale->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> offset = absmax_offset ? std::optional(absmax_offset->contiguous()) : std::nullopt;
  at::Tensor out = at::empty_symint(dequant_output_sizes(shape, expert), p.options().dtype(dtype));
  const int64_t matrices = shape.matrices().expect_int();
  const int64_t rows = shape.rows.expect_int(), cols = shape.cols.expect_int();
  if (out.numel() == 0) return out;
  QuantStackView s;
  s.type = type;
  s.data = p.const_data_ptr();
  s.scales = block_scales_of(shape, blocksize, a, scale, offset);
  if (is_4bit(type)) s.codebook = codebook16(type);
  s.rows = rows;
  s.cols = cols;
  s.blocksize = blocksize;
  // 64-bit offsets throughout: a stack can exceed 2^31 elements. int8 slices keep 32-bit element
  // offsets: a matrix of more elements is decoded in row slices.
  const int64_t slice_rows =
      is_4bit(type) ? rows : std::max<int64_t>(1, std::min<int64_t>(rows, ((int64_t{1} << 31) / std::max<int64_t>(cols, 1))));
  const int64_t first = expert.value_or(0), count = expert.has_value() ? 1 : matrices;
  at::Tensor flat = out.view({count, rows * cols});
  if (is_4bit(type) && !s.scales.double_quant()) {
    // Plain 4-bit statistics hold no per-matrix state: the selected matrices decode as one matrix
    // of count * N rows, one 1-D grid over the whole output (no tail tile per matrix).
    QuantStackView one_matrix = s;
    one_matrix.data = p.const_data_ptr<uint8_t>() + first * (rows * cols / 2);
    one_matrix.scales.absmax += first * s.scales.blocks_per_matrix;
    one_matrix.scales.blocks_per_matrix *= count;
    one_matrix.rows = count * rows;
    MatrixSelection all;
    all.count = 1;
    dequant_matrices(one_matrix, all, 0, count * rows, out, /*streaming_store=*/true);
    return out;
  }
  for (int64_t m0 = 0; m0 < count; m0 += kMaxGridY) {
    MatrixSelection sel;
    sel.first = first + m0;
    sel.count = static_cast<int32_t>(std::min<int64_t>(kMaxGridY, count - m0));
    for (int64_t r0 = 0; r0 < rows; r0 += slice_rows) {
      const int64_t r1 = std::min(rows, r0 + slice_rows);
      if (r0 == 0 && r1 == rows) {
        at::Tensor dst = flat.narrow(0, m0, sel.count);
        dequant_matrices(s, sel, r0, r1, dst, /*streaming_store=*/true);
      } else {  // one matrix at a time: its slice is contiguous in the output
        for (int64_t m = 0; m < sel.count; ++m) {
          MatrixSelection one;
          one.first = sel.first + m;
          one.count = 1;
          at::Tensor dst = flat[m0 + m].narrow(0, r0 * cols, (r1 - r0) * cols);
          if (!is_aligned(dst.const_data_ptr(), 16)) {  // rare: a slice starting mid-chunk
            at::Tensor tmp = at::empty({(r1 - r0) * cols}, out.options());
            dequant_matrices(s, one, r0, r1, tmp, true);
            dst.copy_(tmp);
          } else {
            dequant_matrices(s, one, r0, r1, dst, true);
          }
        }
      }
    }
  }
  return out;
}

}  // namespace moequant
