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

// The work unit: up to `rows` consecutive query rows of one batch and one KV head. Its score columns
// are c = r * G + g (query row t0 + r, head g of the group), so small groups still fill a vector.
struct Tile {
  int64_t t0, rows;       // query rows [t0, t0 + rows)
  int64_t position0;      // batch-local position of t0
  int64_t kv_begin, kv_len;  // the batch's compressed keys
  // Keys [live_len, kv_len) are masked for every row of the tile, and no row is fully masked: they get
  // P = 0 and dS = 0, so they add exact zeros to every sum and are skipped (a causal mask halves the
  // work). kv_len when nothing can be skipped. Set by set_live_lengths.
  int64_t live_len;
};

// Query rows per tile: enough to fill `lanes` score columns with groups of G heads.
inline int64_t tile_rows(int64_t group, int lanes) { return std::max<int64_t>(1, lanes / group); }

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

// Element offset of column c's head row (query row t0 + c / G, head n * G + c % G) in a [T1, N1, dim] tensor.
inline int64_t column_offset(const CompressAttentionProblem &p, const Tile &tile, int64_t n, int64_t c, int64_t dim) {
  const int64_t group = p.q_heads / p.kv_heads;
  return ((tile.t0 + c / group) * p.q_heads + n * group + c % group) * dim;
}

