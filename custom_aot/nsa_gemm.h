// The one small matrix product every kernel step is made of, register-blocked for W-lane vectors:
//
//     C[m, n] = alpha * sum_k A(m, k) * B[k, n]        (Overwrite)
//     C[m, n] += sum_k A(m, k) * B[k, n]               (Accumulate)
//
// B and C are read and written a row of vectors at a time, rows either at a stride or through a table
// of row pointers; A is read one element at a time (broadcast to a vector), through two strides (so
// the same kernel serves A, A^T and a view of a transposed tile) or through a row table.
// The register tile holds `Rows` rows of C by `Vecs` vectors of W columns; B rows are loaded as
// vectors, A elements are broadcast. Every C element is summed in increasing k, one FMA at a time,
// starting from C itself (Accumulate) or zero: the value does not depend on how M and N are cut
// into tiles, so the result is bitwise the same whatever the thread count or tile shape.
#ifndef MS_NSA_NSA_GEMM_H_
#define MS_NSA_NSA_GEMM_H_

#include <cstdint>

#include "nsa_simd.h"

namespace ms_nsa {

enum class Update { kOverwrite, kAccumulate };

// The A operand: A(m, k) = data[m * row_stride + k * col_stride] ...
struct MatrixA {
  const float *data;
  int64_t row_stride;  // step in m
  int64_t col_stride;  // step in k
  MS_NSA_INLINE float at(int64_t m, int64_t k) const { return data[m * row_stride + k * col_stride]; }
  MS_NSA_INLINE MatrixA rows_from(int64_t m) const { return {data + m * row_stride, row_stride, col_stride}; }
  MS_NSA_INLINE MatrixA cols_from(int64_t k) const { return {data + k * col_stride, row_stride, col_stride}; }
};

// ... or A(m, k) = rows[m][k]: rows found through a table of pointers (the block kernels' query and
// grad rows, in the tile's compact copies).
struct RowTableA {
  const float *const *rows;
  int64_t col = 0;
  MS_NSA_INLINE float at(int64_t m, int64_t k) const { return rows[m][col + k]; }
  MS_NSA_INLINE RowTableA rows_from(int64_t m) const { return {rows + m, col}; }
  MS_NSA_INLINE RowTableA cols_from(int64_t k) const { return {rows, col + k}; }
};

// B and C, read (and written) a row of vectors at a time: row r starts at data + r * ld ...
template <class T>
struct Strided {
  T *data;
  int64_t ld;
  MS_NSA_INLINE T *row(int64_t r) const { return data + r * ld; }
  MS_NSA_INLINE Strided rows_from(int64_t r) const { return {data + r * ld, ld}; }
  MS_NSA_INLINE Strided cols_from(int64_t n) const { return {data + n, ld}; }
};

// ... or at rows[r] + col: rows through a table (B: the block backward's query and grad rows in the
// tile's copies, one use's G rows after another; C: the block kernels' per-(item, slot) partial rows, written in
// place instead of scattered afterwards).
template <class T>
struct RowTable {
  T *const *rows;
  int64_t col;
  MS_NSA_INLINE T *row(int64_t r) const { return rows[r] + col; }
  MS_NSA_INLINE RowTable rows_from(int64_t r) const { return {rows + r, col}; }
  MS_NSA_INLINE RowTable cols_from(int64_t n) const { return {rows, col + n}; }
};

// One register tile: C[Rows, Vecs * W], started from C (kLoad) or zero, stored times alpha (kScale) or not.
template <int W, int Rows, int Vecs, bool kLoad, bool kScale, class A, class B, class C>
MS_NSA_INLINE void product_tile(int64_t K, A a, B b, C c, float alpha) {
  typedef typename Lanes<W>::type V;
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) acc[r][v] = kLoad ? load<W>(c.row(r) + v * W) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V b_row[Vecs];
    const float *b_k = b.row(k);
    for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b_k + v * W);
    for (int r = 0; r < Rows; ++r) {
      const float a_rk = a.at(r, k);  // scalar * vector: one broadcast, folded into the FMA
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) store<W>(c.row(r) + v * W, kScale ? acc[r][v] * alpha : acc[r][v]);
  }
}

