// nsa_window_attention forward and backward on the CPU: the tiles of nsa_window_kernels.h, spread
// over threads. Every output tile has exactly one owner, and an owner sums its contributions in a
// fixed order, so results are bitwise the same for any thread count or schedule.
#include "window/nsa_window.h"

#include <algorithm>
#include <sstream>
#include <vector>

#include "nsa_isa.h"
#include "nsa_varlen.h"
#include "window/nsa_window_kernels.h"

namespace ms_nsa {
namespace window {
namespace {

// ---------------------------------------------------------------------------------------------------
// Run-time dispatch: one set of entry points per instruction set (nsa_isa.h).

using ForwardFn = void (*)(const ForwardArgs &, const Tile &, int64_t, const Scratch &);
using BackwardFn = void (*)(const BackwardArgs &, const Tile &, int64_t, const Scratch &);
using DeltaFn = void (*)(const BackwardArgs &, int64_t, float *, float *, float *);

struct Kernels {
  ForwardFn forward;
  BackwardFn key_tile_backward;
  BackwardFn query_tile_backward;
  DeltaFn delta;
};

#define MS_NSA_WINDOW_ENTRY_POINTS(ISA, NAME, TARGET, W)                                                      \
  TARGET void forward_##NAME(const ForwardArgs &f, const Tile &q, int64_t n, const Scratch &s) {        \
    forward_tile<W>(f, q, n, s);                                                                 \
  }                                                                                                      \
  TARGET void key_backward_##NAME(const BackwardArgs &b, const Tile &k, int64_t n, const Scratch &s) {  \
    key_tile_backward<W>(b, k, n, s);                                                            \
  }                                                                                                      \
  TARGET void query_backward_##NAME(const BackwardArgs &b, const Tile &q, int64_t n, const Scratch &s) { \
    query_tile_backward<W>(b, q, n, s);                                                          \
  }                                                                                                      \
  TARGET void delta_##NAME(const BackwardArgs &b, int64_t t, float *delta, float *grad_row, float *out_row) { \
    delta_rows<W>(b, t, delta, grad_row, out_row);                                               \
  }                                                                                                      \
  constexpr Kernels kKernels_##NAME = {forward_##NAME, key_backward_##NAME, query_backward_##NAME, delta_##NAME};

MS_NSA_FOR_EACH_ISA(MS_NSA_WINDOW_ENTRY_POINTS)

const Kernels &kernels() { return MS_NSA_ACTIVE_KERNELS(Kernels); }

class ThreadScratch {
 public:
  ThreadScratch(const WindowProblem &p, const Tiling &tl)
      : storage_(scratch_floats(p, tl)), scratch_(carve_scratch(p, tl, storage_.data())) {}
  const Scratch &get() const { return scratch_; }

 private:
  std::vector<float> storage_;
  Scratch scratch_;
};

// Every tile of every sequence, in token order: query tiles (Br rows) or key tiles (Bc rows).
std::vector<Tile> all_tiles(const WindowProblem &p, int64_t rows_per_tile) {
  const Segments segments{p.cu_seqlens, p.batch_count};
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < p.batch_count; ++b) {
    for (int64_t begin = segments.begin(b); begin < segments.end(b); begin += rows_per_tile) {
      tiles.push_back({segments.begin(b), segments.end(b), begin, std::min(rows_per_tile, segments.end(b) - begin)});
    }
  }
  return tiles;
}

// Runs body(tile, kv head, scratch) for every (tile, KV head) pair, one owner each.
template <typename Body>
void for_each_tile(const WindowProblem &p, const Tiling &tl, const std::vector<Tile> &tiles, Body body) {
  const int64_t items = static_cast<int64_t>(tiles.size()) * p.kv_heads;
#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    const ThreadScratch scratch(p, tl);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      body(tiles[item / p.kv_heads], item % p.kv_heads, scratch.get());
    }
  }
}

}  // namespace
}  // namespace window

NsaError window_validate(const WindowProblem &p) {
  std::ostringstream msg;
  if (p.tokens < 0) {
    msg << "the token count T must be non-negative, got " << p.tokens;
  } else if (p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0) {
    msg << "head counts must be positive with N1 a multiple of N2, got N1=" << p.q_heads << ", N2=" << p.kv_heads;
  } else if (p.qk_head_dim < 1 || p.v_head_dim < 1) {
    msg << "head dims must be positive, got D=" << p.qk_head_dim << ", Dv=" << p.v_head_dim;
  } else if (p.window_size < 1) {
    msg << "window_size must be at least 1 (the query itself), got " << p.window_size;
  } else if (p.batch_count < 1 || p.cu_seqlens == nullptr) {
    msg << "actual_seq_len must hold at least one entry, got " << p.batch_count;
  } else if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return {kUnsupportedDType, "query dtype must be float32, float16 or bfloat16"};
  }
  if (!msg.str().empty()) return {kBadProblem, msg.str()};
  return check_cumulative("actual_seq_len", p.cu_seqlens, p.batch_count, p.tokens, "T");
}

NsaError window_forward(const WindowProblem &p, const void *query, const void *key, const void *value,
                        float *softmax_max, float *softmax_sum, void *attention_out) {
  NsaError err = window_validate(p);
  if (err.status != kOk) return err;
  const window::Tiling tl = window::Tiling::choose(p);
  const window::Kernels &k = window::kernels();
  const window::ForwardArgs args{&p, tl, query, key, value, softmax_max, softmax_sum, attention_out};
  window::for_each_tile(p, tl, window::all_tiles(p, tl.query_rows),
                [&](const window::Tile &q, int64_t n, const window::Scratch &s) { k.forward(args, q, n, s); });
  return {};
}

NsaError window_backward(const WindowProblem &p, const void *query, const void *key, const void *value,
                         const void *attention_out, const void *grad, const float *softmax_max,
                         const float *softmax_sum, void *dq, void *dk, void *dv) {
  NsaError err = window_validate(p);
  if (err.status != kOk) return err;
  const window::Tiling tl = window::Tiling::choose(p);
  const window::Kernels &k = window::kernels();
  std::vector<float> delta(p.tokens * p.q_heads);
  const window::BackwardArgs args{&p, tl, query, key, value, attention_out, grad, softmax_max, softmax_sum,
                          delta.data(), dq, dk, dv};
#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    std::vector<float> rows(2 * p.v_head_dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) k.delta(args, t, delta.data(), rows.data(), rows.data() + p.v_head_dim);
  }
  window::for_each_tile(p, tl, window::all_tiles(p, tl.key_rows),
                [&](const window::Tile &kt, int64_t n, const window::Scratch &s) { k.key_tile_backward(args, kt, n, s); });
  window::for_each_tile(p, tl, window::all_tiles(p, tl.query_rows),
                [&](const window::Tile &q, int64_t n, const window::Scratch &s) { k.query_tile_backward(args, q, n, s); });
  return {};
}

}  // namespace ms_nsa
