// MindSpore AOT entry points for the CPU backend: unpack MindSpore's (params, shapes, dtypes) calling
// convention into an NsaProblem and call the math core. No math lives here.
//
// Inputs follow the aclnn argument order of ops_yaml/ (tensors only; the reserved atten_mask is not
// passed and the cumulative lengths arrive as 1-D int64 tensors), then the outputs:
//   NsaSelectAttention:      query key value topk_indices actual_seq_qlen actual_seq_kvlen
//                            -> softmax_max softmax_sum attention_out
//   NsaSelectAttentionGrad:  query key value attention_out grad softmax_max softmax_sum topk_indices
//                            actual_seq_qlen actual_seq_kvlen -> dq dk dv
// Attributes (read once per shape in the *Init functions): scale_value, head_num, sparse_mode,
// select_block_size, select_block_count.
#include <cstring>
#include <string>

#include "aot_common.h"
#include "aot_extra.h"
#include "nsa_core.h"

namespace {

using mindspore::AotExtra;
using mindspore::AotKernelData;
using ms_nsa::DType;
using ms_nsa::NsaError;
using ms_nsa::NsaProblem;

struct NsaAttrs : public AotKernelData {
  float scale_value = 1.0f;
  int64_t head_num = 0;
  int64_t sparse_mode = 0;
  int64_t select_block_size = 0;
  int64_t select_block_count = 0;
};

using ms_nsa::aot::report;

constexpr const char *kForwardName = "nsa_select_attention";
constexpr const char *kBackwardName = "nsa_select_attention_grad";

int read_attrs(AotExtra *extra) {
  auto *attrs = new NsaAttrs;
  attrs->scale_value = extra->GetAttrFloat("scale_value");
  attrs->head_num = extra->GetAttrInt("head_num");
  attrs->sparse_mode = extra->GetAttrInt("sparse_mode");
  attrs->select_block_size = extra->GetAttrInt("select_block_size");
  attrs->select_block_count = extra->GetAttrInt("select_block_count");
  extra->SetKernelData(attrs);
  return 0;
}

// Positions of the tensors the problem is read from, in each op's parameter list.
struct Layout {
  int query, key, value, topk, cu_q, cu_kv;
};

NsaError build_problem(const Layout &at, int nparam, int *ndims, int64_t **shapes, const char **dtypes,
                       void **params, void *extra, NsaProblem *p) {
  const auto *attrs = static_cast<const NsaAttrs *>(static_cast<AotExtra *>(extra)->KernelData());
  if (attrs == nullptr) return {ms_nsa::kInternal, "kernel attributes were not initialised"};
  if (nparam <= at.cu_kv || ndims[at.query] != 3 || ndims[at.key] != 3 || ndims[at.value] != 3 ||
      ndims[at.topk] != 3 || ndims[at.cu_q] != 1 || ndims[at.cu_kv] != 1) {
    return {ms_nsa::kBadProblem, "query, key, value and topk_indices must be 3-D (TND), "
                                 "actual_seq_qlen and actual_seq_kvlen 1-D"};
  }
  const NsaError dtype_error = ms_nsa::aot::read_dtype("query", dtypes[at.query], &p->dtype);
  if (dtype_error.status != ms_nsa::kOk) return dtype_error;
  ms_nsa::aot::read_attention_shapes(shapes, at.query, at.key, at.value, p);
  p->batch_count = shapes[at.cu_q][0];
  p->cu_seqlens_q = static_cast<const int64_t *>(params[at.cu_q]);
  p->cu_seqlens_kv = static_cast<const int64_t *>(params[at.cu_kv]);
  p->select_block_size = attrs->select_block_size;
  p->select_block_count = attrs->select_block_count;
  p->scale_value = attrs->scale_value;
  p->mask = attrs->sparse_mode == 2 ? ms_nsa::MaskRule::kCausal : ms_nsa::MaskRule::kNone;
  // The Python layer checks all of this against ops_yaml/ before the op is built; these guard the
  // pointer arithmetic below should the kernel ever be called some other way.
  const bool consistent =
      attrs->head_num == p->q_heads && shapes[at.key][2] == p->qk_head_dim &&
      shapes[at.value][0] == p->kv_tokens && shapes[at.value][1] == p->kv_heads &&
      shapes[at.topk][0] == p->q_tokens && shapes[at.topk][1] == p->kv_heads &&
      shapes[at.topk][2] == p->select_block_count && shapes[at.cu_kv][0] == p->batch_count &&
      (attrs->sparse_mode == 0 || attrs->sparse_mode == 2) &&
      std::strcmp(dtypes[at.topk], "int32") == 0 && std::strcmp(dtypes[at.cu_q], "int64") == 0 &&
      std::strcmp(dtypes[at.cu_kv], "int64") == 0;
  if (!consistent) {
    return {ms_nsa::kBadProblem, "shapes, dtypes or attributes of the inputs disagree with each other "
                                 "(head_num, topk_indices shape, cumulative-length dtypes or sparse_mode)"};
  }
  return {};
}

bool has_shape(int ndim, const int64_t *shape, const int64_t (&want)[3]) {
  return ndim == 3 && shape[0] == want[0] && shape[1] == want[1] && shape[2] == want[2];
}

}  // namespace

