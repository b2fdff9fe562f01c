// The Ascend twin's stand-in for CANN's aclnnNsaCompress and aclnnNsaCompressGrad: the exact prototypes
// (ms_nsa/twin_cann/include/aclnnop/aclnn_nsa_compress*.h), a record of every argument, the host-side
// rules of CANN's docs (aclnnNsaCompress.md, aclnnNsaCompressGrad.md: TND, float16/bfloat16,
// actSeqLenType 0, N <= 128, D a multiple of 16 up to 256, l and d multiples of 16 with d <= l), and
// CANN's results computed by the CPU core (compress/nsa_compress.h): windows of l tokens every d tokens
// inside each segment of the prefix-sum lengths, none crossing a segment (op-plugin golden,
// test_npu_nsa_compress.py; the kernel's nsa_compress_seq_manager.h counts
// (sampleLen - compressBlockSize) / compressStride + 1 windows per sample).
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aclnnop/aclnn_nsa_compress.h"
#include "aclnnop/aclnn_nsa_compress_grad.h"
#include "compress/nsa_compress.h"
#include "twin.h"

namespace {

using ms_nsa::CompressProblem;
using ms_nsa::twin::executor_for;
using ms_nsa::twin::fail;
using ms_nsa::twin::launch;
using ms_nsa::twin::has_dtype;

struct Problem {
  CompressProblem p;
  std::vector<int64_t> cu;
};

// `rows` is the tensor with one row per window (output, or outputGrad).
std::string describe(const aclTensor *input, const aclTensor *weight, const aclIntArray *seq, const char *layout,
                     int64_t block, int64_t stride, int64_t seq_type, const aclTensor *rows, Problem *out) {
  if (layout == nullptr || std::strcmp(layout, "TND") != 0) return "layoutOptional must be TND";
  if (seq_type != 0) return "actSeqLenType must be 0 (prefix sums), the only mode";
  if (input == nullptr || weight == nullptr || rows == nullptr || input->ndim != 3 || weight->ndim != 2 ||
      rows->ndim != 3) {
    return "input and the windows' tensor must be 3-D (TND), weight 2-D";
  }
  if (!has_dtype(input, {"float16", "bfloat16"}) || std::strcmp(weight->dtype, input->dtype) != 0 ||
      std::strcmp(rows->dtype, input->dtype) != 0) {
    return std::string("input dtype ") + input->dtype + " must be float16 or bfloat16, shared by weight";
  }
  CompressProblem &p = out->p;
  p.dtype = std::strcmp(input->dtype, "float16") == 0 ? ms_nsa::DType::kFloat16 : ms_nsa::DType::kBFloat16;
  p.tokens = input->shape[0];
  p.heads = input->shape[1];
  p.head_dim = input->shape[2];
  if (p.heads < 1 || p.heads > 128 || p.head_dim % 16 != 0 || p.head_dim > 256) return "need N <= 128, D % 16 == 0, D <= 256";
  if (block % 16 != 0 || block < 16 || block > 128 || stride % 16 != 0 || stride < 16 || stride > block) {
    return "compressBlockSize and compressStride must be multiples of 16, 16 <= compressStride <= compressBlockSize <= 128";
  }
  if (weight->shape[0] != block || weight->shape[1] != p.heads) return "weight must be [compressBlockSize, N]";
  if (rows->shape[1] != p.heads || rows->shape[2] != p.head_dim) return "the windows' tensor must be [Tc, N, D]";
  out->cu = seq != nullptr ? ms_nsa::twin::values(seq) : std::vector<int64_t>{p.tokens};
  p.batch_count = static_cast<int64_t>(out->cu.size());
  p.cu_seqlens = out->cu.data();
  p.block = block;
  p.stride = stride;
  p.windows = rows->shape[0];
  return "";
}

}  // namespace

extern "C" {

aclnnStatus aclnnNsaCompressGetWorkspaceSize(const aclTensor *input, const aclTensor *weight,
                                             const aclIntArray *actSeqLenOptional, char *layoutOptional,
                                             int64_t compressBlockSize, int64_t compressStride, int64_t actSeqLenType,
                                             aclTensor *output, uint64_t *workspaceSize, aclOpExecutor **executor) {
  using namespace ms_nsa::twin;
  record_call("aclnnNsaCompress");
  record_tensor(input), record_tensor(weight), record_int_array(actSeqLenOptional), record_str(layoutOptional);
  record_int(compressBlockSize), record_int(compressStride), record_int(actSeqLenType);
  record_tensor(output);
  record_tail(workspaceSize, executor);
  if (workspaceSize == nullptr || executor == nullptr) return fail("missing workspace arguments");
  auto problem = std::make_shared<Problem>();
  const std::string error = describe(input, weight, actSeqLenOptional, layoutOptional, compressBlockSize,
                                     compressStride, actSeqLenType, output, problem.get());
  if (!error.empty()) return fail(error);
  const void *x = input->data, *w = weight->data;
  void *y = output->data;
  *workspaceSize = 0;
  *executor = executor_for([=]() { return ms_nsa::compress_forward(problem->p, x, w, y); });
  return 0;
}

aclnnStatus aclnnNsaCompress(void *, uint64_t, aclOpExecutor *executor, aclrtStream) { return launch(executor); }

aclnnStatus aclnnNsaCompressGradGetWorkspaceSize(const aclTensor *outputGrad, const aclTensor *input,
                                                 const aclTensor *weight, const aclIntArray *actSeqLenOptionalOptional,
                                                 int64_t compressBlockSize, int64_t compressStride,
                                                 int64_t actSeqLenType, char *layoutOptionalOptional,
                                                 const aclTensor *inputGradOut, const aclTensor *weightGradOut,
                                                 uint64_t *workspaceSize, aclOpExecutor **executor) {
  using namespace ms_nsa::twin;
  record_call("aclnnNsaCompressGrad");
  record_tensor(outputGrad), record_tensor(input), record_tensor(weight), record_int_array(actSeqLenOptionalOptional);
  record_int(compressBlockSize), record_int(compressStride), record_int(actSeqLenType);
  record_str(layoutOptionalOptional);
  record_tensor(inputGradOut), record_tensor(weightGradOut);
  record_tail(workspaceSize, executor);
  if (workspaceSize == nullptr || executor == nullptr || inputGradOut == nullptr || weightGradOut == nullptr) {
    return fail("missing output or workspace arguments");
  }
  auto problem = std::make_shared<Problem>();
  const std::string error = describe(input, weight, actSeqLenOptionalOptional, layoutOptionalOptional,
                                     compressBlockSize, compressStride, actSeqLenType, outputGrad, problem.get());
  if (!error.empty()) return fail(error);
  const void *dy = outputGrad->data, *x = input->data, *w = weight->data;
  void *dx = inputGradOut->data, *dw = weightGradOut->data;
  *workspaceSize = 0;
  *executor = executor_for([=]() { return ms_nsa::compress_backward(problem->p, dy, x, w, dx, dw); });
  return 0;
}

aclnnStatus aclnnNsaCompressGrad(void *, uint64_t, aclOpExecutor *executor, aclrtStream) { return launch(executor); }

}  // extern "C"

MS_NSA_TWIN_ENTRY(TwinNsaCompress, aclnnNsaCompress)
MS_NSA_TWIN_ENTRY(TwinNsaCompressGrad, aclnnNsaCompressGrad)
