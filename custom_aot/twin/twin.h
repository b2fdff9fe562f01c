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
#include <string>

#include "acl/acl_base.h"
#include "aot_extra.h"

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
