// The one dispatch point for instruction sets: every kernel is compiled once per target below and the
// best the CPU supports is picked at run time (MS_NSA_ISA=avx512|avx2|baseline forces one, for tests).
#ifndef MS_NSA_NSA_ISA_H_
#define MS_NSA_NSA_ISA_H_

#include <cstdlib>
#include <cstring>

#define MS_NSA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define MS_NSA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MS_NSA_TARGET_BASELINE

namespace ms_nsa {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa detect_isa() {
  const char *forced = std::getenv("MS_NSA_ISA");
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  // A forced choice is honoured only if the CPU can run it.
  if (forced && std::strcmp(forced, "baseline") == 0) return Isa::kBaseline;
  if (forced && std::strcmp(forced, "avx2") == 0 && has_avx2) return Isa::kAvx2;
  if (has_avx512) return Isa::kAvx512;
  return has_avx2 ? Isa::kAvx2 : Isa::kBaseline;
}

// Read once per process (an inline function's static is shared by every translation unit).
inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_ISA_H_
