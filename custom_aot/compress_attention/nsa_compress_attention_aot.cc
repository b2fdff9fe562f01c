// MindSpore AOT entry points of nsa_compress_attention and its gradient: unpack (params, shapes,
// dtypes) into a CompressAttentionProblem and call the core. Inputs in ops_yaml/ order; optional
// tensors the caller left out arrive as placeholders, flagged by the has_<name> attributes:
//   NsaCompressAttention:      query key value atten_mask topk_mask actual_seq_qlen actual_cmp_seq_kvlen
//                              actual_sel_seq_kvlen -> softmax_max softmax_sum attention_out topk_indices
//   NsaCompressAttentionGrad:  query key value attention_out grad softmax_max softmax_sum atten_mask
//                              actual_seq_qlen actual_cmp_seq_kvlen -> dq dk dv
#include <algorithm>
#include <string>

#include "aot_common.h"
#include "aot_extra.h"
#include "compress_attention/nsa_compress_attention.h"

namespace {

using mindspore::AotExtra;
using ms_nsa::CompressAttentionProblem;
using ms_nsa::NsaError;

struct Attrs : public mindspore::AotKernelData {
  float scale_value = 1.0f;
  int64_t head_num = 0, compress_block_size = 0, compress_stride = 0, select_block_size = 0,
          select_block_count = 0;
  bool has_atten_mask = false, has_topk_mask = false, has_sel_lengths = false;
};

int read_attrs(AotExtra *extra, bool forward) {
  auto *a = new Attrs;
  a->scale_value = extra->GetAttrFloat("scale_value");
  a->head_num = extra->GetAttrInt("head_num");
  a->compress_block_size = extra->GetAttrInt("compress_block_size");
  a->compress_stride = extra->GetAttrInt("compress_stride");
  a->select_block_size = extra->GetAttrInt("select_block_size");
  a->select_block_count = extra->GetAttrInt("select_block_count");
  a->has_atten_mask = extra->GetAttrInt("has_atten_mask") != 0;
  if (forward) {
    a->has_topk_mask = extra->GetAttrInt("has_topk_mask") != 0;
    a->has_sel_lengths = extra->GetAttrInt("has_actual_sel_seq_kvlen") != 0;
  }
  extra->SetKernelData(a);
  return 0;
}

struct Layout {
  int query, key, value, atten_mask, topk_mask, cu_q, cu_kv, cu_sel;  // -1: not an input of this op
};

bool is_mask(int ndim, const char *dtype) {
  return ndim == 2 && (ms_nsa::aot::is_dtype(dtype, "bool") || ms_nsa::aot::is_dtype(dtype, "uint8"));
}

NsaError build(const Layout &at, int nparam, int *ndims, int64_t **shapes, const char **dtypes, void **params,
               void *extra, CompressAttentionProblem *p) {
  const auto *a = static_cast<const Attrs *>(static_cast<AotExtra *>(extra)->KernelData());
  if (a == nullptr) return {ms_nsa::kInternal, "kernel attributes were not initialised"};
  const int last = std::max(at.cu_kv, at.cu_sel);
  if (nparam <= last || ndims[at.query] != 3 || ndims[at.key] != 3 || ndims[at.value] != 3 ||
      ndims[at.cu_q] != 1 || ndims[at.cu_kv] != 1) {
    return {ms_nsa::kBadProblem, "query, key and value must be 3-D (TND), the cumulative lengths 1-D"};
  }
  const NsaError dtype_error = ms_nsa::aot::read_dtype("query", dtypes[at.query], &p->dtype);
  if (dtype_error.status != ms_nsa::kOk) return dtype_error;
  ms_nsa::aot::read_attention_shapes(shapes, at.query, at.key, at.value, p);
  p->batch_count = shapes[at.cu_q][0];
  p->cu_seqlens_q = static_cast<const int64_t *>(params[at.cu_q]);
  p->cu_seqlens_kv = static_cast<const int64_t *>(params[at.cu_kv]);
  p->compress_block_size = a->compress_block_size;
  p->compress_stride = a->compress_stride;
  p->select_block_size = a->select_block_size;
  p->select_block_count = a->select_block_count;
  p->scale_value = a->scale_value;
  bool consistent = a->head_num == p->q_heads && shapes[at.key][2] == p->qk_head_dim &&
                    shapes[at.value][0] == p->kv_tokens && shapes[at.value][1] == p->kv_heads &&
                    shapes[at.cu_kv][0] == p->batch_count &&
                    ms_nsa::aot::is_dtype(dtypes[at.key], dtypes[at.query]) &&
                    ms_nsa::aot::is_dtype(dtypes[at.value], dtypes[at.query]) &&
                    ms_nsa::aot::is_dtype(dtypes[at.cu_q], "int64") && ms_nsa::aot::is_dtype(dtypes[at.cu_kv], "int64");
  if (a->has_atten_mask) {
    consistent = consistent && is_mask(ndims[at.atten_mask], dtypes[at.atten_mask]);
    p->atten_mask = static_cast<const uint8_t *>(params[at.atten_mask]);
    p->atten_mask_rows = shapes[at.atten_mask][0];
    p->atten_mask_cols = shapes[at.atten_mask][1];
  }
  if (at.topk_mask >= 0 && a->has_topk_mask) {
    consistent = consistent && is_mask(ndims[at.topk_mask], dtypes[at.topk_mask]);
    p->topk_mask = static_cast<const uint8_t *>(params[at.topk_mask]);
    p->topk_mask_rows = shapes[at.topk_mask][0];
    p->topk_mask_cols = shapes[at.topk_mask][1];
  }
  if (at.cu_sel >= 0 && a->has_sel_lengths) {
    consistent = consistent && ndims[at.cu_sel] == 1 && shapes[at.cu_sel][0] == p->batch_count &&
                 ms_nsa::aot::is_dtype(dtypes[at.cu_sel], "int64");
    p->cu_seqlens_sel = static_cast<const int64_t *>(params[at.cu_sel]);
  }
  if (!consistent) {
    return {ms_nsa::kBadProblem, "shapes, dtypes or attributes of the inputs disagree with each other "
                                 "(head_num, head dims, masks, or the cumulative lengths' count or dtype)"};
  }
  return {};
}

using ms_nsa::aot::has_shape;

constexpr const char *kForwardName = "nsa_compress_attention";
constexpr const char *kBackwardName = "nsa_compress_attention_grad";

}  // namespace

