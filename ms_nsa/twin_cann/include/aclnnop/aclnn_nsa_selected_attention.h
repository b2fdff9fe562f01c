/* The prototypes of CANN's aclnn_nsa_selected_attention.h (ops-transformer,
 * attention/nsa_selected_attention; spec §5), typed out by hand for the Ascend twin's stand-in. */
#ifndef MS_NSA_TWIN_ACLNN_NSA_SELECTED_ATTENTION_H_
#define MS_NSA_TWIN_ACLNN_NSA_SELECTED_ATTENTION_H_
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;

aclnnStatus aclnnNsaSelectedAttentionGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *topkIndices,
    const aclTensor *attenMaskOptional, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualSeqKvLenOptional, double scaleValue, int64_t headNum, char *inputLayout,
    int64_t sparseMode, int64_t selectedBlockSize, int64_t selectedBlockCount,
    const aclTensor *softmaxMaxOut, const aclTensor *softmaxSumOut, const aclTensor *attentionOut,
    uint64_t *workspaceSize, aclOpExecutor **executor);

aclnnStatus aclnnNsaSelectedAttention(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                      const aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
