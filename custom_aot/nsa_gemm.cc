// Portable versions of the small matrix products; `omp simd` lets the compiler vectorise the
// reductions with a fixed lane order (no -ffast-math, so NaN/Inf behave as IEEE says).
#include "nsa_gemm.h"

namespace ms_nsa {

float dot(const float *a, const float *b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

void gemm_abt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
              float *C, int64_t ldc, float alpha) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = alpha * dot(A + m * lda, B + n * ldb, K);
  }
}

void gemm_ab_acc(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                 int64_t ldb, float *C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    float *c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * lda + k];
      const float *b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

void gemm_atb_acc(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float *C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    float *c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[k * lda + m];
      const float *b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

}  // namespace ms_nsa
