// CpuLoops: the portable loops, their AVX2 twins, and the run-time choice between them.
#include "cpu_loops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEQUANT_CPU_AVX2 1
#endif

namespace moequant {
namespace {

// Dot products accumulate in 32 interleaved lanes (four AVX2 registers, so the adds of
// consecutive steps do not wait on each other).
constexpr int kLanes = 32;

float reduce_lanes(float* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) acc[i] = acc[i] + acc[i + width];
  }
  return acc[0];
}

// ---- portable ---------------------------------------------------------------------------------

void decode_4bit_portable(const uint8_t* codes, int64_t pairs, float scale, const float* codebook, float* out) {
  for (int64_t i = 0; i < pairs; ++i) {
    out[2 * i] = nf4_decode(codes[i] >> 4, scale, codebook);
    out[2 * i + 1] = nf4_decode(codes[i] & 0xF, scale, codebook);
  }
}

void decode_4bit_split_portable(const uint8_t* codes, int64_t pairs, float scale, const float* codebook,
                                float* out) {
  for (int64_t g = 0; g < pairs; g += 8, out += 16) {
    for (int j = 0; j < 8; ++j) {
      out[j] = nf4_decode(codes[g + j] >> 4, scale, codebook);
      out[8 + j] = nf4_decode(codes[g + j] & 0xF, scale, codebook);
    }
  }
}

void decode_int8_portable(const int8_t* codes, int64_t count, float row_absmax, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = int8_decode(codes[i], row_absmax);
}

void dots_portable(const float* w, const float* x, int64_t x_stride, int64_t x_rows, int64_t n, float* out,
                   int64_t out_stride) {
  for (int64_t r = 0; r < x_rows; ++r) {
    const float* xr = x + r * x_stride;
    float acc[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) acc[i % kLanes] += w[i] * xr[i];
    out[r * out_stride] = reduce_lanes(acc);
  }
}

float row_dot_4bit_split_portable(const QuantMatrices& m, int64_t matrix, int64_t begin, int64_t count,
                                  const float* x) {
  const uint8_t* codes = static_cast<const uint8_t*>(m.data) + (matrix * m.matrix_numel + begin) / 2;
  const float* codebook = codebook_of(m.type);
  float acc[kLanes] = {};
  int64_t block = begin / m.block_numel;
  for (int64_t pos = begin, end = begin + count; pos < end; ++block) {
    const int64_t stop = std::min(end, (block + 1) * m.block_numel);
    const float scale = m.scales(matrix, block);
    for (int64_t i = pos - begin; i < stop - begin; i += 16) {
      for (int j = 0; j < 8; ++j) {
        const uint8_t byte = codes[i / 2 + j];
        acc[(i + j) % kLanes] += nf4_decode(byte >> 4, scale, codebook) * x[i + j];
        acc[(i + 8 + j) % kLanes] += nf4_decode(byte & 0xF, scale, codebook) * x[i + 8 + j];
      }
    }
    pos = stop;
  }
  return reduce_lanes(acc);
}

void axpys_portable(const float* a, int count, const float* x, int64_t x_stride, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float sum = y[i];
    for (int j = 0; j < count; ++j) sum = sum + a[j] * x[j * x_stride + i];
    y[i] = sum;
  }
}

// ---- AVX2 -------------------------------------------------------------------------------------
#ifdef MOEQUANT_CPU_AVX2

// codebook[code] of 8 codes (int32 lanes): two 8-entry lookups, bit 3 of the code (moved to
// the sign bit) picks one.
struct Lookup16 {
  __m256 low_values, high_values;  // codes 0..7, 8..15
  __attribute__((target("avx2"))) explicit Lookup16(const float* codebook)
      : low_values(_mm256_loadu_ps(codebook)), high_values(_mm256_loadu_ps(codebook + 8)) {}
  __attribute__((target("avx2"))) __m256 operator()(__m256i code) const {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_values, code), _mm256_permutevar8x32_ps(high_values, code),
                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
  }
};

