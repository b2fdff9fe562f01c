"""nsa_compress and nsa_compress_grad: the functional API and its CPU primitives (the Ascend ones are
in ascend.py; the backend is chosen per call, at compile time in graph mode).

The output length depends on the values of `actual_seq_len` (windows per segment), so the forward
takes the lengths as Python constants (tuple/list/ndarray, or None for one segment): they are part of
the primitive (a new set of lengths is a new output shape, hence a recompile in graph mode). The
gradient op's shapes are those of its inputs, so on the CPU it also takes them as a Tensor (on Ascend
CANN takes every length as a host integer array, so tuples or lists only).
"""
from __future__ import annotations

import functools

import numpy as np
from mindspore import Tensor, ops

from .. import _cpu_kernels
from .._ops_common import backend_choice, rules_for
from . import ascend
from ..functional import _constant_cumulative, _cumulative, _expect_tensors, _function_name
from ..op_def import load_op_def

OP, GRAD = "nsa_compress", "nsa_compress_grad"


def nsa_compress(input, weight, compress_block_size, compress_stride, *, actual_seq_len=None):  # noqa: A002
    r"""NSA token compression (aclnnNsaCompress), layout TND.

    Inside each packed segment, windows of `compress_block_size` (l) tokens start every
    `compress_stride` (d) tokens and never cross the segment's end; each window becomes one row,
    ``out[i, n, :] = sum_j weight[j, n] * input[start_i + j, n, :]``. A segment of length L gives
    max(0, 1 + (L - l) // d) rows (none if L < l); the segments' rows follow each other in order.
    Differentiable in input and weight.

    Args:
        input (Tensor): [T, N, D], float16 / bfloat16 (float32 too on the CPU).
        weight (Tensor): [compress_block_size, N], input's dtype.
        compress_block_size (int): l, 16..128, a multiple of 16.
        compress_stride (int): d, 16..l, a multiple of 16.
        actual_seq_len (tuple/list of int, optional): cumulative segment lengths, last entry T
            (per-segment lengths 40, 17 are given as (40, 57)). None = one segment. Not a Tensor:
            the output length depends on these values.

    Returns:
        Tensor [T_cmp, N, D] in input's dtype, T_cmp the total window count.
    """
    _expect_tensors(OP, input, weight)
    if isinstance(actual_seq_len, Tensor):
        _reject_tensor_lengths()
    lengths = _lengths(actual_seq_len, input.shape[0])
    op = _forward_op(compress_block_size, compress_stride, lengths, backend_choice())
    return op(input, weight, _constant_cumulative(lengths, input.shape[0], "actual_seq_len", OP))


def nsa_compress_grad(grad, input, weight, compress_block_size, compress_stride, *,  # noqa: A002
                      actual_seq_len=None):
    r"""Gradient of :func:`nsa_compress` (aclnnNsaCompressGrad): returns (input_grad, weight_grad).

    `grad` [T_cmp, N, D] is the gradient of the loss with respect to nsa_compress's output. Tokens in
    no window get zero gradient; overlapping windows add up. Lengths may also be a 1-D int Tensor
    here (the kernel checks them against grad's row count).
    """
    _expect_tensors(GRAD, grad, input, weight)
    if not isinstance(actual_seq_len, Tensor):
        _check_window_count(_lengths(actual_seq_len, input.shape[0]), compress_block_size, compress_stride,
                            grad.shape[0])
    op = _grad_op(compress_block_size, compress_stride, backend_choice())
    return op(grad, input, weight, _cumulative(actual_seq_len, input.shape[0], "actual_seq_len", GRAD))


def window_count(lengths, compress_block_size, compress_stride):
    """Rows nsa_compress returns for these cumulative lengths."""
    per_segment = np.diff(np.concatenate([[0], np.asarray(lengths, np.int64)]))
    return int(sum(1 + (n - compress_block_size) // compress_stride for n in per_segment
                   if n >= compress_block_size))


@functools.lru_cache(maxsize=None)
def _reject_tensor_lengths():
    raise TypeError(f"{_function_name(OP)}: actual_seq_len must be a tuple or list of ints (or None), not a Tensor: "
                    f"the number of output rows depends on its values, which a graph needs at compile time")


