/* The prototypes of CANN's aclnn_nsa_selected_attention_grad.h (ops-transformer,
 * attention/nsa_selected_attention_grad; spec §5), typed out by hand for the Ascend twin's stand-in. */
#ifndef MS_NSA_TWIN_ACLNN_NSA_SELECTED_ATTENTION_GRAD_H_
#define MS_NSA_TWIN_ACLNN_NSA_SELECTED_ATTENTION_GRAD_H_
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;

aclnnStatus aclnnNsaSelectedAttentionGradGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *attentionOut,
    const aclTensor *attentionOutGrad, const aclTensor *softmaxMax, const aclTensor *softmaxSum,
    const aclTensor *topkIndices, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualSeqKvLenOptional, const aclTensor *attenMaskOptional, double scaleValue,
    int64_t selectedBlockSize, int64_t selectedBlockCount, int64_t headNum, char *inputLayout,
    int64_t sparseMode, aclTensor *dqOut, aclTensor *dkOut, aclTensor *dvOut,
    uint64_t *workspaceSize, aclOpExecutor **executor);

aclnnStatus aclnnNsaSelectedAttentionGrad(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                          aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