// All M rows of one column strip over k in [0, K): full tiles of Rows, then the remaining rows one at
// a time (the kernels choose Rows to divide the usual M; only causal diagonal blocks leave a rest).
template <int W, int Rows, int Vecs, bool kLoad, bool kScale, class A, class B, class C>
MS_NSA_INLINE void product_strip(int64_t M, int64_t K, A a, B b, C c, float alpha) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) {
    product_tile<W, Rows, Vecs, kLoad, kScale>(K, a.rows_from(m), b, c.rows_from(m), alpha);
  }
  if constexpr (Rows > 1) {
    for (; m < M; ++m) product_tile<W, 1, Vecs, kLoad, kScale>(K, a.rows_from(m), b, c.rows_from(m), alpha);
  }
}

// B panels a column strip keeps in L1 while all its row tiles take them: at most this many floats
// (16 KiB, a third of a 48 KiB L1). Every row tile of a strip reads all of the strip's B, so a deeper
// B (K = D = 192 at 64 columns: 48 KiB) came from L2 on every tile, at L2's bandwidth, not the FMAs'.
constexpr int64_t kPanelFloats = 4096;

// One column strip, k cut into panels of equal depth: the first panel starts the tiles (from C or
// zero), the others continue from what the previous one stored, alpha goes into the last store.
// Each C element still sees the same FMAs in the same k order: the same bits as one pass over K.
template <int W, int Rows, int Vecs, Update U, class A, class B, class C>
MS_NSA_INLINE void product_panels(int64_t M, int64_t K, A a, B b, C c, float alpha) {
  constexpr bool kAccumulate = U == Update::kAccumulate;
  const int64_t panels = (K * Vecs * W + kPanelFloats - 1) / kPanelFloats;
  if (panels <= 1) {
    product_strip<W, Rows, Vecs, kAccumulate, !kAccumulate>(M, K, a, b, c, alpha);
    return;
  }
  const int64_t depth = (K + panels - 1) / panels;
  for (int64_t k0 = 0; k0 < K; k0 += depth) {
    const int64_t k_end = k0 + depth < K ? k0 + depth : K;
    const A a_k = a.cols_from(k0);
    const B b_k = b.rows_from(k0);
    if (k0 == 0) {
      product_strip<W, Rows, Vecs, kAccumulate, false>(M, k_end - k0, a_k, b_k, c, alpha);
    } else if (k_end < K || kAccumulate) {
      product_strip<W, Rows, Vecs, true, false>(M, k_end - k0, a_k, b_k, c, alpha);
    } else {
      product_strip<W, Rows, Vecs, true, true>(M, k_end - k0, a_k, b_k, c, alpha);
    }
  }
}

// C[M, N] for any N: strips of Vecs vectors, then single vectors, then single columns.
template <int W, int Rows, int Vecs, Update U, class A, class B, class C>
MS_NSA_INLINE void product(int64_t M, int64_t N, int64_t K, A a, B b, C c, float alpha = 1.0f) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) {
    product_panels<W, Rows, Vecs, U>(M, K, a, b.cols_from(n), c.cols_from(n), alpha);
  }
  if constexpr (Vecs > 1) {
    for (; n + W <= N; n += W) product_panels<W, Rows, 1, U>(M, K, a, b.cols_from(n), c.cols_from(n), alpha);
  }
  if constexpr (W > 1) {
    for (; n < N; ++n) product_panels<1, Rows, 1, U>(M, K, a, b.cols_from(n), c.cols_from(n), alpha);
  }
}

