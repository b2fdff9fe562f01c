"""The functional API: `nsa_select_attention` and `nsa_select_attention_grad`.

These bodies run as plain Python in PyNative mode and are compiled by MindSpore in GRAPH_MODE or
inside `@ms.jit`, so they stay within what the graph compiler parses: helpers that take only Python
constants (attributes, shapes, dtypes, tuples of lengths) are evaluated at compile time, and the work
on tensors is a cast and one primitive call. Helpers that do real Python work are lru_cache objects (or
take only constants), which the graph compiler runs instead of parsing.
"""
from __future__ import annotations

import functools

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from . import _backend, _cpu_kernels
from .op_def import BACKWARD, FORWARD, load_op_def


def nsa_select_attention(query, key, value, topk_indices, scale_value, head_num, select_block_size,
                         select_block_count, *, atten_mask=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0):
    r"""NSA selected attention (the selection branch of Native Sparse Attention), layout TND.

    Each query row attends to `select_block_count` blocks of `select_block_size` keys chosen by
    `topk_indices` (block numbers relative to the start of the row's batch). The G = N1/N2 query heads
    of a KV head share one selection. Differentiable with respect to query, key and value.

    Args:
        query (Tensor): [T1, N1, D], float16 / bfloat16 (float32 too on the CPU).
        key (Tensor): [T2, N2, D], same dtype as query.
        value (Tensor): [T2, N2, Dv], same dtype, Dv <= D.
        topk_indices (Tensor): [T1, N2, select_block_count], int32.
        scale_value (float): multiplies the scores, usually D ** -0.5.
        head_num (int): must equal N1.
        select_block_size (int): keys per selected block, 16..128, a multiple of 16.
        select_block_count (int): blocks per query row, 1..32.
        atten_mask (Tensor, optional): reserved, as in CANN: a 2-D bool/uint8 tensor is accepted and
            its contents ignored. The causal mask comes from `sparse_mode`.
        actual_seq_qlen, actual_seq_kvlen (tuple/list of int or 1-D int Tensor, optional): cumulative
            lengths per batch (e.g. per-batch lengths 2, 2, 3 are given as (2, 4, 7)); both or
            neither. Neither means one batch. Tensors change value without recompiling a graph.
        sparse_mode (int): 0 = no mask; 2 = causal within each batch (key position > query
            position masked), applied identically in the forward and the backward.

    Returns:
        (attention_out [T1, N1, Dv] in query's dtype, softmax_max [T1, N1, 8] float32,
        softmax_sum [T1, N1, 8] float32). A row that sees no key returns zeros, -inf and 0.

    Examples:
        >>> import numpy as np, mindspore as ms, ms_nsa
        >>> query = ms.Tensor(np.random.randn(48, 4, 32).astype(np.float32))      # T1=48, N1=4, D=32
        >>> key = ms.Tensor(np.random.randn(96, 2, 32).astype(np.float32))        # T2=96, N2=2
        >>> value = ms.Tensor(np.random.randn(96, 2, 32).astype(np.float32))
        >>> topk = ms.Tensor(np.tile(np.arange(2, dtype=np.int32), (48, 2, 1)))   # blocks 0 and 1
        >>> out, softmax_max, softmax_sum = ms_nsa.nsa_select_attention(
        ...     query, key, value, topk, 32 ** -0.5, 4, 16, 2,
        ...     actual_seq_qlen=(16, 16 + 32), actual_seq_kvlen=(32, 32 + 64), sparse_mode=2)
        >>> out.shape, softmax_max.shape
        ((48, 4, 32), (48, 4, 8))
    """
    _expect_tensors(FORWARD, query, key, value, topk_indices)
    op = _backend.forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    cu_seq_q, cu_seq_kv = _mask_and_lengths(FORWARD, atten_mask, actual_seq_qlen, actual_seq_kvlen, query.shape[0],
                                            key.shape[0])
    softmax_max, softmax_sum, attention_out = op(query, key, value, topk_indices, cu_seq_q, cu_seq_kv)
    return attention_out, softmax_max, softmax_sum


def nsa_select_attention_grad(grad, query, key, value, attention_out, softmax_max, softmax_sum,
                              topk_indices, scale_value, head_num, select_block_size, select_block_count,
                              *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode=0):
    r"""Gradient of :func:`nsa_select_attention`: returns (dq, dk, dv) in query's dtype.

    `grad` is the gradient of the loss with respect to `attention_out`; `attention_out`,
    `softmax_max` and `softmax_sum` are the forward's outputs for the same inputs. Other arguments as
    in :func:`nsa_select_attention`, with the same mask. dk and dv are bitwise reproducible.
    """
    _expect_tensors(BACKWARD, grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices)
    op = _backend.grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    cu_seq_q, cu_seq_kv = _mask_and_lengths(BACKWARD, atten_mask, actual_seq_qlen, actual_seq_kvlen, query.shape[0],
                                            key.shape[0])
    return op(query, key, value, attention_out, grad, softmax_max, softmax_sum, topk_indices, cu_seq_q,
              cu_seq_kv)


