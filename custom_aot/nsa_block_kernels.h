// The block-outer ("inverted") strategy for small GQA groups, after Flash Sparse Attention
// (arXiv 2508.18224): KV blocks outside, the (query row, head) pairs that selected them inside.
//
// The per-item strategy (nsa_kernels.h) reuses a loaded K/V block across the G heads of one query
// row only: at G = 1 a score product is a matrix-vector product and the kernels run at memory speed.
// Here a tile of query rows (and KV heads) is taken at once; for each KV block the G query rows of
// every use of it ((query row, slot) pairs of the tile that selected it) make one matrix (rows found
// through a table, in the tile's compact copies), and the block's products are real matrix products with
// M = uses * G rows (nsa_gemm.h, 4 x 4 vector tiles).
// The uses of a causal diagonal block see different numbers of its rows; they still share products
// (ragged_product and segments_product: each row or use runs to its own length, never masked by zeros).
//
// The softmax couples a row's C blocks, so nothing is accumulated across blocks in place:
//   forward   A. per block: for each use, S = scale * Q K^T, the block's part of the softmax (its
//                max m_s, P_s = exp(S - m_s), its sum l_s) and the partial output P_s V, into
//                per-(item, slot) buffers (item = one query row and KV head)
//             D. per item: m = max_s m_s, l = sum_s l_s e^(m_s - m), O = sum_s e^(m_s - m) P_s V / l,
//                the slots in slot order
//   backward  A. per block (max and sum known from the forward): S, dP = dO V^T, P, dS; the block's
//                owner adds dV += P^T dO and dK += dS^T Q over its uses in (query row, slot) order,
//                and writes each use's partial dQ = dS K into a per-(item, slot) buffer
//             D. per item: dQ = sum over slots, in slot order, of the partial dQ
// Every output element is therefore a fixed sequence of operations: no atomics, the same bits for
// any thread count, tile schedule or chunk size. The two strategies differ in the last bits (the
// softmax sums run in a different order).
#ifndef MS_NSA_NSA_BLOCK_KERNELS_H_
#define MS_NSA_NSA_BLOCK_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <utility>

#include "nsa_kernels.h"

