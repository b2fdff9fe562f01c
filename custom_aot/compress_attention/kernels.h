// The per-item bodies of nsa_compress_attention, written once as always_inline templates and
// instantiated per instruction set in nsa_compress_attention.cc. W = float lanes of the ISA's vector,
// SW = lanes of the score vector (one lane per query head of the KV group, padded to gp heads).
//
// Scores are kept transposed, [keys, gp]: one product K [S, D] x q^T [D, gp] per item, and the G heads
// of a KV group share every key row they read. The forward keeps one such row block for all of the
// batch's compressed keys (S <= kMaxCompressedKvLength), since the top-k needs the normalised P.
#ifndef MS_NSA_COMPRESS_ATTENTION_KERNELS_H_
#define MS_NSA_COMPRESS_ATTENTION_KERNELS_H_

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "compress_attention/nsa_compress_attention.h"
#include "nsa_dtype.h"
#include "nsa_gemm.h"
#include "nsa_simd.h"
#include "nsa_varlen.h"

namespace ms_nsa {
namespace cmp_attn {

constexpr int64_t kKeyChunk = 64;  // compressed keys per step of the backward
constexpr float kMasked = -FLT_MAX;  // CANN's value for a masked score (a fully masked row averages V)
constexpr float kForced = FLT_MAX;   // importance of a block forced by topk_mask

inline int64_t padded_group(int64_t group, int lanes) { return (group + lanes - 1) / lanes * lanes; }

// Where a query row sits.
struct Row {
  int64_t batch, position;   // batch-local query position s
  int64_t kv_begin, kv_len;  // the batch's compressed keys
};

inline Row locate(const CompressAttentionProblem &p, int64_t t) {
  const Segments queries{p.cu_seqlens_q, p.batch_count}, keys{p.cu_seqlens_kv, p.batch_count};
  const int64_t b = queries.batch_of(t);
  return {b, t - queries.begin(b), keys.begin(b), keys.length(b)};
}

// Selection blocks of a batch with kv_len compressed keys: ceil(kv_len / (l' / d)).
inline int64_t selection_blocks(const CompressAttentionProblem &p, int64_t kv_len) {
  const int64_t per_block = p.select_block_size / p.compress_stride;
  return (kv_len + per_block - 1) / per_block;
}

inline bool key_masked(const CompressAttentionProblem &p, int64_t position, int64_t key) {
  return p.atten_mask != nullptr && p.atten_mask[position * p.atten_mask_cols + key] != 0;
}

// Float32 views of the inputs (key/value converted once per call for half types).
struct Tensors {
  const CompressAttentionProblem *p;
  const void *query;
  const float *key, *value;
};

// q^T [D, gp] of the G heads of KV head n at query row t (padded heads zero), and optionally the
// same rows untransposed [G, D].
template <int W>
MS_NSA_INLINE void load_heads(DType dtype, const void *base, int64_t first_row, int64_t group, int64_t dim,
                              int64_t gp, float *transposed, float *rows, float *tmp) {
  std::fill_n(transposed, dim * gp, 0.0f);
  for (int64_t g = 0; g < group; ++g) {
    float *row = rows != nullptr ? rows + g * dim : tmp;
    load_row_fast<W>(dtype, base, (first_row + g) * dim, row, dim);
    for (int64_t e = 0; e < dim; ++e) transposed[e * gp + g] = row[e];
  }
}

// scores[s, :] = scale * K[s] . q^T for `count` key rows starting at `key_rows`.
template <int SW>
MS_NSA_INLINE void score_rows(const Tensors &x, const float *key_rows, int64_t count, const float *q_t, int64_t gp,
                              float *scores) {
  const CompressAttentionProblem &p = *x.p;
  product<SW, 8, 1, Update::kOverwrite>(count, gp, p.qk_head_dim, {key_rows, p.kv_heads * p.qk_head_dim, 1}, q_t,
                                        gp, scores, gp, p.scale_value);
}

// Turns scores [count, gp] (keys key0.. of the row at `position`) into P with the row's max and
// 1/sum, and, when dp is given, dp into dS = P (dP - delta) (zero at masked keys, whose score is a
// constant). The one place the backward's P and dS are formed.
template <int SW>
MS_NSA_INLINE void probabilities(const CompressAttentionProblem &p, int64_t position, int64_t key0, int64_t count,
                                 int64_t gp, const float *row_max, const float *inv_sum, const float *delta,
                                 float *scores, float *dp) {
  typedef typename Lanes<SW>::type V;
  for (int64_t s = 0; s < count; ++s) {
    const bool masked = key_masked(p, position, key0 + s);
    float *sc = scores + s * gp;
    for (int64_t v = 0; v < gp; v += SW) {
      const V x = masked ? splat<SW>(kMasked) : load<SW>(sc + v);
      const V prob = exp<SW>(x - load<SW>(row_max + v)) * load<SW>(inv_sum + v);
      store<SW>(sc + v, prob);
      if (dp != nullptr) {
        store<SW>(dp + s * gp + v, masked ? splat<SW>(0.0f) : prob * (load<SW>(dp + s * gp + v) - load<SW>(delta + v)));
      }
    }
  }
}

struct ForwardOut {
  float *softmax_max, *softmax_sum;
  void *attention_out;
  int32_t *topk_indices;
};

struct ForwardScratch {
  float *q_t;       // [D, gp]
  float *scores;    // [S_max, gp]
  float *stats;     // [3, gp]: max, sum, 1/sum
  float *out;       // [gp, Dv]
  float *tmp;       // [max(D, Dv)]
  float *psum;      // [S_max]
  float *importance;  // [blocks_max]
  int32_t *order;     // [blocks_max]
};

// Importance of selection block j (CANN's golden code and kernel; block numbers from 0):
//   sum over taps i < m + nn - 1 of w_i * psum[m (j + 1) - i], w_i = min(i + 1, m + nn - 1 - i, nn),
// i.e. sum_{a < m} sum_{b < nn} psum[m (j + 1) - a - b], keys outside [0, S) dropped; m = l'/d, nn = l/d.
inline void block_importance(const CompressAttentionProblem &p, const float *psum, int64_t kv_len, int64_t blocks,
                             float *importance) {
  const int64_t m = p.select_block_size / p.compress_stride, nn = p.compress_block_size / p.compress_stride;
  const int64_t taps = m + nn - 1;
  for (int64_t j = 0; j < blocks; ++j) {
    float total = 0.0f;
    for (int64_t i = 0; i < taps; ++i) {
      const int64_t key = m * (j + 1) - i;
      if (key < 0 || key >= kv_len) continue;
      total += static_cast<float>(std::min({i + 1, taps - i, nn})) * psum[key];
    }
    importance[j] = total;
  }
}

// The n blocks of highest importance, in descending importance, equal importance lower block first
// (torch.sort(descending=True, stable=True) in CANN's golden code). NaN ranks highest, as there.
inline void select_top(const float *importance, int64_t blocks, int64_t count, int32_t *order, int32_t *out) {
  for (int64_t j = 0; j < blocks; ++j) order[j] = static_cast<int32_t>(j);
  auto rank = [importance](int32_t j) {
    const float x = importance[j];
    return std::isnan(x) ? INFINITY : x;
  };
  std::partial_sort(order, order + count, order + blocks, [&rank](int32_t a, int32_t b) {
    const float ka = rank(a), kb = rank(b);
    return ka > kb || (ka == kb && a < b);
  });
  std::copy_n(order, count, out);
}

template <int W, int SW>
MS_NSA_INLINE void forward_item(const Tensors &x, const ForwardOut &o, int64_t t, int64_t n, const ForwardScratch &s) {
  typedef typename Lanes<SW>::type V;
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(group, SW);
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads;
  const Row row = locate(p, t);
  const int64_t S = row.kv_len, first_head = t * p.q_heads + n * group;

  load_heads<W>(p.dtype, x.query, first_head, group, D, gp, s.q_t, nullptr, s.tmp);
  score_rows<SW>(x, x.key + (row.kv_begin * N2 + n) * D, S, s.q_t, gp, s.scores);

  float *row_max = s.stats, *row_sum = s.stats + gp, *inv_sum = s.stats + 2 * gp;
  for (int64_t v = 0; v < gp; v += SW) store<SW>(row_max + v, splat<SW>(-INFINITY));
  for (int64_t k = 0; k < S; ++k) {
    float *sc = s.scores + k * gp;
    if (key_masked(p, row.position, k)) std::fill_n(sc, gp, kMasked);
    for (int64_t v = 0; v < gp; v += SW) store<SW>(row_max + v, nan_max<SW>(load<SW>(row_max + v), load<SW>(sc + v)));
  }
  for (int64_t v = 0; v < gp; v += SW) {
    V total = splat<SW>(0.0f);
    const V mx = load<SW>(row_max + v);
    for (int64_t k = 0; k < S; ++k) {
      const V e = exp<SW>(load<SW>(s.scores + k * gp + v) - mx);
      store<SW>(s.scores + k * gp + v, e);
      total += e;
    }
    store<SW>(row_sum + v, total);
    store<SW>(inv_sum + v, splat<SW>(1.0f) / total);
  }
  // P, and its sum over the group's heads (in head order) for the importance scores.
  for (int64_t k = 0; k < S; ++k) {
    float *sc = s.scores + k * gp;
    for (int64_t v = 0; v < gp; v += SW) store<SW>(sc + v, load<SW>(sc + v) * load<SW>(inv_sum + v));
    float total = 0.0f;
    for (int64_t g = 0; g < group; ++g) total += sc[g];
    s.psum[k] = total;
  }

  product<W, 4, 2, Update::kOverwrite>(group, Dv, S, {s.scores, 1, gp}, x.value + (row.kv_begin * N2 + n) * Dv,
                                       N2 * Dv, s.out, Dv);
  for (int64_t g = 0; g < group; ++g) {
    store_row_fast<W>(p.dtype, s.out + g * Dv, o.attention_out, (first_head + g) * Dv, Dv);
    std::fill_n(o.softmax_max + (first_head + g) * 8, 8, row_max[g]);
    std::fill_n(o.softmax_sum + (first_head + g) * 8, 8, row_sum[g]);
  }

  const int64_t blocks = selection_blocks(p, S);
  block_importance(p, s.psum, S, blocks, s.importance);
  if (p.topk_mask != nullptr) {
    const uint8_t *forced = p.topk_mask + row.position * p.topk_mask_cols;
    for (int64_t j = 0; j < blocks; ++j) {
      if (forced[j] != 0) s.importance[j] = kForced;
    }
  }
  select_top(s.importance, blocks, p.select_block_count, s.order,
             o.topk_indices + (t * N2 + n) * p.select_block_count);
}

struct BackwardIn {
  const void *attention_out, *grad;
  const float *softmax_max, *softmax_sum;
};

struct BackwardScratch {
  float *q_t;       // [D, gp]
  float *q_rows;    // [G, D]
  float *do_t;      // [Dv, gp]
  float *do_rows;   // [G, Dv]
  float *stats;     // [3, gp]: max, 1/sum, delta
  float *scores;    // [kKeyChunk, gp]
  float *dp;        // [kKeyChunk, gp]
  float *acc_k;     // [max(G, kKeyChunk), D]
  float *acc_v;     // [kKeyChunk, Dv]
  float *tmp;       // [max(D, Dv)]
};

// Everything of query row t's G heads the backward needs: q (both layouts), dO (both), and per head
// the forward's max, 1/sum and delta = <dO, O>. delta is computed here and, if delta_out is given,
// stored (phase 1), else read from `delta_in` (phase 2), so both phases use the same value.
template <int W>
MS_NSA_INLINE void load_query_side(const Tensors &x, const BackwardIn &in, int64_t t, int64_t n, int64_t gp,
                                   const BackwardScratch &s, float *delta_out, const float *delta_in) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim;
  const int64_t first_head = t * p.q_heads + n * group;
  load_heads<W>(p.dtype, x.query, first_head, group, D, gp, s.q_t, s.q_rows, s.tmp);
  load_heads<W>(p.dtype, in.grad, first_head, group, Dv, gp, s.do_t, s.do_rows, s.tmp);
  float *row_max = s.stats, *inv_sum = s.stats + gp, *delta = s.stats + 2 * gp;
  std::fill_n(s.stats, 3 * gp, 0.0f);
  std::fill_n(inv_sum, gp, 1.0f);
  for (int64_t g = 0; g < group; ++g) {
    row_max[g] = in.softmax_max[(first_head + g) * 8];
    inv_sum[g] = 1.0f / in.softmax_sum[(first_head + g) * 8];
    if (delta_in != nullptr) {
      delta[g] = delta_in[first_head + g];
      continue;
    }
    load_row_fast<W>(p.dtype, in.attention_out, (first_head + g) * Dv, s.tmp, Dv);
    float dot = 0.0f;
    for (int64_t e = 0; e < Dv; ++e) dot += s.do_rows[g * Dv + e] * s.tmp[e];
    delta[g] = dot;
    delta_out[first_head + g] = dot;
  }
}

// P and dS of `count` keys (from key0 of t's batch) for the heads loaded in s.
template <int SW>
MS_NSA_INLINE void chunk_gradients(const Tensors &x, const Row &row, int64_t n, int64_t key0, int64_t count,
                                   int64_t gp, const BackwardScratch &s) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads, first = row.kv_begin + key0;
  score_rows<SW>(x, x.key + (first * N2 + n) * D, count, s.q_t, gp, s.scores);
  product<SW, 8, 1, Update::kOverwrite>(count, gp, Dv, {x.value + (first * N2 + n) * Dv, N2 * Dv, 1}, s.do_t, gp,
                                        s.dp, gp, 1.0f);
  probabilities<SW>(p, row.position, key0, count, gp, s.stats, s.stats + gp, s.stats + 2 * gp, s.scores, s.dp);
}

