// The per-item bodies of the forward and backward, written once as always_inline templates and
// instantiated inside each ISA entry point of nsa_core.cc (see nsa_simd.h for why).
//
//   W   float32 lanes of the wide products (D or Dv columns): 16 AVX-512, 8 AVX2, 4 baseline.
//   SW  lanes of the score products, whose columns are the G query heads of a KV head padded to a
//       multiple of SW ("padded group", Gp). SW <= W; a small G uses a narrow SW to waste fewer lanes.
//
// Layout choice. Scores are kept transposed, S^T [C*beta, Gp]: row j is one selected key, its lanes
// the G heads. Then S^T = scale * K Q^T reads the gathered key rows as they lie in memory
// (broadcast) against Q^T [D, Gp] (one small transpose per query row, reused by all C blocks), the
// softmax max/sum over keys are lane-wise vector operations down the rows, and P V, dS K, P^T dO and
// dS^T Q read P / dS through strides. No K/V tile is ever transposed or copied for float32 inputs.
#ifndef MS_NSA_NSA_KERNELS_H_
#define MS_NSA_NSA_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <limits>

#include "nsa_core.h"
#include "nsa_dtype.h"
#include "nsa_gemm.h"
#include "nsa_geometry.h"
#include "nsa_simd.h"

namespace ms_nsa {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Accumulator registers a register tile may use: 16 of AVX-512's 32, 12 of AVX2's / SSE's 16.
template <int W>
constexpr int kTileRegs = W >= 16 ? 16 : 12;

// C (op)= alpha * A B for the score products, whose N is the padded group (a multiple of SW), one or
// two vectors wide. A is a block of key (value) rows with a run-time stride, and each tile row needs
// its own pointer: more than 8 rows run out of general registers (the pointers spill and reloading
// them costs more than the extra B loads of a shorter tile).
template <int W, int SW, Update U>
MS_NSA_INLINE void score_matmul(int64_t M, int64_t N, int64_t K, MatrixA a, const float *b, float *c,
                                float alpha) {
  constexpr int kRows = kTileRegs<W> / 2;
  if (N == SW) {
    outlined_product<SW, kRows, 1, U>(IsaOfWidth<W>{}, M, N, K, a, b, N, c, N, alpha);
  } else {
    outlined_product<SW, kRows, 2, U>(IsaOfWidth<W>{}, M, N, K, a, b, N, c, N, alpha);
  }
}

// C += A B for the wide products, whose N is D or Dv: four vectors by Regs / 4 rows (4 divides both
// beta and the usual G).
template <int W, int Regs>
MS_NSA_INLINE void wide_matmul(int64_t M, int64_t N, int64_t K, MatrixA a, const float *b, int64_t ldb, float *c,
                               int64_t ldc) {
  outlined_product<W, Regs / 4, 4, Update::kAccumulate>(IsaOfWidth<W>{}, M, N, K, a, b, ldb, c, ldc);
}

inline int64_t padded_group(int64_t group, int score_lanes) {
  return (group + score_lanes - 1) / score_lanes * score_lanes;
}

// Per-thread scratch, carved by the caller from one allocation (sizes in scratch_floats()).
struct Scratch {
  float *q_t;        // [D, Gp]    Q^T of the current query row, zero in the padding lanes
  float *do_t;       // [Dv, Gp]   dO^T (backward)
  float *scores;     // [C*beta, Gp] S^T then P^T (forward); [beta, Gp] dP^T of one block (backward)
  float *rows;       // [G, max(D, Dv)]   query / grad / out rows converted to float32
  float *rows2;      // [G, max(D, Dv)]
  float *key_tile;   // [beta, D]  gathered key rows (half types only)
  float *value_tile; // [beta, Dv]
  float *acc;        // [G, max(D, Dv)]   O or dQ being accumulated
  float *lane_stats; // [3, Gp]    row max, 1 / row sum, Delta per head
  float *use_rows;   // [kUseRows, D + Dv]  query / grad rows of a chunk of block uses (half types)
  StridedSegment *segments; // [2 * kUseRows]      that chunk as segments of the dv and dk products
};

// Query rows of block uses phase 2 takes per chunk (see accumulate_block).
constexpr int64_t kUseRows = 128;

inline int64_t scratch_floats(const NsaProblem &p, int64_t gp) {
  const int64_t group = p.q_heads / p.kv_heads, span = p.select_block_count * p.select_block_size;
  const int64_t wide = std::max(p.qk_head_dim, p.v_head_dim);
  return (p.qk_head_dim + p.v_head_dim + span) * gp + 3 * group * wide +
         (p.select_block_size + kUseRows) * (p.qk_head_dim + p.v_head_dim) + 3 * gp;
}

inline int64_t scratch_segments() { return 2 * kUseRows; }

inline Scratch carve_scratch(const NsaProblem &p, int64_t gp, float *base, StridedSegment *segments) {
  const int64_t group = p.q_heads / p.kv_heads, span = p.select_block_count * p.select_block_size;
  const int64_t wide = std::max(p.qk_head_dim, p.v_head_dim), beta = p.select_block_size;
  Scratch s;
  s.q_t = base;
  s.do_t = s.q_t + p.qk_head_dim * gp;
  s.scores = s.do_t + p.v_head_dim * gp;
  s.rows = s.scores + span * gp;
  s.rows2 = s.rows + group * wide;
  s.acc = s.rows2 + group * wide;
  s.key_tile = s.acc + group * wide;
  s.value_tile = s.key_tile + beta * p.qk_head_dim;
  s.lane_stats = s.value_tile + beta * p.v_head_dim;
  s.use_rows = s.lane_stats + 3 * gp;
  s.segments = segments;
  return s;
}

// `count` consecutive float32 values of `tensor` starting at element `offset`: the tensor itself for
// float32 inputs, else converted into `buffer`.
template <int W>
MS_NSA_INLINE const float *as_float(const NsaProblem &p, const void *tensor, int64_t offset, int64_t count,
                                    float *buffer) {
  if (p.dtype == DType::kFloat32) return static_cast<const float *>(tensor) + offset;
  load_row_fast<W>(p.dtype, tensor, offset, buffer, count);
  return buffer;
}

// Whether rows are copied when they are float32 already. A product's B rows are read once per
// register tile: tensor rows N * dim floats apart share an L1 set when that is a multiple of 4 KiB
// (K/V rows at N2 = 16, Dv = 128: 8 KiB; query rows at N1 = 16, D = 192: 12 KiB), so B rows read in
// place came from L2 every time (the block kernels' K/V blocks, and the query and grad rows that are
// B of dK and dV, which now come from the tile's compact copies: read in place, they made the block
// backward 1.3x slower).
enum class RowCopy { kOnlyToConvert, kAlways };

// The `rows` key (or value) rows of KV head n from global row `first_row`, as float32 rows with
// stride *ld: straight from the tensor for float32 (unless `copy` says kAlways), else converted or
// copied into `tile` (stride dim).
template <int W>
MS_NSA_INLINE const float *kv_rows(const NsaProblem &p, const void *tensor, int64_t dim, int64_t first_row,
                                   int64_t n, int64_t rows, float *tile, int64_t *ld,
                                   RowCopy copy = RowCopy::kOnlyToConvert) {
  const int64_t row_stride = p.kv_heads * dim;
  if (p.dtype == DType::kFloat32 && copy == RowCopy::kOnlyToConvert) {
    *ld = row_stride;
    return static_cast<const float *>(tensor) + first_row * row_stride + n * dim;
  }
  for (int64_t r = 0; r < rows; ++r) {
    load_row_fast<W>(p.dtype, tensor, (first_row + r) * row_stride + n * dim, tile + r * dim, dim);
  }
  *ld = dim;
  return tile;
}

// dst[e, g] = src[g, e] for g < G, 0 in the padding lanes g in [G, Gp).
MS_NSA_INLINE void transpose_padded(const float *src, int64_t group, int64_t dim, int64_t gp, float *dst) {
  for (int64_t e = 0; e < dim; ++e) {
    for (int64_t g = 0; g < group; ++g) dst[e * gp + g] = src[g * dim + e];
    for (int64_t g = group; g < gp; ++g) dst[e * gp + g] = 0.0f;
  }
}

// Everything about one (query row t, KV head n): where its batch and selection are.
struct Item {
  int64_t t, n;
  QueryRow row;
  const int32_t *blocks;  // its C block indices
  int64_t head0;          // flattened index of the group's first query head: t * N1 + n * G