def _lengths(actual_seq_len, total):
    """The cumulative lengths as a checked tuple of ints (constant work in graph mode)."""
    if actual_seq_len is None:
        return (total,)
    _constant_cumulative(actual_seq_len, total, "actual_seq_len", OP)
    return tuple(int(v) for v in (actual_seq_len.tolist() if isinstance(actual_seq_len, np.ndarray)
                                  else actual_seq_len))


@functools.lru_cache(maxsize=None)
def _check_window_count(lengths, compress_block_size, compress_stride, rows):
    if isinstance(compress_block_size, int) and isinstance(compress_stride, int) and compress_stride > 0 and \
            window_count(lengths, compress_block_size, compress_stride) != rows:
        raise ValueError(f"{_function_name(GRAD)}: grad has {rows} rows but actual_seq_len = {lengths} gives "
                         f"{window_count(lengths, compress_block_size, compress_stride)} windows of "
                         f"compress_block_size = {compress_block_size} every compress_stride = {compress_stride}")


def _attrs(op_name, compress_block_size, compress_stride, backend="cpu"):
    return load_op_def(op_name).check_attrs(dict(compress_block_size=compress_block_size,
                                                 compress_stride=compress_stride), rules_for(backend))


# Factories are lru_cache objects: graph mode runs them at compile time (constant arguments). `backend`
# is cpu, ascend or ascend_twin (the Ascend ops built for the CPU target: docs/ascend.md).
@functools.lru_cache(maxsize=None, typed=True)
def _grad_op(compress_block_size, compress_stride, backend):
    if backend != "cpu":
        return ascend.grad_op(compress_block_size, compress_stride, backend == "ascend_twin")
    return _cpu_kernels.build_op(load_op_def(GRAD), _attrs(GRAD, compress_block_size, compress_stride))


def compress_rows(input, weight, compress_block_size, compress_stride, actual_seq_len, rows):  # noqa: A002
    """nsa_compress for a caller that knows the output row count from shapes alone, with the lengths
    as a 1-D int Tensor (new values do not recompile a graph). NativeSparseAttention uses it: every
    sequence length there is a multiple of compress_stride, so the count depends only on T and B.
    The kernel checks `rows` against the lengths' values (a ValueError, or a RuntimeError in graph
    mode, if they disagree). Not part of the public API."""
    _expect_tensors(OP, input, weight)
    backend = backend_choice()
    if backend != "cpu":  # CANN's op takes the lengths as a host list: Tensor lengths are the CPU kernel's
        raise NotImplementedError(f"{_function_name(OP)}: lengths as a Tensor need the CPU backend (the current one is "
                                  f"{backend!r}); CANN's aclnnNsaCompress takes them as a host list: call "
                                  f"nsa_compress with a tuple of cumulative lengths")
    op = _rows_op(compress_block_size, compress_stride, rows, backend)
    return op(input, weight, _cumulative(actual_seq_len, input.shape[0], "actual_seq_len", OP))


@functools.lru_cache(maxsize=256, typed=True)
def _forward_op(compress_block_size, compress_stride, lengths, backend):
    attrs = _attrs(OP, compress_block_size, compress_stride, backend)
    windows = window_count(lengths, attrs["compress_block_size"], attrs["compress_stride"])
    return _rows_op(attrs["compress_block_size"], attrs["compress_stride"], windows, backend)


@functools.lru_cache(maxsize=256, typed=True)
def _rows_op(compress_block_size, compress_stride, windows, backend):
    attrs = _attrs(OP, compress_block_size, compress_stride, backend)
    if backend != "cpu":
        return ascend.forward_op(attrs["compress_block_size"], attrs["compress_stride"], windows,
                                 backend == "ascend_twin")
    backward = _grad_op(attrs["compress_block_size"], attrs["compress_stride"], backend)

    def bprop(input, weight, actual_seq_len, out, dout):  # noqa: A002
        input_grad, weight_grad = backward(dout, input, weight, actual_seq_len)
        return input_grad, weight_grad, ops.zeros_like(actual_seq_len)

    return _cpu_kernels.build_op(load_op_def(OP), attrs, bprop=bprop, derived_dims={"Tc": windows})
