// Hopper warpgroup MMA (wgmma, sm_90a) with the A operand in registers or in shared memory and B
// in shared memory, plus the fences and the shared-memory matrix descriptors they need. Callers compile these only
// where __CUDA_ARCH_FEAT_SM90_ALL is defined (the sm_90a pass); see MOEQUANT_WGMMA_COMPILED.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEQUANT_WGMMA_COMPILED 1
#else
#define MOEQUANT_WGMMA_COMPILED 0
#endif

namespace moequant {

// Descriptor of a K-major operand tile in shared memory with the 128-byte swizzle: rows of 64
// 16-bit elements (128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8)), 8-row atoms
// 1024 bytes apart, the tile's base 1024-byte aligned. Advancing the start address by 32 bytes
// steps one k16 slice along the row.
__device__ __forceinline__ uint64_t wgmma_desc_k_major_sw128(uint32_t smem_addr) {
  uint64_t desc = (smem_addr & 0x3FFFFu) >> 4;  // start address, 16-byte units
  desc |= uint64_t{1} << 16;                    // leading-dimension offset: unused with this swizzle
  desc |= uint64_t{1024 >> 4} << 32;            // stride between 8-row atoms
  desc |= uint64_t{1} << 62;                    // 128-byte swizzle
  return desc;
}

// Descriptor of an MN-major operand tile (the M or N dimension contiguous; wgmma's transpose bit
// set) in shared memory with the 128-byte swizzle: for each k, a row of 64 16-bit elements of M/N
// (128 bytes, chunk c of row k stored at chunk c ^ (k % 8)), 8-k-row atoms 1024 bytes apart, the
// next 64 elements of M/N `mn_atom_bytes` on, the tile's base 1024-byte aligned. Advancing the
// start address by 2048 bytes steps one k16 slice.
__device__ __forceinline__ uint64_t wgmma_desc_mn_major_sw128(uint32_t smem_addr, uint32_t mn_atom_bytes) {
  uint64_t desc = (smem_addr & 0x3FFFFu) >> 4;      // start address, 16-byte units
  desc |= uint64_t{(mn_atom_bytes >> 4) & 0x3FFFu} << 16;  // leading-dimension offset: next 64 of M/N
  desc |= uint64_t{1024 >> 4} << 32;                // stride between 8-k-row atoms
  desc |= uint64_t{1} << 62;                        // 128-byte swizzle
  return desc;
}

// Orders this thread's register writes (A fragments, accumulators) before the next wgmma reads.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending of this warpgroup's committed wgmma groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Shared memory written by ordinary stores or cp.async, made visible to the async proxy (wgmma's
// operand reads); each writing thread runs it before the barrier that publishes the writes.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator accesses across an asynchronous wgmma.
template <int kN>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x N, fp32, the wgmma accumulator layout) += a (64 x 16 of T, registers) * B (16 x N of T,
// K-major in shared memory, `desc_b`). Issued by all 128 threads of a warpgroup; completes
// asynchronously (wgmma_commit / wgmma_wait). One asm statement per N (its accumulator list),
// instantiated for bf16 and fp16 by the type string TY; scale-d is a predicate, set from a
// register holding 1 (always accumulate).
#define MOEQUANT_ACC8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define MOEQUANT_WGMMA_RS_ASM(N, TY, D, A0, A1, A2, A3, DESC, ONE)                                 \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" ONE ", 0;\n"                                             \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " {" D "}, {%" A0 ", %" A1 ", %" A2 \
  ", %" A3 "}, %" DESC ", p, 1, 1, 0;\n}\n"

#define MOEQUANT_WGMMA_M64N16(TY) \
  asm volatile(MOEQUANT_WGMMA_RS_ASM("16", TY, "%0, %1, %2, %3, %4, %5, %6, %7", "8", "9", "10", "11", "12", "13") \
               : MOEQUANT_ACC8(0) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_M64N32(TY) \
  asm volatile(MOEQUANT_WGMMA_RS_ASM("32", TY, "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15", "16", "17", "18", "19", "20", "21") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_M64N64(TY) \
  asm volatile(MOEQUANT_WGMMA_RS_ASM("64", TY, "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31", "32", "33", "34", "35", "36", "37") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8), MOEQUANT_ACC8(16), MOEQUANT_ACC8(24) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_M64N128(TY) \
  asm volatile(MOEQUANT_WGMMA_RS_ASM("128", TY, "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63", "64", "65", "66", "67", "68", "69") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8), MOEQUANT_ACC8(16), MOEQUANT_ACC8(24), MOEQUANT_ACC8(32), MOEQUANT_ACC8(40), MOEQUANT_ACC8(48), MOEQUANT_ACC8(56) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// d (64 x N, fp32) += A (64 x 16 of T, MN-major in shared memory, `desc_a`) * B (16 x N of T,
// K-major in shared memory, `desc_b`): both operands from shared memory, A's transpose bit set.
#define MOEQUANT_WGMMA_SS_ASM(N, TY, D, DESC_A, DESC_B, ONE)                                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" ONE ", 0;\n"                                             \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " {" D "}, %" DESC_A ", %" DESC_B \
  ", p, 1, 1, 1, 0;\n}\n"
#define MOEQUANT_D8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define MOEQUANT_D16 MOEQUANT_D8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define MOEQUANT_D32 MOEQUANT_D16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MOEQUANT_D64 MOEQUANT_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MOEQUANT_WGMMA_SS_M64N16(TY) \
  asm volatile(MOEQUANT_WGMMA_SS_ASM("16", TY, MOEQUANT_D8, "8", "9", "10") \
               : MOEQUANT_ACC8(0) : "l"(desc_a), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_SS_M64N32(TY) \
  asm volatile(MOEQUANT_WGMMA_SS_ASM("32", TY, MOEQUANT_D16, "16", "17", "18") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8) : "l"(desc_a), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_SS_M64N64(TY) \
  asm volatile(MOEQUANT_WGMMA_SS_ASM("64", TY, MOEQUANT_D32, "32", "33", "34") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8), MOEQUANT_ACC8(16), MOEQUANT_ACC8(24) \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define MOEQUANT_WGMMA_SS_M64N128(TY) \
  asm volatile(MOEQUANT_WGMMA_SS_ASM("128", TY, MOEQUANT_D64, "64", "65", "66") \
               : MOEQUANT_ACC8(0), MOEQUANT_ACC8(8), MOEQUANT_ACC8(16), MOEQUANT_ACC8(24), MOEQUANT_ACC8(32), \
                 MOEQUANT_ACC8(40), MOEQUANT_ACC8(48), MOEQUANT_ACC8(56) \
               : "l"(desc_a), "l"(desc_b), "r"(1))

// One asm statement per N, as WgmmaRs; d holds N / 2 accumulators.
template <int N>
struct WgmmaSsTransA {
  template <typename T>
  static __device__ __forceinline__ void run(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
    constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
    if constexpr (N == 16) {
      if constexpr (kBf16) { MOEQUANT_WGMMA_SS_M64N16("bf16"); } else { MOEQUANT_WGMMA_SS_M64N16("f16"); }
    } else if constexpr (N == 32) {
      if constexpr (kBf16) { MOEQUANT_WGMMA_SS_M64N32("bf16"); } else { MOEQUANT_WGMMA_SS_M64N32("f16"); }
    } else if constexpr (N == 64) {
      if constexpr (kBf16) { MOEQUANT_WGMMA_SS_M64N64("bf16"); } else { MOEQUANT_WGMMA_SS_M64N64("f16"); }
    } else {
      static_assert(N == 128, "wgmma N of 16, 32, 64 or 128");
      if constexpr (kBf16) { MOEQUANT_WGMMA_SS_M64N128("bf16"); } else { MOEQUANT_WGMMA_SS_M64N128("f16"); }
    }
  }
};

template <int N>
struct WgmmaRs;

template <>
struct WgmmaRs<16> {
  template <typename T>
  static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      MOEQUANT_WGMMA_M64N16("bf16");
    } else {
      MOEQUANT_WGMMA_M64N16("f16");
    }
  }
};

template <>
struct WgmmaRs<32> {
  template <typename T>
  static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      MOEQUANT_WGMMA_M64N32("bf16");
    } else {
      MOEQUANT_WGMMA_M64N32("f16");
    }
  }
};

template <>
struct WgmmaRs<64> {
  template <typename T>
  static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      MOEQUANT_WGMMA_M64N64("bf16");
    } else {
      MOEQUANT_WGMMA_M64N64("f16");
    }
  }
};

template <>
struct WgmmaRs<128> {
  template <typename T>
  static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      MOEQUANT_WGMMA_M64N128("bf16");
    } else {
      MOEQUANT_WGMMA_M64N128("f16");
    }
  }
};

#undef MOEQUANT_WGMMA_M64N16
#undef MOEQUANT_WGMMA_M64N32
#undef MOEQUANT_WGMMA_M64N64
#undef MOEQUANT_WGMMA_M64N128
#undef MOEQUANT_WGMMA_RS_ASM
#undef MOEQUANT_WGMMA_SS_M64N16
#undef MOEQUANT_WGMMA_SS_M64N32
#undef MOEQUANT_WGMMA_SS_M64N64
#undef MOEQUANT_WGMMA_SS_M64N128
#undef MOEQUANT_WGMMA_SS_ASM
#undef MOEQUANT_D8
#undef MOEQUANT_D16
#undef MOEQUANT_D32
#undef MOEQUANT_D64
#undef MOEQUANT_ACC8

}  // namespace moequant
