// nsa_compress (aclnnNsaCompress) and its gradient (aclnnNsaCompressGrad) on the CPU: the math core.
// Plain pointers and sizes; nothing here knows about MindSpore. Semantics: docs/semantics.md.
//
//   input [tokens, heads, head_dim], weight [block, heads], windows of `block` tokens every `stride`
//   tokens inside each packed segment (never crossing one): segment b yields
//   max(0, 1 + (L_b - block) / stride) rows of output [windows, heads, head_dim], segments in order:
//       out[o, n, :] = sum_j weight[j, n] * input[start(o) + j, n, :]
#ifndef MS_NSA_COMPRESS_NSA_COMPRESS_H_
#define MS_NSA_COMPRESS_NSA_COMPRESS_H_

#include <cstdint>

#include "nsa_status.h"

namespace ms_nsa {

struct CompressProblem {
  int64_t tokens = 0;     // T
  int64_t heads = 0;      // N
  int64_t head_dim = 0;   // D
  int64_t batch_count = 0;
  const int64_t *cu_seqlens = nullptr;  // [B], cumulative, last entry == tokens
  int64_t block = 0;      // compress_block_size l
  int64_t stride = 0;     // compress_stride d
  int64_t windows = 0;    // output rows the caller allocated; must equal compress_window_count()
  DType dtype = DType::kFloat32;
};

// Output rows for these lengths: sum over segments of max(0, 1 + (L_b - l) / d). -1 if the lengths
// are invalid (check with compress_validate for the message).
int64_t compress_window_count(const CompressProblem &problem);

NsaError compress_validate(const CompressProblem &problem);

// Writes output [windows, heads, head_dim] (problem.dtype), accumulating in float32.
NsaError compress_forward(const CompressProblem &problem, const void *input, const void *weight, void *output);

// Writes input_grad (shape of input; rows in no window get 0) and weight_grad (shape of weight). Each
// element has one owner that sums in a fixed order: bitwise the same for any thread count.
NsaError compress_backward(const CompressProblem &problem, const void *output_grad, const void *input,
                           const void *weight, void *input_grad, void *weight_grad);

}  // namespace ms_nsa

#endif  // MS_NSA_COMPRESS_NSA_COMPRESS_H_
