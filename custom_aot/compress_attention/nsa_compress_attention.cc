// nsa_compress_attention on the CPU: validation, forward (attention + importance + top-k per query
// row and KV head, no [T1, T2] matrix) and the deterministic backward.
//
// Backward without atomics, in two phases. Phase 1 (parallel over (query row, KV head)) owns dq and
// stores delta = <dO, O> per head. Phase 2 (parallel over (chunk of a batch's compressed keys, KV
// head)) owns dk/dv of the chunk and adds the batch's query rows in increasing order, recomputing P and
// dS. Scores are computed twice, the price of a fixed summation order for any thread count.
#include "compress_attention/nsa_compress_attention.h"

#include <algorithm>
#include <sstream>
#include <vector>

#include "compress_attention/kernels.h"
#include "nsa_core.h"
#include "nsa_isa.h"

namespace ms_nsa {
namespace {

using cmp_attn::BackwardIn;
using cmp_attn::BackwardScratch;
using cmp_attn::ForwardOut;
using cmp_attn::ForwardScratch;
using cmp_attn::Tensors;

using cmp_attn::Tile;

using ForwardFn = void (*)(const Tensors &, const ForwardOut &, const Tile &, int64_t, const ForwardScratch &);
using QueryFn = void (*)(const Tensors &, const BackwardIn &, const Tile &, int64_t, void *, float *,
                         const BackwardScratch &);
using KeyFn = void (*)(const Tensors &, const BackwardIn &, const Tile *, int64_t, int64_t, int64_t, int64_t, int64_t,
                       const float *, void *, void *, const BackwardScratch &);

struct Kernels {
  ForwardFn forward;
  QueryFn backward_query;
  KeyFn backward_key;
  int score_lanes;
};

#define MS_NSA_CMP_ENTRY_POINTS(ISA, NAME, TARGET, W)                                                              \
  TARGET void forward_##NAME(const Tensors &x, const ForwardOut &o, const Tile &tile, int64_t n,              \
                             const ForwardScratch &s) {                                                       \
    cmp_attn::forward_item<W, W>(x, o, tile, n, s);                                                           \
  }                                                                                                           \
  TARGET void query_##NAME(const Tensors &x, const BackwardIn &in, const Tile &tile, int64_t n, void *dq,     \
                           float *delta, const BackwardScratch &s) {                                          \
    cmp_attn::backward_query_item<W, W>(x, in, tile, n, dq, delta, s);                                        \
  }                                                                                                           \
  TARGET void key_##NAME(const Tensors &x, const BackwardIn &in, const Tile *tiles, int64_t tile_count,       \
                         int64_t kv_begin, int64_t kv_len, int64_t key0, int64_t n, const float *delta,       \
                         void *dk, void *dv, const BackwardScratch &s) {                                      \
    cmp_attn::backward_key_item<W, W>(x, in, tiles, tile_count, kv_begin, kv_len, key0, n, delta, dk, dv, s); \
  }                                                                                                           \
  constexpr Kernels kKernels_##NAME = {forward_##NAME, query_##NAME, key_##NAME, W};

// Score vectors as wide as the ISA's: tiles of several query rows fill them when G is small.
MS_NSA_FOR_EACH_ISA(MS_NSA_CMP_ENTRY_POINTS)

const Kernels &active_kernels() { return MS_NSA_ACTIVE_KERNELS(Kernels); }

// Tile::live_len from atten_mask: 1 + the last key any row of the tile sees; the batch's length if
// some row of the tile sees no key (it averages every value, CANN's rule) or there is no mask.
void set_live_lengths(const CompressAttentionProblem &p, std::vector<Tile> *tiles) {
  if (p.atten_mask == nullptr) return;
  const int64_t count = static_cast<int64_t>(tiles->size());
#pragma omp parallel for num_threads(nsa_get_num_threads()) schedule(dynamic, 64)
  for (int64_t i = 0; i < count; ++i) {
    Tile &tile = (*tiles)[i];
    int64_t live = 0;
    for (int64_t r = 0; r < tile.rows; ++r) {
      const uint8_t *row = p.atten_mask + (tile.position0 + r) * p.atten_mask_cols;
      int64_t last = tile.kv_len - 1;
      while (last >= 0 && row[last] != 0) --last;
      if (last < 0) {   // a fully masked row reads every key
        live = tile.kv_len;
        break;
      }
      live = std::max(live, last + 1);
    }
    tile.live_len = live;
  }
}