namespace ms_nsa {

// (query row, head) pairs one chunk of block uses gathers: the M of the block's products.
// M below is this rounded up to 16.
constexpr int64_t kChunkPairs = 128;

inline int64_t chunk_uses(int64_t group) { return std::max<int64_t>(1, kChunkPairs / group); }
inline int64_t chunk_pairs(int64_t group) { return chunk_uses(group) * group; }

// Row stride of the chunk's score rows and of the transposed K/V blocks: beta rounded up to the widest
// vector, so the element-wise passes may run whole vectors past the visible columns.
inline int64_t padded_block(const NsaProblem &p) { return (p.select_block_size + 15) / 16 * 16; }

// Per-thread scratch of the block kernels (sizes in block_scratch_floats()).
struct BlockScratch {
  float *keys_t;      // [D, beta_p]   K^T of the block
  float *values_t;    // [Dv, beta_p]  V^T (backward)
  float *key_tile;    // [beta, D]     the block's key rows, copied or converted
  float *value_tile;  // [beta, Dv]
  float *scores;      // [M, beta_p]   S, then P
  float *dscores;     // [M, beta_p]   dP, then dS (backward)
  float *pair_stats;  // [3, M]        row max, 1 / row sum, Delta per pair (backward)
  TableSegment *segments;     // [2, chunk_uses]  the dV and dK segments of a chunk (backward)
  const float **q_at, **do_at;  // [M] each: where each pair's query and grad rows are (in the tile's copies)
  float **partial_at;           // [M]  each pair's row of the tile's per-(item, slot) buffer
};

// Pairs of a chunk rounded up to the widest vector (the transposed forward scores' row length).
inline int64_t padded_pairs(const NsaProblem &p) { return (chunk_pairs(p.q_heads / p.kv_heads) + 15) / 16 * 16; }

inline int64_t block_scratch_floats(const NsaProblem &p) {
  const int64_t m = padded_pairs(p), bp = padded_block(p);
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim;
  return (D + Dv) * bp + p.select_block_size * (D + Dv) + m * (2 * bp + 3);
}

inline int64_t block_scratch_segments(const NsaProblem &p) { return 2 * chunk_uses(p.q_heads / p.kv_heads); }

inline BlockScratch carve_block_scratch(const NsaProblem &p, float *base, TableSegment *segments,
                                        const float **input_rows, float **output_rows) {
  const int64_t m = padded_pairs(p), bp = padded_block(p);
  const int64_t D = p.qk_head_dim, Dv = p.v_head_dim;
  BlockScratch s;
  s.keys_t = base;
  s.values_t = s.keys_t + D * bp;
  s.key_tile = s.values_t + Dv * bp;
  s.value_tile = s.key_tile + p.select_block_size * D;
  s.scores = s.value_tile + p.select_block_size * Dv;
  s.dscores = s.scores + m * bp;
  s.pair_stats = s.dscores + m * bp;
  s.segments = segments;
  s.q_at = input_rows;
  s.do_at = input_rows + m;
  s.partial_at = output_rows;
  return s;
}

// Where one tile's shared buffers and uses are (the uses of one block: sorted, (query row, slot) order).
// A tile is a range of query rows and a range of KV heads (tile_shape() in nsa_core.cc).
struct TileView {
  int64_t tile_begin;     // first query row of the tile
  int64_t rows;           // its query rows
  int64_t kv_head_begin;  // its KV heads: [kv_head_begin, kv_head_begin + kv_heads)
  int64_t kv_heads;
  float *query_rows;      // [kv_heads, rows, G, D]: the tile's query rows as float32, KV head outer
  float *grad_rows;       // backward: [kv_heads, rows, G, Dv], the same for the grad rows
  float *partial;         // [uses, G, width]: per-use partial O (width Dv) or dQ (width D), in the order of
                          // the tile's uses (sorted by block), so that a chunk writes consecutive rows
  const BlockUse *uses;   // the tile's uses, sorted: a use's partial rows are at its place here
  int64_t *slot_use;      // [items, C]: the place of (item, slot)'s use, for step D (visible slots only);
                          // item = tile row * kv_heads + (KV head - kv_head_begin)
  float *stats;           // forward: [items, C, 2, G]: per-(item, slot) block max m_s, then weight; sum l_s
  const float *row_delta; // backward: Delta = rowsum(dO * O) of every query head, [T1, N1]
  int64_t item_row(int64_t item) const { return tile_begin + item / kv_heads; }
  int64_t item_kv_head(int64_t item) const { return kv_head_begin + item % kv_heads; }
};

// Where an item's G rows are in the tile's row copies: KV head outer, so that the uses of one block (one
// KV head) find their rows next to one another.
inline int64_t copied_item(const TileView &tile, int64_t tile_row, int64_t kv_head) {
  return (kv_head - tile.kv_head_begin) * tile.rows + tile_row;
}

inline int64_t use_item(const TileView &tile, const BlockUse &use) {
  return use.tile_row * tile.kv_heads + use.kv_head - tile.kv_head_begin;
}

inline int64_t use_head0(const NsaProblem &p, const TileView &tile, const BlockUse &use) {
  return (tile.tile_begin + use.tile_row) * p.q_heads + use.kv_head * (p.q_heads / p.kv_heads);
}

inline int64_t use_slot(const NsaProblem &p, const TileView &tile, const BlockUse &use) {
  return use_item(tile, use) * p.select_block_count + use.slot;
}

// Where each pair's row of a chunk's product [uses * G, width] goes: its use's rows in the tile's partial
// buffer (the products write there directly). In use order a chunk's rows are consecutive, one
// stream of stores; in (item, slot) order, as before, a chunk's consecutive rows were an item (8 or
// 12 KiB) apart, each store far from the last (use order: fwd+bwd 1.07x at G = 1 and 2).
MS_NSA_INLINE void partial_rows(const NsaProblem &p, const TileView &tile, const BlockUse *uses, int64_t count,
                                int64_t width, float **rows_at) {
  const int64_t group = p.q_heads / p.kv_heads;
  float *first = tile.partial + (uses - tile.uses) * group * width;
  for (int64_t pair = 0; pair < count * group; ++pair) rows_at[pair] = first + pair * width;
}

inline int64_t rows_reached(const BlockUse *uses, int64_t use_count) {
  int64_t reached = 0;
  for (int64_t u = 0; u < use_count; ++u) reached = std::max(reached, uses[u].visible);
  return reached;
}

// The rows of one KV block its uses reach, as float32 (straight from the tensors for float32).
struct BlockRows {
  const float *keys, *values;
  int64_t ld_key = 0, ld_value = 0, reached = 0;
};

// One stage of an S x S transpose in registers: swaps bit h of the row index with bit h of the column
// index, two shuffles per pair of rows. The masks are pack expansions so that they are constants
// (built in a loop, GCC assembled them lane by lane at run time).
template <int S, int h, int... J>
MS_NSA_INLINE void transpose_stage(typename Lanes<S>::type *rows, std::integer_sequence<int, J...>) {
  typedef typename Lanes<S>::mask M;
  constexpr M low = {((J & h) == 0 ? J : S + J - h)...};
  constexpr M high = {((J & h) == 0 ? J + h : S + J)...};
  for (int r = 0; r < S; ++r) {
    if (r & h) continue;
    const typename Lanes<S>::type a = rows[r], b = rows[r + h];
    rows[r] = __builtin_shuffle(a, b, low);
    rows[r + h] = __builtin_shuffle(a, b, high);
  }
  if constexpr (h > 1) transpose_stage<S, h / 2>(rows, std::integer_sequence<int, J...>{});
}

// An S x S square of vectors transposed in registers, log2(S) stages (AVX-512: 64 shuffles for 256
// floats, where the element loop it replaced made two memory accesses per float).
template <int S>
MS_NSA_INLINE void transpose_square(typename Lanes<S>::type *rows) {
  transpose_stage<S, S / 2>(rows, std::make_integer_sequence<int, S>{});
}

// dst[e * ld_dst + j] = src[j * ld_src + e] for the block's first `rows` rows: S x S squares in
// registers (S = the widest vector GCC keeps whole, see kSelectLanes), the edges element by element.
template <int W>
MS_NSA_INLINE void transpose_block(const float *src, int64_t ld_src, int64_t rows, int64_t dim, float *dst,
                                   int64_t ld_dst) {
  constexpr int S = W < kSelectLanes ? W : kSelectLanes;
  typedef typename Lanes<S>::type V;
  int64_t j0 = 0;
  for (; j0 + S <= rows; j0 += S) {
    int64_t e0 = 0;
    for (; e0 + S <= dim; e0 += S) {
      V square[S];
      for (int r = 0; r < S; ++r) square[r] = load<S>(src + (j0 + r) * ld_src + e0);
      transpose_square<S>(square);
      for (int r = 0; r < S; ++r) store<S>(dst + (e0 + r) * ld_dst + j0, square[r]);
    }
    for (; e0 < dim; ++e0) {
      for (int64_t j = j0; j < j0 + S; ++j) dst[e0 * ld_dst + j] = src[j * ld_src + e0];
    }
  }
  for (int64_t e = 0; e < dim; ++e) {
    for (int64_t j = j0; j < rows; ++j) dst[e * ld_dst + j] = src[j * ld_src + e];
  }
}

template <int W>
MS_NSA_INLINE BlockRows load_block(const NsaProblem &p, const void *key, const void *value, const BlockUse *uses,
                                   int64_t use_count, const BlockScratch &s) {
  BlockRows r;
  r.reached = rows_reached(uses, use_count);
  r.keys = kv_rows<W>(p, key, p.qk_head_dim, uses[0].block_row, uses[0].kv_head, r.reached, s.key_tile, &r.ld_key,
                      RowCopy::kAlways);
  r.values = kv_rows<W>(p, value, p.v_head_dim, uses[0].block_row, uses[0].kv_head, r.reached, s.value_tile,
                        &r.ld_value, RowCopy::kAlways);
  transpose_block<W>(r.keys, r.ld_key, r.reached, p.qk_head_dim, s.keys_t, padded_block(p));
  return r;
}

// Before a tile's blocks: the G rows [G, dim] of one item of a query-shaped tensor (item = copied_item),
// as float32, into the tile's copy `rows`. Every block a row selected reads them there: in the tensor,
// a row's G heads are N1 * dim floats from the next row's, so the rows of one block's uses were in
// few cache sets (L1 and L2 alike: 12 KiB apart at N1 = 16, D = 192) and missed on every block, and
// the backward had copied them once per block use.
template <int W>
MS_NSA_INLINE void copy_item_rows(const NsaProblem &p, const TileView &tile, const void *tensor, int64_t dim,
                                  int64_t item, float *rows) {
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t tile_row = item % tile.rows, kv_head = tile.kv_head_begin + item / tile.rows;
  const int64_t head0 = (tile.tile_begin + tile_row) * p.q_heads + kv_head * group;
  load_row_fast<W>(p.dtype, tensor, head0 * dim, rows + item * group * dim, group * dim);
}

// Where the G rows of every use of a chunk are in a tile copy (query or grad rows, [.., G, dim]).
MS_NSA_INLINE void pair_rows(const NsaProblem &p, const TileView &tile, const float *rows, int64_t dim,
                             const BlockUse *uses, int64_t count, const float **rows_at) {
  const int64_t group = p.q_heads / p.kv_heads;
  for (int64_t u = 0; u < count; ++u) {
    const float *first = rows + copied_item(tile, uses[u].tile_row, uses[u].kv_head) * group * dim;
    for (int64_t g = 0; g < group; ++g) rows_at[u * group + g] = first + g * dim;
  }
}

// One chunk of a block's uses: up to chunk_uses() consecutive uses, whose G query rows each make a row
// of the chunk's products (pair = use * G + head). The uses may see different numbers of the block's
// rows (only on causal diagonal blocks): score products run to the widest, everything that sums over
// keys runs each pair or use to its own `visible`.
struct Chunk {
  const BlockUse *uses;
  int64_t count, group, reached;
  int64_t pairs() const { return count * group; }
  int64_t visible(int64_t pair) const { return uses[pair / group].visible; }
};

inline Chunk chunk_at(const BlockUse *uses, int64_t begin, int64_t use_count, int64_t group) {
  const int64_t count = std::min(chunk_uses(group), use_count - begin);
  return {uses + begin, count, group, rows_reached(uses + begin, count)};
}

// ---------------------------------------------------------------------------------------------------
// Forward.

// The first `n` floats of src as a vector, `fill` in the lanes beyond.
template <int W>
MS_NSA_INLINE typename Lanes<W>::type load_head(const float *src, int64_t n, float fill) {
  if (n >= W) return load<W>(src);
  float lanes[W];
  for (int l = 0; l < W; ++l) lanes[l] = l < n ? src[l] : fill;
  return load<W>(lanes);
}

// A reduction over the lanes in log2(W) halving steps: a max that keeps NaN (kMax) or a sum, each in a
// fixed order.
template <int W, bool kMax>
MS_NSA_INLINE float reduce_lanes(typename Lanes<W>::type v) {
  if constexpr (W == 1) {
    return v;
  } else {
    typename Lanes<W / 2>::type low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char *>(&v) + sizeof(low), sizeof(high));
    if constexpr (kMax) {
      return reduce_lanes<W / 2, kMax>(nan_max<W / 2>(low, high));
    } else {
      return reduce_lanes<W / 2, kMax>(low + high);
    }
  }
}

