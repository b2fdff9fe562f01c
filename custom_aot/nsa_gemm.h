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
      for (int v = 0; v < Vecs; ++v) acc[r][v] += a_rk * b_row[v];
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

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEMM_H_
