// Where a query row sits and what it may see: the selection geometry shared by validation, the
// forward and the backward (one definition of the batch lookup and of the causal mask).
#ifndef MS_NSA_NSA_GEOMETRY_H_
#define MS_NSA_NSA_GEOMETRY_H_

#include <algorithm>
#include <cstdint>

#include "nsa_core.h"
#include "nsa_varlen.h"

namespace ms_nsa {

// Where one query row sits: its batch's first KV row and its batch-local position.
struct QueryRow {
  int64_t batch;
  int64_t kv_begin;   // global row of the batch's first key
  int64_t position;   // s = t - q_begin
};

inline QueryRow locate_query_row(const NsaProblem &p, int64_t t) {
  const Segments queries{p.cu_seqlens_q, p.batch_count}, keys{p.cu_seqlens_kv, p.batch_count};
  const int64_t b = queries.batch_of(t);
  return {b, keys.begin(b), t - queries.begin(b)};
}

// The one place the mask lives, shared by forward and backward: how many leading rows of the block
// in `slot` of a row's selection `blocks` the query at batch-local `position` may see.
inline int64_t visible_rows(const NsaProblem &p, int64_t position, const int32_t *blocks, int64_t slot) {
  const int64_t beta = p.select_block_size, span = beta * p.select_block_count;
  const int64_t diagonal = position - int64_t{blocks[slot]} * beta + 1;
  switch (p.mask) {
    case MaskRule::kNone:
      return beta;
    case MaskRule::kCausal:
    case MaskRule::kCannForward:  // HandleMask: blocks after the own block masked, the own one cut
      return std::clamp<int64_t>(diagonal, 0, beta);
    case MaskRule::kCannBackward: {
      // CalAttenMsk (nsa_vec_op.h): the last slot holding the own block is cut at the diagonal;
      // while position + 1 < beta * C every later slot is masked, earlier slots never are. Without
      // the own block the whole row is masked while position + 1 <= beta * C.
      int64_t own = -1;
      for (int64_t i = 0; i < p.select_block_count; ++i) {
        if (blocks[i] == position / beta) own = i;
      }
      if (own < 0) return position + 1 <= span ? 0 : beta;
      if (slot < own) return beta;
      if (slot == own) return std::clamp<int64_t>(diagonal, 0, beta);
      return position + 1 < span ? 0 : beta;
    }
  }
  return beta;
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEOMETRY_H_