// One block's part of a softmax row, over row[0, n): its max m_s, exp(x - m_s) in place and their sum.
// A row whose scores here are all -inf gets P = 0 from this block, not exp(-inf + inf) = NaN.
template <int W>
MS_NSA_INLINE void block_row_softmax(float *row, int64_t n, float *row_max_out, float *row_sum_out) {
  typedef typename Lanes<W>::type V;
  V m_lanes = splat<W>(kNegInf);
  for (int64_t j = 0; j < n; j += W) m_lanes = nan_max<W>(m_lanes, load_head<W>(row + j, n - j, kNegInf));
  const float row_max = reduce_lanes<W, true>(m_lanes), shift = row_max == kNegInf ? 0.0f : row_max;
  V l_lanes{};
  for (int64_t j = 0; j < n; j += W) {
    const V e = exp<W>(load_head<W>(row + j, n - j, kNegInf) - shift);  // padding lanes: exp(-inf) = 0
    if (n - j >= W) {
      store<W>(row + j, e);
    } else {
      float lanes[W];
      store<W>(lanes, e);
      std::memcpy(row + j, lanes, (n - j) * sizeof(float));
    }
    l_lanes += e;
  }
  *row_max_out = row_max;
  *row_sum_out = reduce_lanes<W, false>(l_lanes);
}

