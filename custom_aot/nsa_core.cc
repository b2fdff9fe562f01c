// NSA selected attention on the CPU: forward and backward.
//
// Work is organised around one (query row t, KV head n) pair: the G = N1/N2 query heads of that KV
// head share one selection, so every gathered K/V block is read once and used by all G heads (the
// per-item bodies are in nsa_kernels.h). Nothing of size T1 * C * beta * D is ever materialised.
//
// Backward, deterministically: dq of a query row has a single owner, but dk/dv rows are hit by every
// query that selected them. Instead of atomics, query rows are processed in tiles. Phase 1 (parallel
// over the tile's query rows) computes P and dS into a tile buffer and finishes dq. Phase 2 (parallel
// over the distinct KV blocks the tile selected) lets the owner of each KV block add the tile's
// contributions in (query row, slot) order. Each dk/dv element is therefore summed in increasing
// query-row order whatever the thread count, scheduling or tile size.
//
// Small groups: a second strategy (nsa_block_kernels.h) turns the loops around, KV blocks outside and
// the query rows of a tile that selected them inside, so each loaded block feeds real matrix
// products. choose_strategy() below picks one per call; both are deterministic in the same sense.
//
// Instruction sets: the kernels are compiled once per set of nsa_isa.h (AVX-512, AVX2+FMA and the
// baseline on x86-64; NEON and the baseline on aarch64) and the best one the CPU supports is picked at
// load time (MS_NSA_ISA forces one, for testing). Different paths may differ in the last bits (FMA contraction);
// on one machine the results are bitwise reproducible and independent of the thread count.
#include "nsa_core.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "nsa_block_kernels.h"
#include "nsa_dtype.h"
#include "nsa_geometry.h"
#include "nsa_isa.h"
#include "nsa_kernels.h"

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

// ---------------------------------------------------------------------------------------------------
// Run-time dispatch: one set of entry points per (instruction set, score lanes).

using ForwardFn = void (*)(const ForwardArgs &, int64_t t, int64_t n, const Scratch &);
using BackwardFn = void (*)(const BackwardArgs &, int64_t t, int64_t n, float *, float *, const Scratch &);
using AccumulateFn = void (*)(const BackwardArgs &, int64_t, const BlockUse *, int64_t, const float *,
                              const float *, const Scratch &);
using StoreFn = void (*)(DType, const float *, void *, int64_t offset, int64_t count);

struct Kernels {
  ForwardFn forward;
  BackwardFn backward;
  AccumulateFn accumulate;
  StoreFn store;  // float32 -> the problem's dtype (the half-type dk/dv workspace at the end)
  int score_lanes;
};

// The entry points of one instruction set, one instantiation per score width SW (the lanes that hold
// a group's scores; SW <= W). Templates, so that a set whose W caps two widths compiles them once.
#define MS_NSA_ENTRY_POINTS(ISA, NAME, TARGET, W)                                                             \
  template <int SW>                                                                                           \
  TARGET void forward_##NAME(const ForwardArgs &f, int64_t t, int64_t n, const Scratch &s) {                  \
    forward_item<W, SW>(f, t, n, s);                                                                          \
  }                                                                                                           \
  template <int SW>                                                                                           \
  TARGET void backward_##NAME(const BackwardArgs &b, int64_t t, int64_t n, float *probs, float *dscores,       \
                              const Scratch &s) {                                                             \
    backward_item<W, SW>(b, t, n, probs, dscores, s);                                                         \
  }                                                                                                           \
  template <int SW>                                                                                           \
  TARGET void accumulate_##NAME(const BackwardArgs &b, int64_t tile_begin, const BlockUse *uses,               \
                                int64_t use_count, const float *probs, const float *dscores,                  \
                                const Scratch &s) {                                                           \
    accumulate_block<W, SW>(b, tile_begin, uses, use_count, probs, dscores, s);                               \
  }                                                                                                           \
  TARGET void store_##NAME(DType dtype, const float *src, void *dst, int64_t offset, int64_t count) {          \
    store_row_fast<W>(dtype, src, dst, offset, count);                                                        \
  }                                                                                                           \
  template <int SW>                                                                                           \
  constexpr Kernels kernels_##NAME = {forward_##NAME<SW>, backward_##NAME<SW>, accumulate_##NAME<SW>,          \
                                      store_##NAME, SW};                                                      \
  constexpr ScoreWidths kKernels_##NAME = {{&kernels_##NAME<4>, &kernels_##NAME<(W < 8 ? W : 8)>,              \
                                            &kernels_##NAME<(W < 16 ? W : 16)>}};

