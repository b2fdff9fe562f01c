"""nsa_compress_attention and nsa_compress_attention_grad: the functional API and its CPU primitives (the
Ascend ones are in ascend.py, called with the same inputs; the backend is chosen per call, at compile
time in graph mode).

Absent optional inputs (atten_mask, topk_mask, actual_sel_seq_kvlen) are passed to the kernel as
placeholders with a has_<name> attribute, so every primitive has the same inputs and one bprop.
"""
from __future__ import annotations

import functools

from mindspore import Tensor, ops

from .. import _cpu_kernels
from .._ops_common import backend_choice, placeholder_mask
from . import ascend
from ..functional import _check_lengths_paired, _constant_cumulative, _cumulative, _expect_tensors
from ..op_def import load_op_def

OP, GRAD = "nsa_compress_attention", "nsa_compress_attention_grad"
_LENGTH_NAMES = ("actual_seq_qlen", "actual_cmp_seq_kvlen")


def nsa_compress_attention(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                           select_block_size, select_block_count, *, topk_mask=None, atten_mask=None,
                           actual_seq_qlen=None, actual_cmp_seq_kvlen=None, actual_sel_seq_kvlen=None):
    r"""NSA compressed attention with top-k block selection (aclnnNsaCompressAttention), layout TND.

    Each query row attends to its batch's compressed keys (softmax(scale * q k^T) with `atten_mask`,
    times V). The attention probabilities are mapped to selection blocks of `select_block_size` (l')
    tokens, summed over the G = N1/N2 query heads of each KV head, `topk_mask` forces blocks, and the
    `select_block_count` best blocks are returned, batch-relative, ready for nsa_select_attention.
    Differentiable in query, key and value (not through topk_indices or the statistics).

    Args:
        query (Tensor): [T1, N1, D], float16 / bfloat16 (float32 too on the CPU).
        key (Tensor): [T2, N2, D] compressed keys (e.g. nsa_compress's output), query's dtype.
        value (Tensor): [T2, N2, Dv] compressed values, Dv <= D.
        scale_value (float): multiplies the scores, usually D ** -0.5.
        head_num (int): must equal N1.
        compress_block_size (int): l used to compress the keys, 16..128, a multiple of 16.
        compress_stride (int): d, 16..64, a multiple of 16, d <= l.
        select_block_size (int): l', 16..128, a multiple of 16 and of d, l' >= l.
        select_block_count (int): blocks per query row and KV head, 1..32.
        topk_mask (Tensor, optional): [S1, S_sel] bool/uint8, True forces that block; every batch uses
            the top-left corner (rows from its first query, columns from its first block).
        atten_mask (Tensor, optional): [S1, S_cmp] bool/uint8, True masks that compressed key; every
            batch uses the top-left corner. Pass the compressed-causal mask for causal attention.
        actual_seq_qlen, actual_cmp_seq_kvlen (tuple/list of int or 1-D int Tensor, optional):
            cumulative query and compressed-key lengths per batch; both or neither (one batch).
        actual_sel_seq_kvlen (optional): cumulative selection-block counts, each batch's
            ceil(compressed length / (l'/d)); checked if given, derived if not.

    Returns:
        (attention_out [T1, N1, Dv] in query's dtype, topk_indices [T1, N2, select_block_count]
        int32, softmax_max [T1, N1, 8] float32, softmax_sum [T1, N1, 8] float32).
    """
    _expect_tensors(OP, query, key, value)
    op = _forward_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                     select_block_count, atten_mask is not None, topk_mask is not None,
                     actual_sel_seq_kvlen is not None, backend_choice())
    cu_q, cu_kv = _lengths(actual_seq_qlen, actual_cmp_seq_kvlen, query.shape[0], key.shape[0], OP)
    cu_sel = cu_kv if actual_sel_seq_kvlen is None else _selection_lengths(actual_sel_seq_kvlen)
    atten_mask = placeholder_mask() if atten_mask is None else atten_mask
    topk_mask = placeholder_mask() if topk_mask is None else topk_mask
    softmax_max, softmax_sum, attention_out, topk_indices = op(query, key, value, atten_mask, topk_mask, cu_q, cu_kv,
                                                               cu_sel)
    return attention_out, topk_indices, softmax_max, softmax_sum


