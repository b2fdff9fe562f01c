"""nsa_compress_attention on Ascend: a Custom op over CANN's aclnnNsaCompressAttention, built by the shared
construction of ms_nsa/_ascend_kernels.py, and its gradient through MindSpore's own flash-attention
gradient (CANN has no gradient op for it). Nothing here has run on an NPU; MS_NSA_BACKEND=ascend_twin
runs these very ops on the CPU (docs/ascend.md).

Prototype (ops-transformer attention/nsa_compress_attention/op_host/op_api/aclnn_nsa_compress_attention.h):
    aclnnNsaCompressAttentionGetWorkspaceSize(query, key, value, attenMaskOptional, topkMaskOptional,
        actualSeqQLenOptional, actualCmpSeqKvLenOptional, actualSelSeqKvLenOptional, scaleValue, headNum,
        inputLayout, sparseMode, compressBlockSize, compressStride, selectBlockSize, selectBlockCount,
        softmaxMaxOut, softmaxSumOut, attentionOutOut, topkIndicesOut, workspaceSize, executor)

What the call adapts so that CANN computes what the CPU backend computes (docs/semantics.md):
- The masks: CANN's kernel reads atten_mask rows with a stride of the longest batch's compressed length
  and topk_mask rows with a stride of its selection-block count (nsa_compress_attention_s1s2_bn2gs1_sab.h,
  CopyInAttenMask and the top-k mask copy: `* tilingData->inputParams.s2Size`, `CeilDiv(s2Size, isM)`), and
  flash attention's gradient wants the mask exactly [max S1_b, max S2_b]. ms_nsa's rule is the mask's
  top-left corner for every batch, so the call passes that corner, atten_mask[:max S1_b, :max S_cmp_b]
  and topk_mask[:max S1_b, :max S_sel_b]: the same values for every batch, at CANN's strides.
- actual_sel_seq_kvlen: CANN takes all three length arrays; ms_nsa derives the selection-block counts
  when they are not given (and checks them when they are, as the CPU kernel does).
- softmax_max / softmax_sum: CANN writes them batch by batch as [N1, S1_b, 8]
  (nsa_compress_attention_var_len_score_sab.h, ComputeBmm1Tail: softmaxMaxOffset); ms_nsa returns them in
  query row order [T1, N1, 8], like the CPU backend (_ascend_kernels.softmax_from_cann). The bprop hands
  CANN's own buffers to the flash-attention gradient, which reads that layout.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import nn

from .. import _ascend_kernels as ascend
from .._dtypes import dtype_name
from ..op_def import load_op_def

OP, GRAD = "nsa_compress_attention", "nsa_compress_attention_grad"
ATTRS = ("scale_value", "head_num", "compress_block_size", "compress_stride", "select_block_size",
         "select_block_count")
# aclnnNsaCompressAttention doc, constraints: the compressed KV length of a batch is at most 14000.
CANN_MAX_COMPRESSED_KV = 14000


def _attrs(op_name, *values):
    return ascend.check_attrs(load_op_def(op_name), dict(zip(ATTRS, values)))


@functools.lru_cache(maxsize=1024)  # a C-level callable: graph mode calls it at compile time
def geometry(function, compress_stride, select_block_size, select_block_count, cu_q, cu_kv, cu_sel=None,
             atten_mask_shape=None, topk_mask_shape=None):
    """CANN's per-batch rules on the (constant) lengths, with the CPU kernel's messages, and what the call
    needs from them: (longest query batch, longest compressed batch, most selection blocks, the
    cumulative selection-block counts)."""
    if len(cu_q) != len(cu_kv):
        raise ValueError(f"{function}: actual_seq_qlen has {len(cu_q)} batches but actual_cmp_seq_kvlen has "
                         f"{len(cu_kv)}; they must have the same length (dimension B)")
    per_block = select_block_size // compress_stride
    q_lengths, kv_lengths = ascend.batch_lengths(cu_q), ascend.batch_lengths(cu_kv)
    blocks = tuple(-(-kv // per_block) for kv in kv_lengths)
    given = None if cu_sel is None else ascend.batch_lengths(cu_sel)
    if given is not None and len(given) != len(blocks):
        raise ValueError(f"{function}: actual_sel_seq_kvlen has {len(given)} batches but actual_cmp_seq_kvlen "
                         f"has {len(blocks)}; they must have the same length (dimension B)")
    max_q, max_kv, max_blocks = max(q_lengths), max(kv_lengths), max(blocks)
    for b, (q_len, kv_len, count) in enumerate(zip(q_lengths, kv_lengths, blocks)):
        if given is not None and given[b] != count:
            raise ValueError(f"{function}: batch {b} has {given[b]} selection blocks in actual_sel_seq_kvlen but "
                             f"{kv_len} compressed keys give ceil({kv_len} / {per_block}) = {count}")
        if q_len == 0:
            continue
        if count < select_block_count or kv_len > CANN_MAX_COMPRESSED_KV:
            raise ValueError(f"{function}: batch {b} has {kv_len} compressed keys (from actual_cmp_seq_kvlen), "
                             f"i.e. {count} selection blocks; it needs at least select_block_count = "
                             f"{select_block_count} blocks and at most {CANN_MAX_COMPRESSED_KV} compressed keys "
                             f"on Ascend")
        if atten_mask_shape is not None and (atten_mask_shape[0] < q_len or atten_mask_shape[1] < kv_len):
            raise ValueError(f"{function}: atten_mask is {list(atten_mask_shape)} but batch {b} has {q_len} queries "
                             f"and {kv_len} compressed keys; every batch uses the mask's top-left corner, so it "
                             f"must be at least [max query length, max compressed length]")
        if topk_mask_shape is not None and (topk_mask_shape[0] < q_len or topk_mask_shape[1] < count):
            raise ValueError(f"{function}: topk_mask is {list(topk_mask_shape)} but batch {b} has {q_len} queries "
                             f"and {count} selection blocks; every batch uses the mask's top-left corner, so it "
                             f"must be at least [max query length, max selection blocks]")
    cumulative, total = (), 0
    for count in blocks:
        total += count
        cumulative = cumulative + (total,)
    return max_q, max_kv, max_blocks, cumulative


class CompressAttentionCall(ascend.AclnnCall):
    """nsa_compress_attention's call: lengths checked, the masks' corners at CANN's strides, the selection
    lengths derived if absent, the statistics back in query row order (the module doc)."""

    def __init__(self, primitive, op_def, attrs, twin, has_atten_mask, has_topk_mask, has_sel_lengths):
        absent = {name: None for name, present in (("atten_mask", has_atten_mask), ("topk_mask", has_topk_mask))
                  if not present}
        super().__init__(primitive, op_def, attrs, twin, tensors=absent)
        self.rule = (op_def.python["function"], attrs["compress_stride"], attrs["select_block_size"],
                     attrs["select_block_count"])
        self.has_atten_mask, self.has_topk_mask, self.has_sel_lengths = has_atten_mask, has_topk_mask, has_sel_lengths

    def prepare(self, inputs):
        query, key, value, atten_mask, topk_mask, cu_q, cu_kv, cu_sel = inputs
        function, stride, block, count = self.rule
        max_q, max_kv, max_blocks, derived = geometry(
            function, stride, block, count, cu_q, cu_kv, cu_sel if self.has_sel_lengths else None,
            atten_mask.shape if self.has_atten_mask else None, topk_mask.shape if self.has_topk_mask else None)
        if self.has_atten_mask:
            atten_mask = atten_mask[:max_q, :max_kv]
        if self.has_topk_mask:
            topk_mask = topk_mask[:max_q, :max_blocks]
        return (query, key, value, atten_mask, topk_mask, cu_q, cu_kv, derived), cu_q

    def finish(self, outputs, cu_q):
        softmax_max, softmax_sum, attention_out, topk_indices = outputs
        return (ascend.softmax_from_cann(softmax_max, cu_q), ascend.softmax_from_cann(softmax_sum, cu_q),
                attention_out, topk_indices)


def make_bprop(flash_grad):
    """The forward primitive's bprop (its aclnn arguments, then out, dout): MindSpore's flash-attention
    gradient on the compressed K/V, TND, with the same (already cut) mask and CANN's own statistics;
    topk_indices and the statistics get no gradient, masks, lengths and scalars zeros."""

    def bprop(query, key, value, atten_mask, topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen,
              scale_value, head_num, input_layout, sparse_mode, compress_block_size, compress_stride,
              select_block_size, select_block_count, out, dout):
        softmax_max, softmax_sum, attention_out, _ = out
        dq, dk, dv, _ = flash_grad(query, key, value, dout[2], None, None, None, atten_mask, softmax_max, softmax_sum,
                                   None, attention_out, None, actual_seq_qlen, actual_cmp_seq_kvlen)
        return (dq, dk, dv) + ascend.zeros_of(atten_mask, topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen,
                                               actual_sel_seq_kvlen, scale_value, head_num, input_layout,
                                               sparse_mode, compress_block_size, compress_stride,
                                               select_block_size, select_block_count)

    return bprop


@functools.lru_cache(maxsize=None, typed=True)
def forward_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
               has_atten_mask, has_topk_mask, has_sel_lengths, twin) -> CompressAttentionCall:
    """Called with the CPU op's inputs: (query, key, value, atten_mask, topk_mask, actual_seq_qlen,
    actual_cmp_seq_kvlen, actual_sel_seq_kvlen), absent masks and lengths as placeholders."""
    op_def = load_op_def(OP)
    attrs = _attrs(OP, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                   select_block_count)
    flash_grad = ascend.flash_attention_grad(attrs["head_num"], attrs["scale_value"], has_atten_mask, twin)
    primitive = ascend.custom(op_def, attrs, twin, bprop=make_bprop(flash_grad))
    return CompressAttentionCall(primitive, op_def, attrs, twin, has_atten_mask, has_topk_mask, has_sel_lengths)


@functools.lru_cache(maxsize=256)
def _check_grad_inputs(shapes, dtypes, attrs):
    """The gradient's shape and dtype rules from its yaml (the flash-attention primitive has its own)."""
    op_def = load_op_def(GRAD)
    names = [name for name in ascend.kernel_inputs(op_def)]
    given = {name: shape for name, shape in zip(names, shapes) if shape is not None}
    op_def.bind_dims(given, dict(attrs), ascend.BACKEND)
    op_def.check_dtypes({name: dtype_name(dtype) for name, dtype in zip(names, dtypes) if dtype is not None},
                        ascend.BACKEND)