// A set's kernels for groups of up to 4, 8 and 16 heads (wider groups take the widest).
struct ScoreWidths {
  const Kernels *by_width[3];
};

MS_NSA_FOR_EACH_ISA(MS_NSA_ENTRY_POINTS)

// The narrowest score vector that holds a group (fewer wasted lanes for small G), within the ISA.
const Kernels &kernels_for(int64_t group) {
  const ScoreWidths &widths = MS_NSA_ACTIVE_KERNELS(ScoreWidths);
  return *widths.by_width[group <= 4 ? 0 : group <= 8 ? 1 : 2];
}

// The block-outer strategy's entry points (nsa_block_kernels.h): one set per instruction set, with the
// wide vector width of that set.
struct BlockKernels {
  void (*forward_block)(const ForwardArgs &, const TileView &, const BlockUse *, int64_t, const BlockScratch &);
  void (*forward_finish)(const ForwardArgs &, const TileView &, int64_t item, float *acc);
  void (*backward_block)(const BackwardArgs &, const TileView &, const BlockUse *, int64_t, const BlockScratch &);
  void (*backward_finish)(const BackwardArgs &, const TileView &, int64_t item, float *acc);
  void (*backward_deltas)(const BackwardArgs &, int64_t t, float *rows, float *delta);
  void (*copy_rows)(const NsaProblem &, const TileView &, const void *tensor, int64_t dim, int64_t item, float *rows);
};

#define MS_NSA_BLOCK_ENTRY_POINTS(ISA, NAME, TARGET, W)                                                     \
  TARGET void forward_block_##NAME(const ForwardArgs &f, const TileView &tile, const BlockUse *uses,        \
                                   int64_t use_count, const BlockScratch &s) {                              \
    block_forward<W>(f, tile, uses, use_count, s);                                                          \
  }                                                                                                         \
  TARGET void forward_finish_##NAME(const ForwardArgs &f, const TileView &tile, int64_t item, float *acc) { \
    item_forward_finish<W>(f, tile, item, acc);                                                             \
  }                                                                                                         \
  TARGET void backward_block_##NAME(const BackwardArgs &b, const TileView &tile, const BlockUse *uses,      \
                                    int64_t use_count, const BlockScratch &s) {                             \
    block_backward<W>(b, tile, uses, use_count, s);                                                         \
  }                                                                                                         \
  TARGET void backward_finish_##NAME(const BackwardArgs &b, const TileView &tile, int64_t item, float *acc) { \
    item_backward_finish<W>(b, tile, item, acc);                                                            \
  }                                                                                                         \
  TARGET void backward_deltas_##NAME(const BackwardArgs &b, int64_t t, float *rows, float *delta) {         \
    row_deltas<W>(b, t, rows, delta);                                                                       \
  }                                                                                                         \
  TARGET void copy_rows_##NAME(const NsaProblem &p, const TileView &tile, const void *tensor, int64_t dim,    \
                               int64_t item, float *rows) {                                                 \
    copy_item_rows<W>(p, tile, tensor, dim, item, rows);                                                    \
  }                                                                                                         \
  constexpr BlockKernels kKernels_##NAME = {forward_block_##NAME, forward_finish_##NAME,                    \
                                            backward_block_##NAME, backward_finish_##NAME,                  \
                                            backward_deltas_##NAME, copy_rows_##NAME};

// A namespace of their own, so that their tables' names (kKernels_<isa>) hide the per-item ones.
namespace block_entry {
MS_NSA_FOR_EACH_ISA(MS_NSA_BLOCK_ENTRY_POINTS)
const BlockKernels &active() { return MS_NSA_ACTIVE_KERNELS(BlockKernels); }
}  // namespace block_entry

// Per-thread scratch of the kernels: O(G * (C*beta + D + Dv) + (beta + kUseRows) * (D + Dv)) floats.
class ThreadScratch {
 public:
  ThreadScratch(const NsaProblem &p, int64_t gp) : storage_(scratch_floats(p, gp)), segments_(scratch_segments()) {
    scratch_ = carve_scratch(p, gp, storage_.data(), segments_.data());
  }
  const Scratch &get() const { return scratch_; }