// Every batch's query rows cut into tiles of `rows_per_tile`, in row order; tile_begin[b] is batch b's
// first tile (tile_begin[B] = the tile count).
struct Tiling {
  std::vector<Tile> tiles;
  std::vector<int64_t> tile_begin;
};

Tiling make_tiles(const CompressAttentionProblem &p, int64_t rows_per_tile) {
  const Segments queries{p.cu_seqlens_q, p.batch_count}, keys{p.cu_seqlens_kv, p.batch_count};
  Tiling tiling;
  for (int64_t b = 0; b < p.batch_count; ++b) {
    tiling.tile_begin.push_back(static_cast<int64_t>(tiling.tiles.size()));
    for (int64_t t0 = queries.begin(b); t0 < queries.end(b); t0 += rows_per_tile) {
      tiling.tiles.push_back({t0, std::min(rows_per_tile, queries.end(b) - t0), t0 - queries.begin(b),
                              keys.begin(b), keys.length(b), keys.length(b)});
    }
  }
  tiling.tile_begin.push_back(static_cast<int64_t>(tiling.tiles.size()));
  set_live_lengths(p, &tiling.tiles);
  return tiling;
}

NsaError bad(Status status, const std::ostringstream &msg) { return {status, msg.str()}; }

// key and value as float32: the inputs themselves, or a converted copy (the size of key/value).
class FloatView {
 public:
  FloatView(DType dtype, const void *data, int64_t count) {
    if (dtype == DType::kFloat32) {
      view_ = static_cast<const float *>(data);
      return;
    }
    copy_.resize(count);
    constexpr int64_t kPiece = 1 << 14;
#pragma omp parallel for num_threads(nsa_get_num_threads()) schedule(static)
    for (int64_t begin = 0; begin < count; begin += kPiece) {
      load_row(dtype, data, begin, copy_.data() + begin, std::min(kPiece, count - begin));
    }
    view_ = copy_.data();
  }
  const float *get() const { return view_; }

 private:
  std::vector<float> copy_;
  const float *view_ = nullptr;
};

int64_t longest_batch(const Segments &segments) {
  int64_t longest = 0;
  for (int64_t b = 0; b < segments.count; ++b) longest = std::max(longest, segments.length(b));
  return longest;
}

}  // namespace