def check_inputs(query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
                 *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0):
    r"""Runs every check of :func:`nsa_select_attention` on these arguments without running the op.

    The same checks and messages as a call: attributes, shapes, dtypes and tuple lengths from
    ops_yaml/, then the kernel's own data checks (custom_aot/nsa_validate.cc: cumulative lengths, each
    batch's KV length, every topk index) on host copies of the length and index values. Use it on a
    data set before a long GRAPH_MODE run, where a data error ends the run (docs/errors.md). Python
    only: call it outside compiled graphs. Returns None; raises TypeError / ValueError.

    Examples:
        >>> import numpy as np, mindspore as ms, ms_nsa
        >>> query = ms.Tensor(np.zeros((64, 4, 32), np.float32))
        >>> key = value = ms.Tensor(np.zeros((128, 2, 32), np.float32))
        >>> topk = ms.Tensor(np.zeros((64, 2, 2), np.int32))
        >>> ms_nsa.check_inputs(query, key, value, topk, 32 ** -0.5, 4, 16, 2,
        ...                     actual_seq_qlen=(32, 64), actual_seq_kvlen=(64, 128))   # fine: returns None
        >>> ms_nsa.check_inputs(query, key, value, topk, 32 ** -0.5, 4, 16, 2,
        ...                     actual_seq_qlen=(32, 32), actual_seq_kvlen=(64, 64))
        Traceback (most recent call last):
        ValueError: nsa_select_attention: actual_seq_qlen = (32, 32) must end at the token count 64 ...
    """
    _expect_tensors(FORWARD, query, key, value, topk_indices)
    op_def, backend = load_op_def(FORWARD), _backend.name()
    attrs = op_def.check_attrs(dict(scale_value=scale_value, head_num=head_num, sparse_mode=sparse_mode,
                                    select_block_size=select_block_size,
                                    select_block_count=select_block_count), backend)
    _mask_and_lengths(FORWARD, atten_mask, actual_seq_qlen, actual_seq_kvlen, query.shape[0], key.shape[0])
    cu_seq_q = _host_lengths(actual_seq_qlen, query.shape[0])
    cu_seq_kv = _host_lengths(actual_seq_kvlen, key.shape[0])
    tensors = dict(query=query, key=key, value=value, topk_indices=topk_indices)
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    shapes.update(actual_seq_qlen=cu_seq_q.shape, actual_seq_kvlen=cu_seq_kv.shape)
    dims = op_def.bind_dims(shapes, attrs, backend)
    op_def.check_dtypes({name: _backend.dtype_name(t.dtype) for name, t in tensors.items()}, backend)
    sizes = (dims["T1"], dims["T2"], dims["N1"], dims["N2"], dims["D"], dims["Dv"], dims["B"])
    _cpu_kernels.validate_data(_function_name(FORWARD), sizes, cu_seq_q, cu_seq_kv, attrs["select_block_size"],
                               attrs["select_block_count"], attrs["sparse_mode"] == 2, topk_indices.asnumpy())


def _host_lengths(lengths, total):
    """Cumulative lengths as an int64 NumPy array (None = one batch of `total` tokens)."""
    if lengths is None:
        return np.array([total], np.int64)
    if isinstance(lengths, Tensor):
        return lengths.asnumpy().astype(np.int64)
    return np.asarray(lengths, np.int64)


def _expect_tensors(op_name, *tensors):
    """The positional tensor arguments are Tensors of the right rank (constant checks in graph mode),
    so that later messages (about lengths, say) never stem from a misplaced or mis-shaped argument."""
    shapes = ()
    for name, value in zip(_tensor_names(op_name), tensors):
        if not isinstance(value, Tensor):
            raise TypeError(f"{_function_name(op_name)}: {name} must be a mindspore Tensor, got "
                            f"{type(value).__name__}")
        shapes = shapes + (value.shape,)
    _check_each_shape(op_name, _backend.name(), shapes)


@functools.lru_cache(maxsize=None)
def _check_each_shape(op_name, backend, shapes):
    """Each tensor's rank and fixed dimensions on its own, before any cross-argument rule."""
    op_def = load_op_def(op_name)
    for name, shape in zip(_tensor_names(op_name), shapes):
        op_def.bind_dims({name: shape}, {}, backend)


