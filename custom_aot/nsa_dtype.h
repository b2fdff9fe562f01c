// Element types of the CPU kernels: float32, float16 and bfloat16 tensors, always computed in float32.
#ifndef MS_NSA_NSA_DTYPE_H_
#define MS_NSA_NSA_DTYPE_H_

#include <cstdint>
#include <cstring>

#include "nsa_core.h"
#include "nsa_isa.h"
#include "nsa_simd.h"

#if defined(MS_NSA_ARCH_X86)
#include <immintrin.h>
#elif defined(MS_NSA_ARCH_AARCH64)
#include <arm_neon.h>
#endif

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

// IEEE half precision <-> float32 for one value: the compiler's half type on x86-64 (_Float16) and
// aarch64 (__fp16: GCC 12's C++ has no _Float16 there; fcvt rounds to nearest even); elsewhere the same
// conversions in integer arithmetic (round to nearest even, NaN kept a quiet NaN, subnormals exact).
#if defined(MS_NSA_ARCH_X86)
#define MS_NSA_HALF_TYPE _Float16
#elif defined(MS_NSA_ARCH_AARCH64)
#define MS_NSA_HALF_TYPE __fp16
#endif
inline float f16_to_float(uint16_t bits) {
#if defined(MS_NSA_HALF_TYPE)
  MS_NSA_HALF_TYPE half;
  std::memcpy(&half, &bits, sizeof(half));
  return static_cast<float>(half);
#else
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1fu) {
    out = sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u);
  } else if (exponent != 0) {
    out = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&out, &magnitude, sizeof(out));
    out |= sign;
  }
  float value;
  std::memcpy(&value, &out, sizeof(value));
  return value;
#endif
}

inline uint16_t float_to_f16(float value) {
#if defined(MS_NSA_HALF_TYPE)
  const MS_NSA_HALF_TYPE half = static_cast<MS_NSA_HALF_TYPE>(value);
  uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return bits;
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half; the float adds round it to nearest even
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof(absolute));
    const float rounded = absolute + 0.5f;  // 0.5 = 2^-1: leaves the half's 2^-24 units in the low bits
    uint32_t rounded_bits;
    std::memcpy(&rounded_bits, &rounded, sizeof(rounded_bits));
    return static_cast<uint16_t>(sign | (rounded_bits - 0x3f000000u));
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (rounded >> 13));
#endif
}

// Converts n elements starting at element `offset` of a tensor of type `dtype` into float32.
inline void load_row(DType dtype, const void *base, int64_t offset, float *dst, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float *>(base) + offset, n * sizeof(float));
      break;
    case DType::kFloat16: {
      const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
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
      uint16_t *dst = static_cast<uint16_t *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t *dst = static_cast<uint16_t *>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
      break;
    }
  }
}


// Fast float16/bfloat16 <-> float32 for the hot loops (gathered K/V tiles, query/grad rows). The
// conversions are exact (to float32) or round to nearest even (from it), so every path gives the same
// bits; only speed differs. f16_to_float_wide<W> / float_to_f16_wide<W> convert W values at a time with
// the instructions of the kernels built for W lanes:
//   x86-64: GCC does not vectorise _Float16 conversions, hence F16C / AVX-512 intrinsics in their own
//           target functions, called only from kernels built for (and dispatched to) a CPU that has them;
//   aarch64: the NEON fcvtl/fcvtn conversions (Advanced SIMD is part of every aarch64 CPU).
// With fewer lanes (the baselines) and on other architectures they are the scalar conversions.
#if defined(MS_NSA_ARCH_X86)
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

#elif defined(MS_NSA_ARCH_AARCH64)
inline void f16_to_float_neon(const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float16x8_t half = vreinterpretq_f16_u16(vld1q_u16(src + i));
    vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(half)));
    vst1q_f32(dst + i + 4, vcvt_high_f32_f16(half));
  }
  for (; i < n; ++i) dst[i] = f16_to_float(src[i]);
}

inline void float_to_f16_neon(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // fcvtn: the FPCR's rounding, nearest even
    const float16x8_t half = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i)), vld1q_f32(src + i + 4));
    vst1q_u16(dst + i, vreinterpretq_u16_f16(half));
  }
  for (; i < n; ++i) dst[i] = float_to_f16(src[i]);
}
#endif

template <int W>
MS_NSA_INLINE void f16_to_float_wide(const uint16_t *src, float *dst, int64_t n) {
#if defined(MS_NSA_ARCH_X86)
  if constexpr (W >= 16) {
    f16_to_float_avx512(src, dst, n);
    return;
  } else if constexpr (W >= 8) {
    f16_to_float_f16c(src, dst, n);
    return;
  }
#elif defined(MS_NSA_ARCH_AARCH64)
  if constexpr (W >= 8) {
    f16_to_float_neon(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}

template <int W>
MS_NSA_INLINE void float_to_f16_wide(const float *src, uint16_t *dst, int64_t n) {
#if defined(MS_NSA_ARCH_X86)
  if constexpr (W >= 16) {
    float_to_f16_avx512(src, dst, n);
    return;
  } else if constexpr (W >= 8) {
    float_to_f16_f16c(src, dst, n);
    return;
  }
#elif defined(MS_NSA_ARCH_AARCH64)
  if constexpr (W >= 8) {
    float_to_f16_neon(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
}

// W 16-bit patterns, and the same widened to 32 bits (a struct: GCC ignores vector_size on a
// dependent typedef inside a function template).
template <int W>
struct Bits16 {
  typedef uint16_t narrow __attribute__((vector_size(2 * W)));
  typedef uint32_t wide __attribute__((vector_size(4 * W)));
};

// load_row for kernels built for W-lane vectors (nsa_isa.h lists the instruction set of each W).
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
  } else if (dtype == DType::kFloat16) {
    f16_to_float_wide<W>(static_cast<const uint16_t *>(base) + offset, dst, n);
  } else {
    load_row(dtype, base, offset, dst, n);
  }
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
  } else if (dtype == DType::kFloat16) {
    float_to_f16_wide<W>(src, static_cast<uint16_t *>(base) + offset, n);
  } else {
    store_row(dtype, src, base, offset, n);
  }
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_DTYPE_H_
