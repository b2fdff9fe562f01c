// MindSpore AOT entry points of nsa_window_attention and its gradient: unpack (params, shapes, dtypes)
// into a WindowProblem and call the core. Inputs in ops_yaml/ order, lengths as a 1-D int64 tensor:
//   NsaWindowAttention:      query key value actual_seq_len -> softmax_max softmax_sum attention_out
//   NsaWindowAttentionGrad:  query key value attention_out grad softmax_max softmax_sum actual_seq_len
//                            -> dq dk dv
// Attributes (read once per shape in *Init): scale_value, head_num, window_size.
#include <string>

#include "aot_common.h"
#include "aot_extra.h"
#include "window/nsa_window.h"

namespace {

using mindspore::AotExtra;
using ms_nsa::NsaError;
using ms_nsa::WindowProblem;
using ms_nsa::aot::has_shape;
using ms_nsa::aot::is_dtype;

struct WindowAttrs : public mindspore::AotKernelData {
  float scale_value = 1.0f;
  int64_t head_num = 0, window_size = 0;
};

int read_attrs(AotExtra *extra) {
  auto *attrs = new WindowAttrs;
  attrs->scale_value = extra->GetAttrFloat("scale_value");
  attrs->head_num = extra->GetAttrInt("head_num");
  attrs->window_size = extra->GetAttrInt("window_size");
  extra->SetKernelData(attrs);
  return 0;
}

// query, key and value are params 0..2 in both ops; `lengths` is the index of actual_seq_len.
NsaError build(int nparam, int *ndims, int64_t **shapes, const char **dtypes, void **params, void *extra,
               int lengths, WindowProblem *p) {
  const auto *attrs = static_cast<const WindowAttrs *>(static_cast<AotExtra *>(extra)->KernelData());
  if (attrs == nullptr) return {ms_nsa::kInternal, "kernel attributes were not initialised"};
  if (nparam <= lengths || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[lengths] != 1) {
    return {ms_nsa::kBadProblem, "query, key and value must be 3-D (TND) and actual_seq_len 1-D"};
  }
  if (!ms_nsa::aot::parse_dtype(dtypes[0], &p->dtype)) {
    return {ms_nsa::kUnsupportedDType, std::string("query dtype ") + dtypes[0] +
                                           " is not supported; use float32, float16 or bfloat16"};
  }
  p->tokens = shapes[0][0];
  p->q_heads = shapes[0][1];
  p->qk_head_dim = shapes[0][2];
  p->kv_heads = shapes[1][1];
  p->v_head_dim = shapes[2][2];
  p->batch_count = shapes[lengths][0];
  p->cu_seqlens = static_cast<const int64_t *>(params[lengths]);
  p->window_size = attrs->window_size;
  p->scale_value = attrs->scale_value;
  // The Python layer checks all of this against ops_yaml/ before the op is built; these guard the
  // pointer arithmetic should the kernel ever be called some other way.
  const bool consistent = attrs->head_num == p->q_heads &&
                          has_shape(ndims[1], shapes[1], p->tokens, p->kv_heads, p->qk_head_dim) &&
                          has_shape(ndims[2], shapes[2], p->tokens, p->kv_heads, p->v_head_dim) &&
                          is_dtype(dtypes[1], dtypes[0]) && is_dtype(dtypes[2], dtypes[0]) &&
                          is_dtype(dtypes[lengths], "int64");
  if (!consistent) {
    return {ms_nsa::kBadProblem, "key must be [T, N2, D] and value [T, N2, Dv] of query's T, D and dtype, "
                                 "head_num must equal N1 and actual_seq_len must be int64"};
  }
  return {};
}

constexpr const char *kForwardName = "nsa_window_attention";
constexpr const char *kBackwardName = "nsa_window_attention_grad";

}  // namespace

extern "C" {

int NsaWindowAttentionInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra); }

int NsaWindowAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *extra) {
  WindowProblem p;
  NsaError err = build(nparam, ndims, shapes, dtypes, params, extra, 3, &p);
  if (err.status == ms_nsa::kOk &&
      (nparam < 7 || !has_shape(ndims[4], shapes[4], p.tokens, p.q_heads, 8) ||
       !has_shape(ndims[5], shapes[5], p.tokens, p.q_heads, 8) ||
       !has_shape(ndims[6], shapes[6], p.tokens, p.q_heads, p.v_head_dim))) {
    err = {ms_nsa::kBadProblem, "the outputs must be softmax_max/sum [T, N1, 8] and attention_out [T, N1, Dv]"};
  }
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kForwardName, err);
  return ms_nsa::aot::report(kForwardName, ms_nsa::window_forward(p, params[0], params[1], params[2],
                                                                   static_cast<float *>(params[4]),
                                                                   static_cast<float *>(params[5]), params[6]));
}

int NsaWindowAttentionGradInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra); }

int NsaWindowAttentionGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *extra) {
  WindowProblem p;
  NsaError err = build(nparam, ndims, shapes, dtypes, params, extra, 7, &p);
  if (err.status == ms_nsa::kOk &&
      (nparam < 11 || !has_shape(ndims[3], shapes[3], p.tokens, p.q_heads, p.v_head_dim) ||
       !has_shape(ndims[4], shapes[4], p.tokens, p.q_heads, p.v_head_dim) ||
       !has_shape(ndims[5], shapes[5], p.tokens, p.q_heads, 8) ||
       !has_shape(ndims[6], shapes[6], p.tokens, p.q_heads, 8) || !is_dtype(dtypes[5], "float32") ||
       !is_dtype(dtypes[6], "float32"))) {
    err = {ms_nsa::kBadProblem, "attention_out and grad must be [T, N1, Dv], softmax_max/sum float32 [T, N1, 8]"};
  }
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kBackwardName, err);
  return ms_nsa::aot::report(kBackwardName, ms_nsa::window_backward(
      p, params[0], params[1], params[2], params[3], params[4], static_cast<const float *>(params[5]),
      static_cast<const float *>(params[6]), params[8], params[9], params[10]));
}

}  // extern "C"
