// The one small matrix product every kernel step is made of, register-blocked for W-lane vectors:
//
//     C[m, n] = alpha * sum_k A(m, k) * B[k, n]        (Overwrite)
//     C[m, n] += sum_k A(m, k) * B[k, n]               (Accumulate)
//
// B and C are row-major with row strides; A is read one element at a time (broadcast to a vector)
// through two strides, so the same kernel serves A, A^T and a view of a transposed tile:
//     A(m, k) = a[m * a_row + k * a_col].
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

struct MatrixA {
  const float *data;
  int64_t row_stride;  // step in m
  int64_t col_stride;  // step in k
  MS_NSA_INLINE float at(int64_t m, int64_t k) const { return data[m * row_stride + k * col_stride]; }
};

// One register tile: C[Rows, Vecs * W] at (c, ldc).
template <int W, int Rows, int Vecs, Update U>
MS_NSA_INLINE void product_tile(int64_t K, MatrixA a, const float *b, int64_t ldb, float *c, int64_t ldc,
                                float alpha) {
  typedef typename Lanes<W>::type V;
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) {
      acc[r][v] = U == Update::kAccumulate ? load<W>(c + r * ldc + v * W) : V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b_row[Vecs];
    for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b + k * ldb + v * W);
    for (int r = 0; r < Rows; ++r) {
      const float a_rk = a.at(r, k);  // scalar * vector: one broadcast, folded into the FMA
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) {
      store<W>(c + r * ldc + v * W, U == Update::kAccumulate ? acc[r][v] : acc[r][v] * alpha);
    }
  }
}

// All M rows of one column strip: full tiles of Rows, then the remaining rows one at a time (the
// kernels choose Rows to divide the usual M: beta or G; only causal diagonal blocks leave a rest).
template <int W, int Rows, int Vecs, Update U>
MS_NSA_INLINE void product_strip(int64_t M, int64_t K, MatrixA a, const float *b, int64_t ldb, float *c,
                                 int64_t ldc, float alpha) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) {
    product_tile<W, Rows, Vecs, U>(K, {a.data + m * a.row_stride, a.row_stride, a.col_stride}, b, ldb,
                                   c + m * ldc, ldc, alpha);
  }
  if constexpr (Rows > 1) {
    for (; m < M; ++m) {
      product_tile<W, 1, Vecs, U>(K, {a.data + m * a.row_stride, a.row_stride, a.col_stride}, b, ldb,
                                  c + m * ldc, ldc, alpha);
    }
  }
}

// C[M, N] for any N: strips of Vecs vectors, then single vectors, then single columns.
template <int W, int Rows, int Vecs, Update U>
MS_NSA_INLINE void product(int64_t M, int64_t N, int64_t K, MatrixA a, const float *b, int64_t ldb, float *c,
                           int64_t ldc, float alpha = 1.0f) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) product_strip<W, Rows, Vecs, U>(M, K, a, b + n, ldb, c + n, ldc, alpha);
  if constexpr (Vecs > 1) {
    for (; n + W <= N; n += W) product_strip<W, Rows, 1, U>(M, K, a, b + n, ldb, c + n, ldc, alpha);
  }
  if constexpr (W > 1) {
    for (; n < N; ++n) product_strip<1, Rows, 1, U>(M, K, a, b + n, ldb, c + n, ldc, alpha);
  }
}

// C[M, N] = sum_{k < row_k(m)} A(m, k) * B[k, n]: a product whose rows have their own inner lengths
// (the block strategy's chunks of uses: a query on a causal diagonal block sees only part of it, and
// its row must not touch the keys it does not see, not even times zero: 0 * Inf is NaN). Each register
// tile runs its rows together up to their shortest length, then each row alone to its own; every C
// element is still summed in increasing k from zero, the same bits as product() with K = row_k(m).
template <int W, int Rows, int Vecs, class RowK>
MS_NSA_INLINE void ragged_tile(int64_t m0, RowK row_k, MatrixA a, const float *b, int64_t ldb, float *c,
                               int64_t ldc) {
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
    for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b + k * ldb + v * W);
    for (int r = 0; r < Rows; ++r) {
      const float a_rk = a.at(r, k);
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
    }
  }
  for (; k < k_longest; ++k) {
    for (int r = 0; r < Rows; ++r) {
      if (k >= k_of[r]) continue;
      const float a_rk = a.at(r, k);
      for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, load<W>(b + k * ldb + v * W));
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) store<W>(c + r * ldc + v * W, acc[r][v]);
  }
}

template <int W, int Rows, int Vecs, class RowK>
MS_NSA_INLINE void ragged_strip(int64_t M, RowK row_k, MatrixA a, const float *b, int64_t ldb, float *c,
                                int64_t ldc) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) {
    ragged_tile<W, Rows, Vecs>(m, row_k, {a.data + m * a.row_stride, a.row_stride, a.col_stride}, b, ldb,
                               c + m * ldc, ldc);
  }
  if constexpr (Rows > 1) {
    for (; m < M; ++m) {
      ragged_tile<W, 1, Vecs>(m, row_k, {a.data + m * a.row_stride, a.row_stride, a.col_stride}, b, ldb,
                              c + m * ldc, ldc);
    }
  }
}

