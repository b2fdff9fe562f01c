// The Ascend twin (docs/ascend.md): the Ascend backend's Custom ops, compiled by MindSpore for the CPU
// device target, reach the same MindSpore-generated aclnn callback and a stand-in for CANN's aclnn
// library. This header is the shared part of every op's stand-in and of the CPU-convention shim.
//
// - aclTensor / aclIntArray / aclOpExecutor: the minimal handle types the stand-in needs (opaque CANN
//   objects in the real library).
// - The record: every argument every stand-in GetWorkspaceSize receives, one text line each, so tests
//   can assert counts, types and values position by position.
// - MS_NSA_TWIN_ENTRY: the CPU AOT entry point (and its Init) of one aclnn op, generic over the op.
#ifndef MS_NSA_TWIN_TWIN_H_
#define MS_NSA_TWIN_TWIN_H_

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "acl/acl_base.h"
#include "aot_extra.h"
#include "nsa_status.h"

struct aclTensor {
  void *data;
  const char *dtype;     // MindSpore's dtype name: "float16", "int32", ...
  int64_t ndim;
  const int64_t *shape;
};

struct aclIntArray {
  const int64_t *values;
  int64_t size;
};

// What GetWorkspaceSize hands to the launch: the op's work, bound to its arguments.
struct aclOpExecutor {
  std::function<aclnnStatus()> run;
};

namespace ms_nsa::twin {

// The record of aclnn calls: "call <name>" then one line per argument.
void record(const std::string &line);
void record_call(const char *aclnn_name);
void record_tensor(const aclTensor *tensor);   // "tensor <dtype> <d0>x<d1>..." or "null"
void record_int_array(const aclIntArray *array);  // "int_array 3,7" or "null"
void record_double(double value);              // "double <%.17g>"
void record_int(int64_t value);                // "int <v>"
void record_str(const char *value);            // "str <s>" or "null"
void record_tail(uint64_t *workspace_size, aclOpExecutor **executor);  // "workspace_size", "executor"

// A failed stand-in call: recorded as "error <message>" and returned as a non-zero status.
aclnnStatus fail(const std::string &message);

// The executor GetWorkspaceSize hands out: `work` (the CPU core on the bound arguments), run by launch(),
// which also frees it; a core error is recorded and returned as a non-zero status.
aclOpExecutor *executor_for(std::function<NsaError()> work);
aclnnStatus launch(aclOpExecutor *executor);

// The argument values a stand-in reads: a tensor's dtype is one of `names`; an int array's values.
bool has_dtype(const aclTensor *tensor, std::initializer_list<const char *> names);
std::vector<int64_t> values(const aclIntArray *array);
// The longest batch of cumulative lengths.
int64_t longest_batch(const std::vector<int64_t> &cumulative);

// CANN's softmax_max / softmax_sum layout (NsaCompressAttention, and flash attention's TND default):
// batch after batch [N1, S1_b, 8]; ms_nsa's CPU core writes and reads [T1, N1, 8] in query row order.
// ops-transformer attention/nsa_compress_attention/op_kernel/nsa_compress_attention_var_len_score_sab.h
// (ComputeBmm1Tail, softmaxMaxOffset) and attention/flash_attention_score/op_kernel/
// flash_attention_score_s1s2_bn2gs1_sab.h (softmaxMaxOffset when tndSoftmaxOut is 0).
void softmax_rows_to_cann(const std::vector<int64_t> &cu_q, int64_t heads, const float *rows, float *cann);
void softmax_cann_to_rows(const std::vector<int64_t> &cu_q, int64_t heads, const float *cann, float *rows);

using GetWorkspaceSizeFn = void *;  // the aclnn op's GetWorkspaceSize, passed untyped to the callback
using LaunchFn = aclnnStatus (*)(void *, uint64_t, aclOpExecutor *, aclrtStream);

int shim_init(mindspore::AotExtra *extra, GetWorkspaceSizeFn get_workspace_size, LaunchFn launch);
int shim_run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra);

}  // namespace ms_nsa::twin

// The CPU AOT entry `entry` (and `entry`Init) that runs aclnn op `aclnn` through the generated callback.
#define MS_NSA_TWIN_ENTRY(entry, aclnn)                                                                 \
  extern "C" int entry##Init(int *, int64_t **, const char **, mindspore::AotExtra *extra) {            \
    return ms_nsa::twin::shim_init(extra, reinterpret_cast<void *>(&aclnn##GetWorkspaceSize), &aclnn);  \
  }                                                                                                     \
  extern "C" int entry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,    \
                       void *stream, void *extra) {                                                     \
    return ms_nsa::twin::shim_run(nparam, params, ndims, shapes, dtypes, stream, extra);                \
  }

#endif  // MS_NSA_TWIN_TWIN_H_