extern "C" {

int NsaCompressAttentionInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra, true); }

int NsaCompressAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *extra) {
  constexpr Layout at{0, 1, 2, 3, 4, 5, 6, 7};
  CompressAttentionProblem p;
  NsaError err = build(at, nparam, ndims, shapes, dtypes, params, extra, &p);
  if (err.status == ms_nsa::kOk &&
      (nparam < 12 || !has_shape(ndims[8], shapes[8], p.q_tokens, p.q_heads, 8) ||
       !has_shape(ndims[10], shapes[10], p.q_tokens, p.q_heads, p.v_head_dim) ||
       !has_shape(ndims[11], shapes[11], p.q_tokens, p.kv_heads, p.select_block_count))) {
    err = {ms_nsa::kBadProblem, "the outputs must be softmax_max/sum [T1, N1, 8], attention_out [T1, N1, Dv] "
                                "and topk_indices [T1, N2, select_block_count]"};
  }
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kForwardName, err);
  return ms_nsa::aot::report(kForwardName, ms_nsa::compress_attention_forward(
      p, params[0], params[1], params[2], static_cast<float *>(params[8]), static_cast<float *>(params[9]),
      params[10], static_cast<int32_t *>(params[11])));
}

int NsaCompressAttentionGradInit(int *, int64_t **, const char **, AotExtra *extra) {
  return read_attrs(extra, false);
}

int NsaCompressAttentionGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *extra) {
  constexpr Layout at{0, 1, 2, 7, -1, 8, 9, -1};
  CompressAttentionProblem p;
  NsaError err = build(at, nparam, ndims, shapes, dtypes, params, extra, &p);
  if (err.status == ms_nsa::kOk &&
      (nparam < 13 || !has_shape(ndims[3], shapes[3], p.q_tokens, p.q_heads, p.v_head_dim) ||
       !has_shape(ndims[4], shapes[4], p.q_tokens, p.q_heads, p.v_head_dim) ||
       !has_shape(ndims[5], shapes[5], p.q_tokens, p.q_heads, 8) ||
       !has_shape(ndims[6], shapes[6], p.q_tokens, p.q_heads, 8))) {
    err = {ms_nsa::kBadProblem, "attention_out and grad must be [T1, N1, Dv], softmax_max/sum [T1, N1, 8]"};
  }
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kBackwardName, err);
  return ms_nsa::aot::report(kBackwardName, ms_nsa::compress_attention_backward(
      p, params[0], params[1], params[2], params[3], params[4], static_cast<const float *>(params[5]),
      static_cast<const float *>(params[6]), params[10], params[11], params[12]));
}

}  // extern "C"
