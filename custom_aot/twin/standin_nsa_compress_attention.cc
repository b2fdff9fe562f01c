// The Ascend twin's stand-in for CANN's aclnnNsaCompressAttention: the exact prototype
// (ms_nsa/twin_cann/include/aclnnop/aclnn_nsa_compress_attention.h), a record of every argument, the
// host-side rules of CANN's doc and tiling, and CANN's results: the CPU core's attention, importance
// scores and top-k (compress_attention/nsa_compress_attention.h, whose rules cite CANN's kernel and golden)
// read and written the way CANN's kernel addresses its buffers (ops-transformer
// attention/nsa_compress_attention/op_kernel/nsa_compress_attention_s1s2_bn2gs1_sab.h and
// nsa_compress_attention_var_len_score_sab.h):
//   - atten_mask row r of a batch starts at r * max S_cmp (CopyInAttenMask: `* inputParams.s2Size`, the
//     longest batch's compressed length, nsa_compress_attention_tiling_general.cpp), whatever the mask's
//     shape; topk_mask row r at r * ceil(max S_cmp / (l'/d)) (the top-k mask copy: `CeilDiv(s2Size, isM)`);
//   - softmax_max / softmax_sum written batch by batch as [N1, S1_b, 8] (ComputeBmm1Tail);
//   - actualSelSeqKvLenOptional is not read (the kernel derives the selection blocks).
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aclnnop/aclnn_nsa_compress_attention.h"
#include "compress_attention/nsa_compress_attention.h"
#include "twin.h"

namespace {

using ms_nsa::CompressAttentionProblem;
using ms_nsa::twin::executor_for;
using ms_nsa::twin::fail;
using ms_nsa::twin::has_dtype;
using ms_nsa::twin::launch;

// aclnnNsaCompressAttention doc, constraints.
constexpr int64_t kCannMaxCompressedKv = 14000;

struct Problem {
  CompressAttentionProblem p;
  std::vector<int64_t> cu_q, cu_kv;
  std::vector<float> softmax_max, softmax_sum;  // the core's [T1, N1, 8], before CANN's layout
};

// A mask as CANN's kernel reads it: rows of `stride` elements from the start of the buffer.
bool read_mask(const aclTensor *mask, int64_t stride, const uint8_t **data, int64_t *rows, int64_t *cols) {
  if (mask == nullptr) return true;
  if (mask->ndim != 2 || !has_dtype(mask, {"bool", "uint8"}) || stride < 1) return false;
  *data = static_cast<const uint8_t *>(mask->data);
  *rows = mask->shape[0] * mask->shape[1] / stride;
  *cols = stride;
  return true;
}

std::string describe(const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *atten,
                     const aclTensor *topk, const aclIntArray *cu_q, const aclIntArray *cu_kv,
                     const aclIntArray *cu_sel, double scale, int64_t head_num, const char *layout,
                     int64_t sparse_mode, int64_t l, int64_t d, int64_t l_sel, int64_t n, Problem *out) {
  if (layout == nullptr || std::strcmp(layout, "TND") != 0) return "inputLayout must be TND";
  if (sparse_mode != 0 && sparse_mode != 1) return "sparseMode must be 0 or 1";
  if (query == nullptr || key == nullptr || value == nullptr || query->ndim != 3 || key->ndim != 3 ||
      value->ndim != 3) {
    return "query, key and value must be 3-D (TND)";
  }
  if (!has_dtype(query, {"float16", "bfloat16"}) || std::strcmp(key->dtype, query->dtype) != 0 ||
      std::strcmp(value->dtype, query->dtype) != 0) {
    return std::string("query dtype ") + query->dtype + " must be float16 or bfloat16, shared by key and value";
  }
  // The tiling reads all three arrays (GetActualSeqLenData) and rejects a differing batch count.
  if (cu_q == nullptr || cu_kv == nullptr || cu_sel == nullptr) return "all three actual length arrays are required";
  if (cu_q->size != cu_kv->size) return "VarLen scene, q is not equal kv";
  CompressAttentionProblem &p = out->p;
  p.dtype = std::strcmp(query->dtype, "float16") == 0 ? ms_nsa::DType::kFloat16 : ms_nsa::DType::kBFloat16;
  p.q_tokens = query->shape[0];
  p.q_heads = query->shape[1];
  p.qk_head_dim = query->shape[2];
  p.kv_tokens = key->shape[0];
  p.kv_heads = key->shape[1];
  p.v_head_dim = value->shape[2];
  if (head_num != p.q_heads) return "headNum must equal query's N1";
  out->cu_q = ms_nsa::twin::values(cu_q);
  out->cu_kv = ms_nsa::twin::values(cu_kv);
  p.batch_count = static_cast<int64_t>(out->cu_q.size());
  p.cu_seqlens_q = out->cu_q.data();
  p.cu_seqlens_kv = out->cu_kv.data();
  p.cu_seqlens_sel = nullptr;  // never read by CANN's kernel
  p.compress_block_size = l;
  p.compress_stride = d;
  p.select_block_size = l_sel;
  p.select_block_count = n;
  p.scale_value = static_cast<float>(scale);
  const int64_t max_kv = ms_nsa::twin::longest_batch(out->cu_kv);
  if (max_kv > kCannMaxCompressedKv) return "a batch has more than 14000 compressed keys";
  if (d < 1 || l_sel % d != 0) return "selectBlockSize must be a multiple of compressStride";
  const int64_t max_blocks = (max_kv + l_sel / d - 1) / (l_sel / d);
  if (!read_mask(atten, max_kv, &p.atten_mask, &p.atten_mask_rows, &p.atten_mask_cols) ||
      !read_mask(topk, max_blocks, &p.topk_mask, &p.topk_mask_rows, &p.topk_mask_cols)) {
    return "attenMaskOptional and topkMaskOptional must be 2-D bool or uint8";
  }
  out->softmax_max.resize(p.q_tokens * p.q_heads * 8);
  out->softmax_sum.resize(p.q_tokens * p.q_heads * 8);
  return "";
}

}  // namespace

