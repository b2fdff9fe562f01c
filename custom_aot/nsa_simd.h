// Portable SIMD for the kernels: GCC vector extensions, so one source serves every instruction set.
//
// Nothing here carries a target attribute. The kernel bodies that use it are always_inline templates
// (nsa_kernels.h), instantiated only inside the per-ISA entry points of nsa_core.cc, which do carry
// target("avx512f,...") or target("avx2,fma,..."). A Lanes<16>::type there becomes one zmm register;
// in the baseline (x86-64 SSE2) entry the same code is split into xmm operations. The library is
// built with -ffp-contract=fast, so `acc += a * b` becomes an FMA wherever the ISA has one (each
// result is still a fixed sequence of IEEE operations: bitwise reproducible on one machine).
#ifndef MS_NSA_NSA_SIMD_H_
#define MS_NSA_NSA_SIMD_H_

#include <cstdint>
#include <cstring>

#include "nsa_isa.h"

#define MS_NSA_INLINE inline __attribute__((always_inline))

namespace ms_nsa {

// W float32 lanes: Lanes<W>::type is the vector, ::mask the comparison result. W = 1 is a plain float
// (used for the last columns of a product whose width is not a multiple of the vector width).
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(4 * W)));
  typedef int32_t mask __attribute__((vector_size(4 * W)));
};
template <>
struct Lanes<1> {
  typedef float type;
  typedef int32_t mask;
};

template <int W>
MS_NSA_INLINE typename Lanes<W>::type load(const float *src) {
  typename Lanes<W>::type v;
  std::memcpy(&v, src, sizeof(v));  // unaligned load
  return v;
}

template <int W>
MS_NSA_INLINE void store(float *dst, typename Lanes<W>::type v) {
  std::memcpy(dst, &v, sizeof(v));
}

// acc + a * b: one FMA where the ISA has one (-ffp-contract=fast), whether V is a vector or, for a
// product's last columns, a plain float. For the float the empty asm keeps GCC's loop vectorizer off
// the chain: it made an in-order vector reduction of it, multiplying apart from the adds, so those
// columns were rounded unlike the vector ones, and a result's bits depended on how wide its product was.
#if defined(MS_NSA_ARCH_X86)
#define MS_NSA_KEEP_SCALAR(x) __asm__("" : "+x"(x))
#elif defined(MS_NSA_ARCH_AARCH64)
#define MS_NSA_KEEP_SCALAR(x) __asm__("" : "+w"(x))
#else
#define MS_NSA_KEEP_SCALAR(x) __asm__("" : "+m"(x))  // any register class would be a guess here
#endif

template <class V>
MS_NSA_INLINE V multiply_add(V acc, float a, V b) {
  acc += a * b;
  if constexpr (sizeof(V) == sizeof(float)) MS_NSA_KEEP_SCALAR(acc);
  return acc;
}

// x in every lane (for constants; in the products a float times a vector does the broadcast, which
// the compiler then fuses into the FMA's memory operand).
template <int W>
MS_NSA_INLINE typename Lanes<W>::type splat(float x) {
  return typename Lanes<W>::type{} + x;
}

// The widest float vector whose selects (c ? a : b) GCC 12 keeps in vector registers when a helper
// without a target attribute is inlined into a kernel. On aarch64 (4-lane q registers) a select of
// the 8-lane NEON vectors became eight scalar compares and moves, so wider vectors select in halves;
// on x86-64 every width the kernels use fits the ISA's registers.
#if defined(MS_NSA_ARCH_AARCH64)
constexpr int kSelectLanes = 4;
#else
constexpr int kSelectLanes = 16;
#endif

// op(a, b) applied to the low halves and to the high halves of a and b.
template <int W, class Op>
MS_NSA_INLINE typename Lanes<W>::type by_halves(Op op, typename Lanes<W>::type a, typename Lanes<W>::type b) {
  typename Lanes<W / 2>::type a_halves[2], b_halves[2];
  std::memcpy(a_halves, &a, sizeof(a));
  std::memcpy(b_halves, &b, sizeof(b));
  a_halves[0] = op(a_halves[0], b_halves[0]);
  a_halves[1] = op(a_halves[1], b_halves[1]);
  std::memcpy(&a, a_halves, sizeof(a));
  return a;
}

// Lane-wise NaN-propagating max: once a lane has seen a NaN it keeps it (numpy's max semantics).
// Two selects on single comparisons, the second with arms GCC cannot merge into the first: a select
// on an or of two masks (`x > m || x != x`) was compiled to scalar code, lane by lane, a tenth of the
// block forward's time and more of the per-item one's.
template <int W>
MS_NSA_INLINE typename Lanes<W>::type nan_max(typename Lanes<W>::type running, typename Lanes<W>::type x) {
  typedef typename Lanes<W>::type V;
  if constexpr (W > kSelectLanes) {
    return by_halves<W>([](auto r, auto y) { return nan_max<W / 2>(r, y); }, running, x);
  } else {
    const V kept = running >= x ? running : x;   // x's NaN: the comparison is false
    return running != running ? running + x : kept;  // running's NaN (plus x: still NaN)
  }
}

// Lane-wise exp(x) for W >= 4, within ~1 ulp of the correctly rounded result (Cephes expf's
// range reduction and polynomial). exp(-inf) = 0, exp(+inf) = inf, exp(NaN) = NaN, and results
// underflow gradually and overflow to inf as std::exp does. 2^n is applied as two factors so that
// every n in [-150, 128] stays representable on the way.
template <int W>
MS_NSA_INLINE typename Lanes<W>::type exp(typename Lanes<W>::type x) {
  typedef typename Lanes<W>::type V;
  typedef typename Lanes<W>::mask M;
  if constexpr (W > kSelectLanes) return by_halves<W>([](auto half, auto) { return exp<W / 2>(half); }, x, x);
  const V lowest = splat<W>(-104.0f), highest = splat<W>(89.0f);  // beyond: 0 and inf
  V c = x < lowest ? lowest : x;
  c = c > highest ? highest : c;                                  // NaN passes through; fixed below
  const V round_magic = splat<W>(12582912.0f);                     // 1.5 * 2^23: round to nearest
  const V n = (c * 1.44269504088896341f + round_magic) - round_magic;
  V r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V poly = splat<W>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.0f;
  const M whole = __builtin_convertvector(n, M);
  const M half = whole >> 1, rest = whole - half;
  V scale_half, scale_rest;
  const M half_bits = (half + 127) << 23, rest_bits = (rest + 127) << 23;
  std::memcpy(&scale_half, &half_bits, sizeof(V));
  std::memcpy(&scale_rest, &rest_bits, sizeof(V));
  V result = (poly * scale_half) * scale_rest;
  result = x < lowest ? splat<W>(0.0f) : result;
  return x != x ? x : result;
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_SIMD_H_