NsaError compress_attention_validate(const CompressAttentionProblem &p) {
  std::ostringstream msg;
  if (p.q_tokens < 0 || p.kv_tokens < 0 || p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0 ||
      p.qk_head_dim < 1 || p.v_head_dim < 1) {
    msg << "sizes must be positive with N1 a multiple of N2, got T1=" << p.q_tokens << ", T2=" << p.kv_tokens
        << ", N1=" << p.q_heads << ", N2=" << p.kv_heads << ", D=" << p.qk_head_dim << ", Dv=" << p.v_head_dim;
    return bad(kBadProblem, msg);
  }
  const int64_t l = p.compress_block_size, d = p.compress_stride, l_sel = p.select_block_size;
  if (d < 1 || l < d || l_sel < l || l_sel % d != 0 || p.select_block_count < 1) {
    msg << "need 1 <= compress_stride <= compress_block_size <= select_block_size, select_block_size a multiple "
        << "of compress_stride and select_block_count >= 1; got " << l << ", " << d << ", " << l_sel << ", "
        << p.select_block_count;
    return bad(kBadProblem, msg);
  }
  if (p.batch_count < 1 || p.cu_seqlens_q == nullptr || p.cu_seqlens_kv == nullptr) {
    return {kBadProblem, "actual_seq_qlen and actual_cmp_seq_kvlen must hold at least one entry"};
  }
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return {kUnsupportedDType, "query dtype must be float32, float16 or bfloat16"};
  }
  NsaError err = check_cumulative("actual_seq_qlen", p.cu_seqlens_q, p.batch_count, p.q_tokens, "T1");
  if (err.status != kOk) return err;
  err = check_cumulative("actual_cmp_seq_kvlen", p.cu_seqlens_kv, p.batch_count, p.kv_tokens, "T2 (key.shape[0])");
  if (err.status != kOk) return err;
  const Segments queries{p.cu_seqlens_q, p.batch_count}, keys{p.cu_seqlens_kv, p.batch_count};
  // actual_sel_seq_kvlen is checked batch by batch below: equal per-batch counts imply the rest.
  const Segments selected{p.cu_seqlens_sel, p.batch_count};
  for (int64_t b = 0; b < p.batch_count; ++b) {
    const int64_t kv_len = keys.length(b), blocks = cmp_attn::selection_blocks(p, kv_len);
    if (p.cu_seqlens_sel != nullptr && selected.length(b) != blocks) {
      msg << "batch " << b << " has " << selected.length(b) << " selection blocks in actual_sel_seq_kvlen but "
          << kv_len << " compressed keys give ceil(" << kv_len << " / " << l_sel / d << ") = " << blocks;
      return bad(kBadKvLength, msg);
    }
    if (queries.length(b) == 0) continue;  // a batch without queries reads nothing
    if (blocks < p.select_block_count || kv_len > kMaxCompressedKvLength) {
      msg << "batch " << b << " has " << kv_len << " compressed keys (from actual_cmp_seq_kvlen), i.e. " << blocks
          << " selection blocks; it needs at least select_block_count = " << p.select_block_count
          << " blocks and at most " << kMaxCompressedKvLength << " compressed keys";
      return bad(kBadKvLength, msg);
    }
    if (p.atten_mask != nullptr && (p.atten_mask_rows < queries.length(b) || p.atten_mask_cols < kv_len)) {
      msg << "atten_mask is [" << p.atten_mask_rows << ", " << p.atten_mask_cols << "] but batch " << b << " has "
          << queries.length(b) << " queries and " << kv_len << " compressed keys; every batch uses the mask's "
          << "top-left corner, so it must be at least [max query length, max compressed length]";
      return bad(kBadProblem, msg);
    }
    if (p.topk_mask != nullptr && (p.topk_mask_rows < queries.length(b) || p.topk_mask_cols < blocks)) {
      msg << "topk_mask is [" << p.topk_mask_rows << ", " << p.topk_mask_cols << "] but batch " << b << " has "
          << queries.length(b) << " queries and " << blocks << " selection blocks; every batch uses the mask's "
          << "top-left corner, so it must be at least [max query length, max selection blocks]";
      return bad(kBadProblem, msg);
    }
  }
  return {};
}

NsaError compress_attention_forward(const CompressAttentionProblem &p, const void *query, const void *key,
                                    const void *value, float *softmax_max, float *softmax_sum,
                                    void *attention_out, int32_t *topk_indices) {
  NsaError err = compress_attention_validate(p);
  if (err.status != kOk) return err;
  const int64_t group = p.q_heads / p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim;
  const Kernels &kernels = active_kernels();
  const int64_t rows = cmp_attn::tile_rows(group, kernels.score_lanes);
  const int64_t gp = cmp_attn::padded_group(rows * group, kernels.score_lanes);
  const Tiling tiling = make_tiles(p, rows);
  const int64_t items = static_cast<int64_t>(tiling.tiles.size()) * p.kv_heads;
  const FloatView key32(p.dtype, key, p.kv_tokens * p.kv_heads * D), value32(p.dtype, value, p.kv_tokens * p.kv_heads * Dv);
  const Tensors x{&p, query, key32.get(), value32.get()};
  const ForwardOut out{softmax_max, softmax_sum, attention_out, topk_indices};
  const int64_t longest = std::max<int64_t>(1, longest_batch({p.cu_seqlens_kv, p.batch_count}));
  const int64_t blocks = cmp_attn::selection_blocks(p, longest);

#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    std::vector<float> buffer(D * gp + longest * gp + 3 * gp + gp * Dv + std::max(D, Dv) + longest + blocks);
    std::vector<int32_t> order(blocks);
    float *at = buffer.data();
    auto take = [&at](int64_t n) { float *p = at; at += n; return p; };
    ForwardScratch s;
    s.q_t = take(D * gp);
    s.scores = take(longest * gp);
    s.stats = take(3 * gp);
    s.out = take(gp * Dv);
    s.tmp = take(std::max(D, Dv));
    s.psum = take(longest);
    s.importance = take(blocks);
    s.order = order.data();
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < items; ++item) {
      kernels.forward(x, out, tiling.tiles[item / p.kv_heads], item % p.kv_heads, s);
    }
  }
  return {};
}

