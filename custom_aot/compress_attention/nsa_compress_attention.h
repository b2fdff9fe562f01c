// nsa_compress_attention (aclnnNsaCompressAttention) on the CPU, and the gradient ms_nsa defines for it
// (softmax-attention backward over the compressed keys with the same mask; CANN has no grad op).
// Plain pointers and sizes; nothing here knows about MindSpore. Semantics: docs/semantics.md.
//
//   query [T1, N1, D], key [T2, N2, D], value [T2, N2, Dv] (T2 = compressed tokens), G = N1 / N2.
//   Query row t of batch b (batch-local position s) attends to the b's compressed keys;
//   atten_mask[s, c] != 0 masks key c (top-left corner of the mask for every batch).
//   Outputs: attention_out [T1, N1, Dv], softmax_max / softmax_sum [T1, N1, 8] (row order of query),
//   topk_indices [T1, N2, n] int32: the n selection blocks of highest importance, batch-relative.
#ifndef MS_NSA_COMPRESS_ATTENTION_NSA_COMPRESS_ATTENTION_H_
#define MS_NSA_COMPRESS_ATTENTION_NSA_COMPRESS_ATTENTION_H_

#include <cstdint>

#include "nsa_status.h"

namespace ms_nsa {

struct CompressAttentionProblem {
  int64_t q_tokens = 0, kv_tokens = 0;       // T1, T2 (compressed)
  int64_t q_heads = 0, kv_heads = 0;         // N1, N2
  int64_t qk_head_dim = 0, v_head_dim = 0;   // D, Dv
  int64_t batch_count = 0;
  const int64_t *cu_seqlens_q = nullptr;     // [B] cumulative, last == T1
  const int64_t *cu_seqlens_kv = nullptr;    // [B] cumulative compressed lengths, last == T2
  const int64_t *cu_seqlens_sel = nullptr;   // [B] cumulative selection-block counts, or null (derived)
  int64_t compress_block_size = 0;           // l
  int64_t compress_stride = 0;               // d
  int64_t select_block_size = 0;             // l'
  int64_t select_block_count = 0;            // n
  float scale_value = 1.0f;
  const uint8_t *atten_mask = nullptr;       // [rows, cols], nonzero = masked; null = nothing masked
  int64_t atten_mask_rows = 0, atten_mask_cols = 0;
  const uint8_t *topk_mask = nullptr;        // [rows, cols], nonzero = block forced into the top-k
  int64_t topk_mask_rows = 0, topk_mask_cols = 0;
  DType dtype = DType::kFloat32;
};

// The CPU kernels keep one row of scores per (query row, KV head) and thread: this bounds it.
constexpr int64_t kMaxCompressedKvLength = int64_t{1} << 17;

NsaError compress_attention_validate(const CompressAttentionProblem &problem);

NsaError compress_attention_forward(const CompressAttentionProblem &problem, const void *query, const void *key,
                                    const void *value, float *softmax_max, float *softmax_sum,
                                    void *attention_out, int32_t *topk_indices);

// dq, dk, dv from the forward's attention_out and softmax statistics and grad = d attention_out.
// Deterministic: dq is owned per query row, dk/dv per (compressed key chunk, KV head), each summed in
// increasing query-row order whatever the thread count.
NsaError compress_attention_backward(const CompressAttentionProblem &problem, const void *query, const void *key,
                                     const void *value, const void *attention_out, const void *grad,
                                     const float *softmax_max, const float *softmax_sum, void *dq, void *dk,
                                     void *dv);

}  // namespace ms_nsa

#endif  // MS_NSA_COMPRESS_ATTENTION_NSA_COMPRESS_ATTENTION_H_
