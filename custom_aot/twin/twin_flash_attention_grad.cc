// The Ascend twin's stand-in for MindSpore's FlashAttentionScoreGrad, the one call of the Ascend backend
// that is not an aclnn Custom op (nsa_compress_attention's gradient: CANN has no gradient op for it, and
// MindSpore's flash-attention gradient runs only on Ascend). A CPU AOT Custom op with the primitive's
// inputs in its order (None where absent) and its attributes; it records them, checks the host-side rules
// of CANN's FlashAttentionScoreGrad that the call relies on, and computes flash attention's gradient with
// the CPU core's softmax-attention backward (compress_attention/nsa_compress_attention.h):
//   - TND with actual_seq_qlen / actual_seq_kvlen; no pse, dropout, padding mask, softmax_in or prefix;
//   - a mask in no-compress mode (sparse_mode 0 or 1) must be exactly [max S1_b, max S2_b]
//     (ops-transformer attention/flash_attention_score_grad/op_host/
//     flash_attention_score_grad_tiling_s1s2_bn2gs1s2.cpp, CheckAttenMaskShape); each batch reads its
//     top-left corner (row stride max S2_b: attenMaskShapeType SS);
//   - softmax_max / softmax_sum in the TND default layout, batch by batch [N1, S1_b, 8].
// Inputs (MindSpore 2.10 FlashAttentionScoreGrad.__call__): query key value dy pse_shift drop_mask
// padding_mask atten_mask softmax_max softmax_sum softmax_in attention_in prefix actual_seq_qlen
// actual_seq_kvlen; outputs dq dk dv dpse.
#include <climits>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "aot_common.h"
#include "compress_attention/nsa_compress_attention.h"
#include "twin.h"

namespace {

using mindspore::AotExtra;

enum Input { kQuery, kKey, kValue, kDy, kPse, kDropMask, kPaddingMask, kAttenMask, kSoftmaxMax, kSoftmaxSum,
             kSoftmaxIn, kAttentionIn, kPrefix, kSeqQ, kSeqKv, kInputs };

struct Attrs : public mindspore::AotKernelData {
  int64_t head_num = 0, pre_tokens = 0, next_tokens = 0, inner_precise = 0, sparse_mode = 0;
  float keep_prob = 1.0f, scale_value = 1.0f;
  std::string input_layout;
};

[[noreturn]] void raise(const std::string &message) {
  ms_nsa::twin::fail(message);
  throw std::runtime_error("ms_nsa Ascend twin, FlashAttentionScoreGrad stand-in: " + message);
}

bool absent(const char *dtype) { return std::strcmp(dtype, "none") == 0; }

aclTensor tensor_of(int i, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  return {params[i], dtypes[i], ndims[i], shapes[i]};
}

}  // namespace

