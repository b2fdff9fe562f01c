"""nsa_compress and nsa_compress_grad on Ascend: Custom ops over CANN's aclnnNsaCompress and
aclnnNsaCompressGrad, built by the shared construction of ms_nsa/_ascend_kernels.py (reg_info with every
aclnn parameter an input, the call plan, the ms.jit call, the twin). Nothing here has run on an NPU;
MS_NSA_BACKEND=ascend_twin runs these very ops on the CPU (docs/ascend.md).

Prototypes (ops-transformer attention/nsa_compress/op_host/op_api/aclnn_nsa_compress.h and
attention/nsa_compress_grad/docs/aclnnNsaCompressGrad.md; the grad header is generated from
nsa_compress_grad_def.cpp, whose attribute order puts the layout last):
    aclnnNsaCompressGetWorkspaceSize(input, weight, actSeqLenOptional, layoutOptional, compressBlockSize,
        compressStride, actSeqLenType, output, workspaceSize, executor)
    aclnnNsaCompressGradGetWorkspaceSize(outputGrad, input, weight, actSeqLenOptionalOptional,
        compressBlockSize, compressStride, actSeqLenType, layoutOptionalOptional, inputGradOut, weightGradOut,
        workspaceSize, executor)
"""
from __future__ import annotations

import functools

from .. import _ascend_kernels as ascend
from ..op_def import load_op_def

OP, GRAD = "nsa_compress", "nsa_compress_grad"


def _attrs(op_name, compress_block_size, compress_stride):
    return ascend.check_attrs(load_op_def(op_name), dict(compress_block_size=compress_block_size,
                                                          compress_stride=compress_stride))


@functools.lru_cache(maxsize=None, typed=True)
def grad_op(compress_block_size, compress_stride, twin) -> ascend.AclnnCall:
    """nsa_compress_grad: called with (grad, input, weight, actual_seq_len as a tuple)."""
    op_def = load_op_def(GRAD)
    attrs = _attrs(GRAD, compress_block_size, compress_stride)
    return ascend.AclnnCall(ascend.custom(op_def, attrs, twin), op_def, attrs, twin)


def make_bprop(grad_primitive):
    """The forward primitive's bprop (its aclnn arguments, then out, dout): aclnnNsaCompressGrad in its
    own order (the layout last); the lengths and scalars get zeros."""

    def bprop(input, weight, actual_seq_len, input_layout, compress_block_size, compress_stride,  # noqa: A002
              actual_seq_len_type, out, dout):
        input_grad, weight_grad = grad_primitive(dout, input, weight, actual_seq_len, compress_block_size,
                                                 compress_stride, actual_seq_len_type, input_layout)
        return (input_grad, weight_grad) + ascend.zeros_of(actual_seq_len, input_layout, compress_block_size,
                                                            compress_stride, actual_seq_len_type)

    return bprop


@functools.lru_cache(maxsize=256, typed=True)
def forward_op(compress_block_size, compress_stride, windows, twin) -> ascend.AclnnCall:
    """nsa_compress for one set of lengths (`windows` output rows): called with (input, weight,
    actual_seq_len as a tuple)."""
    op_def = load_op_def(OP)
    attrs = _attrs(OP, compress_block_size, compress_stride)
    backward = grad_op(attrs["compress_block_size"], attrs["compress_stride"], twin)
    primitive = ascend.custom(op_def, attrs, twin, bprop=make_bprop(backward.primitive),
                              derived_dims={"Tc": windows})
    return ascend.AclnnCall(primitive, op_def, attrs, twin)
