/* The part of CANN's acl/acl_base.h that the aclnn NSA headers and MindSpore's generated callbacks use.
 * Part of the Ascend twin's stand-in CANN tree (docs/ascend.md): not CANN, no NPU code. */
#ifndef MS_NSA_TWIN_ACL_BASE_H_
#define MS_NSA_TWIN_ACL_BASE_H_
#include <stddef.h>
#include <stdint.h>
typedef int aclnnStatus;
typedef void *aclrtStream;
#endif
