/* The prototypes of CANN's aclnn_nsa_compress_attention.h (ops-transformer,
 * attention/nsa_compress_attention/op_host/op_api/aclnn_nsa_compress_attention.h), typed out for the Ascend
 * twin's stand-in. */
#ifndef MS_NSA_TWIN_ACLNN_NSA_COMPRESS_ATTENTION_H_
#define MS_NSA_TWIN_ACLNN_NSA_COMPRESS_ATTENTION_H_
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;

aclnnStatus aclnnNsaCompressAttentionGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *attenMaskOptional,
    const aclTensor *topkMaskOptional, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualCmpSeqKvLenOptional, const aclIntArray *actualSelSeqKvLenOptional,
    double scaleValue, int64_t headNum, char *inputLayout, int64_t sparseMode,
    int64_t compressBlockSize, int64_t compressStride, int64_t selectBlockSize, int64_t selectBlockCount,
    const aclTensor *softmaxMaxOut, const aclTensor *softmaxSumOut, const aclTensor *attentionOutOut,
    const aclTensor *topkIndicesOut, uint64_t *workspaceSize, aclOpExecutor **executor);

aclnnStatus aclnnNsaCompressAttention(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                      const aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