extern "C" {

int NsaSelectAttentionInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra); }

int NsaSelectAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                       void * /*stream*/, void *extra) {
  constexpr Layout at{0, 1, 2, 3, 4, 5};
  NsaProblem p;
  NsaError err = build_problem(at, nparam, ndims, shapes, dtypes, params, extra, &p);
  if (err.status != ms_nsa::kOk) return report(kForwardName, err);
  return report(kForwardName, ms_nsa::nsa_forward(p, params[0], params[1], params[2],
                                    static_cast<const int32_t *>(params[3]),
                                    static_cast<float *>(params[6]), static_cast<float *>(params[7]),
                                    params[8]));
}

int NsaSelectAttentionGradInit(int *, int64_t **, const char **, AotExtra *extra) {
  return read_attrs(extra);
}

int NsaSelectAttentionGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void * /*stream*/, void *extra) {
  constexpr Layout at{0, 1, 2, 7, 8, 9};
  NsaProblem p;
  NsaError err = build_problem(at, nparam, ndims, shapes, dtypes, params, extra, &p);
  if (err.status != ms_nsa::kOk) return report(kBackwardName, err);
  const int64_t out_shape[3] = {p.q_tokens, p.q_heads, p.v_head_dim};
  const int64_t stat_shape[3] = {p.q_tokens, p.q_heads, ms_nsa::kSoftmaxStatWidth};
  if (nparam < 13 || !has_shape(ndims[3], shapes[3], out_shape) ||
      !has_shape(ndims[4], shapes[4], out_shape) || !has_shape(ndims[5], shapes[5], stat_shape) ||
      !has_shape(ndims[6], shapes[6], stat_shape)) {
    return report(kBackwardName, {ms_nsa::kBadProblem, "attention_out and grad must be [T1, N1, Dv] and "
                                                      "softmax_max, softmax_sum [T1, N1, 8]"});
  }
  return report(kBackwardName, ms_nsa::nsa_backward(p, params[0], params[1], params[2], params[3], params[4],
                                     static_cast<const float *>(params[5]),
                                     static_cast<const float *>(params[6]),
                                     static_cast<const int32_t *>(params[7]), params[10], params[11],
                                     params[12]));
}

// ms_nsa.check_inputs: the kernels' own data checks (lengths, KV lengths, every index) on host arrays,
// without MindSpore. sizes = {T1, T2, N1, N2, D, Dv, B}. Returns the status and records the message
// (read it with ms_nsa_last_error_message); never throws, since ctypes cannot catch an exception.
int ms_nsa_validate(const int64_t *sizes, const int64_t *cu_seqlens_q, const int64_t *cu_seqlens_kv,
                    int64_t select_block_size, int64_t select_block_count, int causal,
                    const int32_t *topk_indices) {
  NsaProblem p;
  p.q_tokens = sizes[0];
  p.kv_tokens = sizes[1];
  p.q_heads = sizes[2];
  p.kv_heads = sizes[3];
  p.qk_head_dim = sizes[4];
  p.v_head_dim = sizes[5];
  p.batch_count = sizes[6];
  p.cu_seqlens_q = cu_seqlens_q;
  p.cu_seqlens_kv = cu_seqlens_kv;
  p.select_block_size = select_block_size;
  p.select_block_count = select_block_count;
  p.mask = causal != 0 ? ms_nsa::MaskRule::kCausal : ms_nsa::MaskRule::kNone;
  const NsaError err = ms_nsa::nsa_validate(p, topk_indices);
  ms_nsa::aot::record(err);
  return err.status;
}

}  // extern "C"