extern "C" {

int TwinFlashAttentionScoreGradInit(int *, int64_t **, const char **, AotExtra *extra) {
  auto *a = new Attrs;
  a->head_num = extra->GetAttrInt("head_num");
  a->keep_prob = extra->GetAttrFloat("keep_prob");
  a->scale_value = extra->GetAttrFloat("scale_value");
  a->pre_tokens = extra->GetAttrInt("pre_tokens");
  a->next_tokens = extra->GetAttrInt("next_tokens");
  a->inner_precise = extra->GetAttrInt("inner_precise");
  a->input_layout = extra->GetAttrStr("input_layout");
  a->sparse_mode = extra->GetAttrInt("sparse_mode");
  extra->SetKernelData(a);
  return 0;
}

int TwinFlashAttentionScoreGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *extra) {
  using namespace ms_nsa::twin;
  const auto *a = static_cast<const Attrs *>(static_cast<AotExtra *>(extra)->KernelData());
  if (a == nullptr) raise("the kernel was not initialised");
  if (nparam != kInputs + 4) raise("expected 15 inputs and 4 outputs, got " + std::to_string(nparam) + " parameters");
  std::vector<aclTensor> tensors;
  for (int i = 0; i < nparam; ++i) tensors.push_back(tensor_of(i, params, ndims, shapes, dtypes));
  std::vector<std::vector<int64_t>> lengths(2);
  record_call("FlashAttentionScoreGrad");
  for (int i = 0; i < kInputs; ++i) {
    if (absent(dtypes[i])) {
      record("null");
    } else if (i == kSeqQ || i == kSeqKv) {
      const auto *v = static_cast<const int64_t *>(params[i]);
      lengths[i - kSeqQ].assign(v, v + shapes[i][0]);
      const aclIntArray array{v, shapes[i][0]};
      record_int_array(&array);
    } else {
      record_tensor(&tensors[i]);
    }
  }
  record("attr head_num " + std::to_string(a->head_num));
  char number[64];
  std::snprintf(number, sizeof number, "attr keep_prob %.9g", a->keep_prob);
  record(number);
  std::snprintf(number, sizeof number, "attr scale_value %.9g", a->scale_value);
  record(number);
  record("attr pre_tokens " + std::to_string(a->pre_tokens));
  record("attr next_tokens " + std::to_string(a->next_tokens));
  record("attr inner_precise " + std::to_string(a->inner_precise));
  record("attr input_layout " + a->input_layout);
  record("attr sparse_mode " + std::to_string(a->sparse_mode));
  for (int i = kInputs; i < nparam; ++i) record_tensor(&tensors[i]);

  // What the stand-in models; anything else is CANN behaviour it does not reproduce.
  for (int i : {kPse, kDropMask, kPaddingMask, kSoftmaxIn, kPrefix}) {
    if (!absent(dtypes[i])) raise("pse, dropout, padding mask, softmax_in and prefix are not modelled");
  }
  if (a->input_layout != "TND" || a->keep_prob != 1.0f || (a->sparse_mode != 0 && a->sparse_mode != 1) ||
      a->pre_tokens != INT_MAX || a->next_tokens != INT_MAX) {
    raise("only TND, keep_prob 1, sparse_mode 0/1 without a band (pre/next tokens 2147483647) are modelled");
  }
  if (absent(dtypes[kSeqQ]) || absent(dtypes[kSeqKv]) || lengths[0].size() != lengths[1].size()) {
    raise("TND needs actual_seq_qlen and actual_seq_kvlen of the same length");
  }
  for (int i : {kQuery, kKey, kValue, kDy, kSoftmaxMax, kSoftmaxSum, kAttentionIn}) {
    if (absent(dtypes[i]) || ndims[i] != 3) raise("query, key, value, dy, the statistics and attention_in must be 3-D");
  }
  ms_nsa::CompressAttentionProblem p;
  if (!ms_nsa::aot::parse_dtype(dtypes[kQuery], &p.dtype) || p.dtype == ms_nsa::DType::kFloat32) {
    raise(std::string("query dtype ") + dtypes[kQuery] + " is not float16 or bfloat16");
  }
  p.q_tokens = shapes[kQuery][0];
  p.q_heads = shapes[kQuery][1];
  p.qk_head_dim = shapes[kQuery][2];
  p.kv_tokens = shapes[kKey][0];
  p.kv_heads = shapes[kKey][1];
  p.v_head_dim = shapes[kValue][2];
  if (a->head_num != p.q_heads) raise("head_num must equal query's N1");
  const bool stats_ok = shapes[kSoftmaxMax][0] == p.q_tokens && shapes[kSoftmaxMax][1] == p.q_heads &&
                        shapes[kSoftmaxMax][2] == 8 && std::memcmp(shapes[kSoftmaxMax], shapes[kSoftmaxSum],
                                                                   3 * sizeof(int64_t)) == 0 &&
                        std::strcmp(dtypes[kSoftmaxMax], "float32") == 0;
  if (!stats_ok) raise("softmax_max / softmax_sum must be float32 [T1, N1, 8]");
  p.batch_count = static_cast<int64_t>(lengths[0].size());
  p.cu_seqlens_q = lengths[0].data();
  p.cu_seqlens_kv = lengths[1].data();
  // The core's selection parameters play no part in its backward; these pass its checks for any batch
  // with at least one key.
  p.compress_block_size = p.compress_stride = p.select_block_size = p.select_block_count = 1;
  p.scale_value = a->scale_value;
  if (!absent(dtypes[kAttenMask])) {
    const int64_t max_q = longest_batch(lengths[0]), max_kv = longest_batch(lengths[1]);
    if (ndims[kAttenMask] != 2 || shapes[kAttenMask][0] != max_q || shapes[kAttenMask][1] != max_kv) {
      raise("atten mask shape is invalid: it must be [max S1, max S2] = [" + std::to_string(max_q) + ", " +
            std::to_string(max_kv) + "] (CheckAttenMaskShape)");
    }
    p.atten_mask = static_cast<const uint8_t *>(params[kAttenMask]);
    p.atten_mask_rows = max_q;
    p.atten_mask_cols = max_kv;
  }
  std::vector<float> softmax_max(p.q_tokens * p.q_heads * 8), softmax_sum(softmax_max.size());
  softmax_cann_to_rows(lengths[0], p.q_heads, static_cast<const float *>(params[kSoftmaxMax]), softmax_max.data());
  softmax_cann_to_rows(lengths[0], p.q_heads, static_cast<const float *>(params[kSoftmaxSum]), softmax_sum.data());
  const ms_nsa::NsaError err = ms_nsa::compress_attention_backward(
      p, params[kQuery], params[kKey], params[kValue], params[kAttentionIn], params[kDy], softmax_max.data(),
      softmax_sum.data(), params[kInputs], params[kInputs + 1], params[kInputs + 2]);
  if (err.status != ms_nsa::kOk) raise(err.message);
  std::memset(params[kInputs + 3], 0, 2);  // dpse: [1], no pse
  return 0;
}

}  // extern "C"
