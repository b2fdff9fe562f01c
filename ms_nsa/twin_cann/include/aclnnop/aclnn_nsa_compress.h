/* The prototypes of CANN's aclnn_nsa_compress.h (ops-transformer,
 * attention/nsa_compress/op_host/op_api/aclnn_nsa_compress.h), typed out for the Ascend twin's stand-in. */
#ifndef MS_NSA_TWIN_ACLNN_NSA_COMPRESS_H_
#define MS_NSA_TWIN_ACLNN_NSA_COMPRESS_H_
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;

aclnnStatus aclnnNsaCompressGetWorkspaceSize(
    const aclTensor *input, const aclTensor *weight, const aclIntArray *actSeqLenOptional, char *layoutOptional,
    int64_t compressBlockSize, int64_t compressStride, int64_t actSeqLenType, aclTensor *output,
    uint64_t *workspaceSize, aclOpExecutor **executor);

aclnnStatus aclnnNsaCompress(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
