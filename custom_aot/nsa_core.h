// NSA selected attention: the CPU math core.
//
// Plain pointers and sizes only; nothing here knows about MindSpore. The AOT entry layer
// (nsa_aot.cc) and the standalone sanitizer driver both call these four functions.
// The math is defined in docs/semantics.md (and ../shared/spec/nsa_semantics.md).
#ifndef MS_NSA_NSA_CORE_H_
#define MS_NSA_NSA_CORE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "nsa_status.h"

namespace ms_nsa {

// Which keys of the selection a query row sees. kCausal is ms_nsa's rule (docs/semantics.md); the
// kCann* rules reproduce what CANN's kernels do, for the aclnn stand-in of the Ascend twin
// (custom_aot/twin/, docs/semantics.md "Where the backends agree").
enum class MaskRule : int {
  kNone = 0,          // sparse_mode 0
  kCausal = 1,        // sparse_mode 2: key position p > query position s is masked
  kCannForward = 2,   // the same keys as kCausal, but a row that sees none averages all it selected
  kCannBackward = 3,  // by slot: the slot holding the own block is cut at the diagonal, later slots masked
};

// Everything that fixes the problem, except the tensor data. Layout TND throughout:
//   query [q_tokens, q_heads, qk_head_dim], key [kv_tokens, kv_heads, qk_head_dim],
//   value [kv_tokens, kv_heads, v_head_dim], topk_indices [q_tokens, kv_heads, select_block_count],
//   attention_out / grad [q_tokens, q_heads, v_head_dim], softmax_max / softmax_sum [q_tokens, q_heads, 8].
struct NsaProblem {
  int64_t q_tokens = 0;      // T1
  int64_t kv_tokens = 0;     // T2
  int64_t q_heads = 0;       // N1
  int64_t kv_heads = 0;      // N2
  int64_t qk_head_dim = 0;   // D
  int64_t v_head_dim = 0;    // Dv
  int64_t batch_count = 0;   // B: entries in each cumulative-length array
  const int64_t *cu_seqlens_q = nullptr;   // [B], cumulative, last entry == q_tokens
  const int64_t *cu_seqlens_kv = nullptr;  // [B], cumulative, last entry == kv_tokens
  int64_t select_block_size = 0;           // beta
  int64_t select_block_count = 0;          // C
  float scale_value = 1.0f;
  MaskRule mask = MaskRule::kNone;
  DType dtype = DType::kFloat32;
};

// Width of the softmax_max / softmax_sum rows: one value repeated to fill 32 bytes, as CANN stores it.
constexpr int64_t kSoftmaxStatWidth = 8;

// Checks the sizes, the cumulative lengths and every topk index before any tensor data is read.
NsaError nsa_validate(const NsaProblem &problem, const int32_t *topk_indices);

// Forward. Writes attention_out (problem.dtype) and softmax_max / softmax_sum (float32).
NsaError nsa_forward(const NsaProblem &problem, const void *query, const void *key, const void *value,
                     const int32_t *topk_indices, float *softmax_max, float *softmax_sum,
                     void *attention_out);

// Backward. Writes dq, dk, dv (problem.dtype). dk/dv are accumulated in a fixed order that depends on
// neither the thread count nor the scheduling, so the result is bitwise reproducible.
NsaError nsa_backward(const NsaProblem &problem, const void *query, const void *key, const void *value,
                      const void *attention_out, const void *grad, const float *softmax_max,
                      const float *softmax_sum, const int32_t *topk_indices, void *dq, void *dk, void *dv);

// Thread count used by the kernels (0 or negative = the OpenMP default). Results do not depend on it.
void nsa_set_num_threads(int num_threads);
int nsa_get_num_threads();

// Instruction set of the kernels picked at run time: "avx512", "avx2" or "baseline".
const char *nsa_kernel_isa();

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_CORE_H_