// The same with B and C row-major at (b, ldb) and (c, ldc).
template <int W, int Rows, int Vecs, Update U, class A = MatrixA>
MS_NSA_INLINE void product(int64_t M, int64_t N, int64_t K, A a, const float *b, int64_t ldb, float *c,
                           int64_t ldc, float alpha = 1.0f) {
  product<W, Rows, Vecs, U>(M, N, K, a, Strided<const float>{b, ldb}, Strided<float>{c, ldc}, alpha);
}

// C[M, N] = sum_{k < row_k(m)} A(m, k) * B[k, n]: a product whose rows have their own inner lengths
// (the block strategy's chunks of uses: a query on a causal diagonal block sees only part of it, and
// its row must not touch the keys it does not see, not even times zero: 0 * Inf is NaN). Each register
// tile runs its rows together up to their shortest length, then each row alone to its own; every C
// element is still summed in increasing k from zero, the same bits as product() with K = row_k(m).
template <int W, int Rows, int Vecs, class RowK, class A, class B, class C>
MS_NSA_INLINE void ragged_tile(int64_t m0, RowK row_k, A a, B b, C c) {
  typedef typename Lanes<W>::type V;
  int64_t k_of[Rows], k_common = INT64_MAX, k_longest = 0;
  for (int r = 0; r < Rows; ++r) {
    k_of[r] = row_k(m0 + r);
    k_common = k_of[r] < k_common ? k_of[r] : k_common;
    k_longest = k_of[r] > k_longest ? k_of[r] : k_longest;
  }
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) acc[r][v] = V{};
  }
  int64_t k = 0;
  for (; k < k_common; ++k) {
    V b_row[Vecs];
    const float *b_k = b.row(k);
    for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b_k + v * W);
    for (int r = 0; r < Rows; ++r) {
      const float a_rk = a.at(r, k);
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
    }
  }
  for (; k < k_longest; ++k) {
    const float *b_k = b.row(k);
    for (int r = 0; r < Rows; ++r) {
      if (k >= k_of[r]) continue;
      const float a_rk = a.at(r, k);
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, load<W>(b_k + v * W));
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) store<W>(c.row(r) + v * W, acc[r][v]);
  }
}

template <int W, int Rows, int Vecs, class RowK, class A, class B, class C>
MS_NSA_INLINE void ragged_strip(int64_t M, RowK row_k, A a, B b, C c) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) ragged_tile<W, Rows, Vecs>(m, row_k, a.rows_from(m), b, c.rows_from(m));
  if constexpr (Rows > 1) {
    for (; m < M; ++m) ragged_tile<W, 1, Vecs>(m, row_k, a.rows_from(m), b, c.rows_from(m));
  }
}

// C[M, N] for any N, cut into strips like product(); row_k(m) is row m's inner length.
template <int W, int Rows, int Vecs, class RowK, class A, class B, class C>
MS_NSA_INLINE void ragged_product(int64_t M, int64_t N, RowK row_k, A a, B b, C c) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) ragged_strip<W, Rows, Vecs>(M, row_k, a, b.cols_from(n), c.cols_from(n));
  if constexpr (Vecs > 1) {
    for (; n + W <= N; n += W) ragged_strip<W, Rows, 1>(M, row_k, a, b.cols_from(n), c.cols_from(n));
  }
  if constexpr (W > 1) {
    for (; n < N; ++n) ragged_strip<1, Rows, 1>(M, row_k, a, b.cols_from(n), c.cols_from(n));
  }
}

// A sum of products over segments, each with its own A and B and its own number of live rows:
//     C[m, n] += sum over segments s with m < s.rows of  sum_k A_s(m, k) * B_s[k, n]
// Each register tile of C is loaded once, takes every segment in order and is stored once, so C
// traffic does not grow with the number of segments (phase 2 of the backward: one KV block's dk/dv
// summed over all the query rows that selected it). Every C element is still summed in segment
// order, then k order: the same bits as one Accumulate product per segment. B is Strided<const float>
// or RowTable<const float>.
template <class B>
struct Segment {
  MatrixA a;
  B b;
  int64_t k;     // inner dimension of this segment
  int64_t rows;  // rows of C this segment reaches (a causal mask may hide the rest)
};
using StridedSegment = Segment<Strided<const float>>;
using TableSegment = Segment<RowTable<const float>>;

