// Small helpers shared by moequant's CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

namespace moequant {

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// A contiguous tensor whose data pointer is 16-byte aligned (vector loads); copies only when a
// view starts at an unaligned offset.
inline at::Tensor contiguous_aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (!is_aligned(c.const_data_ptr(), 16)) c = c.clone();
  return c;
}

// Small shared-memory tables that lanes index at data-dependent rows are kept as 16 interleaved
// copies of 8-byte entries: (row r, copy c) at byte (r * 16 + c) * 8, 128 bytes a row. Lane l reads
// copy l % 16, so the 16 lanes of a half-warp (one LDS.64 wavefront) hit 16 different bank pairs
// whatever their rows; with one copy, lanes reading rows 16 apart collide.
constexpr int kLaneTableCopies = 16;
constexpr int kLaneTableEntryBytes = 8;

// The calling lane's copy, as a byte offset within a row.
__device__ __forceinline__ uint32_t lane_table_copy_offset() {
  return threadIdx.x % kLaneTableCopies * kLaneTableEntryBytes;
}

// Byte offset of a row in the lane's copy: `row_bits` holds the row times the row pitch (shifted
// left by 7) among other bits, kRowMask keeps the row, and the copy offset is or-ed in, all in
// one LOP3.
template <uint32_t kRowMask>
__device__ __forceinline__ uint32_t lane_table_offset(uint32_t row_bits, uint32_t copy_offset) {
  static_assert((kRowMask & (kLaneTableCopies * kLaneTableEntryBytes - 1)) == 0, "the row bits clear the copy");
  uint32_t offset;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;"  // (a & b) | c
      : "=r"(offset)
      : "r"(row_bits), "n"(kRowMask), "r"(copy_offset));
  return offset;
}

// Grid size for a grid-stride loop: enough CTAs to fill the device a few times over.
inline int64_t grid_for(int64_t work_items, int threads) {
  const int64_t needed = (work_items + threads - 1) / threads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{sms} * 16));
}

// Occupancy per (kernel, device, threads, dynamic smem), kept for the process: the decode path
// sizes its grids on every token, where a driver query per launch shows in the host time.
struct OccupancyCache {
  std::mutex mutex;
  std::map<std::tuple<const void*, int, int, int>, int> occupancy;  // (kernel, device, threads, smem)
  static OccupancyCache& get() {
    static OccupancyCache cache;
    return cache;
  }
};

// Dynamic shared memory each kernel was opted in to, per device, kept for the process.
struct DynamicSmemOptIns {
  std::mutex mutex;
  std::map<std::pair<const void*, int>, int> bytes;  // (kernel, device) -> bytes opted in
  static DynamicSmemOptIns& get() {
    static DynamicSmemOptIns opt_ins;
    return opt_ins;
  }
};

// Opts `kernel` in to `bytes` of dynamic shared memory on the current device (required once static
// plus dynamic shared memory exceed 48 KiB), calling the driver only the first time a kernel needs
// more than it was given: decode launches on every token. Call it before persistent_grid, whose
// occupancy query honours the opt-in.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, int bytes) {
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), static_cast<int>(c10::cuda::current_device()));
  DynamicSmemOptIns& opt_ins = DynamicSmemOptIns::get();
  std::lock_guard<std::mutex> lock(opt_ins.mutex);
  int& allowed = opt_ins.bytes[key];
  if (bytes <= allowed) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  allowed = bytes;
}

// Enough CTAs to fill every SM once at the kernel's occupancy (the loop strides over the rest).
template <typename Kernel>
inline int64_t persistent_grid(Kernel kernel, int threads, int64_t ctas_needed, int dynamic_smem = 0) {
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), static_cast<int>(c10::cuda::current_device()),
                                   threads, dynamic_smem);
  OccupancyCache& cache = OccupancyCache::get();
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto it = cache.occupancy.find(key);
    if (it != cache.occupancy.end()) {
      per_sm = it->second;
    } else {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
      cache.occupancy.emplace(key, per_sm);
    }
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(ctas_needed, int64_t{sms} * std::max(per_sm, 1)));
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// kVec consecutive elements of a row as floats (and back), in 16-byte pieces where kVec elements
// fill whole pieces. Kernels that stream rows once are bound by the bytes each thread keeps in
// flight: mixtral's activation kernels moved about 60% of the H100's HBM bandwidth taking one
// element a thread, 87% taking 16 bytes.
template <int kVec, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[kVec]) {
  constexpr int kPiece = 16 / sizeof(T);
  if constexpr (kVec % kPiece == 0) {
    struct alignas(16) Piece { T v[kPiece]; };
#pragma unroll
    for (int j = 0; j < kVec / kPiece; ++j) {
      const Piece piece = reinterpret_cast<const Piece*>(p)[j];
#pragma unroll
      for (int k = 0; k < kPiece; ++k) f[j * kPiece + k] = to_float(piece.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) f[k] = to_float(p[k]);
  }
}

template <int kVec, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[kVec]) {
  constexpr int kPiece = 16 / sizeof(T);
  if constexpr (kVec % kPiece == 0) {
    struct alignas(16) Piece { T v[kPiece]; };
#pragma unroll
    for (int j = 0; j < kVec / kPiece; ++j) {
      Piece piece;
#pragma unroll
      for (int k = 0; k < kPiece; ++k) piece.v[k] = from_float<T>(f[j * kPiece + k]);
      reinterpret_cast<Piece*>(p)[j] = piece;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) p[k] = from_float<T>(f[k]);
  }
}

// Elements of T a thread takes of rows of `row_elems`: 16 bytes where every row starts on a
// 16-byte boundary of every buffer the kernel reads or writes (rows of whole pieces, aligned
// bases), else one.
template <typename T>
inline int row_vector_width(int64_t row_elems, std::initializer_list<const void*> buffers) {
  constexpr int kVec = 16 / sizeof(T);
  if (row_elems % kVec != 0) return 1;
  for (const void* b : buffers) {
    if (reinterpret_cast<uintptr_t>(b) % 16 != 0) return 1;
  }
  return kVec;
}

// Runs f with row_vector_width's result as a compile-time constant (1 or 16 / sizeof(T)).
template <typename T, typename F>
inline void dispatch_vector_width(int width, F&& f) {
  if (width == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 16 / static_cast<int>(sizeof(T))>{});
  }
}

// ATen scalar type -> CUDA native type.
template <typename T> struct native { using type = T; };
template <> struct native<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct native<at::Half> { using type = __half; };

// d += a (16x16, row-major fragments) * b (16x8, column-major fragments), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace moequant