// Forward A, for every use of one KV block: S = scale * Q K^T, the block's part of the softmax (its
// max m_s, P_s = exp(S - m_s), its sum l_s) and the partial output P_s V, into the tile's
// per-(item, slot) buffers. Nothing here depends on the row's other blocks.
template <int W>
MS_NSA_INLINE void block_forward(const ForwardArgs &f, const TileView &tile, const BlockUse *uses, int64_t use_count,
                                 const BlockScratch &s) {
  const NsaProblem &p = *f.p;
  const int64_t group = p.q_heads / p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim;
  const int64_t bp = padded_block(p);
  constexpr int kRows = kTileRegs<W> / 4;
  constexpr IsaOfWidth<W> isa{};
  const BlockRows block = load_block<W>(p, f.key, f.value, uses, use_count, s);
  for (int64_t begin = 0; begin < use_count;) {
    const Chunk chunk = chunk_at(uses, begin, use_count, group);
    const auto pair_visible = [&chunk](int64_t pair) { return chunk.visible(pair); };
    pair_rows(p, tile, tile.query_rows, D, chunk.uses, chunk.count, s.q_at);
    partial_rows(p, tile, chunk.uses, chunk.count, Dv, s.partial_at);
    outlined_product<W, kRows, 4, Update::kOverwrite>(isa, chunk.pairs(), chunk.reached, D, RowTableA{s.q_at},
                                                      Strided<const float>{s.keys_t, bp}, Strided<float>{s.scores, bp},
                                                      p.scale_value);
    for (int64_t u = 0; u < chunk.count; ++u) {
      float *stats = tile.stats + use_slot(p, tile, chunk.uses[u]) * group * 2;
      for (int64_t g = 0; g < group; ++g) {
        block_row_softmax<W>(s.scores + (u * group + g) * bp, chunk.uses[u].visible, stats + g, stats + group + g);
      }
    }
    outlined_ragged_product<W, kRows, 4>(isa, chunk.pairs(), Dv, pair_visible, MatrixA{s.scores, bp, 1},
                                         Strided<const float>{block.values, block.ld_value},
                                         RowTable<float>{s.partial_at, 0});
    begin += chunk.count;
  }
}

