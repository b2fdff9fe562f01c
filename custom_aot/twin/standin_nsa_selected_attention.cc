// The Ascend twin's stand-in for CANN's aclnnNsaSelectedAttention and aclnnNsaSelectedAttentionGrad:
// the exact prototypes (the headers in ms_nsa/twin_cann/include/aclnnop/), a record of every argument,
// and CANN's results computed by the CPU math core with CANN's mask rules (docs/semantics.md):
//   forward  (nsa_selected_attention_kernel.h, HandleMask): masking only when sparseMode == 2 and
//            attenMaskOptional is not null; then by block index, -FLT_MAX fill -> MaskRule::kCannForward;
//   backward (nsa_vec_op.h, CalAttenMsk): masking whenever sparseMode == 2, by slot -> kCannBackward.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aclnnop/aclnn_nsa_selected_attention.h"
#include "aclnnop/aclnn_nsa_selected_attention_grad.h"
#include "nsa_core.h"
#include "twin.h"

namespace {

using ms_nsa::MaskRule;
using ms_nsa::NsaProblem;
using ms_nsa::twin::executor_for;
using ms_nsa::twin::fail;
using ms_nsa::twin::launch;

// The problem's sizes and lengths, owned by the executor that runs it.
struct Problem {
  NsaProblem p;
  std::vector<int64_t> cu_q, cu_kv;
};

bool has_rank(const aclTensor *t, int64_t rank) { return t != nullptr && t->ndim == rank; }

// What CANN's host side checks before it builds an executor (spec §4), in the terms the core takes.
std::string describe(const aclTensor *query, const aclTensor *key, const aclTensor *value,
                     const aclTensor *topk, const aclIntArray *cu_q, const aclIntArray *cu_kv, int64_t head_num,
                     const char *layout, int64_t sparse_mode, int64_t block_size, int64_t block_count,
                     double scale, MaskRule causal_rule, bool causal, Problem *out) {
  if (layout == nullptr || std::strcmp(layout, "TND") != 0) return "inputLayout must be TND";
  if (!has_rank(query, 3) || !has_rank(key, 3) || !has_rank(value, 3) || !has_rank(topk, 3)) {
    return "query, key, value and topkIndices must be 3-D";
  }
  if (std::strcmp(query->dtype, "float16") == 0) out->p.dtype = ms_nsa::DType::kFloat16;
  else if (std::strcmp(query->dtype, "bfloat16") == 0) out->p.dtype = ms_nsa::DType::kBFloat16;
  else return std::string("query dtype ") + query->dtype + " is not float16 or bfloat16";
  if (std::strcmp(key->dtype, query->dtype) != 0 || std::strcmp(value->dtype, query->dtype) != 0 ||
      std::strcmp(topk->dtype, "int32") != 0) {
    return "key/value must have query's dtype and topkIndices int32";
  }
  if (sparse_mode != 0 && sparse_mode != 2) return "sparseMode must be 0 or 2";
  if (head_num != query->shape[1]) return "headNum must equal query's N1";
  if ((cu_q == nullptr) != (cu_kv == nullptr)) return "give both actual sequence lengths or neither";
  NsaProblem &p = out->p;
  p.q_tokens = query->shape[0];
  p.q_heads = query->shape[1];
  p.qk_head_dim = query->shape[2];
  p.kv_tokens = key->shape[0];
  p.kv_heads = key->shape[1];
  p.v_head_dim = value->shape[2];
  out->cu_q = cu_q ? std::vector<int64_t>(cu_q->values, cu_q->values + cu_q->size) : std::vector<int64_t>{p.q_tokens};
  out->cu_kv = cu_kv ? std::vector<int64_t>(cu_kv->values, cu_kv->values + cu_kv->size)
                     : std::vector<int64_t>{p.kv_tokens};
  if (out->cu_q.size() != out->cu_kv.size()) return "the actual sequence lengths differ in length";
  p.batch_count = static_cast<int64_t>(out->cu_q.size());
  p.cu_seqlens_q = out->cu_q.data();
  p.cu_seqlens_kv = out->cu_kv.data();
  p.select_block_size = block_size;
  p.select_block_count = block_count;
  p.scale_value = static_cast<float>(scale);
  p.mask = sparse_mode == 2 && causal ? causal_rule : MaskRule::kNone;
  return "";
}

}  // namespace