 private:
  std::vector<float> storage_;
  std::vector<StridedSegment> segments_;
  Scratch scratch_;
};

// The KV blocks that query rows [tile_begin, tile_begin + rows) select, each with its uses in
// (query row, slot) order: `uses` sorted by block, `block_starts` the first use of each block plus
// an end marker. A stable counting sort: it runs on one thread between the parallel steps of every tile,
// where std::stable_sort took 3 % of a G = 1 call (the other thread waiting). A block's key, its KV head
// then floor(block_row / beta) + batch, is unique and grows with block_row: batch b's blocks start at
// its first KV row, and the + batch keeps the last block of b (which may share floor(row / beta) with
// the first of b + 1) apart from the next.
void collect_block_uses(const NsaProblem &p, const int32_t *topk_indices, int64_t tile_begin, int64_t rows,
                        int64_t kv_head_begin, int64_t kv_heads, std::vector<BlockUse> *uses,
                        std::vector<int64_t> *block_starts) {
  thread_local std::vector<BlockUse> unsorted;
  thread_local std::vector<int64_t> keys, key_starts;
  const int64_t keys_per_head = p.kv_tokens / p.select_block_size + p.batch_count + 1;
  unsorted.clear();
  keys.clear();
  key_starts.assign(kv_heads * keys_per_head + 1, 0);
  for (int64_t tile_row = 0; tile_row < rows; ++tile_row) {
    for (int64_t n = kv_head_begin; n < kv_head_begin + kv_heads; ++n) {
      const Item it(p, topk_indices, tile_begin + tile_row, n);
      const int64_t head_key = (n - kv_head_begin) * keys_per_head + it.row.batch;
      for (int64_t i = 0; i < p.select_block_count; ++i) {
        const int64_t visible = it.visible(p, i);
        if (visible <= 0) continue;
        const int64_t block_row = it.first_kv_row(p, i);
        unsorted.push_back({block_row, n, tile_row, i, visible});
        keys.push_back(head_key + block_row / p.select_block_size);
        ++key_starts[keys.back() + 1];
      }
    }
  }
  block_starts->clear();
  for (size_t key = 1; key < key_starts.size(); ++key) {
    if (key_starts[key] > 0) block_starts->push_back(key_starts[key - 1]);
    key_starts[key] += key_starts[key - 1];
  }
  block_starts->push_back(static_cast<int64_t>(unsorted.size()));
  uses->resize(unsorted.size());
  for (size_t u = 0; u < unsorted.size(); ++u) (*uses)[key_starts[keys[u]]++] = unsorted[u];
}

// ---------------------------------------------------------------------------------------------------
// Strategy: per (query row, KV head) item (nsa_kernels.h) or per KV block of a tile of query rows
// (nsa_block_kernels.h). Chosen once per call, here and only here.

enum class Strategy : int { kAuto = 0, kItems = 1, kBlocks = 2 };

// -1: not read yet from MS_NSA_STRATEGY (items|blocks); tests and the benchmark set it directly.
std::atomic<int> g_forced_strategy{-1};

Strategy forced_strategy() {
  int forced = g_forced_strategy.load();
  if (forced < 0) {
    const char *env = std::getenv("MS_NSA_STRATEGY");
    forced = env && std::strcmp(env, "items") == 0   ? static_cast<int>(Strategy::kItems)
             : env && std::strcmp(env, "blocks") == 0 ? static_cast<int>(Strategy::kBlocks)
                                                      : static_cast<int>(Strategy::kAuto);
    g_forced_strategy.store(forced);
  }
  return static_cast<Strategy>(forced);
}

// A tile of the block strategy: query rows by KV heads. Its per-(item, slot) buffers take about 16 MiB
// (half of that gave the block uses of local selections 10 % less reuse). A tile with fewer KV heads
// holds more query rows, so each selected block has more uses per load: a tile takes all heads if that
// leaves at least kMinTilePairs (query row, head) pairs per KV head, else as few as it takes to get
// there. At G = 1, N1 = 16, C = 16, D = 192 that is 2 heads of 682 rows instead of 16 heads of 85
// (1.11x at T = 4096 with local selections); it was no faster at G = 4, 8. The shape changes no bits:
// every output element sums its terms in the same order whatever the tiles (tests force tiny ones).
struct TileShape {
  int64_t rows, kv_heads;
};
constexpr int64_t kMinTilePairs = 4 * kChunkPairs;
std::atomic<int64_t> g_forced_tile_rows{0}, g_forced_tile_heads{0};  // 0: chosen here