extern "C" {

aclnnStatus aclnnNsaCompressAttentionGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *attenMaskOptional,
    const aclTensor *topkMaskOptional, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualCmpSeqKvLenOptional, const aclIntArray *actualSelSeqKvLenOptional,
    double scaleValue, int64_t headNum, char *inputLayout, int64_t sparseMode,
    int64_t compressBlockSize, int64_t compressStride, int64_t selectBlockSize, int64_t selectBlockCount,
    const aclTensor *softmaxMaxOut, const aclTensor *softmaxSumOut, const aclTensor *attentionOutOut,
    const aclTensor *topkIndicesOut, uint64_t *workspaceSize, aclOpExecutor **executor) {
  using namespace ms_nsa::twin;
  record_call("aclnnNsaCompressAttention");
  record_tensor(query), record_tensor(key), record_tensor(value), record_tensor(attenMaskOptional);
  record_tensor(topkMaskOptional), record_int_array(actualSeqQLenOptional);
  record_int_array(actualCmpSeqKvLenOptional), record_int_array(actualSelSeqKvLenOptional);
  record_double(scaleValue), record_int(headNum), record_str(inputLayout), record_int(sparseMode);
  record_int(compressBlockSize), record_int(compressStride), record_int(selectBlockSize);
  record_int(selectBlockCount);
  record_tensor(softmaxMaxOut), record_tensor(softmaxSumOut), record_tensor(attentionOutOut);
  record_tensor(topkIndicesOut);
  record_tail(workspaceSize, executor);
  if (workspaceSize == nullptr || executor == nullptr || !softmaxMaxOut || !softmaxSumOut || !attentionOutOut ||
      !topkIndicesOut) {
    return fail("missing output or workspace arguments");
  }
  auto problem = std::make_shared<Problem>();
  const std::string error = describe(query, key, value, attenMaskOptional, topkMaskOptional, actualSeqQLenOptional,
                                     actualCmpSeqKvLenOptional, actualSelSeqKvLenOptional, scaleValue, headNum,
                                     inputLayout, sparseMode, compressBlockSize, compressStride, selectBlockSize,
                                     selectBlockCount, problem.get());
  if (!error.empty()) return fail(error);
  const void *q = query->data, *k = key->data, *v = value->data;
  auto *m = static_cast<float *>(softmaxMaxOut->data), *s = static_cast<float *>(softmaxSumOut->data);
  void *o = attentionOutOut->data;
  auto *topk = static_cast<int32_t *>(topkIndicesOut->data);
  *workspaceSize = 0;
  *executor = executor_for([=]() {
    Problem &x = *problem;
    const ms_nsa::NsaError err = ms_nsa::compress_attention_forward(x.p, q, k, v, x.softmax_max.data(),
                                                                    x.softmax_sum.data(), o, topk);
    if (err.status != ms_nsa::kOk) return err;
    softmax_rows_to_cann(x.cu_q, x.p.q_heads, x.softmax_max.data(), m);
    softmax_rows_to_cann(x.cu_q, x.p.q_heads, x.softmax_sum.data(), s);
    return err;
  });
  return 0;
}

aclnnStatus aclnnNsaCompressAttention(void *, uint64_t, aclOpExecutor *executor, const aclrtStream) {
  return launch(executor);
}

}  // extern "C"

MS_NSA_TWIN_ENTRY(TwinNsaCompressAttention, aclnnNsaCompressAttention)