__attribute__((target("avx2"))) void decode_4bit_avx2(const uint8_t* codes, int64_t pairs, float scale,
                                                        const float* codebook, float* out) {
  const Lookup16 lookup(codebook);
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);  // high nibble first
  const __m256i nibble = _mm256_set1_epi32(0xF);
  int64_t i = 0;
  for (; i + 4 <= pairs; i += 4) {
    int32_t four;
    std::memcpy(&four, codes + i, 4);
    const __m128i bytes = _mm_cvtsi32_si128(four);
    const __m128i doubled = _mm_unpacklo_epi8(bytes, bytes);  // b0 b0 b1 b1 b2 b2 b3 b3
    const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(doubled), shifts), nibble);
    _mm256_storeu_ps(out + 2 * i, _mm256_mul_ps(lookup(code), scale8));
  }
  decode_4bit_portable(codes + i, pairs - i, scale, codebook, out + 2 * i);
}

__attribute__((target("avx2"))) void decode_4bit_split_avx2(const uint8_t* codes, int64_t pairs, float scale,
                                                              const float* codebook, float* out) {
  const Lookup16 lookup(codebook);
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256i nibble = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < pairs; g += 8, out += 16) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + g)));
    _mm256_storeu_ps(out, _mm256_mul_ps(lookup(_mm256_srli_epi32(bytes, 4)), scale8));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(lookup(_mm256_and_si256(bytes, nibble)), scale8));
  }
}

__attribute__((target("avx2"))) void decode_int8_avx2(const int8_t* codes, int64_t count, float row_absmax,
                                                        float* out) {
  const __m256 absmax8 = _mm256_set1_ps(row_absmax);
  const __m256 inv127 = _mm256_set1_ps(kInt8InvScale);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    int64_t eight;
    std::memcpy(&eight, codes + i, 8);
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(q, absmax8), inv127));
  }
  decode_int8_portable(codes + i, count - i, row_absmax, out + i);
}

__attribute__((target("avx2"))) float row_dot_4bit_split_avx2(const QuantMatrices& m, int64_t matrix, int64_t begin,
                                                               int64_t count, const float* x) {
  const uint8_t* codes = static_cast<const uint8_t*>(m.data) + (matrix * m.matrix_numel + begin) / 2;
  const Lookup16 lookup(codebook_of(m.type));
  const __m256i nibble = _mm256_set1_epi32(0xF);
  // Lanes 0..31 of dots_portable: 16-element groups at even multiples of 16 feed acc0/acc1,
  // at odd ones acc2/acc3.
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t block = begin / m.block_numel;
  for (int64_t pos = begin, end = begin + count; pos < end; ++block) {
    const int64_t stop = std::min(end, (block + 1) * m.block_numel);
    const __m256 scale8 = _mm256_set1_ps(m.scales(matrix, block));
    for (int64_t i = pos - begin; i < stop - begin; i += 16) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2)));
      const __m256 high = _mm256_mul_ps(_mm256_mul_ps(lookup(_mm256_srli_epi32(bytes, 4)), scale8), _mm256_loadu_ps(x + i));
      const __m256 low =
          _mm256_mul_ps(_mm256_mul_ps(lookup(_mm256_and_si256(bytes, nibble)), scale8), _mm256_loadu_ps(x + i + 8));
      if ((i & 16) == 0) {
        acc0 = _mm256_add_ps(acc0, high);
        acc1 = _mm256_add_ps(acc1, low);
      } else {
        acc2 = _mm256_add_ps(acc2, high);
        acc3 = _mm256_add_ps(acc3, low);
      }
    }
    pos = stop;
  }
  float acc[kLanes];
  _mm256_storeu_ps(acc, acc0);
  _mm256_storeu_ps(acc + 8, acc1);
  _mm256_storeu_ps(acc + 16, acc2);
  _mm256_storeu_ps(acc + 24, acc3);
  return reduce_lanes(acc);
}