TileShape tile_shape(const NsaProblem &p) {
  constexpr int64_t kTileFloats = int64_t{1} << 22;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t per_row_and_head = group * p.select_block_count * std::max(p.qk_head_dim, p.v_head_dim + 2);
  const int64_t min_rows = std::max<int64_t>(1, kMinTilePairs / group);
  int64_t heads = std::clamp<int64_t>(kTileFloats / (per_row_and_head * min_rows), 1, p.kv_heads);
  if (g_forced_tile_heads.load() > 0) heads = std::min(g_forced_tile_heads.load(), p.kv_heads);
  int64_t rows = std::clamp<int64_t>(kTileFloats / (per_row_and_head * heads), 1, std::max<int64_t>(1, p.q_tokens));
  if (g_forced_tile_rows.load() > 0) rows = g_forced_tile_rows.load();
  return {rows, heads};
}

// Mean uses per selected KV block in one tile of query rows from the middle of the problem: the
// factor by which the block strategy multiplies the reuse of a loaded block (the per-item strategy
// reuses it G times, the block strategy G times this).
double block_reuse(const NsaProblem &p, const int32_t *topk_indices) {
  const TileShape shape = tile_shape(p);
  const int64_t rows = std::min(shape.rows, p.q_tokens);
  const int64_t begin = std::min(p.q_tokens / 2, p.q_tokens - rows);
  std::vector<BlockUse> uses;
  std::vector<int64_t> block_starts;
  collect_block_uses(p, topk_indices, begin, rows, 0, shape.kv_heads, &uses, &block_starts);
  return uses.empty() ? 0.0 : static_cast<double>(uses.size()) / static_cast<double>(block_starts.size() - 1);
}

// The block strategy pays for gathering rows and for per-(item, slot) partial results; it wins when
// a block's uses in a tile times G clearly exceeds G alone. Measured at T = 4096, D = 192, C = 16 on
// AVX-512 (docs/performance.md, small-group sweep): 3-8x at G = 1, 2 and about 2x at G = 4 with random
// selections (~21 uses per block and tile) and local ones (~75); 1.2-1.4x at G = 8 (random ones lost
// at 8 MiB tiles, ~10 uses, and win at 16 MiB, ~21 uses); at G = 16 the per-item kernels are as fast
// or faster in both passes (so one rule serves forward and backward).

Strategy choose_strategy(const NsaProblem &p, const int32_t *topk_indices) {
  // The block kernels implement ms_nsa's own masks only; CANN's rules (the Ascend twin: a fully masked
  // row averaging, the backward's per-slot mask) exist in the per-item kernels alone.
  if (p.mask == MaskRule::kCannForward || p.mask == MaskRule::kCannBackward) return Strategy::kItems;
  const Strategy forced = forced_strategy();
  if (forced != Strategy::kAuto) return forced;
  constexpr int64_t kLargestBlockGroup = 8;
  const int64_t group = p.q_heads / p.kv_heads;
  if (group > kLargestBlockGroup) return Strategy::kItems;
  const double reuse = block_reuse(p, topk_indices);
  return reuse >= (group <= 4 ? 4.0 : 20.0) ? Strategy::kBlocks : Strategy::kItems;
}

// ---------------------------------------------------------------------------------------------------
// The two forwards.

void forward_by_items(const NsaProblem &p, const ForwardArgs &args) {
  const int64_t group = p.q_heads / p.kv_heads, items = p.q_tokens * p.kv_heads;
  const Kernels &kernels = kernels_for(group);
  const int64_t gp = padded_group(group, kernels.score_lanes);
#pragma omp parallel num_threads(active_threads())
  {
    const ThreadScratch scratch(p, gp);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < items; ++item) {
      kernels.forward(args, item / p.kv_heads, item % p.kv_heads, scratch.get());
    }
  }
}

