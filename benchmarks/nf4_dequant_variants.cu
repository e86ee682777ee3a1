// Standalone sweep of NF4 -> bf16 dequant kernel variants against a same-run device-to-device
// copy and a write-only fill, on the element counts of qwen3 gate_up (402M), olmoe down (134M)
// and mixtral gate_up (940M), blocksize 64. Not part of the extension: it chose the layout of
// dequant_expert (csrc/cuda/dequant_cuda.cu). Variants: the warp-contiguous tile with a
// persistent grid-stride loop ("full0") or one tile per warp ("full1"), chunks per lane (C),
// threads per CTA (T), streaming vs plain stores (st0/st1), an L2::256B prefetch hint on the
// packed loads, one thread per 16 packed bytes (vec16), and TMA bulk stores from shared memory
// (bulk). Output: ms, GB/s (bytes read + written) and the fraction of copy bandwidth.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -I csrc -o /tmp/nf4_dequant_variants benchmarks/nf4_dequant_variants.cu
//   /tmp/nf4_dequant_variants
//
// Results (H200): benchmarks/results/nf4_dequant_variants-NVIDIA_H200.json.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <functional>
#include <cstring>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

#include "nf4_format.h"

__device__ __constant__ float kCB[16] = MOEQUANT_NF4_VALUES;

__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint4 decode(uint32_t bytes, float amax, const float* cb) {
  uint4 out; uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = pack2(__fmul_rn(cb[(bytes >> (8 * i + 4)) & 0xF], amax), __fmul_rn(cb[(bytes >> (8 * i)) & 0xF], amax));
  return out;
}
__device__ __forceinline__ uint32_t ld_nc_l2(const uint32_t* p) {
  uint32_t v; asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}

// v0: current kernel. STORE 0 = __stcs, 1 = plain; LOADHINT: L2::256B prefetch.
template <int THREADS, int CHUNKS, int STORE, bool LOADHINT>
__global__ void __launch_bounds__(THREADS) k_warp(const uint32_t* __restrict__ in, const float* __restrict__ absmax, uint4* __restrict__ dst, int64_t n, int log2cpb) {
  constexpr int kTile = 32 * CHUNKS;
  __shared__ float cb[16];
  if (threadIdx.x < 16) cb[threadIdx.x] = kCB[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * THREADS + threadIdx.x) / 32;
  const int64_t stride = int64_t{gridDim.x} * (THREADS / 32) * kTile;
  for (int64_t tile = warp * kTile; tile < n; tile += stride) {
    uint32_t b[CHUNKS]; float a[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) { const int64_t g = tile + c * 32 + lane; if (g < n) { b[c] = LOADHINT ? ld_nc_l2(in + g) : in[g]; a[c] = absmax[g >> log2cpb]; } }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) { const int64_t g = tile + c * 32 + lane; if (g < n) { uint4 v = decode(b[c], a[c], cb); if (STORE == 0) __stcs(dst + g, v); else dst[g] = v; } }
  }
}

// v2: lane owns 16 packed bytes (4 consecutive chunks) per load; UNROLL loads in flight.
template <int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) k_vec16(const uint4* __restrict__ in, const float* __restrict__ absmax, uint4* __restrict__ dst, int64_t n, int log2cpb) {
  __shared__ float cb[16];
  if (threadIdx.x < 16) cb[threadIdx.x] = kCB[threadIdx.x];
  __syncthreads();
  const int64_t nv = n / 4;
  const int64_t stride = int64_t{gridDim.x} * THREADS * UNROLL;
  for (int64_t base = int64_t{blockIdx.x} * THREADS * UNROLL + threadIdx.x; base < nv; base += stride) {
    uint4 b[UNROLL]; float a[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { const int64_t g = base + u * THREADS; if (g < nv) { b[u] = in[g]; a[u] = absmax[(g * 4) >> log2cpb]; } }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { const int64_t g = base + u * THREADS; if (g < nv) {
      const uint32_t w[4] = {b[u].x, b[u].y, b[u].z, b[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) __stcs(dst + 4 * g + j, decode(w[j], a[u], cb)); } }
  }
}

// v3: decode into shared memory, TMA bulk store (cp.async.bulk) of the CTA's tile; double buffered.
template <int THREADS, int CHUNKS>
__global__ void __launch_bounds__(THREADS) k_bulk(const uint32_t* __restrict__ in, const float* __restrict__ absmax, uint4* __restrict__ dst, int64_t n, int log2cpb) {
  constexpr int kTile = THREADS * CHUNKS;  // chunks per CTA tile
  extern __shared__ __align__(128) uint4 stage[];  // 2 * kTile
  __shared__ float cb[16];
  if (threadIdx.x < 16) cb[threadIdx.x] = kCB[threadIdx.x];
  __syncthreads();
  int buf = 0;
  for (int64_t tile = int64_t{blockIdx.x} * kTile; tile < n; tile += int64_t{gridDim.x} * kTile) {
    uint32_t b[CHUNKS]; float a[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) { const int64_t g = tile + c * THREADS + threadIdx.x; if (g < n) { b[c] = in[g]; a[c] = absmax[g >> log2cpb]; } }
    // buffer `buf` was last used two tiles ago: make sure its bulk store finished reading smem
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    __syncthreads();
    uint4* s = stage + buf * kTile;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) s[c * THREADS + threadIdx.x] = decode(b[c], a[c], cb);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t cnt = (n - tile) < kTile ? (n - tile) : kTile;
      const uint32_t saddr = static_cast<uint32_t>(__cvta_generic_to_shared(s));
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(dst + tile), "r"(saddr), "r"((int)(cnt * 16)) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    buf ^= 1;
  }
  if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

__global__ void k_fill(uint4* dst, int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) dst[i] = make_uint4(1, 2, 3, 4);
}

int sms;
template <typename K> int occ_grid(K k, int threads, int smem) { int per = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, k, threads, smem)); return sms * per; }

