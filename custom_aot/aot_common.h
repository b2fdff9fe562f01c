// What every op's thin AOT entry layer shares: the dtype names MindSpore passes, and how a kernel
// status reaches the user (recorded for ms_nsa's Python layer, then thrown for MindSpore).
#ifndef MS_NSA_AOT_COMMON_H_
#define MS_NSA_AOT_COMMON_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "nsa_status.h"

namespace ms_nsa {
namespace aot {

// float32 / float16 / bfloat16; false for anything else.
inline bool parse_dtype(const char *name, DType *dtype) {
  if (std::strcmp(name, "float32") == 0) *dtype = DType::kFloat32;
  else if (std::strcmp(name, "float16") == 0) *dtype = DType::kFloat16;
  else if (std::strcmp(name, "bfloat16") == 0) *dtype = DType::kBFloat16;
  else return false;
  return true;
}

inline bool is_dtype(const char *name, const char *want) { return std::strcmp(name, want) == 0; }

// A 3-D tensor of exactly [a, b, c].
inline bool has_shape(int ndim, const int64_t *shape, int64_t a, int64_t b, int64_t c) {
  return ndim == 3 && shape[0] == a && shape[1] == b && shape[2] == c;
}

// The problem's element type from argument `arg`'s dtype string, or the error naming it.
inline NsaError read_dtype(const char *arg, const char *name, DType *dtype) {
  if (parse_dtype(name, dtype)) return {};
  return {kUnsupportedDType, std::string(arg) + " dtype " + name + " is not supported; use float32, float16 or bfloat16"};
}

// query [T1, N1, D], key [T2, N2, D], value [T2, N2, Dv] (params `query`, `key`, `value`) into any
// attention problem with these fields.
template <typename Problem>
void read_attention_shapes(int64_t *const *shapes, int query, int key, int value, Problem *p) {
  p->q_tokens = shapes[query][0];
  p->q_heads = shapes[query][1];
  p->qk_head_dim = shapes[query][2];
  p->kv_tokens = shapes[key][0];
  p->kv_heads = shapes[key][1];
  p->v_head_dim = shapes[value][2];
}

// Returns 0 for kOk. Otherwise records the error for ms_nsa's Python layer (which re-raises it as
// ValueError/TypeError in PyNative) and throws it: MindSpore catches exceptions from AOT kernels and
// raises a RuntimeError carrying what() in both PyNative and graph mode, so the message reaches the
// user either way. A bare non-zero return would surface only as "return value 4".
int report(const char *function, const NsaError &err);

// Only the recording half of report(), for entry points called through ctypes (which cannot catch).
void record(const NsaError &err);

}  // namespace aot
}  // namespace ms_nsa

#endif  // MS_NSA_AOT_COMMON_H_