  Item(const NsaProblem &p, const int32_t *topk, int64_t t_, int64_t n_)
      : t(t_), n(n_), row(locate_query_row(p, t_)),
        blocks(topk + (t_ * p.kv_heads + n_) * p.select_block_count),
        head0(t_ * p.q_heads + n_ * (p.q_heads / p.kv_heads)) {}

  int64_t block_start(const NsaProblem &p, int64_t slot) const {
    return int64_t{blocks[slot]} * p.select_block_size;
  }
  int64_t visible(const NsaProblem &p, int64_t slot) const {
    return visible_rows(p, row.position, blocks, slot);
  }
  int64_t first_kv_row(const NsaProblem &p, int64_t slot) const { return row.kv_begin + block_start(p, slot); }
};

// S^T[r, :] = scale * <K[r], Q^T> for the visible rows of one selected block, -inf below them.
template <int W, int SW>
MS_NSA_INLINE void block_scores(const NsaProblem &p, const float *keys, int64_t ld_key, int64_t visible,
                                const float *q_t, int64_t gp, float *scores_t) {
  score_matmul<W, SW, Update::kOverwrite>(visible, gp, p.qk_head_dim, {keys, ld_key, 1}, q_t, scores_t,
                                          p.scale_value);
  std::fill(scores_t + visible * gp, scores_t + p.select_block_size * gp, kNegInf);
}

// Loads the G rows [G, dim] of a query-shaped tensor at the item's heads and writes their transpose.
template <int W>
MS_NSA_INLINE const float *load_group_transposed(const NsaProblem &p, const void *tensor, const Item &it,
                                                 int64_t dim, int64_t gp, float *rows, float *rows_t) {
  const int64_t group = p.q_heads / p.kv_heads;
  const float *src = as_float<W>(p, tensor, it.head0 * dim, group * dim, rows);
  transpose_padded(src, group, dim, gp, rows_t);
  return src;
}

template <int W>
MS_NSA_INLINE float dot(const float *a, const float *b, int64_t n) {
  typedef typename Lanes<W>::type V;
  V acc{};
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += load<W>(a + i) * load<W>(b + i);
  float lanes[W];
  store<W>(lanes, acc);
  float sum = 0.0f;
  for (int l = 0; l < W; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// ---------------------------------------------------------------------------------------------------
// Forward of one (query row, KV head): writes its G rows of attention_out and softmax_max/sum.

struct ForwardArgs {
  const NsaProblem *p;
  const void *query, *key, *value;
  const int32_t *topk;
  float *softmax_max, *softmax_sum;
  void *attention_out;
};

template <int W, int SW>
MS_NSA_INLINE void forward_item(const ForwardArgs &f, int64_t t, int64_t n, const Scratch &s) {
  typedef typename Lanes<SW>::type V;
  const NsaProblem &p = *f.p;
  const int64_t group = p.q_heads / p.kv_heads, beta = p.select_block_size, count = p.select_block_count;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, span = count * beta, gp = padded_group(group, SW);
  const Item it(p, f.topk, t, n);
  load_group_transposed<W>(p, f.query, it, D, gp, s.rows, s.q_t);

  bool any_visible = false;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t visible = it.visible(p, i);
    any_visible = any_visible || visible > 0;
    int64_t ld_key = 0;
    const float *keys = visible > 0 ? kv_rows<W>(p, f.key, D, it.first_kv_row(p, i), n, visible, s.key_tile, &ld_key)
                                    : nullptr;
    block_scores<W, SW>(p, keys, ld_key, visible, s.q_t, gp, s.scores + i * beta * gp);
  }

  float *row_max = s.lane_stats, *row_sum = s.lane_stats + gp;
  std::fill(s.acc, s.acc + group * Dv, 0.0f);
  std::fill(row_max, row_max + gp, kNegInf);
  std::fill(row_sum, row_sum + gp, 0.0f);
  if (any_visible) {
    // Softmax down the key rows, SW heads at a time: max, then exp(S - max) in place and its sum.
    for (int64_t lane = 0; lane < gp; lane += SW) {
      V m = splat<SW>(kNegInf);
      for (int64_t j = 0; j < span; ++j) m = nan_max<SW>(m, load<SW>(s.scores + j * gp + lane));
      V l{};
      for (int64_t j = 0; j < span; ++j) {
        const V e = exp<SW>(load<SW>(s.scores + j * gp + lane) - m);
        store<SW>(s.scores + j * gp + lane, e);
        l += e;
      }
      store<SW>(row_max + lane, m);
      store<SW>(row_sum + lane, l);
    }
    // O = P V block by block (unnormalised), then O /= l.
    for (int64_t i = 0; i < count; ++i) {
      const int64_t visible = it.visible(p, i);
      if (visible == 0) continue;
      int64_t ld_value = 0;
      const float *values = kv_rows<W>(p, f.value, Dv, it.first_kv_row(p, i), n, visible, s.value_tile, &ld_value);
      wide_matmul<W, kTileRegs<W>>(group, Dv, visible, {s.scores + i * beta * gp, 1, gp}, values, ld_value, s.acc,
                                   Dv);
    }
    for (int64_t g = 0; g < group; ++g) {
      const float inv = 1.0f / row_sum[g];
      for (int64_t e = 0; e < Dv; ++e) s.acc[g * Dv + e] *= inv;
    }
  }
  if (!any_visible && p.mask == MaskRule::kCannForward) {
    // CANN fills masked scores with -FLT_MAX, not -inf: a row that sees nothing gets equal weights
    // on everything it selected (docs/semantics.md, "Where the backends agree").
    for (int64_t i = 0; i < count; ++i) {
      int64_t ld_value = 0;
      const float *values = kv_rows<W>(p, f.value, Dv, it.first_kv_row(p, i), n, beta, s.value_tile, &ld_value);
      for (int64_t r = 0; r < beta; ++r) {
        for (int64_t e = 0; e < Dv; ++e) s.acc[e] += values[r * ld_value + e];
      }
    }
    for (int64_t e = 0; e < Dv; ++e) s.acc[e] /= static_cast<float>(span);
    for (int64_t g = 0; g < group; ++g) {
      if (g > 0) std::copy(s.acc, s.acc + Dv, s.acc + g * Dv);
      row_max[g] = -std::numeric_limits<float>::max();
      row_sum[g] = static_cast<float>(span);
    }
  }
  // A row that sees no key at all (ms_nsa's rule): O = 0, max = -inf, sum = 0 (docs/semantics.md).
  store_row_fast<W>(p.dtype, s.acc, f.attention_out, it.head0 * Dv, group * Dv);
  for (int64_t g = 0; g < group; ++g) {
    std::fill_n(f.softmax_max + (it.head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_max[g]);
    std::fill_n(f.softmax_sum + (it.head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_sum[g]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward. Phase 1, per (query row, KV head): P^T and dS^T (scale folded in) into the tile buffers,
// and the whole of dq. Phase 2, per KV block: dv += P^T dO and dk += dS^T Q over its uses, in order.

struct BackwardArgs {
  const NsaProblem *p;
  const void *query, *key, *value, *attention_out, *grad;
  const float *softmax_max, *softmax_sum;
  const int32_t *topk;
  void *dq;
  float *dk_acc, *dv_acc;  // float32 accumulators (the outputs themselves for float32)
};

template <int W, int SW>
MS_NSA_INLINE void backward_item(const BackwardArgs &b, int64_t t, int64_t n, float *probs_t, float *dscores_t,
                                 const Scratch &s) {
  typedef typename Lanes<SW>::type V;
  const NsaProblem &p = *b.p;
  const int64_t group = p.q_heads / p.kv_heads, beta = p.select_block_size, count = p.select_block_count;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, gp = padded_group(group, SW);
  const Item it(p, b.topk, t, n);
  load_group_transposed<W>(p, b.query, it, D, gp, s.rows, s.q_t);
  const float *d_out = load_group_transposed<W>(p, b.grad, it, Dv, gp, s.rows, s.do_t);
  const float *out = as_float<W>(p, b.attention_out, it.head0 * Dv, group * Dv, s.rows2);

  // Per head: max and 1/sum from the forward, Delta = <dO, O>. Padding lanes get P = 0, so dS = 0.
  float *row_max = s.lane_stats, *inv_sum = s.lane_stats + gp, *delta = s.lane_stats + 2 * gp;
  for (int64_t g = 0; g < gp; ++g) {
    const bool real = g < group;
    row_max[g] = real ? b.softmax_max[(it.head0 + g) * kSoftmaxStatWidth] : 0.0f;
    inv_sum[g] = real ? 1.0f / b.softmax_sum[(it.head0 + g) * kSoftmaxStatWidth] : 0.0f;
    delta[g] = real ? dot<W>(d_out + g * Dv, out + g * Dv, Dv) : 0.0f;
  }
  std::fill(s.acc, s.acc + group * D, 0.0f);

  for (int64_t i = 0; i < count; ++i) {
    const int64_t visible = it.visible(p, i);
    if (visible == 0) continue;
    int64_t ld_key = 0, ld_value = 0;
    const float *keys = kv_rows<W>(p, b.key, D, it.first_kv_row(p, i), n, visible, s.key_tile, &ld_key);
    const float *values = kv_rows<W>(p, b.value, Dv, it.first_kv_row(p, i), n, visible, s.value_tile, &ld_value);
    float *probs = probs_t + i * beta * gp, *dscores = dscores_t + i * beta * gp;
    block_scores<W, SW>(p, keys, ld_key, visible, s.q_t, gp, probs);
    score_matmul<W, SW, Update::kOverwrite>(visible, gp, Dv, {values, ld_value, 1}, s.do_t, s.scores, 1.0f);
    for (int64_t r = 0; r < visible; ++r) {
      for (int64_t lane = 0; lane < gp; lane += SW) {
        const V prob = exp<SW>(load<SW>(probs + r * gp + lane) - load<SW>(row_max + lane)) *
                       load<SW>(inv_sum + lane);
        const V dprob = load<SW>(s.scores + r * gp + lane);
        store<SW>(probs + r * gp + lane, prob);
        store<SW>(dscores + r * gp + lane, prob * (dprob - load<SW>(delta + lane)) * p.scale_value);
      }
    }
    wide_matmul<W, kTileRegs<W>>(group, D, visible, {dscores, 1, gp}, keys, ld_key, s.acc, D);
  }
  store_row_fast<W>(p.dtype, s.acc, b.dq, it.head0 * D, group * D);
}

// One (query row, slot) that selected a KV block, as phase 2 replays it.
struct BlockUse {
  int64_t block_row;  // global row of the block's first key: with the head, names the KV block
  int64_t kv_head;
  int64_t tile_row;   // query row within the tile
  int64_t slot;       // i in [0, C)
  int64_t visible;    // rows of the block this query sees
};

// Phase 2 for one KV block: dv += P^T dO and dk += dS^T Q over its uses in (query row, slot) order.
// probs_t / dscores_t are the tile buffers, [tile row, KV head, C*beta, Gp]. The uses go in chunks
// of up to kUseRows query rows, each chunk one segmented product per output, so the block's dk/dv
// rows are read and written once per chunk instead of once per use.
template <int W, int SW>
MS_NSA_INLINE void accumulate_block(const BackwardArgs &b, int64_t tile_begin, const BlockUse *uses,
                                    int64_t use_count, const float *probs_t, const float *dscores_t,
                                    const Scratch &s) {
  const NsaProblem &p = *b.p;
  const int64_t group = p.q_heads / p.kv_heads, N2 = p.kv_heads, span = p.select_block_count * p.select_block_size;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, gp = padded_group(group, SW);
  const int64_t chunk = std::max<int64_t>(1, kUseRows / group);
  const BlockUse &first = uses[0];
  float *dv_block = b.dv_acc + (first.block_row * N2 + first.kv_head) * Dv;
  float *dk_block = b.dk_acc + (first.block_row * N2 + first.kv_head) * D;
  StridedSegment *dv_segments = s.segments, *dk_segments = s.segments + kUseRows;
  for (int64_t begin = 0; begin < use_count; begin += chunk) {
    const int64_t count = std::min(chunk, use_count - begin);
    int64_t rows_reached = 0;
    for (int64_t u = 0; u < count; ++u) {
      const BlockUse &use = uses[begin + u];
      const int64_t head0 = (tile_begin + use.tile_row) * p.q_heads + use.kv_head * group;
      const int64_t offset = ((use.tile_row * N2 + use.kv_head) * span + use.slot * p.select_block_size) * gp;
      float *converted = s.use_rows + u * group * (D + Dv);
      const float *q = as_float<W>(p, b.query, head0 * D, group * D, converted);
      const float *d_out = as_float<W>(p, b.grad, head0 * Dv, group * Dv, converted + group * D);
      dv_segments[u] = {{probs_t + offset, gp, 1}, {d_out, Dv}, group, use.visible};
      dk_segments[u] = {{dscores_t + offset, gp, 1}, {q, D}, group, use.visible};
      rows_reached = std::max(rows_reached, use.visible);
    }
    constexpr IsaOfWidth<W> isa{};
    outlined_segments_product<W, kTileRegs<W> / 4, 4>(isa, rows_reached, Dv, dv_segments, count, dv_block, N2 * Dv);
    outlined_segments_product<W, kTileRegs<W> / 4, 4>(isa, rows_reached, D, dk_segments, count, dk_block, N2 * D);
  }
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_KERNELS_H_
