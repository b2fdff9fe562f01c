// The one place that knows about processor architectures and instruction sets.
//
// Every kernel is compiled once per instruction set of MS_NSA_FOR_EACH_ISA below (the kernel bodies
// are always_inline templates over the vector width W, so the target attribute of each entry point
// decides the instructions; the matrix products they call are noinline functions defined per set with
// the same attributes, nsa_gemm.h) and the best set the CPU supports is picked once, at load time:
//   x86-64   avx512 (W 16), avx2 + fma + f16c (W 8), baseline SSE2 (W 4)
//   aarch64  neon (W 8: two q registers per vector, vector half-precision conversions), baseline (W 4)
//   other    baseline (W 4, whatever the compiler makes of GCC's portable vectors)
// Advanced SIMD is part of every aarch64 CPU, so "neon" needs no run-time check; its baseline differs
// only in vector width and scalar conversions, and exists so that the portable path is tested there too.
// MS_NSA_ISA=<name> forces a set the CPU supports (for tests); any other value is ignored.
#ifndef MS_NSA_NSA_ISA_H_
#define MS_NSA_NSA_ISA_H_

#include <cstddef>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define MS_NSA_ARCH_X86 1
#elif defined(__aarch64__)
#define MS_NSA_ARCH_AARCH64 1
#endif

#define MS_NSA_TARGET_BASELINE

// X(ISA enumerator, name, target attribute, vector width W): best first, baseline last.
#if defined(MS_NSA_ARCH_X86)
#define MS_NSA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define MS_NSA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MS_NSA_FOR_EACH_ISA(X)                      \
  X(::ms_nsa::Isa::kAvx512, avx512, MS_NSA_TARGET_AVX512, 16) \
  X(::ms_nsa::Isa::kAvx2, avx2, MS_NSA_TARGET_AVX2, 8)        \
  X(::ms_nsa::Isa::kBaseline, baseline, MS_NSA_TARGET_BASELINE, 4)
#elif defined(MS_NSA_ARCH_AARCH64)
#define MS_NSA_TARGET_NEON
#define MS_NSA_FOR_EACH_ISA(X)                        \
  X(::ms_nsa::Isa::kNeon, neon, MS_NSA_TARGET_NEON, 8) \
  X(::ms_nsa::Isa::kBaseline, baseline, MS_NSA_TARGET_BASELINE, 4)
#else
#define MS_NSA_FOR_EACH_ISA(X) X(::ms_nsa::Isa::kBaseline, baseline, MS_NSA_TARGET_BASELINE, 4)
#endif

namespace ms_nsa {

enum class Isa { kBaseline, kAvx2, kAvx512, kNeon };

inline bool cpu_supports(Isa isa) {
#if defined(MS_NSA_ARCH_X86)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c");
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    default: return isa == Isa::kBaseline;
  }
#elif defined(MS_NSA_ARCH_AARCH64)
  return isa == Isa::kNeon || isa == Isa::kBaseline;
#else
  return isa == Isa::kBaseline;
#endif
}

struct IsaInfo {
  Isa isa;
  const char *name;
};

#define MS_NSA_ISA_INFO(ISA, NAME, TARGET, W) {ISA, #NAME},
inline constexpr IsaInfo kBuiltIsas[] = {MS_NSA_FOR_EACH_ISA(MS_NSA_ISA_INFO)};
#undef MS_NSA_ISA_INFO

inline Isa detect_isa() {
  const char *forced = std::getenv("MS_NSA_ISA");
  // A forced choice is honoured only if the CPU can run it.
  if (forced) {
    for (const IsaInfo &info : kBuiltIsas) {
      if (std::strcmp(forced, info.name) == 0 && cpu_supports(info.isa)) return info.isa;
    }
  }
  for (const IsaInfo &info : kBuiltIsas) {
    if (cpu_supports(info.isa)) return info.isa;
  }
  return Isa::kBaseline;
}

// Read once per process (an inline function's static is shared by every translation unit).
inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char *active_isa_name() {
  for (const IsaInfo &info : kBuiltIsas) {
    if (info.isa == active_isa()) return info.name;
  }
  return "baseline";
}

// The entry-point table of the active instruction set. Each op defines one table per set, named
// kKernels_<name> by its entry-point macro, and asks for it with MS_NSA_ACTIVE_KERNELS(type):
//   MS_NSA_FOR_EACH_ISA(MY_ENTRY_POINTS)                       // defines kKernels_avx512, ...
//   const MyKernels &kernels() { return MS_NSA_ACTIVE_KERNELS(MyKernels); }
template <class Table>
struct IsaTable {
  Isa isa;
  const Table *table;
};

template <class Table, std::size_t N>
const Table &pick_for_active_isa(const IsaTable<Table> (&tables)[N]) {
  for (const IsaTable<Table> &row : tables) {
    if (row.isa == active_isa()) return *row.table;
  }
  return *tables[N - 1].table;  // baseline
}

#define MS_NSA_ISA_TABLE_ROW(ISA, NAME, TARGET, W) {ISA, &kKernels_##NAME},
#define MS_NSA_ACTIVE_KERNELS(TYPE)                                                              \
  ([]() -> const TYPE & {                                                                        \
    static constexpr ::ms_nsa::IsaTable<TYPE> kTables[] = {MS_NSA_FOR_EACH_ISA(MS_NSA_ISA_TABLE_ROW)}; \
    static const TYPE &chosen = ::ms_nsa::pick_for_active_isa(kTables);                          \
    return chosen;                                                                               \
  }())

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_ISA_H_
