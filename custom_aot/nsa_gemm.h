// The three small matrix products the kernels are made of, on dense float32 tiles.
// Every output element is summed in a fixed order, so results are reproducible bit for bit.
#ifndef MS_NSA_NSA_GEMM_H_
#define MS_NSA_NSA_GEMM_H_

#include <cstdint>

namespace ms_nsa {

// sum_k a[k] * b[k]
float dot(const float *a, const float *b, int64_t n);

// C[m, n] = alpha * sum_k A[m, k] * B[n, k]       (scores S = scale * Q K^T, dP = dO V^T)
void gemm_abt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
              float *C, int64_t ldc, float alpha);

// C[m, n] += sum_k A[m, k] * B[k, n]              (O += P V, dQ += dS K)
void gemm_ab_acc(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                 int64_t ldb, float *C, int64_t ldc);

// C[m, n] += sum_k A[k, m] * B[k, n]              (dV += P^T dO, dK += dS^T Q)
void gemm_atb_acc(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float *C, int64_t ldc);

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_GEMM_H_
