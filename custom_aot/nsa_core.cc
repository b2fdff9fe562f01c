// NSA selected attention on the CPU: forward and backward.
//
// Work is organised around one (query row t, KV head n) pair: the G = N1/N2 query heads of that KV
// head share one selection, so every gathered K/V tile is loaded (and converted to float32) once and
// used by all G heads. Nothing of size T1 * C * beta * D is ever materialised.
//
// Backward, deterministically: dq of a query row has a single owner, but dk/dv rows are hit by every
// query that selected them. Instead of atomics, query rows are processed in tiles. Phase 1 (parallel
// over the tile's query rows) computes P and dS into a tile buffer and finishes dq. Phase 2 (parallel
// over the distinct KV blocks the tile selected) lets the owner of each KV block add the tile's
// contributions in (query row, slot) order. Each dk/dv element is therefore summed in increasing
// query-row order whatever the thread count, scheduling or tile size.
#include "nsa_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "nsa_dtype.h"
#include "nsa_gemm.h"
#include "nsa_geometry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ms_nsa {
namespace {

int g_num_threads = 0;

int active_threads() {
#ifdef _OPENMP
  return g_num_threads > 0 ? g_num_threads : omp_get_max_threads();
#else
  return 1;
#endif
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Gathers `rows` consecutive key (or value) rows of KV head n, starting at global row `first_row`,
// into a dense float32 tile [rows, dim].
void gather_tile(const NsaProblem &p, const void *src, int64_t dim, int64_t first_row, int64_t n,
                 int64_t rows, float *tile) {
  const int64_t row_stride = p.kv_heads * dim;
  for (int64_t r = 0; r < rows; ++r) {
    load_row(p.dtype, src, (first_row + r) * row_stride + n * dim, tile + r * dim, dim);
  }
}

// NaN-propagating running max (matches numpy's max over a row that holds a NaN).
inline float nan_max(float running, float x) { return (x > running || x != x) ? x : running; }

}  // namespace

void nsa_set_num_threads(int num_threads) { g_num_threads = num_threads; }
int nsa_get_num_threads() { return active_threads(); }

NsaError nsa_forward(const NsaProblem &p, const void *query, const void *key, const void *value,
                     const int32_t *topk_indices, float *softmax_max, float *softmax_sum,
                     void *attention_out) {
  NsaError err = nsa_validate(p, topk_indices);
  if (err.status != kOk) return err;

  const int64_t group = p.q_heads / p.kv_heads, beta = p.select_block_size;
  const int64_t count = p.select_block_count, D = p.qk_head_dim, Dv = p.v_head_dim;
  const int64_t span = count * beta;  // L: selected keys per query row
  const int64_t items = p.q_tokens * p.kv_heads;

#pragma omp parallel num_threads(active_threads())
  {
    std::vector<float> q_tile(group * D), k_tile(beta * D), v_tile(beta * Dv);
    std::vector<float> scores(group * span), out_tile(group * Dv), row_max(group), row_sum(group);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t t = item / p.kv_heads, n = item % p.kv_heads;
      const QueryRow row = locate_query_row(p, t);
      const int32_t *idx = topk_indices + item * count;
      const int64_t head0 = t * p.q_heads + n * group;  // first query head of the group, flattened
      // The G query heads of KV head n are contiguous: one [G, D] load.
      load_row(p.dtype, query, head0 * D, q_tile.data(), group * D);

      bool any_visible = false;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t block_start = int64_t{idx[i]} * beta;
        const int64_t visible = visible_rows(p, row.position, block_start);
        float *block_scores = scores.data() + i * beta;
        if (visible > 0) {
          any_visible = true;
          gather_tile(p, key, D, row.kv_begin + block_start, n, visible, k_tile.data());
          gemm_abt(group, visible, D, q_tile.data(), D, k_tile.data(), D, block_scores, span,
                   p.scale_value);
        }
        for (int64_t g = 0; g < group; ++g) {
          std::fill(block_scores + g * span + visible, block_scores + g * span + beta, kNegInf);
        }
      }

      std::fill(out_tile.begin(), out_tile.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      if (any_visible) {
        for (int64_t g = 0; g < group; ++g) {
          float *s = scores.data() + g * span;
          float m = kNegInf;
          for (int64_t j = 0; j < span; ++j) m = nan_max(m, s[j]);
          float l = 0.0f;
          for (int64_t j = 0; j < span; ++j) {
            s[j] = std::exp(s[j] - m);
            l += s[j];
          }
          row_max[g] = m;
          row_sum[g] = l;
        }
        for (int64_t i = 0; i < count; ++i) {
          const int64_t block_start = int64_t{idx[i]} * beta;
          const int64_t visible = visible_rows(p, row.position, block_start);
          if (visible == 0) continue;
          gather_tile(p, value, Dv, row.kv_begin + block_start, n, visible, v_tile.data());
          gemm_ab_acc(group, Dv, visible, scores.data() + i * beta, span, v_tile.data(), Dv,
                      out_tile.data(), Dv);
        }
        for (int64_t g = 0; g < group; ++g) {
          const float inv = 1.0f / row_sum[g];
          for (int64_t e = 0; e < Dv; ++e) out_tile[g * Dv + e] *= inv;
        }
      }
      // A row that sees no key at all: O = 0, max = -inf, sum = 0 (docs/semantics.md).
      store_row(p.dtype, out_tile.data(), attention_out, head0 * Dv, group * Dv);
      for (int64_t g = 0; g < group; ++g) {
        std::fill_n(softmax_max + (head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_max[g]);
        std::fill_n(softmax_sum + (head0 + g) * kSoftmaxStatWidth, kSoftmaxStatWidth, row_sum[g]);
      }
    }
  }
  return {};
}

namespace {

// One (query row, slot) that selected a KV block, as phase 2 of the backward replays it.
struct BlockUse {
  int64_t block_row;   // global row of the block's first key: with the head, names the KV block
  int64_t kv_head;
  int64_t tile_row;    // query row within the tile
  int64_t slot;        // i in [0, C)
  int64_t visible;     // rows of the block this query sees
};

bool same_block(const BlockUse &a, const BlockUse &b) {
  return a.kv_head == b.kv_head && a.block_row == b.block_row;
}

}  // namespace

NsaError nsa_backward(const NsaProblem &p, const void *query, const void *key, const void *value,
                      const void *attention_out, const void *grad, const float *softmax_max,
                      const float *softmax_sum, const int32_t *topk_indices, void *dq, void *dk,
                      void *dv) {
  NsaError err = nsa_validate(p, topk_indices);
  if (err.status != kOk) return err;

  const int64_t group = p.q_heads / p.kv_heads, beta = p.select_block_size;
  const int64_t count = p.select_block_count, D = p.qk_head_dim, Dv = p.v_head_dim;
  const int64_t span = count * beta;
  const int64_t N2 = p.kv_heads;

  // dk/dv accumulate in float32: straight into the outputs for float32, else into a workspace the
  // size of key/value (it grows with T2, never with T1 * C * beta).
  const bool direct = p.dtype == DType::kFloat32;
  std::vector<float> dk_work, dv_work;
  float *dk_acc = static_cast<float *>(dk), *dv_acc = static_cast<float *>(dv);
  if (!direct) {
    dk_work.assign(p.kv_tokens * N2 * D, 0.0f);
    dv_work.assign(p.kv_tokens * N2 * Dv, 0.0f);
    dk_acc = dk_work.data();
    dv_acc = dv_work.data();
  } else {
    std::fill_n(dk_acc, p.kv_tokens * N2 * D, 0.0f);
    std::fill_n(dv_acc, p.kv_tokens * N2 * Dv, 0.0f);
  }

  // Tile height: P and dS of a tile take about 2 x 4 MiB whatever the problem size.
  constexpr int64_t kTileFloats = int64_t{1} << 20;
  const int64_t tile_rows = std::max<int64_t>(1, kTileFloats / (p.q_heads * span));
  std::vector<float> tile_p(tile_rows * p.q_heads * span), tile_ds(tile_rows * p.q_heads * span);
  std::vector<BlockUse> uses;
  std::vector<int64_t> group_starts;
  const int threads = active_threads();

  for (int64_t tile_begin = 0; tile_begin < p.q_tokens; tile_begin += tile_rows) {
    const int64_t rows = std::min(tile_rows, p.q_tokens - tile_begin);

    // Phase 1: P, dS (scale folded in) and the whole of dq for each (query row, KV head).
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> q_tile(group * D), o_tile(group * Dv), do_tile(group * Dv);
      std::vector<float> k_tile(beta * D), v_tile(beta * Dv), dq_tile(group * D), delta(group);
#pragma omp for schedule(dynamic, 4)
      for (int64_t item = 0; item < rows * N2; ++item) {
        const int64_t tile_row = item / N2, n = item % N2, t = tile_begin + tile_row;
        const QueryRow row = locate_query_row(p, t);
        const int32_t *idx = topk_indices + (t * N2 + n) * count;
        const int64_t head0 = t * p.q_heads + n * group;
        float *p_rows = tile_p.data() + (tile_row * p.q_heads + n * group) * span;
        float *ds_rows = tile_ds.data() + (tile_row * p.q_heads + n * group) * span;
        load_row(p.dtype, query, head0 * D, q_tile.data(), group * D);
        load_row(p.dtype, attention_out, head0 * Dv, o_tile.data(), group * Dv);
        load_row(p.dtype, grad, head0 * Dv, do_tile.data(), group * Dv);
        for (int64_t g = 0; g < group; ++g) {
          delta[g] = dot(do_tile.data() + g * Dv, o_tile.data() + g * Dv, Dv);
        }
        std::fill(dq_tile.begin(), dq_tile.end(), 0.0f);

        for (int64_t i = 0; i < count; ++i) {
          const int64_t block_start = int64_t{idx[i]} * beta;
          const int64_t visible = visible_rows(p, row.position, block_start);
          if (visible == 0) continue;
          gather_tile(p, key, D, row.kv_begin + block_start, n, visible, k_tile.data());
          gather_tile(p, value, Dv, row.kv_begin + block_start, n, visible, v_tile.data());
          float *s = p_rows + i * beta, *ds = ds_rows + i * beta;
          gemm_abt(group, visible, D, q_tile.data(), D, k_tile.data(), D, s, span, p.scale_value);
          gemm_abt(group, visible, Dv, do_tile.data(), Dv, v_tile.data(), Dv, ds, span, 1.0f);
          for (int64_t g = 0; g < group; ++g) {
            const int64_t stat = (head0 + g) * kSoftmaxStatWidth;
            const float m = softmax_max[stat], l = softmax_sum[stat];
            for (int64_t r = 0; r < visible; ++r) {
              const float prob = std::exp(s[g * span + r] - m) / l;
              s[g * span + r] = prob;
              ds[g * span + r] = prob * (ds[g * span + r] - delta[g]) * p.scale_value;
            }
          }
          gemm_ab_acc(group, D, visible, ds, span, k_tile.data(), D, dq_tile.data(), D);
        }
        store_row(p.dtype, dq_tile.data(), dq, head0 * D, group * D);
      }
    }

    // The KV blocks this tile touched, each with its uses in (query row, slot) order.
    uses.clear();
    for (int64_t tile_row = 0; tile_row < rows; ++tile_row) {
      const int64_t t = tile_begin + tile_row;
      const QueryRow row = locate_query_row(p, t);
      for (int64_t n = 0; n < N2; ++n) {
        const int32_t *idx = topk_indices + (t * N2 + n) * count;
        for (int64_t i = 0; i < count; ++i) {
          const int64_t block_start = int64_t{idx[i]} * beta;
          const int64_t visible = visible_rows(p, row.position, block_start);
          if (visible > 0) uses.push_back({row.kv_begin + block_start, n, tile_row, i, visible});
        }
      }
    }
    std::stable_sort(uses.begin(), uses.end(), [](const BlockUse &a, const BlockUse &b) {
      return a.kv_head != b.kv_head ? a.kv_head < b.kv_head : a.block_row < b.block_row;
    });
    group_starts.clear();
    for (size_t u = 0; u < uses.size(); ++u) {
      if (u == 0 || !same_block(uses[u], uses[u - 1])) group_starts.push_back(static_cast<int64_t>(u));
    }
    group_starts.push_back(static_cast<int64_t>(uses.size()));
    const int64_t block_count = static_cast<int64_t>(group_starts.size()) - 1;

    // Phase 2: each KV block's owner adds dv += P^T dO and dk += dS^T Q over its uses, in order.
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> q_tile(group * D), do_tile(group * Dv);
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < block_count; ++blk) {
        for (int64_t u = group_starts[blk]; u < group_starts[blk + 1]; ++u) {
          const BlockUse &use = uses[u];
          const int64_t t = tile_begin + use.tile_row, n = use.kv_head;
          const int64_t head0 = t * p.q_heads + n * group;
          const int64_t offset = (use.tile_row * p.q_heads + n * group) * span + use.slot * beta;
          load_row(p.dtype, query, head0 * D, q_tile.data(), group * D);
          load_row(p.dtype, grad, head0 * Dv, do_tile.data(), group * Dv);
          gemm_atb_acc(use.visible, Dv, group, tile_p.data() + offset, span, do_tile.data(), Dv,
                       dv_acc + (use.block_row * N2 + n) * Dv, N2 * Dv);
          gemm_atb_acc(use.visible, D, group, tile_ds.data() + offset, span, q_tile.data(), D,
                       dk_acc + (use.block_row * N2 + n) * D, N2 * D);
        }
      }
    }
  }

  if (!direct) {
    store_row(p.dtype, dk_acc, dk, 0, p.kv_tokens * N2 * D);
    store_row(p.dtype, dv_acc, dv, 0, p.kv_tokens * N2 * Dv);
  }
  return {};
}

}  // namespace ms_nsa
