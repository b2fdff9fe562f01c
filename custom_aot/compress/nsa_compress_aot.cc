// MindSpore AOT entry points of nsa_compress and its gradient: unpack (params, shapes, dtypes) into a
// CompressProblem and call the core. Inputs in ops_yaml/ order, lengths as 1-D int64 tensors:
//   NsaCompress:      input weight actual_seq_len -> output
//   NsaCompressGrad:  output_grad input weight actual_seq_len -> input_grad weight_grad
// Attributes (read once per shape in *Init): compress_block_size, compress_stride.
#include <string>

#include "aot_common.h"
#include "aot_extra.h"
#include "compress/nsa_compress.h"

namespace {

using mindspore::AotExtra;
using ms_nsa::CompressProblem;
using ms_nsa::NsaError;

struct CompressAttrs : public mindspore::AotKernelData {
  int64_t block = 0, stride = 0;
};

int read_attrs(AotExtra *extra) {
  auto *attrs = new CompressAttrs;
  attrs->block = extra->GetAttrInt("compress_block_size");
  attrs->stride = extra->GetAttrInt("compress_stride");
  extra->SetKernelData(attrs);
  return 0;
}

// `input`, `weight`, `lengths` and `out_rows` index params; out_rows is the tensor whose first
// dimension is the window count (the output, or the incoming gradient).
NsaError build(int nparam, int *ndims, int64_t **shapes, const char **dtypes, void **params, void *extra,
               int input, int weight, int lengths, int out_rows, CompressProblem *p) {
  const auto *attrs = static_cast<const CompressAttrs *>(static_cast<AotExtra *>(extra)->KernelData());
  if (attrs == nullptr) return {ms_nsa::kInternal, "kernel attributes were not initialised"};
  if (nparam <= lengths || nparam <= out_rows || ndims[input] != 3 || ndims[weight] != 2 || ndims[lengths] != 1 ||
      ndims[out_rows] != 3) {
    return {ms_nsa::kBadProblem, "input must be 3-D (TND), weight 2-D and actual_seq_len 1-D"};
  }
  const NsaError dtype_error = ms_nsa::aot::read_dtype("input", dtypes[input], &p->dtype);
  if (dtype_error.status != ms_nsa::kOk) return dtype_error;
  p->tokens = shapes[input][0];
  p->heads = shapes[input][1];
  p->head_dim = shapes[input][2];
  p->batch_count = shapes[lengths][0];
  p->cu_seqlens = static_cast<const int64_t *>(params[lengths]);
  p->block = attrs->block;
  p->stride = attrs->stride;
  p->windows = shapes[out_rows][0];
  const bool consistent = shapes[weight][0] == p->block && shapes[weight][1] == p->heads &&
                          shapes[out_rows][1] == p->heads && shapes[out_rows][2] == p->head_dim &&
                          ms_nsa::aot::is_dtype(dtypes[weight], dtypes[input]) &&
                          ms_nsa::aot::is_dtype(dtypes[out_rows], dtypes[input]) &&
                          ms_nsa::aot::is_dtype(dtypes[lengths], "int64");
  if (!consistent) {
    return {ms_nsa::kBadProblem, "weight must be [compress_block_size, N], the compressed tensor [windows, N, D], "
                                 "all of input's dtype, and actual_seq_len int64"};
  }
  return {};
}

constexpr const char *kForwardName = "nsa_compress";
constexpr const char *kBackwardName = "nsa_compress_grad";

}  // namespace

extern "C" {

int NsaCompressInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra); }

int NsaCompress(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *extra) {
  CompressProblem p;
  const NsaError err = build(nparam, ndims, shapes, dtypes, params, extra, 0, 1, 2, 3, &p);
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kForwardName, err);
  return ms_nsa::aot::report(kForwardName, ms_nsa::compress_forward(p, params[0], params[1], params[3]));
}

int NsaCompressGradInit(int *, int64_t **, const char **, AotExtra *extra) { return read_attrs(extra); }

int NsaCompressGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *extra) {
  CompressProblem p;
  NsaError err = build(nparam, ndims, shapes, dtypes, params, extra, 1, 2, 3, 0, &p);
  if (err.status == ms_nsa::kOk && (nparam < 6 || ndims[4] != 3 || ndims[5] != 2 ||
                                    shapes[4][0] != p.tokens || shapes[5][0] != p.block)) {
    err = {ms_nsa::kBadProblem, "input_grad and weight_grad must have the shapes of input and weight"};
  }
  if (err.status != ms_nsa::kOk) return ms_nsa::aot::report(kBackwardName, err);
  return ms_nsa::aot::report(kBackwardName, ms_nsa::compress_backward(p, params[0], params[1], params[2],
                                                                       params[4], params[5]));
}

}  // extern "C"
