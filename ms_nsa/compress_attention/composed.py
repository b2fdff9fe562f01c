"""nsa_compress_attention from stock MindSpore ops (matmul + softmax + matmul on the full [T1, T2]
score matrix, float32): what a user would write without ms_nsa. The tests use it as an independent
gradient check through MindSpore autodiff, the benchmark as the baseline. Not part of the public API.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..reference import _batches
from .reference import FLT_MAX, selection_blocks


def masks(q_tokens, kv_tokens, atten_mask=None, actual_seq_qlen=None, actual_cmp_seq_kvlen=None):
    """bool [T1, T2] Tensors (host-side): (atten_mask placed at every batch's top-left corner, keys of
    other batches). The first gets -FLT_MAX like the kernel, the second -inf (they do not exist)."""
    masked = np.zeros((q_tokens, kv_tokens), bool)
    foreign = np.ones((q_tokens, kv_tokens), bool)
    mask = None if atten_mask is None else np.asarray(atten_mask, bool)
    for q0, q1, k0, k1 in _batches(q_tokens, kv_tokens, actual_seq_qlen, actual_cmp_seq_kvlen):
        foreign[q0:q1, k0:k1] = False
        if mask is not None:
            masked[q0:q1, k0:k1] = mask[:q1 - q0, :k1 - k0]
    return Tensor(masked), Tensor(foreign)


def composed_probabilities(query, key, scale_value, masked, foreign):
    """P [N2, G, T1, T2] in float32."""
    q_tokens, n1, dim = query.shape
    kv_tokens, n2, _ = key.shape
    group = n1 // n2
    q = query.astype(ms.float32).reshape(q_tokens, n2, group, dim).transpose(1, 2, 0, 3)     # [N2, G, T1, D]
    k = ops.broadcast_to(key.astype(ms.float32).transpose(1, 0, 2).expand_dims(1), (n2, group, kv_tokens, dim))
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale_value
    scores = ops.masked_fill(scores, masked, -FLT_MAX)
    scores = ops.masked_fill(scores, foreign, float("-inf"))
    return ops.softmax(scores, axis=-1)


def composed_attention(query, key, value, scale_value, masked, foreign):
    """attention_out [T1, N1, Dv] in float32."""
    q_tokens, n1, _ = query.shape
    kv_tokens, n2, v_dim = value.shape
    probs = composed_probabilities(query, key, scale_value, masked, foreign)
    v = ops.broadcast_to(value.astype(ms.float32).transpose(1, 0, 2).expand_dims(1),
                         (n2, n1 // n2, kv_tokens, v_dim))
    return ops.matmul(probs, v).transpose(2, 0, 1, 3).reshape(q_tokens, n1, v_dim)


def importance_matrix(kv_tokens, compress_block_size, compress_stride, select_block_size):
    """float32 [T2, S_sel] mapping one batch's P to block scores (sum_{a<m, b<nn} P[m (j+1) - a - b])."""
    m, nn = select_block_size // compress_stride, compress_block_size // compress_stride
    blocks = selection_blocks(kv_tokens, compress_stride, select_block_size)
    weights = np.zeros((kv_tokens, blocks), np.float32)
    for j in range(blocks):
        for a in range(m):
            for b in range(nn):
                if 0 <= m * (j + 1) - a - b < kv_tokens:
                    weights[m * (j + 1) - a - b, j] += 1
    return Tensor(weights)


def composed_topk(probs, weights, select_block_count, forced=None):
    """topk_indices [T1, N2, n] int32 for one batch: group-summed P times `weights`, forced blocks
    set to FLT_MAX, ops.topk (whose order among equal scores is MindSpore's, not CANN's)."""
    scores = ops.matmul(probs.sum(axis=1), weights)                                        # [N2, T1, S_sel]
    if forced is not None:
        scores = ops.masked_fill(scores, forced, FLT_MAX)
    _, indices = ops.topk(scores, select_block_count)
    return indices.astype(ms.int32).transpose(1, 0, 2)
