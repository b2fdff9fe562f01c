// nsa_compress forward and backward on the CPU. Memory-bound (each output row is a weighted sum of l
// input rows), so the loops are plain and vectorised by the compiler; float16/bfloat16 rows are
// widened to float32 on load. No atomics: every output element has one owner.
#include "compress/nsa_compress.h"

#include <algorithm>
#include <sstream>
#include <vector>

#include "nsa_core.h"
#include "nsa_dtype.h"
#include "nsa_varlen.h"

namespace ms_nsa {
namespace {

int64_t windows_in(int64_t length, int64_t block, int64_t stride) {
  return length < block ? 0 : 1 + (length - block) / stride;
}

// Global input row of each output row's first token, segments in order.
std::vector<int64_t> window_starts(const CompressProblem &p) {
  std::vector<int64_t> starts;
  starts.reserve(p.windows);
  const Segments segments{p.cu_seqlens, p.batch_count};
  for (int64_t b = 0; b < p.batch_count; ++b) {
    const int64_t count = windows_in(segments.length(b), p.block, p.stride);
    for (int64_t i = 0; i < count; ++i) starts.push_back(segments.begin(b) + i * p.stride);
  }
  return starts;
}

}  // namespace

int64_t compress_window_count(const CompressProblem &p) {
  if (p.block < 1 || p.stride < 1 || p.cu_seqlens == nullptr) return -1;
  const Segments segments{p.cu_seqlens, p.batch_count};
  int64_t total = 0;
  for (int64_t b = 0; b < p.batch_count; ++b) {
    if (segments.length(b) < 0) return -1;
    total += windows_in(segments.length(b), p.block, p.stride);
  }
  return total;
}

NsaError compress_validate(const CompressProblem &p) {
  std::ostringstream msg;
  if (p.tokens < 0 || p.heads < 1 || p.head_dim < 1) {
    msg << "input must be [T, N, D] with N, D >= 1, got T=" << p.tokens << ", N=" << p.heads << ", D=" << p.head_dim;
    return {kBadProblem, msg.str()};
  }
  if (p.block < 1 || p.stride < 1 || p.stride > p.block) {
    msg << "compress_stride = " << p.stride << " must be in [1, compress_block_size = " << p.block << "]";
    return {kBadProblem, msg.str()};
  }
  if (p.batch_count < 1 || p.cu_seqlens == nullptr) {
    return {kBadProblem, "actual_seq_len must hold at least one entry"};
  }
  NsaError err = check_cumulative("actual_seq_len", p.cu_seqlens, p.batch_count, p.tokens, "T");
  if (err.status != kOk) return err;
  const int64_t expected = compress_window_count(p);
  if (expected != p.windows) {
    msg << "the output has " << p.windows << " rows but actual_seq_len gives " << expected
        << " windows of compress_block_size = " << p.block << " every compress_stride = " << p.stride;
    return {kBadProblem, msg.str()};
  }
  return {};
}

NsaError compress_forward(const CompressProblem &p, const void *input, const void *weight, void *output) {
  NsaError err = compress_validate(p);
  if (err.status != kOk) return err;
  const int64_t N = p.heads, D = p.head_dim, l = p.block;
  const std::vector<int64_t> starts = window_starts(p);
  std::vector<float> w(l * N);
  load_row(p.dtype, weight, 0, w.data(), l * N);

#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    std::vector<float> row(D), acc(D);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.windows * N; ++item) {
      const int64_t o = item / N, n = item % N;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < l; ++j) {
        load_row(p.dtype, input, ((starts[o] + j) * N + n) * D, row.data(), D);
        const float wj = w[j * N + n];
        for (int64_t d = 0; d < D; ++d) acc[d] += wj * row[d];
      }
      store_row(p.dtype, acc.data(), output, (o * N + n) * D, D);
    }
  }
  return {};
}

NsaError compress_backward(const CompressProblem &p, const void *output_grad, const void *input,
                           const void *weight, void *input_grad, void *weight_grad) {
  NsaError err = compress_validate(p);
  if (err.status != kOk) return err;
  const int64_t N = p.heads, D = p.head_dim, l = p.block, d_stride = p.stride;
  const std::vector<int64_t> starts = window_starts(p);
  std::vector<float> w(l * N);
  load_row(p.dtype, weight, 0, w.data(), l * N);
  // First output row of each segment, to find the windows that cover an input row.
  const Segments segments{p.cu_seqlens, p.batch_count};
  std::vector<int64_t> first_window(p.batch_count + 1, 0);
  for (int64_t b = 0; b < p.batch_count; ++b) {
    first_window[b + 1] = first_window[b] + windows_in(segments.length(b), l, d_stride);
  }
  std::vector<double> weight_acc(l * N, 0.0);

#pragma omp parallel num_threads(nsa_get_num_threads())
  {
    std::vector<float> row(D), acc(D), grad_row(D);
    // d input[r] = sum over the windows i covering r (increasing i) of weight[r - start(i)] * d out[i].
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.tokens * N; ++item) {
      const int64_t r = item / N, n = item % N;
      const int64_t b = segments.batch_of(r), local = r - segments.begin(b);
      const int64_t count = first_window[b + 1] - first_window[b];
      const int64_t first = local < l ? 0 : (local - l) / d_stride + 1;
      const int64_t last = std::min(count - 1, local / d_stride);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = first; i <= last; ++i) {
        load_row(p.dtype, output_grad, ((first_window[b] + i) * N + n) * D, grad_row.data(), D);
        const float wj = w[(local - i * d_stride) * N + n];
        for (int64_t e = 0; e < D; ++e) acc[e] += wj * grad_row[e];
      }
      store_row(p.dtype, acc.data(), input_grad, item * D, D);
    }
    // d weight[j, n] = sum over windows o (increasing) of <d out[o, n], input[start(o) + j, n]>.
#pragma omp for schedule(static)
    for (int64_t item = 0; item < l * N; ++item) {
      const int64_t j = item / N, n = item % N;
      double total = 0.0;
      for (int64_t o = 0; o < p.windows; ++o) {
        load_row(p.dtype, output_grad, (o * N + n) * D, grad_row.data(), D);
        load_row(p.dtype, input, ((starts[o] + j) * N + n) * D, row.data(), D);
        float dot = 0.0f;
        for (int64_t e = 0; e < D; ++e) dot += grad_row[e] * row[e];
        total += dot;
      }
      weight_acc[item] = total;
    }
  }
  std::vector<float> weight_out(weight_acc.begin(), weight_acc.end());
  store_row(p.dtype, weight_out.data(), weight_grad, 0, l * N);
  return {};
}

}  // namespace ms_nsa
