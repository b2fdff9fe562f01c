"""nsa_window_attention and nsa_window_attention_grad: the functional API, its CPU primitives and the Cell.

The cumulative lengths only steer the kernel (no shape depends on their values), so they may be a
tuple/list (checked in Python at once, compile time in graph mode) or a 1-D int Tensor (checked by
the kernel; new values do not recompile a graph).
"""
from __future__ import annotations

import functools

from mindspore import nn, ops

from .. import _cpu_kernels
from .._ops_common import backend_name, cpu_only
from ..functional import _cumulative, _expect_tensors, _function_name
from ..op_def import load_op_def

OP, GRAD = "nsa_window_attention", "nsa_window_attention_grad"
_ATTR_ORDER = ("scale_value", "head_num", "window_size")


def nsa_window_attention(query, key, value, scale_value, head_num, window_size, *, actual_seq_len=None):
    r"""Causal sliding-window attention over packed sequences, layout TND (NSA's window branch).

    Query t at position s of its sequence attends to the keys at positions s - window_size + 1 .. s of
    the same sequence (fewer near the start), itself included; the G = N1/N2 query heads of a KV head
    share its keys. O(T * window_size) time, no [T, w] or [T, T] intermediate. Differentiable with
    respect to query, key and value; the gradient is bitwise reproducible for any thread count.

    Args:
        query (Tensor): [T, N1, D], float16 / bfloat16 (float32 too on the CPU).
        key (Tensor): [T, N2, D], query's dtype (the same tokens: self-attention).
        value (Tensor): [T, N2, Dv], query's dtype.
        scale_value (float): multiplies the scores, usually D ** -0.5.
        head_num (int): must equal N1.
        window_size (int): w >= 1, the keys each query sees, itself included.
        actual_seq_len (tuple/list of int or 1-D int Tensor, optional): cumulative sequence lengths of
            the packed batch, last entry T (per-sequence lengths 300, 212 are given as (300, 512)).
            None means one sequence. No attention crosses a sequence boundary.

    Returns:
        (attention_out [T, N1, Dv] in query's dtype, softmax_max [T, N1, 8] float32, softmax_sum
        [T, N1, 8] float32): each row's score max and sum of exp(score - max), as flash attention
        stores them.
    """
    _expect_tensors(OP, query, key, value)
    op = _forward_op(scale_value, head_num, window_size, backend_name())
    lengths = _cumulative(actual_seq_len, query.shape[0], "actual_seq_len", OP)
    softmax_max, softmax_sum, attention_out = op(query, key, value, lengths)
    return attention_out, softmax_max, softmax_sum


def nsa_window_attention_grad(grad, query, key, value, attention_out, softmax_max, softmax_sum, scale_value,
                              head_num, window_size, *, actual_seq_len=None):
    r"""Gradient of :func:`nsa_window_attention`: returns (dq, dk, dv) in query's dtype.

    `grad` is the gradient of the loss with respect to attention_out; attention_out, softmax_max and
    softmax_sum are the forward's outputs for the same inputs. Other arguments as in the forward.
    """
    _expect_tensors(GRAD, grad, query, key, value, attention_out, softmax_max, softmax_sum)
    op = _grad_op(scale_value, head_num, window_size, backend_name())
    lengths = _cumulative(actual_seq_len, query.shape[0], "actual_seq_len", GRAD)
    return op(query, key, value, attention_out, grad, softmax_max, softmax_sum, lengths)


class NsaWindowAttention(nn.Cell):
    r"""Causal sliding-window attention as a Cell: returns attention_out [T, N1, Dv].

    Args:
        head_num (int): N1, the number of query heads.
        window_size (int): keys each query sees, itself included (>= 1).
        scale_value (float, optional): score scale; None means D ** -0.5 with D the query head dim.

    Inputs:
        query [T, N1, D], key [T, N2, D], value [T, N2, Dv], and optionally actual_seq_len
        (cumulative sequence lengths, tuple or 1-D int Tensor).

    Gradients reach query, key and value through the op's bprop (the gradient kernel).
    """

    def __init__(self, head_num, window_size, scale_value=None):
        super().__init__()
        attrs = dict(head_num=head_num, window_size=window_size)
        if scale_value is not None:
            attrs["scale_value"] = scale_value
        load_op_def(OP).check_attrs(attrs, backend_name())
        self.head_num = head_num
        self.window_size = window_size
        self.scale_value = None if scale_value is None else float(scale_value)

    def construct(self, query, key, value, actual_seq_len=None):
        scale_value = self.scale_value
        if scale_value is None:
            scale_value = query.shape[-1] ** -0.5
        attention_out, _, _ = nsa_window_attention(query, key, value, scale_value, self.head_num, self.window_size,
                                                   actual_seq_len=actual_seq_len)
        return attention_out

    def extend_repr(self):
        return f"head_num={self.head_num}, window_size={self.window_size}, scale_value={self.scale_value}"


def _attrs(op_name, scale_value, head_num, window_size):
    return load_op_def(op_name).check_attrs(dict(scale_value=scale_value, head_num=head_num,
                                                 window_size=window_size), "cpu")


# Factories are lru_cache objects: graph mode runs them at compile time (constant arguments).
@functools.lru_cache(maxsize=None, typed=True)
def _grad_op(scale_value, head_num, window_size, backend):
    cpu_only(_function_name(GRAD), backend)
    return _cpu_kernels.build_op(load_op_def(GRAD), _attrs(GRAD, scale_value, head_num, window_size))


@functools.lru_cache(maxsize=None, typed=True)
def _forward_op(scale_value, head_num, window_size, backend):
    cpu_only(_function_name(OP), backend)
    attrs = _attrs(OP, scale_value, head_num, window_size)
    backward = _grad_op(*(attrs[name] for name in _ATTR_ORDER), backend)

    # Gradients flow into query, key and value; the statistics' incoming gradients are ignored (they
    # are not differentiated) and the lengths get zeros.
    def bprop(query, key, value, actual_seq_len, out, dout):
        softmax_max, softmax_sum, attention_out = out
        dq, dk, dv = backward(query, key, value, attention_out, dout[2], softmax_max, softmax_sum, actual_seq_len)
        return dq, dk, dv, ops.zeros_like(actual_seq_len)

    return _cpu_kernels.build_op(load_op_def(OP), attrs, bprop=bprop)