// C[M, N] for any N, cut into strips like product(); row_k(m) is row m's inner length.
template <int W, int Rows, int Vecs, class RowK>
MS_NSA_INLINE void ragged_product(int64_t M, int64_t N, RowK row_k, MatrixA a, const float *b, int64_t ldb,
                                  float *c, int64_t ldc) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) ragged_strip<W, Rows, Vecs>(M, row_k, a, b + n, ldb, c + n, ldc);
  if constexpr (Vecs > 1) {
    for (; n + W <= N; n += W) ragged_strip<W, Rows, 1>(M, row_k, a, b + n, ldb, c + n, ldc);
  }
  if constexpr (W > 1) {
    for (; n < N; ++n) ragged_strip<1, Rows, 1>(M, row_k, a, b + n, ldb, c + n, ldc);
  }
}

// A sum of products over segments, each with its own A and B and its own number of live rows:
//     C[m, n] += sum over segments s with m < s.rows of  sum_k A_s(m, k) * B_s[k, n]
// Each register tile of C is loaded once, takes every segment in order and is stored once, so C
// traffic does not grow with the number of segments (phase 2 of the backward: one KV block's dk/dv
// summed over all the query rows that selected it). Every C element is still summed in segment
// order, then k order: the same bits as one Accumulate product per segment.
struct Segment {
  MatrixA a;
  const float *b;
  int64_t ldb;
  int64_t k;     // inner dimension of this segment
  int64_t rows;  // rows of C this segment reaches (a causal mask may hide the rest)
};

// One register tile: rows [m0, m0 + Rows) of C (c points at row m0), columns [n0, n0 + Vecs * W).
template <int W, int Rows, int Vecs>
MS_NSA_INLINE void segments_tile(int64_t m0, int64_t n0, const Segment *segments, int64_t segment_count, float *c,
                                 int64_t ldc) {
  typedef typename Lanes<W>::type V;
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) acc[r][v] = load<W>(c + r * ldc + v * W);
  }
  for (int64_t s = 0; s < segment_count; ++s) {
    const Segment &seg = segments[s];
    if (seg.rows <= m0) continue;
    const float *a = seg.a.data + m0 * seg.a.row_stride, *b = seg.b + n0;
    if (seg.rows >= m0 + Rows) {
      for (int64_t k = 0; k < seg.k; ++k) {
        V b_row[Vecs];
        for (int v = 0; v < Vecs; ++v) b_row[v] = load<W>(b + k * seg.ldb + v * W);
        for (int r = 0; r < Rows; ++r) {
          const float a_rk = a[r * seg.a.row_stride + k * seg.a.col_stride];
          for (int v = 0; v < Vecs; ++v) acc[r][v] = multiply_add(acc[r][v], a_rk, b_row[v]);
        }
      }
    } else {  // a causal diagonal block: only its first (seg.rows - m0) rows here are reached
      const int64_t live = seg.rows - m0;
      for (int64_t k = 0; k < seg.k; ++k) {
        for (int r = 0; r < Rows && r < live; ++r) {
          const float a_rk = a[r * seg.a.row_stride + k * seg.a.col_stride];
          for (int v = 0; v < Vecs; ++v) {
            acc[r][v] = multiply_add(acc[r][v], a_rk, load<W>(b + k * seg.ldb + v * W));
          }
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) store<W>(c + r * ldc + v * W, acc[r][v]);
  }
}

template <int W, int Rows, int Vecs>
MS_NSA_INLINE void segments_strip(int64_t M, int64_t n0, const Segment *segments, int64_t segment_count, float *c,
                                  int64_t ldc) {
  int64_t m = 0;
  for (; m + Rows <= M; m += Rows) segments_tile<W, Rows, Vecs>(m, n0, segments, segment_count, c + m * ldc + n0, ldc);
  for (; m < M; ++m) segments_tile<W, 1, Vecs>(m, n0, segments, segment_count, c + m * ldc + n0, ldc);
}

// Rows [0, M) by columns [0, N) of C, cut into strips like product().
template <int W, int Rows, int Vecs>
MS_NSA_INLINE void segments_product(int64_t M, int64_t N, const Segment *segments, int64_t segment_count, float *c,
                                    int64_t ldc) {
  int64_t n = 0;
  for (; n + Vecs * W <= N; n += Vecs * W) segments_strip<W, Rows, Vecs>(M, n, segments, segment_count, c, ldc);
  for (; n + W <= N; n += W) segments_strip<W, Rows, 1>(M, n, segments, segment_count, c, ldc);
  for (; n < N; ++n) segments_strip<1, Rows, 1>(M, n, segments, segment_count, c, ldc);
}

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEMM_H_
