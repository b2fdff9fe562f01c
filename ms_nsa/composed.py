"""NSA selected attention written with stock MindSpore ops (gather + matmul + softmax, float32).

This is what a user would write without ms_nsa: it materialises the gathered keys and values
([T1, N2, C*beta, D]) and lets MindSpore's autodiff produce the backward. The tests use it as an
independent gradient check of the fused kernels, and benchmarks/ as the baseline to beat. It is not
part of the public API.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .reference import _batches


def row_geometry(q_tokens, kv_tokens, actual_seq_qlen=None, actual_seq_kvlen=None):
    """Per query row: the global row of its batch's first key, and its batch-local position.

    Host-side (NumPy) because it depends only on the cumulative lengths; returns int32 Tensors
    shaped [T1, 1, 1] ready to broadcast against [T1, N2, C*beta].
    """
    kv_begin = np.zeros(q_tokens, np.int32)
    position = np.zeros(q_tokens, np.int32)
    for q_begin, q_end, k_begin, _ in _batches(q_tokens, kv_tokens, actual_seq_qlen, actual_seq_kvlen):
        kv_begin[q_begin:q_end] = k_begin
        position[q_begin:q_end] = np.arange(q_end - q_begin)
    shape = (q_tokens, 1, 1)
    return Tensor(kv_begin.reshape(shape)), Tensor(position.reshape(shape))


def composed_forward(query, key, value, topk_indices, scale_value, select_block_size, kv_begin, position,
                     sparse_mode=0):
    """attention_out [T1, N1, Dv] in float32 (inputs are cast to float32 first)."""
    q_tokens, n1, dim = query.shape
    kv_tokens, n2, v_dim = value.shape
    group = n1 // n2
    span = topk_indices.shape[2] * select_block_size

    # Batch-local key position of every selected slot: [T1, N2, C*beta].
    offsets = ops.arange(select_block_size, dtype=ms.int32).reshape(1, 1, 1, -1)
    key_pos = (topk_indices.astype(ms.int32).expand_dims(-1) * select_block_size + offsets)
    key_pos = key_pos.reshape(q_tokens, n2, span)
    heads = ops.arange(n2, dtype=ms.int32).reshape(1, n2, 1)
    flat_rows = ((kv_begin + key_pos) * n2 + heads).reshape(-1)

    k_sel = ops.gather(key.astype(ms.float32).reshape(kv_tokens * n2, dim), flat_rows, 0)
    v_sel = ops.gather(value.astype(ms.float32).reshape(kv_tokens * n2, v_dim), flat_rows, 0)
    k_sel = k_sel.reshape(q_tokens, n2, span, dim)
    v_sel = v_sel.reshape(q_tokens, n2, span, v_dim)
    q = query.astype(ms.float32).reshape(q_tokens, n2, group, dim)

    scores = ops.matmul(q, k_sel.swapaxes(-1, -2)) * scale_value            # [T1, N2, G, L]
    if sparse_mode == 2:
        masked = (key_pos > position).expand_dims(2)                           # [T1, N2, 1, L]
        scores = ops.masked_fill(scores, masked, float("-inf"))
    probs = ops.softmax(scores, axis=-1)
    return ops.matmul(probs, v_sel).reshape(q_tokens, n1, v_dim)
