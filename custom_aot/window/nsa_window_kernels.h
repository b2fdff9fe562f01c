// The tile bodies of nsa_window_attention, written once as always_inline templates and instantiated
// inside each ISA entry point of nsa_window.cc (W = float32 lanes: 16 AVX-512, 8 AVX2, 4 baseline).
//
// Flash-attention tiling. A work item is one tile of Br query rows of one sequence and one KV head n;
// its G query heads share n's keys, so the item's query block has M = Br * G rows, in (row, head)
// order. Keys go in tiles of Bc rows. Scores are kept transposed, as in the selection kernels
// (nsa_kernels.h): S^T [Bc, Mp] has one row per key and one lane per query row (M padded to Mp, a
// multiple of 16), so S^T = scale * K Q^T reads key rows straight from the tensor, the softmax's max
// and sum over keys are lane-wise vector operations down the rows, and P V, P^T dO, dS^T Q and dS K
// read P / dS through strides; only Q and dO are transposed, once per query tile load.
// Per (query tile, key tile) pair, the forward folds S into an online softmax and O += P V; the
// backward re-derives
//     P = exp(S - max) / sum,  dP = dO V^T,  dS = scale * P * (dP - Delta),  Delta = <dO, O>
// from the forward's row statistics and uses them in two owner-computes passes: a key tile's owner
// adds dV += P^T dO and dK += dS^T Q over the query tiles that see it, in increasing order; a query
// tile's owner adds dQ += dS K over its key tiles, in increasing order. No element has two writers.
#ifndef MS_NSA_WINDOW_NSA_WINDOW_KERNELS_H_
#define MS_NSA_WINDOW_NSA_WINDOW_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "nsa_dtype.h"
#include "nsa_gemm.h"
#include "nsa_kernels.h"
#include "nsa_simd.h"
#include "window/nsa_window.h"

namespace ms_nsa {
namespace window {

// Rows [begin, begin + count) of the sequence [seq_begin, seq_end) (global token rows).
struct Tile {
  int64_t seq_begin, seq_end, begin, count;
};

// Tile loops take their bodies as lambdas; always_inline makes each body part of the ISA entry point
// that calls it, so it is compiled for that entry point's instruction set like the rest.
#define MS_NSA_INLINE_LAMBDA __attribute__((always_inline))

// Score lanes are padded to a multiple of this (the widest vector), so every lane loop is whole vectors.
constexpr int64_t kLaneMultiple = 16;

// The tile sizes, fixed by the problem alone (never by the thread count), and the window geometry
// between query tiles and key tiles. Tiles start at their sequence's first token.
struct Tiling {
  int64_t query_rows;  // Br
  int64_t key_rows;    // Bc
  int64_t window;      // w
  int64_t group;       // G

  static Tiling choose(const WindowProblem &p) {
    const int64_t group = p.q_heads / p.kv_heads, w = std::min<int64_t>(p.window_size, 64);
    // About 128 score lanes per item (enough to amortise loading a key tile), no more query rows than
    // the window is wide (rows beyond it only add masked scores), and key tiles no taller than it.
    const int64_t rows = std::clamp<int64_t>(std::min<int64_t>(128 / group, (w + 7) / 8 * 8), 1, 64);
    return {rows, (w + 15) / 16 * 16, p.window_size, group};
  }
  static int64_t padded(int64_t lanes) { return (lanes + kLaneMultiple - 1) / kLaneMultiple * kLaneMultiple; }
  int64_t max_lanes() const { return padded(query_rows * group); }  // Mp of a full query tile

