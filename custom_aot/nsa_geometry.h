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

// The one place the mask lives, shared by forward and backward: how many leading rows of the
// selected block starting at batch-local key position `block_start` a query at `position` may see.
inline int64_t visible_rows(const NsaProblem &p, int64_t position, int64_t block_start) {
  if (!p.causal) return p.select_block_size;
  return std::clamp<int64_t>(position - block_start + 1, 0, p.select_block_size);
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEOMETRY_H_