// Per-thread scratch of the block strategy, plus one item's output rows.
class BlockThreadScratch {
 public:
  explicit BlockThreadScratch(const NsaProblem &p)
      : storage_(block_scratch_floats(p) + p.q_heads / p.kv_heads * std::max(p.qk_head_dim, p.v_head_dim)),
        segments_(block_scratch_segments(p)),
        input_rows_(2 * padded_pairs(p)),
        output_rows_(padded_pairs(p)),
        scratch_(carve_block_scratch(p, storage_.data(), segments_.data(), input_rows_.data(), output_rows_.data())),
        acc_(storage_.data() + block_scratch_floats(p)) {}
  const BlockScratch &get() const { return scratch_; }
  float *acc() const { return acc_; }

 private:
  std::vector<float> storage_;
  std::vector<TableSegment> segments_;
  std::vector<const float *> input_rows_;
  std::vector<float *> output_rows_;
  BlockScratch scratch_;
  float *acc_;
};

// One tile's uses, grouped by KV block (collect_block_uses).
struct TileUses {
  std::vector<BlockUse> uses;
  std::vector<int64_t> block_starts;
  int64_t blocks() const { return static_cast<int64_t>(block_starts.size()) - 1; }
  const BlockUse *of(int64_t blk) const { return uses.data() + block_starts[blk]; }
  int64_t count(int64_t blk) const { return block_starts[blk + 1] - block_starts[blk]; }
};

// The block strategy's per-(item, slot) tile buffers, kept by the calling thread between calls: a fresh
// allocation of this size per call costs its page faults every time (~10 % of a short call).
// (item, slot) pairs of one tile: the rows of its partial buffer, G rows each.
int64_t tile_slots(const NsaProblem &p) {
  const TileShape shape = tile_shape(p);
  return shape.rows * shape.kv_heads * (p.q_heads / p.kv_heads) * p.select_block_count;
}

float *tile_workspace(size_t floats) {
  thread_local std::vector<float> workspace;
  if (workspace.size() < floats) workspace.resize(floats);
  return workspace.data();
}

// The tile's copies of its query (and grad) rows, [kv_heads, rows, G, dim] (TileView).
int64_t tile_pairs(const NsaProblem &p) {
  const TileShape shape = tile_shape(p);
  return shape.rows * shape.kv_heads * (p.q_heads / p.kv_heads);
}

// Runs the row copies (per item of the tile), step A (per KV block of the tile) and step D (per item)
// of the block strategy over all tiles; `tile` is shared, its place updated here. The next tile's uses
// are collected by one thread while the others start the item step (its dynamic schedule evens out
// the threads): collected between the steps, the serial sort had kept the other threads waiting.
template <class CopyStep, class BlockStep, class ItemStep>
void run_block_tiles(const NsaProblem &p, const int32_t *topk, TileView *tile, CopyStep copy_step,
                     BlockStep block_step, ItemStep item_step) {
  const TileShape shape = tile_shape(p);
  // Query rows inside: the tiles after one another share most of their blocks.
  const int64_t row_tiles = (p.q_tokens + shape.rows - 1) / shape.rows;
  const int64_t tiles = (p.kv_heads + shape.kv_heads - 1) / shape.kv_heads * row_tiles;
  const auto place = [&](int64_t index) {
    TileView at = *tile;
    at.kv_head_begin = index / row_tiles * shape.kv_heads;
    at.kv_heads = std::min(shape.kv_heads, p.kv_heads - at.kv_head_begin);
    at.tile_begin = index % row_tiles * shape.rows;
    at.rows = std::min(shape.rows, p.q_tokens - at.tile_begin);
    return at;
  };
  const auto collect = [&](int64_t index, TileUses *uses) {
    const TileView at = place(index);
    collect_block_uses(p, topk, at.tile_begin, at.rows, at.kv_head_begin, at.kv_heads, &uses->uses,
                       &uses->block_starts);
  };
  TileUses tile_uses[2];
  std::vector<int64_t> slot_use(shape.rows * shape.kv_heads * p.select_block_count);
  collect(0, &tile_uses[0]);
#pragma omp parallel num_threads(active_threads())
  {
    const BlockThreadScratch scratch(p);
    for (int64_t index = 0; index < tiles; ++index) {
      const TileUses &current = tile_uses[index % 2];
#pragma omp single
      {
        *tile = place(index);  // (implicit barriers after each step)
        tile->uses = current.uses.data();
        tile->slot_use = slot_use.data();
      }
      const int64_t items = tile->rows * tile->kv_heads, use_count = static_cast<int64_t>(current.uses.size());
#pragma omp for schedule(static) nowait  // the map's loop below ends in the barrier both need
      for (int64_t item = 0; item < items; ++item) copy_step(*tile, item);
#pragma omp for schedule(static)
      for (int64_t u = 0; u < use_count; ++u) slot_use[use_slot(p, *tile, current.uses[u])] = u;
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < current.blocks(); ++blk) {
        block_step(*tile, current.of(blk), current.count(blk), scratch.get());
      }
#pragma omp single nowait
      if (index + 1 < tiles) collect(index + 1, &tile_uses[(index + 1) % 2]);
#pragma omp for schedule(dynamic, 4)
      for (int64_t item = 0; item < items; ++item) item_step(*tile, item, scratch.acc());
    }
  }
}