float time_it(std::function<void()> f, int reps = 20) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) { cudaEventRecord(a); f(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms); }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end()); return t[reps / 2];
}

int main() {
  cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0)); sms = p.multiProcessorCount;
  printf("%s sms=%d\n", p.name, sms);
  const int64_t numels[] = {402653184LL, 134217728LL, 939524096LL};
  for (int64_t numel : numels) {
    const int64_t n = numel / 8;  // 16-byte output chunks
    uint32_t* in; float* am; uint4* out; uint4* src;
    CK(cudaMalloc(&in, numel / 2)); CK(cudaMalloc(&am, numel / 64 * 4)); CK(cudaMalloc(&out, numel * 2)); CK(cudaMalloc(&src, numel * 2));
    CK(cudaMemset(in, 0x5a, numel / 2)); CK(cudaMemset(am, 0x3f, numel / 64 * 4)); CK(cudaMemset(src, 1, numel * 2));
    const double dq_bytes = numel / 2 + numel / 64 * 4 + numel * 2.0;
    const int l = 3;  // log2 chunks per 64-block
    float copy = time_it([&] { CK(cudaMemcpyAsync(out, src, numel * 2, cudaMemcpyDeviceToDevice)); });
    const double copy_gbps = 4.0 * numel / copy / 1e6;
    float fill = time_it([&] { k_fill<<<sms * 8, 256>>>(out, n); });
    printf("numel=%lld copy %.4f ms %.0f GB/s | fill %.0f GB/s\n", (long long)numel, copy, copy_gbps, 2.0 * numel / fill / 1e6);
    std::vector<uint4> ref(4096), got(4096);
    auto report = [&](const char* name, std::function<void()> f) {
      CK(cudaMemset(out, 0, numel * 2)); f(); CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(got.data(), out + n - 4096, 4096 * 16, cudaMemcpyDeviceToHost));
      bool ok = memcmp(got.data(), ref.data(), 4096 * 16) == 0;
      float ms = time_it(f);
      const double g = dq_bytes / ms / 1e6;
      printf("  %-28s %.4f ms %.0f GB/s  %.3f of copy %s\n", name, ms, g, g / copy_gbps, ok ? "" : "MISMATCH");
    };
    { auto k = k_warp<256, 8, 0, false>; int g = occ_grid(k, 256, 0); k<<<g, 256>>>(in, am, out, n, l); CK(cudaDeviceSynchronize()); CK(cudaMemcpy(ref.data(), out + n - 4096, 4096 * 16, cudaMemcpyDeviceToHost)); }
#define WARP(T, C, S, H, FULL) report("warp T" #T " C" #C " st" #S " hint" #H " full" #FULL, [&] { auto k = k_warp<T, C, S, H>; int64_t g = FULL ? (n + T * C - 1) / (T * C) : occ_grid(k, T, 0); k<<<(unsigned)g, T>>>(in, am, out, n, l); })
    WARP(256, 8, 0, false, 0);
    WARP(256, 8, 0, false, 1);
    WARP(256, 8, 1, false, 0);
    WARP(256, 4, 0, false, 0);
    WARP(256, 16, 0, false, 0);
    WARP(512, 8, 0, false, 0);
    WARP(128, 8, 0, false, 0);
    WARP(256, 8, 0, true, 0);
    WARP(256, 8, 0, true, 1);
#define VEC(T, U) report("vec16 T" #T " U" #U, [&] { auto k = k_vec16<T, U>; int g = occ_grid(k, T, 0); k<<<g, T>>>(reinterpret_cast<const uint4*>(in), am, out, n, l); })
    VEC(256, 1); VEC(256, 2); VEC(256, 4);
#define BULK(T, C) report("bulk T" #T " C" #C, [&] { auto k = k_bulk<T, C>; const int sm = 2 * T * C * 16; CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, sm)); int g = occ_grid(k, T, sm); k<<<g, T, sm>>>(in, am, out, n, l); })
    BULK(256, 8); BULK(256, 4); BULK(128, 8); BULK(512, 4); BULK(256, 16);
    cudaFree(in); cudaFree(am); cudaFree(out); cudaFree(src);
  }
  return 0;
}