// One register tile: rows [m0, m0 + Rows) of C (c points at row m0), columns [n0, n0 + Vecs * W).
template <int W, int Rows, int Vecs, class B>
MS_NSA_INLINE void segments_tile(int64_t m0, int64_t n0, const Segment<B> *segments, int64_t segment_count, float *c,
                                 int64_t ldc) {
  typedef typename Lanes<W>::type V;
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) acc[r][v] = load<W>(c + r * ldc + v * W);
  }
  for (int64_t s = 0; s < segment_count; ++s) {
    const Segment<B> &seg = segments[s];
    if (seg.rows <= m0) continue;
    const MatrixA a = seg.a.rows_from(m0);
    const B b = seg.b.cols_from(n0);
    if (seg.rows >= m0 + Rows) {
      for (int64_t k = 0; k < seg.k; ++k) {
        V b_row[Vecs];
        const float *b_k = b.row(k);
        for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b_k + v * W);
        for (int r = 0; r < Rows; ++r) {
          const float a_rk = a.at(r, k);
          for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
        }
      }
    } else {  // a causal diagonal block: only its first (seg.rows - m0) rows here are reached
      const int64_t live = seg.rows - m0;
      for (int64_t k = 0; k < seg.k; ++k) {
        const float *b_k = b.row(k);
        for (int r = 0; r < Rows && r < live; ++r) {
          const float a_rk = a.at(r, k);
          for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, load<W>(b_k + v * W));
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) store<W>(c + r * ldc + v * W, acc[r][v]);
  }
}

template <int W, int Rows, int Vecs, class B>
MS_NSA_INLINE void segments_strip(int64_t M, int64_t n0, const Segment<B> *segments, int64_t segment_count, float *c,
                                  int64_t ldc) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) segments_tile<W, Rows, Vecs>(m, n0, segments, segment_count, c + m * ldc + n0, ldc);
  for (; m < M; ++m) segments_tile<W, 1, Vecs>(m, n0, segments, segment_count, c + m * ldc + n0, ldc);
}

// One column strip in k panels (see kPanelFloats): consecutive segments, cut where a panel ends, so
// that the strip's B rows and A columns of a panel stay in L1 while all its row tiles take them (a
// chunk's 128 pairs of dS^T and Q rows had filled L1 twice over). Each C element still sees its
// segments in order and each segment in k order, from what the previous panel stored: the same bits.
template <int W, int Rows, int Vecs, class B>
MS_NSA_INLINE void segments_panels(int64_t M, int64_t n0, const Segment<B> *segments, int64_t segment_count,
                                   float *c, int64_t ldc) {
  constexpr int64_t kDepth = kPanelFloats / (Vecs * W);
  constexpr int kMaxPieces = 64;
  int64_t total = 0;
  for (int64_t s = 0; s < segment_count; ++s) total += segments[s].k;
  if (total <= kDepth) {
    segments_strip<W, Rows, Vecs>(M, n0, segments, segment_count, c, ldc);
    return;
  }
  Segment<B> pieces[kMaxPieces];
  int64_t next = 0, next_k = 0;  // the next piece starts at segment `next`, at its k = next_k
  while (next < segment_count) {
    int piece_count = 0;
    int64_t depth = 0;
    while (next < segment_count && piece_count < kMaxPieces && depth < kDepth) {
      const Segment<B> &seg = segments[next];
      const int64_t take = seg.k - next_k < kDepth - depth ? seg.k - next_k : kDepth - depth;
      pieces[piece_count++] = {seg.a.cols_from(next_k), seg.b.rows_from(next_k), take, seg.rows};
      depth += take;
      next_k += take;
      if (next_k == seg.k) {
        ++next;
        next_k = 0;
      }
    }
    segments_strip<W, Rows, Vecs>(M, n0, pieces, piece_count, c, ldc);
  }
}