class CompressAttentionGradCall(nn.Cell):
    """nsa_compress_attention_grad on Ascend: MindSpore's flash-attention gradient, given the statistics in
    CANN's layout (the inverse of the forward's conversion) and the mask's corner."""

    def __init__(self, attrs, has_atten_mask, twin):
        super().__init__()
        self.flash_grad = ascend.flash_attention_grad(attrs["head_num"], attrs["scale_value"], has_atten_mask, twin)
        self.attrs = tuple(sorted(attrs.items()))
        self.rule = (load_op_def(GRAD).python["function"], attrs["compress_stride"], attrs["select_block_size"],
                     attrs["select_block_count"])
        self.has_atten_mask = has_atten_mask

    @ms.jit
    def construct(self, query, key, value, attention_out, grad, softmax_max, softmax_sum, atten_mask, cu_q, cu_kv):
        mask_shape = atten_mask.shape if self.has_atten_mask else None
        _check_grad_inputs((query.shape, key.shape, value.shape, attention_out.shape, grad.shape, softmax_max.shape,
                            softmax_sum.shape, mask_shape, (len(cu_q),), (len(cu_kv),)),
                           (query.dtype, key.dtype, value.dtype, attention_out.dtype, grad.dtype, softmax_max.dtype,
                            softmax_sum.dtype, atten_mask.dtype if self.has_atten_mask else None, None, None),
                           self.attrs)
        function, stride, block, count = self.rule
        max_q, max_kv, _, _ = geometry(function, stride, block, count, cu_q, cu_kv, None, mask_shape, None)
        mask = atten_mask[:max_q, :max_kv] if self.has_atten_mask else None
        dq, dk, dv, _ = self.flash_grad(query, key, value, grad, None, None, None, mask,
                                        ascend.softmax_to_cann(softmax_max, cu_q),
                                        ascend.softmax_to_cann(softmax_sum, cu_q), None, attention_out, None, cu_q,
                                        cu_kv)
        return dq, dk, dv


@functools.lru_cache(maxsize=None, typed=True)
def grad_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
            has_atten_mask, twin) -> CompressAttentionGradCall:
    """Called with the CPU op's inputs: (query, key, value, attention_out, grad, softmax_max, softmax_sum,
    atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen)."""
    attrs = _attrs(GRAD, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                   select_block_count)
    return CompressAttentionGradCall(attrs, has_atten_mask, twin)