void forward_by_blocks(const NsaProblem &p, const ForwardArgs &args) {
  const BlockKernels &kernels = block_entry::active();
  const int64_t slots = tile_slots(p);
  float *workspace = tile_workspace(slots * (p.v_head_dim + 2) + tile_pairs(p) * p.qk_head_dim);
  TileView tile{};
  tile.partial = workspace;
  tile.stats = tile.partial + slots * p.v_head_dim;
  tile.query_rows = tile.stats + slots * 2;
  run_block_tiles(
      p, args.topk, &tile,
      [&](const TileView &t, int64_t item) {
        kernels.copy_rows(p, t, args.query, p.qk_head_dim, item, t.query_rows);
      },
      [&](const TileView &t, const BlockUse *uses, int64_t count, const BlockScratch &s) {
        kernels.forward_block(args, t, uses, count, s);
      },
      [&](const TileView &t, int64_t item, float *acc) { kernels.forward_finish(args, t, item, acc); });
}

// ---------------------------------------------------------------------------------------------------
// The two backwards (dk/dv already zeroed, in float32).

void backward_by_items(const NsaProblem &p, const BackwardArgs &args) {
  const int64_t group = p.q_heads / p.kv_heads, N2 = p.kv_heads;
  const int64_t span = p.select_block_count * p.select_block_size;
  const Kernels &kernels = kernels_for(group);
  const int64_t gp = padded_group(group, kernels.score_lanes);

  // Tile height: P^T and dS^T of a tile take about 2 x 4 MiB whatever the problem size.
  constexpr int64_t kTileFloats = int64_t{1} << 20;
  const int64_t item_floats = span * gp;  // one (query row, KV head) of P^T or dS^T
  const int64_t tile_rows = std::max<int64_t>(1, kTileFloats / (N2 * item_floats));
  std::vector<float> tile_p(tile_rows * N2 * item_floats), tile_ds(tile_rows * N2 * item_floats);
  std::vector<BlockUse> uses;
  std::vector<int64_t> block_starts;
  const int threads = active_threads();

  for (int64_t tile_begin = 0; tile_begin < p.q_tokens; tile_begin += tile_rows) {
    const int64_t rows = std::min(tile_rows, p.q_tokens - tile_begin);
    collect_block_uses(p, args.topk, tile_begin, rows, 0, N2, &uses, &block_starts);
    const int64_t block_count = static_cast<int64_t>(block_starts.size()) - 1;

#pragma omp parallel num_threads(threads)
    {
      const ThreadScratch scratch(p, gp);
      // Phase 1: P, dS and the whole of dq for each (query row, KV head).
#pragma omp for schedule(dynamic, 4)
      for (int64_t item = 0; item < rows * N2; ++item) {
        kernels.backward(args, tile_begin + item / N2, item % N2, tile_p.data() + item * item_floats,
                         tile_ds.data() + item * item_floats, scratch.get());
      }
      // (implicit barrier) Phase 2: each KV block's owner adds its uses in order.
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < block_count; ++blk) {
        kernels.accumulate(args, tile_begin, uses.data() + block_starts[blk], block_starts[blk + 1] - block_starts[blk],
                           tile_p.data(), tile_ds.data(), scratch.get());
      }
    }
  }
}