// Phase 1, per (query row t, KV head n): dq = scale * sum over key chunks of dS^T K, and delta.
template <int W, int SW>
MS_NSA_INLINE void backward_query_item(const Tensors &x, const BackwardIn &in, int64_t t, int64_t n, void *dq,
                                       float *delta_out, const BackwardScratch &s) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(group, SW), D = p.qk_head_dim;
  const Row row = locate(p, t);
  load_query_side<W>(x, in, t, n, gp, s, delta_out, nullptr);
  std::fill_n(s.acc_k, group * D, 0.0f);
  for (int64_t key0 = 0; key0 < row.kv_len; key0 += kKeyChunk) {
    const int64_t count = std::min(kKeyChunk, row.kv_len - key0);
    chunk_gradients<SW>(x, row, n, key0, count, gp, s);
    product<W, 4, 2, Update::kAccumulate>(group, D, count, {s.dp, 1, gp},
                                          x.key + ((row.kv_begin + key0) * p.kv_heads + n) * D, p.kv_heads * D,
                                          s.acc_k, D);
  }
  const int64_t first_head = t * p.q_heads + n * group;
  for (int64_t i = 0; i < group * D; ++i) s.acc_k[i] *= p.scale_value;
  for (int64_t g = 0; g < group; ++g) store_row_fast<W>(p.dtype, s.acc_k + g * D, dq, (first_head + g) * D, D);
}