NsaError compress_attention_backward(const CompressAttentionProblem &p, const void *query, const void *key,
                                     const void *value, const void *attention_out, const void *grad,
                                     const float *softmax_max, const float *softmax_sum, void *dq, void *dk,
                                     void *dv) {
  NsaError err = compress_attention_validate(p);
  if (err.status != kOk) return err;
  const int64_t group = p.q_heads / p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim, N2 = p.kv_heads;
  const Kernels &kernels = active_kernels();
  const int64_t rows = cmp_attn::tile_rows(group, kernels.score_lanes);
  const int64_t gp = cmp_attn::padded_group(rows * group, kernels.score_lanes);
  const Tiling tiling = make_tiles(p, rows);
  const int64_t tile_items = static_cast<int64_t>(tiling.tiles.size()) * N2;
  const FloatView key32(p.dtype, key, p.kv_tokens * N2 * D), value32(p.dtype, value, p.kv_tokens * N2 * Dv);
  const Tensors x{&p, query, key32.get(), value32.get()};
  const BackwardIn in{attention_out, grad, softmax_max, softmax_sum};
  std::vector<float> delta(p.q_tokens * p.q_heads);

  // Phase 2's work: (batch, first key of the chunk) for every chunk of every batch's compressed keys.
  const Segments keys{p.cu_seqlens_kv, p.batch_count};
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t b = 0; b < p.batch_count; ++b) {
    for (int64_t key0 = 0; key0 < keys.length(b); key0 += cmp_attn::kKeyChunk) chunks.emplace_back(b, key0);
  }
  const int64_t chunk_items = static_cast<int64_t>(chunks.size()) * N2;
  const int64_t acc_rows = std::max(gp, cmp_attn::kKeyChunk);

#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    std::vector<float> buffer(D * gp + gp * D + Dv * gp + gp * Dv + 3 * gp + 2 * cmp_attn::kKeyChunk * gp +
                              acc_rows * D + cmp_attn::kKeyChunk * Dv + std::max(D, Dv));
    std::vector<uint8_t> masked(cmp_attn::kKeyChunk * rows);
    float *at = buffer.data();
    auto take = [&at](int64_t n) { float *p = at; at += n; return p; };
    BackwardScratch s;
    s.q_t = take(D * gp);
    s.q_rows = take(gp * D);
    s.do_t = take(Dv * gp);
    s.do_rows = take(gp * Dv);
    s.stats = take(3 * gp);
    s.scores = take(cmp_attn::kKeyChunk * gp);
    s.dp = take(cmp_attn::kKeyChunk * gp);
    s.acc_k = take(acc_rows * D);
    s.acc_v = take(cmp_attn::kKeyChunk * Dv);
    s.tmp = take(std::max(D, Dv));
    s.masked = masked.data();
#pragma omp for schedule(dynamic, 2)
    for (int64_t item = 0; item < tile_items; ++item) {
      kernels.backward_query(x, in, tiling.tiles[item / N2], item % N2, dq, delta.data(), s);
    }
    // (implicit barrier: phase 2 reads every delta)
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < chunk_items; ++item) {
      const auto &chunk = chunks[item / N2];
      const int64_t b = chunk.first, first_tile = tiling.tile_begin[b];
      kernels.backward_key(x, in, tiling.tiles.data() + first_tile, tiling.tile_begin[b + 1] - first_tile,
                           keys.begin(b), keys.length(b), chunk.second, item % N2, delta.data(), dk, dv, s);
    }
  }
  return {};
}

}  // namespace ms_nsa
