// Element types of the CPU kernels: float32, float16 and bfloat16 tensors, always computed in float32.
#ifndef MS_NSA_NSA_DTYPE_H_
#define MS_NSA_NSA_DTYPE_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nsa_core.h"
#include "nsa_simd.h"

namespace ms_nsa {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &widened, sizeof(out));
  return out;
}

// Round to nearest, ties to even (what MindSpore's own casts do); NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Converts n elements starting at element `offset` of a tensor of type `dtype` into float32.
inline void load_row(DType dtype, const void *base, int64_t offset, float *dst, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float *>(base) + offset, n * sizeof(float));
      break;
    case DType::kFloat16: {
      const _Float16 *src = static_cast<const _Float16 *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
      break;
    }
  }
}

// Writes n float32 values into a tensor of type `dtype` at element `offset`, rounding to nearest even.
inline void store_row(DType dtype, const float *src, void *base, int64_t offset, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(static_cast<float *>(base) + offset, src, n * sizeof(float));
      break;
    case DType::kFloat16: {
      _Float16 *dst = static_cast<_Float16 *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<_Float16>(src[i]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t *dst = static_cast<uint16_t *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
      break;
    }
  }
}


// Fast float16/bfloat16 -> float32 for the hot loops (gathered K/V tiles, query/grad rows). The
// conversions are exact, so every path gives the same bits; only speed differs. GCC does not
// vectorise _Float16 conversions, hence the F16C / AVX-512 intrinsics in their own target functions,
// called only from kernels built for (and dispatched to) a CPU that has them.
__attribute__((target("avx512f,f16c"))) inline void f16_to_float_avx512(const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) inline void f16_to_float_f16c(const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// W 16-bit patterns, and the same widened to 32 bits (a struct: GCC ignores vector_size on a
// dependent typedef inside a function template).
template <int W>
struct Bits16 {
  typedef uint16_t narrow __attribute__((vector_size(2 * W)));
  typedef uint32_t wide __attribute__((vector_size(4 * W)));
};

// load_row for kernels built for W-lane vectors (W = 16: AVX-512, 8: AVX2 + F16C, else baseline).
template <int W>
MS_NSA_INLINE void load_row_fast(DType dtype, const void *base, int64_t offset, float *dst, int64_t n) {
  if (dtype == DType::kBFloat16) {
    // W lanes at a time: widen the 16-bit patterns to 32 bits and shift them into the high half.
    typedef typename Bits16<W>::narrow Narrow;
    typedef typename Bits16<W>::wide Wide;
    const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Narrow bits;
      std::memcpy(&bits, src + i, sizeof(bits));
      const Wide widened = __builtin_convertvector(bits, Wide) << 16;
      std::memcpy(dst + i, &widened, sizeof(widened));
    }
    for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  } else if (dtype == DType::kFloat16 && W >= 8) {
    const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
    if constexpr (W >= 16) {
      f16_to_float_avx512(src, dst, n);
    } else {
      f16_to_float_f16c(src, dst, n);
    }
  } else {
    load_row(dtype, base, offset, dst, n);
  }
}

__attribute__((target("avx512f,f16c"))) inline void float_to_f16_avx512(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx,f16c"))) inline void float_to_f16_f16c(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// store_row for kernels built for W-lane vectors: the same roundings (nearest even, NaN kept quiet),
// W values at a time.
template <int W>
MS_NSA_INLINE void store_row_fast(DType dtype, const float *src, void *base, int64_t offset, int64_t n) {
  if (dtype == DType::kBFloat16) {
    typedef typename Bits16<W>::narrow Narrow;
    typedef typename Bits16<W>::wide Wide;
    uint16_t *dst = static_cast<uint16_t *>(base) + offset;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Wide bits;
      std::memcpy(&bits, src + i, sizeof(bits));
      const Wide rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
      const Wide quiet_nan = (bits >> 16) | 0x0040u;
      const Wide out = (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
      const Narrow narrowed = __builtin_convertvector(out, Narrow);
      std::memcpy(dst + i, &narrowed, sizeof(narrowed));
    }
    for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  } else if (dtype == DType::kFloat16 && W >= 8) {
    uint16_t *dst = static_cast<uint16_t *>(base) + offset;
    if constexpr (W >= 16) {
      float_to_f16_avx512(src, dst, n);
    } else {
      float_to_f16_f16c(src, dst, n);
    }
  } else {
    store_row(dtype, src, base, offset, n);
  }
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_DTYPE_H_