def _mask_and_lengths(op_name, atten_mask, actual_seq_qlen, actual_seq_kvlen, q_tokens, kv_tokens):
    """Checks the reserved mask (never read) and returns the cumulative lengths in the backend's form."""
    if atten_mask is not None:
        _check_mask(op_name, _backend.name(), atten_mask.shape, atten_mask.dtype)
    _check_lengths_paired(actual_seq_qlen is None, actual_seq_kvlen is None, op_name)
    return (_cumulative(actual_seq_qlen, q_tokens, "actual_seq_qlen", op_name),
            _cumulative(actual_seq_kvlen, kv_tokens, "actual_seq_kvlen", op_name))


def _cumulative(lengths, total, name, op_name):
    """Cumulative lengths in the form the backend's op takes (CPU: 1-D int64 tensor; Ascend: tuple)."""
    if isinstance(lengths, Tensor):
        _check_length_tensor(lengths.dtype, lengths.ndim, name, op_name)
        _backend.check_length_tensor(name, _function_name(op_name))
        return ops.cast(lengths, ms.int64)
    return _constant_cumulative(lengths, total, name, op_name)


@functools.lru_cache(maxsize=None)
def _function_name(op_name):
    return load_op_def(op_name).python["function"]


@functools.lru_cache(maxsize=None)
def _tensor_names(op_name):
    return tuple(load_op_def(op_name).python_tensor_args())


def _check_length_tensor(dtype, ndim, name, op_name):
    if dtype not in (ms.int32, ms.int64) or ndim != 1:
        raise TypeError(f"{_function_name(op_name)}: {name} must be a 1-D int32/int64 Tensor, a tuple or a "
                        f"list of ints, got a {ndim}-D Tensor of {dtype}")


def _constant_cumulative(lengths, total, name, op_name):
    """Checks Python-side lengths at once (compile time in graph mode) and makes them a constant."""
    if lengths is None:
        return _backend.int_array((total,))
    if isinstance(lengths, np.ndarray) and lengths.ndim == 1:
        lengths = lengths.tolist()
    if not isinstance(lengths, (tuple, list)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lengths):
        raise TypeError(f"{_function_name(op_name)}: {name} must be a tuple or list of ints or a 1-D int "
                        f"Tensor, got {lengths!r}")
    values = [int(v) for v in lengths]
    previous = 0
    for i, v in enumerate(values):
        if v < previous:
            raise ValueError(f"{_function_name(op_name)}: {name}[{i}] = {v} is smaller than the entry "
                             f"before it ({previous}); {name} holds cumulative lengths, which never "
                             f"decrease: per-batch lengths 2, 2, 3 are passed as (2, 4, 7)"
                             f"{_running_sum_hint(tuple(values), total)}")
        previous = v
    if not values or values[-1] != total:
        raise ValueError(f"{_function_name(op_name)}: {name} = {tuple(values)} must end at the token count "
                         f"{total} (the first dimension of the tensor it describes); {name} holds "
                         f"cumulative lengths, so its last entry is the token count"
                         f"{_running_sum_hint(tuple(values), total)}")
    return _backend.int_array(values)


@functools.lru_cache(maxsize=None)
def _running_sum_hint(values, total):
    """The hint "; did you mean (32, 64)?" when `values` look like per-batch lengths of `total` tokens."""
    if len(values) > 1 and min(values) >= 0 and sum(values) == total:
        return f"; did you mean {tuple(int(v) for v in np.cumsum(values))}?"
    return ""


def _check_lengths_paired(q_missing, kv_missing, op_name, names=("actual_seq_qlen", "actual_seq_kvlen")):
    if q_missing != kv_missing:
        given, missing = (names[1], names[0]) if q_missing else names
        raise ValueError(f"{_function_name(op_name)}: {given} was given but {missing} is None; pass both "
                         f"(packed batches) or neither (one batch)")


@functools.lru_cache(maxsize=None)
def _check_mask(op_name, backend, shape, dtype):
    """The mask's rank and dtype from the yaml. An lru_cache object like every helper here that reaches
    op_def: the graph compiler runs it at compile time (its arguments are constants) instead of parsing
    op_def's comprehensions and closures into the graph, which it cannot do."""
    op_def = load_op_def(op_name)
    op_def.bind_dims({"atten_mask": shape}, {}, backend)
    op_def.check_dtypes({"atten_mask": _backend.dtype_name(dtype)}, backend)