// Sums of `rows` (1 or 2) rows at once, sharing the loads of w; lanes as dots_portable.
template <int rows>
__attribute__((target("avx2"))) void dots_avx2_rows(const float* w, const float* x, int64_t x_stride, int64_t n,
                                                     float* out, int64_t out_stride) {
  constexpr int kRegs = kLanes / 8;
  __m256 acc8[rows][kRegs];
  for (auto& row : acc8) {
    for (auto& v : row) v = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kRegs; ++j) {
      const __m256 wj = _mm256_loadu_ps(w + i + 8 * j);
      for (int r = 0; r < rows; ++r) {
        acc8[r][j] = _mm256_add_ps(acc8[r][j], _mm256_mul_ps(wj, _mm256_loadu_ps(x + r * x_stride + i + 8 * j)));
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float acc[kLanes];
    for (int j = 0; j < kRegs; ++j) _mm256_storeu_ps(acc + 8 * j, acc8[r][j]);
    for (int64_t t = i; t < n; ++t) acc[t % kLanes] += w[t] * x[r * x_stride + t];
    out[r * out_stride] = reduce_lanes(acc);
  }
}

__attribute__((target("avx2"))) void dots_avx2(const float* w, const float* x, int64_t x_stride, int64_t x_rows,
                                                 int64_t n, float* out, int64_t out_stride) {
  int64_t r = 0;
  for (; r + 2 <= x_rows; r += 2) dots_avx2_rows<2>(w, x + r * x_stride, x_stride, n, out + r * out_stride, out_stride);
  if (r < x_rows) dots_avx2_rows<1>(w, x + r * x_stride, x_stride, n, out + r * out_stride, out_stride);
}

__attribute__((target("avx2"))) void axpys_avx2(const float* a, int count, const float* x, int64_t x_stride,
                                                  float* y, int64_t n) {
  __m256 a8[CpuLoops::kMaxAxpyRows];
  for (int j = 0; j < count; ++j) a8[j] = _mm256_set1_ps(a[j]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 sum = _mm256_loadu_ps(y + i);
    for (int j = 0; j < count; ++j) {
      sum = _mm256_add_ps(sum, _mm256_mul_ps(a8[j], _mm256_loadu_ps(x + j * x_stride + i)));
    }
    _mm256_storeu_ps(y + i, sum);
  }
  axpys_portable(a, count, x + i, x_stride, y + i, n - i);
}

#endif  // MOEQUANT_CPU_AVX2

}  // namespace

CpuLoops CpuLoops::for_this_cpu() {
  const char* knob = std::getenv("MOEQUANT_CPU_SIMD");
  const bool simd_allowed = knob == nullptr || std::strcmp(knob, "0") != 0;
#ifdef MOEQUANT_CPU_AVX2
  if (simd_allowed && __builtin_cpu_supports("avx2")) {
    return {decode_4bit_avx2, decode_4bit_split_avx2, decode_int8_avx2, dots_avx2, row_dot_4bit_split_avx2,
            axpys_avx2};
  }
#endif
  (void)simd_allowed;
  return {decode_4bit_portable, decode_4bit_split_portable, decode_int8_portable, dots_portable,
          row_dot_4bit_split_portable, axpys_portable};
}

void CpuLoops::decode(const QuantMatrices& m, int64_t matrix, int64_t begin, int64_t count, float* out,
                      bool split) const {
  const int64_t base = matrix * m.matrix_numel;  // 64-bit: stacks exceed 2^31 elements
  const float* codebook = is_4bit(m.type) ? codebook_of(m.type) : nullptr;
  int64_t block = begin / m.block_numel;
  for (int64_t pos = begin, end = begin + count; pos < end; ++block) {
    const int64_t stop = std::min(end, (block + 1) * m.block_numel);
    const float scale = m.scales(matrix, block);
    float* o = out + (pos - begin);
    if (codebook != nullptr) {
      (split ? decode_4bit_split : decode_4bit)(static_cast<const uint8_t*>(m.data) + (base + pos) / 2,
                                                (stop - pos) / 2, scale, codebook, o);
    } else {
      decode_int8(static_cast<const int8_t*>(m.data) + base + pos, stop - pos, scale, o);
    }
    pos = stop;
  }
}

}  // namespace moequant