// Phase 2, per (chunk of batch b's compressed keys from key0, KV head n): dk, dv of those keys, summed
// over the batch's query rows in increasing order.
template <int W, int SW>
MS_NSA_INLINE void backward_key_item(const Tensors &x, const BackwardIn &in, int64_t batch, int64_t key0, int64_t n,
                                     const float *delta, void *dk, void *dv, const BackwardScratch &s) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(group, SW);
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads;
  const Segments queries{p.cu_seqlens_q, p.batch_count}, keys{p.cu_seqlens_kv, p.batch_count};
  const Row row0{batch, 0, keys.begin(batch), keys.length(batch)};
  const int64_t count = std::min(kKeyChunk, row0.kv_len - key0);
  std::fill_n(s.acc_k, count * D, 0.0f);
  std::fill_n(s.acc_v, count * Dv, 0.0f);
  for (int64_t t = queries.begin(batch); t < queries.end(batch); ++t) {
    const Row row{batch, t - queries.begin(batch), row0.kv_begin, row0.kv_len};
    load_query_side<W>(x, in, t, n, gp, s, nullptr, delta);
    chunk_gradients<SW>(x, row, n, key0, count, gp, s);
    product<W, 8, 2, Update::kAccumulate>(count, D, group, {s.dp, gp, 1}, s.q_rows, D, s.acc_k, D);
    product<W, 8, 2, Update::kAccumulate>(count, Dv, group, {s.scores, gp, 1}, s.do_rows, Dv, s.acc_v, Dv);
  }
  for (int64_t k = 0; k < count; ++k) {
    float *dk_row = s.acc_k + k * D;
    for (int64_t e = 0; e < D; ++e) dk_row[e] *= p.scale_value;
    const int64_t key_row = (row0.kv_begin + key0 + k) * N2 + n;
    store_row_fast<W>(p.dtype, dk_row, dk, key_row * D, D);
    store_row_fast<W>(p.dtype, s.acc_v + k * Dv, dv, key_row * Dv, Dv);
  }
}

}  // namespace cmp_attn
}  // namespace ms_nsa

#endif  // MS_NSA_COMPRESS_ATTENTION_KERNELS_H_