  Tile query_tile(int64_t seq_begin, int64_t seq_end, int64_t i) const {
    const int64_t begin = seq_begin + i * query_rows;
    return {seq_begin, seq_end, begin, std::min(query_rows, seq_end - begin)};
  }
  Tile key_tile(int64_t seq_begin, int64_t seq_end, int64_t j) const {
    const int64_t begin = seq_begin + j * key_rows;
    return {seq_begin, seq_end, begin, std::min(key_rows, seq_end - begin)};
  }
  // body(k) for every key tile k holding some key that a row of query tile q sees, in increasing order.
  template <typename Body>
  MS_NSA_INLINE void each_key_tile_seen_by(const Tile &q, Body body) const {
    const int64_t first = (std::max(q.seq_begin, q.begin - window + 1) - q.seq_begin) / key_rows;
    const int64_t last = (q.begin + q.count - 1 - q.seq_begin) / key_rows;
    for (int64_t j = first; j <= last; ++j) body(key_tile(q.seq_begin, q.seq_end, j));
  }
  // body(q) for every query tile q holding some row that sees a key of key tile k, in increasing order.
  template <typename Body>
  MS_NSA_INLINE void each_query_tile_seeing(const Tile &k, Body body) const {
    const int64_t first = (k.begin - k.seq_begin) / query_rows;
    const int64_t last = (std::min(k.seq_end - 1, k.begin + k.count - 1 + window - 1) - k.seq_begin) / query_rows;
    for (int64_t i = first; i <= last; ++i) body(query_tile(k.seq_begin, k.seq_end, i));
  }
};

// Per-thread scratch, carved from one allocation (scratch_floats). M = query rows * G, Mp padded.
struct Scratch {
  float *q;           // [M, D]    the query block, float32, (row, head) order
  float *q_t;         // [D, Mp]   its transpose, zero in the padding lanes
  float *d_out;       // [M, Dv]   its incoming gradient (backward)
  float *d_out_t;     // [Dv, Mp]
  float *key_rows;    // [Bc, D]   key rows converted to float32 (half types)
  float *value_rows;  // [Bc, Dv]
  float *scores;      // [Bc, Mp]  S^T, then P^T
  float *dscores;     // [Bc, Mp]  dP^T, then dS^T (backward)
  float *acc;         // [M, max(D, Dv)]  O (forward) or dQ
  float *key_acc;     // [Bc, D]   dK of the key tile
  float *value_acc;   // [Bc, Dv]  dV
  float *row_max;     // [Mp] running max (forward) / the forward's max (backward)
  float *row_sum;     // [Mp] running sum (forward) / 1 / the forward's sum (backward)
  float *lane_aux;    // [Mp] the step's rescale factor (forward) / Delta (backward)
};

inline int64_t scratch_floats(const WindowProblem &p, const Tiling &tl) {
  const int64_t M = tl.query_rows * tl.group, Mp = tl.max_lanes(), Bc = tl.key_rows;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim;
  return M * (D + Dv + std::max(D, Dv)) + Mp * (D + Dv + 2 * Bc + 3) + 2 * Bc * (D + Dv);
}

inline Scratch carve_scratch(const WindowProblem &p, const Tiling &tl, float *base) {
  const int64_t M = tl.query_rows * tl.group, Mp = tl.max_lanes(), Bc = tl.key_rows;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim;
  float *next = base;
  auto take = [&next](int64_t floats) {
    float *region = next;
    next += floats;
    return region;
  };
  Scratch s;
  s.q = take(M * D);
  s.q_t = take(D * Mp);
  s.d_out = take(M * Dv);
  s.d_out_t = take(Dv * Mp);
  s.key_rows = take(Bc * D);
  s.value_rows = take(Bc * Dv);
  s.scores = take(Bc * Mp);
  s.dscores = take(Bc * Mp);
  s.acc = take(M * std::max(D, Dv));
  s.key_acc = take(Bc * D);
  s.value_acc = take(Bc * Dv);
  s.row_max = take(Mp);
  s.row_sum = take(Mp);
  s.lane_aux = take(Mp);
  return s;
}

// The rows of a query-shaped tensor ([T, N1, dim]) of tile q and KV head n's G heads, as float32
// [q.count * G, dim], and its transpose [dim, Mp]: for each token its G heads are adjacent, so one
// load per token.
template <int W>
MS_NSA_INLINE void load_query_block(const WindowProblem &p, const void *tensor, int64_t dim, const Tile &q,
                                    int64_t n, float *rows, float *rows_t) {
  const int64_t group = p.q_heads / p.kv_heads, span = group * dim, M = q.count * group;
  for (int64_t r = 0; r < q.count; ++r) {
    load_row_fast<W>(p.dtype, tensor, ((q.begin + r) * p.q_heads + n * group) * dim, rows + r * span, span);
  }
  transpose_padded(rows, M, dim, Tiling::padded(M), rows_t);
}

// Writes a float32 block [q.count * G, dim] back into a query-shaped tensor (the inverse of the above).
template <int W>
MS_NSA_INLINE void store_query_block(const WindowProblem &p, const float *src, int64_t dim, const Tile &q,
                                     int64_t n, void *tensor) {
  const int64_t group = p.q_heads / p.kv_heads, span = group * dim;
  for (int64_t r = 0; r < q.count; ++r) {
    store_row_fast<W>(p.dtype, src + r * span, tensor, ((q.begin + r) * p.q_heads + n * group) * dim, span);
  }
}

// The key (value) rows of tile k and KV head n as float32 rows with stride *ld: the tensor itself for
// float32, else converted into `buffer` (stride dim).
template <int W>
MS_NSA_INLINE const float *kv_tile_rows(const WindowProblem &p, const void *tensor, int64_t dim, const Tile &k,
                                        int64_t n, float *buffer, int64_t *ld) {
  const int64_t row_stride = p.kv_heads * dim;
  if (p.dtype == DType::kFloat32) {
    *ld = row_stride;
    return static_cast<const float *>(tensor) + k.begin * row_stride + n * dim;
  }
  for (int64_t j = 0; j < k.count; ++j) {
    load_row_fast<W>(p.dtype, tensor, (k.begin + j) * row_stride + n * dim, buffer + j * dim, dim);
  }
  *ld = dim;
  return buffer;
}

// S^T = scale * K Q^T for key tile k (rows) against query tile q (lanes), -inf wherever the window
// hides the pair: key position j is seen by the query rows t with j <= t <= j + w - 1, a contiguous
// run of lanes. The one place the mask lives.
template <int W>
MS_NSA_INLINE void tile_scores(const WindowProblem &p, const Tiling &tl, const Tile &q, const Tile &k,
                               const float *keys, int64_t ld_key, const Scratch &s) {
  const int64_t group = tl.group, Mp = Tiling::padded(q.count * group);
  outlined_product<W, kTileRegs<W> / 4, 4, Update::kOverwrite>(IsaOfWidth<W>{}, k.count, Mp, p.qk_head_dim,
                                                               {keys, ld_key, 1}, s.q_t, Mp, s.scores, Mp,
                                                               p.scale_value);
  for (int64_t j = 0; j < k.count; ++j) {
    const int64_t key = k.begin + j;
    const int64_t first_row = std::clamp<int64_t>(key - q.begin, 0, q.count);
    const int64_t end_row = std::clamp<int64_t>(key + tl.window - q.begin, 0, q.count);
    float *row = s.scores + j * Mp;
    std::fill(row, row + first_row * group, kNegInf);
    std::fill(row + end_row * group, row + Mp, kNegInf);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward of one (query tile, KV head): online softmax over its key tiles in increasing order.

struct ForwardArgs {
  const WindowProblem *p;
  Tiling tiling;
  const void *query, *key, *value;
  float *softmax_max, *softmax_sum;
  void *attention_out;
};

// Folds one key tile's scores into each lane's running max and sum, leaves exp(S - max) in the
// scores and rescales the rows of O whose max grew.
template <int W>
MS_NSA_INLINE void online_softmax_step(int64_t keys, int64_t M, int64_t Mp, int64_t Dv, const Scratch &s) {
  typedef typename Lanes<W>::type V;
  const V neg_inf = splat<W>(kNegInf), zero = splat<W>(0.0f);
  for (int64_t lane = 0; lane < Mp; lane += W) {
    V tile_max = neg_inf;
    for (int64_t j = 0; j < keys; ++j) tile_max = nan_max<W>(tile_max, load<W>(s.scores + j * Mp + lane));
    const V old_max = load<W>(s.row_max + lane), new_max = nan_max<W>(old_max, tile_max);
    // A lane that has seen no key yet keeps max -inf; subtracting 0 then gives exp(-inf) = 0, not NaN.
    const V shift = new_max == neg_inf ? zero : new_max;
    const V rescale = exp<W>(old_max - shift);
    V sum{};
    for (int64_t j = 0; j < keys; ++j) {
      const V e = exp<W>(load<W>(s.scores + j * Mp + lane) - shift);
      store<W>(s.scores + j * Mp + lane, e);
      sum += e;
    }
    store<W>(s.row_sum + lane, load<W>(s.row_sum + lane) * rescale + sum);
    store<W>(s.row_max + lane, new_max);
    store<W>(s.lane_aux + lane, rescale);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float rescale = s.lane_aux[m];
    if (rescale != 1.0f) {
      for (int64_t e = 0; e < Dv; ++e) s.acc[m * Dv + e] *= rescale;
    }
  }
}

template <int W>
MS_NSA_INLINE void forward_tile(const ForwardArgs &f, const Tile &q, int64_t n, const Scratch &s) {
  const WindowProblem &p = *f.p;
  const Tiling &tl = f.tiling;
  const int64_t group = tl.group, D = p.qk_head_dim, Dv = p.v_head_dim, M = q.count * group;
  const int64_t Mp = Tiling::padded(M);
  load_query_block<W>(p, f.query, D, q, n, s.q, s.q_t);
  std::fill(s.row_max, s.row_max + Mp, kNegInf);
  std::fill(s.row_sum, s.row_sum + Mp, 0.0f);
  std::fill(s.acc, s.acc + M * Dv, 0.0f);

  tl.each_key_tile_seen_by(q, [&](const Tile &k) MS_NSA_INLINE_LAMBDA {
    int64_t ld_key = 0, ld_value = 0;
    const float *keys = kv_tile_rows<W>(p, f.key, D, k, n, s.key_rows, &ld_key);
    tile_scores<W>(p, tl, q, k, keys, ld_key, s);
    online_softmax_step<W>(k.count, M, Mp, Dv, s);
    const float *values = kv_tile_rows<W>(p, f.value, Dv, k, n, s.value_rows, &ld_value);
    wide_matmul<W, kTileRegs<W>>(M, Dv, k.count, {s.scores, 1, Mp}, values, ld_value, s.acc, Dv);
  });

  for (int64_t m = 0; m < M; ++m) {
    const float inv = 1.0f / s.row_sum[m];
    for (int64_t e = 0; e < Dv; ++e) s.acc[m * Dv + e] *= inv;
  }
  store_query_block<W>(p, s.acc, Dv, q, n, f.attention_out);
  const int64_t head0 = q.begin * p.q_heads + n * group;
  for (int64_t r = 0; r < q.count; ++r) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t m = r * group + g, row = head0 + r * p.q_heads + g;
      std::fill_n(f.softmax_max + row * kSoftmaxStatWidth, kSoftmaxStatWidth, s.row_max[m]);
      std::fill_n(f.softmax_sum + row * kSoftmaxStatWidth, kSoftmaxStatWidth, s.row_sum[m]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward.

struct BackwardArgs {
  const WindowProblem *p;
  Tiling tiling;
  const void *query, *key, *value, *attention_out, *grad;
  const float *softmax_max, *softmax_sum;
  const float *delta;  // [T, N1] Delta = <dO, O>, filled by delta_rows
  void *dq, *dk, *dv;
};

// Delta of the N1 heads of token t (float32 dot products over Dv; buffers are two [Dv] rows).
template <int W>
MS_NSA_INLINE void delta_rows(const BackwardArgs &b, int64_t t, float *delta, float *grad_row, float *out_row) {
  const WindowProblem &p = *b.p;
  const int64_t Dv = p.v_head_dim;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const int64_t offset = (t * p.q_heads + h) * Dv;
    load_row_fast<W>(p.dtype, b.grad, offset, grad_row, Dv);
    load_row_fast<W>(p.dtype, b.attention_out, offset, out_row, Dv);
    delta[t * p.q_heads + h] = dot<W>(grad_row, out_row, Dv);
  }
}

// The query side of a pair: Q, dO (and transposes), and per lane the forward's max, 1 / sum and
// Delta; padding lanes get 1 / sum = 0, so their P and dS are 0.
template <int W>
MS_NSA_INLINE void load_query_side(const BackwardArgs &b, const Tile &q, int64_t n, const Scratch &s) {
  const WindowProblem &p = *b.p;
  const int64_t group = b.tiling.group, head0 = q.begin * p.q_heads + n * group, M = q.count * group;
  load_query_block<W>(p, b.query, p.qk_head_dim, q, n, s.q, s.q_t);
  load_query_block<W>(p, b.grad, p.v_head_dim, q, n, s.d_out, s.d_out_t);
  for (int64_t m = 0; m < Tiling::padded(M); ++m) {
    const bool real = m < M;
    const int64_t row = head0 + (m / group) * p.q_heads + m % group;
    s.row_max[m] = real ? b.softmax_max[row * kSoftmaxStatWidth] : 0.0f;
    s.row_sum[m] = real ? 1.0f / b.softmax_sum[row * kSoftmaxStatWidth] : 0.0f;
    s.lane_aux[m] = real ? b.delta[row] : 0.0f;
  }
}

// P^T (in scores) and dS^T (in dscores) of one pair, from the loaded query side and key tile; the
// same operations in both passes, so the two passes see the same P and dS bits.
template <int W>
MS_NSA_INLINE void probs_and_dscores(const WindowProblem &p, const Tiling &tl, const Tile &q, const Tile &k,
                                     const float *keys, int64_t ld_key, const float *values, int64_t ld_value,
                                     const Scratch &s) {
  typedef typename Lanes<W>::type V;
  const int64_t Mp = Tiling::padded(q.count * tl.group);
  tile_scores<W>(p, tl, q, k, keys, ld_key, s);
  outlined_product<W, kTileRegs<W> / 4, 4, Update::kOverwrite>(IsaOfWidth<W>{}, k.count, Mp, p.v_head_dim,
                                                               {values, ld_value, 1}, s.d_out_t, Mp, s.dscores, Mp);
  for (int64_t lane = 0; lane < Mp; lane += W) {
    const V row_max = load<W>(s.row_max + lane), inv_sum = load<W>(s.row_sum + lane);
    const V delta = load<W>(s.lane_aux + lane);
    for (int64_t j = 0; j < k.count; ++j) {
      float *probs = s.scores + j * Mp + lane, *dscores = s.dscores + j * Mp + lane;
      const V prob = exp<W>(load<W>(probs) - row_max) * inv_sum;
      store<W>(probs, prob);
      store<W>(dscores, prob * (load<W>(dscores) - delta) * p.scale_value);
    }
  }
}

// Pass 1, owner of key tile k (KV head n): dV and dK summed over the query tiles that see it.
template <int W>
MS_NSA_INLINE void key_tile_backward(const BackwardArgs &b, const Tile &k, int64_t n, const Scratch &s) {
  const WindowProblem &p = *b.p;
  const Tiling &tl = b.tiling;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim;
  int64_t ld_key = 0, ld_value = 0;
  const float *keys = kv_tile_rows<W>(p, b.key, D, k, n, s.key_rows, &ld_key);
  const float *values = kv_tile_rows<W>(p, b.value, Dv, k, n, s.value_rows, &ld_value);
  std::fill(s.key_acc, s.key_acc + k.count * D, 0.0f);
  std::fill(s.value_acc, s.value_acc + k.count * Dv, 0.0f);
  tl.each_query_tile_seeing(k, [&](const Tile &q) MS_NSA_INLINE_LAMBDA {
    const int64_t M = q.count * tl.group, Mp = Tiling::padded(M);
    load_query_side<W>(b, q, n, s);
    probs_and_dscores<W>(p, tl, q, k, keys, ld_key, values, ld_value, s);
    wide_matmul<W, kTileRegs<W>>(k.count, Dv, M, {s.scores, Mp, 1}, s.d_out, Dv, s.value_acc, Dv);
    wide_matmul<W, kTileRegs<W>>(k.count, D, M, {s.dscores, Mp, 1}, s.q, D, s.key_acc, D);
  });
  for (int64_t j = 0; j < k.count; ++j) {
    store_row_fast<W>(p.dtype, s.key_acc + j * D, b.dk, ((k.begin + j) * p.kv_heads + n) * D, D);
    store_row_fast<W>(p.dtype, s.value_acc + j * Dv, b.dv, ((k.begin + j) * p.kv_heads + n) * Dv, Dv);
  }
}

// Pass 2, owner of query tile q (KV head n): dQ summed over its key tiles.
template <int W>
MS_NSA_INLINE void query_tile_backward(const BackwardArgs &b, const Tile &q, int64_t n, const Scratch &s) {
  const WindowProblem &p = *b.p;
  const Tiling &tl = b.tiling;
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim, M = q.count * tl.group, Mp = Tiling::padded(M);
  load_query_side<W>(b, q, n, s);
  std::fill(s.acc, s.acc + M * D, 0.0f);
  tl.each_key_tile_seen_by(q, [&](const Tile &k) MS_NSA_INLINE_LAMBDA {
    int64_t ld_key = 0, ld_value = 0;
    const float *keys = kv_tile_rows<W>(p, b.key, D, k, n, s.key_rows, &ld_key);
    const float *values = kv_tile_rows<W>(p, b.value, Dv, k, n, s.value_rows, &ld_value);
    probs_and_dscores<W>(p, tl, q, k, keys, ld_key, values, ld_value, s);
    wide_matmul<W, kTileRegs<W>>(M, D, k.count, {s.dscores, 1, Mp}, keys, ld_key, s.acc, D);
  });
  store_query_block<W>(p, s.acc, D, q, n, b.dq);
}

}  // namespace window
}  // namespace ms_nsa

#endif  // MS_NSA_WINDOW_NSA_WINDOW_KERNELS_H_