// Rows [0, M) by columns [0, N) of C, cut into strips like product().
template <int W, int Rows, int Vecs, class B>
MS_NSA_INLINE void segments_product(int64_t M, int64_t N, const Segment<B> *segments, int64_t segment_count, float *c,
                                    int64_t ldc) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) segments_panels<W, Rows, Vecs>(M, n, segments, segment_count, c, ldc);
  for (; n + W <= N; n += W) segments_panels<W, Rows, 1>(M, n, segments, segment_count, c, ldc);
  for (; n < N; ++n) segments_panels<1, Rows, 1>(M, n, segments, segment_count, c, ldc);
}

// The products the kernels call, as functions of their own: outlined_product<PW, ...>(IsaOfWidth<W>{}, ...)
// is product<PW, ...> in a noinline function with the target attribute of the instruction set whose
// kernels have W-lane wide vectors (one set per W on an architecture: 16 AVX-512, 8 AVX2 or NEON, 4
// the baseline), so an AVX-512 kernel's 4-lane score product still runs AVX-512 code. Inlined into a
// kernel's large body, a product's k loop got only the registers the rest of the body left: GCC kept
// row offsets and the loop bound on the stack and reloaded them at every k step (four extra loads per
// eight FMAs in the per-item score products). On its own a product has all of them (per-item forward
// 1.06x at G = 16, docs/performance.md v12). The same operations in the same order: the same bits.
template <int W>
struct IsaOfWidth {};

#define MS_NSA_OUTLINED_PRODUCTS(ISA, NAME, TARGET, W)                                                      \
  template <int PW, int Rows, int Vecs, Update U, class A, class B, class C>                               \
  TARGET __attribute__((noinline)) void outlined_product(IsaOfWidth<W>, int64_t M, int64_t N, int64_t K, A a, \
                                                         B b, C c, float alpha = 1.0f) {                    \
    product<PW, Rows, Vecs, U>(M, N, K, a, b, c, alpha);                                                    \
  }                                                                                                         \
  template <int PW, int Rows, int Vecs, class RowK, class A, class B, class C>                             \
  TARGET __attribute__((noinline)) void outlined_ragged_product(IsaOfWidth<W>, int64_t M, int64_t N,        \
                                                                RowK row_k, A a, B b, C c) {               \
    ragged_product<PW, Rows, Vecs>(M, N, row_k, a, b, c);                                                   \
  }                                                                                                         \
  template <int PW, int Rows, int Vecs, class B>                                                           \
  TARGET __attribute__((noinline)) void outlined_segments_product(IsaOfWidth<W>, int64_t M, int64_t N,      \
                                                                  const Segment<B> *segments,               \
                                                                  int64_t segment_count, float *c,          \
                                                                  int64_t ldc) {                            \
    segments_product<PW, Rows, Vecs>(M, N, segments, segment_count, c, ldc);                                \
  }
MS_NSA_FOR_EACH_ISA(MS_NSA_OUTLINED_PRODUCTS)
#undef MS_NSA_OUTLINED_PRODUCTS

// The same with B and C row-major at (b, ldb) and (c, ldc).
template <int PW, int Rows, int Vecs, Update U, int W, class A = MatrixA>
MS_NSA_INLINE void outlined_product(IsaOfWidth<W> isa, int64_t M, int64_t N, int64_t K, A a, const float *b,
                                    int64_t ldb, float *c, int64_t ldc, float alpha = 1.0f) {
  outlined_product<PW, Rows, Vecs, U>(isa, M, N, K, a, Strided<const float>{b, ldb}, Strided<float>{c, ldc}, alpha);
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEMM_H_
