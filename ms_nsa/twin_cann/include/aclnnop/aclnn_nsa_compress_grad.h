/* The prototypes of CANN's aclnn_nsa_compress_grad.h (ops-transformer, attention/nsa_compress_grad: the header
 * is generated from op_host/nsa_compress_grad_def.cpp; the prototype as docs/aclnnNsaCompressGrad.md prints
 * it), typed out for the Ascend twin's stand-in. Mind the order: the layout comes after actSeqLenType. */
#ifndef MS_NSA_TWIN_ACLNN_NSA_COMPRESS_GRAD_H_
#define MS_NSA_TWIN_ACLNN_NSA_COMPRESS_GRAD_H_
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;

aclnnStatus aclnnNsaCompressGradGetWorkspaceSize(
    const aclTensor *outputGrad, const aclTensor *input, const aclTensor *weight,
    const aclIntArray *actSeqLenOptionalOptional, int64_t compressBlockSize, int64_t compressStride,
    int64_t actSeqLenType, char *layoutOptionalOptional, const aclTensor *inputGradOut,
    const aclTensor *weightGradOut, uint64_t *workspaceSize, aclOpExecutor **executor);

aclnnStatus aclnnNsaCompressGrad(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                 aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
