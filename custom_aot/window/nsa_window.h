// nsa_window_attention on the CPU: causal sliding-window attention over packed sequences, the math core.
// Plain pointers and sizes; nothing here knows about MindSpore. Semantics: docs/semantics.md.
//
//   query [T, N1, D], key [T, N2, D], value [T, N2, Dv] (one set of tokens: self-attention), G = N1 / N2
//   query heads per KV head. Query t at position s of its sequence sees the keys at positions
//   max(0, s - w + 1) .. s of the same sequence (itself included, so no row is ever empty):
//       attention_out[t, h] = softmax_j(scale * <q[t, h], k[j, h / G]>) v[j, h / G]
//   softmax_max / softmax_sum [T, N1, 8] hold each row's score max and sum of exp(score - max), as
//   flash attention stores them, so the backward re-derives the probabilities without storing them.
#ifndef MS_NSA_WINDOW_NSA_WINDOW_H_
#define MS_NSA_WINDOW_NSA_WINDOW_H_

#include <cstdint>

#include "nsa_core.h"

namespace ms_nsa {

struct WindowProblem {
  int64_t tokens = 0;       // T: query and key/value rows
  int64_t q_heads = 0;      // N1
  int64_t kv_heads = 0;     // N2
  int64_t qk_head_dim = 0;  // D
  int64_t v_head_dim = 0;   // Dv
  int64_t batch_count = 0;  // B
  const int64_t *cu_seqlens = nullptr;  // [B], cumulative, last entry == tokens
  int64_t window_size = 0;  // w >= 1: keys each query sees, itself included
  float scale_value = 1.0f;
  DType dtype = DType::kFloat32;
};

// Checks sizes, window and cumulative lengths before any tensor data is read.
NsaError window_validate(const WindowProblem &problem);

// Writes attention_out (problem.dtype) and softmax_max / softmax_sum (float32, [T, N1, 8]).
// O(T * w) work, no buffer beyond per-thread tiles.
NsaError window_forward(const WindowProblem &problem, const void *query, const void *key, const void *value,
                        float *softmax_max, float *softmax_sum, void *attention_out);

// Writes dq, dk, dv (problem.dtype) from the forward's outputs. Every element has one owner that sums
// in a fixed order (dq: per query tile over its key tiles; dk/dv: per key tile over the query tiles
// that see it), so the result is bitwise the same for any thread count. Extra memory: T * N1 floats.
NsaError window_backward(const WindowProblem &problem, const void *query, const void *key, const void *value,
                         const void *attention_out, const void *grad, const float *softmax_max,
                         const float *softmax_sum, void *dq, void *dk, void *dv);

}  // namespace ms_nsa

#endif  // MS_NSA_WINDOW_NSA_WINDOW_H_
