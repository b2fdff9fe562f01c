// Element types of the CPU kernels: float32, float16 and bfloat16 tensors, always computed in float32.
#ifndef MS_NSA_NSA_DTYPE_H_
#define MS_NSA_NSA_DTYPE_H_

#include <cstdint>
#include <cstring>

#include "nsa_core.h"

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

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_DTYPE_H_