extern "C" {

aclnnStatus aclnnNsaSelectedAttentionGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *topkIndices,
    const aclTensor *attenMaskOptional, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualSeqKvLenOptional, double scaleValue, int64_t headNum, char *inputLayout,
    int64_t sparseMode, int64_t selectedBlockSize, int64_t selectedBlockCount,
    const aclTensor *softmaxMaxOut, const aclTensor *softmaxSumOut, const aclTensor *attentionOut,
    uint64_t *workspaceSize, aclOpExecutor **executor) {
  using namespace ms_nsa::twin;
  record_call("aclnnNsaSelectedAttention");
  record_tensor(query), record_tensor(key), record_tensor(value), record_tensor(topkIndices);
  record_tensor(attenMaskOptional), record_int_array(actualSeqQLenOptional), record_int_array(actualSeqKvLenOptional);
  record_double(scaleValue), record_int(headNum), record_str(inputLayout), record_int(sparseMode);
  record_int(selectedBlockSize), record_int(selectedBlockCount);
  record_tensor(softmaxMaxOut), record_tensor(softmaxSumOut), record_tensor(attentionOut);
  record_tail(workspaceSize, executor);
  if (workspaceSize == nullptr || executor == nullptr || !softmaxMaxOut || !softmaxSumOut || !attentionOut) {
    return fail("missing output or workspace arguments");
  }
  auto problem = std::make_shared<Problem>();
  // HandleMask runs only for ATTEN_ENABLE, i.e. sparseMode 2 with a mask tensor given.
  const std::string error = describe(query, key, value, topkIndices, actualSeqQLenOptional, actualSeqKvLenOptional,
                                     headNum, inputLayout, sparseMode, selectedBlockSize, selectedBlockCount,
                                     scaleValue, MaskRule::kCannForward, attenMaskOptional != nullptr, problem.get());
  if (!error.empty()) return fail(error);
  const void *q = query->data, *k = key->data, *v = value->data;
  const auto *topk = static_cast<const int32_t *>(topkIndices->data);
  auto *m = static_cast<float *>(softmaxMaxOut->data), *l = static_cast<float *>(softmaxSumOut->data);
  void *o = attentionOut->data;
  *workspaceSize = 0;
  *executor = executor_for([=]() { return ms_nsa::nsa_forward(problem->p, q, k, v, topk, m, l, o); });
  return 0;
}

aclnnStatus aclnnNsaSelectedAttention(void *, uint64_t, aclOpExecutor *executor, const aclrtStream) {
  return launch(executor);
}

aclnnStatus aclnnNsaSelectedAttentionGradGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *attentionOut,
    const aclTensor *attentionOutGrad, const aclTensor *softmaxMax, const aclTensor *softmaxSum,
    const aclTensor *topkIndices, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualSeqKvLenOptional, const aclTensor *attenMaskOptional, double scaleValue,
    int64_t selectedBlockSize, int64_t selectedBlockCount, int64_t headNum, char *inputLayout,
    int64_t sparseMode, aclTensor *dqOut, aclTensor *dkOut, aclTensor *dvOut,
    uint64_t *workspaceSize, aclOpExecutor **executor) {
  using namespace ms_nsa::twin;
  record_call("aclnnNsaSelectedAttentionGrad");
  record_tensor(query), record_tensor(key), record_tensor(value), record_tensor(attentionOut);
  record_tensor(attentionOutGrad), record_tensor(softmaxMax), record_tensor(softmaxSum), record_tensor(topkIndices);
  record_int_array(actualSeqQLenOptional), record_int_array(actualSeqKvLenOptional), record_tensor(attenMaskOptional);
  record_double(scaleValue), record_int(selectedBlockSize), record_int(selectedBlockCount), record_int(headNum);
  record_str(inputLayout), record_int(sparseMode);
  record_tensor(dqOut), record_tensor(dkOut), record_tensor(dvOut);
  record_tail(workspaceSize, executor);
  if (workspaceSize == nullptr || executor == nullptr || !dqOut || !dkOut || !dvOut || !attentionOut ||
      !attentionOutGrad || !softmaxMax || !softmaxSum) {
    return fail("missing tensor, output or workspace arguments");
  }
  auto problem = std::make_shared<Problem>();
  // CalAttenMsk runs whenever sparseMode is 2, mask tensor or not.
  const std::string error = describe(query, key, value, topkIndices, actualSeqQLenOptional, actualSeqKvLenOptional,
                                     headNum, inputLayout, sparseMode, selectedBlockSize, selectedBlockCount,
                                     scaleValue, MaskRule::kCannBackward, true, problem.get());
  if (!error.empty()) return fail(error);
  const void *q = query->data, *k = key->data, *v = value->data, *o = attentionOut->data;
  const void *d_o = attentionOutGrad->data;
  const auto *m = static_cast<const float *>(softmaxMax->data), *l = static_cast<const float *>(softmaxSum->data);
  const auto *topk = static_cast<const int32_t *>(topkIndices->data);
  void *dq = dqOut->data, *dk = dkOut->data, *dv = dvOut->data;
  *workspaceSize = 0;
  *executor = executor_for([=]() {
    return ms_nsa::nsa_backward(problem->p, q, k, v, o, d_o, m, l, topk, dq, dk, dv);
  });
  return 0;
}

aclnnStatus aclnnNsaSelectedAttentionGrad(void *, uint64_t, aclOpExecutor *executor, aclrtStream) {
  return launch(executor);
}

}  // extern "C"

// The CPU AOT entries the twin's Custom ops name (ms_nsa/_ascend_kernels.py: "Twin" + the aclnn name
// without its "aclnn" prefix).
MS_NSA_TWIN_ENTRY(TwinNsaSelectedAttention, aclnnNsaSelectedAttention)
MS_NSA_TWIN_ENTRY(TwinNsaSelectedAttentionGrad, aclnnNsaSelectedAttentionGrad)