void backward_by_blocks(const NsaProblem &p, const BackwardArgs &args) {
  const BlockKernels &kernels = block_entry::active();
  std::vector<float> deltas(p.q_tokens * p.q_heads);
#pragma omp parallel num_threads(active_threads())
  {
    std::vector<float> rows(p.dtype == DType::kFloat32 ? 0 : 2 * p.q_heads * p.v_head_dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.q_tokens; ++t) kernels.backward_deltas(args, t, rows.data(), deltas.data());
  }
  const int64_t slots = tile_slots(p), pairs = tile_pairs(p);
  TileView tile{};
  tile.partial = tile_workspace(slots * p.qk_head_dim + pairs * (p.qk_head_dim + p.v_head_dim));
  tile.query_rows = tile.partial + slots * p.qk_head_dim;
  tile.grad_rows = tile.query_rows + pairs * p.qk_head_dim;
  tile.row_delta = deltas.data();
  run_block_tiles(
      p, args.topk, &tile,
      [&](const TileView &t, int64_t item) {
        kernels.copy_rows(p, t, args.query, p.qk_head_dim, item, t.query_rows);
        kernels.copy_rows(p, t, args.grad, p.v_head_dim, item, t.grad_rows);
      },
      [&](const TileView &t, const BlockUse *uses, int64_t count, const BlockScratch &s) {
        kernels.backward_block(args, t, uses, count, s);
      },
      [&](const TileView &t, int64_t item, float *acc) { kernels.backward_finish(args, t, item, acc); });
}

}  // namespace

void nsa_set_num_threads(int num_threads) { g_num_threads = num_threads; }
int nsa_get_num_threads() { return active_threads(); }

const char *nsa_kernel_isa() { return active_isa_name(); }

NsaError nsa_forward(const NsaProblem &p, const void *query, const void *key, const void *value,
                     const int32_t *topk_indices, float *softmax_max, float *softmax_sum,
                     void *attention_out) {
  NsaError err = nsa_validate(p, topk_indices);
  if (err.status != kOk) return err;
  const ForwardArgs args{&p, query, key, value, topk_indices, softmax_max, softmax_sum, attention_out};
  if (choose_strategy(p, topk_indices) == Strategy::kBlocks) {
    forward_by_blocks(p, args);
  } else {
    forward_by_items(p, args);
  }
  return {};
}

NsaError nsa_backward(const NsaProblem &p, const void *query, const void *key, const void *value,
                      const void *attention_out, const void *grad, const float *softmax_max,
                      const float *softmax_sum, const int32_t *topk_indices, void *dq, void *dk,
                      void *dv) {
  NsaError err = nsa_validate(p, topk_indices);
  if (err.status != kOk) return err;

  const int64_t group = p.q_heads / p.kv_heads, N2 = p.kv_heads, D = p.qk_head_dim, Dv = p.v_head_dim;
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
  const BackwardArgs args{&p, query, key, value, attention_out, grad, softmax_max, softmax_sum, topk_indices,
                          dq, dk_acc, dv_acc};
  if (choose_strategy(p, topk_indices) == Strategy::kBlocks) {
    backward_by_blocks(p, args);
  } else {
    backward_by_items(p, args);
  }

  if (!direct) {
    const Kernels &kernels = kernels_for(group);
#pragma omp parallel for num_threads(active_threads()) schedule(static)
    for (int64_t row = 0; row < p.kv_tokens; ++row) {
      kernels.store(p.dtype, dk_acc + row * N2 * D, dk, row * N2 * D, N2 * D);
      kernels.store(p.dtype, dv_acc + row * N2 * Dv, dv, row * N2 * Dv, N2 * Dv);
    }
  }
  return {};
}

}  // namespace ms_nsa

// For the benchmark (ctypes): which kernels this machine runs.
extern "C" const char *ms_nsa_kernel_isa() { return ms_nsa::nsa_kernel_isa(); }

// For the tests and the benchmark (ctypes), not part of the API: force a strategy (0 = choose per call,
// 1 = per item, 2 = per KV block); returns the previous setting.
// For tests: the block strategy's tiles forced to `rows` query rows by `kv_heads` KV heads (0: chosen
// per call, as without it).
extern "C" void ms_nsa_force_block_tile(int64_t rows, int64_t kv_heads) {
  ms_nsa::g_forced_tile_rows.store(std::max<int64_t>(0, rows));
  ms_nsa::g_forced_tile_heads.store(std::max<int64_t>(0, kv_heads));
}

extern "C" int ms_nsa_force_strategy(int strategy) {
  const int previous = static_cast<int>(ms_nsa::forced_strategy());
  ms_nsa::g_forced_strategy.store(strategy >= 0 && strategy <= 2 ? strategy : 0);
  return previous;
}