def nsa_compress_attention_grad(grad, query, key, value, attention_out, softmax_max, softmax_sum, scale_value,
                                head_num, compress_block_size, compress_stride, select_block_size,
                                select_block_count, *, atten_mask=None, actual_seq_qlen=None,
                                actual_cmp_seq_kvlen=None):
    r"""Gradient of :func:`nsa_compress_attention` with respect to query, key and value: (dq, dk, dv).

    Softmax-attention backward over the compressed keys with the same mask (torch_npu differentiates
    the op this way; CANN has no gradient op for it). `grad` is the gradient of the loss with respect
    to attention_out; attention_out and the statistics are the forward's. dk/dv are bitwise
    reproducible for any thread count.
    """
    _expect_tensors(GRAD, grad, query, key, value, attention_out, softmax_max, softmax_sum)
    op = _grad_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
                  atten_mask is not None, backend_choice())
    cu_q, cu_kv = _lengths(actual_seq_qlen, actual_cmp_seq_kvlen, query.shape[0], key.shape[0], GRAD)
    atten_mask = placeholder_mask() if atten_mask is None else atten_mask
    return op(query, key, value, attention_out, grad, softmax_max, softmax_sum, atten_mask, cu_q, cu_kv)


def _lengths(actual_seq_qlen, actual_cmp_seq_kvlen, q_tokens, kv_tokens, op_name):
    _check_lengths_paired(actual_seq_qlen is None, actual_cmp_seq_kvlen is None, op_name, _LENGTH_NAMES)
    return (_cumulative(actual_seq_qlen, q_tokens, _LENGTH_NAMES[0], op_name),
            _cumulative(actual_cmp_seq_kvlen, kv_tokens, _LENGTH_NAMES[1], op_name))


def _selection_lengths(lengths):
    """Checked for form here; their agreement with the compressed lengths is checked by the kernel."""
    if isinstance(lengths, Tensor):
        return _cumulative(lengths, 0, "actual_sel_seq_kvlen", OP)
    return _constant_cumulative(lengths, _last(lengths), "actual_sel_seq_kvlen", OP)


def _last(lengths):
    return lengths[-1] if isinstance(lengths, (tuple, list)) and lengths else 0


def _attrs(op_name, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
           select_block_count):
    return load_op_def(op_name).check_attrs(dict(
        scale_value=scale_value, head_num=head_num, compress_block_size=compress_block_size,
        compress_stride=compress_stride, select_block_size=select_block_size,
        select_block_count=select_block_count), "cpu")


_ATTR_ORDER = ("scale_value", "head_num", "compress_block_size", "compress_stride", "select_block_size",
               "select_block_count")


# Factories are lru_cache objects: graph mode runs them at compile time (constant arguments). `backend`
# is cpu, ascend or ascend_twin (the Ascend ops built for the CPU target: docs/ascend.md).
@functools.lru_cache(maxsize=None, typed=True)
def _grad_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
             has_atten_mask, backend):
    if backend != "cpu":
        return ascend.grad_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                              select_block_count, has_atten_mask, backend == "ascend_twin")
    attrs = _attrs(GRAD, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                   select_block_count)
    return _cpu_kernels.build_op(load_op_def(GRAD), attrs, absent=() if has_atten_mask else ("atten_mask",),
                                 flags={"has_atten_mask": has_atten_mask})


@functools.lru_cache(maxsize=None, typed=True)
def _forward_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
                has_atten_mask, has_topk_mask, has_sel_lengths, backend):
    if backend != "cpu":
        return ascend.forward_op(scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                                 select_block_count, has_atten_mask, has_topk_mask, has_sel_lengths,
                                 backend == "ascend_twin")
    attrs = _attrs(OP, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                   select_block_count)
    backward = _grad_op(*(attrs[name] for name in _ATTR_ORDER), has_atten_mask, backend)

    # Gradients flow into query, key and value; topk_indices and the statistics get none (their
    # incoming gradients are ignored), masks and lengths get zeros.
    def bprop(query, key, value, atten_mask, topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen,
              out, dout):
        softmax_max, softmax_sum, attention_out, _ = out
        dq, dk, dv = backward(query, key, value, attention_out, dout[2], softmax_max, softmax_sum, atten_mask,
                              actual_seq_qlen, actual_cmp_seq_kvlen)
        return (dq, dk, dv, ops.zeros_like(atten_mask), ops.zeros_like(topk_mask), ops.zeros_like(actual_seq_qlen),
                ops.zeros_like(actual_cmp_seq_kvlen), ops.zeros_like(actual_sel_seq_kvlen))

    absent = tuple(name for name, present in (("atten_mask", has_atten_mask), ("topk_mask", has_topk_mask),
                                              ("actual_sel_seq_kvlen", has_sel_lengths)) if not present)
    flags = {"has_atten_mask": has_atten_mask, "has_topk_mask": has_topk_mask,
             "has_actual_sel_seq_kvlen": has_sel_lengths}
    return _cpu_kernels.build_op(load_op_def(OP), attrs, bprop=bprop, absent=absent, flags=flags)