// The tile's rows of a [T1, N1, dim] tensor as columns: transposed [dim, gp] (padding zero) and,
// if `rows` is given, as rows [cols, dim].
template <int W>
MS_NSA_INLINE void load_columns(const CompressAttentionProblem &p, const void *base, const Tile &tile, int64_t n,
                                int64_t dim, int64_t gp, float *transposed, float *rows, float *tmp) {
  const int64_t cols = tile.rows * (p.q_heads / p.kv_heads);
  std::fill_n(transposed, dim * gp, 0.0f);
  for (int64_t c = 0; c < cols; ++c) {
    float *row = rows != nullptr ? rows + c * dim : tmp;
    load_row_fast<W>(p.dtype, base, column_offset(p, tile, n, c, dim), row, dim);
    for (int64_t e = 0; e < dim; ++e) transposed[e * gp + c] = row[e];
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

// The one place the mask lives: sets the masked (query row, key) score columns of keys key0.. to
// kMasked and records which, so the backward can zero their dS (a masked score is a constant).
inline void apply_mask(const CompressAttentionProblem &p, const Tile &tile, int64_t key0, int64_t count, int64_t gp,
                       float *scores, uint8_t *masked) {
  if (p.atten_mask == nullptr) return;
  const int64_t group = p.q_heads / p.kv_heads;
  for (int64_t s = 0; s < count; ++s) {
    for (int64_t r = 0; r < tile.rows; ++r) {
      const bool hit = key_masked(p, tile.position0 + r, key0 + s);
      if (masked != nullptr) masked[s * tile.rows + r] = hit;
      if (hit) std::fill_n(scores + s * gp + r * group, group, kMasked);
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
MS_NSA_INLINE void forward_item(const Tensors &x, const ForwardOut &o, const Tile &tile, int64_t n,
                                const ForwardScratch &s) {
  typedef typename Lanes<SW>::type V;
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(tile_rows(group, SW) * group, SW);
  // S: the keys read (see Tile::live_len); keys S.. of the batch have P = 0 exactly.
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads, S = tile.live_len, cols = tile.rows * group;

  load_columns<W>(p, x.query, tile, n, D, gp, s.q_t, nullptr, s.tmp);
  score_rows<SW>(x, x.key + (tile.kv_begin * N2 + n) * D, S, s.q_t, gp, s.scores);
  apply_mask(p, tile, 0, S, gp, s.scores, nullptr);

  float *row_max = s.stats, *row_sum = s.stats + gp, *inv_sum = s.stats + 2 * gp;
  for (int64_t v = 0; v < gp; v += SW) {
    V mx = splat<SW>(-INFINITY);
    for (int64_t k = 0; k < S; ++k) mx = nan_max<SW>(mx, load<SW>(s.scores + k * gp + v));
    V total = splat<SW>(0.0f);
    for (int64_t k = 0; k < S; ++k) {
      const V e = exp<SW>(load<SW>(s.scores + k * gp + v) - mx);
      store<SW>(s.scores + k * gp + v, e);
      total += e;
    }
    const V inv = splat<SW>(1.0f) / total;
    for (int64_t k = 0; k < S; ++k) store<SW>(s.scores + k * gp + v, load<SW>(s.scores + k * gp + v) * inv);
    store<SW>(row_max + v, mx);
    store<SW>(row_sum + v, total);
    store<SW>(inv_sum + v, inv);
  }

  product<W, 4, 2, Update::kOverwrite>(cols, Dv, S, {s.scores, 1, gp}, x.value + (tile.kv_begin * N2 + n) * Dv,
                                       N2 * Dv, s.out, Dv);
  for (int64_t c = 0; c < cols; ++c) {
    store_row_fast<W>(p.dtype, s.out + c * Dv, o.attention_out, column_offset(p, tile, n, c, Dv), Dv);
    std::fill_n(o.softmax_max + column_offset(p, tile, n, c, 8), 8, row_max[c]);
    std::fill_n(o.softmax_sum + column_offset(p, tile, n, c, 8), 8, row_sum[c]);
  }

  const int64_t blocks = selection_blocks(p, tile.kv_len);
  std::fill(s.psum + S, s.psum + tile.kv_len, 0.0f);
  for (int64_t r = 0; r < tile.rows; ++r) {
    // P summed over the row's G heads, in head order, then mapped to selection blocks.
    for (int64_t k = 0; k < S; ++k) {
      const float *sc = s.scores + k * gp + r * group;
      float total = 0.0f;
      for (int64_t g = 0; g < group; ++g) total += sc[g];
      s.psum[k] = total;
    }
    block_importance(p, s.psum, tile.kv_len, blocks, s.importance);
    if (p.topk_mask != nullptr) {
      const uint8_t *forced = p.topk_mask + (tile.position0 + r) * p.topk_mask_cols;
      for (int64_t j = 0; j < blocks; ++j) {
        if (forced[j] != 0) s.importance[j] = kForced;
      }
    }
    select_top(s.importance, blocks, p.select_block_count, s.order,
               o.topk_indices + ((tile.t0 + r) * N2 + n) * p.select_block_count);
  }
}

struct BackwardIn {
  const void *attention_out, *grad;
  const float *softmax_max, *softmax_sum;
};

struct BackwardScratch {
  float *q_t;       // [D, gp]
  float *q_rows;    // [gp, D]
  float *do_t;      // [Dv, gp]
  float *do_rows;   // [gp, Dv]
  float *stats;     // [3, gp]: max, 1/sum, delta
  float *scores;    // [kKeyChunk, gp]
  float *dp;        // [kKeyChunk, gp]
  float *acc_k;     // [max(gp, kKeyChunk), D]
  float *acc_v;     // [kKeyChunk, Dv]
  float *tmp;       // [max(D, Dv)]
  uint8_t *masked;  // [kKeyChunk, rows]
};

// Everything of the tile's columns the backward needs: q and dO (both layouts) and per column the
// forward's max, 1/sum and delta = <dO, O>. delta is computed and stored into delta_out (phase 1) or
// read from delta_in (phase 2), so both phases use the same value.
template <int W>
MS_NSA_INLINE void load_query_side(const Tensors &x, const BackwardIn &in, const Tile &tile, int64_t n, int64_t gp,
                                   const BackwardScratch &s, float *delta_out, const float *delta_in) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t cols = tile.rows * (p.q_heads / p.kv_heads), Dv = p.v_head_dim;
  load_columns<W>(p, x.query, tile, n, p.qk_head_dim, gp, s.q_t, s.q_rows, s.tmp);
  load_columns<W>(p, in.grad, tile, n, Dv, gp, s.do_t, s.do_rows, s.tmp);
  float *row_max = s.stats, *inv_sum = s.stats + gp, *delta = s.stats + 2 * gp;
  std::fill_n(s.stats, 3 * gp, 0.0f);
  std::fill_n(inv_sum, gp, 1.0f);
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t head = column_offset(p, tile, n, c, 1);
    row_max[c] = in.softmax_max[head * 8];
    inv_sum[c] = 1.0f / in.softmax_sum[head * 8];
    if (delta_in != nullptr) {
      delta[c] = delta_in[head];
      continue;
    }
    load_row_fast<W>(p.dtype, in.attention_out, head * Dv, s.tmp, Dv);
    float dot = 0.0f;
    for (int64_t e = 0; e < Dv; ++e) dot += s.do_rows[c * Dv + e] * s.tmp[e];
    delta[c] = dot;
    delta_out[head] = dot;
  }
}

// P (in s.scores) and dS = P (dP - delta) (in s.dp, zero where masked) of `count` keys from key0, for
// the columns loaded in s: the one place the backward forms them.
template <int SW>
MS_NSA_INLINE void chunk_gradients(const Tensors &x, const Tile &tile, int64_t n, int64_t key0, int64_t count,
                                   int64_t gp, const BackwardScratch &s) {
  typedef typename Lanes<SW>::type V;
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads, first = tile.kv_begin + key0;
  score_rows<SW>(x, x.key + (first * N2 + n) * D, count, s.q_t, gp, s.scores);
  product<SW, 8, 1, Update::kOverwrite>(count, gp, Dv, {x.value + (first * N2 + n) * Dv, N2 * Dv, 1}, s.do_t, gp,
                                        s.dp, gp, 1.0f);
  apply_mask(p, tile, key0, count, gp, s.scores, s.masked);
  const float *row_max = s.stats, *inv_sum = s.stats + gp, *delta = s.stats + 2 * gp;
  for (int64_t k = 0; k < count; ++k) {
    float *sc = s.scores + k * gp, *dp = s.dp + k * gp;
    for (int64_t v = 0; v < gp; v += SW) {
      const V prob = exp<SW>(load<SW>(sc + v) - load<SW>(row_max + v)) * load<SW>(inv_sum + v);
      store<SW>(sc + v, prob);
      store<SW>(dp + v, prob * (load<SW>(dp + v) - load<SW>(delta + v)));
    }
    if (p.atten_mask == nullptr) continue;
    for (int64_t r = 0; r < tile.rows; ++r) {
      if (s.masked[k * tile.rows + r]) std::fill_n(dp + r * group, group, 0.0f);
    }
  }
}

// Phase 1, per tile: dq = scale * sum over key chunks of dS^T K, and delta.
template <int W, int SW>
MS_NSA_INLINE void backward_query_item(const Tensors &x, const BackwardIn &in, const Tile &tile, int64_t n, void *dq,
                                       float *delta_out, const BackwardScratch &s) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(tile_rows(group, SW) * group, SW);
  const int64_t D = p.qk_head_dim, cols = tile.rows * group;
  load_query_side<W>(x, in, tile, n, gp, s, delta_out, nullptr);
  std::fill_n(s.acc_k, cols * D, 0.0f);
  for (int64_t key0 = 0; key0 < tile.live_len; key0 += kKeyChunk) {   // later chunks: dS = 0
    const int64_t count = std::min(kKeyChunk, tile.kv_len - key0);
    chunk_gradients<SW>(x, tile, n, key0, count, gp, s);
    product<W, 4, 2, Update::kAccumulate>(cols, D, count, {s.dp, 1, gp},
                                          x.key + ((tile.kv_begin + key0) * p.kv_heads + n) * D, p.kv_heads * D,
                                          s.acc_k, D);
  }
  for (int64_t i = 0; i < cols * D; ++i) s.acc_k[i] *= p.scale_value;
  for (int64_t c = 0; c < cols; ++c) {
    store_row_fast<W>(p.dtype, s.acc_k + c * D, dq, column_offset(p, tile, n, c, D), D);
  }
}

// Phase 2, per (chunk of a batch's compressed keys from key0, KV head n): dk, dv of those keys, summed
// over the batch's tiles in order (query rows increasing); a batch without queries gets zeros.
template <int W, int SW>
MS_NSA_INLINE void backward_key_item(const Tensors &x, const BackwardIn &in, const Tile *tiles, int64_t tile_count,
                                     int64_t kv_begin, int64_t kv_len, int64_t key0, int64_t n, const float *delta,
                                     void *dk, void *dv, const BackwardScratch &s) {
  const CompressAttentionProblem &p = *x.p;
  const int64_t group = p.q_heads / p.kv_heads, gp = padded_group(tile_rows(group, SW) * group, SW);
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads;
  const int64_t count = std::min(kKeyChunk, kv_len - key0);
  std::fill_n(s.acc_k, count * D, 0.0f);
  std::fill_n(s.acc_v, count * Dv, 0.0f);
  for (int64_t i = 0; i < tile_count; ++i) {
    const Tile &tile = tiles[i];
    if (key0 >= tile.live_len) continue;   // P = dS = 0 for the whole chunk: adds nothing
    const int64_t cols = tile.rows * group;
    load_query_side<W>(x, in, tile, n, gp, s, nullptr, delta);
    chunk_gradients<SW>(x, tile, n, key0, count, gp, s);
    product<W, 8, 2, Update::kAccumulate>(count, D, cols, {s.dp, gp, 1}, s.q_rows, D, s.acc_k, D);
    product<W, 8, 2, Update::kAccumulate>(count, Dv, cols, {s.scores, gp, 1}, s.do_rows, Dv, s.acc_v, Dv);
  }
  for (int64_t k = 0; k < count; ++k) {
    float *dk_row = s.acc_k + k * D;
    for (int64_t e = 0; e < D; ++e) dk_row[e] *= p.scale_value;
    const int64_t key_row = (kv_begin + key0 + k) * N2 + n;
    store_row_fast<W>(p.dtype, dk_row, dk, key_row * D, D);
    store_row_fast<W>(p.dtype, s.acc_v + k * Dv, dv, key_row * Dv, Dv);
  }
}

}  // namespace cmp_attn
}  // namespace ms_nsa

#endif  // MS_NSA_COMPRESS_ATTENTION_KERNELS_H_