// Forward D, for one item: per (query row, head) the row max m = max_s m_s and sum l = sum_s l_s e^(m_s - m)
// over its visible slots in slot order, then O = sum_s e^(m_s - m) P_s V / l. Writes softmax_max/sum
// and the item's weights e^(m_s - m) into the stats buffer's max entries for item_sum_partials.
template <int W>
MS_NSA_INLINE void item_combine_stats(const ForwardArgs &f, const TileView &tile, int64_t item) {
  const NsaProblem &p = *f.p;
  const int64_t group = p.q_heads / p.kv_heads, count = p.select_block_count;
  const Item it(p, f.topk, tile.item_row(item), tile.item_kv_head(item));
  float *stats = tile.stats + item * count * group * 2;
  for (int64_t g = 0; g < group; ++g) {
    float row_max = kNegInf, row_sum = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      if (it.visible(p, i) > 0) row_max = nan_max<1>(row_max, stats[i * group * 2 + g]);
    }
    for (int64_t i = 0; i < count; ++i) {
      if (it.visible(p, i) == 0) continue;
      float *slot = stats + i * group * 2;
      slot[g] = std::exp(slot[g] - row_max);  // the slot's weight from here on
      row_sum += slot[group + g] * slot[g];
    }
    std::fill_n(f.softmax_max + (it.head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_max);
    std::fill_n(f.softmax_sum + (it.head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_sum);
  }
}

// D (forward and backward): the G output rows of one item, the sum over its visible slots, in slot
// order, of the partial rows times the slot's weight per head (forward: e^(m_s - m) / l from
// item_combine_stats; backward: none), stored in the output dtype.
template <int W>
MS_NSA_INLINE void item_sum_partials(const NsaProblem &p, const int32_t *topk, const TileView &tile, int64_t item,
                                     int64_t width, const float *row_sums, void *out, float *acc) {
  const int64_t group = p.q_heads / p.kv_heads, count = p.select_block_count;
  const Item it(p, topk, tile.item_row(item), tile.item_kv_head(item));
  std::fill(acc, acc + group * width, 0.0f);
  for (int64_t i = 0; i < count; ++i) {
    if (it.visible(p, i) == 0) continue;
    const float *part = tile.partial + tile.slot_use[item * count + i] * group * width;
    const float *weights = row_sums ? tile.stats + (item * count + i) * group * 2 : nullptr;
    for (int64_t g = 0; g < group; ++g) {
      const float weight = weights ? weights[g] / row_sums[(it.head0 + g) * kSoftmaxStatWidth] : 1.0f;
      float *acc_row = acc + g * width;
      const float *part_row = part + g * width;
      int64_t e = 0;
      for (; e + W <= width; e += W) store<W>(acc_row + e, load<W>(acc_row + e) + weight * load<W>(part_row + e));
      for (; e < width; ++e) acc_row[e] += weight * part_row[e];
    }
  }
  store_row_fast<W>(p.dtype, acc, out, it.head0 * width, group * width);
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// Before the tiles: Delta = rowsum(dO * O) of every query head of row t, the shift of the softmax
// gradient (once per row and head instead of once per block use: the uses had gathered O rows for it).
// rows: 2 * N1 * Dv floats of scratch, for half types.
template <int W>
MS_NSA_INLINE void row_deltas(const BackwardArgs &b, int64_t t, float *rows, float *delta) {
  const NsaProblem &p = *b.p;
  const int64_t N1 = p.q_heads, Dv = p.v_head_dim;
  const float *grad = as_float<W>(p, b.grad, t * N1 * Dv, N1 * Dv, rows);
  const float *out = as_float<W>(p, b.attention_out, t * N1 * Dv, N1 * Dv, rows + N1 * Dv);
  for (int64_t h = 0; h < N1; ++h) delta[t * N1 + h] = dot<W>(grad + h * Dv, out + h * Dv, Dv);
}

// A: everything one KV block contributes: its dK/dV rows (owned by the caller) summed over its uses in
// order, and each use's partial dQ into the tile's per-(item, slot) buffer.
template <int W>
MS_NSA_INLINE void block_backward(const BackwardArgs &b, const TileView &tile, const BlockUse *uses,
                                  int64_t use_count, const BlockScratch &s) {
  typedef typename Lanes<W>::type V;
  const NsaProblem &p = *b.p;
  const int64_t group = p.q_heads / p.kv_heads, N2 = p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim;
  const int64_t bp = padded_block(p), max_pairs = chunk_pairs(group);
  constexpr int kRows = kTileRegs<W> / 4;
  constexpr IsaOfWidth<W> isa{};
  const BlockUse &first = uses[0];
  const BlockRows block = load_block<W>(p, b.key, b.value, uses, use_count, s);
  transpose_block<W>(block.values, block.ld_value, block.reached, Dv, s.values_t, bp);
  float *dk_block = b.dk_acc + (first.block_row * N2 + first.kv_head) * D;
  float *dv_block = b.dv_acc + (first.block_row * N2 + first.kv_head) * Dv;
  float *row_max = s.pair_stats, *inv_sum = s.pair_stats + max_pairs, *delta = s.pair_stats + 2 * max_pairs;

  for (int64_t begin = 0; begin < use_count;) {
    const Chunk chunk = chunk_at(uses, begin, use_count, group);
    const int64_t pairs = chunk.pairs();
    const auto pair_visible = [&chunk](int64_t pair) { return chunk.visible(pair); };
    pair_rows(p, tile, tile.query_rows, D, chunk.uses, chunk.count, s.q_at);
    pair_rows(p, tile, tile.grad_rows, Dv, chunk.uses, chunk.count, s.do_at);
    partial_rows(p, tile, chunk.uses, chunk.count, D, s.partial_at);
    for (int64_t u = 0; u < chunk.count; ++u) {
      const int64_t head0 = use_head0(p, tile, chunk.uses[u]);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t pair = u * group + g;
        row_max[pair] = b.softmax_max[(head0 + g) * kSoftmaxStatWidth];
        inv_sum[pair] = 1.0f / b.softmax_sum[(head0 + g) * kSoftmaxStatWidth];
        delta[pair] = tile.row_delta[head0 + g];
      }
    }
    outlined_product<W, kRows, 4, Update::kOverwrite>(isa, pairs, chunk.reached, D, RowTableA{s.q_at},
                                                      Strided<const float>{s.keys_t, bp}, Strided<float>{s.scores, bp},
                                                      p.scale_value);
    outlined_product<W, kRows, 4, Update::kOverwrite>(isa, pairs, chunk.reached, Dv, RowTableA{s.do_at},
                                                      Strided<const float>{s.values_t, bp},
                                                      Strided<float>{s.dscores, bp});
    // P and dS (scale folded in), whole vectors: the columns past a pair's `visible` are never read.
    for (int64_t pair = 0; pair < pairs; ++pair) {
      for (int64_t j = 0; j < chunk.visible(pair); j += W) {
        float *prob_at = s.scores + pair * bp + j, *dprob_at = s.dscores + pair * bp + j;
        const V prob = exp<W>(load<W>(prob_at) - row_max[pair]) * inv_sum[pair];
        store<W>(prob_at, prob);
        store<W>(dprob_at, prob * (load<W>(dprob_at) - delta[pair]) * p.scale_value);
      }
    }
    // dV += P^T dO and dK += dS^T Q, one segment per run of uses that see the same rows, in use order.
    TableSegment *dv_segments = s.segments, *dk_segments = s.segments + chunk_uses(group);
    int64_t segment_count = 0;
    for (int64_t u = 0; u < chunk.count;) {
      int64_t run_end = u + 1;
      while (run_end < chunk.count && chunk.uses[run_end].visible == chunk.uses[u].visible) ++run_end;
      const int64_t pair0 = u * group, run_pairs = (run_end - u) * group, rows = chunk.uses[u].visible;
      dv_segments[segment_count] = {{s.scores + pair0 * bp, 1, bp}, {s.do_at + pair0, 0}, run_pairs, rows};
      dk_segments[segment_count] = {{s.dscores + pair0 * bp, 1, bp}, {s.q_at + pair0, 0}, run_pairs, rows};
      ++segment_count;
      u = run_end;
    }
    outlined_segments_product<W, kRows, 4>(isa, chunk.reached, Dv, dv_segments, segment_count, dv_block, N2 * Dv);
    outlined_segments_product<W, kRows, 4>(isa, chunk.reached, D, dk_segments, segment_count, dk_block, N2 * D);
    outlined_ragged_product<W, kRows, 4>(isa, pairs, D, pair_visible, MatrixA{s.dscores, bp, 1},
                                         Strided<const float>{block.keys, block.ld_key},
                                         RowTable<float>{s.partial_at, 0});
    begin += chunk.count;
  }
}

// Step D of the forward and of the backward for one item (acc: [G, max(D, Dv)] of scratch).
template <int W>
MS_NSA_INLINE void item_forward_finish(const ForwardArgs &f, const TileView &tile, int64_t item, float *acc) {
  item_combine_stats<W>(f, tile, item);
  item_sum_partials<W>(*f.p, f.topk, tile, item, f.p->v_head_dim, f.softmax_sum, f.attention_out, acc);
}

template <int W>
MS_NSA_INLINE void item_backward_finish(const BackwardArgs &b, const TileView &tile, int64_t item, float *acc) {
  item_sum_partials<W>(*b.p, b.topk, tile, item, b.p->qk_head_dim, nullptr, b.dq, acc);
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_BLOCK_KERNELS_H_
